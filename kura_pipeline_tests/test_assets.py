"""The whole pipeline through Dagster: a real instance, real Parquet, a real HTTP LLM endpoint."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, instance_for_test, materialize

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.core.calibration_set import CALIBRATION_CASES
from kura_pipeline.resources.embedder import EmbedderResource
from kura_pipeline.resources.io_manager import ParquetIOManager, storage_resources
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DatasetRegistry
from kura_pipeline_tests.support.llm_fixtures import jsonl_entry, loopback_resource, write_registry

STAGES = [a.key.to_user_string() for a in ALL_ASSETS]
# 5 topics x 8 conversations: one base cluster per topic, then a small hierarchy on top.
RUN_CONFIG = {
    "ops": {
        "base_clusters": {"config": {"conversations_per_cluster": 4, "max_top_clusters": 4}},
        "meta_clusters": {"config": {"max_top_clusters": 4, "branching_factor": 2.5}},
    }
}


def _materialize(instance: DagsterInstance, dataset_dir: Path, data_dir: Path, llm: LLMResource):
    instance.add_dynamic_partitions("datasets", ["topics"])
    return materialize(
        ALL_ASSETS,
        partition_key="topics",
        instance=instance,
        run_config=RUN_CONFIG,
        resources={
            **storage_resources(str(data_dir)),
            "privacy": PrivacyPolicy(),
            "registry": DatasetRegistry(path=str(dataset_dir / "datasets.yaml")),
            "llm": llm,
            "embedder": EmbedderResource(),
        },
        raise_on_error=False,
    )


def _stage(data_dir: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(data_dir / name / "topics.parquet")


def _checks(result) -> dict[str, bool]:
    return {check.check_name: check.passed for check in result.get_asset_check_evaluations()}


def _metadata(result, asset: str) -> dict:
    [materialization] = [m for m in result.asset_materializations_for_node(asset)]
    return {key: value.value for key, value in materialization.metadata.items()}


@pytest.mark.slow
def test_offline_run_writes_eight_stages_and_finds_the_topics(tmp_path, dataset_dir):
    data_dir = tmp_path / "data"
    with instance_for_test() as instance:
        result = _materialize(instance, dataset_dir, data_dir, LLMResource())
        assert result.success
    assert len(STAGES) == 9  # seven stages, the explorer page and the evaluation
    for stage in STAGES:
        suffix = ".html" if stage == "explorer" else ".parquet"  # the explorer is a page, not a table
        assert (data_dir / stage / f"topics{suffix}").exists(), stage

    raw = _stage(data_dir, "raw_conversations")
    summaries = _stage(data_dir, "conversation_summaries")
    assert raw.height == summaries.height == 40
    assert summaries["failure_reason"].null_count() == 40
    assert _metadata(result, "conversation_summaries")["backend"] == "offline (no LLM)"

    # Base clusters: every conversation in exactly one, and clusters follow the true topics
    # (purity: the share of conversations that sit with their cluster's majority topic).
    base = _stage(data_dir, "base_clusters")
    members = base.explode("chat_ids")["chat_ids"].to_list()
    assert sorted(members) == sorted(raw["chat_id"].to_list())
    majority = 0
    for chat_ids in base["chat_ids"].to_list():
        topics = [chat.rsplit("-", 1)[0] for chat in chat_ids]
        majority += max(topics.count(t) for t in set(topics))
    assert majority / 40 >= 0.9

    # The hierarchy: parents above, a small top level, every parent the union of its children.
    tree = _stage(data_dir, "meta_clusters")
    top = tree.filter(pl.col("parent_id").is_null())
    assert 1 <= top.height <= 4 and tree["level"].max() >= 1
    assert top["count"].sum() == 40
    assert "**" in _metadata(result, "meta_clusters")["tree"]
    assert _checks(result) == {"every_conversation_summarised": True, "hierarchy_is_consistent": True}

    properties = _stage(data_dir, "extracted_properties")
    topic_rows = properties.filter(pl.col("name") == "metadata.topic")
    assert topic_rows.height == 40
    assert set(properties["name"]) >= {"message_count", "user_turns", "conversation_characters"}

    # The evaluation stage scores every level against the topics kept in metadata.
    scores = _stage(data_dir, "evaluation").sort("level")
    assert scores["level"].to_list() == list(range(tree["level"].max() + 1))
    assert scores["conversations"][0] == 40

    projections = _stage(data_dir, "projections")
    points = projections.filter(pl.col("kind") == "conversation")
    assert points.height == 40 and points["x"].is_finite().all()
    assert all(len(path) == tree["level"].max() + 1 for path in points["cluster_ids"].to_list())
    assert projections.filter(pl.col("kind") == "cluster").height == tree.height


@pytest.mark.slow
def test_llm_run_goes_through_a_real_http_endpoint_and_a_rerun_costs_nothing(tmp_path, dataset_dir, server):
    data_dir = tmp_path / "data"
    with instance_for_test() as instance:
        llm = loopback_resource(
            server,
            api_key="test-key-not-secret",
            cache_path=str(tmp_path / "cache.sqlite3"),
            max_concurrency=4,
        )
        result = _materialize(instance, dataset_dir, data_dir, llm)
        assert result.success
        summary_calls = sum(
            1 for body in server.stats.bodies("chat") if "<conversation>" in body["messages"][1]["content"]
        )
        # One per conversation, and one per facet calibration case, counted at the endpoint.
        calibration = len(CALIBRATION_CASES)
        assert summary_calls == 40 + calibration
        first_run_calls = server.stats.count("chat")
        metadata = _metadata(result, "conversation_summaries")
        assert metadata["backend"] == "openai-compatible:loopback"
        assert metadata["llm_calls"] == 40 + calibration and metadata["llm_input_tokens"] > 0

        summaries = _stage(data_dir, "conversation_summaries")
        # The loopback's made-up ratings fail the facet calibration: not shown as numbers.
        assert metadata["facet_calibration"]["passed"] is False
        assert summaries["concerning_score"].is_null().all() and not summaries["facets_assessed"].any()
        base = _stage(data_dir, "base_clusters")
        naming = _metadata(result, "base_clusters")
        # A generic name (the loopback's words come from the prompt) is asked for once more.
        assert base.height <= naming["llm_calls"] <= 2 * base.height
        assert naming["naming_fallbacks"] == base["fallback"].is_not_null().sum()

        # The same run again: every answer comes from the persistent cache, no call is made.
        again = _materialize(instance, dataset_dir, data_dir, llm)
        assert again.success
        assert server.stats.count("chat") == first_run_calls
        assert _metadata(again, "conversation_summaries")["llm_cache_hits"] == 40 + calibration


def test_failed_summaries_are_recorded_with_their_reason_and_the_run_completes(tmp_path, dataset_dir, server):
    """Only raw_conversations and conversation_summaries: an endpoint that fails some calls."""
    data_dir = tmp_path / "data"
    with instance_for_test() as instance:
        server.faults.set(error_500_every=5)  # calls 5, 10, ... fail; no retries allowed
        instance.add_dynamic_partitions("datasets", ["topics"])
        llm = loopback_resource(server, max_attempts=1, cache_path=str(tmp_path / "cache.sqlite3"))
        result = materialize(
            ALL_ASSETS[:2],
            partition_key="topics",
            instance=instance,
            resources={
                "io_manager": ParquetIOManager(base_path=str(data_dir)),
                "registry": DatasetRegistry(path=str(dataset_dir / "datasets.yaml")),
                "llm": llm,
                "privacy": PrivacyPolicy(),
            },
        )
        assert result.success
    summaries = _stage(data_dir, "conversation_summaries")
    failed = summaries.filter(pl.col("failure_reason").is_not_null())
    assert failed.height == 8 and summaries.height == 40
    assert set(failed["failure_reason"]) == {"HTTP 500 from the LLM endpoint"}
    assert _metadata(result, "conversation_summaries")["failed"] == 8
    assert _checks(result) == {"every_conversation_summarised": False}  # a warning; the run went on


def test_an_unreadable_dataset_fails_with_a_message_naming_the_file(tmp_path):
    (tmp_path / "broken.jsonl").write_text("this is not json\n", encoding="utf-8")
    write_registry(tmp_path, {"broken": jsonl_entry("broken.jsonl")})
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["broken"])
        result = materialize(
            ALL_ASSETS[:1],
            partition_key="broken",
            instance=instance,
            resources={
                "io_manager": ParquetIOManager(base_path=str(tmp_path / "data")),
                "registry": DatasetRegistry(path=str(tmp_path / "datasets.yaml")),
            },
            raise_on_error=False,
        )
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "broken.jsonl" in message and "line 1" in message and "not valid JSON" in message
