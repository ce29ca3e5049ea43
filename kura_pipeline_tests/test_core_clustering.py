"""Base clusters, naming and the hierarchy, on data whose right answer is known."""

import numpy as np
import pytest

from kura_pipeline.core import cluster as cluster_module
from kura_pipeline.core.cluster import (
    all_nearest_outsiders,
    base_cluster_groups,
    centroid,
    choose_k,
    cluster_id,
    kmeans_labels,
    members_by_label,
    nearest_outsiders,
    relabel_by_size,
    slugify,
)
from kura_pipeline.core.hierarchy import (
    assign_unmatched,
    build_offline_hierarchy,
    hierarchy_problems,
    level_target,
    match_name,
)
from kura_pipeline.core.models import Cluster
from kura_pipeline.core.naming import ClusterLabel
from kura_pipeline.core.project import cluster_path_per_conversation, project_2d
from kura_pipeline.core.render.tree import render_markdown_tree, render_tree


def blobs(n_groups: int, per_group: int, dims: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in tight, well-separated groups; returns (embeddings, true group)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, dims))
    points = np.concatenate([c + 0.05 * rng.normal(size=(per_group, dims)) for c in centres])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), np.repeat(np.arange(n_groups), per_group)


@pytest.mark.parametrize(
    ("n", "per_cluster", "cap", "expected"),
    [
        (0, 10, None, 0),
        (1, 10, None, 1),
        (95, 10, None, 10),
        (300, 10, None, 30),
        (300, 10, 12, 12),
        (5, 1, None, 5),
    ],
)
def test_choose_k_follows_kuras_rule(n, per_cluster, cap, expected):
    assert choose_k(n, per_cluster, cap) == expected


def test_kmeans_recovers_separated_groups_and_numbers_them_by_size():
    embeddings, truth = blobs(4, 10)
    extra, _ = blobs(1, 5, seed=3)  # make one group bigger so size order is defined
    embeddings = np.concatenate([embeddings, extra + 0])
    labels = kmeans_labels(embeddings, 5, seed=0)
    # Every true group lands in exactly one cluster.
    for group in range(4):
        assert len(set(labels[:40][truth == group])) == 1
    sizes = np.bincount(labels)
    assert list(sizes) == sorted(sizes, reverse=True)


def test_cluster_ids_depend_on_members_only():
    assert cluster_id(0, ["b", "a"]) == cluster_id(0, ["a", "b"])
    assert cluster_id(0, ["a", "b"]) != cluster_id(1, ["a", "b"])
    assert cluster_id(0, ["a"]) != cluster_id(0, ["a", "b"])


def test_slugs_are_unique_and_url_safe():
    taken: set[str] = set()
    assert slugify("Debug Python code!", taken) == "debug_python_code"
    assert slugify("Debug python code", taken) == "debug_python_code_2"
    assert slugify("???", taken) == "cluster"


def test_nearest_outsiders_are_outside_and_closest():
    embeddings, truth = blobs(3, 6)
    mask = truth == 0
    centre = embeddings[mask].mean(axis=0)
    centre /= np.linalg.norm(centre)
    picked = nearest_outsiders(embeddings, mask, centre, limit=4)
    assert not mask[picked].any()
    similarities = embeddings[~mask] @ centre
    assert np.isclose(embeddings[picked[0]] @ centre, similarities.max())


def test_base_cluster_groups_give_samples_inside_and_contrast_outside():
    embeddings, _ = blobs(3, 40)
    members, inside, outside = base_cluster_groups(embeddings, 3, inside_limit=10, outside_limit=5)
    assert sorted(len(m) for m in members) == [40, 40, 40]
    for rows, sample, contrast in zip(members, inside, outside, strict=True):
        assert len(sample) == 10 and set(sample) <= set(rows)
        assert len(contrast) == 5 and not set(contrast) & set(rows)


