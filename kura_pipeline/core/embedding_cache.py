"""Embeddings already computed are not computed (or paid for) again: a re-run, or a new batch,
embeds only texts it has not seen with the same model. Stored in the same kind of SQLite cache as
LLM answers (a `ResponseCache` file), keyed by (model, text).

Rows are read and written in bulk (one query per few hundred keys, one transaction per few
thousand rows) on a connection of our own to the cache's file: with a fast embedder, 100,000
single-row autocommits cost more than the embedding itself (measured: 31 s to write, 11 s to
read back 100,000 rows one by one; see benchmarks/EMBEDDINGS.md)."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing

import numpy as np

from kura_pipeline.core.llm_cache import BUSY_TIMEOUT_SECONDS, ResponseCache

EMBEDDING_KIND = "embedding"
# Keys per SELECT ... IN (...): below SQLite's oldest host-parameter limit (999).
_READ_CHUNK = 900
# Rows per write transaction: short enough not to hold the write lock for long.
_WRITE_CHUNK = 5_000


def embedding_key(model: str, text: str) -> str:
    return hashlib.sha256(f"{EMBEDDING_KIND}\x00{model}\x00{text}".encode()).hexdigest()


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _connect(cache: ResponseCache) -> sqlite3.Connection:
    # The ResponseCache made the file and its table (WAL mode is a property of the file).
    return sqlite3.connect(cache.path, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS)


def _read(db: sqlite3.Connection, keys: list[str]) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for chunk in _chunks(keys, _READ_CHUNK):
        marks = ",".join("?" * len(chunk))
        for key, body in db.execute(f"SELECT key, body FROM responses WHERE key IN ({marks})", chunk):
            found[key] = np.frombuffer(base64.b64decode(body), dtype=np.float32)
    return found


def _write(db: sqlite3.Connection, rows: list[tuple[str, np.ndarray]]) -> None:
    for chunk in _chunks(rows, _WRITE_CHUNK):
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO responses (key, prompt, body) VALUES (?, ?, ?)",
                [(key, EMBEDDING_KIND, base64.b64encode(row.tobytes()).decode()) for key, row in chunk],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def embed_with_cache(
    texts: Sequence[str], model: str, embed: Callable[[list[str]], np.ndarray], cache: ResponseCache
) -> tuple[np.ndarray, int]:
    """Rows for `texts` in order, computing only the missing ones; returns (rows, computed)."""
    keys = [embedding_key(model, text) for text in texts]
    with closing(_connect(cache)) as db:
        found = _read(db, list(dict.fromkeys(keys)))
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in found))
        if missing:
            computed = [
                (embedding_key(model, text), np.asarray(row, dtype=np.float32))
                for text, row in zip(missing, embed(missing), strict=True)
            ]
            found.update(computed)
            _write(db, computed)
    if not texts:
        return np.zeros((0, 0), dtype=np.float32), 0
    return np.stack([found[key] for key in keys]), len(missing)
