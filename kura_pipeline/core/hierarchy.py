"""Meta-clusters: Clio's hierarchy, built level by level until the top level is small.

Offline, `build_offline_hierarchy` works top-down: the top level is flat k-means over the
conversations with a size chosen from the data (silhouette, within [2, max_top_clusters]), the
base clusters having been made inside those groups (`core.cluster.base_cluster_groups`), and
each level below splits its parent's base clusters. Built bottom-up from the base clusters,
every level scored 0.05-0.15 NMI below flat k-means of the same size on BBC News
(benchmarks/EVALUATION.md); top-down it matches it at the top and is within noise below.
With an LLM, `plan_level_clio` follows Clio bottom-up: neighbourhoods, proposed parents,
deduplication, assignment with the parent list shuffled, and renaming each parent from the
children it got. Neither ever makes a parent with a single child. With an LLM, generic proposed
parents are dropped, a level where every parent got one child is grouped without the model, and
each parent's name and description pass the guard of `core.naming` (not generic, not a sibling's
or a child's name, not the children's descriptions pasted together): asked again once with the
reason, then the offline label, marked in `fallback`.
"""

from __future__ import annotations

import difflib
import math
import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from kura_pipeline.core.cluster import (
    centroid,
    cluster_id,
    coarse_partition,
    kmeans_labels,
    slugify,
    weighted_kmeans_from,
)
from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.models import Cluster
from kura_pipeline.core.naming import (
    ClusterLabel,
    generic_name,
    name_key,
    resolve_labels,
    reviewed_labels,
)
from kura_pipeline.core.prompts import (
    ASSIGN_PARENT_PROMPT,
    DEDUPLICATE_PARENTS_PROMPT,
    PROPOSE_PARENTS_PROMPT,
    RENAME_PARENT_PROMPT,
    AssignmentResponse,
    ClusterNameResponse,
    DeduplicatedParentsResponse,
    ProposedParentsResponse,
    with_retry_note,
)

NEIGHBOURHOOD_SIZE = 40
NEARBY_OUTSIDERS = 10


@dataclass
class LevelPlan:
    """Which parent each child goes to, and each parent's label (parents may end up empty)."""

    assignment: list[int]
    labels: list[ClusterLabel]
    fallbacks: int = 0  # children placed without the LLM's answer (failed or unmatched reply)
    # Parent index -> why its grouping did not come from the model (children placed by their
    # nearest sibling, or the whole level grouped without it); names that failed say so in
    # their label's failed_reason.
    fallback_reasons: dict[int, str] | None = None


PlanLevel = Callable[[list[Cluster], np.ndarray, int], LevelPlan]
NameGroups = Callable[[list[list[Cluster]]], list[ClusterLabel]]


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
    top_clusters: int | None = None,
) -> tuple[list[Cluster], list[LevelPlan]]:
    """Every cluster of every level (base clusters get their parent ids), top level last,
    bottom-up (Clio's way, for the LLM planner). The top level aims at `top_clusters` (chosen
    from the data by the caller) or else `max_top_clusters`. A parent that would get a single
    child is not made: the child goes up a level as it is."""
    top_size = max(1, min(top_clusters or max_top_clusters, max_top_clusters))
    everything = [c.model_copy() for c in base_clusters]
    current = everything[:]
    plans: list[LevelPlan] = []
    level = 0
    while len(current) > top_size and level < max_levels:
        target = level_target(len(current), top_size, branching_factor)
        plan = plan_level(current, cluster_centroids(current, embedding_of), target)
        plans.append(plan)
        parents, promoted = _make_parents(current, plan, level + 1, taken={c.slug for c in everything})
        if not parents or len(parents) + len(promoted) >= len(current):  # no progress: stop
            break
        everything.extend(parents)
        current = parents + promoted
        level += 1
    return everything, plans


def _children_of(children: list[Cluster], assignment: list[int] | np.ndarray) -> dict[int, list[Cluster]]:
    """Each parent's children in one pass (not a scan of every child per parent: O(parents x
    children), 25 million steps at the first level of 100,000 conversations)."""
    members_of: dict[int, list[Cluster]] = defaultdict(list)
    for child, parent in zip(children, assignment, strict=True):
        members_of[int(parent)].append(child)
    return members_of


