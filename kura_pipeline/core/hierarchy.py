"""Meta-clusters: Clio's hierarchy, built level by level until the top level is small.

Each level groups the clusters below it into fewer parents. `plan_level_offline` does it with
no LLM (size-weighted k-means of the cluster centroids, names from distinctive terms);
`plan_level_clio` follows Clio: neighbourhoods, proposed parents, deduplication, assignment
with the parent list shuffled, and renaming each parent from the children it got.
"""

from __future__ import annotations

import difflib
import math
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from kura_pipeline.core.cluster import centroid, cluster_id, kmeans_labels, slugify
from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.models import Cluster
from kura_pipeline.core.naming import ClusterLabel, offline_labels
from kura_pipeline.core.privacy import scrub_pii
from kura_pipeline.core.prompts import (
    ASSIGN_PARENT_PROMPT,
    DEDUPLICATE_PARENTS_PROMPT,
    PROPOSE_PARENTS_PROMPT,
    RENAME_PARENT_PROMPT,
    AssignmentResponse,
    ClusterNameResponse,
    DeduplicatedParentsResponse,
    ProposedParentsResponse,
)

NEIGHBOURHOOD_SIZE = 40
NEARBY_OUTSIDERS = 10


@dataclass
class LevelPlan:
    """Which parent each child goes to, and each parent's label (parents may end up empty)."""

    assignment: list[int]
    labels: list[ClusterLabel]
    fallbacks: int = 0  # children placed without the LLM's answer (failed or unmatched reply)


PlanLevel = Callable[[list[Cluster], np.ndarray, int], LevelPlan]


def level_target(n_children: int, max_top_clusters: int, branching_factor: float) -> int:
    """Geometric shrink: about n / branching_factor parents, never below max_top_clusters."""
    return max(1, min(n_children - 1, max(max_top_clusters, math.ceil(n_children / branching_factor))))


def cluster_centroids(clusters: list[Cluster], embedding_of: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([centroid(np.stack([embedding_of[c] for c in cl.chat_ids])) for cl in clusters])


def build_hierarchy(
    base_clusters: list[Cluster],
    embedding_of: dict[str, np.ndarray],
    plan_level: PlanLevel,
    max_top_clusters: int = 10,
    branching_factor: float = 4.0,
    max_levels: int = 8,
) -> tuple[list[Cluster], list[LevelPlan]]:
    """Every cluster of every level (base clusters get their parent ids), top level last."""
    everything = [c.model_copy() for c in base_clusters]
    current = everything[:]
    plans: list[LevelPlan] = []
    level = 0
    while len(current) > max_top_clusters and level < max_levels:
        target = level_target(len(current), max_top_clusters, branching_factor)
        plan = plan_level(current, cluster_centroids(current, embedding_of), target)
        plans.append(plan)
        parents = _make_parents(current, plan, level + 1, taken={c.slug for c in everything})
        if len(parents) >= len(current):  # no progress: stop rather than loop
            break
        everything.extend(parents)
        current = parents
        level += 1
    return everything, plans


def _children_of(children: list[Cluster], assignment: list[int] | np.ndarray) -> dict[int, list[Cluster]]:
    """Each parent's children in one pass (not a scan of every child per parent: O(parents x
    children), 25 million steps at the first level of 100,000 conversations)."""
    members_of: dict[int, list[Cluster]] = defaultdict(list)
    for child, parent in zip(children, assignment, strict=True):
        members_of[int(parent)].append(child)
    return members_of


def _make_parents(children: list[Cluster], plan: LevelPlan, level: int, taken: set[str]) -> list[Cluster]:
    parents = []
    members_of = _children_of(children, plan.assignment)
    for parent_index, label in enumerate(plan.labels):
        members = members_of.get(parent_index, [])
        if not members:
            continue
        chat_ids = sorted(chat for child in members for chat in child.chat_ids)
        batches: Counter[str] = Counter()
        for child in members:
            batches.update(child.batch_counts)
        parent = Cluster(
            id=cluster_id(level, chat_ids),
            name=label.name,
            description=label.description,
            slug=slugify(label.name, taken),
            chat_ids=chat_ids,
            level=level,
            batch_counts=dict(batches),
        )
        for child in members:
            child.parent_id = parent.id
        parents.append(parent)
    return parents


def plan_level_offline(documents_of: dict[str, str], seed: int = 0) -> PlanLevel:
    """k-means over child centroids, each child weighted by its conversations; parents named by
    their distinctive terms.

    Weighting matters: with every child counted once (as Ward's method over the centroids did),
    small outlying clusters became parents of their own and big regions were merged. On BBC News
    (benchmarks/EVALUATION.md) the top level's accuracy at five clusters went from 0.64 (Ward) to
    0.87. And k-means needs no children x children distance matrix, as Ward's method does."""

    def plan(children: list[Cluster], centroids: np.ndarray, target: int) -> LevelPlan:
        sizes = np.array([child.count for child in children], dtype=np.float64)
        assignment = kmeans_labels(centroids, target, seed=seed, sample_weight=sizes)
        members_of = _children_of(children, assignment)
        groups = [
            [documents_of[chat] for child in members_of.get(g, []) for chat in child.chat_ids]
            for g in range(target)
        ]
        return LevelPlan(assignment=[int(a) for a in assignment], labels=offline_labels(groups))

    return plan


def _describe(cluster: Cluster) -> str:
    return f"{cluster.name}: {cluster.description}"


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines) or "- (none)"


