"""A run you can trust (issue #13): a stage whose LLM calls failed fails, loudly; a refused key
stops at once; a silent endpoint ends in bounded time; bad settings stop with one line; identical
requests in flight are paid once. Against the real loopback server on 127.0.0.1, nothing patched.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kura_pipeline.core.llm import (
    STAGE_DEADLINE_PASSED,
    LLMClient,
    LLMFailure,
    LLMSettings,
    LLMStageFailed,
    run_llm,
)
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.models import Conversation
from kura_pipeline.core.prompts import SUMMARY_PROMPT, SummaryResponse
from kura_pipeline.core.summarise import summarise_all_with_llm
from kura_pipeline.definitions import SettingError, build_resources
from kura_pipeline.resources.llm import LLMResource, NamedLLMClient, clients_from_file
from kura_pipeline_tests.support.llm_fixtures import (
    kura_pipeline,
    loopback_env,
    loopback_settings,
    question_and_answer,
)

CHAR_BUDGET = 4000
KEY_REFUSED = "the endpoint refused the key (HTTP 401)"


def conversations(count: int, same_text: bool = False) -> list[Conversation]:
    questions = [f"How do I sort {'a list' if same_text else index} in Python?" for index in range(count)]
    return question_and_answer(questions, answer="Use sorted(numbers).", tag="t")


def summarise_stage(client: LLMClient, count: int, same_text: bool = False) -> Any:
    """The summaries stage as the LLM backend runs it: one gather inside `run_llm`."""
    return run_llm(summarise_all_with_llm(conversations(count, same_text), client, CHAR_BUDGET), client)


# ----- 1. fail loudly -----


def test_a_stage_whose_calls_all_failed_fails_naming_the_stage_the_count_and_the_reason(server):
    server.faults.set(error_500_every=1)
    client = LLMClient(loopback_settings(server, max_attempts=2))
    with pytest.raises(LLMStageFailed) as failed:
        summarise_stage(client, 6)
    assert str(failed.value) == "summaries: 6 of 6 LLM calls failed (first: HTTP 500 from the LLM endpoint)"
    assert server.stats.count("chat", "500") == 12  # 500s are still retried


def test_a_stage_fails_above_the_failure_share_and_not_below_it(server):
    # One at a time, so the scripted outcomes meet the calls in order: 6 of 10 fail.
    server.faults.push(*["500"] * 6)
    with pytest.raises(LLMStageFailed, match=r"^summaries: 6 of \d+ LLM calls failed"):
        summarise_stage(LLMClient(loopback_settings(server, max_attempts=1, max_concurrency=1)), 10)

    server.reset(faults=True)
    server.faults.push(*["500"] * 6)
    run = summarise_stage(
        LLMClient(loopback_settings(server, max_attempts=1, max_concurrency=1, max_failure_share=0.7)), 10
    )
    assert len(run.failures) == 6 and len(run.summaries) == 4  # at or below the share: kept going


def test_once_the_share_is_certainly_passed_the_rest_of_the_stage_is_not_sent(server):
    server.faults.set(error_500_every=1)
    client = LLMClient(loopback_settings(server, max_attempts=1, max_concurrency=1))
    with pytest.raises(LLMStageFailed) as failed:
        summarise_stage(client, 40)
    # 21 failures settle it; at most the calls already in the window (4) are sent after that.
    sent = server.stats.count("chat")
    assert 21 <= sent <= 25
    assert str(failed.value).startswith(
        f"summaries: {sent} of {sent} LLM calls failed, {40 - sent} more not sent"
    )


def test_a_401_stops_the_client_at_once_and_fails_the_stage(server):
    server.faults.push("401")  # only the first reply refuses: nothing after it may be sent
    client = LLMClient(loopback_settings(server, max_concurrency=1))
    with pytest.raises(LLMStageFailed) as failed:
        summarise_stage(client, 20)
    assert str(failed.value) == f"summaries: 20 of 20 LLM calls failed (first: {KEY_REFUSED})"
    assert server.stats.count("chat") == 1 and client.stats.retries == 0
    assert client.stats.failure_reasons == {KEY_REFUSED: 20}


def test_a_403_is_a_refused_key_too_and_new_requests_fail_without_a_call(server):
    server.faults.push("403")
    client = LLMClient(loopback_settings(server, max_concurrency=1))
    with pytest.raises(LLMStageFailed, match=r"refused the key \(HTTP 403\)"):
        summarise_stage(client, 3)
    again = asyncio.run(
        client.complete(SUMMARY_PROMPT, SUMMARY_PROMPT.messages(transcript="another"), SummaryResponse)
    )
    assert isinstance(again, LLMFailure) and again.reason == "the endpoint refused the key (HTTP 403)"
    assert server.stats.count("chat") == 1


def test_llm_work_outside_gather_is_checked_by_run_llm(server):
    """Extractors call `complete` themselves: `run_llm` checks what the client's calls ended as."""
    server.faults.set(error_500_every=1)
    client = LLMClient(loopback_settings(server, name="cheap", max_attempts=1))

    async def extractor_like() -> list[Any]:
        messages = [SUMMARY_PROMPT.messages(transcript=f"text {i}") for i in range(4)]
        return list(
            await asyncio.gather(*(client.complete(SUMMARY_PROMPT, m, SummaryResponse) for m in messages))
        )

    with pytest.raises(LLMStageFailed) as failed:
        run_llm(extractor_like(), client)
    assert str(failed.value) == (
        "LLM client 'cheap': 4 of 4 LLM calls failed (first: HTTP 500 from the LLM endpoint)"
    )


