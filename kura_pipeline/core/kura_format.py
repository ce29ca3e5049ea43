"""Kura 0.5.x checkpoints, both ways, as plain functions: our stage tables to the JSON records
Kura's own models (`Conversation`, `ConversationSummary`, `Cluster`, `ProjectedCluster`) validate
and its UI loads, and Kura's records back to this project's models.

A checkpoint folder holds one JSON Lines file per stage, named as Kura's JSONL checkpoint
manager names them (`<stage>.jsonl`, what `kura start-app` and its UI read):
- conversations.jsonl  Kura `Conversation` (its UI also takes Kura's older `conversations.json`)
- summaries.jsonl      Kura `ConversationSummary`
- clusters.jsonl       Kura `Cluster`: the base clusters, before the hierarchy (no parent)
- meta_clusters.jsonl  Kura `Cluster`: every level, with parents
- dimensionality.jsonl Kura `ProjectedCluster`: every cluster with its 2-D place and its depth

Where Kura is stricter than this project, the export bends and says so in the data:
- Kura requires a date; an unknown one (ShareGPT) is written as 1970-01-01 with the metadata
  flag UNKNOWN_DATE_KEY, which the loader turns back into "unknown".
- Kura's metadata values are scalars or lists of one scalar type, never null: nulls are left
  out and a mixed list becomes a list of strings.
- A cluster below the privacy threshold (`withheld`) keeps its place and members, but not its
  name or description: Kura's UI shows every cluster to a person.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from kura_pipeline.core.models import ConversationSummary, Metadata
from kura_pipeline.core.privacy import scrub_pii

# Kura's JSONL checkpoint files, by stage (JSONLCheckpointManager adds ".jsonl" to these names).
CHECKPOINT_FILES = {
    "conversations": "conversations.jsonl",
    "summaries": "summaries.jsonl",
    "clusters": "clusters.jsonl",
    "meta_clusters": "meta_clusters.jsonl",
    "dimensionality": "dimensionality.jsonl",
}
# Kura requires a date where this project may not know one: this day, flagged in metadata.
UNKNOWN_DATE = datetime(1970, 1, 1, tzinfo=UTC)
UNKNOWN_DATE_KEY = "kura_pipeline_unknown_date"
WITHHELD_NAME = "Withheld (below the privacy threshold)"
WITHHELD_DESCRIPTION = "Too few conversations or users to describe this cluster."
SUMMARY_TEXT_FIELDS = ("summary", "request", "topic", "task")


def kura_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata Kura's models and UI accept: str/int/float/bool values or lists of one type."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if value is None:
            continue  # Kura has no null value
        if isinstance(value, list):
            items = [item for item in value if item is not None]
            kinds = {type(item) for item in items}
            # Kura's lists are list[str] | list[int] | list[float]: bools and mixes become text.
            if kinds and not kinds <= {str} and not kinds <= {int} and not kinds <= {int, float}:
                items = [json.dumps(item) if not isinstance(item, str) else item for item in items]
            out[str(key)] = items
        elif isinstance(value, (str, int, float, bool)):
            out[str(key)] = value
        else:
            out[str(key)] = json.dumps(value, ensure_ascii=False)
    return out


def _iso(value: datetime | None, fallback: datetime) -> str:
    return (value or fallback).astimezone(UTC).isoformat()


def kura_conversation_records(conversations: pl.DataFrame) -> Iterator[dict[str, Any]]:
    """One Kura `Conversation` record per row of the raw_conversations table."""
    for row in conversations.iter_rows(named=True):
        metadata = kura_metadata(json.loads(row["metadata"] or "{}"))
        if row["created_at"] is None:
            metadata[UNKNOWN_DATE_KEY] = True
        when = row["created_at"] or UNKNOWN_DATE
        yield {
            "chat_id": row["chat_id"],
            "created_at": _iso(when, UNKNOWN_DATE),
            "messages": [
                {"created_at": _iso(m["created_at"], when), "role": m["role"], "content": m["content"]}
                for m in row["messages"] or []
            ],
            "metadata": metadata,
        }


def kura_summary_records(summaries: pl.DataFrame) -> Iterator[dict[str, Any]]:
    """One Kura `ConversationSummary` per successful summary (failed rows have none to give)."""
    ok = (
        summaries.filter(pl.col("failure_reason").is_null())
        if "failure_reason" in summaries.columns
        else summaries
    )
    for row in ok.iter_rows(named=True):
        yield {
            "chat_id": row["chat_id"],
            "summary": row["summary"],
            "request": row["request"],
            "topic": row["topic"],
            "languages": row["languages"],
            "task": row["task"],
            "concerning_score": row["concerning_score"],
            "user_frustration": row["user_frustration"],
            "assistant_errors": row["assistant_errors"],
            "metadata": kura_metadata(json.loads(row["metadata"] or "{}")),
            "embedding": None,
        }


def _depths(parent_of: Mapping[str, str | None]) -> dict[str, int]:
    """Kura's `level`: the depth from the top (roots 0), where ours counts up from the base."""
    depths: dict[str, int] = {}
    for cluster in parent_of:
        chain, node = [], cluster
        while node is not None and node not in depths and node not in chain:
            chain.append(node)
            node = parent_of.get(node)
        base = depths.get(node, -1) if node is not None else -1
        for offset, member in enumerate(reversed(chain), start=1):
            depths[member] = base + offset
    return depths


