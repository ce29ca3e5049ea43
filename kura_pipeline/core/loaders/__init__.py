"""Read conversation data from files into `Conversation` models.

Every loader returns a LoadResult: the conversations plus a SkippedRecord for each
record it could not use (the file, which record, why). Nothing is dropped silently.

- Whole-file problems (missing file, not JSON, wrong top-level shape, a syntax error
  in the middle of a JSON list) raise LoaderError naming the file and position.
- A file that ends mid-record keeps every complete record and reports the tail as one
  SkippedRecord. In JSON Lines each unparseable line is one SkippedRecord.
- A bad record (missing fields, wrong types, unparseable timestamp, unknown role, no
  user/assistant message with text) is one SkippedRecord; its neighbours load normally.

Cleaning applied everywhere: roles map to "user"/"assistant" (human/prompter ->
user; gpt/chatgpt/bing/bard/model -> assistant); system/developer/tool/function
messages, blank texts and non-text content are dropped and counted in
metadata["dropped_messages"] (present only when non-zero); \\r\\n becomes \\n and other
C0 control characters except \\t are removed; timestamps (ISO 8601 with or without
zone, unix seconds) become UTC, and a source without them (ShareGPT, HF datasets without
created_at_fn) leaves created_at None: unknown, never a made-up day. Files are decoded as
UTF-8; each invalid byte, and each lone surrogate (a "\\ud800" JSON escape) anywhere in a
conversation, becomes U+FFFD and is counted in metadata["replaced_characters"] (present only
when non-zero).

Whatever one record holds (wrong types, lone surrogates, nesting 100,000 levels deep, a
5,000-digit number, a 10 MB string where a timestamp should be), it costs that record at most:
a problem no check foresaw is still one SkippedRecord, naming the exception.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kura_pipeline.core.loaders._base import (
    REPLACED_CHARACTERS,
    LoaderError,
    LoadResult,
    SkippedRecord,
)
from kura_pipeline.core.loaders.chatgpt import iter_chatgpt_export, load_chatgpt_export
from kura_pipeline.core.loaders.claude import iter_claude_export, load_claude_export
from kura_pipeline.core.loaders.dedup import DUPLICATE_REASONS, Deduplicator, deduplicate
from kura_pipeline.core.loaders.generic import iter_jsonl, load_jsonl, load_parquet
from kura_pipeline.core.loaders.huggingface import load_hf_dataset
from kura_pipeline.core.loaders.kura_checkpoint import (
    iter_kura_checkpoint,
    load_kura_checkpoint,
    load_kura_summaries,
)
from kura_pipeline.core.loaders.sharegpt import load_sharegpt, load_sharegpt_package
from kura_pipeline.core.models import Conversation, ConversationSummary

LOADERS: dict[str, Callable[..., LoadResult]] = {
    "claude": load_claude_export,
    "chatgpt": load_chatgpt_export,
    "sharegpt": load_sharegpt,
    "sharegpt_package": load_sharegpt_package,
    "jsonl": load_jsonl,
    "parquet": load_parquet,
    "huggingface": load_hf_dataset,
    "kura_checkpoint": load_kura_checkpoint,
}


# Loaders that can hand over one record at a time (see iter_load).
STREAMING_LOADERS: dict[str, Callable[..., Iterator[Conversation | SkippedRecord]]] = {
    "claude": iter_claude_export,
    "chatgpt": iter_chatgpt_export,
    "jsonl": iter_jsonl,
    "kura_checkpoint": iter_kura_checkpoint,
}

# Loaders whose source also carries summaries already made (Kura's checkpoints): the summaries
# stage can take these instead of paying a model again. Same options as the loader.
SUMMARY_LOADERS: dict[str, Callable[..., tuple[dict[str, ConversationSummary], list[SkippedRecord]]]] = {
    "kura_checkpoint": load_kura_summaries,
}


def prior_summaries(loader: str, options: dict[str, Any]) -> dict[str, ConversationSummary]:
    """The summaries a dataset's source already carries, by chat_id ({} for most loaders)."""
    load_summaries = SUMMARY_LOADERS.get(loader)
    return load_summaries(**options)[0] if load_summaries is not None else {}


def _checked(loader: str, options: dict[str, Any]) -> Callable[..., LoadResult]:
    try:
        load_function = LOADERS[loader]
    except KeyError:
        raise LoaderError(f"unknown loader {loader!r}; known loaders: {', '.join(LOADERS)}") from None
    try:
        inspect.signature(load_function).bind(**options)
    except TypeError as error:
        raise LoaderError(f"loader {loader!r}: bad options: {error}") from None
    return load_function


def _source(loader: str, options: dict[str, Any]) -> str:
    return str(options.get("data_files") or options.get("path") or loader)


def load(loader: str, **options: Any) -> LoadResult:
    """Run the loader named `loader` with `options`, then de-duplicate by chat_id."""
    loaded = _checked(loader, options)(**options)
    deduplicated = deduplicate(loaded.conversations, _source(loader, options))
    return LoadResult(deduplicated.conversations, loaded.skipped + deduplicated.skipped)


def iter_load(loader: str, **options: Any) -> Iterator[Conversation | SkippedRecord]:
    """`load` one record at a time: the same conversations and skipped records (duplicates
    reported where they are met, not after the loader's own skips).

    Loaders in STREAMING_LOADERS read the file as they go, so a caller that turns each
    conversation into something smaller (a table chunk) never holds every conversation's models
    at once (5 GB for 100,000 ShareGPT-sized chats); the others load whole, then hand over."""
    load_function = _checked(loader, options)
    if loader in STREAMING_LOADERS:
        items: Iterable[Conversation | SkippedRecord] = STREAMING_LOADERS[loader](**options)
    else:
        loaded = load_function(**options)
        items = [*loaded.skipped, *loaded.conversations]
        del loaded
    deduplicator = Deduplicator(_source(loader, options))
    for item in items:
        if isinstance(item, SkippedRecord):
            yield item
        else:
            yield deduplicator.skip(item) or item


__all__ = [
    "DUPLICATE_REASONS",
    "Deduplicator",
    "LOADERS",
    "STREAMING_LOADERS",
    "REPLACED_CHARACTERS",
    "SUMMARY_LOADERS",
    "LoadResult",
    "LoaderError",
    "SkippedRecord",
    "deduplicate",
    "iter_load",
    "load",
    "load_chatgpt_export",
    "load_claude_export",
    "load_hf_dataset",
    "load_kura_checkpoint",
    "load_kura_summaries",
    "load_jsonl",
    "load_parquet",
    "load_sharegpt",
    "load_sharegpt_package",
    "prior_summaries",
]