def parent_cluster(
    members: list[Cluster], label: ClusterLabel, level: int, taken: set[str], fallback: str | None = None
) -> Cluster:
    """A parent holding exactly its members' conversations (and their batch counts)."""
    chat_ids = sorted(chat for child in members for chat in child.chat_ids)
    batches: Counter[str] = Counter()
    for child in members:
        batches.update(child.batch_counts)
    return Cluster(
        id=cluster_id(level, chat_ids),
        name=label.name,
        description=label.description,
        slug=slugify(label.name, taken),
        chat_ids=chat_ids,
        level=level,
        batch_counts=dict(batches),
        fallback=fallback,
    )


def _make_parents(
    children: list[Cluster], plan: LevelPlan, level: int, taken: set[str]
) -> tuple[list[Cluster], list[Cluster]]:
    """The parents of a level, and the children that go up as they are (a parent with one child
    would only repeat it: Clio's hierarchy never shows one)."""
    parents, promoted = [], []
    members_of = _children_of(children, plan.assignment)
    reasons = plan.fallback_reasons or {}
    for parent_index, label in enumerate(plan.labels):
        members = members_of.get(parent_index, [])
        if not members:
            continue
        if len(members) == 1:
            promoted.extend(members)
            continue
        fallback = "; ".join(r for r in (label.failed_reason, reasons.get(parent_index)) if r) or None
        parent = parent_cluster(members, label, level, taken, fallback)
        for child in members:
            child.parent_id = parent.id
        parents.append(parent)
    return parents, promoted


def member_embeddings(clusters: list[Cluster], embedding_of: dict[str, np.ndarray]) -> np.ndarray:
    """The clusters' conversations' embeddings, in the embeddings' own order: the order
    base_clusters partitioned them in, so the same k-means finds the same top-level groups."""
    members = {chat for cluster in clusters for chat in cluster.chat_ids}
    vectors = [vector for chat, vector in embedding_of.items() if chat in members]
    return np.stack(vectors) if vectors else np.zeros((0, 1), dtype=np.float32)


def level_targets(n_base: int, top_size: int, branching_factor: float) -> list[int]:
    """Cluster counts of the levels between the base and the top, bottom first."""
    targets: list[int] = []
    current = n_base
    while True:
        current = math.ceil(current / branching_factor)
        if current <= top_size:
            return targets
        targets.append(current)


