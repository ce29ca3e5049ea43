"""Opening the Dagster instance at DAGSTER_HOME without racing another process to create it.

A fresh SQLite instance creates its storage (and stamps its schema version) the first time a
process opens it. Two processes doing that at the same moment (two `kura-pipeline run` on a new
checkout, the CLI beside `dagster dev`'s code server) race on the stamp: one fails with an
IntegrityError, or the version table ends with two heads and every later command on that
instance fails ("more than one head present") until the folder is deleted. Measured before this
module: three `kura-pipeline list` started together on a fresh DAGSTER_HOME, four times over, left
11 of 12 processes with a traceback and the instance unusable in every trial.

`open_instance` takes an exclusive lock on a file in DAGSTER_HOME while it opens the instance, so
one process creates the storage and the others open what it made. The lock is held only while
opening: runs themselves are not serialised.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dagster import DagsterInstance

LOCK_FILE = ".kura_instance.lock"


def open_instance() -> DagsterInstance:
    """DagsterInstance.get(), one process at a time per DAGSTER_HOME (which must be set)."""
    home = os.getenv("DAGSTER_HOME")
    if not home:
        return DagsterInstance.get()  # Dagster's own error, which names the variable
    folder = Path(home)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return DagsterInstance.get()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
