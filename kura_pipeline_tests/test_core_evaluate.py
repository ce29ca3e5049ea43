"""Evaluation metrics on inputs whose answers are worked out by hand, and the evaluation asset
on the labelled test conversations run through the offline pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
from dagster import instance_for_test, materialize

from kura_pipeline.core.backends import BaseGroups, Corpus, HierarchyInputs, OfflineBackend
from kura_pipeline.core.cluster import base_cluster_groups, choose_k, cluster_id, coarse_partition
from kura_pipeline.core.embed import MiniLMEmbedder
from kura_pipeline.core.evaluate import (
    cluster_at_levels,
    contingency,
    evaluate_hierarchy,
    hungarian_accuracy,
    labels_from_metadata,
    level_scores,
    majority_spillover_rate,
    markdown_table,
    spillover_rate,
)
from kura_pipeline.core.models import Cluster, Conversation
from kura_pipeline.core.privacy import AggregationThreshold, withheld_cluster_ids
from kura_pipeline.core.summarise import summarise_all_offline
from kura_pipeline_tests.conftest import make_conversations

# 6 conversations: label a in clusters 1,1,2 and label b in 2,2,2.
LABELS = ["a", "a", "a", "b", "b", "b"]
CLUSTERS = [1, 1, 2, 2, 2, 2]


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c)


def test_contingency_counts_each_label_and_cluster_pair():
    table, labels, clusters = contingency(LABELS, CLUSTERS)
    assert labels == ["a", "b"] and clusters == [1, 2]
    assert table.tolist() == [[2, 1], [0, 3]]
    with pytest.raises(ValueError, match="6 labels but 5"):
        contingency(LABELS, CLUSTERS[:5])


def test_scores_of_a_partition_worked_out_by_hand():
    scores = level_scores(LABELS, CLUSTERS)
    # Best pairing a->1 (2), b->2 (3): 5 of 6. Purity: cluster 1 is mostly a (2), cluster 2 b (3).
    assert scores["accuracy"] == pytest.approx(5 / 6)
    assert scores["purity"] == pytest.approx(5 / 6)
    # ARI by the pair-counting formula: sum C(n_ij, 2) = 1 + 3 = 4; rows 3+3 -> 6; columns 1+6 -> 7.
    expected_index = 6 * 7 / 15
    assert scores["ari"] == pytest.approx((4 - expected_index) / ((6 + 7) / 2 - expected_index))
    # NMI (arithmetic mean normalisation): MI / mean(H(labels), H(clusters)).
    mutual = 2 / 6 * math.log(2) + 1 / 6 * math.log(0.5) + 3 / 6 * math.log(1.5)
    assert scores["nmi"] == pytest.approx(mutual / ((_entropy([3, 3]) + _entropy([2, 4])) / 2))
    # Kura's spillover: a is in two clusters, b in one.
    assert scores["spillover_rate"] == 0.5
    assert (scores["clusters"], scores["labels"], scores["conversations"]) == (2, 2, 6)


def test_a_perfect_partition_scores_one_whatever_the_cluster_names():
    scores = level_scores(["x", "x", "y", "y", "z"], ["c9", "c9", "c1", "c1", "c5"])
    for metric in ("accuracy", "nmi", "ari", "purity"):
        assert scores[metric] == pytest.approx(1.0), metric
    assert scores["spillover_rate"] == 0 and scores["spillover_rate_majority"] == 0


def test_splitting_every_label_keeps_purity_but_halves_matched_accuracy():
    labels = ["a"] * 4 + ["b"] * 4
    clusters = [1, 1, 2, 2, 3, 3, 4, 4]
    scores = level_scores(labels, clusters)
    assert scores["purity"] == 1.0
    assert scores["accuracy"] == 0.5  # only two of four clusters can be paired with a label
    assert scores["spillover_rate"] == 1.0


def test_one_big_cluster_is_pure_for_no_one():
    scores = level_scores(["a", "a", "b", "b"], [0, 0, 0, 0])
    assert scores["accuracy"] == 0.5 and scores["purity"] == 0.5
    assert scores["ari"] == 0 and scores["nmi"] == 0 and scores["spillover_rate"] == 0


def test_majority_spillover_tolerates_a_few_strays():
    # Label a: 9 of 10 in one cluster (exactly the 0.9 threshold); label b: 6 of 10.
    labels = ["a"] * 10 + ["b"] * 10
    clusters = [1] * 9 + [2] + [2] * 6 + [3] * 4
    table, _, _ = contingency(labels, clusters)
    assert spillover_rate(table) == 1.0  # Kura's strict rate: both labels touch two clusters
    assert majority_spillover_rate(table, 0.9) == 0.5  # only b spills
    assert majority_spillover_rate(table, 0.6) == 0.0
    assert majority_spillover_rate(table, 1.0) == 1.0
    with pytest.raises(ValueError):
        majority_spillover_rate(table, 0)


def test_empty_inputs_give_nan_not_an_error():
    scores = level_scores([], [])
    assert scores["conversations"] == 0 and math.isnan(scores["accuracy"]) and math.isnan(scores["nmi"])
    table, _, _ = contingency([], [])
    assert math.isnan(hungarian_accuracy(table)) and math.isnan(spillover_rate(table))


def _cluster(cid: str, level: int, chats: list[str], parent: str | None = None) -> Cluster:
    return Cluster(id=cid, name=cid, description="", slug=cid, chat_ids=chats, level=level, parent_id=parent)


# Base: {a1,a2} {a3,b1} {b2,b3} {c1,c2}; level 1: {a*,b1} {b2,b3,c*}; level 2: everything.
HIERARCHY = [
    _cluster("L0-a", 0, ["a1", "a2"], "L1-x"),
    _cluster("L0-ab", 0, ["a3", "b1"], "L1-x"),
    _cluster("L0-b", 0, ["b2", "b3"], "L1-y"),
    _cluster("L0-c", 0, ["c1", "c2"], "L1-y"),
    _cluster("L1-x", 1, ["a1", "a2", "a3", "b1"], "L2-top"),
    _cluster("L1-y", 1, ["b2", "b3", "c1", "c2"], "L2-top"),
    _cluster("L2-top", 2, ["a1", "a2", "a3", "b1", "b2", "b3", "c1", "c2"]),
]
TRUTH = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B", "b3": "B", "c1": "C", "c2": "C", "x": "X"}


def test_evaluate_hierarchy_scores_every_level():
    table = evaluate_hierarchy(HIERARCHY, TRUTH)
    assert table["level"].to_list() == [0, 1, 2]
    assert table["clusters"].to_list() == [4, 2, 1]
    assert set(table["conversations"]) == {8} and set(table["labels"]) == {3}  # "x" is not clustered
    level0, level1, level2 = table.iter_rows(named=True)
    # Level 0: A->L0-a (2), B->L0-b (2), C->L0-c (2): 6 of 8; A and B spill, C does not.
    assert level0["accuracy"] == pytest.approx(6 / 8) and level0["purity"] == pytest.approx(7 / 8)
    assert level0["spillover_rate"] == pytest.approx(2 / 3)
    # Level 1: A->x (3), C->y (2); B is left with no cluster: 5 of 8. Only B spills.
    assert level1["accuracy"] == pytest.approx(5 / 8) and level1["spillover_rate"] == pytest.approx(1 / 3)
    # Level 2: one cluster holds everything.
    assert level2["accuracy"] == pytest.approx(3 / 8) and level2["spillover_rate"] == 0
    assert level2["nmi"] == 0 and level2["ari"] == 0
    assert "| level |" in markdown_table(table) and "0.750" in markdown_table(table)


def test_unlabelled_conversations_are_left_out_and_no_labels_give_an_empty_table():
    some = evaluate_hierarchy(HIERARCHY, {"a1": "A", "c1": "C", "b2": None})
    assert some["conversations"].to_list() == [2, 2, 2]
    assert some["accuracy"].to_list() == [1.0, 1.0, 0.5]
    empty = evaluate_hierarchy(HIERARCHY, {})
    assert empty.height == 0 and "spillover_rate" in empty.columns


def test_a_short_branch_keeps_its_top_cluster_at_the_levels_above():
    clusters = [
        _cluster("base-1", 0, ["p", "q"], "mid"),
        _cluster("mid", 1, ["p", "q"]),
        _cluster("base-2", 0, ["r"]),  # never given a parent
    ]
    paths = cluster_at_levels(clusters)
    assert paths == {"p": ["base-1", "mid"], "q": ["base-1", "mid"], "r": ["base-2", "base-2"]}


def test_labels_from_metadata_reads_the_json_text_of_the_stage_tables():
    metadata = [json.dumps({"topic": "cooking"}), None, json.dumps({"topic": ["a", "b"]}), "{}"]
    labels = labels_from_metadata(["c1", "c2", "c3", "c4"], metadata, "topic")
    assert labels == {"c1": "cooking", "c3": '["a", "b"]'}
    assert labels_from_metadata(["c1"], metadata[:1], "intent") == {}


def _offline_hierarchy(conversations: list[Conversation]) -> list[Cluster]:
    """The offline pipeline's clustering path in plain code (what the assets do, without Dagster)."""
    backend = OfflineBackend()
    threshold = AggregationThreshold()
    summaries = summarise_all_offline(conversations).summaries
    chat_ids = [s.chat_id for s in summaries]
    texts = [s.clustering_text or s.summary for s in summaries]
    embeddings = MiniLMEmbedder().embed(texts)
    corpus = Corpus.build(chat_ids, texts, [s.task for s in summaries], None, threshold)
    coarse = coarse_partition(embeddings, 4)
    members, _, _ = base_cluster_groups(embeddings, choose_k(len(chat_ids), 4), coarse=coarse)
    groups = [[chat_ids[r] for r in rows] for rows in members]
    labels = backend.name(corpus, BaseGroups([list(m) for m in members], [], []), list(range(len(members))))
    base = [
        Cluster(
            id=cluster_id(0, g),
            name=labels[i].name,
            description=labels[i].description,
            slug=f"c{i}",
            chat_ids=sorted(g),
        )
        for i, g in enumerate(groups)
    ]
    inputs = HierarchyInputs(
        base,
        dict(zip(chat_ids, embeddings, strict=True)),
        corpus,
        withheld_cluster_ids(base, threshold),
        max_top_clusters=4,
        branching_factor=2.5,
    )
    return backend.build(inputs).clusters


