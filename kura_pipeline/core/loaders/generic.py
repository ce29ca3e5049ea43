"""Files whose rows already have the Conversation shape: JSON Lines and Parquet.

Rows: {chat_id, created_at?, messages: [{role, content, created_at?}], metadata?}; a null
or missing created_at is an unknown date (as in pipeline output from ShareGPT). Rows go
through the same cleaning as every other source (role names, control characters, system
messages dropped), so pipeline output loads back unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from kura_pipeline.core.loaders._base import (
    LoaderError,
    LoadResult,
    PathLike,
    RecordError,
    SkippedRecord,
    build_conversation,
    convert_record,
    record_label,
)
from kura_pipeline.core.loaders._json_reader import (
    convert_records,
    iter_converted,
    iter_json_lines,
    open_text,
    undecodable_reason,
)
from kura_pipeline.core.models import Conversation

_REQUIRED_COLUMNS = ("chat_id", "messages")


def load_jsonl(path: PathLike) -> LoadResult:
    """Conversations from a JSON Lines file, one per line; record labels are line numbers."""
    with open_text(path) as stream:
        items = iter_json_lines(stream, path)
        return convert_records(items, str(path), conversation_from_row, id_keys=("chat_id",))


def iter_jsonl(path: PathLike) -> Iterator[Conversation | SkippedRecord]:
    """load_jsonl one record at a time, in file order."""
    with open_text(path) as stream:
        items = iter_json_lines(stream, path)
        yield from iter_converted(items, str(path), conversation_from_row, id_keys=("chat_id",))


def load_parquet(path: PathLike) -> LoadResult:
    """Conversations from a Parquet file (read with polars); record labels are row indices."""
    import polars as pl  # heavy import, only needed here

    try:
        frame = pl.read_parquet(path)
    except FileNotFoundError:
        raise LoaderError(f"{path}: file not found") from None
    except (pl.exceptions.PolarsError, OSError) as error:
        raise LoaderError(f"{path}: not a readable Parquet file: {error}") from None
    missing = [column for column in _REQUIRED_COLUMNS if column not in frame.columns]
    if missing:
        raise LoaderError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}")
    result = LoadResult(conversations=[], skipped=[])
    for index, row in enumerate(frame.iter_rows(named=True)):
        try:
            result.conversations.append(convert_record(_conversation_from_parquet_row, row))
        except RecordError as error:
            label = record_label(f"#{index}", row.get("chat_id"))
            result.skipped.append(SkippedRecord(str(path), label, str(error)))
    return result


def conversation_from_row(row: Any) -> Conversation:
    if not isinstance(row, Mapping):
        raise RecordError(f"expected an object, got {type(row).__name__}")
    for field in _REQUIRED_COLUMNS:
        if row.get(field) is None:
            raise RecordError(f"missing field '{field}'")
    return build_conversation(row["chat_id"], row.get("created_at"), row["messages"], row.get("metadata"))


def _conversation_from_parquet_row(row: dict[str, Any]) -> Conversation:
    return conversation_from_row(row | {"metadata": _parquet_metadata(row.get("metadata"))})


def _parquet_metadata(value: object) -> object:
    """Metadata stored as a JSON string or as a struct column."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # reported as a bad record by build_conversation
        except (RecursionError, ValueError) as error:  # valid JSON json cannot take
            raise RecordError(f"metadata {undecodable_reason(error)}") from None
    if isinstance(value, dict):
        # A struct column has every key seen in any row; keys a row did not have come back as None.
        return {key: item for key, item in value.items() if item is not None}
    return value
