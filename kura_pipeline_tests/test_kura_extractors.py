"""Kura's extractor contract (issue #14): `extractor(conversation, sems, clients)` gets instructor-style
clients that go through the project's limits, retries and cache, and asyncio semaphores; the
project's keyword style keeps working; a registry dataset may name its extractors. Against the real
loopback server on 127.0.0.1, nothing patched."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import instructor
import openai
import polars as pl
import pytest
from dagster import instance_for_test, materialize
from pydantic import BaseModel

from kura_pipeline.assets.extracted_properties import extracted_properties
from kura_pipeline.assets.raw_conversations import raw_conversations
from kura_pipeline.core.extract import (
    ExtractorError,
    KuraClient,
    call_style,
    extract_properties,
    load_extractor,
)
from kura_pipeline.core.llm import LLMClient, LLMSettings, run_llm
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.models import Conversation, ExtractedProperty
from kura_pipeline.core.registry import read_registry_entries
from kura_pipeline.notebook import Kura, SummaryModel
from kura_pipeline.resources.io_manager import ParquetIOManager, StageReader
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.registry import DatasetRegistry
from kura_pipeline_tests.support.llm_fixtures import (
    jsonl_entry,
    loopback_settings,
    question_and_answer,
    write_jsonl,
    write_registry,
)
from kura_pipeline_tests.support.loopback import LoopbackServer


class Topic(BaseModel):
    topic: str


def conversations(count: int) -> list[Conversation]:
    questions = [f"How do I reverse list number {index} in Python?" for index in range(count)]
    return question_and_answer(
        questions, answer="Use reversed(items) or items[::-1].", tag="c", created_at=None
    )


# ----- extractors as users write them (module level: the registry imports them by name) -----


async def kura_topic(conversation: Conversation, sems: dict[str, Any], clients: dict[str, Any]):
    """Kura's documented shape: the semaphore held around the client call, positional names."""
    sem = sems.get("default")
    client = clients.get("default")
    async with sem:
        resp = await client.chat.completions.create(
            model="gemini-2.0-flash",
            messages=[{"role": "user", "content": conversation.messages[0].content}],
            response_model=Topic,
        )
    return ExtractedProperty(name="topic", value=resp.topic)


async def kura_client_kind(conversation: Conversation, sems: dict[str, Any], clients: dict[str, Any]):
    assert isinstance(sems["default"], asyncio.Semaphore)
    return ExtractedProperty(name="is_async_openai", value=isinstance(clients["default"], openai.AsyncOpenAI))


def keyword_style(conversation: Conversation, *, clients: dict[str, LLMClient], semaphores: dict[str, Any]):
    return ExtractedProperty(name="keyword_clients", value=",".join(sorted(clients)))


def clients_only(conversation: Conversation, clients: dict[str, LLMClient]):
    return ExtractedProperty(name="clients_only", value=len(clients))


def conversation_only(conversation: Conversation):
    return [ExtractedProperty(name="first_word", value=conversation.messages[0].content.split()[0])]


def settings(server: LoopbackServer, **overrides: Any) -> LLMSettings:
    """Two calls at a time, two attempts."""
    return loopback_settings(server, **({"max_concurrency": 2, "max_attempts": 2} | overrides))


def extract(convs: list[Conversation], extractors: dict[str, Any], clients: dict[str, LLMClient]) -> Any:
    return run_llm(extract_properties(convs, extractors, clients=clients), *clients.values())


def test_call_styles_are_read_from_the_signature():
    assert call_style(kura_topic) == "kura"
    assert call_style(lambda c, s, k: None) == "kura"  # positional, whatever the names
    assert call_style(keyword_style) == "keyword"
    assert call_style(clients_only) == "keyword"
    assert call_style(load_extractor("message_count")) == "keyword"
    assert call_style(conversation_only) == "plain"


def test_kura_extractor_goes_through_the_projects_client_and_its_cache(
    server: LoopbackServer, tmp_path: Path
):
    cache = ResponseCache(tmp_path / "cache.sqlite3")
    client = LLMClient(settings(server), cache=cache)
    run = extract(conversations(5), {"kura_topic": kura_topic}, {"default": client})

    assert run.failures == []
    topics = {chat: p.value for chat, p in run.rows if p.name == "topic"}
    assert sorted(topics) == [f"c-{i}" for i in range(5)] and all(topics.values())
    assert client.stats.calls == 5 and server.stats.count("chat") == 5
    # The model asked for is Gemini's; the client's own model is what the endpoint is asked for.
    assert {body["model"] for body in server.stats.bodies("chat")} == {"loopback"}
    assert server.stats.max_in_flight <= 2

    # Same calls again, a new client object: answered from the project's cache, nothing sent.
    again = LLMClient(settings(server), cache=cache)
    rerun = extract(conversations(5), {"kura_topic": kura_topic}, {"default": again})
    assert {chat: p.value for chat, p in rerun.rows if p.name == "topic"} == topics
    assert again.stats.cache_hits == 5 and server.stats.count("chat") == 5


