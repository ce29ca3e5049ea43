"""A persistent response cache: every successful LLM answer, written the moment it arrives.

SQLite in WAL mode with autocommit: each answer is its own transaction, appended to the
write-ahead log before `put` returns, so a crash or `kill -9` mid-stage loses none of the calls
already paid for, and a re-run finds them by key. `synchronous=NORMAL` skips the fsync per
commit (4 ms each here, blocking the event loop); a killed process loses nothing with it, only
a power cut or OS crash can lose the last few answers, which a re-run then asks for again.
Several processes may share one file (WAL allows readers alongside one writer).

Claims: two processes on one dataset (two `kura-pipeline run`s, a CLI run beside a Dagster UI
run) would both pay for every answer. Before it sends a request, a process claims the request's
key in the `claims` table; another process that finds the key claimed waits for the answer to
appear instead of paying for it, and claims the key itself when the claim is released without
an answer (the call failed) or its holder is gone: a process on this host that no longer
exists (a `kill -9` frees its claims at once), or a claim past its lease (a holder elsewhere).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
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


HOST = socket.gethostname()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, but it exists
        return True
    return True


def claim_is_live(host: str, pid: int, expires: float, now: float) -> bool:
    """A claim still stands while its lease runs and, on this host, while its process exists."""
    if expires <= now:
        return False
    return host != HOST or process_exists(pid)


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
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS claims "
            "(key TEXT PRIMARY KEY, owner TEXT, host TEXT, pid INTEGER, expires REAL)"
        )
        # One owner per cache object: a second stage of this process waits for the first, too.
        self.owner = f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

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

    def claim(self, key: str, lease_seconds: float) -> bool:
        """Claim `key` for this cache object's requests: True when it is ours now, False while
        another live holder has it (its answer is on the way: wait for `get`)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # read and write as one: two claimers, one winner
            try:
                row = self._db.execute(
                    "SELECT owner, host, pid, expires FROM claims WHERE key = ?", (key,)
                ).fetchone()
                if row is not None and row[0] != self.owner and claim_is_live(row[1], row[2], row[3], now):
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO claims (key, owner, host, pid, expires) VALUES (?, ?, ?, ?, ?)",
                    (key, self.owner, HOST, os.getpid(), now + lease_seconds),
                )
                return True
            finally:
                self._db.execute("COMMIT")

    def release(self, key: str) -> None:
        """Give up this object's claim on `key` (after its answer is stored, or its call failed)."""
        with self._lock:
            self._db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, self.owner))

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
