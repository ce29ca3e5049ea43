"""Cluster identity across re-clustering: what stays, what is new, what merged or split.

A new cluster that is substantially an earlier one (most of its earlier members, and a centroid
pointing the same way) keeps the earlier id and name, so no naming call is paid again and a
dashboard keeps its bookmarks. Only conversations present in both runs are compared: a cluster
that merely grew with new conversations is still the same cluster.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from kura_pipeline.core.cluster import centroid
from kura_pipeline.core.models import Cluster

MIN_JACCARD = 0.6
MIN_CENTROID_COSINE = 0.8
CONTRIBUTION = 0.3  # share of an earlier cluster's members that counts as "came from it"


@dataclass(frozen=True)
class Lineage:
    previous: Cluster | None  # the earlier cluster this one is (same id and name), if any
    lineage: str  # kept | new | merged | split
    previous_ids: list[str]


def previous_centroids(
    previous: list[Cluster], embedding_of: dict[str, np.ndarray], limit: int
) -> np.ndarray:
    """Centroids of the largest earlier clusters, from today's embeddings of their members:
    the warm start that lets k-means find the same clusters again."""
    rows = []
    for cluster in sorted(previous, key=lambda c: -c.count):
        members = [embedding_of[c] for c in cluster.chat_ids if c in embedding_of]
        if members:
            rows.append(centroid(np.stack(members)))
        if len(rows) == limit:
            break
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


# Rows of embeddings compared with the centres at a time in farthest_points.
_FARTHEST_BLOCK_ROWS = 10_000


def farthest_points(embeddings: np.ndarray, centres: np.ndarray, count: int) -> np.ndarray:
    """`count` points far from the given centres and from each other (extra k-means seeds)."""
    chosen: list[int] = []
    if len(centres):
        # Each point's similarity to its nearest centre, a block of rows at a time: the whole
        # (points x centres) matrix is 4 GB at 100,000 conversations and 10,000 clusters.
        nearest = np.concatenate(
            [
                (embeddings[i : i + _FARTHEST_BLOCK_ROWS] @ centres.T).max(axis=1)
                for i in range(0, len(embeddings), _FARTHEST_BLOCK_ROWS)
            ]
        )
    else:
        nearest = np.full(len(embeddings), -1.0, dtype=embeddings.dtype)
    for _ in range(count):
        index = int(np.argmin(nearest))
        chosen.append(index)
        nearest = np.maximum(nearest, embeddings @ embeddings[index])
    return embeddings[chosen]


def match_lineage(
    new_members: list[list[str]],
    new_centroids: np.ndarray,
    previous: list[Cluster],
    embedding_of: dict[str, np.ndarray],
) -> list[Lineage]:
    """For each new cluster: the earlier cluster it is (one-to-one), or how it came to be.

    Linear in the conversations: a new cluster is compared only with the earlier clusters it
    shares a conversation with (found through an index chat -> earlier cluster), and an earlier
    cluster's centroid is computed once, only when the Jaccard test passes."""
    previous_of = {chat: cluster.id for cluster in previous for chat in cluster.chat_ids}
    by_id = {cluster.id: cluster for cluster in previous}
    # Only conversations embedded today count (an earlier member may have been dropped since).
    old_sets = {c.id: {chat for chat in c.chat_ids if chat in embedding_of} for c in previous}
    clusters_of: dict[str, list[str]] = defaultdict(list)  # chat -> earlier clusters holding it
    for cluster_id, old_members in old_sets.items():
        for chat in old_members:
            clusters_of[chat].append(cluster_id)
    old_centroids: dict[str, np.ndarray] = {}

    candidates = []
    for index, members in enumerate(new_members):
        old_part = {chat for chat in members if chat in previous_of}
        overlapping = {cluster_id for chat in old_part for cluster_id in clusters_of.get(chat, ())}
        for cluster_id in overlapping:
            old_members = old_sets[cluster_id]
            jaccard = len(old_part & old_members) / len(old_part | old_members)
            if jaccard < MIN_JACCARD:
                continue  # the centroid cannot rescue it: skip computing it
            if cluster_id not in old_centroids:
                old_centroids[cluster_id] = centroid(np.stack([embedding_of[c] for c in old_members]))
            cosine = float(new_centroids[index] @ old_centroids[cluster_id])
            if cosine >= MIN_CENTROID_COSINE:
                candidates.append((jaccard, index, cluster_id))
    matched: dict[int, str] = {}
    taken: set[str] = set()
    for _, index, cluster_id in sorted(candidates, reverse=True):
        if index not in matched and cluster_id not in taken:
            matched[index] = cluster_id
            taken.add(cluster_id)

    lineages = []
    for index, members in enumerate(new_members):
        sources = Counter(previous_of[c] for c in members if c in previous_of)
        contributors = sorted(
            cid for cid, n in sources.items() if old_sets[cid] and n / len(old_sets[cid]) >= CONTRIBUTION
        )
        if index in matched:
            lineages.append(Lineage(by_id[matched[index]], "kept", [matched[index]]))
        elif len(contributors) >= 2:
            lineages.append(Lineage(None, "merged", contributors))
        elif sources:
            lineages.append(Lineage(None, "split", sorted(sources)))
        else:
            lineages.append(Lineage(None, "new", []))
    return lineages


def batch_counts(chat_ids: list[str], batch_of: dict[str, str]) -> dict[str, int]:
    return dict(Counter(batch_of.get(chat, "unknown") for chat in chat_ids))