def build_offline_hierarchy(
    base_clusters: list[Cluster],
    embedding_of: dict[str, np.ndarray],
    name_groups: NameGroups,
    max_top_clusters: int = 10,
    branching_factor: float = 4.0,
    seed: int = 0,
) -> list[Cluster]:
    """Every cluster of every level, top-down: the top level is flat k-means over the
    conversations (size chosen from the data; the base clusters were made inside it), started
    from which size-weighted k-means of the base clusters' means finds the same groups; each
    level below splits its parent's base clusters the same way, in proportion to the parent's
    size. A group of one base cluster is not made (the base cluster hangs from the level above),
    nor a split into one group (the level is skipped there): no parent has a single child.
    `name_groups` names the new clusters, given their base clusters."""
    base = [c.model_copy() for c in base_clusters]
    if len(base) <= max(1, max_top_clusters):  # already small enough to read as it is
        return base
    means = np.stack([np.stack([embedding_of[chat] for chat in c.chat_ids]).mean(axis=0) for c in base])
    sizes = np.array([c.count for c in base], dtype=np.float64)
    conversations = member_embeddings(base, embedding_of)
    top = coarse_partition(conversations, min(max_top_clusters, len(base) - 1), seed=seed)
    top_size = int(top.max()) + 1
    if top_size >= len(base):
        return base
    # The flat top level's centres, on the base clusters' means: nested base clusters stay whole.
    start = np.stack([conversations[top == g].mean(axis=0) for g in range(top_size)])
    top_of_base = weighted_kmeans_from(means, sizes, start)
    targets = level_targets(len(base), top_size, branching_factor)
    total = sizes.sum()

    nodes: list[tuple[int, np.ndarray, int | None]] = []  # (level, base indices, parent node)
    parent_node: dict[int, int] = {}  # base index -> the node it hangs from

    def grow(members: np.ndarray, level: int, parent: int | None) -> None:
        if len(members) == 1:
            if parent is not None:
                parent_node[int(members[0])] = parent
            return
        nodes.append((level, members, parent))
        me = len(nodes) - 1
        for below in range(level - 1, 0, -1):
            share = targets[below - 1] * sizes[members].sum() / total
            parts = int(min(len(members), max(1, round(share))))
            if parts < 2:
                continue
            split = kmeans_labels(means[members], parts, seed=seed, sample_weight=sizes[members])
            if split.max() < 1:
                continue
            for g in range(int(split.max()) + 1):
                grow(members[split == g], below, me)
            return
        for b in members:  # no level below splits this group: its base clusters hang from it
            parent_node[int(b)] = me

    top_level = len(targets) + 1
    for g in range(int(top_of_base.max()) + 1):
        members = np.flatnonzero(top_of_base == g)
        if len(members):
            grow(members, top_level, None)

    labels = name_groups([[base[b] for b in members] for _, members, _ in nodes])
    everything = list(base)
    made: list[Cluster] = []
    taken = {c.slug for c in base}
    for (level, members, _), label in zip(nodes, labels, strict=True):
        made.append(parent_cluster([base[b] for b in members], label, level, taken))
    for node, (_, _, parent) in enumerate(nodes):
        if parent is not None:
            made[node].parent_id = made[parent].id
    for b, node in parent_node.items():
        base[b].parent_id = made[node].id
    everything.extend(made)
    return everything


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


def usable_parent_names(names: list[str]) -> tuple[list[str], list[str]]:
    """(usable, rejected): proposed parent names without duplicates (case and punctuation aside)
    and without generic ones (`naming.generic_name`: the prompt's framing, filler only)."""
    usable, rejected, seen = [], [], set()
    for name in names:
        key = name_key(name)
        if not key or key in seen:
            continue
        seen.add(key)
        (rejected if generic_name(name) else usable).append(name.strip())
    return usable, rejected


def single_child_parents(assignment: list[int]) -> set[int]:
    """Parents that got exactly one child: they are not made (the child goes up as it is), so
    they are neither renamed nor counted among the level's names."""
    counts = Counter(assignment)
    return {parent for parent, n in counts.items() if n == 1}


