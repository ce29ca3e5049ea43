"""Base clusters: k-means over summary embeddings, and the sizes and ids that go with them."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans

# Above this many points, mini-batch k-means keeps time and memory near linear.
MINIBATCH_ABOVE = 20_000


def choose_k(
    n_conversations: int, conversations_per_cluster: int = 10, max_clusters: int | None = None
) -> int:
    """Kura's rule: about one cluster per `conversations_per_cluster` conversations, at least 1."""
    if n_conversations <= 0:
        return 0
    k = max(1, math.ceil(n_conversations / conversations_per_cluster))
    if max_clusters is not None:
        k = min(k, max_clusters)
    return min(k, n_conversations)


def kmeans_labels(
    embeddings: np.ndarray, k: int, seed: int = 0, init: np.ndarray | None = None
) -> np.ndarray:
    """Cluster labels 0..k-1 in order of decreasing cluster size (ties by first member).

    `init` (k centroids) warm-starts k-means from an earlier run, so clusters stay put."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    model_cls = MiniBatchKMeans if n > MINIBATCH_ABOVE else KMeans
    if init is not None and len(init) == k:
        model = model_cls(n_clusters=k, random_state=seed, init=init, n_init=1)
    else:
        model = model_cls(n_clusters=k, random_state=seed, n_init=3)
    return relabel_by_size(model.fit_predict(embeddings))


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber labels so 0 is the biggest cluster: stable, readable ids for the same partition."""
    unique, first_index, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(unique)), key=lambda i: (-counts[i], first_index[i]))
    mapping = {unique[i]: rank for rank, i in enumerate(order)}
    return np.array([mapping[label] for label in labels], dtype=np.int64)


def cluster_id(level: int, chat_ids: Sequence[str]) -> str:
    """A content-derived id: the same members at the same level give the same id on any run."""
    digest = hashlib.sha1("\n".join(sorted(chat_ids)).encode("utf-8")).hexdigest()[:10]
    return f"L{level}-{digest}"


def slugify(name: str, taken: set[str]) -> str:
    """A short, unique, URL-safe handle for a cluster name."""
    base = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:48] or "cluster"
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}_{n}", n + 1
    taken.add(slug)
    return slug


def centroid(embeddings: np.ndarray) -> np.ndarray:
    """The unit-length mean direction of a group of unit embeddings."""
    mean = embeddings.mean(axis=0)
    norm = np.linalg.norm(mean)
    return mean / norm if norm > 0 else mean


def nearest_outsiders(
    embeddings: np.ndarray, member_mask: np.ndarray, center: np.ndarray, limit: int
) -> np.ndarray:
    """Indices of the `limit` non-members closest to the centre (the contrast set for naming)."""
    outside = np.flatnonzero(~member_mask)
    if len(outside) == 0 or limit <= 0:
        return outside[:0]
    similarity = embeddings[outside] @ center
    return outside[np.argsort(-similarity)[:limit]]


def sample_inside(
    embeddings: np.ndarray, members: np.ndarray, center: np.ndarray, limit: int, seed: int
) -> np.ndarray:
    """What the namer reads of a big cluster: a seeded sample, half of it the most central."""
    if len(members) <= limit:
        return members
    by_centrality = members[np.argsort(-(embeddings[members] @ center))]
    central = by_centrality[: limit // 2]
    rest = np.random.default_rng(seed).choice(
        by_centrality[limit // 2 :], limit - len(central), replace=False
    )
    return np.concatenate([central, rest])


def base_cluster_groups(
    embeddings: np.ndarray,
    k: int,
    seed: int = 0,
    inside_limit: int = 25,
    outside_limit: int = 10,
    init: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """k-means groups, each with the rows to show the namer and its nearest outsiders."""
    labels = kmeans_labels(embeddings, k, seed, init=init)
    members, inside, outside = [], [], []
    for label in range(int(labels.max()) + 1 if len(labels) else 0):
        mask = labels == label
        rows = np.flatnonzero(mask)
        center = centroid(embeddings[rows])
        members.append(rows)
        inside.append(sample_inside(embeddings, rows, center, inside_limit, seed))
        outside.append(nearest_outsiders(embeddings, mask, center, outside_limit))
    return members, inside, outside
