"""The IO managers: every table stage's partition as one Parquet file (polars), the explorer's
as one HTML page, each written whole or not at all.

Dagster's UPathIOManager does the path work on a local folder or any fsspec URL, so one code
path serves both; the layout and the atomic write are resources/storage.py's. A table whose
content did not change is not rewritten: a re-run with nothing new changes no file.
"""

from __future__ import annotations

import hashlib
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

from kura_pipeline.core.frames import parquet_bytes
from kura_pipeline.resources.storage import (
    DEFAULT_DATA_DIR,
    PAGE_EXTENSION,
    TABLE_EXTENSION,
    StageReader,
    stage_path,
    write_atomically,
    write_if_changed,
)

# Names other modules imported from here before the layout had a module of its own.
__all__ = ["ParquetIOManager", "HtmlIOManager", "StageReader", "stage_path", "write_atomically"]

CONTENT_HASH_KEY = "content_sha256"


class PolarsParquetUPathIOManager(UPathIOManager):
    extension = TABLE_EXTENSION

    def dump_to_path(self, context: OutputContext, obj: pl.DataFrame, path: UPath) -> None:
        if not isinstance(obj, pl.DataFrame):
            raise TypeError(
                f"{context.asset_key.to_user_string()} must return a polars DataFrame, "
                f"got {type(obj).__name__}"
            )
        data = parquet_bytes(obj)
        digest = hashlib.sha256(data).hexdigest()
        context.add_output_metadata({CONTENT_HASH_KEY: digest})
        write_if_changed(path, data, digest)  # same content: the file (and its timestamp) is left alone

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


class ParquetIOManager(ConfigurableIOManagerFactory):
    """Where the stages live: a local folder (default `data`) or an fsspec URL."""

    base_path: str = DEFAULT_DATA_DIR

    def create_io_manager(self, context: Any) -> PolarsParquetUPathIOManager:
        return PolarsParquetUPathIOManager(base_path=UPath(self.base_path))


class HtmlUPathIOManager(UPathIOManager):
    """`<base>/<asset key>/<partition>.html`, written whole or not at all."""

    extension = PAGE_EXTENSION

    def dump_to_path(self, context: OutputContext, obj: str, path: UPath) -> None:
        # A sibling of its own, then an atomic replace: a browser never opens a half-written
        # page, even while another process writes the same one (object stores: one upload).
        # The same page again is not rewritten.
        write_if_changed(path, obj.encode("utf-8"))

    def load_from_path(self, context: InputContext, path: UPath) -> str:
        return path.read_text(encoding="utf-8")


class HtmlIOManager(ConfigurableIOManagerFactory):
    """Where HTML pages go: the same base path as the Parquet tables (default `data`)."""

    base_path: str = DEFAULT_DATA_DIR

    def create_io_manager(self, context: Any) -> HtmlUPathIOManager:
        return HtmlUPathIOManager(base_path=UPath(self.base_path))


def storage_resources(base_path: str) -> dict[str, Any]:
    """The three resources that read and write a data dir, as every Definitions needs them."""
    return {
        "io_manager": ParquetIOManager(base_path=base_path),
        "stages": StageReader(base_path=base_path),
        "html_io_manager": HtmlIOManager(base_path=base_path),
    }
