"""The LLM engine: any OpenAI-compatible endpoint through instructor, with limits, retries,
a persistent cache and accounting. No Dagster here: the resource builds one of these.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import hashlib
import inspect
import json
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import instructor
import openai
import openai.resources.chat  # noqa: F401 - imported lazily on first use otherwise: 1-2 s inside a stage
from instructor.core import InstructorRetryException
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from kura_pipeline.core.llm_cache import ResponseCache, cache_key, schema_text
from kura_pipeline.core.prompts import Prompt
from kura_pipeline.core.redact import install_redaction, redact

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")

MODES = {
    "json_schema": instructor.Mode.JSON_SCHEMA,
    "tools": instructor.Mode.TOOLS,
    "json": instructor.Mode.JSON,
    "md_json": instructor.Mode.MD_JSON,
}


# A reply's size is unknown until it arrives: the tokens-per-minute budget reserves this much
# for it (or `max_output_tokens` when set), and settles the difference once usage is known.
DEFAULT_OUTPUT_TOKEN_ESTIMATE = 400
# Request starts are spaced by this share of (latency / concurrency), never more than the cap:
# just faster than slots free up in steady state, and enough apart to handle each reply alone.
PACING_SHARE = 0.9
MAX_PACING_SECONDS = 0.025
# Roughly four characters a token for English text and JSON; only used for the reservation.
CHARS_PER_TOKEN = 4
# A stage fails when more than this share of one gather's LLM calls failed (or all of them).
DEFAULT_MAX_FAILURE_SHARE = 0.5
# Connecting is quick or never happens; a reply may take a while. A silent endpoint with these
# defaults: two tries of 60 s each (a read timeout is retried once, see MAX_TIMEOUT_ATTEMPTS)
# plus a second of backoff, ~2 minutes per wave of calls, not the 8 minutes of 4 x 120 s.
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_READ_TIMEOUT_SECONDS = 60.0
# A request the endpoint sat on for a whole read timeout is tried once more, not max_attempts
# times: a stall that outlasts two timeouts is an outage, and repeating it only delays the report.
MAX_TIMEOUT_ATTEMPTS = 2
# What an endpoint that needs no key is sent (the openai client insists on one).
NO_KEY = "not-needed"
# A request another process is paying for: look for its answer this often (doubling to the cap).
CLAIM_FIRST_POLL_SECONDS = 0.05
CLAIM_MAX_POLL_SECONDS = 1.0
KEY_REFUSED = "the endpoint refused the key (HTTP {status})"
STAGE_DEADLINE_PASSED = "stage deadline passed"


# Each numeric setting's allowed range: (lowest, highest, whether the lowest itself is allowed).
SETTING_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "max_concurrency": (1, None, True),
    "requests_per_minute": (1, None, True),
    "tokens_per_minute": (1, None, True),
    "max_output_tokens": (1, None, True),
    "max_attempts": (1, None, True),
    "max_timeout_attempts": (1, None, True),
    "input_price_per_million": (0, None, True),
    "output_price_per_million": (0, None, True),
    "connect_timeout_seconds": (0, None, False),
    "read_timeout_seconds": (0, None, False),
    "timeout_seconds": (0, None, False),
    "stage_deadline_seconds": (0, None, False),
    "max_failure_share": (0, 1, False),
}


def allowed_range(name: str) -> str:
    """The range of a setting as a person reads it: ">= 1", "> 0", "in (0, 1]"."""
    low, high, inclusive = SETTING_RANGES[name]
    if high is not None:
        return f"in {'[' if inclusive else '('}{low:g}, {high:g}]"
    return f"{'>=' if inclusive else '>'} {low:g}"


def check_setting(name: str, value: float | None) -> str | None:
    """What is wrong with one numeric setting (None: nothing, or not set)."""
    if value is None or name not in SETTING_RANGES:
        return None
    low, high, inclusive = SETTING_RANGES[name]
    too_low = value < low if inclusive else value <= low
    # Not finite (NaN, inf): an infinite timeout or deadline is a hang, not a setting.
    if too_low or (high is not None and value > high) or not math.isfinite(value):
        return f"{name}={value!r} is out of range: it must be {allowed_range(name)}"
    return None


BASE_URL_EXAMPLE = "http://127.0.0.1:8080/v1"


def check_base_url(name: str, value: str | None) -> str | None:
    """What is wrong with an endpoint's base URL (None: nothing, or not set): it must be an
    absolute http(s) URL with a host, or every call fails later as "could not connect"."""
    if value is None:
        return None
    try:
        parts = urlsplit(str(value))
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        good = (
            parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in value)
        )
    except ValueError:
        good = False
    return None if good else f"{name}={value!r} is not an http(s) URL (like {BASE_URL_EXAMPLE})"


def settings_problems(values: dict[str, float | None]) -> list[str]:
    return [problem for name, value in values.items() if (problem := check_setting(name, value))]


@dataclass(frozen=True)
class LLMSettings:
    model: str
    base_url: str | None = None
    api_key: str = NO_KEY
    mode: str = "json_schema"
    name: str = "default"
    max_concurrency: int = 8
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_output_tokens: int | None = None
    input_price_per_million: float | None = None
    output_price_per_million: float | None = None
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    read_timeout_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS
    # The old single timeout: when given, it is the read timeout (kept for existing callers).
    timeout_seconds: float | None = None
    max_attempts: int = 4
    max_timeout_attempts: int = MAX_TIMEOUT_ATTEMPTS
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    temperature: float = 0.0
    extra_body: dict[str, Any] | None = None
    max_failure_share: float = DEFAULT_MAX_FAILURE_SHARE
    # Seconds from the stage's first LLM work after which calls not answered yet fail.
    stage_deadline_seconds: float | None = None

    def __post_init__(self) -> None:
        # A bad number fails here with its name and range, not later as a hang (a semaphore of 0)
        # or a traceback deep inside a stage.
        for problem in settings_problems(
            {name: getattr(self, name) for name in SETTING_RANGES if hasattr(self, name)}
        ):
            raise ValueError(f"LLM client {self.name!r}: {problem}")
        if problem := check_base_url("base_url", self.base_url):
            raise ValueError(f"LLM client {self.name!r}: {problem}")

    @property
    def read_timeout(self) -> float:
        return self.timeout_seconds if self.timeout_seconds is not None else self.read_timeout_seconds

    def __repr__(self) -> str:  # never print the key
        return (
            f"LLMSettings(name={self.name!r}, model={self.model!r}, base_url={self.base_url!r}, "
            f"mode={self.mode!r})"
        )

    @property
    def priced(self) -> bool:
        return self.input_price_per_million is not None or self.output_price_per_million is not None


@dataclass(frozen=True)
class LLMFailure:
    """A call that failed after its last attempt; the reason is kept with the record."""

    reason: str


@dataclass
class LLMStats:
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)

    def cost(self, settings: LLMSettings) -> float:
        """What the tokens sent and received cost at the prices the user gave (cache hits are free)."""
        return (
            self.input_tokens * (settings.input_price_per_million or 0.0)
            + self.output_tokens * (settings.output_price_per_million or 0.0)
        ) / 1_000_000

    def as_metadata(self) -> dict[str, int]:
        return {
            "llm_calls": self.calls,
            "llm_cache_hits": self.cache_hits,
            "llm_retries": self.retries,
            "llm_failures": self.failures,
            "llm_input_tokens": self.input_tokens,
            "llm_output_tokens": self.output_tokens,
        }


class RetryableReply(Exception):
    """The model answered, but the answer did not parse or validate."""


class KeyRefused(Exception):
    """The endpoint answered 401/403 earlier: this client's requests are not sent any more."""