def test_match_name_tolerates_case_and_small_typos():
    names = ["Debug software", "Cook meals", "Plan travel"]
    assert match_name("cook meals", names) == 1
    assert match_name("Plan  travel.", names) == 2
    assert match_name("Write poetry about the moon", names) is None


def _base_clusters(
    embeddings: np.ndarray, k: int
) -> tuple[list[Cluster], dict[str, np.ndarray], dict[str, str]]:
    chat_ids = [f"c{i}" for i in range(len(embeddings))]
    members, _, _ = base_cluster_groups(embeddings, k)
    clusters = [
        Cluster(
            id=cluster_id(0, [chat_ids[r] for r in rows]),
            name=f"base {i}",
            description="d",
            slug=f"base_{i}",
            chat_ids=[chat_ids[r] for r in rows],
            level=0,
        )
        for i, rows in enumerate(members)
    ]
    documents = {chat: f"The user asked about topic{i % 7}" for i, chat in enumerate(chat_ids)}
    return clusters, dict(zip(chat_ids, embeddings, strict=True)), documents


def numbered_names(groups: list[list[Cluster]]) -> list[ClusterLabel]:
    return [
        ClusterLabel(f"parent {i}", f"{sum(c.count for c in g)} conversations") for i, g in enumerate(groups)
    ]


def offline_hierarchy(base, embedding_of, max_top_clusters=10, branching_factor=4.0):
    return build_offline_hierarchy(base, embedding_of, numbered_names, max_top_clusters, branching_factor)


def test_offline_hierarchy_shrinks_until_the_top_is_small():
    embeddings, truth = blobs(6, 40)  # 6 true groups; 48 base clusters of ~5
    base, embedding_of, documents = _base_clusters(embeddings, 48)
    everything = offline_hierarchy(base, embedding_of, max_top_clusters=6, branching_factor=3)
    by_id = {c.id: c for c in everything}
    top = [c for c in everything if c.parent_id is None]
    assert len(top) <= 6
    assert max(c.level for c in everything) >= 2  # 48 -> 16 -> 6
    # Every base cluster reaches a top cluster; parents hold exactly their children's conversations,
    # and no parent has a single child.
    for cluster in everything:
        children = [c for c in everything if c.parent_id == cluster.id]
        if children:
            assert sorted(x for c in children for x in c.chat_ids) == sorted(cluster.chat_ids)
            assert all(c.level < cluster.level for c in children)
            assert len(children) >= 2
    assert sum(c.count for c in top) == 240
    # The known groups are not torn apart at the top: each true group sits in one top cluster.
    chat_to_top = {}
    for chat, path in cluster_path_per_conversation(everything).items():
        chat_to_top[chat] = path[-1]
        assert by_id[path[-1]].parent_id is None
    for group in range(6):
        tops = {chat_to_top[f"c{i}"] for i in np.flatnonzero(truth == group)}
        assert len(tops) == 1


def test_no_hierarchy_needed_when_base_is_already_small():
    embeddings, _ = blobs(3, 5)
    base, embedding_of, documents = _base_clusters(embeddings, 3)
    everything = offline_hierarchy(base, embedding_of, max_top_clusters=10)
    assert len(everything) == 3 and all(c.parent_id is None for c in everything)


def test_level_target_shrinks_geometrically_but_not_below_the_top_size():
    assert level_target(400, 10, 4) == 100
    assert level_target(30, 10, 4) == 10
    assert level_target(11, 10, 4) == 10


def test_projection_gives_finite_points_for_every_size():
    for n in (0, 1, 3, 9, 40):
        embeddings, _ = blobs(2, max(n, 1))
        coords = project_2d(embeddings[:n], seed=0)
        assert coords.shape == (n, 2) and np.isfinite(coords).all()


