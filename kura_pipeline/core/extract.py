"""Extracted properties: the user's extractor functions plus the conversation's own metadata.

An extractor follows Kura's signature idea: it receives the conversation and, by keyword, the
named LLM clients and their semaphores, and returns one ExtractedProperty, several, or None.
Plain-code extractors may be ordinary functions; LLM extractors are `async def`. A client's
`complete` already holds that client's semaphore while it calls (and is cached, limited and
retried): an extractor must not hold the semaphore around it, or it waits for itself.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kura_pipeline.core.llm import LLMClient
from kura_pipeline.core.models import Conversation, ExtractedProperty

Extractor = Callable[..., Any]


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


class ExtractorError(ValueError):
    pass


def load_extractor(reference: str) -> Extractor:
    """A built-in name, or 'package.module:function'."""
    if reference in BUILT_IN:
        return BUILT_IN[reference]
    module_name, _, attribute = reference.partition(":")
    if not attribute:
        raise ExtractorError(
            f"extractor {reference!r} is neither built in ({', '.join(BUILT_IN)}) nor 'module:function'"
        )
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ExtractorError(f"cannot import extractor {reference!r}: {error}") from error


def metadata_properties(conversation: Conversation) -> list[ExtractedProperty]:
    """The conversation's own metadata, one property per key (lists as JSON text)."""
    return [
        ExtractedProperty(
            name=f"metadata.{key}",
            value=json.dumps(value, ensure_ascii=False) if isinstance(value, list) else value,
        )
        for key, value in sorted(conversation.metadata.items())
    ]


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
    semaphores = {name: client.semaphore for name, client in clients.items()}

    async def one(conversation: Conversation, name: str, extractor: Extractor) -> Any:
        try:
            result = extractor(conversation, clients=clients, semaphores=semaphores)
            return await result if inspect.isawaitable(result) else result
        except Exception as error:  # noqa: BLE001 - one bad extractor must not sink the stage
            return ExtractorFailure(f"{name} on {conversation.chat_id}: {type(error).__name__}: {error}")

    jobs = [(c, one(c, name, fn)) for c in conversations for name, fn in extractors.items()]
    results = await asyncio.gather(*(job for _, job in jobs))
    run = ExtractionRun()
    for conversation in conversations:
        run.rows.extend((conversation.chat_id, prop) for prop in metadata_properties(conversation))
    for (conversation, _), result in zip(jobs, results, strict=True):
        if isinstance(result, ExtractorFailure):
            run.failures.append(result.reason)
        elif result is not None:
            run.rows.extend(
                (conversation.chat_id, prop) for prop in (result if isinstance(result, list) else [result])
            )
    return run


@dataclass(frozen=True)
class ExtractorFailure:
    reason: str