class LLMStageFailed(RuntimeError):
    """Too many of a stage's LLM calls failed for its output to be trusted: fails the step."""


def refused_status(error: BaseException) -> int | None:
    """401 or 403 when the endpoint refused the key (no retry can change that), else None."""
    error = _root_cause(error)
    if isinstance(error, openai.APIStatusError) and error.status_code in (401, 403):
        return error.status_code
    return None


def _root_cause(error: BaseException) -> BaseException:
    # instructor wraps whatever went wrong in InstructorRetryException "from" the real error.
    while isinstance(error, InstructorRetryException) and error.__cause__:
        error = error.__cause__
    return error


def is_retryable(error: BaseException) -> bool:
    error = _root_cause(error)
    if isinstance(error, (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError)):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code >= 500 or error.status_code in (408, 409)
    return isinstance(error, (ValidationError, ValueError, RetryableReply))


def retry_after_seconds(error: BaseException) -> float | None:
    """How long the server asked us to wait: `retry-after-ms` (OpenAI's), or `Retry-After` in
    seconds or as an HTTP date; None when it did not say."""
    error = _root_cause(error)
    response = getattr(error, "response", None)
    if response is None:
        return None
    return parse_retry_after(response.headers.get("retry-after-ms"), response.headers.get("retry-after"))


