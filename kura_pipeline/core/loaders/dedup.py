"""De-duplication by chat_id."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from kura_pipeline.core.loaders._base import LoadResult, SkippedRecord, record_label
from kura_pipeline.core.models import Conversation

IDENTICAL_DUPLICATE = "duplicate chat_id (identical)"
CONFLICTING_DUPLICATE = "duplicate chat_id with different content"
DUPLICATE_REASONS = frozenset({IDENTICAL_DUPLICATE, CONFLICTING_DUPLICATE})


def content_digest(conversation: Conversation) -> bytes:
    """A fingerprint of everything in a conversation (equal conversations, equal digests)."""
    return hashlib.blake2b(conversation.model_dump_json().encode("utf-8"), digest_size=16).digest()


class Deduplicator:
    """Keeps the first conversation per chat_id, one conversation at a time.

    It remembers a 16-byte digest per chat_id, not the conversation itself, so a loader can
    stream: 100,000 conversations cost a few MB here instead of every model held to the end.
    Record labels are positions among the conversations seen ("#3 (id=abc)").
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._digest_of: dict[str, bytes] = {}
        self._seen = 0

    def skip(self, conversation: Conversation) -> SkippedRecord | None:
        """None for the first conversation with its chat_id; a SkippedRecord for a later one."""
        index, self._seen = self._seen, self._seen + 1
        digest = content_digest(conversation)
        first = self._digest_of.get(conversation.chat_id)
        if first is None:
            self._digest_of[conversation.chat_id] = digest
            return None
        reason = IDENTICAL_DUPLICATE if first == digest else CONFLICTING_DUPLICATE
        return SkippedRecord(self.source, record_label(f"#{index}", conversation.chat_id), reason)


def deduplicate(conversations: Iterable[Conversation], source: str) -> LoadResult:
    """Keep the first conversation per chat_id; later ones are reported as skipped.

    Record labels are positions in `conversations` ("#3 (id=abc)").
    """
    deduplicator = Deduplicator(source)
    result = LoadResult(conversations=[], skipped=[])
    for conversation in conversations:
        skipped = deduplicator.skip(conversation)
        if skipped is None:
            result.conversations.append(conversation)
        else:
            result.skipped.append(skipped)
    return result
