"""What a person reads can be trusted: no rare word and no run of a user's words is shown,
counts add up in every view, a fallback says so, and the hierarchy follows the data."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from dagster import instance_for_test
from sklearn.metrics import normalized_mutual_info_score

from kura_pipeline.core.cluster import base_cluster_groups, cluster_id, coarse_partition, kmeans_labels
from kura_pipeline.core.frames import frame_to_clusters
from kura_pipeline.core.hierarchy import build_offline_hierarchy
from kura_pipeline.core.models import Cluster, Conversation, Message
from kura_pipeline.core.naming import ClusterLabel
from kura_pipeline.core.phrases import words
from kura_pipeline.core.render.shown import shown_tree, withheld_line
from kura_pipeline.core.render.tree import fallback_note, render_markdown_tree, render_tree
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline_tests.conftest import make_conversations, write_jsonl
from kura_pipeline_tests.support.loopback import LoopbackServer
from kura_pipeline_tests.test_assets import _materialize, _metadata, _stage

CANARY = "zanzibarledger"
RUN = 8  # no run of this many consecutive words of a user's message may be shown


def _canary_conversations() -> list[Conversation]:
    """The test topics plus two conversations that use a word nobody else does, in requests
    close enough to the python topic to be clustered with it."""
    created = datetime(2026, 2, 1, tzinfo=UTC)
    extra = [
        Conversation(
            chat_id=f"canary-{i}",
            created_at=created,
            messages=[
                Message(
                    role="user",
                    content=f"My Python script for the {CANARY} raises KeyError {i}, how do I fix it?",
                ),
                Message(role="assistant", content="Check the dictionary keys."),
            ],
            metadata={"topic": "python"},
        )
        for i in range(2)
    ]
    return make_conversations() + extra


def _runs(text: str, n: int = RUN) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def _shown_texts(data_dir: Path, result) -> dict[str, str]:
    clusters = frame_to_clusters(_stage(data_dir, "meta_clusters"))
    shown = [c for c in clusters if not c.withheld]
    summaries = _stage(data_dir, "conversation_summaries")
    return {
        "names": "\n".join(f"{c.name}\n{c.description}" for c in shown),
        "tree": render_tree(clusters, descriptions=True),
        "ui tree": str(_metadata(result, "meta_clusters")["tree"]),
        "ui largest": str(_metadata(result, "base_clusters")["largest"]),
        "summaries": "\n".join(summaries["summary"].drop_nulls().to_list()),
        "explorer": (data_dir / "explorer" / "topics.html").read_text(encoding="utf-8").split("<script")[-1],
    }


@pytest.mark.slow
def test_no_rare_word_and_no_run_of_user_words_is_shown(tmp_path):
    conversations = _canary_conversations()
    write_jsonl(conversations, tmp_path / "topics.jsonl")
    (tmp_path / "datasets.yaml").write_text(
        '{"datasets": {"topics": {"loader": "jsonl", "options": {"path": "topics.jsonl"}}}}', encoding="utf-8"
    )
    data_dir = tmp_path / "data"
    with instance_for_test() as instance:
        result = _materialize(instance, tmp_path, data_dir, LLMResource())
        assert result.success
        shown = _shown_texts(data_dir, result)
    user_runs = set().union(
        *(_runs(m.content) for c in conversations for m in c.messages if m.role == "user")
    )
    for where, text in shown.items():
        # The canary: a word two conversations used appears nowhere a person reads.
        assert CANARY not in text.lower(), where
        # No 8 consecutive words of any user message (the explorer's data included).
        plain = re.sub(r"\\u[0-9a-f]{4}", " ", text)
        assert not (_runs(plain) & user_runs), where
    # Still what the conversations are about: the python topic is named by its shared words.
    assert "python" in shown["names"].lower()


def _cluster(cid: str, chats: list[str], level: int = 0, parent: str | None = None, **extra) -> Cluster:
    return Cluster(id=cid, name=f"name {cid}", description="d", slug=cid, chat_ids=chats, level=level,
                   parent_id=parent, **extra)  # fmt: skip


def test_counts_add_up_with_the_withheld_part_as_one_line():
    chats = [f"c{i}" for i in range(20)]
    big = _cluster("big", chats[:9], parent="p")
    small = _cluster("small", chats[9:12], parent="p", withheld=True)  # below the threshold
    parent = _cluster("p", chats[:12], level=1)
    alone = _cluster("alone", chats[12:17])
    hidden_root = _cluster("tiny", chats[17:20], withheld=True)
    clusters = [big, small, parent, alone, hidden_root]
    tree = shown_tree(clusters)
    assert tree.total == 20
    assert [r.id for r in tree.roots] == ["p", "alone"]
    assert tree.withheld_under == {"p": 3, None: 3}
    # A parent's count is its shown children plus the withheld line.
    assert parent.count == sum(c.count for c in tree.children["p"]) + tree.withheld_under["p"]

    text = render_tree(clusters)
    assert text.splitlines()[0] == "Clusters (20 conversations)"
    assert "name p (12 conversations, 60.0%)" in text
    assert "name big (9 conversations, 45.0%)" in text
    assert f"({withheld_line(3)}, 15.0%)" in text
    assert "name small" not in text and "name tiny" not in text
    markdown = render_markdown_tree(clusters)
    assert "**name p** — 12 (60.0%)" in markdown and "**name big** — 9 (45.0%)" in markdown
    assert markdown.count(withheld_line(3)) == 2  # under p, and at the top
    assert "name small" not in markdown


def _blob_clusters(n_groups: int, per_group: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, 24))
    points = np.concatenate([c + 0.35 * rng.normal(size=(per_group, 24)) for c in centres])
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    truth = np.repeat(np.arange(n_groups), per_group)
    chat_ids = [f"c{i}" for i in range(len(points))]
    coarse = coarse_partition(points, 10)
    members, _, _ = base_cluster_groups(points, len(points) // 6, coarse=coarse)
    base = [
        Cluster(
            id=cluster_id(0, [chat_ids[r] for r in rows]),
            name=f"base {i}",
            description="d",
            slug=f"b{i}",
            chat_ids=[chat_ids[r] for r in rows],
        )  # fmt: skip
        for i, rows in enumerate(members)
    ]
    return points, truth, chat_ids, base


def _names(groups: list[list[Cluster]]) -> list[ClusterLabel]:
    return [ClusterLabel(f"parent {i}", "d") for i in range(len(groups))]


def test_the_top_level_size_comes_from_the_data_and_matches_flat_kmeans():
    points, truth, chat_ids, base = _blob_clusters(4, 60)
    clusters = build_offline_hierarchy(
        base, dict(zip(chat_ids, points, strict=True)), _names, max_top_clusters=10
    )
    roots = [c for c in clusters if c.parent_id is None]
    assert len(roots) == 4  # four groups in the data, not max_top_clusters
    # The top level as a partition of the conversations: as good as flat k-means of its size.
    top_of = {chat: root.id for root in roots for chat in root.chat_ids}
    ours = normalized_mutual_info_score(truth, [top_of[c] for c in chat_ids])
    flat = normalized_mutual_info_score(truth, kmeans_labels(points, len(roots), seed=0))
    assert ours >= flat - 1e-9
    # No parent has a single child, at any level.
    children: dict[str, int] = {}
    for c in clusters:
        if c.parent_id:
            children[c.parent_id] = children.get(c.parent_id, 0) + 1
    assert children and min(children.values()) >= 2


@pytest.mark.slow
def test_an_llm_run_that_falls_back_says_so_with_true_counts(tmp_path, dataset_dir):
    """The loopback endpoint answers every parent assignment with text that names no proposed
    parent: the level is grouped without the model, and every view says so."""
    data_dir = tmp_path / "data"
    with LoopbackServer() as server, instance_for_test() as instance:
        llm = LLMResource(backend="openai", base_url=server.base_url, model="loopback", api_key="k",
                          cache_path=str(tmp_path / "cache.sqlite3"))  # fmt: skip
        result = _materialize(instance, dataset_dir, data_dir, llm)
        assert result.success
        metadata = _metadata(result, "meta_clusters")
    clusters = frame_to_clusters(_stage(data_dir, "meta_clusters"))
    fallen = [c for c in clusters if c.fallback]
    assert metadata["fallback_clusters"] == len(fallen) > 0
    for cluster in fallen:
        if cluster.level > 0 and "grouped and named without the LLM" in cluster.fallback:
            # Described with its true number of conversations, not its number of children.
            assert cluster.description.startswith(f"{cluster.count} conversations")
    note = fallback_note(clusters)
    assert note is not None and note.startswith(f"warning: {len(fallen)} clusters")
    assert "[named without the LLM]" in render_tree(clusters) or all(c.withheld for c in fallen)


def test_asset_bodies_hold_no_backend_branch():
    assets = Path(__file__).parent.parent / "kura_pipeline" / "assets"
    for module in assets.glob("*.py"):
        text = module.read_text(encoding="utf-8")
        assert "is_offline" not in text, module.name


def test_offline_names_use_only_phrases_enough_conversations_and_users_share():
    from kura_pipeline.core.naming import naming_inputs, offline_labels

    texts = [f"debug the python loop {i}" for i in range(6)] + [f"python zebra ledger {i}" for i in range(4)]
    users = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u7", "u7", "u7"]  # zebra: 4 conversations, 1 user
    inputs = naming_inputs(texts, ["coding"] * 10, users, min_conversations=4, min_users=2)
    [label] = offline_labels(inputs, [list(range(10))])
    shown = f"{label.name} {label.description}".lower()
    assert "python" in shown  # 10 conversations, 7 users
    assert "zebra" not in shown and "ledger" not in shown  # enough conversations, but one user
    # Without user ids, 4 conversations are enough for "zebra ledger".
    [label] = offline_labels(naming_inputs(texts, None, None, min_conversations=4), [list(range(10))])
    assert "zebra" in label.description


def test_withheld_clusters_lend_no_words_to_their_parents():
    from kura_pipeline.core.backends import Corpus, HierarchyInputs, name_groups_offline
    from kura_pipeline.core.privacy import AggregationThreshold

    shown_texts = [f"plan a trip to the mountains {i}" for i in range(6)]
    hidden_texts = [f"plan a trip zebra ledger {i}" for i in range(6)]  # withheld by the audit, say
    chats = [f"s{i}" for i in range(6)] + [f"h{i}" for i in range(6)]
    shown = Cluster(id="s", name="Mountains", description="d", slug="s", chat_ids=chats[:6])
    hidden = Cluster(id="h", name="Hidden", description="d", slug="h", chat_ids=chats[6:])
    corpus = Corpus.build(chats, shown_texts + hidden_texts, [None] * 12, None, AggregationThreshold(5, 1))
    inputs = HierarchyInputs([shown, hidden], {}, corpus, withheld_base={"h"})
    [label] = name_groups_offline(inputs)([[shown, hidden]])
    assert "zebra" not in f"{label.name} {label.description}".lower()
    assert label.description.startswith("12 conversations")  # the true count, withheld included
    assert "Of the 6 in clusters shown:" in label.description  # what the shares that follow are of
    inputs.withheld_base = set()
    [label] = name_groups_offline(inputs)([[shown, hidden]])
    assert "zebra" in label.description.lower()  # the check above can fail


def test_a_clio_parent_with_a_single_child_is_not_made():
    from kura_pipeline.core.hierarchy import LevelPlan, _make_parents

    children = [_cluster(f"c{i}", [f"x{i}a", f"x{i}b"]) for i in range(3)]
    plan = LevelPlan(
        assignment=[0, 0, 1],
        labels=[
            ClusterLabel("Two children", "d"),
            ClusterLabel("Copy of c2", "d", "renamed without the LLM"),
        ],
        fallback_reasons={0: "1 of its children placed next to their nearest sibling"},
    )
    parents, promoted = _make_parents(children, plan, level=1, taken=set())
    assert [p.name for p in parents] == ["Two children"] and [c.id for c in promoted] == ["c2"]
    assert parents[0].fallback == "1 of its children placed next to their nearest sibling"
    assert children[2].parent_id is None  # goes up a level as it is
