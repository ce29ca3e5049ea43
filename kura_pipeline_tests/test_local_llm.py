"""The real instructor path against a real llama.cpp server (SmolLM2-135M from PyPI), end to end:
summaries, one naming call per base cluster, and one Clio hierarchy step, through Dagster.

SmolLM2's wording is junk at this size: only schema, types and bookkeeping are checked."""

from __future__ import annotations

import polars as pl
import pytest
from dagster import instance_for_test, materialize

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.resources.embedder import EmbedderResource
from kura_pipeline.resources.io_manager import storage_resources
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DatasetRegistry

from .conftest import make_conversations, write_jsonl

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

# The stages that call the LLM, and what they read (not the map, the page or the evaluation).
LLM_STAGES = {
    "raw_conversations",
    "conversation_summaries",
    "extracted_properties",
    "summary_embeddings",
    "base_clusters",
    "meta_clusters",
}


def test_local_llamacpp_backend_runs_summaries_naming_and_a_hierarchy_step(tmp_path):
    write_jsonl(make_conversations(per_topic=2)[:6], tmp_path / "few.jsonl")
    (tmp_path / "datasets.yaml").write_text(
        "datasets:\n  few:\n    loader: jsonl\n    options: {path: few.jsonl}\n", encoding="utf-8"
    )
    llm = LLMResource(backend="local", local_model="smollm2-135m", cache_path=str(tmp_path / "cache.sqlite3"))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["few"])
        result = materialize(
            [a for a in ALL_ASSETS if a.key.to_user_string() in LLM_STAGES],
            partition_key="few",
            instance=instance,
            run_config={
                "ops": {
                    "base_clusters": {"config": {"conversations_per_cluster": 2, "max_top_clusters": 1}},
                    "meta_clusters": {"config": {"max_top_clusters": 1}},
                }
            },
            resources={
                **storage_resources(str(tmp_path / "data")),
                "privacy": PrivacyPolicy(),
                "registry": DatasetRegistry(path=str(tmp_path / "datasets.yaml")),
                "llm": llm,
                "embedder": EmbedderResource(),
            },
        )
        assert result.success

    def metadata(asset: str) -> dict:
        [event] = result.asset_materializations_for_node(asset)
        return {key: value.value for key, value in event.metadata.items()}

    summaries = pl.read_parquet(tmp_path / "data" / "conversation_summaries" / "few.parquet")
    ok = summaries.filter(pl.col("failure_reason").is_null())
    summary_meta = metadata("conversation_summaries")
    assert summary_meta["backend"] == "local llama.cpp:smollm2-135m"
    # Every conversation is accounted for: summarised, or failed with a reason.
    assert summaries.height == 6 and summary_meta["summarised"] + summary_meta["failed"] == 6
    assert summary_meta["llm_calls"] >= 6 and summary_meta["llm_output_tokens"] > 0
    assert ok.height >= 1
    # Judgement facets only from a model that passed the facet calibration (SmolLM2 does not).
    if summary_meta["facet_calibration"]["passed"]:
        assert ok["concerning_score"].is_between(1, 5).all() and ok["user_frustration"].is_between(1, 5).all()
    else:
        assert ok["concerning_score"].is_null().all() and not ok["facets_assessed"].any()
    assert all(isinstance(text, str) for text in ok["summary"])

    base = pl.read_parquet(tmp_path / "data" / "base_clusters" / "few.parquet")
    naming_meta = metadata("base_clusters")
    assert naming_meta["llm_calls"] + naming_meta["llm_cache_hits"] >= base.height  # one naming call each
    assert base["name"].str.len_chars().min() > 0

    tree = pl.read_parquet(tmp_path / "data" / "meta_clusters" / "few.parquet")
    # Clio's steps ran until the top level has one cluster (one step or more, as the model chose).
    assert tree.filter(pl.col("parent_id").is_null()).height == 1
    assert tree["level"].max() >= 1
    assert metadata("meta_clusters")["llm_calls"] >= base.height  # proposals, assignments, renaming
