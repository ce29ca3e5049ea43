"""The LLM engine: any OpenAI-compatible endpoint through instructor, with limits, retries,
a persistent cache and accounting. No Dagster here: the resource builds one of these.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import instructor
import openai
from aiolimiter import AsyncLimiter
from instructor.core import InstructorRetryException
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from kura_pipeline.core.llm_cache import ResponseCache, cache_key
from kura_pipeline.core.prompts import Prompt

T = TypeVar("T", bound=BaseModel)

MODES = {
    "json_schema": instructor.Mode.JSON_SCHEMA,
    "tools": instructor.Mode.TOOLS,
    "json": instructor.Mode.JSON,
    "md_json": instructor.Mode.MD_JSON,
}


@dataclass(frozen=True)
class LLMSettings:
    model: str
    base_url: str | None = None
    api_key: str = "not-needed"
    mode: str = "json_schema"
    max_concurrency: int = 8
    requests_per_minute: int | None = None
    timeout_seconds: float = 120.0
    max_attempts: int = 4
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    temperature: float = 0.0
    extra_body: dict[str, Any] | None = None

    def __repr__(self) -> str:  # never print the key
        return f"LLMSettings(model={self.model!r}, base_url={self.base_url!r}, mode={self.mode!r})"


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
    """The server's Retry-After header, when it sent one (seconds form)."""
    error = _root_cause(error)
    response = getattr(error, "response", None)
    header = response.headers.get("retry-after") if response is not None else None
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None


def describe(error: BaseException) -> str:
    error = _root_cause(error)
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code} from the LLM endpoint"
    if isinstance(error, openai.APITimeoutError):
        return "the LLM request timed out"
    if isinstance(error, openai.APIConnectionError):
        return "could not connect to the LLM endpoint"
    if isinstance(error, ValidationError):
        return f"the reply did not validate: {error.error_count()} error(s)"
    return f"{type(error).__name__}: {str(error)[:200]}"


class LLMClient:
    """One named client: its endpoint, its limits, its cache and its own accounting."""

    def __init__(
        self,
        settings: LLMSettings,
        cache: ResponseCache | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.settings = settings
        self.cache = cache
        self.stats = LLMStats()
        self.log = log or (lambda message: None)
        self._semaphore: asyncio.Semaphore | None = None
        self._limiter: AsyncLimiter | None = None
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # The asyncio objects belong to one event loop: build them inside it, anew for a new loop
    # (each asset step runs its own `asyncio.run`).
    def _ensure_loop_state(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._semaphore = asyncio.Semaphore(self.settings.max_concurrency)
            if self.settings.requests_per_minute:
                self._limiter = AsyncLimiter(self.settings.requests_per_minute, 60)
            raw = openai.AsyncOpenAI(
                base_url=self.settings.base_url,
                api_key=self.settings.api_key,
                timeout=self.settings.timeout_seconds,
                max_retries=0,  # retries are ours, so they are counted and honour Retry-After
            )
            self._client = instructor.from_openai(raw, mode=MODES[self.settings.mode])

    @property
    def semaphore(self) -> asyncio.Semaphore:
        self._ensure_loop_state()
        assert self._semaphore is not None
        return self._semaphore

    def _wait(self, state: RetryCallState) -> float:
        backoff = min(
            self.settings.max_backoff_seconds,
            self.settings.backoff_seconds * 2 ** (state.attempt_number - 1),
        )
        backoff = random.uniform(backoff / 2, backoff)  # jitter spreads a 429 storm out
        error = state.outcome.exception() if state.outcome else None
        server_says = retry_after_seconds(error) if error else None
        return max(backoff, server_says or 0.0)

    def _count_retry(self, state: RetryCallState) -> None:
        self.stats.retries += 1
        error = state.outcome.exception() if state.outcome else None
        if error is not None:
            self.log(f"retrying after {describe(error)} (attempt {state.attempt_number})")

    async def complete(
        self, prompt: Prompt, messages: list[dict[str, str]], response_model: type[T]
    ) -> T | LLMFailure:
        """One structured call, answered from the cache when it was paid for before."""
        self._ensure_loop_state()
        key = cache_key(self.settings.model, prompt.key, messages, response_model.model_json_schema())
        if self.cache is not None and (cached := self.cache.get(key)) is not None:
            self.stats.cache_hits += 1
            return response_model.model_validate_json(cached)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.settings.max_attempts),
                wait=self._wait,
                retry=retry_if_exception(is_retryable),
                before_sleep=self._count_retry,
                reraise=True,
            ):
                with attempt:
                    result = await self._call(messages, response_model)
        except Exception as error:  # noqa: BLE001 - every failure is recorded, none is lost
            self.stats.failures += 1
            reason = describe(error)
            self.stats.failure_reasons[reason] = self.stats.failure_reasons.get(reason, 0) + 1
            return LLMFailure(reason=reason)
        if self.cache is not None:
            self.cache.put(key, prompt.key, result.model_dump_json())
        return result

    async def _call(self, messages: list[dict[str, str]], response_model: type[T]) -> T:
        assert self._semaphore is not None
        if self._limiter is not None:
            await self._limiter.acquire()
        async with self._semaphore:
            self.stats.calls += 1
            kwargs: dict[str, Any] = {}
            if self.settings.extra_body:
                kwargs["extra_body"] = self.settings.extra_body
            result, completion = await self._client.chat.completions.create_with_completion(
                model=self.settings.model,
                messages=messages,
                response_model=response_model,
                temperature=self.settings.temperature,
                max_retries=0,
                **kwargs,
            )
        usage = getattr(completion, "usage", None)
        if usage is not None:
            self.stats.input_tokens += usage.prompt_tokens or 0
            self.stats.output_tokens += usage.completion_tokens or 0
        return result

    async def gather(self, calls: Sequence[Awaitable[Any]], label: str) -> list[Any]:
        """Run calls concurrently (the semaphore bounds them), logging progress with an ETA."""
        total = len(calls)
        done = 0
        started = time.monotonic()
        last_report = started

        async def tracked(call: Awaitable[Any]) -> Any:
            nonlocal done, last_report
            result = await call
            done += 1
            now = time.monotonic()
            if now - last_report >= 5 or done == total:
                last_report = now
                rate = done / max(now - started, 1e-9)
                eta = (total - done) / rate if rate else float("inf")
                self.log(f"{label}: {done}/{total} done, {rate:.1f}/s, ETA {eta:.0f}s")
            return result

        return list(await asyncio.gather(*(tracked(call) for call in calls)))
