"""The LLM resource: offline by default; any OpenAI-compatible endpoint, or a local llama.cpp
server with a GGUF model, when configured."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from dagster import Config, ConfigurableResource, InitResourceContext
from pydantic import PrivateAttr, ValidationError, model_validator

from kura_pipeline.core.backends import OFFLINE_LABEL, Backend, LLMBackend, OfflineBackend
from kura_pipeline.core.llm import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    DEFAULT_MAX_FAILURE_SHARE,
    DEFAULT_READ_TIMEOUT_SECONDS,
    NO_KEY,
    SETTING_RANGES,
    LLMClient,
    LLMSettings,
    settings_problems,
)
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.prompts import DEFAULT_CONVERSATION_CHAR_BUDGET
from kura_pipeline.core.redact import install_redaction

Mode = Literal["json_schema", "tools", "json", "md_json"]
DEFAULT_CLIENT = "default"
# A 1.5B model on two busy cores took 151 s for one summary: the local server gets more time.
LOCAL_READ_TIMEOUT_SECONDS = 600.0


class CheckedNumbers:
    """Every numeric setting in its range when the config is built (one line per problem naming
    the field and the range), never a hang or a traceback inside a stage."""

    @model_validator(mode="after")
    def _numbers_in_range(self) -> Any:
        values = {name: getattr(self, name) for name in SETTING_RANGES if hasattr(self, name)}
        if problems := settings_problems(values):
            raise ValueError("; ".join(problems))
        return self


class LLMClientLimits(CheckedNumbers, Config):
    """What every client (the resource's `default` and each named one) may set about how it
    calls its endpoint: declared once here, turned into the engine's `LLMSettings` by
    `engine_settings`. Numbers are checked when the config is built."""

    mode: Mode = "json_schema"
    max_concurrency: int = 8
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_output_tokens: int | None = None
    input_price_per_million: float | None = None
    output_price_per_million: float | None = None
    connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS
    timeout_seconds: float | None = None  # the old single timeout: the read timeout when given
    max_attempts: int = 4
    temperature: float = 0.0
    stage_deadline_seconds: float | None = None


# The fields above, as `LLMSettings` takes them.
LIMIT_FIELDS = frozenset(LLMClientLimits.model_fields)


class NamedLLMClient(LLMClientLimits):
    """Another OpenAI-compatible endpoint, with limits and prices of its own (Kura's named
    `clients`): a cheap model for extractors, a strong one for cluster names, a second key's quota.
    The key is read from the environment variable `api_key_env` when the client is built, so it
    never sits in run config, the UI or logs."""

    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    read_timeout_seconds: float = DEFAULT_READ_TIMEOUT_SECONDS
    # None: the resource's own setting.
    max_failure_share: float | None = None


class LLMResource(LLMClientLimits, ConfigurableResource):
    """`offline`: no model; summaries from the user's own words, names from distinctive terms.
    `openai`: OpenAI, Gemini's OpenAI endpoint, vLLM, Ollama, llama.cpp... through instructor.
    `local`: llama.cpp's own server started in-process (xllamacpp) on 127.0.0.1 with
    `local_model`: a catalogue name (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b) or
    the path of your own GGUF file. Same code path as a remote endpoint.

    The fields below `backend` describe the `default` client; `clients` adds named ones, and
    `summary_client` / `cluster_client` say which client summarises and which names clusters,
    builds the hierarchy and audits it. Extractors receive every client by name.

    Limits are per client and per process: `max_concurrency` requests in flight,
    `requests_per_minute`, `tokens_per_minute`. With prices (per million tokens), each stage's
    metadata has `llm_cost_usd`.

    Trust: a stage fails when all of one batch of its LLM calls failed or more than
    `max_failure_share` of them did, and at once when the endpoint refuses the key (401/403).
    Each request has `connect_timeout_seconds` and `read_timeout_seconds` (None: 60 s, or 600 s
    for `local`); `stage_deadline_seconds` bounds a stage's LLM work as a whole.

    The API key belongs in the environment (Dagster `EnvVar`); it is never logged or stored.
    """

    backend: Literal["offline", "openai", "local"] = "offline"
    base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str | None = None
    clients: dict[str, NamedLLMClient] = {}
    summary_client: str = DEFAULT_CLIENT
    cluster_client: str = DEFAULT_CLIENT
    read_timeout_seconds: float | None = None  # None: 60 s, or 600 s for `local`
    max_failure_share: float = DEFAULT_MAX_FAILURE_SHARE
    extra_body_json: str | None = None
    cache_path: str = ".kura_cache/llm_responses.sqlite3"
    conversation_char_budget: int = DEFAULT_CONVERSATION_CHAR_BUDGET
    local_model: str = "smollm2-135m"
    local_threads: int = 2

    _server: Any = PrivateAttr(default=None)
    _local: Any = PrivateAttr(default=None)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        # Every configured key is scrubbed from every log record from now on (never logged).
        if not self.is_offline:
            named = [os.getenv(c.api_key_env) for c in self.clients.values() if c.api_key_env]
            install_redaction([self.api_key, *named])
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
            return OFFLINE_LABEL
        if self.backend == "local":
            return f"local llama.cpp:{self.local_model}"
        return f"openai-compatible:{self.model}"

    @property
    def char_budget(self) -> int:
        """How much of a conversation a summary prompt may carry (a local model's context is small)."""
        if self._local is not None:
            return min(self.conversation_char_budget, self._local.char_budget)
        return self.conversation_char_budget

    @property
    def client_names(self) -> list[str]:
        return [DEFAULT_CLIENT, *self.clients]

    def client(self, name: str = DEFAULT_CLIENT, log: Callable[[str], None] | None = None) -> LLMClient:
        """The named client (`default` is the one this resource's own fields describe)."""
        cache = ResponseCache(Path(self.cache_path)) if self.cache_path else None
        if name == DEFAULT_CLIENT:
            install_redaction([self.api_key])  # its key never reaches a log
            return LLMClient(self._default_settings(), cache=cache, log=log)
        if name not in self.clients:
            raise ValueError(f"no LLM client named {name!r}: the clients are {', '.join(self.client_names)}")
        named = self.clients[name]
        api_key = os.getenv(named.api_key_env) if named.api_key_env else None
        if named.api_key_env and not api_key:
            raise ValueError(f"LLM client {name!r}: the environment variable {named.api_key_env} is not set")
        install_redaction([api_key])  # its key never reaches a log
        values = named.model_dump(exclude={"api_key_env"})
        for inherited in ("max_failure_share", "stage_deadline_seconds"):
            if values[inherited] is None:
                values[inherited] = getattr(self, inherited)
        settings = LLMSettings(name=name, api_key=api_key or NO_KEY, **values)
        return LLMClient(settings, cache=cache, log=log)

    def select_backend(self, log: Callable[[str], None] | None = None) -> Backend:
        """What summarises, names, builds the hierarchy and audits: the one place the choice
        between the offline backend and the LLM is made."""
        if self.is_offline:
            return OfflineBackend()
        return LLMBackend(
            self.label,
            summary_client=self.client(self.summary_client, log=log),
            cluster_client=self.client(self.cluster_client, log=log),
            char_budget=self.char_budget,
        )

    def all_clients(self, log: Callable[[str], None] | None = None) -> dict[str, LLMClient]:
        """Every client by name, as extractors receive them (none offline)."""
        if self.is_offline:
            return {}
        return {name: self.client(name, log=log) for name in self.client_names}

    def _read_timeout(self) -> float:
        # The old single timeout wins when given, as in LLMSettings (existing configs keep theirs).
        if self.timeout_seconds is not None:
            return self.timeout_seconds
        if self.read_timeout_seconds is not None:
            return self.read_timeout_seconds
        return LOCAL_READ_TIMEOUT_SECONDS if self.backend == "local" else DEFAULT_READ_TIMEOUT_SECONDS

    def _default_settings(self) -> LLMSettings:
        extra_body: dict[str, Any] = json.loads(self.extra_body_json) if self.extra_body_json else {}
        base_url, model, concurrency = self.base_url, self.model, self.max_concurrency
        if self.backend == "local":
            if self._server is None:
                raise RuntimeError("the local llama.cpp server is not running (resource not set up)")
            base_url, model = self._server.base_url, self._local.alias
            extra_body = {**self._local.extra_body, **extra_body}
            concurrency = 1  # one llama.cpp slot: more would only queue at the server
        limits = self.model_dump(include=LIMIT_FIELDS - {"timeout_seconds"})
        return LLMSettings(
            model=model,
            base_url=base_url,
            api_key=self.api_key or NO_KEY,
            **{**limits, "max_concurrency": concurrency},
            read_timeout_seconds=self._read_timeout(),
            max_failure_share=self.max_failure_share,
            extra_body=extra_body or None,
        )


def clients_from_file(path: str | Path) -> dict[str, Any]:
    """`clients`, `summary_client` and `cluster_client` from a YAML file (KURA_LLM_CLIENTS)::

    clients:
      cheap: {model: gpt-4o-mini, api_key_env: OPENAI_API_KEY, tokens_per_minute: 200000}
    summary_client: cheap
    """
    import yaml

    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read the LLM clients file {path}: {error}") from error
    unknown = set(document) - {"clients", "summary_client", "cluster_client"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    clients = {}
    for name, values in (document.get("clients") or {}).items():
        try:
            clients[name] = NamedLLMClient(**values)
        except ValidationError as error:  # one line: the first problem, where it is
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise ValueError(
                f"{path}: client {name!r}: {where + ': ' if where else ''}{problem['msg']}"
            ) from None
    known = {DEFAULT_CLIENT, *clients}
    for role in ("summary_client", "cluster_client"):
        if document.get(role, DEFAULT_CLIENT) not in known:
            raise ValueError(f"{path}: {role} {document[role]!r} is none of the clients {sorted(known)}")
    roles = {role: document[role] for role in ("summary_client", "cluster_client") if role in document}
    return {"clients": clients, **roles}