def test_tree_shows_sizes_shares_and_nesting():
    child_a = Cluster(
        id="a", name="Fix Python errors", description="x", slug="a", chat_ids=["1", "2", "3"], parent_id="p"
    )
    child_b = Cluster(id="b", name="Write SQL", description="y", slug="b", chat_ids=["4"], parent_id="p")
    parent = Cluster(
        id="p", name="Help with code", description="z", slug="p", chat_ids=["1", "2", "3", "4"], level=1
    )
    other = Cluster(id="o", name="Cook dinner", description="w", slug="o", chat_ids=["5"], level=1)
    text = render_tree([child_b, other, parent, child_a])
    lines = text.splitlines()
    assert lines[0] == "Clusters (5 conversations)"
    assert lines[1].startswith("╠══ Help with code (4 conversations, 80.0%)")
    assert lines[2].endswith("Fix Python errors (3 conversations, 60.0%)")  # biggest child first
    assert "Write SQL" in lines[3] and lines[4].startswith("╚══ Cook dinner")
    markdown = render_markdown_tree([child_b, other, parent, child_a])
    assert markdown.splitlines()[0] == "5 conversations"
    assert markdown.splitlines()[2] == "  - **Fix Python errors** — 3 (60.0%)"


def test_hierarchy_problems_finds_a_broken_tree():
    embeddings, _ = blobs(4, 10)
    base, embedding_of, documents = _base_clusters(embeddings, 8)
    everything = offline_hierarchy(base, embedding_of, max_top_clusters=2)
    chat_ids = list(embedding_of)
    assert hierarchy_problems(everything, chat_ids, max_top_clusters=2) == []
    broken = [c.model_copy(deep=True) for c in everything]
    top = next(c for c in broken if c.parent_id is None)
    top.chat_ids = top.chat_ids[1:]
    problems = hierarchy_problems(broken, chat_ids + ["lost"], max_top_clusters=2)
    assert any("union of its children" in p for p in problems)
    assert any("exactly once" in p for p in problems)


def test_markdown_tree_shows_markup_in_names_as_text():
    name = "<script>alert(1)</script> [x](y)"
    hostile = Cluster(id="h", name=name, description="", slug="h", chat_ids=["1"])
    line = render_markdown_tree([hostile])
    assert "<script>" not in line and "\\<script\\>" in line and "\\[x\\]\\(y\\)" in line


# ----- the scale paths (benchmarks/SCALE.md): same answers without quadratic work -----


def test_relabel_by_size_numbers_by_size_then_first_member_and_drops_unused_labels():
    labels = np.array([7, 3, 3, 9, 7, 9, 9, 3])  # 3 and 9 both have three members; 3 comes first
    assert relabel_by_size(labels).tolist() == [2, 0, 0, 1, 2, 1, 1, 0]
    assert relabel_by_size(np.array([5, 5])).tolist() == [0, 0]


def test_kmeans_seeded_at_random_at_large_k_gives_k_distinct_centroids(monkeypatch):
    # Force the path taken when k-means++ seeding would be quadratic (n * k above the limit).
    monkeypatch.setattr(cluster_module, "KMEANS_PLUSPLUS_MAX_WORK", 0)
    embeddings, truth = blobs(12, 15)
    labels = kmeans_labels(embeddings, 12, seed=0)
    assert sorted(set(labels.tolist())) == list(range(len(set(labels.tolist()))))  # 0..m-1, no gaps
    centres = np.stack([embeddings[labels == g].mean(axis=0) for g in range(labels.max() + 1)])
    assert len(np.unique(centres.round(5), axis=0)) == len(centres)  # distinct centroids
    assert len(centres) >= 10  # random seeds may merge a pair of groups, not collapse them
    # Each cluster is mostly one true group: seeding at random still finds real clusters.
    purity = sum(np.bincount(truth[labels == g]).max() for g in range(labels.max() + 1)) / len(truth)
    assert purity >= 0.8


