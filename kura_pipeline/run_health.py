"""Runs whose process died are marked failed, not left STARTED forever.

A run executed in-process (`kura-pipeline run`, the notebook API) is tagged with the host and
pid that run it. A `kill -9`, an OOM kill or a closed laptop ends that process without a word
to Dagster, and the run would show as STARTED in the UI and in `kura-pipeline list` for ever.
`fail_abandoned_runs` finds this host's in-process runs whose process no longer exists and
reports each as failed, saying why; the CLI calls it before it starts a run or lists datasets.

Runs launched by the Dagster daemon (the UI, schedules, sensors) are watched by Dagster's own
run monitoring instead: `run_monitoring` in deploy/dagster.yaml.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from kura_pipeline.core.llm_cache import HOST, process_exists

RUN_HOST_TAG = "kura/host"
RUN_PID_TAG = "kura/pid"
UNFINISHED = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]


def in_process_run_tags() -> dict[str, str]:
    """The tags of a run this process executes itself (`execute_in_process(tags=...)`)."""
    return {RUN_HOST_TAG: HOST, RUN_PID_TAG: str(os.getpid())}


def fail_abandoned_runs(instance: DagsterInstance) -> list[str]:
    """Mark this host's unfinished in-process runs whose process is gone as failed; their ids."""
    failed = []
    runs = instance.get_runs(filters=RunsFilter(statuses=UNFINISHED, tags={RUN_HOST_TAG: HOST}))
    for run in runs:
        pid = run.tags.get(RUN_PID_TAG, "")
        if not pid.isdigit() or int(pid) == os.getpid() or process_exists(int(pid)):
            continue
        instance.report_run_failed(
            run,
            message=f"the process that ran it (pid {pid} on {HOST}) ended before the run did "
            "(killed or crashed); a re-run resumes from the stages and LLM answers already stored",
        )
        failed.append(run.run_id)
    return failed


def step_reason(error: Any) -> str:
    """What went wrong in a step, in its own words: Dagster wraps the stage's exception in
    "Error occurred while executing op ...", so the innermost cause, without its class path."""
    while error.cause is not None:
        error = error.cause
    kind, _, message = error.message.strip().partition(": ")
    return message if message and kind.endswith(error.cls_name or "\0") else error.message.strip()


def interrupted_step(result: Any) -> str | None:
    """The step an in-process run was interrupted in (Ctrl-C, SIGINT/SIGTERM), if it was."""
    for event in result.all_events:
        error = event.step_failure_data.error if event.is_step_failure and event.step_failure_data else None
        while error is not None:
            if error.cls_name in ("DagsterExecutionInterruptedError", "KeyboardInterrupt"):
                return event.step_key
            error = error.cause
    return None


def failed_steps(result: Any) -> list[str]:
    """One line per failed step of an in-process run's result: "<step> failed: <reason>"."""
    return [
        f"{event.step_key} failed: {step_reason(event.step_failure_data.error)}"
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data
    ]
