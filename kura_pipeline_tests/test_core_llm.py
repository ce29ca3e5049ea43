"""The LLM engine against a real loopback OpenAI-compatible server on 127.0.0.1.

Nothing in the client is patched: faults are injected by the server, and what the engine did is
read from the server's own counts (requests, outcomes, bodies, in-flight maximum, times).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, field_validator

from kura_pipeline.core.llm import (
    MAX_PACING_SECONDS,
    LLMClient,
    LLMSettings,
    describe,
    estimate_tokens,
    parse_retry_after,
    response_schema_text,
)
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.models import Conversation
from kura_pipeline.core.prompts import SUMMARY_PROMPT, Prompt, SummaryResponse
from kura_pipeline.core.summarise import summarise_all_with_llm
from kura_pipeline_tests.support.llm_fixtures import loopback_settings, question_and_answer, summarise_command
from kura_pipeline_tests.support.loopback import LoopbackServer

CHAR_BUDGET = 4000
# Every reason the engine gives for the faults the loopback server injects.
FAULT_REASONS = (
    "HTTP 429 from the LLM endpoint",
    "HTTP 500 from the LLM endpoint",
    "the reply did not validate",  # a truncated reply is not valid JSON
    "the LLM request timed out",
)


def make_conversations(count: int, tag: str = "c") -> list[Conversation]:
    """Distinct conversations (distinct text, so distinct cache keys and request bodies)."""
    questions = [f"[{tag} {index}] How do I sort a list of {index} numbers?" for index in range(count)]
    return question_and_answer(questions, answer="Use sorted(numbers), or numbers.sort() in place.", tag=tag)


def fast_settings(server: LoopbackServer, **overrides: Any) -> LLMSettings:
    """Short timeouts and backoff, so fault drills take seconds; eight calls at a time."""
    return loopback_settings(server, **({"max_concurrency": 8} | overrides))


def summarise(conversations: list[Conversation], client: LLMClient):
    return asyncio.run(summarise_all_with_llm(conversations, client, CHAR_BUDGET))


def one_call(client: LLMClient, text: str, response_model: type[BaseModel] = SummaryResponse) -> Any:
    messages = SUMMARY_PROMPT.messages(transcript=text)
    return asyncio.run(client.complete(SUMMARY_PROMPT, messages, response_model))


def request_times(server: LoopbackServer) -> list[float]:
    """When each request reached the server (its own clock), in order."""
    return sorted(entry["time"] for entry in server.stats.log() if entry["endpoint"] == "chat")


# ----- 1. every conversation ends summarised or failed with a reason -----


def test_under_mixed_faults_every_conversation_is_summarised_or_failed_with_a_reason(server):
    server.faults.set(
        latency=0.05,
        rate_limit_every=4,
        retry_after=0.2,
        error_500_every=5,
        truncated_every=7,
        timeout_every=9,
        hang_seconds=8.0,
    )
    conversations = make_conversations(30)
    # A timeout well above an ordinary reply's time even on two busy cores, well below a hang.
    client = LLMClient(fast_settings(server, max_concurrency=6, read_timeout_seconds=4.0))
    run = summarise(conversations, client)

    summarised = {s.chat_id for s in run.summaries}
    assert summarised | set(run.failures) == {c.chat_id for c in conversations}
    assert not summarised & set(run.failures)
    assert all(reason.startswith(FAULT_REASONS) for reason in run.failures.values()), run.failures
    # Counted at the server: every fault kind happened; each "ok" reply became one summary; every
    # other reply was either retried or ended its conversation as a recorded failure.
    outcomes = {o: server.stats.count("chat", o) for o in ("ok", "429", "500", "truncated", "timeout")}
    assert all(outcomes.values()), outcomes
    assert outcomes["ok"] == len(run.summaries)
    assert server.stats.count("chat") == client.stats.calls
    assert server.stats.count("chat") - outcomes["ok"] == client.stats.retries + client.stats.failures
    assert client.stats.failures == len(run.failures)
    assert sum(client.stats.failure_reasons.values()) == len(run.failures)


class StrictAnswer(BaseModel):
    """A response model whose validator rejects every reply (the schema cannot say so)."""

    summary: str

    @field_validator("summary")
    @classmethod
    def never(cls, value: str) -> str:
        raise ValueError("not good enough")


@pytest.mark.parametrize("mode", ["json_schema", "tools", "json", "md_json"])
def test_every_mode_gets_structured_answers_and_retries_bad_ones(server, mode):
    client = LLMClient(fast_settings(server, mode=mode))
    server.faults.push("truncated")
    run = summarise(make_conversations(4, mode), client)
    assert len(run.summaries) == 4 and not run.failures
    assert server.stats.count("chat") == 5 and client.stats.retries == 1
    body = server.stats.bodies("chat")[0]
    shape = {
        "json_schema": body.get("response_format", {}).get("type") == "json_schema",
        "tools": body.get("tool_choice", {}).get("function", {}).get("name") == "SummaryResponse",
        "json": body.get("response_format", {}).get("type") == "json_object",
        "md_json": "```json" in body["messages"][-1]["content"],
    }
    assert shape[mode], body
    if mode == "json_schema":  # the schema sent is the response model's own, whole
        assert body["response_format"]["json_schema"]["schema"] == SummaryResponse.model_json_schema()


# ----- 2. concurrency: never exceeded, actually reached -----


def test_configured_concurrency_is_reached_and_never_exceeded(server):
    server.faults.set(latency=0.3)
    messages: list[str] = []
    client = LLMClient(fast_settings(server, max_concurrency=8), log=messages.append)
    started = time.monotonic()
    run = summarise(make_conversations(40), client)
    elapsed = time.monotonic() - started
    assert len(run.summaries) == 40
    assert server.stats.max_in_flight == 8
    assert server.stats.count("chat") == 40
    assert elapsed < 40 * 0.3 / 2  # waves of eight, far from forty calls in a row (12 s)
    # Progress: every ~5 s and once at the end; this stage is shorter, so the end line only.
    progress = [m for m in messages if m.startswith("summaries:")]
    assert len(progress) == 1 and progress[0].startswith("summaries: 40/40 done")


def test_request_starts_are_spread_so_replies_do_not_come_back_in_waves(server):
    """After the first wave, requests start evenly spaced (the endpoint's latency over the
    slots, here capped at 25 ms), not all together each time a wave of replies lands."""
    server.faults.set(latency=0.2)
    client = LLMClient(fast_settings(server, max_concurrency=6))
    label_all(client, 30)
    starts = request_times(server)
    gaps = sorted(later - earlier for earlier, later in zip(starts[6:], starts[7:], strict=False))
    # Paced 25 ms apart where the engine waits; building and sending a request in between takes
    # a few milliseconds more or less each time, so the server sees some jitter, never a burst.
    assert gaps[0] >= 0.005, gaps
    assert gaps[len(gaps) // 2] >= MAX_PACING_SECONDS - 0.005, gaps
    assert server.stats.max_in_flight == 6  # and the concurrency is still reached


# ----- 3. Retry-After -----


def test_a_429_with_retry_after_pauses_every_request_of_the_client(server):
    """The endpoint's limit is shared: after its 429 says "wait 1 s", no request of this client
    starts before then, not only the one that was refused."""
    server.faults.set(latency=0.05, retry_after=1.0)
    server.faults.push("ok", "429")
    client = LLMClient(fast_settings(server, max_concurrency=2, max_backoff_seconds=0.05))
    label_all(client, 8)
    calls = sorted(server.stats.calls(), key=lambda call: call["start"])
    [refused] = [call for call in calls if call["outcome"] == "429"]
    started_after = [call["start"] for call in calls if call["start"] > refused["end"]]
    assert len(started_after) >= 6  # the retry and the calls not yet started
    # Inside the pause, at most the one request the other slot sent before the 429 reached the
    # client (without the shared pause, that slot would send all six in the second).
    inside_pause = [start for start in started_after if start < refused["end"] + 1.0 - 0.05]
    assert len(inside_pause) <= 1, inside_pause
    assert client.stats.retries == 1 and client.stats.failures == 0


def test_retry_after_is_read_in_each_form_servers_send():
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("1500", "9") == 1.5  # OpenAI's milliseconds win over the seconds
    assert parse_retry_after(None, "2") == 2.0
    assert parse_retry_after(None, "Wed, 25 Nov 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after(None, "Wed, 25 Nov 2026 11:59:00 GMT", now=now) == 0.0  # already past
    assert parse_retry_after(None, "soon") is None and parse_retry_after(None, None) is None


# ----- 4. the cache -----


def test_a_second_run_makes_no_calls(server, tmp_path):
    conversations = make_conversations(12)
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        first = summarise(conversations, LLMClient(fast_settings(server), cache=cache))
        assert server.stats.count("chat") == 12 and len(cache) == 12
        again = LLMClient(fast_settings(server), cache=cache)
        second = summarise(conversations, again)
    assert server.stats.count("chat") == 12
    assert again.stats.calls == 0 and again.stats.cache_hits == 12
    assert [s.model_dump() for s in second.summaries] == [s.model_dump() for s in first.summaries]


# ----- 5. kill -9 mid-stage, restart: no paid call repeats -----


@pytest.mark.slow
def test_a_run_killed_mid_stage_and_restarted_repeats_no_stored_call(tmp_path):
    total, concurrency = 40, 4
    cache_path = tmp_path / "cache.sqlite3"
    with LoopbackServer(latency=0.25) as srv:  # outlives the killed child
        command = summarise_command(srv.base_url, cache_path, total, concurrency)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
            deadline = time.monotonic() + 60
            while srv.stats.count("chat") - srv.stats.in_flight < 15:  # answered by the server
                assert child.poll() is None, child.communicate()
                assert time.monotonic() < deadline, "the child made no progress"
                time.sleep(0.01)
            child.send_signal(signal.SIGKILL)
        assert child.returncode == -signal.SIGKILL
        first_run_calls = srv.stats.count("chat")
        assert first_run_calls < total  # killed mid-stage
        with sqlite3.connect(cache_path) as db:  # what survived the kill
            stored = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        assert stored >= 15 - concurrency

        restart = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
        outcome = json.loads(restart.stdout.strip().splitlines()[-1])
        assert outcome["summarised"] == total and outcome["failed"] == 0
        assert outcome["llm_cache_hits"] == stored
        second_run_calls = srv.stats.count("chat") - first_run_calls
        assert second_run_calls == total - stored  # nothing stored was asked again

        bodies = Counter(json.dumps(b["messages"], sort_keys=True) for b in srv.stats.bodies("chat"))
        repeated = sum(bodies.values()) - len(bodies)
        assert len(bodies) == total
        # Only requests not yet stored at the kill (each held one of the slots) were repeated.
        assert repeated == first_run_calls - stored <= concurrency

        subprocess.run(command, capture_output=True, timeout=120, check=True)
        assert srv.stats.count("chat") == first_run_calls + second_run_calls  # third run: all cached


# ----- 6. requests and tokens per minute -----


class Label(BaseModel):
    label: str


LABEL_PROMPT = Prompt(name="label", version="1", system="Label the text.", user_template="{text}")


def label_messages(count: int) -> list[list[dict[str, str]]]:
    return [LABEL_PROMPT.messages(text=f"text number {i:03d}") for i in range(count)]


def label_all(client: LLMClient, count: int) -> None:
    async def run() -> list[Any]:
        calls = [client.complete(LABEL_PROMPT, m, Label) for m in label_messages(count)]
        return await client.gather(calls, "labels")

    assert all(isinstance(r, Label) for r in asyncio.run(run()))


def assert_within_budget(starts: list[float], costs: list[float], burst: float, per_second: float) -> None:
    """A leaky bucket's promise: what starts within any stretch of time fits the burst plus what
    drained meanwhile (slack: one request, and 50 ms of clock and scheduling)."""
    for first in range(len(starts)):
        for last in range(first, len(starts)):
            spent = sum(costs[first : last + 1])
            allowed = burst + per_second * (starts[last] - starts[first] + 0.05) + max(costs)
            assert spent <= allowed, (first, last, spent, allowed)


def test_requests_per_minute_are_spread_and_never_exceeded(server):
    client = LLMClient(fast_settings(server, requests_per_minute=120))  # two a second
    label_all(client, 9)
    starts = request_times(server)
    assert len(starts) == 9
    assert_within_budget(starts, [1.0] * 9, burst=2, per_second=2)
    assert starts[-1] - starts[0] >= (9 - 2) / 2 - 0.2  # the limit was what slowed the calls


def test_tokens_per_minute_are_never_exceeded_and_long_replies_are_settled(server):
    per_minute = 4800  # 800 a step of ten seconds, 80 a second
    settings = fast_settings(server, tokens_per_minute=per_minute, max_output_tokens=40)
    client = LLMClient(settings)
    label_all(client, 16)
    estimate = estimate_tokens(label_messages(1)[0], response_schema_text(Label), 40)
    assert 40 < estimate < 200  # the test's premise: a handful fit a step, not all sixteen
    calls = sorted(server.stats.calls(), key=lambda call: call["start"])
    used = [max(estimate, call["prompt_tokens"] + call["completion_tokens"]) for call in calls]
    starts = [call["start"] for call in calls]
    assert_within_budget(starts, used, burst=per_minute / 6, per_second=per_minute / 60)
    assert starts[-1] - starts[0] >= (sum(used) - per_minute / 6 - max(used)) / (per_minute / 60)
    # Accounting is the endpoint's own count of tokens.
    assert client.stats.input_tokens == sum(call["prompt_tokens"] for call in calls)
    assert client.stats.output_tokens == sum(call["completion_tokens"] for call in calls)


def test_without_limits_the_same_calls_go_at_once(server):
    label_all(LLMClient(fast_settings(server)), 7)
    times = request_times(server)
    assert times[-1] - times[0] < 0.5


# ----- 7. cost -----


def test_cost_is_the_tokens_at_the_users_prices_and_cache_hits_cost_nothing(server, tmp_path):
    settings = fast_settings(server, input_price_per_million=0.15, output_price_per_million=0.60)
    server.faults.push("truncated")  # a reply that did not validate is billed too
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        client = LLMClient(settings, cache=cache)
        summarise(make_conversations(5), client)
        calls = server.stats.calls()
        sent = sum(call["prompt_tokens"] for call in calls)
        received = sum(call["completion_tokens"] for call in calls)
        metadata = client.metadata()
        assert len(calls) == 6 and sent > 0 and received > 0
        assert (metadata["llm_input_tokens"], metadata["llm_output_tokens"]) == (sent, received)
        assert metadata["llm_cost_usd"] == pytest.approx((sent * 0.15 + received * 0.60) / 1e6, abs=1e-6)

        again = LLMClient(settings, cache=cache)
        summarise(make_conversations(5), again)
        assert again.metadata()["llm_cache_hits"] == 5 and again.metadata()["llm_cost_usd"] == 0
    assert "llm_cost_usd" not in LLMClient(fast_settings(server)).metadata()  # no prices, no cost


# ----- 8. the API key stays secret -----


def test_the_api_key_appears_in_no_repr_reason_log_metadata_or_cache(server, tmp_path, caplog):
    key = "sk-kura-test-7f3a9c1e5b2d4086"
    settings = fast_settings(server, api_key=key, extra_body={"user": "team"})
    messages: list[str] = []
    server.faults.push("404", "400", "429", "truncated", "500")  # a 401 is test_llm_trust.py's
    caplog.set_level("DEBUG")
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        client = LLMClient(settings, cache=cache, log=messages.append)
        run = summarise(make_conversations(6), client)
        failure = one_call(client, "one more")
    assert len(run.failures) == 2 and isinstance(failure, SummaryResponse)

    errors: list[str] = []
    try:  # the error an endpoint raises for a bad key, formatted as the engine formats errors
        httpx.post(f"{server.base_url}/chat/completions", json={}, headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as error:  # pragma: no cover - the loopback server answers
        errors.append(describe(error))
    texts = [
        repr(settings),
        str(settings),
        repr(client),
        *messages,
        *run.failures.values(),
        *errors,
        json.dumps(client.stats.as_metadata()),
        caplog.text,
    ]
    assert all(key not in text for text in texts)
    assert "api_key" not in repr(settings)
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir())  # the database and its WAL
    assert key.encode() not in stored and b"summary" in stored


def test_progress_reads_right_for_a_fast_endpoint_and_a_slow_local_model():
    from kura_pipeline.core.llm import progress_line

    # A remote endpoint: per second, time left.
    fast = progress_line("summaries", 400, 1000, 0, 20.0)
    assert fast == "summaries: 400/1000 done, 20.0/s, about 30s left"
    # A local model at one answer every 30 s: "0.0/s" said nothing; per minute and minutes left do.
    line = progress_line("summaries", 10, 30, 2, 300.0)
    assert line == "summaries: 10/30 done, 2 failed, 2.0/min, about 10m00s left"
    assert progress_line("audit", 5, 5, 0, 3725.0) == "audit: 5/5 done, 0.1/min, took 1h02m"
