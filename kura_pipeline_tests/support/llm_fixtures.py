"""Shared helpers of the tests that run against the loopback server (`support.loopback`): LLM
settings and resources pointed at it, small conversations, a small JSONL registry, the
`kura-pipeline` CLI in a temporary folder. The `server` fixture itself is in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kura_pipeline.core.models import Conversation, Message

if TYPE_CHECKING:  # imported where used: conftest.py imports this module for every test module,
    # and most of them need neither the LLM engine nor Dagster (seconds to import)
    from kura_pipeline.core.llm import LLMSettings
    from kura_pipeline.resources.llm import LLMResource
    from kura_pipeline_tests.support.loopback import LoopbackServer

JANUARY_FIRST = datetime(2026, 1, 1, tzinfo=UTC)
KURA_PIPELINE = str(Path(sys.executable).parent / "kura-pipeline")
SUMMARISE_SCRIPT = Path(__file__).parents[1] / "scripts" / "summarise_subprocess.py"


def loopback_settings(server: LoopbackServer, **overrides: Any) -> LLMSettings:
    """The engine's settings for the loopback server: short timeouts and backoff, so fault drills
    take seconds; four calls at a time and three attempts unless `overrides` say otherwise."""
    from kura_pipeline.core.llm import LLMSettings

    values: dict[str, Any] = {
        "model": "loopback",
        "base_url": server.base_url,
        "max_concurrency": 4,
        "read_timeout_seconds": 5.0,
        "max_attempts": 3,
        "backoff_seconds": 0.02,
        "max_backoff_seconds": 0.1,
    }
    return LLMSettings(**(values | overrides))


def loopback_resource(server: LoopbackServer, **overrides: Any) -> LLMResource:
    """The Dagster LLM resource (the openai-compatible backend) at the loopback server, model
    "loopback", no response cache unless `overrides` name a `cache_path`."""
    from kura_pipeline.resources.llm import LLMResource

    values: dict[str, Any] = {
        "backend": "openai",
        "base_url": server.base_url,
        "model": "loopback",
        "cache_path": "",
    }
    return LLMResource(**(values | overrides))


def question_and_answer(
    questions: Iterable[str], *, answer: str, tag: str, created_at: datetime | None = JANUARY_FIRST
) -> list[Conversation]:
    """A conversation for each question: the user asks it and the assistant gives `answer`; chat
    ids `{tag}-0`, `{tag}-1`, ... in order."""
    return [
        Conversation(
            chat_id=f"{tag}-{index}",
            created_at=created_at,
            messages=[Message(role="user", content=question), Message(role="assistant", content=answer)],
        )
        for index, question in enumerate(questions)
    ]


def summarise_command(base_url: str, cache: Path, count: int, concurrency: int) -> list[str]:
    """scripts/summarise_subprocess.py in a process of its own: `count` conversations summarised
    at `base_url`, through the response cache at `cache`."""
    return [
        sys.executable,
        str(SUMMARISE_SCRIPT),
        "--base-url",
        base_url,
        "--cache",
        str(cache),
        "--count",
        str(count),
        "--concurrency",
        str(concurrency),
    ]


# ----- a small registry -----


def write_jsonl(conversations: list[Conversation], path: Path) -> Path:
    with path.open("w", encoding="utf-8") as file:
        for conversation in conversations:
            file.write(conversation.model_dump_json() + "\n")
    return path


def jsonl_entry(file: str, **extra: Any) -> dict[str, Any]:
    """A registry entry: the JSONL file `file` (relative to the registry), and `extra` keys."""
    return {"loader": "jsonl", "options": {"path": file}, **extra}


def write_registry(folder: Path, datasets: dict[str, dict[str, Any]]) -> Path:
    """`folder`/datasets.yaml naming `datasets` (written as JSON, which YAML reads)."""
    path = folder / "datasets.yaml"
    path.write_text(json.dumps({"datasets": datasets}), encoding="utf-8")
    return path


def write_jsonl_dataset(folder: Path, name: str, conversations: list[Conversation]) -> Path:
    """`folder`/`name`.jsonl holding `conversations`, and a registry there whose one dataset is
    `name`; returns the registry's path."""
    write_jsonl(conversations, folder / f"{name}.jsonl")
    return write_registry(folder, {name: jsonl_entry(f"{name}.jsonl")})


# ----- the CLI in a temporary folder -----


def cli_env(folder: Path, **extra: str) -> dict[str, str]:
    """The environment of a `kura-pipeline` run in `folder` (its registry, data, response cache
    and Dagster home), none of the user's KURA_, DAGSTER_, OPENAI_ or BROWSER settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KURA_", "DAGSTER_", "OPENAI_", "BROWSER"))
    }
    (folder / "dagster.yaml").touch()
    return env | {
        "KURA_DATASETS": str(folder / "datasets.yaml"),
        "KURA_DATA_DIR": str(folder / "data"),
        "KURA_LLM_CACHE": str(folder / "cache.sqlite3"),
        "DAGSTER_HOME": str(folder),
        **extra,
    }


def loopback_env(server: LoopbackServer) -> dict[str, str]:
    """What `cli_env` adds for a run whose LLM is the loopback server (model "loopback")."""
    return {"KURA_LLM_BASE_URL": server.base_url, "KURA_LLM_MODEL": "loopback"}


def kura_pipeline(
    folder: Path, *args: str, timeout: int = 300, **extra: str
) -> subprocess.CompletedProcess[str]:
    """The real CLI, in a subprocess in `folder` with `cli_env(folder, **extra)`."""
    return subprocess.run(
        [KURA_PIPELINE, *args],
        env=cli_env(folder, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=folder,
    )
