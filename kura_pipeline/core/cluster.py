"""Base clusters: k-means over summary embeddings, and the sizes and ids that go with them."""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

# Above this many points, mini-batch k-means keeps time and memory near linear.
MINIBATCH_ABOVE = 20_000
# k-means++ seeding costs O(n * k * log k) distance computations per start; with Kura's
# k = n / 10 that is quadratic in n (one start took 107 s at 10,000 conversations, and at
# 100,000 seeding had not finished after 9.5 minutes). Above this n * k, seed at random once:
# ~3-5 % more within-cluster distance, measured in benchmarks/SCALE.md.
KMEANS_PLUSPLUS_MAX_WORK = 1_000_000
MINIBATCH_SIZE = 4096


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
    embeddings: np.ndarray,
    k: int,
    seed: int = 0,
    init: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    starts: int = 3,
) -> np.ndarray:
    """Cluster labels 0..k-1 in order of decreasing cluster size (ties by first member).

    `init` (k centroids) warm-starts k-means from an earlier run, so clusters stay put;
    `sample_weight` counts each point that many times (e.g. a child cluster by its size)."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    start: np.ndarray | str
    if init is not None and len(init) == k:
        start, n_init = init, 1  # warm start: one run from the earlier clusters
    elif n * k <= KMEANS_PLUSPLUS_MAX_WORK:
        start, n_init = "k-means++", starts
    else:
        start, n_init = "random", 1
    model: KMeans | MiniBatchKMeans
    if n > MINIBATCH_ABOVE:
        model = MiniBatchKMeans(
            n_clusters=k, init=start, n_init=n_init, batch_size=MINIBATCH_SIZE, random_state=seed
        )
    else:
        model = KMeans(n_clusters=k, init=start, n_init=n_init, random_state=seed)
    # Mini-batch k-means may leave a few clusters empty: relabelling drops them. Fewer distinct
    # points than k (identical conversations) is fine too, not a warning in the run's output.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return relabel_by_size(model.fit_predict(embeddings, sample_weight=sample_weight))


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0..m-1 so 0 is the biggest cluster (ties: the one whose first member comes
    first): stable, readable ids for the same partition; labels no point has are dropped."""
    unique, first_index, inverse, counts = np.unique(
        labels, return_index=True, return_inverse=True, return_counts=True
    )
    order = np.lexsort((first_index, -counts))  # by size descending, then first member
    rank = np.empty(len(unique), dtype=np.int64)
    rank[order] = np.arange(len(unique))
    return rank[inverse.ravel()]


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
    coarse: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """k-means groups (member rows in index order), each with the rows to show the namer and
    its nearest outsiders (`outside_limit=0` when nothing reads them, e.g. offline names).
    With `coarse` (a top-level group per row), the groups are made inside those groups."""
    if coarse is not None:
        labels = nested_kmeans_labels(embeddings, k, coarse, seed, init=init)
    else:
        labels = kmeans_labels(embeddings, k, seed, init=init)
    if len(labels) == 0:
        return [], [], []
    members = members_by_label(labels)
    centres = np.stack([centroid(embeddings[rows]) for rows in members]).astype(embeddings.dtype)
    inside = [
        sample_inside(embeddings, rows, centres[g], inside_limit, seed) if inside_limit > 0 else rows[:0]
        for g, rows in enumerate(members)
    ]
    outside = all_nearest_outsiders(embeddings, members, centres, outside_limit)
    return members, inside, outside


def members_by_label(labels: np.ndarray) -> list[np.ndarray]:
    """Rows of each label 0..max, in index order: one stable argsort, not a mask per label
    (which costs O(n * k), quadratic with k = n / 10)."""
    if len(labels) == 0:
        return []
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(int(labels.max()) + 2))
    return [order[bounds[g] : bounds[g + 1]] for g in range(len(bounds) - 1)]


# Cluster-by-point similarities computed at a time by all_nearest_outsiders (bytes).
_SIMILARITY_BLOCK_BYTES = 64 << 20