async def plan_level_clio(
    client: LLMClient,
    children: list[Cluster],
    centroids: np.ndarray,
    target: int,
    seed: int = 0,
    name_offline: NameGroups | None = None,
) -> LevelPlan:
    """`name_offline` names groups of children without the model (from their conversations'
    shared phrases, with true counts): used for a level the model could not group at all, and
    for a parent whose name or description the guard still rejects after asking again."""
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
    candidates, generic = usable_parent_names(
        [name for p in proposals if not isinstance(p, LLMFailure) for name in p.names]
    )
    if not candidates:
        why = "every proposed parent name was generic" if generic else "every proposal failed"
        return _offline_fallback(children, centroids, target, name_offline, why)

    # 3. Merge near-duplicate proposals across neighbourhoods (generic merged names are dropped).
    parents = candidates
    if len(hood_ids) > 1 or len(candidates) > math.ceil(target * 1.5):
        messages = DEDUPLICATE_PARENTS_PROMPT.messages(candidates=_bullets(candidates), count=str(target))
        merged = await client.complete(DEDUPLICATE_PARENTS_PROMPT, messages, DeduplicatedParentsResponse)
        if not isinstance(merged, LLMFailure) and (kept := usable_parent_names(merged.names)[0]):
            parents = kept

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
        return _offline_fallback(
            children, centroids, target, name_offline, "no assignment answer matched a parent"
        )
    singles = single_child_parents(assignment)
    if all(parent in singles for parent in assignment):  # every parent would repeat its only child
        return _offline_fallback(
            children, centroids, target, name_offline, "every parent the model chose got a single child"
        )
    fallbacks = sum(1 for index in matched if index is None)
    placed_by_sibling = Counter(assignment[i] for i, index in enumerate(matched) if index is None)
    reasons = {
        parent: f"{count} of its children placed next to their nearest sibling (no usable assignment answer)"
        for parent, count in placed_by_sibling.items()
    }

    # 5. Rename each parent from the children it actually got (a parent of one child is not made:
    # its child goes up as it is, and its name is a sibling's the new names must differ from).
    members_of = _children_of(children, assignment)
    made = [p for p in range(len(parents)) if len(members_of.get(p, [])) >= 2]
    promoted = [members_of[p][0].name for p in singles]

    async def rename(p: int, note: str | None) -> ClusterNameResponse | LLMFailure:
        messages = RENAME_PARENT_PROMPT.messages(children=_bullets([_describe(c) for c in members_of[p]]))
        if note is not None:
            messages = with_retry_note(messages, note)
        return await client.complete(RENAME_PARENT_PROMPT, messages, ClusterNameResponse)

    reviewed = await reviewed_labels(
        client,
        rename,
        made,
        label="parent names",
        fixed=promoted,
        children={p: [ClusterLabel(c.name, c.description) for c in members_of[p]] for p in made},
    )

    def offline(positions: list[int]) -> list[ClusterLabel]:
        groups = [members_of[made[i]] for i in positions]
        if name_offline is not None:
            return name_offline(groups)
        return [_plain_label(parents[made[i]], group) for i, group in zip(positions, groups, strict=True)]

    resolved = dict(zip(made, resolve_labels([reviewed[p] for p in made], offline), strict=True))
    labels = [
        resolved.get(p) or ClusterLabel(name, "Not made: the model gave it one child or none.")
        for p, name in enumerate(parents)
    ]
    return LevelPlan(assignment=assignment, labels=labels, fallbacks=fallbacks, fallback_reasons=reasons)


def _plain_label(name: str, group: list[Cluster]) -> ClusterLabel:
    """A parent's label without the model's description nor an offline namer: the name it was
    proposed under (when that is not generic) and what is known for sure, its size."""
    count = sum(c.count for c in group)
    return ClusterLabel(
        name if generic_name(name) is None else f"{count} conversations",
        f"{count} conversations in {len(group)} clusters; not described.",
    )


def _offline_fallback(
    children: list[Cluster], centroids: np.ndarray, target: int, name_offline: NameGroups | None, why: str
) -> LevelPlan:
    """The model gave nothing usable for this level: group the children by their embeddings
    (size-weighted k-means) and name each group from its conversations, with true counts;
    every parent says why it was made without the model."""
    sizes = np.array([child.count for child in children], dtype=np.float64)
    assignment = kmeans_labels(centroids, target, sample_weight=sizes)
    members_of = _children_of(children, assignment)
    groups = [members_of.get(g, []) for g in range(target)]
    if name_offline is not None:
        labels = name_offline(groups)
    else:
        labels = [
            ClusterLabel(f"Group {g + 1}", f"{sum(c.count for c in group)} conversations.")
            for g, group in enumerate(groups)
        ]
    reason = f"grouped and named without the LLM: {why}"
    return LevelPlan(
        [int(a) for a in assignment],
        labels,
        fallbacks=len(children),
        fallback_reasons=dict.fromkeys(range(target), reason),
    )


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
        if len(children) == 1:
            problems.append(f"cluster {cluster.id} has a single child")
        if cluster.parent_id is not None and cluster.parent_id not in by_id:
            problems.append(f"cluster {cluster.id} points to a missing parent {cluster.parent_id}")
    tops = sum(1 for c in clusters if c.parent_id is None)
    if clusters and tops > max_top_clusters and max(c.level for c in clusters) > 0:
        problems.append(f"{tops} top-level clusters, more than max_top_clusters={max_top_clusters}")
    return problems