def match_name(reply: str, names: list[str]) -> int | None:
    """The parent the model meant: exact, then case-insensitive, then the closest spelling."""
    lowered = [n.lower().strip() for n in names]
    reply_l = reply.lower().strip()
    if reply_l in lowered:
        return lowered.index(reply_l)
    close = difflib.get_close_matches(reply_l, lowered, n=1, cutoff=0.6)
    return lowered.index(close[0]) if close else None


def assign_unmatched(matched: list[int | None], centroids: np.ndarray) -> list[int] | None:
    """Children whose reply failed or named no parent go where their nearest matched sibling
    (by centroid) went: the model's own grouping, extended, rather than one catch-all parent.
    None when no child was matched at all."""
    known = np.array([i for i, parent in enumerate(matched) if parent is not None], dtype=int)
    if known.size == 0:
        return None
    assignment = [parent if parent is not None else -1 for parent in matched]
    missing = [i for i, parent in enumerate(matched) if parent is None]
    if missing:
        nearest = known[np.argmax(centroids[missing] @ centroids[known].T, axis=1)]
        for child, sibling in zip(missing, nearest, strict=True):
            assignment[child] = assignment[int(sibling)]
    return assignment


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for name in names:
        key = name.lower().strip()
        if key and key not in seen:
            seen[key] = name.strip()
    return list(seen.values())


