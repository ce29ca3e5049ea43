"""Summarise N synthetic conversations against an LLM endpoint with a persistent response cache.

Used by the kill test (`test_core_llm.py`): the test starts this as a child process, kills it
with SIGKILL mid-stage, and starts it again against the same cache. The conversations depend
only on N, so both runs ask the same questions. Prints one JSON line with the outcome.

    python summarise_subprocess.py --base-url http://127.0.0.1:PORT/v1 --cache c.sqlite3 --count 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime

from kura_pipeline.core.llm import LLMClient, LLMSettings
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.models import Conversation, Message
from kura_pipeline.core.summarise import summarise_all_with_llm

TOPICS = ["a SQL join", "a sourdough loaf", "a train itinerary", "a Python KeyError", "a haiku"]


def conversations(count: int) -> list[Conversation]:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        Conversation(
            chat_id=f"kill-{index}",
            created_at=created,
            messages=[
                Message(role="user", content=f"Request {index}: help me with {TOPICS[index % len(TOPICS)]}."),
                Message(role="assistant", content=f"Here is help with {TOPICS[index % len(TOPICS)]}."),
            ],
        )
        for index in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    settings = LLMSettings(model="loopback", base_url=args.base_url, max_concurrency=args.concurrency)
    with ResponseCache(args.cache) as cache:
        client = LLMClient(settings, cache=cache)
        run = asyncio.run(summarise_all_with_llm(conversations(args.count), client, char_budget=4000))
    outcome = {"summarised": len(run.summaries), "failed": len(run.failures), **client.stats.as_metadata()}
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
