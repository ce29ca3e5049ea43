"""A loopback OpenAI-compatible server for tests, demos and fault drills.

Real HTTP on 127.0.0.1 (uvicorn + starlette, one asyncio loop in a background
thread), so clients are exercised end to end and calls are counted at the
endpoint rather than inside the code under test.

Start it from a test::

    with LoopbackServer(latency=0.1) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        ...
        srv.faults.push("429", "ok")          # exact outcomes of the next calls
        srv.faults.set(error_500_every=3)     # or periodic faults
        srv.replies.push({"name": "..."})     # the next structured answer, scripted
        assert srv.stats.count("chat", "429") == 1
        assert srv.stats.max_in_flight == 20

or as a command (``python -m kura_pipeline_tests.support.loopback --help``).

Answers: chat completions honour ``response_format`` (``json_schema``, and
``json_object`` with a schema found in the messages, as instructor's JSON
modes send) and ``tools``/``tool_choice`` (instructor's TOOLS mode) with an
instance generated from the schema, deterministically from a hash of the
messages (a string property named like a list of elements in the prompt,
``<answers><answer>A</answer>...</answers>``, takes one of their values); otherwise
plain text. ``replies.push(...)`` scripts the next structured answers instead
(`Replies`). Embeddings are deterministic unit vectors.

Connections: every response carries ``Connection: close`` by default, so each
request uses a fresh TCP connection. A kept-alive connection that the server
closes while idle can be picked up by a pooled client for its next request at
the same moment, which stalls or fails that request; loopback connects cost
microseconds, so closing is the cheap, predictable choice. ``keep_alive=True``
keeps connections open instead, with a 75 s idle timeout (longer than the
5 s pool expiry of httpx-based clients, so the client always closes first).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import math
import random
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kura_pipeline_tests.support.schema_instance import (
    generate_instance,
    tagged_options,
    words_from_text,
)

# Named outcomes; any HTTP status code from 400 to 599 ("503") is accepted too.
OUTCOMES: tuple[str, ...] = ("ok", "429", "500", "timeout", "truncated")
API_ENDPOINTS: tuple[str, ...] = ("chat", "embeddings", "models")
_BACKLOG = 4096  # pending connects, for bursts of thousands of clients
_FAULT_FIELDS = (
    "latency",
    "rate_limit_every",
    "retry_after",
    "error_500_every",
    "timeout_every",
    "truncated_every",
    "hang_seconds",
    "endpoints",
)


def _check_outcome(outcome: str) -> str:
    if outcome in OUTCOMES:
        return outcome
    if outcome.isdigit() and 400 <= int(outcome) <= 599:
        return outcome
    raise ValueError(f"unknown outcome {outcome!r}: use one of {OUTCOMES} or a 4xx/5xx code")


@dataclass
class Decision:
    """What the server does with one call."""

    call: int
    outcome: str
    latency: float
    retry_after: float
    hang_seconds: float


@dataclass
class Faults:
    """Fault settings; safe to change from any thread while the server runs.

    Periodic faults count calls to ``endpoints`` (1-based, shared between
    them): call n gets a fault when n is a multiple of the ``*_every`` value
    (0 = off). Precedence when several match: timeout, 500, 429, truncated.
    Scripted outcomes (``push``) come first and are consumed one per call.
    """

    latency: float = 0.0
    rate_limit_every: int = 0
    retry_after: float = 1.0
    error_500_every: int = 0
    timeout_every: int = 0
    truncated_every: int = 0
    # How long a "timeout" call hangs unless the client gives up or the server stops.
    hang_seconds: float = 3600.0
    endpoints: tuple[str, ...] = ("chat", "embeddings")
    _script: deque[str] = field(default_factory=deque, init=False, repr=False)
    _calls: int = field(default=0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def set(self, **changes: Any) -> None:
        """Change several settings at once (unknown names raise)."""
        unknown = set(changes) - set(_FAULT_FIELDS)
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        if "endpoints" in changes:
            changes["endpoints"] = tuple(changes["endpoints"])
            if not set(changes["endpoints"]) <= set(API_ENDPOINTS):
                raise ValueError(f"endpoints must be among {API_ENDPOINTS}")
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def push(self, *outcomes: str) -> None:
        """Queue exact outcomes for the next calls, e.g. ``push("429", "ok")``."""
        checked = [_check_outcome(str(o)) for o in outcomes]
        with self._lock:
            self._script.extend(checked)

    @property
    def pending(self) -> list[str]:
        """Scripted outcomes not consumed yet."""
        with self._lock:
            return list(self._script)

    @property
    def calls(self) -> int:
        """Calls counted for periodic faults since start or the last reset."""
        return self._calls

    def clear(self) -> None:
        """Back to no faults, an empty script and a zero call count."""
        defaults = Faults()
        with self._lock:
            for name in _FAULT_FIELDS:
                setattr(self, name, getattr(defaults, name))
            self._script.clear()
            self._calls = 0

    def reset_calls(self) -> None:
        with self._lock:
            self._calls = 0

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            out = {name: getattr(self, name) for name in _FAULT_FIELDS}
            out["endpoints"] = list(self.endpoints)
            out["pending"] = list(self._script)
            out["calls"] = self._calls
        return out

    def decide(self, endpoint: str) -> Decision:
        """Count one call and choose its outcome (called by the server)."""
        with self._lock:
            if endpoint not in self.endpoints:
                return Decision(0, "ok", 0.0, self.retry_after, self.hang_seconds)
            self._calls += 1
            n = self._calls
            outcome = "ok"
            if self._script:
                outcome = self._script.popleft()
            else:
                for every, name in (
                    (self.timeout_every, "timeout"),
                    (self.error_500_every, "500"),
                    (self.rate_limit_every, "429"),
                    (self.truncated_every, "truncated"),
                ):
                    if every and n % every == 0:
                        outcome = name
                        break
            return Decision(n, outcome, self.latency, self.retry_after, self.hang_seconds)


@dataclass
class _Reply:
    value: Any
    match: str | None


class Replies:
    """Scripted answers for the next chat completions, first in first out; safe from any thread.

    ``push({"name": "Conversational Summaries", "description": "..."})`` makes the next chat
    completion answer with that object as its structured content, in the shape the request
    asked for (``json_schema``/``json_object`` content, a fenced block for MD_JSON, a tool
    call's arguments for TOOLS). A dict is laid over the instance generated from the schema,
    so it may give only the fields a test cares about; a string is sent verbatim as the
    content (or the arguments), e.g. to script an answer that does not parse. With
    ``match="some words"`` a reply is kept for the first request whose messages contain those
    words (concurrent calls reach the server in no fixed order), before any reply without
    ``match``; those go to whichever request comes first. Empty script: answers are generated as usual.
    Only calls that answer (outcome ``ok`` or ``truncated``) consume a reply.
    """

    def __init__(self) -> None:
        self._script: list[_Reply] = []
        self._used: list[Any] = []
        self._lock = threading.Lock()

    def push(self, *replies: Any, match: str | None = None) -> None:
        """Queue structured answers (dicts, lists or raw strings) for the next chat completions."""
        for reply in replies:
            if not isinstance(reply, dict | list | str):
                raise TypeError(f"a scripted reply is a dict, a list or a string, not {type(reply).__name__}")
        with self._lock:
            self._script.extend(_Reply(reply, match) for reply in replies)

    def take(self, prompt_text: str) -> tuple[bool, Any]:
        """(True, reply) for the first queued reply this request may have, else (False, None)."""
        with self._lock:
            # A reply kept for this request's words comes before one for any request.
            index = next(
                (i for i, e in enumerate(self._script) if e.match is not None and e.match in prompt_text),
                None,
            )
            if index is None:
                index = next((i for i, e in enumerate(self._script) if e.match is None), None)
            if index is None:
                return False, None
            entry = self._script.pop(index)
            self._used.append(entry.value)
            return True, entry.value

    @property
    def pending(self) -> list[Any]:
        """Replies not consumed yet, in order."""
        with self._lock:
            return [entry.value for entry in self._script]

    @property
    def used(self) -> list[Any]:
        """Replies consumed so far, in the order they were sent."""
        with self._lock:
            return list(self._used)

    def clear(self) -> None:
        with self._lock:
            self._script.clear()
            self._used.clear()


class Stats:
    """Counts kept by the server, readable from any thread (also at ``GET /_stats``).

    Besides the request log (with bodies, ``log_limit`` entries), a compact call log keeps
    every call's endpoint, outcome, start and end times and the usage the answer reported
    (``call_log_limit`` entries), with token totals per endpoint: ``GET /_stats?calls=1``.
    """

    def __init__(self, log_limit: int = 1000, call_log_limit: int = 200_000) -> None:
        self._lock = threading.Lock()
        self._log: deque[dict[str, Any]] = deque(maxlen=log_limit)
        self._calls: deque[dict[str, Any]] = deque(maxlen=call_log_limit)
        self._tokens: dict[str, Counter[str]] = {}
        self._requests: Counter[str] = Counter()
        self._outcomes: dict[str, Counter[str]] = {}
        self._in_flight = 0
        self._max_in_flight = 0
        self._disconnects = 0

    def begin(self, endpoint: str, decision: Decision, body: Any) -> dict[str, Any]:
        """Count a call that starts; returns its call-log record (for ``end``)."""
        now = time.time()
        record: dict[str, Any] = {
            "endpoint": endpoint,
            "outcome": decision.outcome,
            "start": now,
            "end": None,
        }
        with self._lock:
            self._requests[endpoint] += 1
            self._outcomes.setdefault(endpoint, Counter())[decision.outcome] += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            self._log.append(
                {
                    "endpoint": endpoint,
                    "call": decision.call,
                    "outcome": decision.outcome,
                    "time": now,
                    "body": body,
                }
            )
            self._calls.append(record)
        return record

    def end(
        self,
        disconnected: bool = False,
        record: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> None:
        """Count a call that ended; ``usage`` is what its answer reported (if it answered)."""
        with self._lock:
            self._in_flight -= 1
            self._disconnects += int(disconnected)
            prompt = int((usage or {}).get("prompt_tokens") or 0)
            completion = int((usage or {}).get("completion_tokens") or 0)
            if record is not None:
                record.update(end=time.time(), prompt_tokens=prompt, completion_tokens=completion)
                tokens = self._tokens.setdefault(record["endpoint"], Counter())
                tokens["prompt"] += prompt
                tokens["completion"] += completion

    def reset(self) -> None:
        """Zero the counters and the log; requests still running stay in flight."""
        with self._lock:
            self._log.clear()
            self._calls.clear()
            self._tokens.clear()
            self._requests.clear()
            self._outcomes.clear()
            self._max_in_flight = self._in_flight
            self._disconnects = 0

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._requests.values())

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    @property
    def disconnects(self) -> int:
        """Requests whose client went away before the answer (e.g. client timeouts)."""
        return self._disconnects

    def count(self, endpoint: str | None = None, outcome: str | None = None) -> int:
        """Requests to ``endpoint`` (all if None) that got ``outcome`` (any if None)."""
        with self._lock:
            if outcome is None:
                if endpoint is None:
                    return sum(self._requests.values())
                return self._requests[endpoint]
            return sum(c[outcome] for ep, c in self._outcomes.items() if endpoint in (None, ep))

    def bodies(self, endpoint: str | None = None) -> list[Any]:
        """Logged request bodies, oldest first (bounded by ``log_limit``)."""
        with self._lock:
            return [e["body"] for e in self._log if endpoint in (None, e["endpoint"])]

    def log(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._log)

    def calls(self) -> list[dict[str, Any]]:
        """The compact call log, oldest first (``end`` is None while a call runs)."""
        with self._lock:
            return [dict(c) for c in self._calls]

    def tokens(self) -> dict[str, dict[str, int]]:
        """Tokens the answers reported, per endpoint: ``{"chat": {"prompt": .., "completion": ..}}``."""
        with self._lock:
            return {
                ep: {"prompt": c["prompt"], "completion": c["completion"]} for ep, c in self._tokens.items()
            }

    def snapshot(self, with_bodies: bool = False, with_calls: bool = False) -> dict[str, Any]:
        tokens = self.tokens() if with_calls else None
        with self._lock:
            snap: dict[str, Any] = {
                "total": sum(self._requests.values()),
                "requests": dict(self._requests),
                "outcomes": {ep: dict(c) for ep, c in self._outcomes.items()},
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "disconnects": self._disconnects,
            }
            if with_bodies:
                snap["log"] = list(self._log)
            if with_calls:
                snap["tokens"] = tokens
                snap["calls"] = [dict(c) for c in self._calls]
        return snap


# ---------------------------------------------------------------- responses


def _message_text(messages: list[Any]) -> str:
    """All text content of the messages, in order."""
    parts: list[str] = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(parts)


def _schema_in_text(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` that looks like a schema (instructor's JSON mode)."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and ("properties" in obj or "type" in obj):
            return obj
        start = text.find("{", start + 1)
    return None


def _requested_schema(body: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
    """(mode, schema, tool name): mode is "json", "fenced", "tool" or "text"."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if tools and choice != "none":
        name = None
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
        tool = next((t for t in tools if (t.get("function") or {}).get("name") == name), tools[0])
        fn = tool.get("function") or {}
        return "tool", fn.get("parameters") or {"type": "object"}, fn.get("name", "tool")
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        return "json", spec.get("schema", spec) or {"type": "object"}, None
    text = _message_text(body.get("messages") or [])
    if fmt.get("type") == "json_object":
        return "json", _schema_in_text(text) or {"type": "object"}, None
    if "json_schema" in text.lower():
        # instructor's MD_JSON mode: schema in the prompt, answer in a ```json fence.
        schema = _schema_in_text(text)
        if schema is not None:
            return "fenced", schema, None
    return "text", None, None


def _truncate(text: str) -> str:
    """Cut ``text`` inside its first string value so it can never parse."""
    colon = text.find(': "')
    if colon == -1:
        colon = text.find(':"')
    cut = colon + 4 if colon != -1 else max(1, len(text) // 2)
    return text[: min(cut, max(len(text) - 1, 1))]


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _unit_vector(text: str, dim: int) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}
    return JSONResponse(body, status_code=status, headers=headers)


class LoopbackServer:
    """The server handle: start/stop, ``base_url``, ``faults`` and ``stats``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        model: str = "loopback",
        embedding_dim: int = 384,
        keep_alive: bool = False,
        log_limit: int = 1000,
        echo_authorization: bool = False,
        faults: Faults | None = None,
        **fault_settings: Any,
    ) -> None:
        if not _is_loopback(host):
            raise ValueError(f"the loopback server binds loopback addresses only, not {host!r}")
        self.host = host
        self.model = model
        self.embedding_dim = embedding_dim
        self.keep_alive = keep_alive
        # A careless endpoint (fault drill): the Authorization header comes back in every error
        # message, in an `X-Echo-Authorization` header and in a chat answer's system_fingerprint.
        self.echo_authorization = echo_authorization
        self.faults = faults or Faults()
        if fault_settings:
            self.faults.set(**fault_settings)
        self.stats = Stats(log_limit)
        self.replies = Replies()  # scripted structured answers (see `Replies`)
        self._requested_port = port
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown: asyncio.Event | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port (kept after ``stop()`` so tests can check it is closed)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:PORT`` (stats at ``/_stats``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    def _bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        # Bound and listening here (not in uvicorn) so the ephemeral port is known
        # before start, and early connects wait in the backlog instead of failing.
        sock.listen(_BACKLOG)
        self._sock = sock
        self._port = int(sock.getsockname()[1])

    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self.app,
            log_config=None,  # leave the caller's logging configuration alone
            log_level="warning",
            access_log=False,
            lifespan="on",
            backlog=_BACKLOG,
            timeout_keep_alive=75 if self.keep_alive else 5,
            timeout_graceful_shutdown=5,
        )

    def start(self, timeout: float = 10.0) -> Self:
        """Serve from a daemon thread; returns once the port accepts requests."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._bind()
        self._server = uvicorn.Server(self._config())
        sock = self._sock
        assert sock is not None
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"loopback-llm:{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("loopback server failed to start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Release hanging requests, stop serving and join the thread."""
        if self._loop is not None and self._shutdown is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed in between
                self._loop.call_soon_threadsafe(self._shutdown.set)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("loopback server thread did not stop")
        if self._sock is not None:
            self._sock.close()
        self._thread = None
        self._server = None

    def serve_forever(self, announce: bool = True) -> None:
        """Serve in the calling thread until Ctrl-C (used by the command)."""
        self._bind()
        sock = self._sock
        assert sock is not None
        if announce:
            print(f"loopback OpenAI server on {self.base_url} (stats: {self.url}/_stats)", flush=True)
        self._server = uvicorn.Server(self._config())
        try:
            self._server.run(sockets=[sock])
        finally:
            sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self, faults: bool = False) -> None:
        """Zero the stats and the fault call count; ``faults=True`` also clears faults and
        scripted replies."""
        self.stats.reset()
        if faults:
            self.faults.clear()
            self.replies.clear()
        else:
            self.faults.reset_calls()

    # ------------------------------------------------------------ app

    def _build_app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            self._loop = asyncio.get_running_loop()
            self._shutdown = asyncio.Event()
            yield
            self._shutdown.set()

        routes = [
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/embeddings", self._embeddings, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/_stats", self._stats, methods=["GET"]),
            Route("/_control", self._control, methods=["POST"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if not self.keep_alive:
            headers["Connection"] = "close"
        return headers

    async def _pause(self, request: Request, seconds: float) -> str:
        """Sleep; returns "done", "disconnected" (client left) or "shutdown"."""
        assert self._shutdown is not None
        waits = {
            asyncio.ensure_future(asyncio.sleep(seconds)): "done",
            asyncio.ensure_future(_disconnected(request)): "disconnected",
            asyncio.ensure_future(self._shutdown.wait()): "shutdown",
        }
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        results = {waits[t] for t in done}
        for result in ("shutdown", "disconnected", "done"):
            if result in results:
                return result
        return "done"

    async def _serve_api(self, request: Request, endpoint: str) -> Response:
        """Common path for API calls: decide, account, delay, then answer or fail."""
        body: Any = None
        if request.method == "POST":
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "request body is not JSON", "invalid_request_error", self._headers())
        decision = self.faults.decide(endpoint)
        record = self.stats.begin(endpoint, decision, body)
        disconnected = False
        try:
            if decision.latency > 0:
                waited = await self._pause(request, decision.latency)
                if waited != "done":  # nobody is waiting for the answer any more
                    disconnected = waited == "disconnected"
                    return _error(503, f"request abandoned ({waited})", "server_error", self._headers())
            return await self._answer(request, endpoint, decision, body)
        finally:
            self.stats.end(
                disconnected or self._client_left(request), record, request.scope.get("loopback.usage")
            )

    @staticmethod
    def _client_left(request: Request) -> bool:
        return bool(request.scope.get("loopback.disconnected"))

    async def _answer(self, request: Request, endpoint: str, decision: Decision, body: Any) -> Response:
        if self.echo_authorization:
            echoed = request.headers.get("authorization", "")
            return self._echo(await self._answer_plain(request, endpoint, decision, body), echoed)
        return await self._answer_plain(request, endpoint, decision, body)

    def _echo(self, response: Response, echoed: str) -> Response:
        """`response` with the Authorization header echoed (echo_authorization mode)."""
        response.headers["X-Echo-Authorization"] = echoed
        if response.status_code >= 400 or b'"system_fingerprint"' in response.body:
            payload = json.loads(response.body)
            if "error" in payload:
                payload["error"]["message"] += f" (you sent Authorization: {echoed})"
            else:
                payload["system_fingerprint"] = f"loopback, you sent Authorization: {echoed}"
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            return JSONResponse(payload, status_code=response.status_code, headers=headers)
        return response

    async def _answer_plain(self, request: Request, endpoint: str, decision: Decision, body: Any) -> Response:
        outcome = decision.outcome
        if outcome == "timeout":
            await self._pause(request, decision.hang_seconds)
            return _error(503, "hung request released", "server_error", self._headers())
        if outcome == "429":
            retry = decision.retry_after
            value = str(int(retry)) if float(retry).is_integer() else str(retry)
            return _error(
                429,
                "Rate limit reached (loopback fault)",
                "rate_limit_exceeded",
                self._headers({"Retry-After": value}),
            )
        if outcome.isdigit():
            return _error(int(outcome), f"loopback fault {outcome}", "server_error", self._headers())
        if endpoint == "models":
            payload = {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "loopback"}],
            }
            return JSONResponse(payload, headers=self._headers())
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_request_error", self._headers())
        if endpoint == "chat":
            if body.get("stream"):
                return _error(
                    400,
                    "the loopback server supports stream=false only",
                    "invalid_request_error",
                    self._headers(),
                )
            payload = self._chat_payload(body, decision, truncated=outcome == "truncated")
            request.scope["loopback.usage"] = payload["usage"]
            return JSONResponse(payload, headers=self._headers())
        payload = self._embeddings_payload(body)
        request.scope["loopback.usage"] = payload["usage"]
        if outcome == "truncated":
            raw = json.dumps(payload).encode()
            return Response(raw[: len(raw) // 2], media_type="application/json", headers=self._headers())
        return JSONResponse(payload, headers=self._headers())

    def _chat_payload(self, body: dict[str, Any], decision: Decision, truncated: bool) -> dict:
        messages = body.get("messages") or []
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True, default=str).encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        prompt_text = _message_text(messages)
        user_text = _message_text([m for m in messages if isinstance(m, dict) and m.get("role") == "user"])
        words = words_from_text(user_text) or words_from_text(prompt_text)
        mode, schema, tool_name = _requested_schema(body)
        scripted, reply = self.replies.take(prompt_text)
        if scripted and isinstance(reply, str):
            content = reply  # verbatim: a test may script an answer that does not parse
        elif schema is not None:
            instance = generate_instance(schema, rng, words, tagged_options(prompt_text))
            if scripted:
                instance = (
                    (instance | reply) if isinstance(instance, dict) and isinstance(reply, dict) else reply
                )
            content = json.dumps(instance)
            if mode == "fenced":
                content = f"```json\n{content}\n```"
        elif scripted:
            content = json.dumps(reply)
        else:
            content = " ".join(rng.choice(words or ["ok"]) for _ in range(12)).capitalize() + "."
        if truncated:
            content = _truncate(content)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        finish = "stop"
        if mode == "tool":
            message["content"] = None
            message["tool_calls"] = [
                {
                    "id": f"call_{digest.hex()[:24]}",
                    "type": "function",
                    "function": {"name": tool_name, "arguments": content},
                }
            ]
            # OpenAI reports "stop" when tool_choice forces the function.
            finish = "stop" if isinstance(body.get("tool_choice"), dict) else "tool_calls"
        prompt_chars = prompt_text + (json.dumps(body["tools"]) if body.get("tools") else "")
        prompt_tokens, completion_tokens = _tokens(prompt_chars), _tokens(content)
        return {
            "id": f"chatcmpl-loopback-{decision.call}-{digest.hex()[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "system_fingerprint": "loopback",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _embeddings_payload(self, body: dict[str, Any]) -> dict:
        raw = body.get("input", [])
        # A single string or token list is one input; a list of them is many.
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
        dim = int(body.get("dimensions") or self.embedding_dim)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        chars = 0
        for index, item in enumerate(inputs):
            text = item if isinstance(item, str) else json.dumps(item)
            chars += len(text)
            vec = _unit_vector(text, dim)
            # openai-python asks for base64 (float32, little endian) unless told otherwise.
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if as_base64 else vec
            data.append({"object": "embedding", "index": index, "embedding": emb})
        tokens = _tokens("x" * chars) if chars else 0
        return {
            "object": "list",
            "data": data,
            "model": body.get("model") or self.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _chat(self, request: Request) -> Response:
        return await self._serve_api(request, "chat")

    async def _embeddings(self, request: Request) -> Response:
        return await self._serve_api(request, "embeddings")

    async def _models(self, request: Request) -> Response:
        return await self._serve_api(request, "models")

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"}, headers=self._headers())

    async def _stats(self, request: Request) -> Response:
        snap = self.stats.snapshot(
            with_bodies=request.query_params.get("bodies") == "1",
            with_calls=request.query_params.get("calls") == "1",
        )
        snap["faults"] = self.faults.as_dict()
        snap["replies_pending"] = len(self.replies.pending)
        return JSONResponse(snap, headers=self._headers())

    async def _control(self, request: Request) -> Response:
        """``{"set": {...}, "push": [...], "replies": [...], "clear": bool, "reset": bool}``,
        all optional (``replies`` are pushed to `Replies`; ``clear`` also empties them)."""
        try:
            body = await request.json()
            if body.get("clear"):
                self.faults.clear()
                self.replies.clear()
            if body.get("replies"):
                self.replies.push(*body["replies"])
            if body.get("set"):
                self.faults.set(**body["set"])
            if body.get("push"):
                self.faults.push(*body["push"])
            if body.get("reset"):
                self.reset()
        except (ValueError, TypeError, AttributeError) as exc:
            return _error(400, str(exc), "invalid_request_error", self._headers())
        return JSONResponse(
            {"faults": self.faults.as_dict(), "replies_pending": len(self.replies.pending)},
            headers=self._headers(),
        )


async def _disconnected(request: Request) -> None:
    """Return once the client closes its connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            request.scope["loopback.disconnected"] = True
            return


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kura_pipeline_tests.support.loopback",
        description="Loopback OpenAI-compatible server with fault injection.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--model", default="loopback")
    parser.add_argument("--embedding-dim", type=int, default=384)
    parser.add_argument(
        "--keep-alive", action="store_true", help="keep connections open instead of Connection: close"
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--rate-limit-every", type=int, default=0)
    parser.add_argument("--retry-after", type=float, default=1.0)
    parser.add_argument("--error-500-every", type=int, default=0)
    parser.add_argument("--timeout-every", type=int, default=0)
    parser.add_argument("--truncated-every", type=int, default=0)
    parser.add_argument(
        "--script", default="", help="comma-separated outcomes for the first calls, e.g. 429,ok,500"
    )
    args = parser.parse_args(argv)
    srv = LoopbackServer(
        args.host,
        args.port,
        model=args.model,
        embedding_dim=args.embedding_dim,
        keep_alive=args.keep_alive,
        latency=args.latency,
        rate_limit_every=args.rate_limit_every,
        retry_after=args.retry_after,
        error_500_every=args.error_500_every,
        timeout_every=args.timeout_every,
        truncated_every=args.truncated_every,
    )
    if args.script:
        srv.faults.push(*[s.strip() for s in args.script.split(",") if s.strip()])
    srv.serve_forever()


if __name__ == "__main__":
    main()
