"""Processes that open a fresh instance together never break it (kura_pipeline/instance.py):
real `kura-pipeline` processes, started at once on a new DAGSTER_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "kura-pipeline")


@pytest.mark.slow
def test_commands_started_together_on_a_fresh_instance_all_work_and_leave_it_usable(tmp_path):
    registry = tmp_path / "datasets.yaml"
    registry.write_text("datasets:\n  demo:\n    loader: jsonl\n    options: {path: x.jsonl}\n")
    home = tmp_path / "home"  # not created: the first command creates it
    environment = {**os.environ, "DAGSTER_HOME": str(home)}
    command = [CLI, "--registry", str(registry), "--data-dir", str(tmp_path / "data"), "list"]
    # Before: 11 of 12 such processes failed with a traceback, and the instance's version table
    # was left with two heads, so every later command failed too.
    started = [
        subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for process in started:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and "Traceback" not in err, err[-2000:]
        assert "demo" in out
    later = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert later.returncode == 0 and "Traceback" not in later.stderr, later.stderr[-2000:]