def test_holding_kuras_semaphore_around_the_call_does_not_deadlock(server: LoopbackServer):
    # One request at a time: `sems["default"]` must not be the semaphore `complete` takes.
    client = LLMClient(settings(server, max_concurrency=1))

    async def bounded() -> Any:
        return await asyncio.wait_for(
            extract_properties(conversations(3), {"kura_topic": kura_topic}, clients={"default": client}), 20
        )

    run = run_llm(bounded(), client)
    assert run.failures == [] and sum(p.name == "topic" for _, p in run.rows) == 3
    assert server.stats.max_in_flight == 1


def test_kura_clients_are_async_openai_and_sems_are_semaphores(server: LoopbackServer):
    client = LLMClient(settings(server))
    run = extract(conversations(1), {"kind": kura_client_kind}, {"default": client})
    assert run.failures == []
    assert [p.value for _, p in run.rows if p.name == "is_async_openai"] == [True]


async def kura_plain_reply(conversation: Conversation, sems: dict[str, Any], clients: dict[str, Any]):
    """No response_model: a plain chat completion, still under the client's semaphore."""
    reply = await clients["default"].chat.completions.create(
        model="any", messages=[{"role": "user", "content": conversation.messages[0].content}]
    )
    return ExtractedProperty(name="reply_model", value=reply.model)


def test_a_plain_completion_reaches_the_clients_endpoint_with_its_model(server: LoopbackServer):
    client = LLMClient(settings(server))
    run = extract(conversations(2), {"plain": kura_plain_reply}, {"default": client})
    assert run.failures == []
    assert server.stats.count("chat") == 2
    assert {body["model"] for body in server.stats.bodies("chat")} == {"loopback"}


def test_a_failed_call_is_a_reported_extractor_failure(server: LoopbackServer):
    client = LLMClient(settings(server, max_attempts=1, max_failure_share=1.0))
    server.faults.push("500", "500")
    run = extract(conversations(2), {"kura_topic": kura_topic}, {"default": client})
    assert len(run.failures) == 2
    assert all("ExtractorLLMError" in f and "HTTP 500" in f for f in run.failures)


def test_the_projects_styles_keep_working(server: LoopbackServer):
    client = LLMClient(settings(server))
    run = extract(
        conversations(2),
        {"keyword": keyword_style, "clients_only": clients_only, "plain": conversation_only},
        {"default": client},
    )
    assert run.failures == []
    values = {(chat, p.name): p.value for chat, p in run.rows}
    assert values[("c-0", "keyword_clients")] == "default"
    assert values[("c-1", "clients_only")] == 1
    assert values[("c-0", "first_word")] == "How"


def test_offline_a_kura_extractor_fails_with_a_clear_reason():
    run = asyncio.run(extract_properties(conversations(1), {"kura_topic": kura_topic}, clients={}))
    assert run.failures == [
        "kura_topic on c-0: ExtractorError: no LLM client 'default': the LLM backend is offline (no clients)"
    ]


def test_an_extractor_that_cannot_be_imported_is_one_line_naming_it():
    with pytest.raises(ExtractorError) as error:
        load_extractor("no_such_package.sub:fn")
    assert str(error.value) == (
        "cannot import extractor 'no_such_package.sub:fn': "
        "ModuleNotFoundError: No module named 'no_such_package'"
    )
    with pytest.raises(ExtractorError, match="'json:no_such_function'"):
        load_extractor("json:no_such_function")
    assert load_extractor(f"{__name__}:kura_topic") is kura_topic


def _registry(tmp_path: Path, extractors: list[str]) -> Path:
    write_jsonl(conversations(3), tmp_path / "chats.jsonl")
    return write_registry(
        tmp_path,
        {
            "chats": jsonl_entry("chats.jsonl", extractors=extractors),
            "bad": jsonl_entry("chats.jsonl", extractors=["not a ref"]),
        },
    )


def test_the_registry_reads_extractors_and_a_bad_entry_blocks_only_itself(tmp_path: Path):
    datasets, problems = read_registry_entries(_registry(tmp_path, [f"{__name__}:conversation_only"]))
    assert datasets["chats"].extractors == [f"{__name__}:conversation_only"]
    assert list(problems) == ["bad"] and "'not a ref'" in problems["bad"]


def _materialize(tmp_path: Path, registry: Path) -> Any:
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["chats"])
        return materialize(
            [raw_conversations, extracted_properties],
            partition_key="chats",
            instance=instance,
            resources={
                "io_manager": ParquetIOManager(base_path=str(tmp_path / "data")),
                "stages": StageReader(base_path=str(tmp_path / "data")),
                "registry": DatasetRegistry(path=str(registry)),
                "llm": LLMResource(),
            },
            raise_on_error=False,
        )


def test_the_extracted_properties_stage_runs_the_datasets_own_extractors(tmp_path: Path):
    result = _materialize(tmp_path, _registry(tmp_path, [f"{__name__}:conversation_only"]))
    assert result.success
    frame = pl.read_parquet(tmp_path / "data" / "extracted_properties" / "chats.parquet")
    assert frame.filter(pl.col("name") == "first_word")["value"].to_list() == ["How"] * 3
    assert set(frame["name"]) >= {"message_count", "first_word"}  # the configured ones still run


