"""The LLM resource: offline by default; any OpenAI-compatible endpoint, or a local llama.cpp
server with a GGUF model, when configured."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from dagster import ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr

from kura_pipeline.core.llm import LLMClient, LLMSettings
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.prompts import DEFAULT_CONVERSATION_CHAR_BUDGET


class LLMResource(ConfigurableResource):
    """`offline`: no model; summaries from the user's own words, names from distinctive terms.
    `openai`: OpenAI, Gemini's OpenAI endpoint, vLLM, Ollama, llama.cpp... through instructor.
    `local`: llama.cpp's own server started in-process (xllamacpp) on 127.0.0.1 with
    `local_model`: a catalogue name (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b) or
    the path of your own GGUF file. Same code path as a remote endpoint.

    The API key belongs in the environment (Dagster `EnvVar`); it is never logged or stored.
    """

    backend: Literal["offline", "openai", "local"] = "offline"
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
    local_model: str = "smollm2-135m"
    local_threads: int = 2

    _server: Any = PrivateAttr(default=None)
    _local: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # The local server lives as long as the step that uses it, and only when asked for.
        if self.backend == "local":
            from kura_pipeline.core.local_models import resolve_local_model
            from kura_pipeline.servers.llamacpp import LlamaCppServer

            self._local = resolve_local_model(self.local_model)
            self._server = LlamaCppServer(
                self._local.path, alias=self._local.alias, n_ctx=self._local.n_ctx, threads=self.local_threads
            ).start()

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def is_offline(self) -> bool:
        return self.backend == "offline"

    @property
    def label(self) -> str:
        """Which backend made the results: recorded in every stage's metadata."""
        if self.is_offline:
            return "offline (no LLM)"
        if self.backend == "local":
            return f"local llama.cpp:{self.local_model}"
        return f"openai-compatible:{self.model}"

    @property
    def char_budget(self) -> int:
        """How much of a conversation a summary prompt may carry (a local model's context is small)."""
        if self._local is not None:
            return min(self.conversation_char_budget, self._local.char_budget)
        return self.conversation_char_budget

    def client(self, log: Callable[[str], None] | None = None) -> LLMClient:
        extra_body: dict[str, Any] = json.loads(self.extra_body_json) if self.extra_body_json else {}
        base_url, model, concurrency = self.base_url, self.model, self.max_concurrency
        if self.backend == "local":
            if self._server is None:
                raise RuntimeError("the local llama.cpp server is not running (resource not set up)")
            base_url, model = self._server.base_url, self._local.alias
            extra_body = {**self._local.extra_body, **extra_body}
            concurrency = 1  # one llama.cpp slot: more would only queue at the server
        settings = LLMSettings(
            model=model,
            base_url=base_url,
            api_key=self.api_key or "not-needed",
            mode=self.mode,
            max_concurrency=concurrency,
            requests_per_minute=self.requests_per_minute,
            timeout_seconds=self.timeout_seconds,
            max_attempts=self.max_attempts,
            temperature=self.temperature,
            extra_body=extra_body or None,
        )
        cache = ResponseCache(Path(self.cache_path)) if self.cache_path else None
        return LLMClient(settings, cache=cache, log=log)