@pytest.mark.slow
def test_kura_pipeline_run_exits_non_zero_with_the_steps_message_on_a_refused_key(server, dataset_dir):
    server.faults.push(*["401"] * 40)  # a bad key: every request that reaches the endpoint
    result = kura_pipeline(dataset_dir, "run", "topics", timeout=600, **loopback_env(server))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Every stage" not in result.stdout
    step = "'topics': conversation_summaries failed:"
    failure = [line for line in result.stderr.splitlines() if line.startswith(step)]
    assert failure == [
        f"{step} summaries: 40 of 40 LLM calls failed (first: {KEY_REFUSED})"
    ], result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "'topics' failed (the lines above say why)"
    # Only the requests already in flight (the default concurrency, 8) reached the endpoint.
    assert 1 <= server.stats.count("chat") <= 8


# ----- 2. timeouts a user controls -----


def test_a_silent_endpoint_fails_the_stage_after_two_read_timeouts_per_call(server):
    server.faults.set(timeout_every=1, hang_seconds=60.0)  # accepts, reads, never answers
    client = LLMClient(loopback_settings(server, read_timeout_seconds=0.5, max_attempts=4))
    started = time.monotonic()
    with pytest.raises(
        LLMStageFailed, match=r"^summaries: 4 of 4 LLM calls failed \(first: the LLM request timed out\)"
    ):
        summarise_stage(client, 4)
    took = time.monotonic() - started
    # Each call waited two read timeouts (a timeout is retried once, not max_attempts times).
    assert server.stats.count("chat") == 8
    assert 1.0 <= took < 6.0, took


def test_the_defaults_end_a_silent_endpoint_well_under_four_minutes():
    """With the defaults, one wave of calls against an endpoint that never answers ends within
    two read timeouts and the backoff between them (the test above runs it with short timeouts)."""
    defaults = LLMSettings(model="m")
    worst = defaults.max_timeout_attempts * (
        defaults.read_timeout + defaults.connect_timeout_seconds * 0
    ) + sum(
        min(defaults.max_backoff_seconds, defaults.backoff_seconds * 2**i)
        for i in range(defaults.max_timeout_attempts - 1)
    )
    assert (defaults.connect_timeout_seconds, defaults.read_timeout) == (10.0, 60.0)
    assert worst < 4 * 60 and worst == 121.0
    # The local llama.cpp server gets a longer read timeout (a CPU model can take minutes).
    assert LLMResource(backend="local")._read_timeout() == 600.0
    assert LLMResource(backend="openai")._read_timeout() == 60.0
    assert LLMResource(backend="local", timeout_seconds=900)._read_timeout() == 900.0


