"""Record-by-record readers for JSON-list and JSON Lines files.

Both yield each record as soon as it is parsed, so callers can stop early without
reading a large file to the end, and a file cut off mid-record (an interrupted
download, the packaged ShareGPT file) still yields every complete record. A record the
decoder cannot take (nested thousands of levels deep, a number of thousands of digits) is
yielded as a BadRecord and reading goes on after it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from kura_pipeline.core.loaders._base import (
    NESTED_TOO_DEEPLY,
    LoaderError,
    LoadResult,
    PathLike,
    RecordError,
    SkippedRecord,
    convert_record,
    record_label,
)
from kura_pipeline.core.models import Conversation

# strict=False accepts raw control characters inside strings; clean_text strips them later.
_DECODER = json.JSONDecoder(strict=False)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_HEAD_CHARS = 300
_CHUNK_CHARS = 1 << 20
# For stepping over a record the decoder gave up on: the next bracket, quote or comma, and the
# rest of a string up to its closing quote.
_STRUCTURE = re.compile(r'[\[\]{}",]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


@dataclass(frozen=True)
class JsonRecord:
    position: str  # "#12" for list items (0-based), "line 13" for JSON Lines (1-based)
    value: Any


@dataclass(frozen=True)
class BadRecord:
    position: str
    reason: str
    head: str  # start of the raw text, to recover the record's id for the report


def open_text(path: PathLike) -> TextIO:
    """Open for reading as UTF-8 (BOM skipped); LoaderError if impossible.

    Each invalid byte becomes a lone surrogate (surrogateescape), which MessageCollector
    replaces by U+FFFD and counts, like a lone surrogate written as a JSON escape.
    """
    try:
        # newline="\n": split lines only on \n and keep positions faithful to the file.
        return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="\n")  # noqa: SIM115
    except FileNotFoundError:
        raise LoaderError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise LoaderError(f"{path}: is a directory, expected a file") from None
    except OSError as error:
        raise LoaderError(f"{path}: cannot open: {error.strerror}") from None


def first_char(path: PathLike) -> str | None:
    """The first non-whitespace character of the file, or None if it is blank."""
    with open_text(path) as stream:
        while chunk := stream.read(4096):
            if stripped := chunk.lstrip():
                return stripped[0]
    return None


def guess_id(head: str, key: str = "id") -> str | None:
    """The string value of `key` near the start of a raw record, for labelling bad records."""
    match = re.search(rf'"{re.escape(key)}"\s*:\s*"([^"\\]{{1,200}})"', head)
    return match.group(1) if match else None


def iter_json_list(stream: TextIO, path: PathLike) -> Iterator[JsonRecord | BadRecord]:
    """Items of a top-level JSON list; a truncated tail is yielded last as a BadRecord.

    Raises LoaderError if the file is not a JSON list or has a syntax error that is
    not explained by the file ending early.
    """
    buffer = _Buffer(stream)
    char = buffer.skip_whitespace()
    if char is None:
        raise LoaderError(f"{path}: file is empty, expected a JSON list")
    if char != "[":
        found = "an object ('{')" if char == "{" else repr(char)
        raise LoaderError(f"{path}: expected a JSON list ('['), found {found} at {buffer.location()}")
    buffer.pos += 1
    char = buffer.skip_whitespace()
    index = 0
    while char != "]":
        position = f"#{index}"
        if char is None:
            reason = "file ends without the closing ']' (truncated)"
            yield BadRecord(position, reason, "")
            return
        item: JsonRecord | BadRecord
        try:
            item = JsonRecord(position, buffer.decode_value())
        except json.JSONDecodeError as error:
            if not _ends_inside_value(error):
                raise LoaderError(
                    f"{path}: invalid JSON in record {position}: {error.msg} at {buffer.location(error.pos)}"
                ) from None
            # The failed decode read to the end of file and left pos at the record's start.
            yield _truncated(buffer, position)
            return
        except (RecursionError, ValueError) as error:
            # Valid JSON the decoder cannot take: one bad record; step over it and go on.
            head = buffer.text[buffer.pos : buffer.pos + _HEAD_CHARS]
            if not buffer.skip_value():
                yield _truncated(buffer, position)
                return
            item = BadRecord(position, undecodable_reason(error), head)
        yield item
        index += 1
        char = buffer.skip_whitespace()
        if char == ",":
            buffer.pos += 1
            char = buffer.skip_whitespace()
            if char == "]":
                raise LoaderError(f"{path}: trailing comma before ']' at {buffer.location()}")
        elif char not in ("]", None):
            problem = f"expected ',' or ']' after record #{index - 1}, found {char!r}"
            raise LoaderError(f"{path}: {problem} at {buffer.location()}")
    buffer.pos += 1
    if buffer.skip_whitespace() is not None:
        raise LoaderError(f"{path}: unexpected data after the closing ']' at {buffer.location()}")


def iter_json_lines(stream: TextIO, path: PathLike) -> Iterator[JsonRecord | BadRecord]:
    """One JSON value per non-blank line; unparseable lines are yielded as BadRecords.

    Raises LoaderError if the file is a JSON list, or if no line at all is valid JSON
    (then it is not a JSON Lines file, and skipping every line would hide that).
    """
    first_error: str | None = None
    parsed_any = False
    for line_number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        position = f"line {line_number}"
        if not parsed_any and first_error is None and line.lstrip().startswith("["):
            raise LoaderError(f"{path}: {position} starts with '[': looks like a JSON list, not JSON Lines")
        try:
            value = _DECODER.decode(line)
        except json.JSONDecodeError as error:
            reason = f"not valid JSON: {error.msg} (column {error.colno})"
            first_error = first_error or f"{position}: {reason}"
            yield BadRecord(position, reason, line[:_HEAD_CHARS])
            continue
        except (RecursionError, ValueError) as error:  # valid JSON the decoder cannot take
            yield BadRecord(position, undecodable_reason(error), line[:_HEAD_CHARS])
            continue
        parsed_any = True
        yield JsonRecord(position, value)
    if first_error and not parsed_any:
        raise LoaderError(f"{path}: no line is valid JSON, is this a JSON Lines file? ({first_error})")


def _truncated(buffer: _Buffer, position: str) -> BadRecord:
    """The record at buffer.pos, cut off by the end of the file (the buffer holds the rest)."""
    ignored = len(buffer.text) - buffer.pos
    start = buffer.location()
    reason = f"file ends inside this record (truncated): {ignored} characters from {start} ignored"
    return BadRecord(position, reason, buffer.text[buffer.pos : buffer.pos + _HEAD_CHARS])


def undecodable_reason(error: RecursionError | ValueError) -> str:
    """Why the decoder gave up on a record that is valid JSON."""
    if isinstance(error, RecursionError):
        return NESTED_TOO_DEEPLY
    # E.g. "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"
    # (the rest of the message is advice for programmers).
    return f"cannot be read: {str(error).split(';')[0]}"


def _ends_inside_value(error: json.JSONDecodeError) -> bool:
    """Whether a decode error at end of file is explained by the file stopping early."""
    return error.msg.startswith("Unterminated string") or not error.doc[error.pos :].strip()


class _Buffer:
    """A sliding window over a text stream that knows the line/column of its positions."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.text = ""
        self.pos = 0
        self._lines_before = 0  # newlines in the text already discarded
        self._column_before = 0  # characters after the last discarded newline

    def read_more(self) -> bool:
        """Append the next chunk; False at end of file.

        Reads at least as much as the buffer holds, so re-parsing a record that spans
        many chunks stays linear overall.
        """
        chunk = self._stream.read(max(_CHUNK_CHARS, len(self.text) - self.pos))
        if not chunk:
            return False  # nothing discarded: positions in a pending error stay valid
        self._discard_consumed()
        self.text += chunk
        return True

    def skip_whitespace(self) -> str | None:
        """Move past whitespace; the next character, or None at end of file."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.read_more():
                return None

    def decode_value(self) -> Any:
        """Parse the JSON value at pos, reading more as needed; JSONDecodeError if it cannot."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError:
                if self.read_more():
                    continue
                raise
            # A number ending exactly at the buffer's end may continue in the next chunk.
            if end == len(self.text) and self.read_more():
                continue
            self.pos = end
            return value

    def skip_value(self) -> bool:
        """Move pos past the JSON value at pos without decoding it; False if the file ends
        first (pos is then still at the value's start).

        For a value the decoder gave up on (nested 100,000 levels deep, a 5,000-digit number):
        counting brackets needs no recursion. The value is known to be well-formed up to where
        the decoder stopped, so brackets are counted, not matched.
        """
        depth = 0
        index = self.pos
        while True:
            match = _STRUCTURE.search(self.text, index)
            if match is None:
                resume = len(self.text)  # nothing left to count in the buffer
            elif match.group() == '"':
                rest = _STRING_REST.match(self.text, match.end())
                if rest is not None:
                    index = rest.end()
                    continue
                resume = match.start()  # the string goes on past the buffer: rescan it whole
            else:
                char, index = match.group(), match.end()
                if char in "[{":
                    depth += 1
                elif depth == 0:  # a ',' or ']' after a scalar item
                    self.pos = match.start()
                    return True
                elif char != ",":
                    depth -= 1
                    if depth == 0:
                        self.pos = index
                        return True
                continue
            offset = resume - self.pos
            if not self.read_more():
                return False
            index = self.pos + offset

    def location(self, pos: int | None = None) -> str:
        pos = self.pos if pos is None else pos
        line = self._lines_before + self.text.count("\n", 0, pos) + 1
        last_newline = self.text.rfind("\n", 0, pos)
        column = pos - last_newline if last_newline >= 0 else self._column_before + pos + 1
        return f"line {line} column {column}"

    def _discard_consumed(self) -> None:
        consumed = self.text[: self.pos]
        newlines = consumed.count("\n")
        if newlines:
            self._lines_before += newlines
            self._column_before = len(consumed) - consumed.rfind("\n") - 1
        else:
            self._column_before += len(consumed)
        self.text = self.text[self.pos :]
        self.pos = 0


