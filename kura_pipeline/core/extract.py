"""Extracted properties: the user's extractor functions plus the conversation's own metadata.

Two calling conventions, chosen from the function's signature:

- Kura's, as its documentation writes them: ``extractor(conversation, sems, clients)``, positional.
  ``clients[name]`` is an instructor-style async client (an ``openai.AsyncOpenAI`` for the named
  client's endpoint) whose ``chat.completions.create(..., response_model=...)`` goes through the
  project's ``LLMClient.complete``: its limits, retries, cache and accounting. ``sems[name]`` is an
  ``asyncio.Semaphore`` sized as the client's concurrency, separate from the one ``complete``
  holds, so holding it around the call (as Kura's examples do) cannot deadlock.
- The project's own: ``extractor(conversation, clients=..., semaphores=...)`` by keyword, with
  ``LLMClient`` objects. A client's ``complete`` already holds that client's semaphore while it
  calls: an extractor must not hold ``semaphores[name]`` around it, or it waits for itself.

A function that takes only the conversation is called with it alone. Each returns one
ExtractedProperty, several, or None. Plain-code extractors may be ordinary functions; LLM
extractors are ``async def``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import openai

from kura_pipeline.core.llm import LLMClient, LLMFailure
from kura_pipeline.core.models import Conversation, ExtractedProperty
from kura_pipeline.core.prompts import Prompt

Extractor = Callable[..., Any]
CallStyle = Literal["kura", "keyword", "plain"]

# The cache key of a Kura-style call: the extractor's own messages and response schema, under
# this prompt name (the messages are the user's, so there is no template of ours in them).
KURA_EXTRACTOR_PROMPT = Prompt(name="kura_extractor", version="1", system="", user_template="")


def message_count(conversation: Conversation, **_: Any) -> ExtractedProperty:
    return ExtractedProperty(name="message_count", value=len(conversation.messages))


def user_turns(conversation: Conversation, **_: Any) -> ExtractedProperty:
    return ExtractedProperty(
        name="user_turns", value=sum(1 for m in conversation.messages if m.role == "user")
    )


def conversation_characters(conversation: Conversation, **_: Any) -> ExtractedProperty:
    return ExtractedProperty(
        name="conversation_characters", value=sum(len(m.content) for m in conversation.messages)
    )


BUILT_IN = {
    "message_count": message_count,
    "user_turns": user_turns,
    "conversation_characters": conversation_characters,
}

# Functions handed over in this process (the notebook API's SummaryModel(extractors=[fn])): a
# function defined in a notebook cell or a test has no importable 'module:function' name, and
# the Dagster job runs in this same process, so it is found here by its reference.
_IN_PROCESS: dict[str, Extractor] = {}


class ExtractorError(ValueError):
    pass


def register_extractor(function: Extractor) -> str:
    """A reference `load_extractor` resolves to `function` in this process (a later function of
    the same module and name replaces an earlier one: a notebook cell run again)."""
    if not callable(function):
        raise ExtractorError(f"an extractor must be callable, not {type(function).__name__}")
    module = getattr(function, "__module__", None) or "unknown"
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)
    reference = f"{module}:{name}"
    _IN_PROCESS[reference] = function
    return reference


def load_extractor(reference: str) -> Extractor:
    """A built-in name, a function registered in this process, or 'package.module:function'.
    Any failure is one ExtractorError line naming the reference."""
    if reference in BUILT_IN:
        return BUILT_IN[reference]
    if reference in _IN_PROCESS:
        return _IN_PROCESS[reference]
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ExtractorError(
            f"extractor {reference!r} is neither built in ({', '.join(BUILT_IN)}) nor 'module:function'"
        )
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):  # 'module:Class.method' too
            found = getattr(found, part)
    except Exception as error:  # noqa: BLE001 - a module's import can raise anything; one line says what
        problem = " ".join(f"{type(error).__name__}: {error}".split())
        raise ExtractorError(f"cannot import extractor {reference!r}: {problem}") from error
    if not callable(found):
        raise ExtractorError(f"extractor {reference!r} is a {type(found).__name__}, not a function")
    return found


def call_style(extractor: Extractor) -> CallStyle:
    """How an extractor is called, from its signature: Kura's positional (conversation, sems,
    clients), the project's keywords (clients=, semaphores=), or the conversation alone."""
    try:
        parameters = inspect.signature(extractor).parameters
    except (TypeError, ValueError):  # a builtin without a signature: the project's convention
        return "keyword"
    kinds = [p.kind for p in parameters.values()]
    if inspect.Parameter.VAR_KEYWORD in kinds or "semaphores" in parameters:
        return "keyword"
    if "sems" in parameters:
        return "kura"
    if "clients" in parameters:
        return "keyword"
    positional = [
        k for k in kinds if k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if len(positional) >= 3 or inspect.Parameter.VAR_POSITIONAL in kinds:
        return "kura"
    return "plain"


def _keywords(extractor: Extractor) -> tuple[str, ...]:
    """Which of the project's keywords an extractor takes (all, with **kwargs or no signature)."""
    try:
        parameters = inspect.signature(extractor).parameters
    except (TypeError, ValueError):
        return ("clients", "semaphores")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return ("clients", "semaphores")
    return tuple(key for key in ("clients", "semaphores") if key in parameters)


class ExtractorLLMError(RuntimeError):
    """A Kura-style client call that failed after the project's retries (the reason is kept)."""


class _Completions:
    def __init__(self, owner: KuraClient):
        self._owner = owner

    async def create(
        self,
        *args: Any,
        messages: list[dict[str, Any]] | None = None,
        response_model: type[Any] | None = None,
        model: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """instructor's call. With a response_model it is the project's `complete` (limits,
        retries, cache); the `model` asked for is ignored: the client's configured model answers
        (a Kura example names Gemini; the endpoint configured here is what is paid for)."""
        llm = self._owner.llm
        if response_model is None:
            # A plain completion (no schema): straight to the endpoint, under the client's limit.
            for instructor_only in ("max_retries", "context", "validation_context", "strict", "hooks"):
                kwargs.pop(instructor_only, None)
            async with llm.semaphore:
                raw = openai.AsyncOpenAI.chat.func(self._owner)  # type: ignore[attr-defined]
                return await raw.completions.create(
                    *args, messages=messages or [], model=llm.settings.model, **kwargs
                )
        plain = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages or []]
        answer = await llm.complete(KURA_EXTRACTOR_PROMPT, plain, response_model)
        if isinstance(answer, LLMFailure):
            raise ExtractorLLMError(f"LLM client {llm.name!r}: {answer.reason}")
        return answer


class _Chat:
    def __init__(self, owner: KuraClient):
        self.completions = _Completions(owner)


class KuraClient(openai.AsyncOpenAI):
    """What a Kura-style extractor receives as `clients[name]`: an `openai.AsyncOpenAI` for the
    named client's endpoint and key (so `isinstance(client, AsyncOpenAI)` holds and its other
    endpoints, e.g. `moderations`, are there), with instructor's
    `chat.completions.create(..., response_model=...)` routed through `LLMClient.complete`."""

    def __init__(self, llm: LLMClient):
        settings = llm.settings
        super().__init__(
            base_url=settings.base_url,
            api_key=settings.api_key,
            timeout=(settings.connect_timeout_seconds, *[settings.read_timeout] * 3),
            max_retries=settings.max_attempts - 1,
        )
        self.llm = llm

    @functools.cached_property
    def chat(self) -> _Chat:  # type: ignore[override]
        return _Chat(self)

    async def create(self, *args: Any, **kwargs: Any) -> Any:
        """instructor's `client.create(...)` shorthand."""
        return await self.chat.completions.create(*args, **kwargs)

    def __repr__(self) -> str:  # never the key
        return f"KuraClient({self.llm.settings!r})"


class _NoClient:
    """Stands in for a client that does not exist, so the extractor fails with this reason (one
    line) rather than "'NoneType' object has no attribute 'chat'"."""

    def __init__(self, name: str, known: list[str]):
        self._reason = f"no LLM client {name!r}: " + (
            f"the clients are {', '.join(known)}" if known else "the LLM backend is offline (no clients)"
        )

    def __getattr__(self, attribute: str) -> Any:
        raise ExtractorError(self._reason)

    def __bool__(self) -> bool:
        return False


class KuraClients(dict[str, Any]):
    """`clients` as Kura passes it: `.get(name)` of an unknown name is a stand-in that fails
    with a clear reason when used."""

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        if name in self:
            return self[name]
        return default if default is not None else _NoClient(name, list(self))


class KuraSemaphores(dict[str, asyncio.Semaphore]):
    """`sems` as Kura passes it: one semaphore per client; an unknown name gets one of its own
    (a limit for a service the project does not know, e.g. a plain HTTP API)."""

    def __init__(self, sizes: dict[str, int], default_size: int = 8):
        super().__init__({name: asyncio.Semaphore(size) for name, size in sizes.items()})
        self._default_size = default_size

    def __missing__(self, name: str) -> asyncio.Semaphore:
        semaphore = self[name] = asyncio.Semaphore(self._default_size)
        return semaphore

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[name] if name in self or default is None else default


def metadata_properties(conversation: Conversation) -> list[ExtractedProperty]:
    """The conversation's own metadata, one property per key (lists as JSON text)."""
    return [
        ExtractedProperty(
            name=f"metadata.{key}",
            value=json.dumps(value, ensure_ascii=False) if isinstance(value, list) else value,
        )
        for key, value in sorted(conversation.metadata.items())
    ]


def as_properties(result: Any) -> list[ExtractedProperty]:
    """An extractor's result as properties: one, a list, or None; anything with `name` and
    `value` (Kura's own ExtractedProperty too) is taken. Anything else raises TypeError."""
    if result is None:
        return []
    items = result if isinstance(result, list | tuple) else [result]
    properties = []
    for item in items:
        if isinstance(item, ExtractedProperty):
            properties.append(item)
        elif hasattr(item, "name") and hasattr(item, "value"):
            properties.append(ExtractedProperty(name=item.name, value=item.value))
        else:
            raise TypeError(f"returned {type(item).__name__}, not an ExtractedProperty")
    return properties


@dataclass
class ExtractionRun:
    rows: list[tuple[str, ExtractedProperty]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def extract_properties(
    conversations: list[Conversation],
    extractors: dict[str, Extractor],
    clients: dict[str, LLMClient] | None = None,
) -> ExtractionRun:
    """Run every extractor on every conversation, concurrently (LLM extractors bound themselves
    with the semaphores they are given); a failing extractor is reported, not fatal."""
    clients = clients or {}
    styles = {name: call_style(fn) for name, fn in extractors.items()}
    keywords = {name: _keywords(fn) for name, fn in extractors.items() if styles[name] == "keyword"}
    semaphores = {name: client.semaphore for name, client in clients.items()}
    # Kura's objects only when a Kura-style extractor is there (each holds an HTTP client).
    kura_clients = KuraClients()
    kura_sems = KuraSemaphores({name: client.settings.max_concurrency for name, client in clients.items()})
    if "kura" in styles.values():
        kura_clients.update({name: KuraClient(client) for name, client in clients.items()})

    def call(name: str, extractor: Extractor, conversation: Conversation) -> Any:
        style = styles[name]
        if style == "kura":
            return extractor(conversation, kura_sems, kura_clients)
        if style == "plain":
            return extractor(conversation)
        given = {"clients": clients, "semaphores": semaphores}
        return extractor(conversation, **{key: given[key] for key in keywords[name]})

    async def one(conversation: Conversation, name: str, extractor: Extractor) -> Any:
        try:
            result = call(name, extractor, conversation)
            return as_properties(await result if inspect.isawaitable(result) else result)
        except Exception as error:  # noqa: BLE001 - one bad extractor must not sink the stage
            return ExtractorFailure(f"{name} on {conversation.chat_id}: {type(error).__name__}: {error}")

    jobs = [(c, one(c, name, fn)) for c in conversations for name, fn in extractors.items()]
    try:
        results = await asyncio.gather(*(job for _, job in jobs))
    finally:
        for client in kura_clients.values():
            await client.close()
    run = ExtractionRun()
    for conversation in conversations:
        run.rows.extend((conversation.chat_id, prop) for prop in metadata_properties(conversation))
    for (conversation, _), result in zip(jobs, results, strict=True):
        if isinstance(result, ExtractorFailure):
            run.failures.append(result.reason)
        else:
            run.rows.extend((conversation.chat_id, prop) for prop in result)
    return run


@dataclass(frozen=True)
class ExtractorFailure:
    reason: str
