"""Shared test data: small, realistic conversations on clearly different topics, a registry of
them (`dataset_dir`), and the loopback LLM server (`server`; its helpers: support/llm_fixtures.py)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kura_pipeline.core.models import Conversation, Message
from kura_pipeline_tests.support.llm_fixtures import write_jsonl, write_jsonl_dataset
from kura_pipeline_tests.support.loopback import LoopbackServer

__all__ = ["ANSWERS", "TOPICS", "make_conversations", "write_jsonl"]  # imported by the test modules

TOPICS: dict[str, list[str]] = {
    "python_debugging": [
        "My Python script raises KeyError when I read the config dictionary, how do I fix it?",
        "Why does my pandas DataFrame merge produce duplicate rows in Python?",
        "I get 'IndexError: list index out of range' in my Python loop, what is wrong?",
        "How do I debug a Python function that returns None instead of a list?",
        "My Python unit test fails with an AttributeError on a mocked object.",
        "Python asyncio task never finishes and the event loop hangs, help me debug it.",
        "Fix the TypeError 'int object is not iterable' in my Python code.",
        "My Flask app in Python crashes with a 500 error when posting a form.",
    ],
    "cooking": [
        "Give me a recipe for a vegetarian lasagna with spinach and ricotta.",
        "How long should I roast a whole chicken at 200 degrees in the oven?",
        "What can I cook for dinner with rice, eggs, and frozen peas?",
        "Suggest a simple chocolate cake recipe without eggs.",
        "How do I make fluffy pancakes from scratch for breakfast?",
        "What spices go well in a lentil curry recipe?",
        "How do I bake sourdough bread with a crispy crust at home?",
        "Give me a quick tomato pasta sauce recipe for weeknight dinners.",
    ],
    "travel": [
        "Plan a three day itinerary for a city trip with museums and parks.",
        "What should I pack for a two week hiking trip in the mountains?",
        "How can I find cheap flights and hotels for a summer vacation?",
        "Suggest a road trip route along the coast with scenic stops.",
        "What are tips for travelling by train across several countries?",
        "Help me plan a beach holiday on a budget for a family of four.",
        "Which documents do I need for an international trip abroad?",
        "Recommend activities for a weekend getaway in a small mountain village.",
    ],
    "sql": [
        "Write a SQL query that joins orders and customers and sums revenue per month.",
        "How do I find duplicate rows in a SQL table using GROUP BY and HAVING?",
        "My SQL query with a LEFT JOIN is slow, which index should I add?",
        "Explain the difference between INNER JOIN and OUTER JOIN in SQL.",
        "Write a SQL window function to rank employees by salary within departments.",
        "How do I update rows in one SQL table from another table's values?",
        "Convert this nested SQL subquery into a common table expression.",
        "Write a SQL query to count active users per day from a login events table.",
    ],
    "poetry": [
        "Write a short poem about autumn leaves falling in the wind.",
        "Compose a haiku about the ocean at night.",
        "Write a rhyming poem for my friend's birthday card.",
        "Help me write a sonnet about lost love and memory.",
        "Write a funny limerick about a cat who loves cheese.",
        "Create a free verse poem about city lights and loneliness.",
        "Write a poem about spring rain for a children's book.",
        "Compose a short poem celebrating the first snow of winter.",
    ],
}

ANSWERS = {
    "python_debugging": "Check the traceback: the error comes from the line shown. Here is a fix.",
    "cooking": "Here is a recipe with ingredients and steps, including cooking times and temperatures.",
    "travel": "Here is a plan with places to visit, transport options and a rough budget.",
    "sql": "Here is the SQL query, with an explanation of each clause and an index suggestion.",
    "poetry": "Here is a poem with a few lines in the style you asked for.",
}


def make_conversations(per_topic: int = 8) -> list[Conversation]:
    """Conversations whose true topic is in metadata['topic'] (so clustering can be checked)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    conversations = []
    for t, (topic, requests) in enumerate(TOPICS.items()):
        for i, request in enumerate(requests[:per_topic]):
            created = start + timedelta(days=t * 10 + i, hours=i)
            conversations.append(
                Conversation(
                    chat_id=f"{topic}-{i}",
                    created_at=created,
                    messages=[
                        Message(role="user", content=request, created_at=created),
                        Message(role="assistant", content=ANSWERS[topic], created_at=created),
                    ],
                    metadata={"topic": topic, "model": "test-model"},
                )
            )
    return conversations


@pytest.fixture
def conversations() -> list[Conversation]:
    return make_conversations()


@pytest.fixture
def dataset_dir(tmp_path: Path, conversations: list[Conversation]) -> Path:
    """A registry with one small `topics` dataset in JSONL, in a temporary folder."""
    write_jsonl_dataset(tmp_path, "topics", conversations)
    return tmp_path


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    """The loopback OpenAI-compatible server on 127.0.0.1, for one test (a module that needs it
    started otherwise defines a `server` of its own)."""
    with LoopbackServer() as srv:
        yield srv
