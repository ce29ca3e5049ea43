"""Shared result types and record-cleaning helpers for all loaders."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from kura_pipeline.core.models import Conversation, Message, Role, utc

PathLike = str | os.PathLike[str]

NESTED_TOO_DEEPLY = "nested too deeply to read (lists/objects inside each other)"
# Metadata key counting the characters of a conversation replaced by U+FFFD (see replace_surrogates).
REPLACED_CHARACTERS = "replaced_characters"
# Longer chat ids are skipped: an id is a key in every stage and shown in reports, not content.
MAX_CHAT_ID_CHARS = 1_000
# Bounds on a SkippedRecord's text: a 10 MB bad value must not become a 10 MB report row.
_MAX_LABEL_CHARS = 200
_MAX_REASON_CHARS = 500
_MAX_SHOWN_CHARS = 80

USER_ROLES = frozenset({"user", "human", "prompter"})
ASSISTANT_ROLES = frozenset({"assistant", "gpt", "chatgpt", "bing", "bard", "model"})
# Not part of the user/assistant dialogue: dropped and counted in metadata.
DROPPED_ROLES = frozenset({"system", "developer", "tool", "function"})

# C0 controls except \t and \n (\r is turned into \n first, see clean_text).
_CONTROL_CHARS = tuple(chr(code) for code in range(32) if chr(code) not in "\t\n")
_CONTROL_PATTERN = re.compile(r"[\x00-\x08\x0b-\x1f]")
# Lone surrogates: from "\ud800"-style JSON escapes, or invalid UTF-8 bytes (files are decoded with
# surrogateescape so each one can be counted). UTF-8 cannot encode them: pydantic, polars and
# Parquet all refuse them.
_SURROGATE_PATTERN = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class SkippedRecord:
    source: str  # the file (or dataset) path/name
    record: str  # which record: index and id where known, e.g. "#12 (id=abc)"
    reason: str  # human-readable: what is wrong

    def __post_init__(self) -> None:
        # Labels and reasons quote the record, whatever it holds: keep them short and encodable
        # so the report (Dagster metadata, logs) cannot fail or balloon because of one record.
        object.__setattr__(self, "source", replace_surrogates(self.source)[0])
        object.__setattr__(self, "record", _shorten(replace_surrogates(self.record)[0], _MAX_LABEL_CHARS))
        object.__setattr__(self, "reason", _shorten(replace_surrogates(self.reason)[0], _MAX_REASON_CHARS))


@dataclass
class LoadResult:
    conversations: list[Conversation]
    skipped: list[SkippedRecord]


class LoaderError(ValueError):
    """A whole-file problem; the message names the file (and position if known)."""


class RecordError(ValueError):
    """One record is unusable; the message is the reason. Becomes a SkippedRecord."""


def record_label(position: str, record_id: object = None) -> str:
    """E.g. '#12 (id=abc)' or 'line 7 (id=abc)'."""
    if isinstance(record_id, (str, int)) and not isinstance(record_id, bool):
        return f"{position} (id={record_id})"
    return position


def replace_surrogates(text: str) -> tuple[str, int]:
    """`text` with each lone surrogate replaced by U+FFFD, and how many were replaced."""
    # isascii first: it is ~10x faster than the search, and most texts are ASCII.
    if text.isascii() or _SURROGATE_PATTERN.search(text) is None:
        return text, 0
    return _SURROGATE_PATTERN.subn("\ufffd", text)


def shown(value: object) -> str:
    """repr(value) cut to a length fit for a reason."""
    if isinstance(value, str) and len(value) > _MAX_SHOWN_CHARS:
        # Cut before repr: the repr of a 10 MB string is another 10 MB string.
        return f"{value[:_MAX_SHOWN_CHARS]!r}... ({len(value):,} characters)"
    return _shorten(repr(value), _MAX_SHOWN_CHARS)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clean_text(text: str) -> str:
    """Normalise newlines and strip NUL and other C0 control characters."""
    # `in` is several times faster than a regex scan, and almost no text needs cleaning.
    if not any(char in text for char in _CONTROL_CHARS):
        return text
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL_PATTERN.sub("", text)


def parse_timestamp(value: object, what: str = "timestamp") -> datetime:
    """ISO 8601 string (with or without zone), unix seconds or datetime -> aware UTC."""
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"{what} is not a finite number: {shown(value)}")
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise RecordError(f"{what} is out of range as unix seconds: {shown(value)}") from None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise RecordError(f"{what} is not an ISO 8601 timestamp: {shown(value)}") from None
        try:
            return utc(parsed)
        except OverflowError:  # e.g. 9999-12-31T23:59-01:00 is past year 9999 in UTC
            raise RecordError(f"{what} is out of range in UTC: {shown(value)}") from None
    raise RecordError(f"{what} should be an ISO 8601 string or unix seconds, got {_type_name(value)}")


def normalise_role(raw: object, where: str) -> Role | None:
    """'user' or 'assistant'; None for roles that are dropped (system, tool, ...)."""
    if not isinstance(raw, str):
        raise RecordError(f"{where}: role should be a string, got {_type_name(raw)}")
    role = raw.strip().lower()
    if role in USER_ROLES:
        return "user"
    if role in ASSISTANT_ROLES:
        return "assistant"
    if role in DROPPED_ROLES:
        return None
    raise RecordError(f"{where}: unknown role {shown(raw)}")


def require(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """record[key], checked to be present, not null and of the expected type."""
    prefix = f"{where}: " if where else ""
    if not isinstance(record, Mapping):
        raise RecordError(f"{prefix}expected an object, got {_type_name(record)}")
    value = record.get(key)
    if value is None:  # absent and null are different mistakes: say which
        problem = f"field '{key}' is null" if key in record else f"missing field '{key}'"
        raise RecordError(prefix + problem)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass, but True is never a valid id or count here.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise RecordError(f"{prefix}field '{key}' should be {expected}, got {_type_name(value)}")
    return value


def optional_timestamp(value: object, what: str) -> datetime | None:
    return None if value is None else parse_timestamp(value, what)


def check_limit(max_conversations: int | None) -> None:
    """ValueError unless max_conversations is None or an integer >= 0."""
    if max_conversations is None:
        return
    if not isinstance(max_conversations, int) or isinstance(max_conversations, bool) or max_conversations < 0:
        raise ValueError(f"max_conversations should be None or an integer >= 0, got {max_conversations!r}")


class MessageCollector:
    """Collects messages in order, dropping non-dialogue roles and blank texts.

    `dropped` counts source messages that are not in the result: system/tool roles,
    blank texts and non-text content. It is stored as metadata['dropped_messages']
    when non-zero. `replaced` counts lone surrogates (and so invalid UTF-8 bytes, see
    open_text) replaced by U+FFFD in the messages, chat id and metadata; it is stored
    as metadata['replaced_characters'] when non-zero.
    """

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.dropped = 0
        self.replaced = 0

    def add(self, raw_role: object, text: str, created_at: datetime | None, where: str) -> None:
        role = normalise_role(raw_role, where)
        text = self.text(clean_text(text))
        if role is None or not text.strip():
            self.dropped += 1
            return
        self.messages.append(Message(role=role, content=text, created_at=created_at))

    def text(self, text: str) -> str:
        """`text` with lone surrogates replaced, counted."""
        text, replaced = replace_surrogates(text)
        self.replaced += replaced
        return text

    def drop(self) -> None:
        self.dropped += 1

    def extend(self, other: MessageCollector) -> None:
        self.messages.extend(other.messages)
        self.dropped += other.dropped
        self.replaced += other.replaced

    def check_not_empty(self) -> None:
        if not self.messages:
            raise RecordError("empty conversation: no user or assistant message with text")

    def build(self, chat_id: str, created_at: datetime | None, metadata: Mapping[str, Any]) -> Conversation:
        """The Conversation; RecordError if it has no messages or fails validation.

        created_at None means the source has no date for it: it stays unknown."""
        self.check_not_empty()
        chat_id = self.text(chat_id)
        if len(chat_id) > MAX_CHAT_ID_CHARS:
            too_long = f"{len(chat_id):,} characters (at most {MAX_CHAT_ID_CHARS:,})"
            raise RecordError(f"chat_id is too long: {too_long}")
        metadata = self._metadata(metadata)
        if self.dropped:
            metadata["dropped_messages"] = self.dropped
        if self.replaced:
            # Added to a count already there: pipeline output loaded back keeps its count.
            previous = metadata.get(REPLACED_CHARACTERS)
            metadata[REPLACED_CHARACTERS] = self.replaced + (previous if type(previous) is int else 0)
        try:
            return Conversation(
                chat_id=chat_id, created_at=created_at, messages=self.messages, metadata=metadata
            )
        except ValidationError as error:
            raise RecordError(describe_validation_error(error)) from None

    def _metadata(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """A copy with lone surrogates replaced in keys, string values and strings in lists
        (the only shapes metadata may have; anything deeper fails validation in build)."""
        cleaned: dict[str, Any] = {}
        for key, value in metadata.items():
            if isinstance(key, str):
                key = self.text(key)
            if isinstance(value, str):
                value = self.text(value)
            elif isinstance(value, list):
                value = [self.text(item) if isinstance(item, str) else item for item in value]
            cleaned[key] = value
        return cleaned


def build_conversation(
    chat_id: object, created_at: object, raw_messages: object, metadata: object
) -> Conversation:
    """A Conversation from values in the Conversation shape (generic files, HF rows).

    created_at None (unknown) is kept as None."""
    if isinstance(chat_id, int) and not isinstance(chat_id, bool):
        chat_id = str(chat_id)
    if not isinstance(chat_id, str) or not chat_id:
        raise RecordError(f"chat_id should be a non-empty string, got {shown(chat_id)}")
    conversation_time = optional_timestamp(created_at, "created_at")
    if not isinstance(raw_messages, list):
        raise RecordError(f"messages should be a list, got {_type_name(raw_messages)}")
    collector = MessageCollector()
    for position, raw in enumerate(raw_messages):
        where = f"message #{position}"
        if isinstance(raw, Message):
            raw = raw.model_dump()
        role = require(raw, "role", str, where)
        content = raw.get("content")
        if not isinstance(content, str):
            raise RecordError(f"{where}: content should be a string, got {_type_name(content)}")
        collector.add(role, content, optional_timestamp(raw.get("created_at"), f"{where} created_at"), where)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise RecordError(f"metadata should be an object, got {_type_name(metadata)}")
    return collector.build(chat_id, conversation_time, metadata)


def convert_record(convert: Callable[[Any], Conversation], value: Any) -> Conversation:
    """convert(value); any failure, expected or not, is a RecordError naming the reason.

    Whatever one record holds must cost that record only, never the file: a problem the
    loader did not foresee is reported with its exception type instead of ending the run."""
    try:
        return convert(value)
    except RecordError:
        raise
    except RecursionError:
        raise RecordError(NESTED_TOO_DEEPLY) from None
    except Exception as error:  # the point: one record, one skip
        raise RecordError(f"unexpected {type(error).__name__} while reading this record: {error}") from None


def describe_validation_error(error: ValidationError) -> str:
    problems = [
        f"{'.'.join(str(part) for part in item['loc']) or 'value'}: {item['msg']}"
        for item in error.errors()[:3]
    ]
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def _type_name(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", type(None): "null", bool: "boolean"}
    return names.get(type(value), type(value).__name__)
