"""A persistent response cache: every successful LLM answer, written the moment it arrives.

SQLite in WAL mode with autocommit: each answer is its own transaction, appended to the
write-ahead log before `put` returns, so a crash or `kill -9` mid-stage loses none of the calls
already paid for, and a re-run finds them by key. `synchronous=NORMAL` skips the fsync per
commit (4 ms each here, blocking the event loop); a killed process loses nothing with it, only
a power cut or OS crash can lose the last few answers, which a re-run then asks for again.
Several processes may share one file (WAL allows readers alongside one writer).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Self

# Another process (a parallel Dagster step) may hold the write lock for a moment.
BUSY_TIMEOUT_SECONDS = 30.0


def schema_text(schema: dict[str, Any]) -> str:
    """A response schema serialised for `cache_key`; callers compute it once per response model."""
    return json.dumps(schema, sort_keys=True, ensure_ascii=False)


def cache_key(model: str, prompt_key: str, messages: list[dict[str, str]], schema_json: str) -> str:
    """The answer depends on the model, the prompt's version, the input and the response schema
    (`schema_text`). The payload is the JSON list of the four, as `json.dumps` writes it (items
    joined with ", "), so keys stay those of caches written before the schema was pre-serialised."""
    dump = functools.partial(json.dumps, sort_keys=True, ensure_ascii=False)
    payload = f"[{dump(model)}, {dump(prompt_key)}, {dump(messages)}, {schema_json}]"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseCache:
    """Answers by key; safe to share between threads (one connection behind a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_SECONDS
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, prompt TEXT, body TEXT)"
        )

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, prompt_key: str, body: str) -> None:
        """Store one answer; committed (autocommit) when this returns."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, prompt, body) VALUES (?, ?, ?)",
                (key, prompt_key, body),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"
