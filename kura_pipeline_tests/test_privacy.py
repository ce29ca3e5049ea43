"""Privacy layers that need no model: PII scrubbing and aggregation thresholds, end to end."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest
from dagster import instance_for_test, materialize

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.core.frames import frame_to_clusters
from kura_pipeline.core.models import Cluster, Conversation, Message
from kura_pipeline.core.privacy import (
    AggregationThreshold,
    parents_with_nothing_shown,
    scrub_pii,
    withheld_cluster_ids,
)
from kura_pipeline.core.render.tree import render_markdown_tree, render_tree
from kura_pipeline.resources.embedder import EmbedderResource
from kura_pipeline.resources.io_manager import storage_resources
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DatasetRegistry
from kura_pipeline_tests.support.llm_fixtures import write_jsonl_dataset

from .conftest import TOPICS

PII = [
    "jane.roe@example.org",
    "+1 415 555 0142",
    "Mrs. Hollis",
    "https://example.org/u/jroe",
    "10.20.30.40",
]


def _cluster(cid: str, n: int, parent: str | None = None, level: int = 0) -> Cluster:
    members = [f"{cid}-{i}" for i in range(n)]
    return Cluster(
        id=cid, name=f"name {cid}", description="d", slug=cid, chat_ids=members, parent_id=parent, level=level
    )


def test_names_after_titles_and_introductions_are_scrubbed():
    text, counts = scrub_pii("Hi, my name is Margaret Hollis. Dear Tom, Dr. Watson agrees. The Beatles rock.")
    assert "Margaret" not in text and "Tom" not in text and "Watson" not in text
    assert "my name is [NAME]" in text and "The Beatles rock" in text
    assert counts["name"] == 3


def test_small_clusters_are_withheld_by_size_and_by_distinct_users():
    clusters = [_cluster("big", 12), _cluster("small", 3), _cluster("one_user", 8)]
    threshold = AggregationThreshold(min_conversations=5, min_users=2)
    assert withheld_cluster_ids(clusters, threshold) == {"small"}
    user_of = {f"one_user-{i}": "u1" for i in range(8)} | {f"big-{i}": f"u{i}" for i in range(12)}
    assert withheld_cluster_ids(clusters, threshold, user_of) == {"small", "one_user"}


def test_withheld_clusters_never_reach_the_tree_but_are_counted():
    parent = _cluster("parent", 15, level=1)
    visible = _cluster("visible", 12, parent="parent")
    hidden = _cluster("hidden", 3, parent="parent").model_copy(update={"withheld": True})
    clusters = [parent, visible, hidden]
    for text in (render_tree(clusters), render_markdown_tree(clusters)):
        assert "name visible" in text and "name hidden" not in text
        assert "1 cluster withheld: below the privacy threshold" in text
        assert "3 of 15 conversations are in it" in text
        assert "3 conversations in clusters too small or too specific to show" in text



def test_a_parent_whose_every_child_is_withheld_is_withheld_and_counted_one_level_up():
    # The local 0.5B demo showed "Requests with no phrase in common (8 conversations)" at the top,
    # described "Of the 0 in clusters shown", above a single line of withheld conversations.
    root = _cluster("root", 20, level=2)
    kept = _cluster("kept", 12, parent="root", level=1)
    empty = _cluster("empty", 8, parent="root", level=1)
    shown = _cluster("shown", 12, parent="kept")
    small = [_cluster(f"small{i}", 4, parent="empty") for i in range(2)]
    clusters = [root, kept, empty, shown, *small]
    withheld = {c.id for c in small}
    assert parents_with_nothing_shown(clusters, withheld) == {"empty"}
    # A parent with one shown child keeps it; one with no children at all is a base cluster.
    assert parents_with_nothing_shown(clusters, set()) == set()
    # Up the levels: when "kept"'s only child goes too, so do "kept" and then "root".
    assert parents_with_nothing_shown(clusters, withheld | {"shown"}) == {"empty", "kept", "root"}
    marked = [c.model_copy(update={"withheld": c.id in withheld | {"empty"}}) for c in clusters]
    text = render_tree(marked)
    assert "name empty" not in text and "Of the 0" not in text
    assert "(8 conversations in clusters too small or too specific to show, 40.0%)" in text
    assert "3 clusters withheld" in text

@pytest.mark.slow
def test_seeded_pii_reaches_no_output_a_person_reads(tmp_path):
    """Users put emails, phones, names, URLs and IPs in their messages; none of it may show up in
    summaries, cluster names or descriptions, the tree, or the UI metadata."""
    conversations = []
    for t, (topic, requests) in enumerate(TOPICS.items()):
        for i, request in enumerate(requests):
            pii = PII[(t + i) % len(PII)]
            text = f"{request} My name is Margaret Hollis, reach me at {pii} or jane.roe@example.org."
            conversations.append(
                Conversation(
                    chat_id=f"{topic}-{i}",
                    created_at=datetime(2026, 1, 1, tzinfo=UTC),
                    messages=[Message(role="user", content=text), Message(role="assistant", content="Sure.")],
                    metadata={"user_id": f"user-{i % 3}"},
                )
            )
    write_jsonl_dataset(tmp_path, "pii", conversations)
    data = tmp_path / "data"
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["pii"])
        result = materialize(
            ALL_ASSETS,
            partition_key="pii",
            instance=instance,
            run_config={"ops": {"base_clusters": {"config": {"conversations_per_cluster": 4}}}},
            resources={
                **storage_resources(str(data)),
                "privacy": PrivacyPolicy(min_cluster_conversations=3, min_cluster_users=2),
                "registry": DatasetRegistry(path=str(tmp_path / "datasets.yaml")),
                "llm": LLMResource(),
                "embedder": EmbedderResource(cache_path=None),
            },
        )
        assert result.success
        metadata_text = " ".join(
            str(value.value)
            for asset in ("conversation_summaries", "base_clusters", "meta_clusters", "explorer")
            for event in result.asset_materializations_for_node(asset)
            for value in event.metadata.values()
        )
    summaries = pl.read_parquet(data / "conversation_summaries" / "pii.parquet")
    clusters = pl.read_parquet(data / "meta_clusters" / "pii.parquet")
    shown = " ".join(
        [
            *summaries["summary"].to_list(),
            *summaries["request"].drop_nulls().to_list(),
            *clusters["name"].to_list(),
            *clusters["description"].to_list(),
            render_tree(frame_to_clusters(clusters), descriptions=True),
            metadata_text,
            (data / "explorer" / "pii.html").read_text(encoding="utf-8"),
        ]
    )
    # The user ids only count users: no view offers them as a breakdown (a reader could pick out one person).
    for secret in [*PII, "Margaret", "Hollis", "jroe", "555 0142", "user-1"]:
        assert secret not in shown, shown[max(0, shown.find(secret) - 300) : shown.find(secret) + 100]
    # The UI's table of largest base clusters names none below the threshold either.
    largest = result.asset_materializations_for_node("base_clusters")[0].metadata["largest"].value
    counts = [int(line.rsplit("|", 2)[1]) for line in largest.splitlines()[2:]]
    assert counts and min(counts) >= 3
    scrubbed = (
        result.asset_materializations_for_node("conversation_summaries")[0].metadata["pii_scrubbed"].value
    )
    assert scrubbed["email"] >= 40 and scrubbed["name"] == 40 + 8  # every introduction, 8 "Mrs. Hollis"


def test_the_auditor_rates_each_cluster_and_an_unaudited_cluster_is_withheld(server):
    import asyncio

    from kura_pipeline.core.llm import LLMClient, LLMSettings
    from kura_pipeline.core.privacy_audit import audit_clusters, withheld_by_audit

    clusters = [_cluster("a", 6), _cluster("b", 6), _cluster("c", 6)]
    server.faults.push("ok", "500", "ok")  # the second audit call fails
    client = LLMClient(
        LLMSettings(model="loopback", base_url=server.base_url, max_attempts=1, max_concurrency=1)
    )
    ratings = asyncio.run(audit_clusters(client, clusters))
    prompts = [body["messages"][1]["content"] for body in server.stats.bodies("chat")]
    assert sorted(ratings) == ["a", "b", "c"] and ratings["b"] is None
    assert all(1 <= ratings[c] <= 5 for c in ("a", "c"))
    assert all("name a" in p or "name b" in p or "name c" in p for p in prompts)  # name and description sent
    withheld = withheld_by_audit(ratings, min_rating=3)
    assert "b" in withheld
    assert withheld == {"b"} | {c for c in ("a", "c") if ratings[c] < 3}