async def plan_level_clio(
    client: LLMClient,
    children: list[Cluster],
    centroids: np.ndarray,
    target: int,
    seed: int = 0,
) -> LevelPlan:
    rng = random.Random(seed)
    n = len(children)
    # 1. Neighbourhoods of about 40 clusters, so each prompt stays readable.
    hoods = kmeans_labels(centroids, max(1, round(n / NEIGHBOURHOOD_SIZE)), seed=seed)
    hood_ids = sorted(set(int(h) for h in hoods))

    # 2. Each neighbourhood proposes parents, seeing its nearest outsiders for contrast.
    async def propose(h: int) -> ProposedParentsResponse | LLMFailure:
        members = np.flatnonzero(hoods == h)
        center = centroid(centroids[members])
        outsiders = [i for i in np.argsort(-(centroids @ center)) if hoods[i] != h][:NEARBY_OUTSIDERS]
        count = max(1, round(target * len(members) / n))
        messages = PROPOSE_PARENTS_PROMPT.messages(
            inside=_bullets([_describe(children[i]) for i in members]),
            outside=_bullets([_describe(children[i]) for i in outsiders]),
            count=str(count),
        )
        return await client.complete(PROPOSE_PARENTS_PROMPT, messages, ProposedParentsResponse)

    proposals = await client.gather([propose(h) for h in hood_ids], label="proposed parents")
    candidates = _unique([name for p in proposals if not isinstance(p, LLMFailure) for name in p.names])
    if not candidates:
        return _offline_fallback(children, centroids, target)

    # 3. Merge near-duplicate proposals across neighbourhoods.
    parents = candidates
    if len(hood_ids) > 1 or len(candidates) > math.ceil(target * 1.5):
        messages = DEDUPLICATE_PARENTS_PROMPT.messages(candidates=_bullets(candidates), count=str(target))
        merged = await client.complete(DEDUPLICATE_PARENTS_PROMPT, messages, DeduplicatedParentsResponse)
        if not isinstance(merged, LLMFailure) and _unique(merged.names):
            parents = _unique(merged.names)

    # 4. Assign each child to its best parent; the list is shuffled per child against order bias.
    async def assign(child: Cluster) -> AssignmentResponse | LLMFailure:
        shuffled = parents[:]
        rng.shuffle(shuffled)
        messages = ASSIGN_PARENT_PROMPT.messages(child=_describe(child), parents=_bullets(shuffled))
        return await client.complete(ASSIGN_PARENT_PROMPT, messages, AssignmentResponse)

    replies = await client.gather([assign(c) for c in children], label="parent assignment")
    matched = [None if isinstance(r, LLMFailure) else match_name(r.parent, parents) for r in replies]
    assignment = assign_unmatched(matched, centroids)
    if assignment is None:  # not one reply named a parent: group the children without the model
        return _offline_fallback(children, centroids, target)
    fallbacks = sum(1 for index in matched if index is None)

    # 5. Rename each parent from the children it actually got.
    async def rename(p: int) -> ClusterNameResponse | LLMFailure | None:
        got = [_describe(c) for c, a in zip(children, assignment, strict=True) if a == p]
        if not got:
            return None
        messages = RENAME_PARENT_PROMPT.messages(children=_bullets(got))
        return await client.complete(RENAME_PARENT_PROMPT, messages, ClusterNameResponse)

    renamed = await client.gather([rename(p) for p in range(len(parents))], label="parent names")
    labels = []
    for name, reply in zip(parents, renamed, strict=True):
        if reply is None or isinstance(reply, LLMFailure):
            reason = reply.reason if isinstance(reply, LLMFailure) else None
            labels.append(ClusterLabel(name, f"Parent category proposed as '{name}'.", reason))
        else:
            labels.append(ClusterLabel(scrub_pii(reply.name)[0], scrub_pii(reply.description)[0]))
    return LevelPlan(assignment=assignment, labels=labels, fallbacks=fallbacks)


def _offline_fallback(children: list[Cluster], centroids: np.ndarray, target: int) -> LevelPlan:
    """Every proposal failed: group by embeddings and name parents from their children's names."""
    sizes = np.array([child.count for child in children], dtype=np.float64)
    assignment = kmeans_labels(centroids, target, sample_weight=sizes)  # as plan_level_offline
    members_of = _children_of(children, assignment)
    groups = [[c.name for c in members_of.get(g, [])] for g in range(target)]
    return LevelPlan([int(a) for a in assignment], offline_labels(groups), fallbacks=len(children))


def sync_plan(
    plan: Callable[[list[Cluster], np.ndarray, int], Awaitable[LevelPlan]], run: Callable
) -> PlanLevel:
    """Adapt an async planner to build_hierarchy's synchronous loop."""
    return lambda children, centroids, target: run(plan(children, centroids, target))


def hierarchy_problems(clusters: list[Cluster], chat_ids: list[str], max_top_clusters: int) -> list[str]:
    """What is wrong with a finished hierarchy (empty when it is sound)."""
    problems = []
    base_members = [chat for c in clusters if c.level == 0 for chat in c.chat_ids]
    if sorted(base_members) != sorted(chat_ids):
        problems.append("the base clusters do not hold every embedded conversation exactly once")
    by_id = {c.id: c for c in clusters}
    children_of: dict[str, list[Cluster]] = defaultdict(list)  # one pass, not a scan per cluster
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
