"""Batches that land over time: files dropped into a dataset's inbox folder.

Each file is one batch, named after the file. A file still being written (modified in the last
`settle_seconds`, or with a temporary name) is not a batch yet. Later batches win: a
conversation that comes again with different content is an update, and belongs to the batch
that changed it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kura_pipeline.core.loaders import LoadResult, SkippedRecord, load
from kura_pipeline.core.models import Conversation

# Names that writers use while a file is incomplete, or that are not data.
TEMPORARY_SUFFIXES = (".partial", ".part", ".tmp", ".crdownload", ".swp", ".lock")


@dataclass(frozen=True)
class BatchFile:
    path: Path
    size: int
    modified_ns: int

    @property
    def batch(self) -> str:
        return self.path.stem


def list_batch_files(
    inbox: str | Path, settle_seconds: float = 0.0, now: float | None = None
) -> list[BatchFile]:
    """The complete-looking files of an inbox, oldest name first (batches sort by name)."""
    folder = Path(inbox)
    if not folder.is_dir():
        return []
    now = time.time() if now is None else now
    files = []
    for path in sorted(folder.iterdir()):
        if (
            not path.is_file()
            or path.name.startswith((".", "_", "~"))
            or path.name.endswith(TEMPORARY_SUFFIXES)
        ):
            continue
        stat = path.stat()
        if now - stat.st_mtime < settle_seconds:
            continue  # still being written, most likely: look again on the next tick
        files.append(BatchFile(path=path, size=stat.st_size, modified_ns=stat.st_mtime_ns))
    return files


def fingerprint(files: list[BatchFile]) -> str:
    """Changes when a batch file appears, disappears or changes."""
    text = "\n".join(f"{f.path.name}\t{f.size}\t{f.modified_ns}" for f in files)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class BatchLoad:
    conversations: list[Conversation]
    batch_of: dict[str, str]
    skipped: list[SkippedRecord] = field(default_factory=list)
    updated: int = 0


def load_batch_file(file: BatchFile, loader: str, options: dict[str, Any]) -> LoadResult:
    """One batch through the dataset's loader (LoaderError names the file when it is unreadable)."""
    return load(loader, **{**options, "path": str(file.path)})


def load_batches(files: list[BatchFile], loader: str, options: dict[str, Any]) -> BatchLoad:
    """Every batch in order; a conversation keeps the batch it last changed in."""
    by_id: dict[str, Conversation] = {}
    batch_of: dict[str, str] = {}
    result = BatchLoad(conversations=[], batch_of=batch_of)
    for file in files:
        loaded = load_batch_file(file, loader, options)
        result.skipped.extend(loaded.skipped)
        for conversation in loaded.conversations:
            earlier = by_id.get(conversation.chat_id)
            if earlier == conversation:
                continue  # sent again unchanged: it stays in the batch it first came with
            if earlier is not None:
                result.updated += 1
            by_id[conversation.chat_id] = conversation
            batch_of[conversation.chat_id] = file.batch
    result.conversations = list(by_id.values())
    return result
