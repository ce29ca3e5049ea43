"""The storage layout, in one place: where each stage's output for a dataset lives, how a file
is written so no reader ever sees part of it, and how a stage's last table is read back.

    <data dir>/<asset>/<dataset>.parquet    every table stage (polars, one file per partition)
    <data dir>/explorer/<dataset>.html      the explorer page

The data dir is a local folder or any fsspec URL (`s3://`, `gs://`, `memory://`, `file://`):
`KURA_DATA_DIR`, default `data`. The IO managers (resources/io_manager.py) are Dagster's
UPathIOManager, whose own rule is `<base>/<asset key>/<partition><extension>`; they take their
extensions from here, and a test checks that they write exactly where `stage_path` and
`page_path` say. Everything else (the CLI, the notebook API, stages reading their last result)
asks this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid

import polars as pl
import pyarrow.parquet as pq
from dagster import ConfigurableResource
from upath import UPath

DATA_DIR_ENV = "KURA_DATA_DIR"
DEFAULT_DATA_DIR = "data"
TABLE_EXTENSION = ".parquet"
PAGE_EXTENSION = ".html"
EXPLORER_ASSET = "explorer"
LOCAL_PROTOCOLS = ("", "file", "local")


def data_dir_from_env() -> str:
    """Where the stages live: KURA_DATA_DIR (a folder or an fsspec URL), default `data`."""
    return os.getenv(DATA_DIR_ENV, DEFAULT_DATA_DIR)


def stage_path(base_path: str, asset: str, partition: str) -> UPath:
    """Where a table stage's output for one dataset lives."""
    return UPath(base_path) / asset / f"{partition}{TABLE_EXTENSION}"


def page_path(base_path: str, partition: str, asset: str = EXPLORER_ASSET) -> UPath:
    """Where a page stage (the explorer) for one dataset lives."""
    return UPath(base_path) / asset / f"{partition}{PAGE_EXTENSION}"


def table_rows(path: UPath) -> int | None:
    """A stored table's row count from its Parquet footer (None: no table there yet)."""
    if not path.exists():
        return None
    with path.open("rb") as file:
        return pq.ParquetFile(file).metadata.num_rows


def read_table(path: UPath, columns: list[str] | None = None) -> pl.DataFrame | None:
    """A stored table (None: not there yet)."""
    if not path.exists():
        return None
    with path.open("rb") as file:
        return pl.read_parquet(file, columns=columns)


def partial_name(path: UPath) -> UPath:
    """A sibling no other write uses: `<file>.<pid>.<uuid>.partial`. Two processes (or threads)
    writing the same stage never share a temporary file, so neither tears the other's."""
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")


def write_if_changed(path: UPath, data: bytes, digest: str | None = None) -> bool:
    """`data` at `path` (atomically) unless the file already holds exactly it: a run with nothing
    new rewrites no file, and a file's timestamp says when its content last changed. `digest`:
    data's sha256 when the caller has it already. Returns whether it wrote."""
    digest = digest or hashlib.sha256(data).hexdigest()
    if path.exists():
        with path.open("rb") as file:
            if hashlib.sha256(file.read()).hexdigest() == digest:
                return False
    write_atomically(path, data)
    return True


def write_atomically(path: UPath, data: bytes) -> None:
    """`data` at `path`, whole or not at all: a reader sees the old file or the new one, never a
    part, however many writers race. On local disk (and in memory) a unique sibling, then an
    atomic replace; on an object store an upload is complete when it returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.protocol in LOCAL_PROTOCOLS:
        local = path.path if path.protocol else str(path)
        partial = f"{local}.{os.getpid()}.{uuid.uuid4().hex}.partial"
        try:
            with open(partial, "wb") as file:
                file.write(data)
            os.replace(partial, local)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
    elif path.protocol == "memory":
        partial_path = partial_name(path)
        with partial_path.open("wb") as file:
            file.write(data)
        partial_path.rename(path)
    else:  # object stores have no rename: the upload is complete when `close` returns
        with path.open("wb") as file:
            file.write(data)


class StageReader(ConfigurableResource):
    """Reads a stage's last stored table: how a stage sees its own previous result (e.g. the
    clusters of the last run, to keep their identity). Points at the IO manager's base path."""

    base_path: str = DEFAULT_DATA_DIR

    def read(self, asset: str, partition: str) -> pl.DataFrame | None:
        return read_table(stage_path(self.base_path, asset, partition))