def test_kmeans_mini_batch_path_labels_every_point(monkeypatch):
    monkeypatch.setattr(cluster_module, "MINIBATCH_ABOVE", 50)
    monkeypatch.setattr(cluster_module, "KMEANS_PLUSPLUS_MAX_WORK", 0)
    embeddings, _ = blobs(6, 30)
    labels = kmeans_labels(embeddings, 6, seed=0)
    assert len(labels) == len(embeddings)
    sizes = np.bincount(labels)
    assert (sizes > 0).all() and list(sizes) == sorted(sizes, reverse=True)


def test_members_by_label_equal_a_mask_per_label():
    labels = np.random.default_rng(1).integers(0, 7, size=200)
    labels = relabel_by_size(labels)
    members = members_by_label(labels)
    assert len(members) == labels.max() + 1
    for label, rows in enumerate(members):
        assert rows.tolist() == np.flatnonzero(labels == label).tolist()
    assert members_by_label(np.zeros(0, dtype=np.int64)) == []


@pytest.mark.parametrize("block_bytes", [1, 1 << 20])  # one group per block, and all at once
def test_all_nearest_outsiders_equal_nearest_outsiders_group_by_group(monkeypatch, block_bytes):
    monkeypatch.setattr(cluster_module, "_SIMILARITY_BLOCK_BYTES", block_bytes)
    embeddings, truth = blobs(5, 12)
    members = members_by_label(truth)
    centres = np.stack([centroid(embeddings[rows]) for rows in members]).astype(np.float32)
    got = all_nearest_outsiders(embeddings, members, centres, limit=6)
    for g, rows in enumerate(members):
        mask = np.zeros(len(embeddings), dtype=bool)
        mask[rows] = True
        expected = nearest_outsiders(embeddings, mask, centres[g], 6)
        assert not mask[got[g]].any() and len(got[g]) == 6
        similarity = embeddings @ centres[g]
        np.testing.assert_allclose(similarity[got[g]], similarity[expected], atol=1e-6)
    # More outsiders asked for than there are: every non-member, nearest first.
    everyone = all_nearest_outsiders(embeddings, members, centres, limit=1000)
    assert all(len(rows) == len(embeddings) - len(m) for rows, m in zip(everyone, members, strict=True))
    assert all(len(rows) == 0 for rows in all_nearest_outsiders(embeddings, members, centres, limit=0))


def test_hierarchy_offline_parents_hold_exactly_their_childrens_members():
    embeddings, _ = blobs(8, 10)
    clusters, embedding_of, documents = _base_clusters(embeddings, 16)
    everything = offline_hierarchy(clusters, embedding_of, max_top_clusters=3)
    assert hierarchy_problems(everything, list(embedding_of), max_top_clusters=3) == []
    by_parent: dict[str, list[str]] = {}
    for c in everything:
        if c.parent_id is not None:
            by_parent.setdefault(c.parent_id, []).extend(c.chat_ids)
    for c in everything:
        if c.id in by_parent:
            assert sorted(by_parent[c.id]) == c.chat_ids


def test_children_the_model_did_not_place_follow_their_nearest_placed_sibling():
    centroids = np.array([[1.0, 0.0], [0.95, 0.3], [0.0, 1.0], [0.3, 0.95], [0.9, -0.4]])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    # Children 1, 3 and 4 got no usable answer: each joins the parent of its nearest answered one.
    assert assign_unmatched([0, None, 1, None, None], centroids) == [0, 0, 1, 1, 0]
    assert assign_unmatched([2, 0, 1, 1, 0], centroids) == [2, 0, 1, 1, 0]  # answers are kept
    assert assign_unmatched([None] * 5, centroids) is None  # nothing to extend: the caller regroups


def test_identical_conversations_cluster_without_a_warning_in_the_run_output():
    import warnings

    from kura_pipeline.core.cluster import kmeans_labels

    same = np.ones((30, 8), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's ConvergenceWarning was printed in the CLI run
        labels = kmeans_labels(same, 10)
    assert len(set(labels.tolist())) == 1
