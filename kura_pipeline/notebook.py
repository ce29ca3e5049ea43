"""Kura's notebook API, over this project's core and its one Dagster job.

What a Kura user writes keeps working with only the imports changed::

    from kura_pipeline import Conversation, ExtractedProperty, Kura, SummaryModel

    summary_model = SummaryModel(
        extractors=[language_extractor],                     # Kura's (conversation, sems, clients)
        clients={"default": instructor.from_openai(AsyncOpenAI(base_url=..., api_key=...))},
        concurrent_requests={"default": 50},
    )
    kura = Kura(max_clusters=10, summarisation_model=summary_model, checkpoint_dir="./checkpoints")
    await kura.cluster_conversations(Conversation.from_claude_conversation_dump("conversations.json"))
    kura.visualise_clusters()

`cluster_conversations` writes the conversations and a one-dataset registry into
`checkpoint_dir`, then runs the `kura_pipeline` job in this process (the same job as
`kura-pipeline run`), with its Parquet under `checkpoint_dir/data`. The clients given are not
called directly: their endpoint and key become the project's LLM resource (limits, retries,
cache, accounting), as if set with KURA_LLM_BASE_URL. Without clients, the environment's
settings apply (offline by default). Dagster and the pipeline are imported on first use.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kura_pipeline.core.models import Cluster, Conversation, ConversationSummary, ExtractedProperty, Message

if TYPE_CHECKING:
    import polars as pl

    from kura_pipeline.resources.llm import LLMResource
    from kura_pipeline.resources.privacy import PrivacyPolicy

__all__ = ["Conversation", "ExtractedProperty", "Kura", "KuraRunFailed", "Message", "SummaryModel"]

DEFAULT_CHECKPOINT_DIR = "./checkpoints"
DATASET = "kura"
# Files of ours in a checkpoint folder: the only ones `override_checkpoint_dir` removes.
CONVERSATIONS_FILE = "conversations.jsonl"
REGISTRY_FILE = "datasets.yaml"
DATA_DIR = "data"
# Kura's SummaryModel(max_concurrent_requests=50) default.
KURA_DEFAULT_CONCURRENCY = 50
# The named clients' keys reach the LLM resource through the environment (NamedLLMClient reads
# `api_key_env`), never through run config: one variable per client name, in this process only.
KEY_VARIABLE = "KURA_NOTEBOOK_{name}_API_KEY"
# Kura's constructor arguments that have no equivalent here, and where that setting lives.
NOT_HERE = {
    "embedding_model": "set KURA_EMBEDDINGS_MODEL (and KURA_EMBEDDINGS_BASE_URL)",
    "cluster_model": "pass clients to SummaryModel: the default client names clusters",
    "meta_cluster_model": "pass clients to SummaryModel: the default client builds the hierarchy",
    "dimensionality_reduction": "the map is always UMAP (PCA below 10 conversations)",
}
INSTRUCTOR_MODES = {"JSON_SCHEMA": "json_schema", "TOOLS": "tools", "JSON": "json", "MD_JSON": "md_json"}


class KuraRunFailed(RuntimeError):
    """A stage of the pipeline failed; the message names each failed stage and why, one line each."""


class SummaryModel:
    """Kura's `SummaryModel`: the extractors to run on every conversation, the LLM clients by
    name and how many requests each may have in flight.

    `extractors`: functions (Kura's `(conversation, sems, clients)` or this project's keyword
    style) or 'package.module:function' references. `clients`: by name, each an
    `openai.AsyncOpenAI`/`OpenAI`, an instructor client built on one (`instructor.from_openai`),
    or the project's `LLMSettings`; "default" summarises and names clusters. `model`: the model
    the endpoints are asked for (default: KURA_LLM_MODEL, else gpt-4o-mini); per client with
    `LLMSettings`. `concurrent_requests`: by client name (default: `max_concurrent_requests`)."""

    def __init__(
        self,
        extractors: Sequence[Callable[..., Any] | str] = (),
        clients: Mapping[str, Any] | None = None,
        concurrent_requests: Mapping[str, int] | None = None,
        model: str | None = None,
        max_concurrent_requests: int = KURA_DEFAULT_CONCURRENCY,
    ):
        for extractor in extractors:
            if not (callable(extractor) or isinstance(extractor, str)):
                raise TypeError(
                    f"an extractor is a function or 'module:function', not {type(extractor).__name__}"
                )
        unknown = set(concurrent_requests or {}) - {"default", *(clients or {})}
        if unknown:
            raise ValueError(
                f"concurrent_requests names clients that are not given: {', '.join(sorted(unknown))}"
            )
        self.extractors = list(extractors)
        self.clients = dict(clients or {})
        self.concurrent_requests = dict(concurrent_requests or {})
        self.model = model
        self.max_concurrent_requests = max_concurrent_requests

    def extractor_references(self) -> list[str]:
        """What the extracted_properties stage is configured with: references it resolves in
        this process (a notebook's functions have no importable name)."""
        from kura_pipeline.core.extract import register_extractor

        return [e if isinstance(e, str) else register_extractor(e) for e in self.extractors]

    def llm_resource(self, environment: LLMResource, cache_path: str) -> LLMResource:
        """The project's LLM resource for these clients: the environment's, with the given
        clients' endpoints, keys, modes and concurrency in place of its own."""
        from kura_pipeline.resources.llm import LLMResource, NamedLLMClient

        values: dict[str, Any] = {name: getattr(environment, name) for name in type(environment).model_fields}
        values["cache_path"] = cache_path
        model = self.model or os.getenv("KURA_LLM_MODEL") or values["model"]
        clients = dict(self.clients)
        # Kura's default client is its own; here it is the first one given, unless the
        # environment already names an endpoint (KURA_LLM_BASE_URL).
        if "default" not in clients and clients and environment.is_offline:
            clients["default"] = next(iter(clients.values()))
        if "default" in clients:
            endpoint = _endpoint("default", clients.pop("default"), model)
            values.update(
                backend="openai",
                base_url=endpoint["base_url"],
                api_key=endpoint["api_key"],
                model=endpoint["model"],
                mode=endpoint["mode"],
                max_concurrency=self.concurrent_requests.get("default", self.max_concurrent_requests),
            )
        elif "default" in self.concurrent_requests:  # the environment's endpoint, Kura's limit
            values["max_concurrency"] = self.concurrent_requests["default"]
        named = dict(values.get("clients") or {})
        for name, client in clients.items():
            endpoint = _endpoint(name, client, model)
            variable = KEY_VARIABLE.format(name=re.sub(r"[^A-Za-z0-9]", "_", name).upper())
            os.environ[variable] = endpoint["api_key"]
            named[name] = NamedLLMClient(
                model=endpoint["model"],
                base_url=endpoint["base_url"],
                api_key_env=variable,
                mode=endpoint["mode"],
                max_concurrency=self.concurrent_requests.get(name, self.max_concurrent_requests),
            )
        values["clients"] = named
        return LLMResource(**values)


def _endpoint(name: str, client: Any, model: str) -> dict[str, Any]:
    """base_url, api_key, model and mode of a Kura-style client, for the project's LLM resource."""
    from kura_pipeline.core.llm import LLMSettings

    if isinstance(client, LLMSettings):
        return {
            "base_url": client.base_url,
            "api_key": client.api_key,
            "model": client.model,
            "mode": client.mode,
        }
    import openai

    mode = "json_schema"
    inner = client
    if not isinstance(client, openai.OpenAI | openai.AsyncOpenAI) and hasattr(client, "client"):
        inner = client.client  # an instructor client: the provider's client it wraps
        instructor_mode = getattr(getattr(client, "mode", None), "name", None)
        mode = INSTRUCTOR_MODES.get(str(instructor_mode), mode)
    if isinstance(inner, openai.OpenAI | openai.AsyncOpenAI):
        return {"base_url": str(inner.base_url), "api_key": inner.api_key, "model": model, "mode": mode}
    raise TypeError(
        f"client {name!r}: a {type(client).__module__}.{type(client).__name__} cannot be routed through "
        "the project's LLM resource; pass an openai.AsyncOpenAI (Gemini: its OpenAI-compatible endpoint, "
        "base_url='https://generativelanguage.googleapis.com/v1beta/openai/'), an instructor client built "
        "with instructor.from_openai, or LLMSettings"
    )


class Kura:
    """Kura's `Kura` object: `await cluster_conversations(conversations)`, then
    `visualise_clusters()`. After a run, `clusters`, `summaries` (Kura's: with each
    conversation's metadata and its extracted properties in `metadata`) and
    `extracted_properties` (long form: chat_id, name, value) hold the results.

    `max_clusters`: the most top-level clusters. `checkpoint_dir`: where the conversations, the
    registry, every stage's Parquet (`data/`) and the LLM cache go. `override_checkpoint_dir`:
    start afresh (the stored stages are removed; the LLM cache is kept, its answers are paid
    for). `log_level`: Dagster's console log level during the run. `privacy`: a
    `PrivacyPolicy` in place of the default thresholds (Kura has none; here a cluster needs 5
    conversations and, where conversations carry `metadata["user_id"]`, 2 distinct users: one
    person's own Claude export needs `PrivacyPolicy(min_cluster_users=1)` to show anything)."""

    def __init__(
        self,
        max_clusters: int = 10,
        summarisation_model: SummaryModel | None = None,
        checkpoint_dir: str | Path = DEFAULT_CHECKPOINT_DIR,
        override_checkpoint_dir: bool = False,
        disable_checkpoints: bool = False,
        log_level: str = "WARNING",
        privacy: PrivacyPolicy | None = None,
        **kura_arguments: Any,
    ):
        for argument in kura_arguments:
            hint = NOT_HERE.get(argument)
            raise TypeError(
                f"Kura() argument {argument!r} is not supported here"
                + (f": {hint}" if hint else f"; supported: {', '.join(_SUPPORTED)}")
            )
        if max_clusters < 2:
            raise ValueError(f"max_clusters={max_clusters} must be at least 2")
        self.max_clusters = max_clusters
        self.summarisation_model = summarisation_model or SummaryModel()
        self.checkpoint_dir = Path(checkpoint_dir)
        # Kura's disable_checkpoints: every stage is recomputed (the LLM cache still answers).
        self.override_checkpoint_dir = override_checkpoint_dir or disable_checkpoints
        self.log_level = log_level
        self.privacy = privacy
        self.clusters: list[Cluster] | None = None
        self.summaries: list[ConversationSummary] | None = None
        self.extracted_properties: pl.DataFrame | None = None

    @property
    def data_dir(self) -> Path:
        return self.checkpoint_dir / DATA_DIR

    async def cluster_conversations(self, conversations: Iterable[Conversation]) -> list[Cluster]:
        """Every stage for these conversations, in this process; returns the clusters (every
        level: `level` 0 is the base, `parent_id` links upwards)."""
        conversations = [
            c if isinstance(c, Conversation) else Conversation.model_validate(c) for c in conversations
        ]
        if not conversations:
            raise ValueError("no conversations to cluster")
        # Dagster and the stages run their own event loops (asyncio.run): not in this one, which
        # may be a notebook's, already running.
        return await asyncio.to_thread(self._run, conversations)

    def _run(self, conversations: list[Conversation]) -> list[Cluster]:
        # The named clients' keys are set in the environment for the run only (see KEY_VARIABLE).
        before = {name: value for name, value in os.environ.items() if name.startswith("KURA_NOTEBOOK_")}
        try:
            return self._run_job(conversations)
        finally:
            for name in [n for n in os.environ if n.startswith("KURA_NOTEBOOK_") and n not in before]:
                del os.environ[name]
            os.environ.update(before)

    def _run_job(self, conversations: list[Conversation]) -> list[Cluster]:
        from dagster import DagsterInstance, Definitions

        from kura_pipeline.assets import ALL_ASSETS
        from kura_pipeline.definitions import build_resources, kura_job
        from kura_pipeline.resources.io_manager import storage_resources
        from kura_pipeline.resources.registry import DatasetRegistry
        from kura_pipeline.run_health import failed_steps

        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if self.override_checkpoint_dir:
            self._clear_checkpoints()
        with (self.checkpoint_dir / CONVERSATIONS_FILE).open("w", encoding="utf-8") as file:
            for conversation in conversations:
                file.write(conversation.model_dump_json() + "\n")
        registry = self.checkpoint_dir / REGISTRY_FILE
        registry.write_text(  # JSON is YAML
            json.dumps({"datasets": {DATASET: {"loader": "jsonl", "options": {"path": CONVERSATIONS_FILE}}}}),
            encoding="utf-8",
        )
        data = str(self.data_dir.resolve())
        # The LLM cache sits with the checkpoints: a rerun of the folder pays for nothing twice.
        cache = str((self.checkpoint_dir / ".kura_cache" / "llm_responses.sqlite3").resolve())
        resources = build_resources()
        resources.update(
            **storage_resources(data),
            registry=DatasetRegistry(path=str(registry.resolve())),
            llm=self.summarisation_model.llm_resource(resources["llm"], cache),
        )
        if self.privacy is not None:
            resources["privacy"] = self.privacy
        extractors = [
            "message_count",
            "user_turns",
            "conversation_characters",
            *self.summarisation_model.extractor_references(),
        ]
        defs = Definitions(assets=ALL_ASSETS, jobs=[kura_job], resources=resources)
        with DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions("datasets", [DATASET])
            result = defs.resolve_job_def(kura_job.name).execute_in_process(
                instance=instance,
                partition_key=DATASET,
                raise_on_error=False,
                run_config={
                    "ops": {
                        "extracted_properties": {"config": {"extractors": list(dict.fromkeys(extractors))}},
                        "base_clusters": {"config": {"max_top_clusters": self.max_clusters}},
                        "meta_clusters": {"config": {"max_top_clusters": self.max_clusters}},
                    },
                    "loggers": {"console": {"config": {"log_level": self.log_level}}},
                },
            )
            if not result.success:
                raise KuraRunFailed("; ".join(failed_steps(result)) or "the pipeline run failed")
        self._read_results()
        assert self.clusters is not None
        return self.clusters

    def _clear_checkpoints(self) -> None:
        import shutil

        shutil.rmtree(self.data_dir, ignore_errors=True)
        for name in (CONVERSATIONS_FILE, REGISTRY_FILE):
            (self.checkpoint_dir / name).unlink(missing_ok=True)

    def _stage(self, asset: str) -> Path:
        from kura_pipeline.resources.storage import stage_path

        return Path(stage_path(str(self.data_dir), asset, DATASET).path)

    def _read_results(self) -> None:
        """The stored stages of the last run in this checkpoint folder (Kura's checkpoints)."""
        import polars as pl

        from kura_pipeline.core.frames import frame_to_clusters, frame_to_summaries

        self.clusters = frame_to_clusters(pl.read_parquet(self._stage("meta_clusters")))
        properties = pl.read_parquet(self._stage("extracted_properties"))
        self.extracted_properties = properties
        by_chat: dict[str, dict[str, Any]] = {}
        for row in properties.iter_rows(named=True):
            name = row["name"]
            if not name.startswith("metadata."):  # those are the conversation's own, there already
                by_chat.setdefault(row["chat_id"], {})[name] = _value(row)
        summaries = frame_to_summaries(pl.read_parquet(self._stage("conversation_summaries")))
        for summary in summaries:  # Kura keeps extracted properties in the summary's metadata
            summary.metadata = {**summary.metadata, **by_chat.get(summary.chat_id, {})}
        self.summaries = summaries

    @property
    def explorer_path(self) -> Path | None:
        """The explorer page of the last run (open it in a browser), if there is one."""
        from kura_pipeline.resources.storage import page_path

        path = Path(page_path(str(self.data_dir), DATASET).path)
        return path if path.exists() else None

    def visualise_clusters(self) -> None:
        """Print the cluster tree, as `kura-pipeline tree` does."""
        from kura_pipeline.core.render.tree import fallback_note, render_tree

        if self.clusters is None:
            if not self._stage("meta_clusters").exists():
                raise RuntimeError(
                    f"no clusters in {self.checkpoint_dir}: "
                    "run `await kura.cluster_conversations(conversations)` first"
                )
            self._read_results()
        assert self.clusters is not None
        print(render_tree(self.clusters))
        if note := fallback_note(self.clusters):
            print(note, file=sys.stderr)


_SUPPORTED = (
    "max_clusters",
    "summarisation_model",
    "checkpoint_dir",
    "override_checkpoint_dir",
    "disable_checkpoints",
    "log_level",
    "privacy",
)


def _value(row: dict[str, Any]) -> Any:
    """A property's value as the extractor gave it: the table keeps text and the type's name."""
    text, kind = row.get("value"), row.get("type")
    if text is None:
        return None
    if kind == "bool":
        return text == "True"
    if kind in ("int", "float"):
        return int(text) if kind == "int" else float(text)
    return text
