"""The console logger keeps each error's type and message and drops its frames."""

from __future__ import annotations

import logging

from kura_pipeline.console_logger import TRACE_NOTE, BriefStackTraces, without_stack_traces

FAILURE = """Execution of step "raw_conversations" failed.

dagster._core.definitions.events.Failure: dataset 'bad': nope.jsonl: file not found

Stack Trace:
  File "dagster/execute_plan.py", line 243, in dagster_event_sequence_for_step
    yield from check.generator(step_events)

The above exception was caused by the following exception:
kura_pipeline.core.loaders._base.LoaderError: nope.jsonl: file not found

Stack Trace:
  File "kura_pipeline/assets/raw_conversations.py", line 42, in raw_conversations
    for item in iter_load(spec.loader, **spec.options)
"""


def test_a_failure_keeps_every_error_and_loses_its_frames():
    brief = without_stack_traces(FAILURE)
    assert "File " not in brief and "Stack Trace" not in brief
    assert "Failure: dataset 'bad': nope.jsonl: file not found" in brief
    assert "LoaderError: nope.jsonl: file not found" in brief
    assert brief.endswith(TRACE_NOTE)
    assert without_stack_traces("step started") == "step started"


def test_the_filter_rewrites_the_record_a_handler_prints():
    record = logging.LogRecord("dagster", logging.ERROR, __file__, 1, "%s", (FAILURE,), None)
    assert BriefStackTraces().filter(record)
    assert record.getMessage() == without_stack_traces(FAILURE)
