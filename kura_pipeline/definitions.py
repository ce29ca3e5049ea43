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
a bad one stops with one line naming the variable and its range (`SettingError`), as does a base
URL that is not an absolute http(s) URL with a host.
"""

from __future__ import annotations

import math
import os
import warnings

from dagster import AssetSelection, Definitions, EnvVar, define_asset_job

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.console_logger import brief_console_logger
from kura_pipeline.core.llm import allowed_range, check_base_url, check_setting
from kura_pipeline.core.registry import RegistryError, read_registry_entries
from kura_pipeline.instance import open_instance
from kura_pipeline.partitions import add_missing_partitions, datasets_partitions
from kura_pipeline.resources.embedder import LOCAL_MODELS as LOCAL_EMBEDDING_MODELS
from kura_pipeline.resources.embedder import MINILM, EmbedderResource
from kura_pipeline.resources.io_manager import storage_resources
from kura_pipeline.resources.llm import LLMResource, clients_from_file
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DEFAULT_REGISTRY, DatasetRegistry
from kura_pipeline.resources.storage import data_dir_from_env
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
    if not math.isfinite(number):  # "inf" or "nan" parse as floats: an endless timeout is a hang
        raise SettingError(
            f"{name}={value!r} is not a finite number: it must be {kind_name} {allowed_range(setting)}"
        )
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


def _base_url(name: str) -> str | None:
    """The variable `name` as an endpoint's base URL (None: not set), checked to be an absolute
    http(s) URL with a host: "not a url" would otherwise fail a run later as "could not connect"
    without naming the setting."""
    value = os.getenv(name, "").strip()
    if not value:
        return None
    if problem := check_base_url(name, value):
        raise SettingError(problem)
    return value


def _clients() -> dict[str, object]:
    path = os.getenv("KURA_LLM_CLIENTS")
    if not path:
        return {}
    try:
        clients = clients_from_file(path)
    except ValueError as error:  # a pydantic error has many lines: its first problem is enough
        raise SettingError(f"KURA_LLM_CLIENTS={path}: {str(error).splitlines()[0]}") from None
    for name, client in clients.get("clients", {}).items():
        if problem := check_base_url("base_url", getattr(client, "base_url", None)):
            raise SettingError(f"KURA_LLM_CLIENTS={path}: client {name!r}: {problem}")
    return clients


def build_resources() -> dict[str, object]:
    llm_model = os.getenv("KURA_LLM_MODEL")
    llm_base_url = _base_url("KURA_LLM_BASE_URL")
    local_model = os.getenv("KURA_LLM_LOCAL_MODEL")
    backend = "local" if local_model else "openai" if (llm_model or llm_base_url) else "offline"
    embeddings_model = os.getenv("KURA_EMBEDDINGS_MODEL")
    data_dir = data_dir_from_env()
    return {
        **storage_resources(data_dir),
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
                base_url=_base_url("KURA_EMBEDDINGS_BASE_URL") or llm_base_url,
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
    loggers={"console": brief_console_logger},
)


def register_registry_datasets(registry_path: str) -> list[str]:
    """Every good dataset of the registry as a partition of the instance at DAGSTER_HOME, as
    these definitions load; returns the ones that were new.

    Partition keys of a DynamicPartitionsDefinition live in the instance, and Dagster checks a
    `--partition` against them before it runs anything: on a fresh instance, `dagster asset
    materialize --partition demo` failed (DagsterInvalidSubsetError) until something had added
    the key. The registry is the source of truth for the datasets, so they are added when the
    code that reads it loads (the CLI, `dagster dev`'s code server, a run's process); the
    registry sensor still adds datasets that appear later (an edited registry, a new inbox
    folder) while `dagster dev` runs. Without DAGSTER_HOME there is no persistent instance to
    register in (tests build their own), and nothing here may stop the definitions loading: a
    registry or instance problem is left to the sensor and the CLI, which report it."""
    if not os.getenv("DAGSTER_HOME"):
        return []
    try:
        datasets = read_registry_entries(registry_path)[0]
        if not datasets:
            return []
        with open_instance() as instance:
            return add_missing_partitions(instance, datasets)
    except RegistryError:
        return []
    except Exception as error:  # an instance that cannot be opened here: its own commands say why
        warnings.warn(f"could not register the registry's datasets as partitions: {error}", stacklevel=1)
        return []


# The datasets this process added as partitions while loading (for `kura-pipeline register`).
registered_on_load = register_registry_datasets(defs.resources["registry"].path)
