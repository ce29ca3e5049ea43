"""Named LLM clients (Kura's `clients` idea) through Dagster: each stage calls the endpoint it
was given, extractors get every client by name, and each stage's metadata says what it cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dagster import instance_for_test, materialize
from pydantic import BaseModel

from kura_pipeline.assets.base_clusters import base_clusters
from kura_pipeline.assets.conversation_summaries import conversation_summaries
from kura_pipeline.assets.extracted_properties import extracted_properties
from kura_pipeline.assets.raw_conversations import raw_conversations
from kura_pipeline.assets.summary_embeddings import summary_embeddings
from kura_pipeline.core.calibration_set import CALIBRATION_CASES
from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.models import Conversation, ExtractedProperty
from kura_pipeline.core.prompts import Prompt
from kura_pipeline.resources.embedder import EmbedderResource
from kura_pipeline.resources.io_manager import storage_resources
from kura_pipeline.resources.llm import LLMResource, NamedLLMClient, clients_from_file
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DatasetRegistry
from kura_pipeline_tests.support.llm_fixtures import loopback_resource
from kura_pipeline_tests.support.loopback import LoopbackServer


class Mood(BaseModel):
    mood: str


MOOD_PROMPT = Prompt(name="test-mood", version="1", system="Name the user's mood.", user_template="{text}")


async def user_mood(
    conversation: Conversation, *, clients: dict[str, LLMClient], **_: Any
) -> ExtractedProperty | None:
    """An LLM extractor, as a user writes one: it picks the client it wants by name."""
    answer = await clients["cheap"].complete(
        MOOD_PROMPT, MOOD_PROMPT.messages(text=conversation.messages[0].content), Mood
    )
    return None if isinstance(answer, LLMFailure) else ExtractedProperty(name="mood", value=answer.mood)


def _metadata(result: Any, asset: str) -> dict[str, Any]:
    [materialization] = result.asset_materializations_for_node(asset)
    return {key: value.value for key, value in materialization.metadata.items()}


@pytest.mark.slow
def test_each_stage_calls_its_own_client_and_reports_its_cost(tmp_path: Path, dataset_dir: Path):
    stages = [
        raw_conversations,
        conversation_summaries,
        extracted_properties,
        summary_embeddings,
        base_clusters,
    ]
    with (
        LoopbackServer() as strong,
        LoopbackServer() as cheap,
        instance_for_test() as instance,
    ):
        llm = loopback_resource(
            strong,
            model="strong-model",
            input_price_per_million=2.5,
            output_price_per_million=10.0,
            clients={
                "cheap": NamedLLMClient(
                    base_url=cheap.base_url,
                    model="cheap-model",
                    api_key_env="KURA_TEST_CHEAP_KEY",
                    max_concurrency=3,
                    input_price_per_million=0.15,
                    output_price_per_million=0.6,
                )
            },
            summary_client="cheap",
            cache_path=str(tmp_path / "cache.sqlite3"),
        )
        instance.add_dynamic_partitions("datasets", ["topics"])
        data_dir = str(tmp_path / "data")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("KURA_TEST_CHEAP_KEY", "sk-cheap-not-a-real-key")
            result = materialize(
                stages,
                partition_key="topics",
                instance=instance,
                run_config={
                    "ops": {
                        "extracted_properties": {
                            "config": {"extractors": ["message_count", f"{__name__}:user_mood"]}
                        },
                        "base_clusters": {"config": {"conversations_per_cluster": 4}},
                    }
                },
                resources={
                    **storage_resources(data_dir),
                    "privacy": PrivacyPolicy(),
                    "registry": DatasetRegistry(path=str(dataset_dir / "datasets.yaml")),
                    "llm": llm,
                    "embedder": EmbedderResource(),
                },
            )
        assert result.success

        # Counted at each endpoint: summaries and the extractor went to the cheap one (40 each),
        # cluster names to the strong one, with the model each client names.
        cheap_models = [body["model"] for body in cheap.stats.bodies("chat")]
        strong_models = {body["model"] for body in strong.stats.bodies("chat")}
        # ... and the summary client's facet calibration (once per model and prompt version).
        assert len(cheap_models) == 80 + len(CALIBRATION_CASES) and set(cheap_models) == {"cheap-model"}
        assert cheap.stats.max_in_flight <= 3
        assert strong_models == {"strong-model"}

        summaries = _metadata(result, "conversation_summaries")
        assert summaries["llm_calls"] == 40 + len(CALIBRATION_CASES)
        assert summaries["llm_cost_usd"] == pytest.approx(
            (summaries["llm_input_tokens"] * 0.15 + summaries["llm_output_tokens"] * 0.6) / 1e6, abs=1e-6
        )
        naming = _metadata(result, "base_clusters")
        assert naming["llm_calls"] == strong.stats.count("chat") > 0
        assert naming["llm_cost_usd"] == pytest.approx(
            (naming["llm_input_tokens"] * 2.5 + naming["llm_output_tokens"] * 10.0) / 1e6, abs=1e-6
        )
        # The extractor stage reports each client it was given, and the total.
        properties = _metadata(result, "extracted_properties")
        per_client = properties["llm_clients"]
        assert per_client["cheap"]["llm_calls"] == 40 and per_client["default"]["llm_calls"] == 0
        assert properties["llm_calls"] == 40
        assert "sk-cheap-not-a-real-key" not in json.dumps(
            {asset: _metadata(result, asset) for asset in ("conversation_summaries", "extracted_properties")},
            default=str,
        )


def test_an_unknown_client_name_or_a_missing_key_is_a_clear_error(tmp_path: Path):
    llm = LLMResource(
        backend="openai",
        clients={"other": NamedLLMClient(model="m", api_key_env="KURA_TEST_UNSET_KEY")},
        cache_path="",
    )
    with pytest.raises(ValueError, match="no LLM client named 'missing': the clients are default, other"):
        llm.client("missing")
    with pytest.raises(ValueError, match="KURA_TEST_UNSET_KEY is not set"):
        llm.client("other")


def test_clients_file_is_read_and_checked(tmp_path: Path):
    good = tmp_path / "clients.yaml"
    good.write_text(
        "clients:\n  cheap: {model: gpt-4o-mini, tokens_per_minute: 200000}\nsummary_client: cheap\n",
        encoding="utf-8",
    )
    values = clients_from_file(good)
    assert values["summary_client"] == "cheap"
    assert values["clients"]["cheap"].tokens_per_minute == 200000
    llm = LLMResource(backend="openai", cache_path="", **values)
    assert llm.client("cheap").settings.model == "gpt-4o-mini"

    bad = tmp_path / "bad.yaml"
    bad.write_text("clients: {}\ncluster_client: strong\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cluster_client 'strong' is none of the clients"):
        clients_from_file(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("client: {}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown keys \['client'\]"):
        clients_from_file(typo)


def test_a_limit_left_unset_means_the_same_in_dagster_config_and_in_the_engine():
    """The limit fields are declared once for every Dagster client (`LLMClientLimits`); the
    Dagster-free engine's `LLMSettings` must take each of them with the same default, or a user of
    the notebook API and a user of the Dagster UI would get different limits from the same file."""
    import dataclasses

    from kura_pipeline.core.llm import LLMSettings
    from kura_pipeline.resources.llm import LIMIT_FIELDS, LLMClientLimits

    engine = {field.name: field.default for field in dataclasses.fields(LLMSettings)}
    for name in LIMIT_FIELDS:
        assert name in engine, f"LLMSettings does not take {name}"
        assert LLMClientLimits.model_fields[name].default == engine[name], name