def all_nearest_outsiders(
    embeddings: np.ndarray, members: list[np.ndarray], centres: np.ndarray, limit: int
) -> list[np.ndarray]:
    """nearest_outsiders for every group at once: the same rows, from a blocked
    (groups x points) matrix product, instead of copying the n - m outside rows of the
    embedding matrix once per group (O(n * k) memory traffic)."""
    n = len(embeddings)
    if limit <= 0 or n == 0:
        return [rows[:0] for rows in members]
    block = max(1, _SIMILARITY_BLOCK_BYTES // (embeddings.itemsize * n))
    outside: list[np.ndarray] = []
    for start in range(0, len(members), block):
        similarity = centres[start : start + block] @ embeddings.T
        for row, rows in enumerate(members[start : start + block]):
            sims = similarity[row]
            sims[rows] = -np.inf  # members are not outsiders
            count = min(limit, n - len(rows))
            if count <= 0:
                outside.append(rows[:0])
                continue
            best = np.argpartition(-sims, count - 1)[:count]
            outside.append(best[np.argsort(-sims[best], kind="stable")])
    return outside


# Silhouette is computed on at most this many conversations (it is quadratic in them), and the
# candidate top-level sizes are tried by k-means on at most this many.
SILHOUETTE_SAMPLE = 2_000
TOP_K_SAMPLE = 10_000
# The top level has few clusters and decides what a reader sees first: more k-means starts
# there (on the test topics, 4 clusters: NMI 0.82 with 3 starts, 0.86 with 10).
TOP_LEVEL_STARTS = 10


def choose_top_k(embeddings: np.ndarray, max_top_clusters: int, seed: int = 0) -> int:
    """How many top-level groups the data holds, within [2, max_top_clusters]: the k of flat
    k-means with the best silhouette (cosine) on a seeded sample. 1 when there is too little data."""
    n = len(embeddings)
    upper = min(max_top_clusters, n - 1)
    if upper < 2:
        return 1
    rng = np.random.default_rng(seed)
    tried = (
        embeddings[np.sort(rng.choice(n, TOP_K_SAMPLE, replace=False))] if n > TOP_K_SAMPLE else embeddings
    )
    m = len(tried)
    sample = (
        np.sort(rng.choice(m, SILHOUETTE_SAMPLE, replace=False)) if m > SILHOUETTE_SAMPLE else np.arange(m)
    )
    best_k, best_score = 2, -np.inf
    for k in range(2, upper + 1):
        labels = kmeans_labels(tried, k, seed=seed, starts=TOP_LEVEL_STARTS)
        if len(np.unique(labels[sample])) < 2:
            continue
        score = float(silhouette_score(tried[sample], labels[sample], metric="cosine"))
        if score > best_score + 1e-9:
            best_k, best_score = k, score
    return best_k


def coarse_partition(embeddings: np.ndarray, max_top_clusters: int, seed: int = 0) -> np.ndarray:
    """The hierarchy's top level as flat k-means over the conversations, its size chosen from the
    data: base clusters are made inside these groups, so the top level loses nothing to them."""
    k = choose_top_k(embeddings, max_top_clusters, seed)
    return kmeans_labels(embeddings, k, seed=seed, starts=TOP_LEVEL_STARTS)


def nested_kmeans_labels(
    embeddings: np.ndarray, k: int, groups: np.ndarray, seed: int = 0, init: np.ndarray | None = None
) -> np.ndarray:
    """About k clusters in all, made inside each group in proportion to its size (at least one
    per group), numbered by size like kmeans_labels. `init` centroids warm-start each group with
    the earlier centroids nearest to it."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    group_ids = np.unique(groups)
    if len(group_ids) <= 1:
        return kmeans_labels(embeddings, k, seed, init=init)
    from kura_pipeline.core.identity import farthest_points  # identity imports this module

    # An earlier centroid belongs to the group of the conversation nearest to it: earlier
    # clusters were made inside the same groups, so each group restarts from its own clusters
    # (as many as it had) and a run over unchanged data gives the same clusters again.
    home = groups[np.argmax(init @ embeddings.T, axis=1)] if init is not None and len(init) else None
    labels = np.zeros(n, dtype=np.int64)
    offset = 0
    for g in group_ids:
        rows = np.flatnonzero(groups == g)
        k_group = int(min(len(rows), max(1, round(k * len(rows) / n))))
        group_init = None
        if home is not None:
            mine = init[home == g][: len(rows)]
            if len(mine) and len(mine) < k_group:  # the group grew: new centres where it is farthest
                mine = np.vstack([mine, farthest_points(embeddings[rows], mine, k_group - len(mine))])
            if len(mine):
                group_init, k_group = mine, len(mine)
        part = kmeans_labels(embeddings[rows], k_group, seed, init=group_init)
        labels[rows] = part + offset
        offset += int(part.max()) + 1
    return relabel_by_size(labels)


def weighted_kmeans_from(points: np.ndarray, weights: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Size-weighted k-means of cluster means, started from given centres (one run, as is)."""
    if len(start) <= 1 or len(points) <= 1:
        return np.zeros(len(points), dtype=np.int64)
    model = KMeans(n_clusters=len(start), init=start, n_init=1)
    return model.fit_predict(points, sample_weight=weights)
