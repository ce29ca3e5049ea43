"""The one Definitions: assets, resources, jobs and sensors. workspace.yaml points here.

Configuration comes from the environment in this one place (see the README):
KURA_DATA_DIR (where Parquet goes; a local folder or an fsspec URL), KURA_DATASETS (the
registry file), KURA_LLM_BASE_URL / KURA_LLM_MODEL / OPENAI_API_KEY (switch the LLM on),
KURA_LLM_LOCAL_MODEL (a local GGUF through llama.cpp instead), KURA_LLM_REQUESTS_PER_MINUTE /
KURA_LLM_TOKENS_PER_MINUTE / KURA_LLM_INPUT_PRICE / KURA_LLM_OUTPUT_PRICE (limits and prices per
million tokens), KURA_LLM_CLIENTS (a YAML file of named clients), KURA_EMBEDDINGS_MODEL (with an
endpoint, embed there too; `minilm-static` picks the fast offline static embedder).
"""

from __future__ import annotations

import os

from dagster import AssetSelection, Definitions, EnvVar, define_asset_job

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.assets.explorer import HtmlIOManager
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


def _number(name: str, kind: type[int] | type[float]) -> int | float | None:
    value = os.getenv(name)
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a {kind.__name__}") from None


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
            max_concurrency=int(os.getenv("KURA_LLM_MAX_CONCURRENCY", "8")),
            requests_per_minute=_number("KURA_LLM_REQUESTS_PER_MINUTE", int),
            tokens_per_minute=_number("KURA_LLM_TOKENS_PER_MINUTE", int),
            input_price_per_million=_number("KURA_LLM_INPUT_PRICE", float),
            output_price_per_million=_number("KURA_LLM_OUTPUT_PRICE", float),
            **(clients_from_file(os.environ["KURA_LLM_CLIENTS"]) if os.getenv("KURA_LLM_CLIENTS") else {}),
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
