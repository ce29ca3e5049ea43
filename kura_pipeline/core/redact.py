"""API keys never reach a log: every log record is scrubbed of the configured keys.

An endpoint may echo the `Authorization` header in an error body (or a proxy may put it in a
reply), and instructor, openai and httpx log errors and replies on their own: the key would land
in stderr and in Dagster's compute and event logs. `install_redaction` registers keys and, once
per process, makes every log record carry "[REDACTED]" instead of them, in its message, its
arguments and its formatted traceback. Three hooks, so no record slips past:

- the log record factory: every record made in this process, whichever logger or handler it
  goes to (handlers added later too, such as Dagster's per-run ones or pytest's);
- a `logging.Filter` on the root logger's handlers and on the handlers of loggers that exist;
- the same filter on the loggers of the libraries that log requests (instructor, openai, httpx).

Keys shorter than `MIN_SECRET_LENGTH` characters are not registered: replacing a short string
everywhere would mangle logs and hide nothing worth hiding.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 8
LIBRARY_LOGGERS = ("instructor", "openai", "httpx", "httpcore", "dagster", "kura_pipeline")

_lock = threading.Lock()
_secrets: set[str] = set()
_installed = False
_previous_factory: Any = None


def redact(text: str) -> str:
    """`text` with every registered key replaced by "[REDACTED]" (longest first)."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def registered_secrets() -> frozenset[str]:
    return frozenset(_secrets)


def scrub_record(record: logging.LogRecord) -> None:
    """Redact one record in place: the message with its arguments merged in, the traceback."""
    if not _secrets:
        return
    try:
        message = record.getMessage()
    except Exception:  # a record that cannot format itself: keep what can be shown
        message = str(record.msg)
    record.msg = redact(message)
    record.args = None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class SecretRedactingFilter(logging.Filter):
    """Lets every record through, with the registered keys replaced by "[REDACTED]"."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


_FILTER = SecretRedactingFilter()


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _previous_factory(*args, **kwargs)
    scrub_record(record)
    return record


def _add_filter(target: logging.Logger | logging.Handler) -> None:
    if _FILTER not in target.filters:
        target.addFilter(_FILTER)


def _filter_existing_handlers() -> None:
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    loggers += [
        logger
        for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        _add_filter(logger)
        for handler in list(logger.handlers):
            _add_filter(handler)
    if logging.lastResort is not None:
        _add_filter(logging.lastResort)


def install_redaction(secrets: Iterable[str | None]) -> None:
    """Register keys (None and short ones are skipped) and make sure every log is scrubbed."""
    global _installed, _previous_factory
    new = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
    if not new:
        return
    with _lock:
        _secrets.update(new)
        if not _installed:
            _previous_factory = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_redacting_factory)
            _installed = True
        # Loggers and handlers made since the last call get the filter as well.
        _filter_existing_handlers()


def uninstall_redaction() -> None:
    """Forget every key and remove the hooks (for tests)."""
    global _installed, _previous_factory
    with _lock:
        _secrets.clear()
        if _installed:
            if logging.getLogRecordFactory() is _redacting_factory:
                logging.setLogRecordFactory(_previous_factory)
            _installed = False
            _previous_factory = None
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            if isinstance(logger, logging.Logger):
                logger.removeFilter(_FILTER)
                for handler in list(logger.handlers):
                    handler.removeFilter(_FILTER)
        if logging.lastResort is not None:
            logging.lastResort.removeFilter(_FILTER)