def convert_records(
    items: Iterable[JsonRecord | BadRecord],
    source: str,
    convert: Callable[[Any], Conversation],
    id_keys: tuple[str, ...],
) -> LoadResult:
    """Convert each record; bad ones become SkippedRecords labelled with position and id."""
    result = LoadResult(conversations=[], skipped=[])
    for item in iter_converted(items, source, convert, id_keys):
        if isinstance(item, SkippedRecord):
            result.skipped.append(item)
        else:
            result.conversations.append(item)
    return result


def iter_converted(
    items: Iterable[JsonRecord | BadRecord],
    source: str,
    convert: Callable[[Any], Conversation],
    id_keys: tuple[str, ...],
) -> Iterator[Conversation | SkippedRecord]:
    """convert_records one record at a time, in file order (for loading without holding every
    conversation at once)."""
    for item in items:
        if isinstance(item, BadRecord):
            record_id = next((found for key in id_keys if (found := guess_id(item.head, key))), None)
            yield SkippedRecord(source, record_label(item.position, record_id), item.reason)
            continue
        try:
            conversation = convert_record(convert, item.value)
        except RecordError as error:
            label = record_label(item.position, record_id_of(item.value, id_keys))
            yield SkippedRecord(source, label, str(error))
            continue
        yield conversation


def record_id_of(value: Any, id_keys: tuple[str, ...]) -> object:
    """The first present id field of a parsed record, for labelling it."""
    if not isinstance(value, dict):
        return None
    return next((value[key] for key in id_keys if value.get(key) is not None), None)
