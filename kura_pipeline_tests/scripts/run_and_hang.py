"""Start a run in-process, tagged as the CLI tags its runs, that hangs until the process is
killed (`test_run_health.py` kills it with SIGKILL). DAGSTER_HOME says which instance."""

from __future__ import annotations

import time

from dagster import DagsterInstance, job, op

from kura_pipeline.run_health import in_process_run_tags


@op
def hang() -> None:
    time.sleep(600)


@job
def hanging_job() -> None:
    hang()


if __name__ == "__main__":
    hanging_job.execute_in_process(instance=DagsterInstance.get(), tags=in_process_run_tags())