# Measured on this machine (2026-12-06) for 5 topics x 8 conversations, clustered offline
# (MiniLM over the scrubbed requests; the top level is flat k-means over the conversations, its
# size chosen by silhouette within [2, 4]; base clusters at 4 conversations each are made inside
# it). Level 0: 10 clusters, accuracy 0.75, NMI 0.86, ARI 0.73, purity 1.0. Level 1 (top): 4
# clusters, accuracy 0.80, NMI 0.91, ARI 0.76, purity 0.80, spillover 0.0. The bottom-up
# hierarchy before it (size-weighted k-means of base centroids) scored 0.80 / 0.84 / 0.73 at
# level 0 and 0.80 / 0.91 / 0.76 at the top; Ward's method before that 0.55 / 0.66 / 0.39 at the top.
# A random partition of the same sizes scores NMI ~0.4 and ARI ~0 at level 0.


def _check_measured_bounds(table: pl.DataFrame) -> None:
    assert table["level"].to_list() == [0, 1]
    assert set(table["conversations"]) == {40} and set(table["labels"]) == {5}
    base, top = table.row(0, named=True), table.row(1, named=True)
    assert base["clusters"] == 10 and top["clusters"] == 4
    assert base["purity"] >= 0.95 and base["nmi"] >= 0.8 and base["ari"] >= 0.7
    assert base["accuracy"] >= 0.75
    assert top["accuracy"] >= 0.75 and top["nmi"] >= 0.85 and top["ari"] >= 0.7
    assert top["purity"] >= 0.75 and top["spillover_rate"] <= 0.2


