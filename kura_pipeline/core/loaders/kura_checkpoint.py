"""A Kura checkpoint folder (what Kura 0.5.x or `kura-pipeline export --format kura` writes).

Conversations come from `conversations.jsonl` (Kura's JSONL checkpoint manager), or Kura's
older `conversations.json` dump (a JSON list), or `conversations` (the plain checkpoint
manager's name). Each record goes through the same cleaning as every other source.

Kura's summaries (`summaries.jsonl` or `summaries`) are read by `load_kura_summaries`: the
summaries stage can use them instead of asking a model again, so what a Kura user paid for is
not paid for twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kura_pipeline.core.kura_format import conversation_row_from_kura, summary_from_kura
from kura_pipeline.core.loaders._base import (
    LoaderError,
    LoadResult,
    PathLike,
    SkippedRecord,
    describe_validation_error,
)
from kura_pipeline.core.loaders._json_reader import (
    JsonRecord,
    convert_records,
    iter_converted,
    iter_json_lines,
    iter_json_list,
    open_text,
)
from kura_pipeline.core.loaders.generic import conversation_from_row
from kura_pipeline.core.models import Conversation, ConversationSummary

CONVERSATION_FILES = ("conversations.jsonl", "conversations.json", "conversations")
SUMMARY_FILES = ("summaries.jsonl", "summaries")


def _folder(path: PathLike) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise LoaderError(f"{folder}: Kura checkpoint folder not found")
    if not folder.is_dir():
        raise LoaderError(f"{folder}: expected a Kura checkpoint folder, got a file")
    return folder


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def conversations_file(path: PathLike) -> Path:
    folder = _folder(path)
    found = _first(folder, CONVERSATION_FILES)
    if found is None:
        raise LoaderError(f"{folder}: no Kura conversations file ({', '.join(CONVERSATION_FILES)})")
    return found


def _records(file: Path, stream: Any) -> Iterator[Any]:
    # Kura's dump is one JSON list; its checkpoints are one JSON object a line.
    return iter_json_list(stream, file) if file.suffix == ".json" else iter_json_lines(stream, file)


def _conversation(record: Any) -> Conversation:
    return conversation_from_row(conversation_row_from_kura(record) if isinstance(record, dict) else record)


def load_kura_checkpoint(path: PathLike) -> LoadResult:
    """The conversations of a Kura checkpoint folder (`path`); bad records are skipped, named."""
    file = conversations_file(path)
    with open_text(file) as stream:
        return convert_records(_records(file, stream), str(file), _conversation, id_keys=("chat_id",))


def iter_kura_checkpoint(path: PathLike) -> Iterator[Conversation | SkippedRecord]:
    """load_kura_checkpoint one record at a time, in file order."""
    file = conversations_file(path)
    with open_text(file) as stream:
        yield from iter_converted(_records(file, stream), str(file), _conversation, id_keys=("chat_id",))


def load_kura_summaries(path: PathLike) -> tuple[dict[str, ConversationSummary], list[SkippedRecord]]:
    """Kura's summaries in the folder, by chat_id (none when it has no summaries file), and a
    SkippedRecord for each one that cannot be used (that conversation is summarised afresh)."""
    file = _first(_folder(path), SUMMARY_FILES)
    if file is None:
        return {}, []
    summaries: dict[str, ConversationSummary] = {}
    skipped: list[SkippedRecord] = []
    with open_text(file) as stream:
        for item in iter_json_lines(stream, file):
            if not isinstance(item, JsonRecord):
                skipped.append(SkippedRecord(str(file), item.position, item.reason))
                continue
            record = item.value
            try:
                if not isinstance(record, dict):
                    raise ValueError(f"expected an object, got {type(record).__name__}")
                summary = summary_from_kura(record)
            except ValidationError as error:
                reason = describe_validation_error(error)
            except (ValueError, TypeError) as error:
                reason = str(error)
            else:
                summaries[summary.chat_id] = summary
                continue
            skipped.append(SkippedRecord(str(file), item.position, f"not a usable Kura summary: {reason}"))
    return summaries, skipped
