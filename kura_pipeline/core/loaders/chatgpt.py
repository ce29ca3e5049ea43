"""ChatGPT data export (`conversations.json`)."""

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

# multimodal_text mixes text parts with image dicts; other types (code, execution_output,
# user_editable_context, thoughts, ...) are tool traffic or settings, not dialogue.
_TEXT_CONTENT_TYPES = frozenset({"text", "multimodal_text"})


def load_chatgpt_export(path: PathLike) -> LoadResult:
    """Conversations from a ChatGPT export, following the branch the user last saw.

    The title is left out on purpose (personal data); the model is kept as metadata['model'].
    """
    with open_text(path) as stream:
        items = iter_json_list(stream, path)
        return convert_records(items, str(path), _conversation, id_keys=("id", "conversation_id"))


def iter_chatgpt_export(path: PathLike) -> Iterator[Conversation | SkippedRecord]:
    """load_chatgpt_export one record at a time, in file order."""
    with open_text(path) as stream:
        items = iter_json_list(stream, path)
        yield from iter_converted(items, str(path), _conversation, id_keys=("id", "conversation_id"))


def _conversation(record: Any) -> Conversation:
    if not isinstance(record, dict):
        raise RecordError(f"expected an object, got {type(record).__name__}")
    chat_id = record.get("id") or record.get("conversation_id")
    if not isinstance(chat_id, str):
        raise RecordError("missing field 'id' (or 'conversation_id')")
    created_at = parse_timestamp(require(record, "create_time", (int, float, str)), "create_time")
    mapping = require(record, "mapping", dict)
    collector = MessageCollector()
    model: str | None = None
    for node_id, node in _current_branch(mapping, require(record, "current_node", str)):
        message = node.get("message")
        if message is None:  # the synthetic root node
            continue
        where = f"node {node_id}"
        if not isinstance(message, dict):
            raise RecordError(f"{where}: message should be an object, got {type(message).__name__}")
        role = require(require(message, "author", dict, where), "role", str, where)
        text = _visible_text(message, where)
        if text is None:
            collector.drop()
            continue
        message_time = optional_timestamp(message.get("create_time"), f"{where} create_time")
        collector.add(role, text, message_time, where)
        slug = _metadata(message).get("model_slug")
        if role == "assistant" and isinstance(slug, str) and slug:
            model = slug  # the latest one wins: the model that produced the current answer
    model = model or record.get("default_model_slug")
    metadata = {"source": "chatgpt"} | ({"model": model} if isinstance(model, str) and model else {})
    return collector.build(chat_id, created_at, metadata)


def _current_branch(mapping: dict[str, Any], current_node: str) -> list[tuple[str, dict[str, Any]]]:
    """(node_id, node) from the root down to current_node, via parent links.

    Regenerated answers and edited prompts are sibling branches; only this path is
    what the conversation finally looked like.
    """
    path: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    node_id: Any = current_node
    while node_id is not None:
        if not isinstance(node_id, str):
            raise RecordError(f"parent link should be a string, got {type(node_id).__name__}")
        if node_id in seen:
            raise RecordError(f"mapping has a parent cycle at node {node_id}")
        node = mapping.get(node_id)
        if not isinstance(node, dict):
            raise RecordError(f"node {node_id} is on the current branch but missing from mapping")
        seen.add(node_id)
        path.append((node_id, node))
        node_id = node.get("parent")
    path.reverse()
    return path


def _visible_text(message: dict[str, Any], where: str) -> str | None:
    """The text the user saw, or None for hidden/tool/non-text messages."""
    if _metadata(message).get("is_visually_hidden_from_conversation"):
        return None
    if message.get("recipient") not in (None, "all"):  # a call addressed to a tool
        return None
    content = require(message, "content", dict, where)
    content_type = content.get("content_type")
    if not isinstance(content_type, (str, type(None))):  # a list or object cannot be looked up
        got = type(content_type).__name__
        raise RecordError(f"{where}: content.content_type should be a string, got {got}")
    if content_type not in _TEXT_CONTENT_TYPES:
        return None
    parts = content.get("parts") or []
    if not isinstance(parts, list):
        raise RecordError(f"{where}: content.parts should be a list, got {type(parts).__name__}")
    # Non-string parts are image/file pointers.
    return "\n\n".join(part for part in parts if isinstance(part, str))


def _metadata(message: dict[str, Any]) -> dict[str, Any]:
    metadata = message.get("metadata")
    return metadata if isinstance(metadata, dict) else {}
