"""The one Definitions: assets, resources, jobs and sensors. workspace.yaml points here.

Configuration comes from the environment in this one place (see the README):
KURA_DATA_DIR (where Parquet goes; a local folder or an fsspec URL), KURA_DATASETS (the
registry file), KURA_LLM_BASE_URL / KURA_LLM_MODEL / OPENAI_API_KEY (switch the LLM on),
KURA_LLM_LOCAL_MODEL (a local GGUF through llama.cpp instead), KURA_LLM_REQUESTS_PER_MINUTE /
KURA_LLM_TOKENS_PER_MINUTE / KURA_LLM_INPUT_PRICE / KURA_LLM_OUTPUT_PRICE (limits and prices per
million tokens), KURA_LLM_MAX_CONCURRENCY, KURA_LLM_CONNECT_TIMEOUT / KURA_LLM_READ_TIMEOUT /
KURA_LLM_STAGE_DEADLINE (seconds), KURA_LLM_MAX_FAILURE_SHARE (a stage fails above it),
KURA_LLM_CLIENTS (a YAML file of named clients), KURA_EMBEDDINGS_MODEL (with an endpoint, embed
there too; `minilm-static` picks the fast offline static embedder). Each number is checked here:
a bad one stops with one line naming the variable and its range (`SettingError`).
"""

from __future__ import annotations

import os

from dagster import AssetSelection, Definitions, EnvVar, define_asset_job

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.assets.explorer import HtmlIOManager
from kura_pipeline.core.llm import allowed_range, check_setting
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.embedder import LOCAL_MODELS as LOCAL_EMBEDDING_MODELS
from kura_pipeline.resources.embedder import MINILM, EmbedderResource
from kura_pipeline.resources.io_manager import ParquetIOManager, StageReader
from kura_pipeline.resources.llm import LLMResource, clients_from_file
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DEFAULT_REGISTRY, DatasetRegistry
from kura_pipeline.schedules import recluster_schedule
from kura_pipeline.sensors import dataset_registry_sensor, inbox_sensor

kura_job = define_asset_job(
    "kura_pipeline",
    selection=AssetSelection.all(),
    partitions_def=datasets_partitions,
    description="Every stage for one dataset: conversations to a browsable hierarchy.",
)
recluster_job = define_asset_job(
    "recluster",
    selection=AssetSelection.assets("base_clusters").downstream(),
    partitions_def=datasets_partitions,
    description="Clusters, hierarchy and map again, from the stored summaries and embeddings.",
)


def _secret(name: str) -> str | EnvVar | None:
    # EnvVar keeps the value out of the run config shown in the UI and the logs.
    return EnvVar(name) if os.getenv(name) else None


class SettingError(ValueError):
    """A setting from the environment that cannot be used; the message is one line."""


def _number(name: str, kind: type[int] | type[float], setting: str) -> int | float | None:
    """The variable `name` as a number for the LLM setting `setting`, checked against its range."""
    value = os.getenv(name, "").strip()
    if not value:
        return None
    kind_name = "an integer" if kind is int else "a number"
    try:
        number = kind(value)
    except ValueError:
        raise SettingError(
            f"{name}={value!r} is not {kind_name}: it must be {kind_name} {allowed_range(setting)}"
        ) from None
    if check_setting(setting, number):
        raise SettingError(f"{name}={value} is out of range: it must be {kind_name} {allowed_range(setting)}")
    return number


def _llm_numbers() -> dict[str, int | float]:
    """The LLM resource's numeric settings that the environment sets (unset ones keep defaults)."""
    variables: dict[str, tuple[str, type[int] | type[float]]] = {
        "KURA_LLM_MAX_CONCURRENCY": ("max_concurrency", int),
        "KURA_LLM_REQUESTS_PER_MINUTE": ("requests_per_minute", int),
        "KURA_LLM_TOKENS_PER_MINUTE": ("tokens_per_minute", int),
        "KURA_LLM_INPUT_PRICE": ("input_price_per_million", float),
        "KURA_LLM_OUTPUT_PRICE": ("output_price_per_million", float),
        "KURA_LLM_CONNECT_TIMEOUT": ("connect_timeout_seconds", float),
        "KURA_LLM_READ_TIMEOUT": ("read_timeout_seconds", float),
        "KURA_LLM_STAGE_DEADLINE": ("stage_deadline_seconds", float),
        "KURA_LLM_MAX_FAILURE_SHARE": ("max_failure_share", float),
    }
    numbers = {setting: _number(name, kind, setting) for name, (setting, kind) in variables.items()}
    return {setting: number for setting, number in numbers.items() if number is not None}


def _clients() -> dict[str, object]:
    path = os.getenv("KURA_LLM_CLIENTS")
    if not path:
        return {}
    try:
        return clients_from_file(path)
    except ValueError as error:  # a pydantic error has many lines: its first problem is enough
        raise SettingError(f"KURA_LLM_CLIENTS={path}: {str(error).splitlines()[0]}") from None


def build_resources() -> dict[str, object]:
    llm_model = os.getenv("KURA_LLM_MODEL")
    llm_base_url = os.getenv("KURA_LLM_BASE_URL")
    local_model = os.getenv("KURA_LLM_LOCAL_MODEL")
    backend = "local" if local_model else "openai" if (llm_model or llm_base_url) else "offline"
    embeddings_model = os.getenv("KURA_EMBEDDINGS_MODEL")
    data_dir = os.getenv("KURA_DATA_DIR", "data")
    return {
        "io_manager": ParquetIOManager(base_path=data_dir),
        "stages": StageReader(base_path=data_dir),
        "html_io_manager": HtmlIOManager(base_path=data_dir),
        "privacy": PrivacyPolicy(),
        "registry": DatasetRegistry(path=os.getenv("KURA_DATASETS", DEFAULT_REGISTRY)),
        "llm": LLMResource(
            backend=backend,
            base_url=llm_base_url,
            model=llm_model or "gpt-4o-mini",
            api_key=_secret("OPENAI_API_KEY"),
            **_llm_numbers(),
            **_clients(),
            cache_path=os.getenv("KURA_LLM_CACHE", ".kura_cache/llm_responses.sqlite3"),
            local_model=local_model or "smollm2-135m",
        ),
        "embedder": (
            EmbedderResource(
                backend="openai",
                model=embeddings_model,
                base_url=os.getenv("KURA_EMBEDDINGS_BASE_URL", llm_base_url),
                api_key=_secret("OPENAI_API_KEY"),
            )
            if embeddings_model and embeddings_model not in LOCAL_EMBEDDING_MODELS
            else EmbedderResource(model=embeddings_model or MINILM)
        ),
    }


defs = Definitions(
    assets=ALL_ASSETS,
    jobs=[kura_job, recluster_job],
    sensors=[dataset_registry_sensor, inbox_sensor],
    schedules=[recluster_schedule],
    resources=build_resources(),
)