def parse_retry_after(
    milliseconds: str | None, header: str | None, now: datetime | None = None
) -> float | None:
    with contextlib.suppress(ValueError):
        if milliseconds is not None:
            return max(0.0, float(milliseconds) / 1000)
    if header is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(header))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(header)
        return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return None


def usage_of(error: BaseException) -> tuple[int, int]:
    """Tokens an attempt that failed after the model answered still cost (a reply that did not
    validate is billed like any other)."""
    while error is not None:
        if isinstance(error, InstructorRetryException):
            usage = error.total_usage
            if usage is not None and not isinstance(usage, int):
                return (getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)
        error = error.__cause__  # type: ignore[assignment]
    return (0, 0)


@functools.cache
def instructor_model(response_model: type[T]) -> type[T]:
    """instructor's wrapper class for a response model, made once: instructor builds it on every
    call otherwise (pydantic `create_model`, ~7 ms of CPU each, the engine's largest cost).

    instructor also asks the class for its JSON schema on every request (~1 ms of pydantic work
    more); this class is ours and its schema cannot change, so it hands out a fresh copy of the
    first one (a copy: a caller may edit what it gets)."""
    wrapped = instructor.response_schema(response_model)
    generate = wrapped.model_json_schema
    first = json.dumps(generate())

    def model_json_schema(cls: type[BaseModel], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return json.loads(first) if not args and not kwargs else generate(*args, **kwargs)

    wrapped.model_json_schema = classmethod(model_json_schema)  # type: ignore[method-assign,assignment]
    return wrapped


@functools.cache
def response_schema_text(response_model: type[BaseModel]) -> str:
    """The response schema as the cache key serialises it, once per model."""
    return schema_text(response_model.model_json_schema())


def describe(error: BaseException) -> str:
    """Why a call failed, as stored with the record and shown in messages: never with a key in
    it (an endpoint or a library may echo one in an error's text)."""
    return redact(_describe(error))


def _describe(error: BaseException) -> str:
    error = _root_cause(error)
    if isinstance(error, KeyRefused):
        return str(error)
    if (status := refused_status(error)) is not None:
        return KEY_REFUSED.format(status=status)
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code} from the LLM endpoint"
    if isinstance(error, openai.APITimeoutError):
        return "the LLM request timed out"
    if isinstance(error, openai.APIConnectionError):
        return "could not connect to the LLM endpoint"
    if isinstance(error, ValidationError):
        return f"the reply did not validate: {error.error_count()} error(s)"
    return f"{type(error).__name__}: {str(error)[:200]}"


def estimate_tokens(messages: list[dict[str, str]], schema: str, max_output_tokens: int | None) -> int:
    """What a request is expected to use, reserved from the tokens-per-minute budget before it
    is sent: its messages and response schema at ~4 characters a token, plus the reply's limit."""
    prompt = (sum(len(m.get("content") or "") for m in messages) + len(schema)) // CHARS_PER_TOKEN
    return prompt + (max_output_tokens or DEFAULT_OUTPUT_TOKEN_ESTIMATE)


