"""Each stage's table: pydantic models to polars frames and back, with fixed schemas.

Fixed schemas keep an empty stage readable and let polars, DuckDB and Arrow users rely on
column types. Nested fields stay nested (messages are a list of structs); metadata, whose values
mix types, is kept as JSON text.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator

import numpy as np
import polars as pl

from kura_pipeline.core.loaders._base import REPLACED_CHARACTERS
from kura_pipeline.core.models import Cluster, Conversation, ConversationSummary, ExtractedProperty

TIMESTAMP = pl.Datetime("us", "UTC")
INITIAL_BATCH = "initial"  # the batch of a dataset loaded whole, not from an inbox

CONVERSATIONS_SCHEMA = {
    "chat_id": pl.String,
    "batch": pl.String,  # the batch (inbox file) the conversation arrived with, or "initial"
    "created_at": TIMESTAMP,  # null when the source has no date (ShareGPT): unknown, not made up
    "messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String, "created_at": TIMESTAMP})),
    "metadata": pl.String,
}
SUMMARIES_SCHEMA = {
    "chat_id": pl.String,
    "summary": pl.String,
    "request": pl.String,
    "topic": pl.String,
    "languages": pl.List(pl.String),
    "task": pl.String,
    "concerning_score": pl.Int8,
    "user_frustration": pl.Int8,
    "assistant_errors": pl.List(pl.String),
    "metadata": pl.String,
    "failure_reason": pl.String,
    "clustering_text": pl.String,  # embedded instead of the summary when set; never shown
    # False: the model failed the facet calibration, its judgement facets are null (not assessed)
    "facets_assessed": pl.Boolean,
}
PROPERTIES_SCHEMA = {"chat_id": pl.String, "name": pl.String, "value": pl.String, "type": pl.String}
CLUSTERS_SCHEMA = {
    "id": pl.String,
    "name": pl.String,
    "description": pl.String,
    "slug": pl.String,
    "chat_ids": pl.List(pl.String),
    "parent_id": pl.String,
    "level": pl.Int16,
    "count": pl.Int64,
    "batch_counts": pl.List(pl.Struct({"batch": pl.String, "count": pl.Int64})),
    "lineage": pl.String,
    "previous_ids": pl.List(pl.String),
    "withheld": pl.Boolean,
    "fallback": pl.String,
}
PROJECTIONS_SCHEMA = {
    "kind": pl.String,  # "conversation" or "cluster"
    "id": pl.String,
    "x": pl.Float32,
    "y": pl.Float32,
    "level": pl.Int16,  # the cluster's level; null for conversations
    "cluster_ids": pl.List(pl.String),  # a conversation's clusters, base level first
}


# Conversations turned into table rows (or back into models) at a time: big enough for polars
# to work in bulk, small enough that the Python objects of one chunk are a few tens of MB.
CONVERSATION_CHUNK = 5_000


class ConversationFrameBuilder:
    """The conversations table built a chunk at a time, column-wise: a caller that streams
    conversations in (see loaders.iter_load) can let each one's models go once it is added, so
    Python objects for every conversation never exist next to the table."""

    def __init__(self, chunk_size: int = CONVERSATION_CHUNK) -> None:
        self.chunk_size = chunk_size
        self.conversations = 0
        self.messages = 0
        # Characters the loaders replaced by U+FFFD (invalid UTF-8, lone surrogates), all told.
        self.replaced_characters = 0
        self._pending: list[tuple[Conversation, str]] = []
        self._chunks: list[pl.DataFrame] = []

    def add(self, conversation: Conversation, batch: str = INITIAL_BATCH) -> None:
        self._pending.append((conversation, batch))
        self.conversations += 1
        self.messages += len(conversation.messages)
        replaced = conversation.metadata.get(REPLACED_CHARACTERS)
        if type(replaced) is int:
            self.replaced_characters += replaced
        if len(self._pending) >= self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        columns = {
            "chat_id": [c.chat_id for c, _ in pending],
            "batch": [batch for _, batch in pending],
            "created_at": [c.created_at for c, _ in pending],
            "messages": [
                [{"role": m.role, "content": m.content, "created_at": m.created_at} for m in c.messages]
                for c, _ in pending
            ],
            "metadata": [json.dumps(c.metadata, ensure_ascii=False, sort_keys=True) for c, _ in pending],
        }
        self._chunks.append(pl.DataFrame(columns, schema=CONVERSATIONS_SCHEMA))

    def frame(self) -> pl.DataFrame:
        self._flush()
        if not self._chunks:
            return pl.DataFrame(schema=CONVERSATIONS_SCHEMA)
        # No rechunk: that would copy the whole table once more just to join its chunks.
        return pl.concat(self._chunks, rechunk=False)


def conversations_to_frame(
    conversations: Iterable[Conversation], batch_of: dict[str, str] | None = None
) -> pl.DataFrame:
    builder = ConversationFrameBuilder()
    for conversation in conversations:
        builder.add(conversation, (batch_of or {}).get(conversation.chat_id, INITIAL_BATCH))
    return builder.frame()


def frame_to_conversations(frame: pl.DataFrame) -> list[Conversation]:
    return [
        Conversation(
            chat_id=row["chat_id"],
            created_at=row["created_at"],
            messages=row["messages"],
            metadata=json.loads(row["metadata"] or "{}"),
        )
        for row in frame.iter_rows(named=True)
    ]


def iter_conversation_chunks(
    frame: pl.DataFrame, chunk_size: int = CONVERSATION_CHUNK
) -> Iterator[list[Conversation]]:
    """The table's conversations as models, a chunk at a time: a stage that handles each
    conversation on its own holds one chunk of models, not 100,000 (4 GB) next to the table."""
    for chunk in frame.iter_slices(chunk_size):
        yield frame_to_conversations(chunk)


def summaries_to_frame(
    summaries: list[ConversationSummary], failures: dict[str, str] | None = None
) -> pl.DataFrame:
    rows = [
        {
            **s.model_dump(),
            "metadata": json.dumps(s.metadata, ensure_ascii=False, sort_keys=True),
            "failure_reason": None,
        }
        for s in summaries
    ]
    rows += [{"chat_id": chat, "failure_reason": reason} for chat, reason in (failures or {}).items()]
    return pl.DataFrame(rows, schema=SUMMARIES_SCHEMA).sort("chat_id")


def frame_to_summaries(frame: pl.DataFrame) -> list[ConversationSummary]:
    """The successful summaries; failed rows (with a failure_reason) are left out."""
    ok = frame.filter(pl.col("failure_reason").is_null()).drop("failure_reason")
    return [
        ConversationSummary(**{**row, "metadata": json.loads(row["metadata"] or "{}")})
        for row in ok.iter_rows(named=True)
    ]


def summaries_by_chat(frame: pl.DataFrame) -> dict[str, str]:
    """chat_id -> the text clustering reads of each successful summary (its `clustering_text`
    where set, else the summary), straight from the columns: no model per row."""
    ok = frame.filter(pl.col("failure_reason").is_null())
    return dict(zip(ok["chat_id"].to_list(), clustering_texts(ok), strict=True))


def clustering_texts(frame: pl.DataFrame) -> list[str]:
    """What is embedded and named from, per row: `clustering_text` where set, else the summary
    (tables from before that column have only the summary)."""
    if "clustering_text" not in frame.columns:
        return frame["summary"].to_list()
    return frame.select(pl.coalesce("clustering_text", "summary"))["clustering_text"].to_list()


def properties_to_frame(rows: list[tuple[str, ExtractedProperty]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "chat_id": chat,
                "name": p.name,
                "value": None if p.value is None else str(p.value),
                "type": type(p.value).__name__,
            }
            for chat, p in rows
        ],
        schema=PROPERTIES_SCHEMA,
    )


def embeddings_to_frame(chat_ids: list[str], embeddings: np.ndarray) -> pl.DataFrame:
    dims = embeddings.shape[1] if embeddings.ndim == 2 else 0
    return pl.DataFrame(
        {
            "chat_id": pl.Series(chat_ids, dtype=pl.String),
            "embedding": pl.Series(embeddings.astype(np.float32), dtype=pl.Array(pl.Float32, dims)),
        }
    )


def frame_to_embeddings(frame: pl.DataFrame) -> tuple[list[str], np.ndarray]:
    chat_ids = frame["chat_id"].to_list()
    if frame.height == 0:
        return chat_ids, np.zeros((0, 0), dtype=np.float32)
    return chat_ids, frame["embedding"].to_numpy().astype(np.float32)


def clusters_to_frame(clusters: list[Cluster]) -> pl.DataFrame:
    rows = [
        {
            **c.model_dump(),
            "count": c.count,
            "batch_counts": [{"batch": b, "count": n} for b, n in sorted(c.batch_counts.items())],
        }
        for c in clusters
    ]
    return pl.DataFrame(rows, schema=CLUSTERS_SCHEMA)


def frame_to_clusters(frame: pl.DataFrame) -> list[Cluster]:
    return [
        Cluster(**{**row, "batch_counts": {b["batch"]: b["count"] for b in row["batch_counts"] or []}})
        for row in frame.drop("count").iter_rows(named=True)
    ]


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    """The table as Parquet (deterministic: the same frame gives the same bytes)."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def content_sha256(frame: pl.DataFrame) -> str:
    """A stage's content fingerprint: equal when nothing in the table changed."""
    return hashlib.sha256(parquet_bytes(frame)).hexdigest()
