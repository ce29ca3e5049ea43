"""Every asset partition as one Parquet file, read and written with polars.

Dagster's UPathIOManager does the path work (`<base>/<asset key>/<partition>.parquet`) on a
local folder or any fsspec URL (`s3://`, `gs://`, `memory://`, `file://`), so one code path
serves both.
"""

from __future__ import annotations

from typing import Any

import polars as pl
from dagster import (
    ConfigurableIOManagerFactory,
    InputContext,
    MetadataValue,
    OutputContext,
    UPathIOManager,
)
from upath import UPath


class PolarsParquetUPathIOManager(UPathIOManager):
    extension = ".parquet"

    def dump_to_path(self, context: OutputContext, obj: pl.DataFrame, path: UPath) -> None:
        if not isinstance(obj, pl.DataFrame):
            raise TypeError(
                f"{context.asset_key.to_user_string()} must return a polars DataFrame, "
                f"got {type(obj).__name__}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a sibling and rename, so a crash never leaves a half-written table behind.
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as file:
            obj.write_parquet(file)
        if path.protocol in ("", "file", "local", "memory"):
            partial.rename(path)
        else:  # object stores have no rename: the upload is complete when `close` returns
            _copy_then_remove(partial, path)

    def load_from_path(self, context: InputContext, path: UPath) -> pl.DataFrame:
        with path.open("rb") as file:
            return pl.read_parquet(file)

    def get_metadata(self, context: OutputContext, obj: pl.DataFrame) -> dict[str, Any]:
        return {
            "dagster/row_count": obj.height,
            "columns": MetadataValue.md(
                "\n".join(f"- `{name}`: {dtype}" for name, dtype in obj.schema.items())
            ),
        }


def _copy_then_remove(source: UPath, target: UPath) -> None:
    with source.open("rb") as src, target.open("wb") as dst:
        dst.write(src.read())
    source.unlink()


class ParquetIOManager(ConfigurableIOManagerFactory):
    """Where the stages live: a local folder (default `data`) or an fsspec URL."""

    base_path: str = "data"
    storage_options: dict[str, Any] = {}

    def create_io_manager(self, context: Any) -> PolarsParquetUPathIOManager:
        return PolarsParquetUPathIOManager(base_path=UPath(self.base_path, **self.storage_options))