def kura_cluster_records(
    clusters: pl.DataFrame, projections: pl.DataFrame | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(clusters, meta_clusters, dimensionality) records from the meta_clusters table (every
    level) and the projections table (each cluster's x, y)."""
    known = set(clusters["id"].to_list())
    # A parent that is not in the table would leave Kura's tree with a dangling branch.
    parent_of = {
        row["id"]: row["parent_id"] if row["parent_id"] in known else None
        for row in clusters.iter_rows(named=True)
    }
    depth = _depths(parent_of)
    place: dict[str, tuple[float, float]] = {}
    if projections is not None:
        rows = projections.filter(pl.col("kind") == "cluster")
        place = {i: (float(x), float(y)) for i, x, y in zip(rows["id"], rows["x"], rows["y"], strict=True)}
    base, meta, projected = [], [], []
    for row in clusters.iter_rows(named=True):
        withheld = bool(row.get("withheld"))
        record = {
            "id": row["id"],
            "name": WITHHELD_NAME if withheld else row["name"],
            "description": WITHHELD_DESCRIPTION if withheld else row["description"],
            "slug": "withheld" if withheld else row["slug"],
            "chat_ids": list(row["chat_ids"] or []),
            "parent_id": parent_of[row["id"]],
            "count": len(row["chat_ids"] or []),
        }
        meta.append(record)
        if row["level"] == 0:
            base.append(record | {"parent_id": None})
        x, y = place.get(row["id"], (0.0, 0.0))
        projected.append(record | {"x_coord": x, "y_coord": y, "level": depth[row["id"]]})
    return base, meta, projected


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Records as JSON Lines at `path` (written beside, then moved in place); the count."""
    partial = path.with_name(f"{path.name}.partial")
    count = 0
    with partial.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    partial.replace(path)
    return count


def write_kura_checkpoint(
    folder: Path,
    conversations: pl.DataFrame,
    summaries: pl.DataFrame,
    clusters: pl.DataFrame,
    projections: pl.DataFrame | None,
) -> dict[str, int]:
    """A Kura checkpoint folder from our stage tables; records written per file name."""
    folder.mkdir(parents=True, exist_ok=True)
    base, meta, projected = kura_cluster_records(clusters, projections)
    files = CHECKPOINT_FILES
    return {
        files["conversations"]: write_jsonl(
            folder / files["conversations"], kura_conversation_records(conversations)
        ),
        files["summaries"]: write_jsonl(folder / files["summaries"], kura_summary_records(summaries)),
        files["clusters"]: write_jsonl(folder / files["clusters"], base),
        files["meta_clusters"]: write_jsonl(folder / files["meta_clusters"], meta),
        files["dimensionality"]: write_jsonl(folder / files["dimensionality"], projected),
    }


# --- Kura's records back to ours ---------------------------------------------------------------


def conversation_row_from_kura(record: Mapping[str, Any]) -> dict[str, Any]:
    """A Kura `Conversation` record in this project's row shape (for the generic converter):
    a date the export flagged as unknown becomes unknown again."""
    metadata = (
        dict(record.get("metadata") or {})
        if isinstance(record.get("metadata"), Mapping)
        else record.get("metadata")
    )
    row = dict(record)
    if isinstance(metadata, dict) and metadata.pop(UNKNOWN_DATE_KEY, None) is True:
        row["created_at"] = None
        row["messages"] = [
            {**m, "created_at": None} if isinstance(m, Mapping) else m for m in record.get("messages") or []
        ]
    row["metadata"] = metadata
    return row


def _own_metadata(value: Any) -> dict[str, Any]:
    """A Kura summary's metadata, less the export's unknown-date flag."""
    if not isinstance(value, Mapping):
        return {}
    return {key: item for key, item in value.items() if key != UNKNOWN_DATE_KEY}


def summary_from_kura(record: Mapping[str, Any], metadata: Metadata | None = None) -> ConversationSummary:
    """This project's summary from a Kura `ConversationSummary` record. Its text goes through
    the same PII scrub as a summary our own LLM stage writes; its embedding is not kept (ours
    come from our embedder). `metadata`: the conversation's (cleaned) metadata, when known."""

    def clean(value: Any) -> str | None:
        return None if value is None else scrub_pii(str(value))[0]

    chat_id = record.get("chat_id")
    summary = record.get("summary")
    if not isinstance(chat_id, str) or not chat_id or not isinstance(summary, str):
        raise ValueError("a Kura summary needs a chat_id and a summary")
    own = record.get("metadata")
    return ConversationSummary(
        chat_id=chat_id,
        summary=clean(summary) or "",
        request=clean(record.get("request")),
        topic=clean(record.get("topic")),
        task=clean(record.get("task")),
        languages=[str(language).lower().strip() for language in record.get("languages") or []],
        concerning_score=record.get("concerning_score"),
        user_frustration=record.get("user_frustration"),
        assistant_errors=[clean(error) or "" for error in record.get("assistant_errors") or []],
        metadata=metadata if metadata is not None else _own_metadata(own),
    )


def split_summarised(
    raw_conversations: pl.DataFrame, prior: Mapping[str, ConversationSummary]
) -> tuple[pl.DataFrame, list[ConversationSummary]]:
    """(the conversations still to summarise, the summaries kept from `prior`): a prior summary
    counts for a conversation of the table with its chat_id, and carries that conversation's
    metadata (as a summary made here would), so only the rest costs model calls."""
    if not prior:
        return raw_conversations, []
    have = raw_conversations.filter(pl.col("chat_id").is_in(list(prior)))
    kept = [
        prior[chat].model_copy(update={"metadata": json.loads(metadata or "{}")})
        for chat, metadata in zip(have["chat_id"].to_list(), have["metadata"].to_list(), strict=True)
    ]
    return raw_conversations.filter(~pl.col("chat_id").is_in(list(prior))), kept