def test_after_the_stage_deadline_the_remaining_calls_fail_with_a_reason(server):
    server.faults.set(timeout_every=1, hang_seconds=60.0)
    client = LLMClient(loopback_settings(server, read_timeout_seconds=30.0, stage_deadline_seconds=1.0))
    started = time.monotonic()
    with pytest.raises(
        LLMStageFailed, match=rf"^summaries: .* LLM calls failed.*\(first: {STAGE_DEADLINE_PASSED}\)"
    ):
        summarise_stage(client, 12)
    assert time.monotonic() - started < 5.0
    assert server.stats.count("chat") == 4  # the ones in flight; the queued ones were never sent


def test_connect_and_read_timeouts_reach_the_http_client(server):
    client = LLMClient(loopback_settings(server, connect_timeout_seconds=3.0, read_timeout_seconds=7.0))

    async def built() -> Any:
        client._ensure_loop_state()
        timeout = client._raw.timeout  # type: ignore[union-attr]
        await client.aclose()
        return timeout

    assert tuple(asyncio.run(built())) == (3.0, 7.0, 7.0, 7.0)


# ----- 3. settings checked on load -----


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "KURA_LLM_MAX_CONCURRENCY",
            "0",
            "KURA_LLM_MAX_CONCURRENCY=0 is out of range: it must be an integer >= 1",
        ),
        ("KURA_LLM_MAX_CONCURRENCY", "abc", "KURA_LLM_MAX_CONCURRENCY='abc' is not an integer"),
        ("KURA_LLM_REQUESTS_PER_MINUTE", "0", "it must be an integer >= 1"),
        ("KURA_LLM_TOKENS_PER_MINUTE", "-5", "it must be an integer >= 1"),
        ("KURA_LLM_INPUT_PRICE", "-0.1", "it must be a number >= 0"),
        ("KURA_LLM_OUTPUT_PRICE", "free", "is not a number"),
        ("KURA_LLM_CONNECT_TIMEOUT", "0", "it must be a number > 0"),
        ("KURA_LLM_READ_TIMEOUT", "nan", "it must be a number > 0"),
        ("KURA_LLM_STAGE_DEADLINE", "-1", "it must be a number > 0"),
        ("KURA_LLM_MAX_FAILURE_SHARE", "0", "it must be a number in (0, 1]"),
        ("KURA_LLM_MAX_FAILURE_SHARE", "1.5", "it must be a number in (0, 1]"),
    ],
)
def test_each_bad_number_is_one_line_naming_the_variable_and_its_range(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingError) as error:
        build_resources()
    assert message in str(error.value) and str(error.value).startswith(variable)
    assert "\n" not in str(error.value)


def test_good_numbers_from_the_environment_reach_the_client(monkeypatch):
    for variable, value in {
        "KURA_LLM_BASE_URL": "http://127.0.0.1:9/v1",
        "KURA_LLM_MAX_CONCURRENCY": "3",
        "KURA_LLM_CONNECT_TIMEOUT": "2.5",
        "KURA_LLM_READ_TIMEOUT": "45",
        "KURA_LLM_STAGE_DEADLINE": "600",
        "KURA_LLM_MAX_FAILURE_SHARE": "1",
    }.items():
        monkeypatch.setenv(variable, value)
    llm = build_resources()["llm"]
    assert isinstance(llm, LLMResource)
    settings = llm.client().settings
    assert (settings.max_concurrency, settings.connect_timeout_seconds, settings.read_timeout) == (
        3,
        2.5,
        45.0,
    )
    assert (settings.stage_deadline_seconds, settings.max_failure_share) == (600.0, 1.0)


def test_the_config_classes_and_the_engine_check_their_numbers_too(tmp_path):
    with pytest.raises(ValueError, match=r"max_concurrency=0 is out of range: it must be >= 1"):
        LLMResource(backend="openai", max_concurrency=0)
    with pytest.raises(ValueError, match=r"read_timeout_seconds=0.0 is out of range: it must be > 0"):
        NamedLLMClient(model="m", read_timeout_seconds=0)
    with pytest.raises(ValueError, match=r"max_concurrency=0 is out of range"):
        LLMSettings(model="m", max_concurrency=0)  # a semaphore of 0 would wait forever
    clients = tmp_path / "clients.yaml"
    clients.write_text("clients:\n  cheap: {model: m, tokens_per_minute: 0}\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        clients_from_file(clients)
    assert "client 'cheap'" in str(error.value) and "tokens_per_minute=0" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", ["0", "abc"])
def test_kura_pipeline_run_with_a_bad_number_prints_one_line_and_exits_2(tmp_path, value):
    result = kura_pipeline(tmp_path, "run", "demo", KURA_LLM_MAX_CONCURRENCY=value)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"kura-pipeline: KURA_LLM_MAX_CONCURRENCY={value if value == '0' else repr(value)} "
        + ("is out of range" if value == "0" else "is not an integer")
        + ": it must be an integer >= 1"
    ]


