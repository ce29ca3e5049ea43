"""The LLM resource: offline by default; any OpenAI-compatible endpoint when configured."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource

from kura_pipeline.core.llm import LLMClient, LLMSettings
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.prompts import DEFAULT_CONVERSATION_CHAR_BUDGET


class LLMResource(ConfigurableResource):
    """`offline`: no model; summaries from the user's own words, names from distinctive terms.
    `openai`: OpenAI, Gemini's OpenAI endpoint, vLLM, Ollama, llama.cpp... through instructor.

    The API key belongs in the environment (Dagster `EnvVar`); it is never logged or stored.
    """

    backend: Literal["offline", "openai"] = "offline"
    base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    mode: Literal["json_schema", "tools", "json", "md_json"] = "json_schema"
    max_concurrency: int = 8
    requests_per_minute: int | None = None
    timeout_seconds: float = 120.0
    max_attempts: int = 4
    temperature: float = 0.0
    extra_body_json: str | None = None
    cache_path: str = ".kura_cache/llm_responses.sqlite3"
    conversation_char_budget: int = DEFAULT_CONVERSATION_CHAR_BUDGET

    @property
    def is_offline(self) -> bool:
        return self.backend == "offline"

    @property
    def label(self) -> str:
        """Which backend made the results: recorded in every stage's metadata."""
        return "offline (no LLM)" if self.is_offline else f"openai-compatible:{self.model}"

    def client(self, log: Callable[[str], None] | None = None) -> LLMClient:
        settings = LLMSettings(
            model=self.model,
            base_url=self.base_url,
            api_key=self.api_key or "not-needed",
            mode=self.mode,
            max_concurrency=self.max_concurrency,
            requests_per_minute=self.requests_per_minute,
            timeout_seconds=self.timeout_seconds,
            max_attempts=self.max_attempts,
            temperature=self.temperature,
            extra_body=json.loads(self.extra_body_json) if self.extra_body_json else None,
        )
        cache = ResponseCache(Path(self.cache_path)) if self.cache_path else None
        return LLMClient(settings, cache=cache, log=log)