class Budget:
    """A leaky bucket of one per-minute budget (requests or tokens), shared by every event loop
    and thread of the process.

    `acquire` reserves its amount at once and sleeps until the bucket has drained enough for
    it: reservations are served in the order they were made, and the state is plain numbers
    behind a lock, so a stage's next event loop (each `asyncio.run` is a new one) starts from
    the level the last one left. aiolimiter, used before, keeps its waiters in one loop and
    warns when reused in another; a fresh limiter per loop reset the budget at every stage.
    """

    def __init__(self, capacity: float, per_second: float):
        self.max_rate = capacity  # the largest single reservation (aiolimiter's name for it)
        self.per_second = per_second
        self._level = 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self, amount: float) -> float:
        """Take `amount` from the budget; the seconds to wait before using it."""
        with self._lock:
            now = time.monotonic()
            self._level = max(0.0, self._level - (now - self._last) * self.per_second)
            self._last = now
            wait = max(0.0, (self._level + amount - self.max_rate) / self.per_second)
            self._level += amount
            return wait

    async def acquire(self, amount: float = 1.0) -> None:
        if (wait := self.reserve(amount)) > 0:
            await asyncio.sleep(wait)


def request_limiter(per_minute: int) -> Budget:
    """Requests per minute, spread out: a burst of at most one second's share (at least one), so
    a run does not spend a minute's budget in its first instant and then stall (endpoints often
    enforce their per-minute limits over shorter windows)."""
    return Budget(max(1.0, per_minute / 60), per_minute / 60)


def token_limiter(per_minute: int) -> Budget:
    """Tokens per minute in ten-second steps: a request reserves its expected tokens; one larger
    than a step's share is charged a whole step, so it waits its turn but is never stuck."""
    return Budget(per_minute / 6, per_minute / 60)


@dataclass
class EndpointLimits:
    """What one endpoint allows this process, whichever stage, client object or event loop
    asks: the per-minute budgets, the shared Retry-After pause and the pacing of starts."""

    requests: Budget | None
    tokens: Budget | None
    resume_at: float = 0.0  # monotonic time before which no request starts (Retry-After)
    next_start: float = 0.0  # monotonic time before which the next request does not start
    latency: float | None = None  # moving average of a successful call's duration


_PROCESS_LIMITS: dict[tuple[Any, ...], EndpointLimits] = {}
_PROCESS_LIMITS_LOCK = threading.Lock()


def process_limits(settings: LLMSettings) -> EndpointLimits:
    """The process's one `EndpointLimits` for a client's endpoint, model, key and limits: each
    stage builds its own `LLMClient`, and the budgets must not restart with it."""
    key_digest = hashlib.sha256(settings.api_key.encode()).hexdigest()
    identity = (
        settings.name,
        settings.base_url,
        settings.model,
        key_digest,
        settings.requests_per_minute,
        settings.tokens_per_minute,
    )
    with _PROCESS_LIMITS_LOCK:
        if identity not in _PROCESS_LIMITS:
            rpm, tpm = settings.requests_per_minute, settings.tokens_per_minute
            _PROCESS_LIMITS[identity] = EndpointLimits(
                requests=request_limiter(rpm) if rpm else None,
                tokens=token_limiter(tpm) if tpm else None,
            )
        return _PROCESS_LIMITS[identity]


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_line(label: str, done: int, total: int, failed: int, elapsed: float) -> str:
    """One progress line of a stage's LLM calls: the rate per second or, for a slow local model
    (0.03 a second would print as "0.0/s"), per minute; the time left; the failures so far."""
    rate = done / max(elapsed, 1e-9)
    pace = f"{rate:.1f}/s" if rate >= 1 else f"{rate * 60:.1f}/min"
    if rate and done < total:
        left = f"about {_duration((total - done) / rate)} left"
    else:
        left = f"took {_duration(elapsed)}"
    failures = f", {failed} failed" if failed else ""
    return f"{label}: {done}/{total} done{failures}, {pace}, {left}"