@pytest.mark.parametrize(
    "value", ["not a url", "localhost:8080/v1", "ftp://x", "http://", "http://:8080/v1", "http://h:99999/v1"]
)
def test_a_base_url_that_is_not_an_http_url_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("KURA_LLM_BASE_URL", value)
    with pytest.raises(SettingError) as error:
        build_resources()
    assert (
        str(error.value)
        == f"KURA_LLM_BASE_URL={value!r} is not an http(s) URL (like http://127.0.0.1:8080/v1)"
    )


@pytest.mark.parametrize(
    "value", ["http://127.0.0.1:8080/v1", "https://api.example.com/v1/", "http://[::1]:9/v1"]
)
def test_an_http_base_url_reaches_the_client(monkeypatch, value):
    monkeypatch.setenv("KURA_LLM_BASE_URL", value)
    llm = build_resources()["llm"]
    assert isinstance(llm, LLMResource) and llm.backend == "openai"
    assert llm.client().settings.base_url == value


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KURA_LLM_READ_TIMEOUT", "inf"),
        ("KURA_LLM_CONNECT_TIMEOUT", "Infinity"),
        ("KURA_LLM_STAGE_DEADLINE", "inf"),
    ],
)
def test_an_endless_timeout_is_not_a_finite_number(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingError) as error:
        build_resources()
    assert str(error.value) == f"{variable}={value!r} is not a finite number: it must be a number > 0"


def test_a_named_clients_base_url_and_an_endless_timeout_are_checked_too(monkeypatch, tmp_path):
    clients = tmp_path / "clients.yaml"
    clients.write_text("clients:\n  cheap: {model: m, base_url: 'localhost:8080/v1'}\n", encoding="utf-8")
    monkeypatch.setenv("KURA_LLM_CLIENTS", str(clients))
    with pytest.raises(SettingError) as error:
        build_resources()
    assert str(error.value) == (
        f"KURA_LLM_CLIENTS={clients}: client 'cheap': base_url='localhost:8080/v1' is not an http(s) URL "
        "(like http://127.0.0.1:8080/v1)"
    )
    with pytest.raises(ValueError, match=r"base_url='not a url' is not an http\(s\) URL"):
        LLMSettings(model="m", base_url="not a url")
    with pytest.raises(ValueError, match=r"read_timeout_seconds=inf is out of range: it must be > 0"):
        NamedLLMClient(model="m", read_timeout_seconds=float("inf"))
    with pytest.raises(ValueError, match=r"connect_timeout_seconds=inf is out of range"):
        LLMSettings(model="m", connect_timeout_seconds=float("inf"))


def test_kura_pipeline_run_with_a_bad_base_url_prints_one_line_and_exits_2(tmp_path):
    result = kura_pipeline(tmp_path, "run", "demo", KURA_LLM_BASE_URL="not a url")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "kura-pipeline: KURA_LLM_BASE_URL='not a url' is not an http(s) URL (like http://127.0.0.1:8080/v1)"
    ]


# ----- 4. single flight -----


def test_identical_requests_in_flight_are_paid_once(server, tmp_path):
    server.faults.set(latency=0.3)  # long enough for every copy to arrive while the first flies
    # The cache answers copies that start after the first answer came back; single flight the
    # ones that start while it is on its way (without it: 40 calls, the cache still empty).
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        client = LLMClient(loopback_settings(server, max_concurrency=8), cache=cache)
        run = summarise_stage(client, 40, same_text=True)
    assert len(run.summaries) == 40 and not run.failures
    assert server.stats.count("chat") == 1
    assert client.stats.calls == 1 and client.stats.cache_hits == 39
    assert len({summary.summary for summary in run.summaries}) == 1
