"""Projections: a 2-D UMAP map of the conversations, and where each cluster sits on it."""

from __future__ import annotations

import numpy as np

from kura_pipeline.core.models import Cluster

# UMAP needs a handful of neighbours; below this many points a PCA map is drawn instead.
MIN_POINTS_FOR_UMAP = 10
# Above this many points UMAP starts from PCA, not its spectral layout: the spectral layout
# solves an eigenproblem per connected component of the neighbour graph, and near-duplicate
# conversations make many small components (at 100,000 it had not finished after 18 minutes;
# from PCA the whole stage took about 2 minutes).
SPECTRAL_INIT_MAX_POINTS = 20_000


def project_2d(embeddings: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """(n, 2) coordinates: UMAP with cosine distance, PCA for tiny inputs."""
    n = len(embeddings)
    if n == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if n < MIN_POINTS_FOR_UMAP:
        return _pca_2d(embeddings)
    import umap  # imported here: it takes seconds to load (numba), and only this stage needs it

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, n - 1),
        metric="cosine",
        random_state=seed,
        n_jobs=1,  # a seed only gives a repeatable map single-threaded
        init="pca" if n > SPECTRAL_INIT_MAX_POINTS else "spectral" if n > 50 else "random",
    )
    return reducer.fit_transform(embeddings).astype(np.float32)


def _pca_2d(embeddings: np.ndarray) -> np.ndarray:
    centred = embeddings - embeddings.mean(axis=0)
    if len(embeddings) == 1:
        return np.zeros((1, 2), dtype=np.float32)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords.astype(np.float32)


def cluster_positions(
    clusters: list[Cluster], chat_ids: list[str], coords: np.ndarray
) -> dict[str, tuple[float, float]]:
    """Each cluster at the mean position of its conversations."""
    index = {chat: i for i, chat in enumerate(chat_ids)}
    positions = {}
    for cluster in clusters:
        rows = [index[c] for c in cluster.chat_ids if c in index]
        if rows:
            x, y = coords[rows].mean(axis=0)
            positions[cluster.id] = (float(x), float(y))
    return positions


def cluster_path_per_conversation(clusters: list[Cluster]) -> dict[str, list[str]]:
    """For each conversation, its cluster ids from the base level up to the top."""
    by_id = {c.id: c for c in clusters}
    paths: dict[str, list[str]] = {}
    for cluster in clusters:
        if cluster.level != 0:
            continue
        path = [cluster.id]
        parent = cluster.parent_id
        while parent is not None and parent in by_id:  # a dangling parent ends the path
            path.append(parent)
            parent = by_id[parent].parent_id
        for chat in cluster.chat_ids:
            paths[chat] = path
    return paths


def cluster_at_each_level(clusters: list[Cluster]) -> dict[str, list[str]]:
    """For each conversation, its cluster at level 0, 1, ..., top (the hierarchy's depth for
    everyone). A level its branch skips (no parent is made with a single child) or stops below
    is filled by the nearest cluster below it, so every level is a partition of every clustered
    conversation."""
    level_of = {c.id: c.level for c in clusters}
    depth = max(level_of.values(), default=-1) + 1
    result: dict[str, list[str]] = {}
    for chat, path in cluster_path_per_conversation(clusters).items():
        at_level, step = [], 0
        for level in range(depth):
            while step + 1 < len(path) and level_of[path[step + 1]] <= level:
                step += 1
            at_level.append(path[step])
        result[chat] = at_level
    return result
