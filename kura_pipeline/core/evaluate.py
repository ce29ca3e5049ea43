"""Evaluating a cluster hierarchy against ground-truth labels, level by level.

For conversations that carry a label (a metadata field, such as a topic), each level of the
hierarchy is a partition of those conversations; it is compared with the labels by:

- `accuracy`: Hungarian-matched accuracy. Labels and clusters are paired one-to-one so that the
  most conversations sit in their label's paired cluster (scipy's `linear_sum_assignment` on the
  label x cluster contingency table); accuracy is that count over all labelled conversations.
  With more clusters than labels only as many clusters as labels can be paired, so a level that
  splits every label in two scores about 0.5 however pure its clusters are: read it with
  `purity`, and at the level whose cluster count is near the label count.
- `nmi`, `ari`: normalised mutual information and the adjusted Rand index (scikit-learn).
- `purity`: the share of conversations whose cluster's majority label is their own label.
- `spillover_rate`: Kura's definition (its `benchmarks/analyze_spillover_questions.py` and the
  "Benchmarking Kura" post): the share of labels whose conversations fall in more than one
  cluster of the level. One stray conversation makes a label spill, so it is strict, and it
  is 1.0 by construction wherever clusters are smaller than labels (a base level of ~10
  conversations per cluster against labels of hundreds): it is informative near the top.
- `spillover_rate_majority`: a tolerant variant: a label spills if fewer than
  `majority_share` (default 0.9) of its conversations are in its majority cluster.

Pure functions over plain data: no Dagster, no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import polars as pl
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from kura_pipeline.core.models import Cluster
from kura_pipeline.core.project import cluster_at_each_level

DEFAULT_MAJORITY_SHARE = 0.9

EVALUATION_SCHEMA = {
    "level": pl.Int16,
    "clusters": pl.Int64,  # clusters at this level that hold a labelled conversation
    "labels": pl.Int64,  # distinct labels among the clustered conversations
    "conversations": pl.Int64,  # labelled conversations that are clustered
    "accuracy": pl.Float64,
    "nmi": pl.Float64,
    "ari": pl.Float64,
    "purity": pl.Float64,
    "spillover_rate": pl.Float64,
    "spillover_rate_majority": pl.Float64,
    "majority_share": pl.Float64,
}


def contingency(
    labels: Sequence[Hashable], clusters: Sequence[Hashable]
) -> tuple[np.ndarray, list[Hashable], list[Hashable]]:
    """The (label x cluster) count table, with the label and cluster of each row and column."""
    if len(labels) != len(clusters):
        raise ValueError(f"{len(labels)} labels but {len(clusters)} cluster assignments")
    label_names = sorted(set(labels), key=str)
    cluster_names = sorted(set(clusters), key=str)
    label_index = {name: i for i, name in enumerate(label_names)}
    cluster_index = {name: i for i, name in enumerate(cluster_names)}
    table = np.zeros((len(label_names), len(cluster_names)), dtype=np.int64)
    # np.add.at counts repeated (row, column) pairs: one vectorised pass, no per-cell loop.
    np.add.at(
        table,
        (
            np.array([label_index[x] for x in labels], dtype=np.int64),
            np.array([cluster_index[x] for x in clusters], dtype=np.int64),
        ),
        1,
    )
    return table, label_names, cluster_names


def hungarian_accuracy(table: np.ndarray) -> float:
    """Share of conversations in their label's cluster under the best one-to-one pairing."""
    total = table.sum()
    if total == 0:
        return math.nan
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / total)


def purity(table: np.ndarray) -> float:
    """Share of conversations whose cluster's most common label is their own."""
    total = table.sum()
    return float(table.max(axis=0).sum() / total) if total else math.nan


def spillover_rate(table: np.ndarray) -> float:
    """Kura's spillover: share of labels present in more than one cluster."""
    present = table.sum(axis=1) > 0
    if not present.any():
        return math.nan
    spread = (table[present] > 0).sum(axis=1)
    return float((spread > 1).mean())


def majority_spillover_rate(table: np.ndarray, majority_share: float = DEFAULT_MAJORITY_SHARE) -> float:
    """Share of labels whose largest cluster holds fewer than `majority_share` of them."""
    if not 0 < majority_share <= 1:
        raise ValueError(f"majority_share must be in (0, 1], got {majority_share}")
    sizes = table.sum(axis=1)
    present = sizes > 0
    if not present.any():
        return math.nan
    share = table[present].max(axis=1) / sizes[present]
    # A tiny tolerance: 9 of 10 is exactly 0.9 and must not spill because of float rounding.
    return float((share < majority_share - 1e-12).mean())


def level_scores(
    labels: Sequence[Hashable],
    clusters: Sequence[Hashable],
    majority_share: float = DEFAULT_MAJORITY_SHARE,
) -> dict[str, float | int]:
    """Every score for one partition of labelled items."""
    table, label_names, cluster_names = contingency(labels, clusters)
    empty = len(labels) == 0
    return {
        "clusters": len(cluster_names),
        "labels": len(label_names),
        "conversations": len(labels),
        "accuracy": hungarian_accuracy(table),
        "nmi": math.nan if empty else float(normalized_mutual_info_score(labels, clusters)),
        "ari": math.nan if empty else float(adjusted_rand_score(labels, clusters)),
        "purity": purity(table),
        "spillover_rate": spillover_rate(table),
        "spillover_rate_majority": majority_spillover_rate(table, majority_share),
        "majority_share": majority_share,
    }


def cluster_at_levels(clusters: Sequence[Cluster]) -> dict[str, list[str]]:
    """chat_id -> its cluster id at level 0, 1, ..., top (the hierarchy's depth for everyone):
    a skipped level or a branch that stops below the top keeps the nearest cluster below, so
    every level is a partition of every clustered conversation."""
    return cluster_at_each_level(list(clusters))


def evaluate_hierarchy(
    clusters: Sequence[Cluster],
    label_of: Mapping[str, Hashable],
    majority_share: float = DEFAULT_MAJORITY_SHARE,
) -> pl.DataFrame:
    """One row per hierarchy level (0 = base clusters) scored against `label_of` (chat_id -> label).

    Only conversations that are both clustered and labelled count; the table is empty when
    there are none."""
    paths = cluster_at_levels(clusters)
    chats = sorted(chat for chat in paths if label_of.get(chat) is not None)
    if not chats:
        return pl.DataFrame(schema=EVALUATION_SCHEMA)
    labels = [label_of[chat] for chat in chats]
    rows = [
        {"level": level, **level_scores(labels, [paths[chat][level] for chat in chats], majority_share)}
        for level in range(len(paths[chats[0]]))
    ]
    return pl.DataFrame(rows, schema=EVALUATION_SCHEMA)


def labels_from_metadata(
    chat_ids: Sequence[str], metadata_json: Sequence[str | None], field: str
) -> dict[str, str]:
    """chat_id -> label from a metadata field stored as JSON text (the stage tables' form).

    Conversations without the field (or with null) are left out; a list value is one label
    (its JSON text), since a conversation sits in one cluster per level."""
    labels = {}
    for chat, text in zip(chat_ids, metadata_json, strict=True):
        value = json.loads(text or "{}").get(field)
        if value is not None:
            labels[chat] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return labels


def markdown_table(frame: pl.DataFrame) -> str:
    """The evaluation as a markdown table (asset metadata, reports)."""
    columns = [
        "level",
        "clusters",
        "labels",
        "conversations",
        "accuracy",
        "nmi",
        "ari",
        "purity",
        "spillover_rate",
        "spillover_rate_majority",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for row in frame.iter_rows(named=True):
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
