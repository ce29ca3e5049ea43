"""Embeddings already computed are not computed (or paid for) again: a re-run, or a new batch,
embeds only texts it has not seen with the same model. Stored in the same SQLite cache as LLM
answers, keyed by (model, text)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from kura_pipeline.core.llm_cache import ResponseCache

EMBEDDING_KIND = "embedding"


def embedding_key(model: str, text: str) -> str:
    return hashlib.sha256(f"{EMBEDDING_KIND}\x00{model}\x00{text}".encode()).hexdigest()


def embed_with_cache(
    texts: Sequence[str], model: str, embed: Callable[[list[str]], np.ndarray], cache: ResponseCache
) -> tuple[np.ndarray, int]:
    """Rows for `texts` in order, computing only the missing ones; returns (rows, computed)."""
    keys = [embedding_key(model, text) for text in texts]
    found: dict[str, np.ndarray] = {}
    for key in dict.fromkeys(keys):
        body = cache.get(key)
        if body is not None:
            found[key] = np.frombuffer(base64.b64decode(body), dtype=np.float32)
    missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in found))
    if missing:
        for text, row in zip(missing, embed(missing), strict=True):
            key = embedding_key(model, text)
            found[key] = np.asarray(row, dtype=np.float32)
            cache.put(key, EMBEDDING_KIND, base64.b64encode(found[key].tobytes()).decode("ascii"))
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), 0
    return np.stack([found[key] for key in keys]), len(missing)
