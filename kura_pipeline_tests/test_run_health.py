"""A run killed mid-way is shown as failed the next time the instance starts a run (issue #13,
item 8): a real process runs a job in-process on a real instance, is killed with SIGKILL, and
`fail_abandoned_runs` (which the CLI calls before it runs or lists) reports the run failed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from kura_pipeline.run_health import RUN_HOST_TAG, RUN_PID_TAG, fail_abandoned_runs, in_process_run_tags

SCRIPT = Path(__file__).parent / "scripts" / "run_and_hang.py"


def test_a_killed_in_process_run_is_marked_failed_and_a_live_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    environment = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    # The instance's SQLite storage is created here, once, before any worker starts: processes
    # that create a fresh instance's storage at the same moment race on its schema stamp.
    instance = DagsterInstance.get()
    processes: list[subprocess.Popen] = []

    def start_a_run() -> subprocess.Popen:
        started = len(instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED])))
        process = subprocess.Popen([sys.executable, str(SCRIPT)], env=environment)
        processes.append(process)
        end = time.monotonic() + 120
        while len(instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))) <= started:
            assert process.poll() is None, f"the worker exited with {process.returncode}"
            assert time.monotonic() < end, "the run never started"
            time.sleep(0.2)
        return process

    try:
        with instance:
            worker = start_a_run()
            live = start_a_run()
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
            killed = instance.get_runs(filters=RunsFilter(tags={RUN_PID_TAG: str(worker.pid)}))[0]
            assert killed.status == DagsterRunStatus.STARTED  # Dagster alone never learns of it

            # The next CLI command on this instance says so and fails the run.
            registry = tmp_path / "datasets.yaml"
            registry.write_text("datasets:\n  demo:\n    loader: sharegpt\n    options: {path: x.json}\n")
            listed = subprocess.run(
                [
                    str(Path(sys.executable).parent / "kura-pipeline"),
                    "--registry",
                    str(registry),
                    "--data-dir",
                    str(tmp_path / "data"),
                    "list",
                ],
                env=environment,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert listed.returncode == 0, listed.stderr[-2000:]
            assert f"run {killed.run_id[:8]} was left unfinished" in listed.stderr
            assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
            messages = [record.message for record in instance.all_logs(killed.run_id)]
            assert any(f"pid {worker.pid}" in message and "killed" in message for message in messages)
            still = instance.get_runs(filters=RunsFilter(tags={RUN_PID_TAG: str(live.pid)}))[0]
            assert still.status == DagsterRunStatus.STARTED  # its process lives: left alone
            assert fail_abandoned_runs(instance) == []  # and nothing twice
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_the_tags_name_this_host_and_process():
    tags = in_process_run_tags()
    assert tags[RUN_PID_TAG] == str(os.getpid()) and tags[RUN_HOST_TAG]
