"""Embeddings from any OpenAI-compatible `/v1/embeddings` endpoint, in batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import openai


def embed_with_endpoint(
    texts: Sequence[str],
    model: str,
    base_url: str | None,
    api_key: str,
    batch_size: int = 100,
    timeout_seconds: float = 60.0,
    max_retries: int = 4,
) -> np.ndarray:
    """L2-normalised float32 rows, in input order."""
    client = openai.OpenAI(
        base_url=base_url, api_key=api_key, timeout=timeout_seconds, max_retries=max_retries
    )
    rows: list[list[float]] = []
    for start in range(0, len(texts), batch_size):
        batch = [text or " " for text in texts[start : start + batch_size]]  # empty input is refused
        response = client.embeddings.create(model=model, input=batch)
        rows.extend(item.embedding for item in sorted(response.data, key=lambda d: d.index))
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    matrix = np.asarray(rows, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
