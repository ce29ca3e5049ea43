"""The data models every stage shares, with field names compatible with Kura's."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator

if TYPE_CHECKING:
    from kura_pipeline.core.loaders import LoadResult

# Kura allows metadata values that are scalars or lists of scalars.
Scalar = str | int | float | bool | None
MetadataValue = Scalar | list[Scalar]
Metadata = dict[str, MetadataValue]

Role = Literal["user", "assistant"]

# Metadata keys a loader adds for its own bookkeeping (how a record was put together): kept in
# the data, never offered as a breakdown to a reader.
LOADER_BOOKKEEPING_KEYS = frozenset({"sharegpt_parts", "dropped_messages", "replaced_characters"})


def utc(value: datetime) -> datetime:
    """Naive timestamps are taken as UTC; aware ones are converted to UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class Message(BaseModel):
    role: Role
    content: str
    created_at: datetime | None = None

    @field_validator("created_at")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else utc(value)


class Conversation(BaseModel):
    chat_id: str = Field(min_length=1)
    # None when the source has no date for the conversation (ShareGPT, most HF datasets): an
    # unknown date stays unknown, never a made-up day.
    created_at: datetime | None = None
    messages: list[Message]
    metadata: Metadata = Field(default_factory=dict)

    @field_validator("created_at")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else utc(value)

    # Kura's loaders, as its notebooks call them, over the project's own loaders (so the same
    # cleaning, de-duplication and skipped-record reports apply). Loaders are imported when
    # called: they import this module.
    @classmethod
    def from_hf_dataset(
        cls,
        dataset_name: str,
        split: str = "train",
        max_conversations: int | None = None,
        chat_id_fn: Callable[[Mapping[str, Any]], str] = lambda row: row["chat_id"],
        created_at_fn: Callable[[Mapping[str, Any]], Any] | None = lambda row: row["created_at"],
        messages_fn: Callable[[Mapping[str, Any]], Any] = lambda row: (
            row["messages"] if "messages" in row else row["content"]
        ),
        metadata_fn: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
        **load_kwargs: Any,
    ) -> list[Conversation]:
        """Kura's `Conversation.from_hf_dataset`: `datasets.load_dataset(dataset_name, split=...)`
        (a hub name, a local folder of data files, or "json"/"parquet" with `data_files=`), each
        row mapped by the `*_fn` functions. Rows that cannot be used are skipped with a warning
        (Kura would stop at the first)."""
        from kura_pipeline.core.loaders import load

        result = load(
            "huggingface",
            path=dataset_name,
            split=split,
            max_conversations=max_conversations,
            chat_id_fn=chat_id_fn,
            created_at_fn=created_at_fn,
            messages_fn=messages_fn,
            metadata_fn=metadata_fn,
            **load_kwargs,
        )
        return _loaded(result, dataset_name)

    @classmethod
    def from_claude_conversation_dump(
        cls,
        file_path: str | Path,
        metadata_fn: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    ) -> list[Conversation]:
        """Kura's `Conversation.from_claude_conversation_dump`: a Claude.ai export's
        `conversations.json`; `metadata_fn(record)` adds metadata from each raw record."""
        from kura_pipeline.core.loaders import load

        conversations = _loaded(load("claude", path=file_path), str(file_path))
        if metadata_fn is not None:
            # The loader keeps no raw record: the export is read once more for the function.
            records = json.loads(Path(file_path).read_text(encoding="utf-8"))
            extra = {r.get("uuid"): dict(metadata_fn(r)) for r in records if isinstance(r, dict)}
            for conversation in conversations:
                conversation.metadata.update(extra.get(conversation.chat_id, {}))
        return conversations


def _loaded(result: LoadResult, source: str) -> list[Conversation]:
    """The conversations of a load, with one warning for what was skipped (never silently)."""
    if result.skipped:
        first = result.skipped[0]
        warnings.warn(
            f"{source}: {len(result.skipped)} records skipped (first: {first.record}: {first.reason})",
            stacklevel=3,
        )
    return list(result.conversations)


class ConversationSummary(BaseModel):
    """Clio's facets for one conversation (no PII, no proper nouns)."""

    chat_id: str
    summary: str
    request: str | None = None
    topic: str | None = None
    languages: list[str] = Field(default_factory=list)
    task: str | None = None
    concerning_score: int | None = Field(default=None, ge=1, le=5)
    user_frustration: int | None = Field(default=None, ge=1, le=5)
    assistant_errors: list[str] = Field(default_factory=list)
    metadata: Metadata = Field(default_factory=dict)
    # Whether the judgement facets (concerning_score, user_frustration) come from a model that
    # passed the facet calibration (core/calibration.py): False = stored as null, shown as
    # "not assessed by this model"; None = not known (tables from before calibration).
    facets_assessed: bool | None = None
    # What is embedded for clustering when it is not the summary (the offline backend's scrubbed
    # request): never shown to a person.
    clustering_text: str | None = None


class ExtractedProperty(BaseModel):
    name: str
    value: Scalar


class Cluster(BaseModel):
    """A cluster at some level of the hierarchy (0 = base clusters, parents above)."""

    id: str
    name: str
    description: str
    slug: str
    chat_ids: list[str]
    parent_id: str | None = None
    level: int = 0
    # How many of its conversations came with each batch (Clio's temporal breakdowns).
    batch_counts: dict[str, int] = Field(default_factory=dict)
    # Identity across re-clustering: "kept" (same cluster as before, same id and name), "new",
    # "merged" (from several earlier clusters) or "split" (part of an earlier cluster).
    lineage: Literal["kept", "new", "merged", "split"] | None = None
    previous_ids: list[str] = Field(default_factory=list)
    # Below the privacy threshold (too few conversations or users): kept in the table for the
    # pipeline, never shown to a person.
    withheld: bool = False
    # Set when an LLM run could not use the model's answer for this cluster and fell back (a
    # failed or generic name, an unmatched assignment, a level grouped without the model): why.
    fallback: str | None = None

    @property
    def count(self) -> int:
        return len(self.chat_ids)


class ProjectedConversation(BaseModel):
    """A conversation's place on the 2-D map and its cluster at each level (0 = base)."""

    chat_id: str
    x: float
    y: float
    cluster_ids: list[str]