def test_an_unimportable_registry_extractor_fails_the_stage_in_one_line(tmp_path: Path):
    result = _materialize(tmp_path, _registry(tmp_path, ["no_such_package.sub:fn"]))
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert description == (
        "dataset 'chats': cannot import extractor 'no_such_package.sub:fn': "
        "ModuleNotFoundError: No module named 'no_such_package'"
    )


# ----- the notebook API's client mapping (no run) -----


def test_kura_style_clients_become_the_projects_llm_resource(
    server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("KURA_NOTEBOOK_OPENAI_API_KEY", "")  # the key goes here; removed after the test
    model = SummaryModel(
        clients={
            "default": instructor.from_openai(openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-d")),
            "openai": openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-o"),
        },
        concurrent_requests={"openai": 100, "default": 7},
        model="loopback",
    )
    llm = model.llm_resource(LLMResource(), str(tmp_path / "cache.sqlite3"))
    assert (llm.backend, llm.base_url.rstrip("/"), llm.api_key, llm.model) == (
        "openai",
        server.base_url,
        "sk-d",
        "loopback",
    )
    assert llm.mode == "tools"  # instructor.from_openai's default mode, as Kura sends it
    assert llm.max_concurrency == 7 and llm.clients["openai"].max_concurrency == 100
    assert llm.client("openai").settings.api_key == "sk-o"
    assert isinstance(KuraClient(llm.client("openai")), openai.AsyncOpenAI)


def test_a_client_that_cannot_be_routed_and_kura_arguments_without_equivalent_are_named():
    class GenaiLike:
        client = object()

    with pytest.raises(TypeError, match="client 'default': a .*GenaiLike cannot be routed"):
        SummaryModel(clients={"default": GenaiLike()}).llm_resource(LLMResource(), "")
    with pytest.raises(TypeError, match="'embedding_model' is not supported here: set KURA_EMBEDDINGS_MODEL"):
        Kura(embedding_model="text-embedding-3-small")
    with pytest.raises(ValueError, match="concurrent_requests names clients that are not given: openai"):
        SummaryModel(concurrent_requests={"openai": 3})


def test_importing_the_package_and_its_notebook_api_does_not_load_dagster():
    code = (
        "import sys\n"
        "from kura_pipeline import Conversation, ExtractedProperty, Kura, SummaryModel\n"
        "print(sorted(m for m in ('dagster', 'polars', 'openai') if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


# ----- the notebook API end to end, offline -----


def _one_persons_export(path: Path) -> Path:
    """A Claude export as one person downloads it: every conversation from the same account."""
    from kura_pipeline_tests.conftest import ANSWERS, TOPICS

    records = []
    for t, (topic, requests) in enumerate(TOPICS.items()):
        for i, request in enumerate(requests[:6]):
            when = f"2026-01-{t + 1:02d}T{i + 8:02d}:00:00Z"
            records.append(
                {
                    "uuid": f"{topic}-{i}",
                    "created_at": when,
                    "account": {"uuid": "the-one-account"},
                    "chat_messages": [
                        {
                            "sender": "human",
                            "created_at": when,
                            "content": [{"type": "text", "text": request}],
                        },
                        {"sender": "assistant", "created_at": when, "text": ANSWERS[topic]},
                    ],
                }
            )
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.mark.slow
def test_one_persons_export_is_withheld_unless_the_policy_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from kura_pipeline.resources.privacy import PrivacyPolicy

    for variable in ("KURA_LLM_BASE_URL", "KURA_LLM_MODEL", "KURA_LLM_LOCAL_MODEL", "KURA_LLM_CLIENTS"):
        monkeypatch.delenv(variable, raising=False)  # offline: the default with nothing configured
    conversations = Conversation.from_claude_conversation_dump(_one_persons_export(tmp_path / "c.json"))
    assert {c.metadata["user_id"] for c in conversations} == {"the-one-account"}

    kura = Kura(max_clusters=5, checkpoint_dir=tmp_path / "checkpoints", summarisation_model=SummaryModel())
    clusters = asyncio.run(kura.cluster_conversations(conversations))
    kura.visualise_clusters()
    printed = capsys.readouterr().out
    assert clusters and printed.startswith("Clusters (30 conversations)\n")
    assert "30 of 30 conversations are in them" in printed  # one user: every cluster withheld

    mine = Kura(
        max_clusters=5,
        checkpoint_dir=tmp_path / "checkpoints",
        override_checkpoint_dir=True,
        privacy=PrivacyPolicy(min_cluster_users=1),
    )
    asyncio.run(mine.cluster_conversations(conversations))
    mine.visualise_clusters()
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("╠══ ", "╚══ "))]
    assert shown and not all(line.startswith("╚══ (") for line in shown)
    assert mine.explorer_path is not None and mine.explorer_path.read_text(encoding="utf-8").startswith("<!")