class LLMClient:
    """One named client: its endpoint, its limits, its cache and its own accounting.

    Limits: at most `max_concurrency` requests in flight, `requests_per_minute` and
    `tokens_per_minute` (leaky buckets; a request reserves its prompt plus the expected reply and
    settles the difference when the usage comes back), and a shared pause: when the endpoint
    answers 429 with Retry-After, no request of this client starts before that time.
    """

    def __init__(
        self,
        settings: LLMSettings,
        cache: ResponseCache | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.settings = settings
        self.cache = cache
        self.stats = LLMStats()
        if settings.api_key != NO_KEY:
            install_redaction([settings.api_key])  # however the client was built, never logged
        self.log = log or (lambda message: None)
        self._semaphore: asyncio.Semaphore | None = None
        # Budgets, Retry-After pause and pacing are the process's, shared with every other
        # client object of the same endpoint (each stage builds its own).
        self._limits = process_limits(settings)
        self._client: Any = None
        self._raw: openai.AsyncOpenAI | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refused: str | None = None  # set by the first 401/403: no request is sent after it
        self._deadline: float | None = None  # monotonic end of the stage (stage_deadline_seconds)
        self._in_flight: dict[str, asyncio.Future[Any]] = {}  # cache key -> the answer on its way
        # Every call's end, for the stage check of work that does not go through `gather`.
        self.answered = 0
        self.failed = 0
        self.first_failure: str | None = None

    def __repr__(self) -> str:
        return f"LLMClient({self.settings!r})"

    @property
    def name(self) -> str:
        return self.settings.name

    # The semaphore and the HTTP client belong to one event loop: built inside it, anew for a new
    # loop (each asset step runs its own `asyncio.run`, one at a time in a process, so the
    # concurrency limit holds per process too). The budgets are the process's (`process_limits`).
    def _ensure_loop_state(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._semaphore = asyncio.Semaphore(self.settings.max_concurrency)
            self._in_flight = {}
            self._raw = openai.AsyncOpenAI(
                base_url=self.settings.base_url,
                api_key=self.settings.api_key,
                # (connect, read, write, pool): the openai client's own httpx takes a tuple, whichever
                # httpx it is; read also bounds writes and the wait for a pooled connection.
                timeout=(self.settings.connect_timeout_seconds, *[self.settings.read_timeout] * 3),
                max_retries=0,  # retries are ours, so they are counted and honour Retry-After
            )
            self._client = instructor.from_openai(self._raw, mode=MODES[self.settings.mode])

    async def aclose(self) -> None:
        """Close the connections this loop opened (kept-alive ones would otherwise be torn down,
        noisily, when the loop is gone)."""
        if self._raw is not None and self._loop is asyncio.get_running_loop():
            await self._raw.close()
        self._raw = self._client = self._loop = None

    @property
    def semaphore(self) -> asyncio.Semaphore:
        self._ensure_loop_state()
        assert self._semaphore is not None
        return self._semaphore

    def metadata(self) -> dict[str, Any]:
        """The accounting for asset metadata: calls, cache hits, retries, failures, tokens, and
        the cost where the user gave prices."""
        values: dict[str, Any] = self.stats.as_metadata()
        if self.settings.priced:
            values["llm_cost_usd"] = round(self.stats.cost(self.settings), 6)
        return values

    def _wait(self, state: RetryCallState) -> float:
        backoff = min(
            self.settings.max_backoff_seconds,
            self.settings.backoff_seconds * 2 ** (state.attempt_number - 1),
        )
        backoff = random.uniform(backoff / 2, backoff)  # jitter spreads a 429 storm out
        error = state.outcome.exception() if state.outcome else None
        server_says = retry_after_seconds(error) if error else None
        if server_says:
            # The endpoint's limit is shared: every request of this client waits, not only this one.
            self._limits.resume_at = max(self._limits.resume_at, time.monotonic() + server_says)
        return max(backoff, server_says or 0.0)

    def _count_retry(self, state: RetryCallState) -> None:
        self.stats.retries += 1
        error = state.outcome.exception() if state.outcome else None
        if error is not None:
            self.log(f"{self.name}: retrying after {describe(error)} (attempt {state.attempt_number})")

    @property
    def refused(self) -> str | None:
        """Why this client sends nothing any more (the endpoint refused its key), or None."""
        return self._refused

    def start_stage_clock(self) -> None:
        """Start the stage deadline, once per client (a client serves one stage)."""
        if self.settings.stage_deadline_seconds and self._deadline is None:
            self._deadline = time.monotonic() + self.settings.stage_deadline_seconds

    def _record(self, result: Any) -> Any:
        if isinstance(result, LLMFailure):
            self.failed += 1
            self.first_failure = self.first_failure or result.reason
        else:
            self.answered += 1
        return result

    def _fail(self, reason: str) -> LLMFailure:
        self.stats.failures += 1
        self.stats.failure_reasons[reason] = self.stats.failure_reasons.get(reason, 0) + 1
        return LLMFailure(reason=reason)

    async def complete(
        self, prompt: Prompt, messages: list[dict[str, str]], response_model: type[T]
    ) -> T | LLMFailure:
        """One structured call, answered from the cache when it was paid for before, or by the
        identical request already in flight (single flight: one payment for the same key)."""
        self._ensure_loop_state()
        schema = response_schema_text(response_model)
        key = cache_key(self.settings.model, prompt.key, messages, schema)
        while (leader := self._in_flight.get(key)) is not None:
            try:
                answer = await asyncio.shield(leader)
            except asyncio.CancelledError:
                if leader.cancelled():  # the leader was cancelled, not us: ask ourselves
                    continue
                raise
            if isinstance(answer, LLMFailure):  # counted like the leader's, so metadata adds up
                return self._record(self._fail(answer.reason))
            self.stats.cache_hits += 1  # answered without a call of its own, like a cache hit
            return self._record(answer.model_copy(deep=True))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await self._complete(prompt, key, messages, schema, response_model)
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(result)
        finally:
            if self._in_flight.get(key) is future:
                del self._in_flight[key]
        return self._record(result)

    async def _complete(
        self, prompt: Prompt, key: str, messages: list[dict[str, str]], schema: str, response_model: type[T]
    ) -> T | LLMFailure:
        # SQLite off the event loop: a slow disk must not hold up the requests in flight.
        if self.cache is not None and (cached := await asyncio.to_thread(self.cache.get, key)) is not None:
            self.stats.cache_hits += 1
            return response_model.model_validate_json(cached)
        if self._refused:
            return self._fail(self._refused)
        estimate = estimate_tokens(messages, schema, self.settings.max_output_tokens)
        timeouts = 0

        def give_up(state: RetryCallState) -> bool:
            nonlocal timeouts
            error = state.outcome.exception() if state.outcome else None
            if error is not None and isinstance(_root_cause(error), openai.APITimeoutError):
                timeouts += 1
            return (
                state.attempt_number >= self.settings.max_attempts
                or timeouts >= self.settings.max_timeout_attempts
            )

        deadline = asyncio.timeout_at(self._deadline)  # None: no deadline
        claimed = False
        try:
            async with deadline:
                if self.cache is not None:
                    # Another process may be paying for this very answer: wait for it instead.
                    if (paid := await self._claim_or_wait(key)) is not None:
                        self.stats.cache_hits += 1
                        return response_model.model_validate_json(paid)
                    claimed = True
                async for attempt in AsyncRetrying(
                    stop=give_up,
                    wait=self._wait,
                    retry=retry_if_exception(is_retryable),
                    before_sleep=self._count_retry,
                    reraise=True,
                ):
                    with attempt:
                        result = await self._call(messages, response_model, estimate)
        except TimeoutError as error:
            return self._fail(STAGE_DEADLINE_PASSED if deadline.expired() else describe(error))
        except Exception as error:  # noqa: BLE001 - every failure is recorded, none is lost
            if (status := refused_status(error)) is not None and self._refused is None:
                # The key will not work on the next try either: stop every request of this client.
                self._refused = KEY_REFUSED.format(status=status)
                self.log(f"{self.name}: {self._refused}; no further request is sent")
            return self._fail(describe(error))
        else:
            if self.cache is not None:  # stored (committed) before the answer is used
                await asyncio.to_thread(self.cache.put, key, prompt.key, result.model_dump_json())
            return result
        finally:
            # After the answer is stored, so a waiting process finds one or the other; a failed
            # or cancelled call releases too, and a waiter then tries for itself. Synchronous: it
            # must happen even while this task is being cancelled.
            if claimed and self.cache is not None:
                self.cache.release(key)

    @property
    def claim_lease_seconds(self) -> float:
        """How long another host's process trusts our claim on a key: every attempt timing out
        and backing off as long as allowed (a process on this host is checked directly)."""
        s = self.settings
        return s.max_attempts * (s.connect_timeout_seconds + s.read_timeout + s.max_backoff_seconds)

    async def _claim_or_wait(self, key: str) -> str | None:
        """Claim `key` (None: ours to pay for), or the answer another process paid for it."""
        assert self.cache is not None
        poll = CLAIM_FIRST_POLL_SECONDS
        while not await asyncio.to_thread(self.cache.claim, key, self.claim_lease_seconds):
            await asyncio.sleep(poll)
            poll = min(2 * poll, CLAIM_MAX_POLL_SECONDS)
            if (answer := await asyncio.to_thread(self.cache.get, key)) is not None:
                return answer
        # The holder may have stored its answer and let go between our lookup and our claim.
        if (answer := await asyncio.to_thread(self.cache.get, key)) is not None:
            await asyncio.to_thread(self.cache.release, key)
            return answer
        return None

    async def _pause_if_asked(self) -> None:
        while (pause := self._limits.resume_at - time.monotonic()) > 0:
            await asyncio.sleep(pause)

    async def _pace(self) -> None:
        """Space request starts across the endpoint's latency (at most `MAX_PACING_SECONDS`
        apart, and always a little faster than the slots free up, so throughput never drops).

        Replies that come back together are parsed one after another in this one event loop, a
        few milliseconds each, and round-robin scheduling finishes them all together too: with
        an endpoint of steady latency the slots then move in waves that each wait for the whole
        wave's parsing (measured: ~9 % over the floor at 20 slots). Evenly spaced starts keep
        the replies, and the work on them, apart."""
        spacing = 0.0
        limits = self._limits
        if limits.latency is not None:
            spacing = min(PACING_SHARE * limits.latency / self.settings.max_concurrency, MAX_PACING_SECONDS)
        now = time.monotonic()
        start = max(now, limits.next_start)
        limits.next_start = start + spacing
        if start > now:
            await asyncio.sleep(start - now)

    async def _call(self, messages: list[dict[str, str]], response_model: type[T], estimate: int) -> T:
        assert self._semaphore is not None
        if self._refused:
            raise KeyRefused(self._refused)
        await self._pause_if_asked()
        requests, tokens = self._limits.requests, self._limits.tokens
        if requests is not None:
            await requests.acquire()
        if tokens is not None:
            estimate = min(estimate, int(tokens.max_rate))
            await tokens.acquire(estimate)
        async with self._semaphore:
            await self._pause_if_asked()  # a 429 may have come while this request queued
            if self._refused:  # a 401 may have come while this request queued
                raise KeyRefused(self._refused)
            await self._pace()
            self.stats.calls += 1
            kwargs: dict[str, Any] = {}
            if self.settings.extra_body:
                kwargs["extra_body"] = self.settings.extra_body
            if self.settings.max_output_tokens:
                kwargs["max_tokens"] = self.settings.max_output_tokens
            sent_at = time.monotonic()
            try:
                result, completion = await self._client.chat.completions.create_with_completion(
                    model=self.settings.model,
                    messages=messages,
                    response_model=instructor_model(response_model),
                    temperature=self.settings.temperature,
                    max_retries=0,
                    **kwargs,
                )
            except Exception as error:
                sent, received = usage_of(error)
                self.stats.input_tokens += sent
                self.stats.output_tokens += received
                raise
            took = time.monotonic() - sent_at
            latency = self._limits.latency
            self._limits.latency = took if latency is None else 0.8 * latency + 0.2 * took
        usage = getattr(completion, "usage", None)
        used = 0
        if usage is not None:
            self.stats.input_tokens += usage.prompt_tokens or 0
            self.stats.output_tokens += usage.completion_tokens or 0
            used = (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
        if tokens is not None and used > estimate:
            # The reply was longer than reserved: take the rest from the bucket, so the next
            # requests wait for it.
            await tokens.acquire(min(used - estimate, int(tokens.max_rate)))
        return result

    async def gather(self, calls: Sequence[Awaitable[Any]], label: str) -> list[Any]:
        """Run calls concurrently (the semaphore bounds them), logging progress with an ETA.

        Only a window of calls (twice the concurrency) is started at a time: each call prepares
        its request (prompt, cache key, cache lookup) when it starts, and starting thousands at
        once would hold back the first requests until every one of them had been prepared.

        The results are checked as one stage: when every call failed, more than
        `max_failure_share` of them did, or the endpoint refused the key, this raises
        `LLMStageFailed` naming the label, the count and the first reason. Once the share is
        certain to be passed, calls not started yet are not sent (a dead endpoint must not keep
        a large stage busy for hours). A result of None is work that needed no call.
        """
        total = len(calls)
        done = 0
        failed = 0
        skipped = 0
        first: str | None = None
        started = time.monotonic()
        last_report = started
        window = asyncio.Semaphore(max(2 * self.settings.max_concurrency, 4))
        share = self.settings.max_failure_share

        async def tracked(call: Awaitable[Any]) -> Any:
            nonlocal done, failed, skipped, first, last_report
            async with window:
                if failed > share * total and not self._refused:
                    # Doomed already: don't pay for answers the stage will throw away.
                    if inspect.iscoroutine(call):
                        call.close()
                    skipped += 1
                    return None
                result = await call
            if isinstance(result, LLMFailure):
                failed += 1
                first = first or result.reason
            done += 1
            now = time.monotonic()
            if now - last_report >= 5 or done == total:
                last_report = now
                self.log(progress_line(label, done, total, failed, now - started))
            return result

        results = list(await asyncio.gather(*(tracked(call) for call in calls)))
        attempted = sum(result is not None for result in results)
        if failed and (failed == attempted or failed > share * attempted or self._refused):
            not_sent = f", {skipped} more not sent" if skipped else ""
            raise LLMStageFailed(
                f"{label}: {failed} of {attempted} LLM calls failed{not_sent} "
                f"(first: {self._refused or first})"
            )
        return results


def check_stage(client: LLMClient, answered: int, failed: int) -> None:
    """The stage check for work that did not go through `gather` (extractors call `complete`
    themselves): over every call this client ended since (answered, failed) were read."""
    answered, failed = client.answered - answered, client.failed - failed
    share = client.settings.max_failure_share
    if failed and (failed > share * (answered + failed) or client.refused):
        raise LLMStageFailed(
            f"LLM client {client.name!r}: {failed} of {answered + failed} LLM calls failed "
            f"(first: {client.refused or client.first_failure})"
        )


def run_llm(coroutine: Coroutine[Any, Any, R], *clients: LLMClient) -> R:
    """`asyncio.run` for a stage's LLM work, closing the clients' connections in the same loop;
    raises `LLMStageFailed` when too many of the stage's calls failed (see `LLMClient.gather`)."""
    before = [(client.answered, client.failed) for client in clients]
    for client in clients:
        client.start_stage_clock()

    async def main() -> R:
        try:
            return await coroutine
        finally:
            for client in clients:
                await client.aclose()

    result = asyncio.run(main())
    for client, (answered, failed) in zip(clients, before, strict=True):
        check_stage(client, answered, failed)
    return result


def combined_metadata(clients: Sequence[LLMClient]) -> dict[str, Any]:
    """One stage's accounting over the named clients it used: totals, and each client's own."""
    if len(clients) == 1:
        return clients[0].metadata()
    totals: dict[str, Any] = {}
    for client in clients:
        for key, value in client.metadata().items():
            totals[key] = totals.get(key, 0) + value
    if clients:
        totals["llm_clients"] = {client.name: client.metadata() for client in clients}
    return totals
