"""De-duplication by chat_id."""

from __future__ import annotations

from collections.abc import Iterable

from kura_pipeline.core.loaders._base import LoadResult, SkippedRecord, record_label
from kura_pipeline.core.models import Conversation

IDENTICAL_DUPLICATE = "duplicate chat_id (identical)"
CONFLICTING_DUPLICATE = "duplicate chat_id with different content"


def deduplicate(conversations: Iterable[Conversation], source: str) -> LoadResult:
    """Keep the first conversation per chat_id; later ones are reported as skipped.

    Record labels are positions in `conversations` ("#3 (id=abc)").
    """
    first_by_id: dict[str, Conversation] = {}
    result = LoadResult(conversations=[], skipped=[])
    for index, conversation in enumerate(conversations):
        first = first_by_id.get(conversation.chat_id)
        if first is None:
            first_by_id[conversation.chat_id] = conversation
            result.conversations.append(conversation)
            continue
        reason = IDENTICAL_DUPLICATE if conversation == first else CONFLICTING_DUPLICATE
        result.skipped.append(SkippedRecord(source, record_label(f"#{index}", conversation.chat_id), reason))
    return result
