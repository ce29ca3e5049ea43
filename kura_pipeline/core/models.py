"""The data models every stage shares, with field names compatible with Kura's."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

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