def test_evaluation_of_the_offline_pipeline_on_the_labelled_test_topics():
    conversations = make_conversations()
    truth = {c.chat_id: c.metadata["topic"] for c in conversations}
    _check_measured_bounds(evaluate_hierarchy(_offline_hierarchy(conversations), truth))


@pytest.mark.slow
def test_the_evaluation_asset_through_dagster(tmp_path, dataset_dir):
    """The same data through the assets; then again with a label no conversation has."""
    data_dir = tmp_path / "data"
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["topics"])
        result = _materialize(instance, dataset_dir, data_dir, NEEDED + ["evaluation"], "topic")
        assert result.success
        _check_measured_bounds(pl.read_parquet(data_dir / "evaluation" / "topics.parquet"))
        metadata = _metadata(result)
        assert metadata["scored_conversations"] == 40 and "| level |" in metadata["evaluation"]

        # Only the evaluation again, upstream read back from Parquet: an absent label scores nothing.
        result = _materialize(instance, dataset_dir, data_dir, ["evaluation"], "no_such_field")
        assert result.success
        assert pl.read_parquet(data_dir / "evaluation" / "topics.parquet").height == 0
        assert _metadata(result)["scored_conversations"] == 0


NEEDED = [
    "raw_conversations",
    "conversation_summaries",
    "summary_embeddings",
    "base_clusters",
    "meta_clusters",
]


def _materialize(instance, dataset_dir: Path, data_dir: Path, selection: list[str], label_field: str):
    from kura_pipeline.assets import ALL_ASSETS
    from kura_pipeline.assets.evaluation import evaluation
    from kura_pipeline.resources.embedder import EmbedderResource
    from kura_pipeline.resources.io_manager import storage_resources
    from kura_pipeline.resources.llm import LLMResource
    from kura_pipeline.resources.privacy import PrivacyPolicy
    from kura_pipeline.resources.registry import DatasetRegistry

    # Only the stages evaluation needs (by name: ALL_ASSETS may or may not list `evaluation`).
    assets = {a.key.to_user_string(): a for a in [*ALL_ASSETS, evaluation]}
    return materialize(
        [assets[name] for name in [*NEEDED, "evaluation"]],
        selection=selection,
        partition_key="topics",
        instance=instance,
        run_config={
            "ops": {
                name: config
                for name, config in {
                    "base_clusters": {"config": {"conversations_per_cluster": 4, "max_top_clusters": 4}},
                    "meta_clusters": {"config": {"max_top_clusters": 4, "branching_factor": 2.5}},
                    "evaluation": {"config": {"label_field": label_field}},
                }.items()
                if name in selection
            }
        },
        resources={
            **storage_resources(str(data_dir)),
            "privacy": PrivacyPolicy(),
            "registry": DatasetRegistry(path=str(dataset_dir / "datasets.yaml")),
            "llm": LLMResource(),
            "embedder": EmbedderResource(cache_path=None),
        },
    )


def _metadata(result) -> dict:
    [materialization] = result.asset_materializations_for_node("evaluation")
    return {key: value.value for key, value in materialization.metadata.items()}
