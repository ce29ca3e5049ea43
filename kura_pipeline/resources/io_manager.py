"""Every asset partition as one Parquet file, read and written with polars.

Dagster's UPathIOManager does the path work (`<base>/<asset key>/<partition>.parquet`) on a
local folder or any fsspec URL (`s3://`, `gs://`, `memory://`, `file://`), so one code path
serves both. A table whose content did not change is not rewritten: a re-run with nothing
new changes no file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from typing import Any

import polars as pl
from dagster import (
    ConfigurableIOManagerFactory,
    ConfigurableResource,
    InputContext,
    MetadataValue,
    OutputContext,
    UPathIOManager,
)
from upath import UPath

from kura_pipeline.core.frames import parquet_bytes

CONTENT_HASH_KEY = "content_sha256"


def stage_path(base_path: str, asset: str, partition: str) -> UPath:
    """Where a stage's table for one dataset lives (the same layout UPathIOManager uses)."""
    return UPath(base_path) / asset / f"{partition}.parquet"


class PolarsParquetUPathIOManager(UPathIOManager):
    extension = ".parquet"

    def dump_to_path(self, context: OutputContext, obj: pl.DataFrame, path: UPath) -> None:
        if not isinstance(obj, pl.DataFrame):
            raise TypeError(
                f"{context.asset_key.to_user_string()} must return a polars DataFrame, "
                f"got {type(obj).__name__}"
            )
        data = parquet_bytes(obj)
        digest = hashlib.sha256(data).hexdigest()
        context.add_output_metadata({CONTENT_HASH_KEY: digest})
        if path.exists() and _sha256_of(path) == digest:
            return  # same content: leave the file (and its timestamp) alone
        write_atomically(path, data)

    def load_from_path(self, context: InputContext, path: UPath) -> pl.DataFrame:
        # An input may ask for some columns only (`AssetIn(metadata={"columns": [...]})`):
        # Parquet reads just those, e.g. a conversation's batch without its messages.
        columns = (context.definition_metadata or {}).get("columns")
        with path.open("rb") as file:
            return pl.read_parquet(file, columns=list(columns) if columns else None)

    def get_metadata(self, context: OutputContext, obj: pl.DataFrame) -> dict[str, Any]:
        return {
            "dagster/row_count": obj.height,
            "columns": MetadataValue.md(
                "\n".join(f"- `{name}`: {dtype}" for name, dtype in obj.schema.items())
            ),
        }


def _sha256_of(path: UPath) -> str:
    with path.open("rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


LOCAL_PROTOCOLS = ("", "file", "local")


def partial_name(path: UPath) -> UPath:
    """A sibling no other write uses: `<file>.<pid>.<uuid>.partial`. Two processes (or threads)
    writing the same stage never share a temporary file, so neither tears the other's."""
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.partial")


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


class ParquetIOManager(ConfigurableIOManagerFactory):
    """Where the stages live: a local folder (default `data`) or an fsspec URL."""

    base_path: str = "data"

    def create_io_manager(self, context: Any) -> PolarsParquetUPathIOManager:
        return PolarsParquetUPathIOManager(base_path=UPath(self.base_path))


class StageReader(ConfigurableResource):
    """Reads a stage's last stored table: how a stage sees its own previous result (e.g. the
    clusters of the last run, to keep their identity). Points at the IO manager's base path."""

    base_path: str = "data"

    def read(self, asset: str, partition: str) -> pl.DataFrame | None:
        path = stage_path(self.base_path, asset, partition)
        if not path.exists():
            return None
        with path.open("rb") as file:
            return pl.read_parquet(file)
