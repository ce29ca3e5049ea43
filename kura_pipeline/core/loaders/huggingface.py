"""Datasets read through the Hugging Face `datasets` library (hub names or local files)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kura_pipeline.core.loaders._base import (
    LoaderError,
    LoadResult,
    RecordError,
    SkippedRecord,
    build_conversation,
    check_limit,
    convert_record,
    record_label,
)
from kura_pipeline.core.models import Message

Row = Mapping[str, Any]


def load_hf_dataset(
    path: str,
    *,
    split: str = "train",
    chat_id_fn: Callable[[Row], str],
    created_at_fn: Callable[[Row], Any] | None = None,
    messages_fn: Callable[[Row], list[Message] | list[dict[str, Any]]],
    metadata_fn: Callable[[Row], Mapping[str, Any]] | None = None,
    max_conversations: int | None = None,
    **load_kwargs: Any,
) -> LoadResult:
    """Conversations from `datasets.load_dataset(path, split=split, **load_kwargs)`.

    The mapping functions turn a row into the Conversation fields, as in Kura's
    Conversation.from_hf_dataset. Without created_at_fn (or where it gives None), created_at
    is None: the date is unknown. A row whose mapping function raises (e.g. KeyError for a
    missing column), or that holds anything else unusable, is skipped, not fatal.
    """
    check_limit(max_conversations)
    try:
        import datasets
    except ImportError:
        raise LoaderError("the 'datasets' package is not installed") from None
    source = _describe_source(path, split, load_kwargs)
    try:
        dataset = datasets.load_dataset(path, split=split, **load_kwargs)
    except Exception as error:  # datasets raises many unrelated types (missing file, hub, config...)
        raise LoaderError(f"{source}: cannot load dataset: {type(error).__name__}: {error}") from error

    result = LoadResult(conversations=[], skipped=[])
    if max_conversations == 0:
        return result
    for index, row in enumerate(dataset):
        chat_id: object = None
        try:
            chat_id = chat_id_fn(row)
            created_at = created_at_fn(row) if created_at_fn else None
            metadata = metadata_fn(row) if metadata_fn else {}
            messages = messages_fn(row)
        except Exception as error:  # the mapping functions are the caller's code: anything can fail
            reason = f"mapping function failed: {type(error).__name__}: {error}"
        else:
            try:
                fields = (chat_id, created_at, messages, metadata)
                conversation = convert_record(lambda fields: build_conversation(*fields), fields)
            except RecordError as error:
                reason = str(error)
            else:
                result.conversations.append(conversation)
                if len(result.conversations) == max_conversations:
                    break
                continue
        result.skipped.append(SkippedRecord(source, record_label(f"#{index}", chat_id), reason))
    return result


def _describe_source(path: str, split: str, load_kwargs: Mapping[str, Any]) -> str:
    """E.g. 'json:/data/chats.jsonl[train]' or 'lmsys/lmsys-chat-1m[train]'."""
    data_files = load_kwargs.get("data_files")
    return f"{path}:{data_files}[{split}]" if data_files else f"{path}[{split}]"
