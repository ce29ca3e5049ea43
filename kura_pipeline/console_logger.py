"""The console logger of every job: Dagster's own, without stack traces in the console.

A failed step printed some 50 lines of stack traces (the Failure and its cause, each with its
frames) before the one line that says what went wrong ("nope.jsonl: file not found"). The
console keeps each error's type and message; the full trace stays in the run's event log (the
Dagster UI, `dagster dev`) and is printed as before with KURA_FULL_TRACEBACKS=1.
"""

from __future__ import annotations

import logging
import os

from dagster import InitLoggerContext, logger
from dagster._loggers import colored_console_logger

STACK_TRACE = "\nStack Trace:"
CAUSE = "The above exception was caused by the following exception:"
TRACE_NOTE = "(stack trace: in the run's event log, `dagster dev`; or set KURA_FULL_TRACEBACKS=1)"


def without_stack_traces(message: str) -> str:
    """Each error of a message (the exception and its causes) as its type and message only."""
    if STACK_TRACE not in message:
        return message
    kept = [part.split(STACK_TRACE, 1)[0].rstrip() for part in message.split(CAUSE)]
    return "\n".join(part for part in kept if part) + "\n" + TRACE_NOTE


class BriefStackTraces(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if STACK_TRACE in message:
            record.msg, record.args = without_stack_traces(message), ()
        return True


@logger(colored_console_logger.config_schema, description="Dagster's console logger, brief on failures.")
def brief_console_logger(init_context: InitLoggerContext) -> logging.Logger:
    console = colored_console_logger.logger_fn(init_context)
    if not os.getenv("KURA_FULL_TRACEBACKS"):
        console.addFilter(BriefStackTraces())
    return console
