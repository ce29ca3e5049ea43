"""Tests for kura_pipeline.core.loaders: each format's happy path and every kind of bad input."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from kura_pipeline.core.frames import conversations_to_frame, frame_to_conversations
from kura_pipeline.core.loaders import (
    DUPLICATE_REASONS,
    LOADERS,
    Deduplicator,
    LoaderError,
    LoadResult,
    SkippedRecord,
    _json_reader,
    deduplicate,
    iter_load,
    load,
    load_chatgpt_export,
    load_claude_export,
    load_hf_dataset,
    load_jsonl,
    load_parquet,
    load_sharegpt,
    load_sharegpt_package,
)
from kura_pipeline.core.models import Conversation, Message

FIXTURES = Path(__file__).parent / "fixtures" / "loaders"
EMPTY_REASON = "empty conversation: no user or assistant message with text"
CUT_INSIDE = "file ends inside this record (truncated)"
NOT_A_LIST = "expected a JSON list ('['),"


def turns(conversation: Conversation) -> list[tuple[str, str]]:
    return [(message.role, message.content) for message in conversation.messages]


def by_id(result: LoadResult) -> dict[str, Conversation]:
    """First conversation per chat_id (load_jsonl keeps duplicates; load() removes them)."""
    first: dict[str, Conversation] = {}
    for conversation in result.conversations:
        first.setdefault(conversation.chat_id, conversation)
    return first


def skipped_pairs(result: LoadResult) -> list[tuple[str, str]]:
    return [(skipped.record, skipped.reason) for skipped in result.skipped]


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


# --- Claude export -------------------------------------------------------------------------


def test_claude_export_keeps_text_blocks_in_order_and_leaves_out_titles() -> None:
    result = load_claude_export(FIXTURES / "claude_export.json")

    assert result.skipped == []
    merge, letter = result.conversations
    assert merge.chat_id == "5b1f2c9e-8d3a-4f6b-9c2e-1a7d3e9f0b41"
    assert merge.created_at == datetime(2024, 6, 3, 9, 15, 27, 412930, tzinfo=UTC)
    assert turns(merge) == [
        ("user", "How do I merge two dataframes on columns with different names?"),
        # Only the text blocks: tool_use/tool_result and the `text` placeholder are not dialogue.
        (
            "assistant",
            "Use `left_on` and `right_on`:\n\n"
            '```python\npd.merge(orders, users, left_on="user_id", right_on="id")\n```',
        ),
        # No `content`: falls back to `text`; \r\n normalised and NUL stripped.
        ("user", "Thanks!\nDoes that keep both key columns?"),
        ("assistant", 'Yes: both `user_id` and `id` stay. Drop one with `.drop(columns="id")`.'),
    ]
    assert merge.messages[2].created_at == utc(2024, 6, 3, 9, 20)  # was 11:20+02:00
    account = "0e4d7c1a-2b3f-4a5e-8d9c-6f7a8b9c0d1e"  # the export's account: who the user is
    assert merge.metadata == {"source": "claude", "user_id": account}

    # The attachment-only first message is dropped and counted.
    assert [role for role, _ in turns(letter)] == ["user", "assistant"]
    assert letter.metadata == {"source": "claude", "user_id": account, "dropped_messages": 1}
    # Titles and attachments carry personal data and must not leak into the models.
    assert "Jane" not in letter.model_dump_json() and "jane.smith" not in merge.model_dump_json()


def test_claude_export_reports_each_bad_record_and_keeps_its_neighbours() -> None:
    path = FIXTURES / "claude_export_bad_records.json"
    result = load_claude_export(path)

    assert [conversation.chat_id for conversation in result.conversations] == ["good-0001", "good-0009"]
    assert {skipped.source for skipped in result.skipped} == {str(path)}
    assert skipped_pairs(result) == [
        ("#1", "missing field 'uuid'"),
        ("#2 (id=bad-time-0003)", "created_at is not an ISO 8601 timestamp: 'last Tuesday'"),
        ("#3 (id=empty-0004)", EMPTY_REASON),
        ("#4 (id=blank-0005)", EMPTY_REASON),
        ("#5 (id=no-sender-0006)", "message #1: missing field 'sender'"),
        ("#6", "expected an object, got string"),
        ("#7 (id=wrong-type-0008)", "field 'chat_messages' should be list, got string"),
    ]
    unix_dated = result.conversations[1]
    assert unix_dated.created_at == utc(2024, 7, 1, 12)
    assert [message.created_at for message in unix_dated.messages] == [
        datetime(2024, 7, 1, 12, 0, 0, 500000, tzinfo=UTC),
        utc(2024, 7, 1, 12, 0, 3),  # naive ISO string taken as UTC
    ]


# --- ChatGPT export ------------------------------------------------------------------------


def test_chatgpt_export_follows_only_the_current_branch() -> None:
    result = load_chatgpt_export(FIXTURES / "chatgpt_export.json")

    assert result.skipped == []
    rome = by_id(result)["6650a1b2-0c3d-8000-9e4f-5a6b7c8d9e0f"]
    assert turns(rome) == [
        ("user", "What is the capital of Italy?"),
        ("assistant", "The capital of Italy is Rome."),  # the regenerated answer
        ("user", "How long does the train from Florence take? Here is the map."),  # the edited prompt
        ("assistant", "The fast train takes about 1.5 hours."),
    ]
    everything = rome.model_dump_json()
    for off_branch in ("Rome is the capital.", "How far is it from Florence?", "About 270 km"):
        assert off_branch not in everything
    assert rome.created_at == datetime(2024, 5, 24, 14, 9, 54, 123456, tzinfo=UTC)
    assert rome.messages[0].created_at == datetime(2024, 5, 24, 14, 9, 54, 500000, tzinfo=UTC)
    # Hidden system + custom-instructions messages, the python call and the tool output.
    assert rome.metadata == {"source": "chatgpt", "model": "gpt-4o-2024-05-13", "dropped_messages": 4}
    assert "Anna" not in everything and "Milan" not in everything


def test_chatgpt_export_accepts_conversation_id_and_omits_unknown_model() -> None:
    result = load_chatgpt_export(FIXTURES / "chatgpt_export.json")
    haiku = by_id(result)["6651f3c4-1d2e-8000-af01-2b3c4d5e6f70"]

    assert [role for role, _ in turns(haiku)] == ["user", "assistant"]
    assert haiku.created_at == utc(2024, 5, 25, 14, 9, 54)
    assert haiku.metadata == {"source": "chatgpt"}


def _chatgpt_node(node_id: str, parent: str | None, role: str, text: str) -> dict[str, Any]:
    message = {"author": {"role": role}, "content": {"content_type": "text", "parts": [text]}}
    return {"id": node_id, "parent": parent, "children": [], "message": message}


def _chatgpt_record(conversation_id: str, **overrides: Any) -> dict[str, Any]:
    record = {
        "id": conversation_id,
        "title": "t",
        "create_time": 1716559794.0,
        "current_node": "b",
        "mapping": {
            "root": {"id": "root", "parent": None, "children": ["a"], "message": None},
            "a": _chatgpt_node("a", "root", "user", "hi"),
            "b": _chatgpt_node("b", "a", "assistant", "hello"),
        },
    }
    return record | overrides


def test_chatgpt_messages_addressed_to_tools_are_dropped(tmp_path: Path) -> None:
    call = _chatgpt_node("b", "a", "assistant", 'search("Florence to Rome train")')
    call["message"]["recipient"] = "browser"
    mapping = {
        "a": _chatgpt_node("a", None, "user", "Train times Florence to Rome?"),
        "b": call,
        "c": _chatgpt_node("c", "b", "assistant", "Trains leave every 30 minutes."),
    }
    record = _chatgpt_record("tool-call", mapping=mapping, current_node="c")
    path = write_json(tmp_path / "conversations.json", [record])

    (conversation,) = load_chatgpt_export(path).conversations

    assert [role for role, _ in turns(conversation)] == ["user", "assistant"]
    assert conversation.metadata == {"source": "chatgpt", "dropped_messages": 1}


def test_chatgpt_records_with_broken_mappings_are_skipped(tmp_path: Path) -> None:
    cycle = {"a": _chatgpt_node("a", "b", "user", "hi"), "b": _chatgpt_node("b", "a", "assistant", "yo")}
    records = [
        _chatgpt_record("good-1"),
        _chatgpt_record("ghost-node", current_node="ghost"),
        _chatgpt_record("cycle", mapping=cycle),
        _chatgpt_record("no-mapping", mapping=None),
        _chatgpt_record("no-current", current_node=None),
        _chatgpt_record("bad-time", create_time="yesterday"),
        _chatgpt_record("only-system", mapping={"b": _chatgpt_node("b", None, "system", "be nice")}),
        _chatgpt_record("good-2"),
    ]
    result = load_chatgpt_export(write_json(tmp_path / "conversations.json", records))

    assert [conversation.chat_id for conversation in result.conversations] == ["good-1", "good-2"]
    assert skipped_pairs(result) == [
        ("#1 (id=ghost-node)", "node ghost is on the current branch but missing from mapping"),
        ("#2 (id=cycle)", "mapping has a parent cycle at node b"),
        ("#3 (id=no-mapping)", "field 'mapping' is null"),
        ("#4 (id=no-current)", "field 'current_node' is null"),
        ("#5 (id=bad-time)", "create_time is not an ISO 8601 timestamp: 'yesterday'"),
        ("#6 (id=only-system)", EMPTY_REASON),
    ]


# --- ShareGPT --------------------------------------------------------------------------------


def test_sharegpt_merges_split_parts_in_order() -> None:
    path = FIXTURES / "sharegpt_split.json"
    result = load_sharegpt(path)

    assert [conversation.chat_id for conversation in result.conversations] == [
        "QWJhYvA",
        "EGkBhEb",
        "ZUkSe7V",
        "i6IyJda",
    ]
    launch = result.conversations[0]
    assert [role for role, _ in turns(launch)] == ["user", "assistant"] * 3
    assert launch.messages[3].content.startswith("Days 1-10")  # part 1 follows part 0
    assert launch.messages[5].content.startswith("Days 21-30")  # part 4 (parts 2-3 are missing)
    assert launch.metadata == {"source": "sharegpt", "sharegpt_parts": [0, 1, 4]}
    assert launch.created_at is None  # ShareGPT has no dates: unknown, not a made-up day

    teapot = result.conversations[1]
    assert turns(teapot)[1] == ("assistant", "\"I'm a teapot\": an April Fools' joke from RFC 2324.")
    assert teapot.metadata == {"source": "sharegpt", "sharegpt_parts": [0], "dropped_messages": 1}
    # An id without a _N suffix is used as is; "user"/"bard" roles are mapped.
    assert turns(result.conversations[3]) == [
        ("user", "Ciao! Come stai?"),
        ("assistant", "Sto bene, grazie! E tu?"),
    ]
    assert result.conversations[3].metadata == {"source": "sharegpt"}
    # The empty first copy of ZUkSe7V_0 (as in the real file) is reported, the second one kept.
    assert result.skipped == [SkippedRecord(str(path), "#4 (id=ZUkSe7V_0)", EMPTY_REASON)]


def test_sharegpt_max_conversations_counts_merged_conversations() -> None:
    first = load_sharegpt(FIXTURES / "sharegpt_split.json", max_conversations=1)
    assert [conversation.chat_id for conversation in first.conversations] == ["QWJhYvA"]
    assert first.conversations[0].metadata["sharegpt_parts"] == [0, 1, 4]
    assert first.skipped == []
    assert len(load_sharegpt(FIXTURES / "sharegpt_split.json", max_conversations=3).conversations) == 3
    with pytest.raises(ValueError, match="max_conversations"):
        load_sharegpt(FIXTURES / "sharegpt_split.json", max_conversations=-1)


def test_sharegpt_jsonl_reports_unparseable_line_and_keeps_the_rest(tmp_path: Path) -> None:
    records = json.loads((FIXTURES / "sharegpt_split.json").read_text())
    lines = [json.dumps(record) for record in records]
    lines.insert(3, '{"id": "broken_0", "conversations": [{"from": "human", "value": "cut here')
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = load_sharegpt(path)

    assert [conversation.chat_id for conversation in result.conversations] == [
        "QWJhYvA",
        "EGkBhEb",
        "ZUkSe7V",
        "i6IyJda",
    ]
    assert result.conversations == load_sharegpt(FIXTURES / "sharegpt_split.json").conversations
    assert result.skipped[0].record == "line 4 (id=broken_0)"
    assert result.skipped[0].reason.startswith("not valid JSON: Unterminated string")
    assert result.skipped[1] == SkippedRecord(str(path), "line 6 (id=ZUkSe7V_0)", EMPTY_REASON)


@pytest.mark.parametrize(
    ("cut_after", "expected_ids", "expected_record", "expected_reason"),
    [
        # inside a string of a record that continues the current conversation
        ('"Days 21-30: open the', ["QWJhYvA"], "#2 (id=QWJhYvA_4)", CUT_INSIDE),
        # right after a record's comma: nothing is half-read, but the closing ']' is missing
        ('RFC 2324."}\n    ]\n  },', ["QWJhYvA", "EGkBhEb"], "#4", "file ends without the closing ']'"),
        # between tokens, outside any string
        (
            '"ZUkSe7V_0",\n    "conversations": [\n      {"from"',
            ["QWJhYvA", "EGkBhEb"],
            "#5 (id=ZUkSe7V_0)",
            CUT_INSIDE,
        ),
        # inside the id itself: the label cannot name it
        ('"id": "i6Iy', ["QWJhYvA", "EGkBhEb", "ZUkSe7V"], "#6", CUT_INSIDE),
    ],
)
def test_sharegpt_truncated_file_keeps_complete_records(
    tmp_path: Path, cut_after: str, expected_ids: list[str], expected_record: str, expected_reason: str
) -> None:
    text = (FIXTURES / "sharegpt_split.json").read_text()
    path = tmp_path / "truncated.json"
    path.write_text(text[: text.index(cut_after) + len(cut_after)], encoding="utf-8")

    result = load_sharegpt(path)

    assert [conversation.chat_id for conversation in result.conversations] == expected_ids
    tail = result.skipped[-1]
    assert (tail.source, tail.record) == (str(path), expected_record)
    assert tail.reason.startswith(expected_reason)
    assert [skipped for skipped in result.skipped if "truncated" in skipped.reason] == [tail]


def test_sharegpt_truncated_tail_reports_where_the_cut_record_starts(tmp_path: Path) -> None:
    text = (FIXTURES / "sharegpt_split.json").read_text()
    cut = text.index("Days 21-30") + 4
    path = tmp_path / "truncated.json"
    path.write_text(text[:cut], encoding="utf-8")
    record_start = text.rindex("{", 0, text.index('"id": "QWJhYvA_4"'))
    line = text.count("\n", 0, record_start) + 1

    (tail,) = load_sharegpt(path).skipped

    assert tail.reason == f"{CUT_INSIDE}: {cut - record_start} characters from line {line} column 3 ignored"


@pytest.mark.parametrize("chunk_chars", [1, 16, 1 << 20])
def test_json_list_reader_gives_same_results_and_positions_for_any_read_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_chars: int
) -> None:
    """Records and error positions must not depend on where the file is split into reads."""
    monkeypatch.setattr(_json_reader, "_CHUNK_CHARS", chunk_chars)
    text = (FIXTURES / "sharegpt_split.json").read_text()
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: text.index("Days 21-30") + 4], encoding="utf-8")
    broken = tmp_path / "broken.json"
    broken.write_text(text.replace('"id": "EGkBhEb_0",', '"id": "EGkBhEb_0"'), encoding="utf-8")
    # A number item must not be cut where a read ends ("12345" read as "1" then "2345").
    with_number = tmp_path / "with_number.json"
    with_number.write_text('[\n  12345,\n  {"id": "a", "conversations": [{"from": "user", "value": "x"}]}\n]')

    monkeypatch.setattr(_json_reader, "_CHUNK_CHARS", 1 << 20)
    expected_full = load_sharegpt(FIXTURES / "sharegpt_split.json")
    expected_truncated = load_sharegpt(truncated)
    expected_with_number = load_sharegpt(with_number)
    assert skipped_pairs(expected_with_number) == [("#0", "expected an object, got int")]
    with pytest.raises(LoaderError) as expected_error:
        load_sharegpt(broken)
    monkeypatch.setattr(_json_reader, "_CHUNK_CHARS", chunk_chars)

    assert load_sharegpt(FIXTURES / "sharegpt_split.json") == expected_full
    assert load_sharegpt(truncated) == expected_truncated
    assert load_sharegpt(with_number) == expected_with_number
    with pytest.raises(LoaderError) as error:
        load_sharegpt(broken)
    assert str(error.value) == str(expected_error.value)


def test_sharegpt_syntax_error_mid_file_raises_with_its_position(tmp_path: Path) -> None:
    text = (FIXTURES / "sharegpt_split.json").read_text()
    broken_text = text.replace('"id": "EGkBhEb_0",', '"id": "EGkBhEb_0"')  # missing comma
    path = tmp_path / "broken.json"
    path.write_text(broken_text, encoding="utf-8")
    next_key = broken_text.index('"conversations"', broken_text.index('"id": "EGkBhEb_0"'))
    line = broken_text.count("\n", 0, next_key) + 1

    with pytest.raises(LoaderError) as error:
        load_sharegpt(path)

    assert str(error.value) == (
        f"{path}: invalid JSON in record #3: Expecting ',' delimiter at line {line} column 5"
    )


def test_sharegpt_merging_can_be_turned_off_for_ids_that_only_look_split(tmp_path: Path) -> None:
    records = [
        {"id": "identity_0", "conversations": [{"from": "human", "value": "Who are you?"}]},
        {"id": "identity_1", "conversations": [{"from": "human", "value": "What can you do?"}]},
    ]
    path = write_json(tmp_path / "dummy.json", records)

    assert [c.chat_id for c in load_sharegpt(path).conversations] == ["identity"]
    separate = load_sharegpt(path, merge_split_parts=False)
    assert [c.chat_id for c in separate.conversations] == ["identity_0", "identity_1"]
    assert separate.conversations[0].metadata == {"source": "sharegpt"}


def test_sharegpt_repeated_part_is_reported_as_a_duplicate_at_its_record(tmp_path: Path) -> None:
    records = [
        {"id": "abc_0", "conversations": [{"from": "human", "value": "first"}]},
        {"id": "abc_1", "conversations": [{"from": "gpt", "value": "second"}]},
        {"id": "abc_1", "conversations": [{"from": "human", "value": "another chat"}]},
        {"id": "bad", "conversations": [{"from": "narrator", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "no id"}]},
        {"id": "ts", "created_at": "2023-03-05T10:00:00Z", "conversations": [{"from": "user", "value": "?"}]},
    ]
    path = write_json(tmp_path / "repeat.json", records)

    result = load("sharegpt", path=path)

    assert [(c.chat_id, len(c.messages)) for c in result.conversations] == [("abc", 2), ("ts", 1)]
    assert result.conversations[1].created_at == utc(2023, 3, 5, 10)
    assert skipped_pairs(result) == [
        ("#2 (id=abc_1)", "duplicate chat_id with different content"),
        ("#3 (id=bad)", "message #0: unknown role 'narrator'"),
        ("#4", "missing field 'id'"),
    ]


def _sharegpt_record(record_id: str, text: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}],
    }


def test_sharegpt_parts_are_merged_wherever_they_are_in_the_file(tmp_path: Path) -> None:
    records = [
        _sharegpt_record("abc_1", "abc second"),
        _sharegpt_record("xyz_0", "xyz first"),
        _sharegpt_record("abc_0", "abc first"),
        _sharegpt_record("solo", "alone"),
        _sharegpt_record("xyz_7", "xyz last"),
        _sharegpt_record("abc_3", "abc third"),
    ]
    path = write_json(tmp_path / "scattered.json", records)

    result = load("sharegpt", path=path)

    # In order of each conversation's first record; parts in part-number order.
    assert [(c.chat_id, c.metadata.get("sharegpt_parts")) for c in result.conversations] == [
        ("abc", [0, 1, 3]),
        ("xyz", [0, 7]),
        ("solo", None),
    ]
    assert [text for role, text in turns(result.conversations[0]) if role == "user"] == [
        "abc first",
        "abc second",
        "abc third",
    ]
    assert result.skipped == []
    # A limit picks conversations, not records: the first one still gets its late parts, and
    # records of conversations past the limit are neither loaded nor reported.
    first = load_sharegpt(path, max_conversations=1)
    assert [(c.chat_id, c.metadata["sharegpt_parts"]) for c in first.conversations] == [("abc", [0, 1, 3])]
    assert first.skipped == []


def test_sharegpt_without_timestamps_has_an_unknown_date_in_the_model_and_the_table(tmp_path: Path) -> None:
    records = [
        _sharegpt_record("undated_0", "when was this?"),
        {**_sharegpt_record("dated", "and this?"), "timestamp": "2023-03-05T10:00:00Z"},
    ]
    path = write_json(tmp_path / "dates.json", records)

    undated, dated = load_sharegpt(path).conversations

    assert undated.created_at is None  # unknown: no made-up day
    assert dated.created_at == utc(2023, 3, 5, 10)
    frame = conversations_to_frame([undated, dated])
    assert frame["created_at"].to_list() == [None, utc(2023, 3, 5, 10)]
    assert frame.schema["created_at"] == pl.Datetime("us", "UTC")
    assert frame_to_conversations(frame) == [undated, dated]
    # Pipeline output loads back with the date still unknown.
    table = tmp_path / "raw_conversations.parquet"
    frame.write_parquet(table)
    assert load_parquet(table).conversations == [undated, dated]
    lines = write_jsonl(tmp_path / "raw_conversations.jsonl", [undated.model_dump(mode="json")])
    assert load_jsonl(lines).conversations == [undated]


def test_sharegpt_package_first_50_conversations() -> None:
    result = load_sharegpt_package(max_conversations=50)

    assert len(result.conversations) == 50
    ids = [conversation.chat_id for conversation in result.conversations]
    assert len(set(ids)) == 50
    assert not [chat_id for chat_id in ids if re.search(r"_\d+$", chat_id)]  # parts were merged
    assert any(len(conversation.metadata["sharegpt_parts"]) > 1 for conversation in result.conversations)
    _assert_roles_alternate_sensibly(result.conversations)
    # The real file's empty first copy of ZUkSe7V_0 is among the first 50.
    assert all(skipped.reason == EMPTY_REASON for skipped in result.skipped)


def test_sharegpt_package_whole_file_stops_at_the_truncated_tail() -> None:
    started = time.perf_counter()
    result = load("sharegpt_package")
    seconds = time.perf_counter() - started

    assert seconds < 30, f"full ShareGPT parse took {seconds:.1f} s"
    # 17,671 complete records merge into ~9,400 conversations.
    assert 9000 < len(result.conversations) < 10000
    assert len({conversation.chat_id for conversation in result.conversations}) == len(result.conversations)
    _assert_roles_alternate_sensibly(result.conversations)
    tail = result.skipped[-1]
    assert tail.source.endswith("ShareGPT_V3_unfiltered_cleaned_split.json")
    assert tail.record.startswith("#17671 (id=")
    assert tail.reason.startswith(CUT_INSIDE)
    assert {skipped.reason for skipped in result.skipped[:-1]} == {EMPTY_REASON}


def _assert_roles_alternate_sensibly(conversations: list[Conversation]) -> None:
    pairs = alternating = 0
    for conversation in conversations:
        roles = [message.role for message in conversation.messages]
        assert set(roles) <= {"user", "assistant"}
        pairs += len(roles) - 1
        alternating += sum(previous != current for previous, current in zip(roles, roles[1:], strict=False))
    # Merged parts with missing middles can repeat a role at the seam; that must stay rare.
    assert alternating / pairs > 0.9
    starting_with_user = sum(conversation.messages[0].role == "user" for conversation in conversations)
    assert starting_with_user / len(conversations) > 0.95


# --- Generic JSON Lines and Parquet ---------------------------------------------------------


def test_jsonl_accepts_mixed_timestamp_formats_and_maps_roles() -> None:
    conversations = by_id(load_jsonl(FIXTURES / "conversations.jsonl"))

    # Z, +02:00 offset, unix seconds and a naive string all name the same instant.
    for chat_id in ("conv-001", "conv-002", "conv-003", "conv-004"):
        assert conversations[chat_id].created_at == utc(2024, 5, 1, 10), chat_id
    refund = conversations["conv-001"]
    assert [message.created_at for message in refund.messages] == [
        utc(2024, 5, 1, 10),
        utc(2024, 5, 1, 10, 0, 5),  # unix seconds
    ]
    assert refund.metadata == {"language": "en", "tags": ["billing", "refund"]}
    assert turns(conversations["conv-002"]) == [
        ("user", "How do I reset my password?"),
        ("assistant", "Click 'Forgot password' on the sign-in page."),
    ]
    assert conversations["conv-002"].metadata == {"language": "en", "dropped_messages": 1}
    assert conversations["conv-004"].metadata == {}


def test_jsonl_reports_bad_lines_by_line_number() -> None:
    path = FIXTURES / "conversations.jsonl"
    result = load_jsonl(path)

    # load_jsonl itself does not de-duplicate: lines 10 and 11 are still here.
    assert len(result.conversations) == 6
    assert {skipped.source for skipped in result.skipped} == {str(path)}
    pairs = skipped_pairs(result)
    assert [record for record, _ in pairs] == [
        "line 6 (id=conv-005)",
        "line 7 (id=conv-006)",
        "line 8 (id=conv-007)",
        "line 9 (id=conv-008)",
        # lines 10 and 11 are duplicates: reported by load(), not here
        "line 12 (id=conv-009)",
        "line 13 (id=conv-010)",
        "line 14 (id=conv-011)",
        "line 15 (id=conv-012)",
        "line 16",
    ]
    reasons = [reason for _, reason in pairs]
    assert reasons[0].startswith("not valid JSON: Unterminated string starting at (column ")
    assert reasons[4].startswith("metadata.customer")  # nested objects are not valid metadata
    assert reasons[1:4] + reasons[5:] == [
        "missing field 'messages'",
        "created_at is not an ISO 8601 timestamp: '01/05/2024 10:00'",
        EMPTY_REASON,
        "message #0: unknown role 'narrator'",
        "created_at should be an ISO 8601 string or unix seconds, got boolean",
        "message #0: content should be a string, got int",
        "expected an object, got list",
    ]


def test_jsonl_strips_control_characters_and_replaces_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "dirty.jsonl"
    path.write_bytes(
        b'{"chat_id": "c1", "created_at": "2024-01-01T00:00:00Z", "messages": [{"role": "user", '
        b'"content": "caf\xe9 \\u0000nul\\u0007 bell\x01\\r\\nnext\\tTab"}]}\n'
        b'{"chat_id": "c2", "created_at": 1e300, "messages": [{"role": "user", "content": "hi"}]}\n'
    )

    result = load_jsonl(path)

    assert turns(result.conversations[0]) == [("user", "caf\ufffd nul bell\nnext\tTab")]
    assert skipped_pairs(result) == [("line 2 (id=c2)", "created_at is out of range as unix seconds: 1e+300")]


def _sample_conversations() -> list[Conversation]:
    return [
        Conversation(
            chat_id="p-1",
            created_at=utc(2024, 3, 1, 8),
            messages=[
                Message(role="user", content="Plan a 3-day trip to Lisbon.", created_at=utc(2024, 3, 1, 8)),
                Message(role="assistant", content="Day 1: Alfama...", created_at=utc(2024, 3, 1, 8, 0, 7)),
            ],
            metadata={"language": "en", "tags": ["travel", "planning"]},
        ),
        Conversation(
            chat_id="p-2",
            created_at=utc(2024, 3, 2, 9),
            messages=[
                Message(role="user", content="¿Qué es un monad?"),
                Message(role="assistant", content="Un patrón para encadenar cálculos."),
            ],
            metadata={"turns": 2},
        ),
    ]


def test_parquet_round_trips_pipeline_conversations(tmp_path: Path) -> None:
    conversations = _sample_conversations()
    path = tmp_path / "conversations.parquet"
    pl.DataFrame([conversation.model_dump() for conversation in conversations]).write_parquet(path)

    result = load_parquet(path)

    # Struct metadata gives every row every key (None-padded); the padding must not come back.
    assert result.conversations == conversations
    assert result.skipped == []


def test_parquet_bad_rows_are_skipped_and_bad_files_raise(tmp_path: Path) -> None:
    rows = [conversation.model_dump() for conversation in _sample_conversations()]
    rows[1]["chat_id"] = None
    path = tmp_path / "rows.parquet"
    pl.DataFrame(rows).write_parquet(path)

    result = load_parquet(path)

    assert [conversation.chat_id for conversation in result.conversations] == ["p-1"]
    assert skipped_pairs(result) == [("#1", "missing field 'chat_id'")]

    no_messages = tmp_path / "no_messages.parquet"
    pl.DataFrame({"chat_id": ["x"], "created_at": ["2024-01-01"]}).write_parquet(no_messages)
    with pytest.raises(LoaderError, match=re.escape(f"{no_messages}: missing column(s) messages")):
        load_parquet(no_messages)
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("chat_id,created_at\n1,2024-01-01\n")
    with pytest.raises(LoaderError, match=re.escape(f"{not_parquet}: not a readable Parquet file")):
        load_parquet(not_parquet)


# --- Hugging Face datasets (local files only: no hub access in tests) -----------------------


def test_hf_dataset_maps_rows_with_the_given_functions(tmp_path: Path) -> None:
    rows = [
        {
            "conversation_id": "hf-1",
            "lang": "fr",
            "timestamp": "2024-02-01T09:00:00+01:00",
            "turns": [{"speaker": "human", "text": "Bonjour"}, {"speaker": "gpt", "text": "Bonjour !"}],
        },
        {"conversation_id": "hf-2", "lang": "en", "timestamp": "2024-02-02T08:00:00Z", "turns": None},
        {
            "conversation_id": "hf-3",
            "lang": "en",
            "timestamp": "2024-02-03T08:00:00Z",
            "turns": [{"speaker": "human", "text": "Hi"}, {"speaker": "gpt", "text": "Hello"}],
        },
    ]
    data_file = write_jsonl(tmp_path / "chats.jsonl", rows)
    options: dict[str, Any] = {
        "data_files": str(data_file),
        "cache_dir": str(tmp_path / "hf_cache"),
        "chat_id_fn": lambda row: row["conversation_id"],
        "created_at_fn": lambda row: row["timestamp"],
        "messages_fn": lambda row: [
            {"role": turn["speaker"], "content": turn["text"]} for turn in row["turns"]
        ],
        "metadata_fn": lambda row: {"language": row["lang"]},
    }

    result = load_hf_dataset("json", **options)

    assert [conversation.chat_id for conversation in result.conversations] == ["hf-1", "hf-3"]
    first = result.conversations[0]
    assert turns(first) == [("user", "Bonjour"), ("assistant", "Bonjour !")]
    assert first.created_at == utc(2024, 2, 1, 8)
    assert first.metadata == {"language": "fr"}
    assert skipped_pairs(result) == [
        ("#1 (id=hf-2)", "mapping function failed: TypeError: 'NoneType' object is not iterable")
    ]
    assert result.skipped[0].source == f"json:{data_file}[train]"

    limited = load_hf_dataset("json", max_conversations=1, **options | {"created_at_fn": None})
    assert [(c.chat_id, c.created_at) for c in limited.conversations] == [("hf-1", None)]

    with pytest.raises(LoaderError, match="cannot load dataset"):
        load_hf_dataset("json", **options | {"data_files": str(tmp_path / "missing.jsonl")})


# --- De-duplication and load() ---------------------------------------------------------------


def test_deduplicate_keeps_first_and_reports_identical_and_conflicting_copies() -> None:
    first, other = _sample_conversations()
    conflicting = first.model_copy(update={"metadata": {"language": "pt"}})

    result = deduplicate([first, other, first.model_copy(), conflicting], source="chats.jsonl")

    assert result.conversations == [first, other]
    assert result.skipped == [
        SkippedRecord("chats.jsonl", "#2 (id=p-1)", "duplicate chat_id (identical)"),
        SkippedRecord("chats.jsonl", "#3 (id=p-1)", "duplicate chat_id with different content"),
    ]


def test_load_runs_the_named_loader_then_deduplicates() -> None:
    path = FIXTURES / "conversations.jsonl"
    result = load("jsonl", path=path)

    assert [conversation.chat_id for conversation in result.conversations] == [
        "conv-001",
        "conv-002",
        "conv-003",
        "conv-004",
    ]
    assert turns(result.conversations[1])[0] == ("user", "How do I reset my password?")  # the first copy wins
    assert result.skipped[-2:] == [
        SkippedRecord(str(path), "#4 (id=conv-001)", "duplicate chat_id (identical)"),
        SkippedRecord(str(path), "#5 (id=conv-002)", "duplicate chat_id with different content"),
    ]
    assert len(result.skipped) == len(load_jsonl(path).skipped) + 2


def test_load_rejects_unknown_loaders_and_bad_options() -> None:
    names = [
        "claude",
        "chatgpt",
        "sharegpt",
        "sharegpt_package",
        "jsonl",
        "parquet",
        "huggingface",
        "kura_checkpoint",
    ]
    assert list(LOADERS) == names
    with pytest.raises(LoaderError) as error:
        load("csv", path="x.csv")
    assert str(error.value) == f"unknown loader 'csv'; known loaders: {', '.join(names)}"
    with pytest.raises(LoaderError) as error:
        load("claude", paht="conversations.json")
    assert str(error.value) == "loader 'claude': bad options: missing a required argument: 'path'"
    with pytest.raises(LoaderError, match="^loader 'jsonl': bad options: .*unexpected .*'max_conversations'"):
        load("jsonl", path=FIXTURES / "conversations.jsonl", max_conversations=5)


# --- Whole-file problems ---------------------------------------------------------------------

FILE_LOADERS: dict[str, Callable[[Path], LoadResult]] = {
    "claude": load_claude_export,
    "chatgpt": load_chatgpt_export,
    "sharegpt": load_sharegpt,
    "jsonl": load_jsonl,
    "parquet": load_parquet,
}


@pytest.mark.parametrize("loader", FILE_LOADERS)
def test_missing_file_raises_naming_the_file(tmp_path: Path, loader: str) -> None:
    path = tmp_path / "nowhere" / "conversations.json"
    with pytest.raises(LoaderError, match=re.escape(f"{path}: file not found")):
        FILE_LOADERS[loader](path)


@pytest.mark.parametrize(
    ("loader", "content", "message"),
    [
        # not JSON at all
        ("claude", "<!DOCTYPE html>\n<html>Expired</html>", f"{NOT_A_LIST} found '<' at line 1 column 1"),
        ("chatgpt", "\n\n  oops", f"{NOT_A_LIST} found 'o' at line 3 column 3"),
        ("sharegpt", "<html></html>", f"{NOT_A_LIST} found '<' at line 1 column 1"),
        ("claude", "", "file is empty, expected a JSON list"),
        ("jsonl", "<html>\n</html>\n", "no line is valid JSON, is this a JSON Lines file? (line 1: not"),
        # wrong top-level shape
        ("claude", '{"conversations": []}', f"{NOT_A_LIST} found an object ('{{') at line 1 column 1"),
        ("chatgpt", '{"mapping": {}}', f"{NOT_A_LIST} found an object ('{{')"),
        ("sharegpt", '"just a string"', f"{NOT_A_LIST} found '\"'"),
        ("jsonl", '[\n  {"chat_id": "a"}\n]\n', "line 1 starts with '[': looks like a JSON list, not JSON"),
        # syntax errors between records
        ("claude", '[{"uuid": "a"} {"uuid": "b"}]', "expected ',' or ']' after record #0, found '{' at line"),
        ("chatgpt", "[]\n[]", "unexpected data after the closing ']' at line 2 column 1"),
        ("sharegpt", '[{"id": "a"},]', "trailing comma before ']' at line 1 column 14"),
    ],
)
def test_malformed_file_raises_naming_the_file_and_problem(
    tmp_path: Path, loader: str, content: str, message: str
) -> None:
    path = tmp_path / "conversations.json"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(LoaderError) as error:
        FILE_LOADERS[loader](path)

    assert str(error.value).startswith(f"{path}: {message}")


def test_empty_json_list_and_empty_jsonl_give_no_conversations(tmp_path: Path) -> None:
    assert load_claude_export(write_json(tmp_path / "empty.json", [])) == LoadResult([], [])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert load_jsonl(tmp_path / "empty.jsonl") == LoadResult([], [])


# --- Streaming: iter_load gives what load gives, one record at a time -------------------------


@pytest.mark.parametrize(
    ("loader", "fixture"),
    [
        ("jsonl", "conversations.jsonl"),
        ("claude", "claude_export.json"),
        ("claude", "claude_export_bad_records.json"),
        ("chatgpt", "chatgpt_export.json"),
        ("sharegpt", "sharegpt_split.json"),  # not a streaming loader: loaded whole, then handed over
    ],
)
def test_iter_load_yields_what_load_returns(loader: str, fixture: str) -> None:
    path = FIXTURES / fixture
    loaded = load(loader, path=path)
    items = list(iter_load(loader, path=path))
    assert [i for i in items if isinstance(i, Conversation)] == loaded.conversations
    skipped = [i for i in items if isinstance(i, SkippedRecord)]
    assert sorted(skipped, key=lambda s: s.reason in DUPLICATE_REASONS) == loaded.skipped


def test_iter_load_hands_over_records_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    first, other = _sample_conversations()
    lines = [first.model_dump_json(), "{not json", other.model_dump_json(), first.model_dump_json()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list(iter_load("jsonl", path=path))
    assert items[0] == first and items[2] == other
    assert isinstance(items[1], SkippedRecord) and items[1].record.startswith("line 2")
    assert items[3] == SkippedRecord(str(path), "#2 (id=p-1)", "duplicate chat_id (identical)")


def test_iter_load_reports_unknown_loaders_and_missing_files_as_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="unknown loader"):
        next(iter_load("nope", path=tmp_path / "x"))
    with pytest.raises(LoaderError):
        next(iter_load("jsonl", path=tmp_path / "missing.jsonl"))


def test_deduplicator_tells_identical_from_conflicting_copies_by_digest() -> None:
    first, other = _sample_conversations()
    deduplicator = Deduplicator("chats.jsonl")
    assert deduplicator.skip(first) is None and deduplicator.skip(other) is None
    assert deduplicator.skip(first.model_copy(deep=True)) == SkippedRecord(
        "chats.jsonl", "#2 (id=p-1)", "duplicate chat_id (identical)"
    )
    changed = first.model_copy(update={"messages": first.messages[:1]})
    assert deduplicator.skip(changed) == SkippedRecord(
        "chats.jsonl", "#3 (id=p-1)", "duplicate chat_id with different content"
    )


def test_claude_export_maps_the_account_to_user_id(tmp_path) -> None:
    records = [
        {
            "uuid": f"conv-{i}",
            "created_at": "2026-01-01T10:00:00Z",
            "account": {"uuid": f"account-{i % 2}"},
            "chat_messages": [
                {"sender": "human", "text": "Plan a trip"},
                {"sender": "assistant", "text": "Sure."},
            ],
        }
        for i in range(3)
    ]
    records.append({**records[0], "uuid": "no-account", "account": None})
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    result = load_claude_export(path)
    users = {c.chat_id: c.metadata.get("user_id") for c in result.conversations}
    assert users == {"conv-0": "account-0", "conv-1": "account-1", "conv-2": "account-0", "no-account": None}
