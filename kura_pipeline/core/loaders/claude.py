"""Claude.ai data export (`conversations.json`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kura_pipeline.core.loaders._base import (
    LoadResult,
    MessageCollector,
    PathLike,
    RecordError,
    SkippedRecord,
    optional_timestamp,
    parse_timestamp,
    require,
)
from kura_pipeline.core.loaders._json_reader import (
    convert_records,
    iter_converted,
    iter_json_list,
    open_text,
)
from kura_pipeline.core.models import Conversation


def load_claude_export(path: PathLike) -> LoadResult:
    """Conversations from a Claude.ai export; chat_id is the conversation uuid, and the
    account's uuid is metadata['user_id'] (what the privacy threshold counts users by).

    Titles and attachments are left out on purpose: they often contain personal data.
    """
    with open_text(path) as stream:
        return convert_records(iter_json_list(stream, path), str(path), _conversation, id_keys=("uuid",))


def iter_claude_export(path: PathLike) -> Iterator[Conversation | SkippedRecord]:
    """load_claude_export one record at a time, in file order."""
    with open_text(path) as stream:
        yield from iter_converted(iter_json_list(stream, path), str(path), _conversation, id_keys=("uuid",))


def _conversation(record: Any) -> Conversation:
    chat_id = require(record, "uuid", str)
    created_at = parse_timestamp(require(record, "created_at", (str, int, float)), "created_at")
    collector = MessageCollector()
    for position, message in enumerate(require(record, "chat_messages", list)):
        where = f"message #{position}"
        sender = require(message, "sender", str, where)
        message_time = optional_timestamp(message.get("created_at"), f"{where} created_at")
        collector.add(sender, _message_text(message, where), message_time, where)
    metadata: dict[str, Any] = {"source": "claude"}
    # The account counts distinct users for the privacy threshold (min_cluster_users); it is
    # never shown (the explorer does not offer the user id as a breakdown).
    account = record.get("account")
    if isinstance(account, dict) and isinstance(account.get("uuid"), str) and account["uuid"]:
        metadata["user_id"] = account["uuid"]
    return collector.build(chat_id, created_at, metadata)


def _message_text(message: dict[str, Any], where: str) -> str:
    """The text blocks of `content` (tool use, thinking etc. are not dialogue), else `text`."""
    content = message.get("content")
    if content:
        if not isinstance(content, list):
            raise RecordError(f"{where}: content should be a list, got {type(content).__name__}")
        texts = []
        for block in content:
            if not isinstance(block, dict):
                raise RecordError(f"{where}: content block should be an object, got {type(block).__name__}")
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
        return "\n\n".join(texts)
    text = message.get("text")
    if text is None:
        return ""
    if not isinstance(text, str):
        raise RecordError(f"{where}: text should be a string, got {type(text).__name__}")
    return text
