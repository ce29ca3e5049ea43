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
