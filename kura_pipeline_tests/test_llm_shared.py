"""What one process or machine pays for and sends (issue #13, items 2, 5 and 7): two processes
on one dataset pay for each answer once (claims in the shared response cache), a killed
holder's claims are taken over at once, the per-minute budgets and Retry-After pause hold across
every stage and event loop of a process, and no failure reason stored with a record holds a key.
Real processes, a real loopback HTTP server on 127.0.0.1, real SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from kura_pipeline.core.llm import (
    LLMClient,
    LLMFailure,
    LLMSettings,
    describe,
    estimate_tokens,
    response_schema_text,
    run_llm,
)
from kura_pipeline.core.llm_cache import HOST, ResponseCache, cache_key, claim_is_live
from kura_pipeline.core.prompts import SUMMARY_PROMPT
from kura_pipeline.core.redact import REDACTED, uninstall_redaction
from kura_pipeline_tests.support.llm_fixtures import summarise_command
from kura_pipeline_tests.support.loopback import LoopbackServer


class Reply(BaseModel):
    text: str


def summarise_in_a_process(server: LoopbackServer, cache: Path, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        summarise_command(server.base_url, cache, count, concurrency=4),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(process: subprocess.Popen[str], timeout: float) -> dict[str, int]:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


def wait_until(condition, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


# ----- item 2: two processes, one payment per answer -----


def test_two_processes_on_one_dataset_pay_for_each_answer_once(server, tmp_path):
    # Slow enough that both processes ask for every conversation while the other's call flies:
    # without claims each of the 20 is paid twice (40 calls at the endpoint).
    server.faults.set(latency=0.4)
    cache = tmp_path / "shared.sqlite3"
    ResponseCache(cache).close()  # the tables exist before the race starts
    first, second = (summarise_in_a_process(server, cache, 20) for _ in range(2))
    results = [outcome(first, 120), outcome(second, 120)]
    assert all(result["summarised"] == 20 and result["failed"] == 0 for result in results)
    assert server.stats.count("chat") == 20
    assert sum(result["llm_calls"] for result in results) == 20
    assert sum(result["llm_cache_hits"] for result in results) == 20
    with ResponseCache(cache) as shared:
        assert len(shared) == 20
        assert shared._db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # all released


def test_a_killed_holders_claims_are_taken_over_at_once(server, tmp_path):
    # The first process claims its keys, then hangs on the endpoint and is killed with SIGKILL:
    # its claims stay in the file, but its process is gone, so the second does not wait out
    # the lease (8+ minutes with the default timeouts) and pays for them itself.
    cache = tmp_path / "shared.sqlite3"
    ResponseCache(cache).close()
    server.faults.set(timeout_every=1, hang_seconds=60)
    holder = summarise_in_a_process(server, cache, 8)
    with ResponseCache(cache) as shared:
        wait_until(lambda: shared._db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] >= 4, 60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    server.reset(faults=True)
    started = time.monotonic()
    result = outcome(summarise_in_a_process(server, cache, 8), 90)
    assert result["summarised"] == 8 and result["failed"] == 0
    assert time.monotonic() - started < 60


def test_a_claim_stands_while_its_process_lives_and_its_lease_runs():
    now = time.time()
    here = HOST
    assert claim_is_live(here, os.getpid(), now + 60, now)
    assert not claim_is_live(here, os.getpid(), now - 1, now)  # lease over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not claim_is_live(here, dead.pid, now + 60, now)  # process gone
    assert claim_is_live("another-host", dead.pid, now + 60, now)  # only the lease says elsewhere


def test_a_failed_call_releases_its_claim_so_a_waiting_process_tries_itself(server, tmp_path):
    server.faults.push("500")
    settings = LLMSettings(model="m", base_url=server.base_url, max_attempts=1)
    with ResponseCache(tmp_path / "c.sqlite3") as cache:
        client = LLMClient(settings, cache=cache)
        messages = [{"role": "user", "content": "one"}]
        assert isinstance(asyncio.run(client.complete(SUMMARY_PROMPT, messages, Reply)), LLMFailure)
        assert cache._db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
        # Another process's claim on the key, still live, makes this one wait for its answer.
        other = ResponseCache(cache.path)
        client = LLMClient(settings, cache=cache)
        key = cache_key("m", SUMMARY_PROMPT.key, messages, response_schema_text(Reply))
        assert other.claim(key, 60)

        async def answer_later() -> None:
            await asyncio.sleep(0.5)
            other.put(key, SUMMARY_PROMPT.key, Reply(text="paid by the other").model_dump_json())
            other.release(key)

        async def both() -> Reply | LLMFailure:
            answer, _ = await asyncio.gather(client.complete(SUMMARY_PROMPT, messages, Reply), answer_later())
            return answer

        answer = asyncio.run(both())
        other.close()
    assert isinstance(answer, Reply) and answer.text == "paid by the other"
    assert client.stats.calls == 0 and client.stats.cache_hits == 1
    assert server.stats.count("chat") == 1  # only the first, failed, call


# ----- item 7: limits per process, across stages and event loops -----


def one_call(server: LoopbackServer, settings: LLMSettings, text: str) -> float:
    """A stage of one call with a client of its own, in an event loop of its own (as each asset
    step does); how long it took."""
    client = LLMClient(settings)
    started = time.monotonic()
    answer = run_llm(client.complete(SUMMARY_PROMPT, [{"role": "user", "content": text}], Reply), client)
    assert isinstance(answer, Reply)
    return time.monotonic() - started


def test_requests_per_minute_hold_across_stages_and_event_loops(server):
    # 30 a minute: one request every 2 s, a burst of one. The second stage's client and loop are
    # new; with budgets per client or per loop its request would go at once.
    settings = LLMSettings(model="rpm", base_url=server.base_url, requests_per_minute=30)
    assert one_call(server, settings, "first") < 1.5
    assert one_call(server, settings, "second") >= 1.5
    assert server.stats.count("chat") == 2


def test_tokens_per_minute_hold_across_stages_and_event_loops(server):
    # A ten-second step holds 1.6 requests' reservations: the first stage's request goes at
    # once, the second stage's (new client, new loop) waits ~2.5 s for the bucket to drain.
    expected = estimate_tokens([{"role": "user", "content": "first"}], response_schema_text(Reply), None)
    settings = LLMSettings(model="tpm", base_url=server.base_url, tokens_per_minute=int(6 * 1.6 * expected))
    assert one_call(server, settings, "first") < 1.5
    assert one_call(server, settings, "other") >= 1.5


def test_a_different_endpoint_has_budgets_of_its_own(server):
    settings = LLMSettings(model="own-a", base_url=server.base_url, requests_per_minute=30)
    other = LLMSettings(model="own-b", base_url=server.base_url, requests_per_minute=30)
    assert one_call(server, settings, "first") < 1.5
    assert one_call(server, other, "first") < 1.5


def test_a_retry_after_pause_holds_for_the_next_stage_too(server):
    # Stage one's only attempt gets 429 with Retry-After: 2 and gives up; stage two, a new client
    # in a new loop, still waits out the pause the endpoint asked for.
    server.faults.set(retry_after=2)
    server.faults.push("429")
    settings = LLMSettings(model="pause", base_url=server.base_url, max_attempts=1)
    client = LLMClient(settings)
    failed = asyncio.run(client.complete(SUMMARY_PROMPT, [{"role": "user", "content": "x"}], Reply))
    assert isinstance(failed, LLMFailure)
    assert one_call(server, settings, "after the pause") >= 1.5


# ----- item 5: no key in a stored failure reason -----


def test_a_failure_reason_never_holds_the_clients_key():
    uninstall_redaction()
    key = "sk-reason-0123456789abcdefSECRET"
    LLMClient(LLMSettings(model="m", api_key=key))  # registers its key, however it was built
    reason = describe(ValueError(f"the endpoint said: bad request from Bearer {key}"))
    assert key not in reason and REDACTED in reason
    uninstall_redaction()
