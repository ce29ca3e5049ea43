"""Kura checkpoints both ways (issue #14, item 3): `kura-pipeline export --format kura` writes
what the real `kura` 0.5.4 package's models validate line by line (and its UI's schemas accept),
and the `kura_checkpoint` loader reads a folder Kura itself wrote, keeping Kura's summaries.

The slow tests run the real `kura` package in a venv of its own under .kura_cache/ (built once,
as benchmarks/bench_kura.py builds it); they are skipped, saying why, when pip cannot install it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from kura_pipeline.core.frames import (
    PROJECTIONS_SCHEMA,
    clusters_to_frame,
    conversations_to_frame,
    summaries_to_frame,
)
from kura_pipeline.core.kura_format import (
    CHECKPOINT_FILES,
    UNKNOWN_DATE_KEY,
    WITHHELD_NAME,
    kura_cluster_records,
    kura_conversation_records,
    kura_metadata,
    split_summarised,
    write_kura_checkpoint,
)
from kura_pipeline.core.loaders import LoaderError, load, prior_summaries
from kura_pipeline.core.loaders.kura_checkpoint import load_kura_checkpoint, load_kura_summaries
from kura_pipeline.core.models import Cluster, Conversation, ConversationSummary, Message
from kura_pipeline.resources.io_manager import stage_path

REPO = Path(__file__).resolve().parents[1]
KURA_PIPELINE = str(Path(sys.executable).parent / "kura-pipeline")
WHEN = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def stage_tables(conversations: list[Conversation]) -> dict[str, pl.DataFrame]:
    """The four stage tables an export reads, in this project's own schemas: two base clusters
    under one parent, a third base cluster withheld under a second parent, a failed summary."""
    chats = [c.chat_id for c in conversations]
    summaries = [
        ConversationSummary(
            chat_id=chat,
            summary=f"The user asked for help with task {i}.",
            request="Help with a task",
            languages=["english", "python"],
            task="coding",
            concerning_score=1,
            user_frustration=2,
            assistant_errors=["none"] if i % 2 else [],
            metadata=next(c.metadata for c in conversations if c.chat_id == chat),
        )
        for i, chat in enumerate(chats[1:])
    ]
    clusters = [
        Cluster(
            id="b1",
            name="Debug code",
            description="d1",
            slug="debug_code",
            chat_ids=chats[:8],
            parent_id="p1",
        ),
        Cluster(
            id="b2",
            name="Cook food",
            description="d2",
            slug="cook_food",
            chat_ids=chats[8:16],
            parent_id="p1",
        ),
        Cluster(
            id="b3",
            name="Secret plans",
            description="only two people",
            slug="secret",
            chat_ids=chats[16:18],
            parent_id="p2",
            withheld=True,
        ),
        Cluster(
            id="p1", name="Everyday help", description="p", slug="everyday_help", chat_ids=chats[:16], level=1
        ),
        Cluster(id="p2", name="Other", description="q", slug="other", chat_ids=chats[16:18], level=1),
    ]
    projections = pl.DataFrame(
        [
            {
                "kind": "cluster",
                "id": c.id,
                "x": float(i),
                "y": -float(i),
                "level": c.level,
                "cluster_ids": None,
            }
            for i, c in enumerate(clusters)
        ]
        + [
            {
                "kind": "conversation",
                "id": chat,
                "x": 0.5,
                "y": 0.5,
                "level": None,
                "cluster_ids": ["b1", "p1"],
            }
            for chat in chats
        ],
        schema=PROJECTIONS_SCHEMA,
    )
    return {
        "raw_conversations": conversations_to_frame(conversations),
        "conversation_summaries": summaries_to_frame(summaries, {chats[0]: "HTTP 500 from the LLM endpoint"}),
        "meta_clusters": clusters_to_frame(clusters),
        "projections": projections,
    }


@pytest.fixture
def odd_conversations(conversations: list[Conversation]) -> list[Conversation]:
    """The shared test conversations plus what Kura is stricter about: no date (ShareGPT),
    null metadata values, mixed and boolean lists."""
    return [
        *conversations,
        Conversation(
            chat_id="undated",
            created_at=None,
            messages=[
                Message(role="user", content="Hi, no date here"),
                Message(role="assistant", content="Hello"),
            ],
            metadata={"source": "sharegpt", "gone": None, "mixed": [1, "a", None], "flags": [True, False]},
        ),
    ]


def test_kura_metadata_drops_nulls_and_keeps_lists_of_one_type() -> None:
    assert kura_metadata({"a": None, "b": 1, "c": [1, 2.5], "d": [1, "x", None], "e": [True], "f": "s"}) == {
        "b": 1,
        "c": [1, 2.5],
        "d": ["1", "x"],
        "e": ["true"],
        "f": "s",
    }


def test_an_unknown_date_is_a_flagged_placeholder_and_comes_back_unknown(
    odd_conversations: list[Conversation], tmp_path: Path
) -> None:
    records = {r["chat_id"]: r for r in kura_conversation_records(conversations_to_frame(odd_conversations))}
    undated = records["undated"]
    assert undated["created_at"] == "1970-01-01T00:00:00+00:00"
    assert undated["metadata"][UNKNOWN_DATE_KEY] is True
    assert all(m["created_at"] == undated["created_at"] for m in undated["messages"])
    assert UNKNOWN_DATE_KEY not in records[odd_conversations[0].chat_id]["metadata"]

    tables = stage_tables(odd_conversations)
    write_kura_checkpoint(tmp_path, *tables.values())
    loaded = {c.chat_id: c for c in load_kura_checkpoint(tmp_path).conversations}
    assert loaded["undated"].created_at is None
    assert all(m.created_at is None for m in loaded["undated"].messages)
    assert loaded["undated"].metadata == {
        "source": "sharegpt",
        "mixed": ["1", "a"],
        "flags": ["true", "false"],
    }


def test_clusters_keep_their_tree_with_kura_levels_and_withheld_names_hidden(
    conversations: list[Conversation],
) -> None:
    tables = stage_tables(conversations)
    base, meta, projected = kura_cluster_records(tables["meta_clusters"], tables["projections"])
    assert [c["id"] for c in base] == ["b1", "b2", "b3"] and all(c["parent_id"] is None for c in base)
    assert {c["id"]: c["parent_id"] for c in meta} == {
        "b1": "p1",
        "b2": "p1",
        "b3": "p2",
        "p1": None,
        "p2": None,
    }
    # Kura counts levels from the top (roots 0); ours count from the base.
    assert {c["id"]: c["level"] for c in projected} == {"b1": 1, "b2": 1, "b3": 1, "p1": 0, "p2": 0}
    assert {c["id"]: (c["x_coord"], c["y_coord"]) for c in projected}["p1"] == (3.0, -3.0)
    withheld = next(c for c in meta if c["id"] == "b3")
    assert withheld["name"] == WITHHELD_NAME and "only two" not in json.dumps(withheld)
    assert withheld["count"] == 2


def test_export_then_load_gives_back_the_conversations_and_the_summaries(
    odd_conversations: list[Conversation], tmp_path: Path
) -> None:
    tables = stage_tables(odd_conversations)
    counts = write_kura_checkpoint(tmp_path, *tables.values())
    assert counts == {
        "conversations.jsonl": len(odd_conversations),
        "summaries.jsonl": len(odd_conversations) - 1,  # the failed one has no summary to give
        "clusters.jsonl": 3,
        "meta_clusters.jsonl": 5,
        "dimensionality.jsonl": 5,
    }
    result = load("kura_checkpoint", path=str(tmp_path))
    assert not result.skipped
    by_id = {c.chat_id: c for c in result.conversations}
    for original in odd_conversations[:-1]:
        assert by_id[original.chat_id] == original

    summaries, skipped = load_kura_summaries(tmp_path)
    assert not skipped
    expected = {s.chat_id: s for s in tables_summaries(tables)}
    # Only metadata Kura cannot hold changes on the way (nulls dropped, mixed lists as text).
    undated = expected["undated"]
    expected["undated"] = undated.model_copy(update={"metadata": kura_metadata(undated.metadata)})
    assert summaries == expected
    assert prior_summaries("kura_checkpoint", {"path": str(tmp_path)}) == expected
    assert prior_summaries("jsonl", {"path": "whatever.jsonl"}) == {}


def tables_summaries(tables: dict[str, pl.DataFrame]) -> list[ConversationSummary]:
    from kura_pipeline.core.frames import frame_to_summaries

    return [
        s.model_copy(update={"clustering_text": None})
        for s in frame_to_summaries(tables["conversation_summaries"])
    ]


def test_only_conversations_without_a_kura_summary_are_left_to_summarise(
    odd_conversations: list[Conversation], tmp_path: Path
) -> None:
    write_kura_checkpoint(tmp_path, *stage_tables(odd_conversations).values())
    raw = conversations_to_frame(load("kura_checkpoint", path=str(tmp_path)).conversations)
    todo, kept = split_summarised(raw, prior_summaries("kura_checkpoint", {"path": str(tmp_path)}))
    first = odd_conversations[0].chat_id  # its summary had failed: Kura's folder has none for it
    assert todo["chat_id"].to_list() == [first]
    assert sorted(s.chat_id for s in kept) == sorted(c.chat_id for c in odd_conversations[1:])
    undated = next(s for s in kept if s.chat_id == "undated")
    assert undated.metadata == json.loads(raw.filter(pl.col("chat_id") == "undated")["metadata"][0])
    assert split_summarised(raw, {}) == (raw, [])


def test_kura_summaries_are_scrubbed_and_bad_lines_skipped_by_line(tmp_path: Path) -> None:
    (tmp_path / "conversations.jsonl").write_text(
        json.dumps(
            {
                "chat_id": "c1",
                "created_at": WHEN.isoformat(),
                "messages": [{"created_at": WHEN.isoformat(), "role": "user", "content": "hello"}],
                "metadata": {},
            }
        )
        + "\n",
        encoding="utf-8",
    )
    (tmp_path / "summaries.jsonl").write_text(
        json.dumps(
            {"chat_id": "c1", "summary": "Mail jane@example.com about it", "metadata": {}, "languages": None}
        )
        + "\n{not json\n"
        + json.dumps({"chat_id": "c2", "summary": "x", "concerning_score": 9, "metadata": {}})
        + "\n",
        encoding="utf-8",
    )
    summaries, skipped = load_kura_summaries(tmp_path)
    assert list(summaries) == ["c1"]
    assert "jane@example.com" not in summaries["c1"].summary
    assert summaries["c1"].languages == []
    assert [s.record for s in skipped] == ["line 2", "line 3"]
    assert "concerning_score" in skipped[1].reason


def test_a_missing_folder_or_conversations_file_is_a_loader_error(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="Kura checkpoint folder not found"):
        load_kura_checkpoint(tmp_path / "nope")
    with pytest.raises(LoaderError, match="no Kura conversations file"):
        load_kura_checkpoint(tmp_path)
    assert load_kura_summaries(tmp_path) == ({}, [])


# --- Against the real `kura` package -----------------------------------------------------------

# Every line with Kura's own models (and Kura's JSONL checkpoint manager, which loads a folder
# as `kura` does), plus the zod schemas of Kura's UI (static/dist), transcribed.
VALIDATE = r"""
import json, sys
from kura.checkpoints import JSONLCheckpointManager
from kura.types import Cluster, Conversation, ConversationSummary, ProjectedCluster

folder = sys.argv[1]
MODELS = {"conversations": Conversation, "summaries": ConversationSummary, "clusters": Cluster,
          "meta_clusters": Cluster, "dimensionality": ProjectedCluster}
SCALAR = (str, int, float, bool)

def ui_metadata(value):
    assert isinstance(value, dict), value
    for item in value.values():
        assert isinstance(item, SCALAR) or (
            isinstance(item, list) and len({type(x) for x in item}) <= 1
            and all(isinstance(x, SCALAR) for x in item)), item

def ui_check(stage, record):
    if stage == "conversations":
        assert isinstance(record["chat_id"], str) and isinstance(record["created_at"], str)
        for m in record["messages"]:
            assert isinstance(m["created_at"], str) and m["role"] in ("user", "assistant")
            assert isinstance(m["content"], str)
        ui_metadata(record["metadata"])
    elif stage == "summaries":
        assert isinstance(record["chat_id"], str) and isinstance(record["summary"], str)
        ui_metadata(record["metadata"])
    elif stage == "dimensionality":
        for key in ("id", "name", "description"):
            assert isinstance(record[key], str), key
        assert record["parent_id"] is None or isinstance(record["parent_id"], str)
        assert all(isinstance(c, str) for c in record["chat_ids"])
        for key in ("x_coord", "y_coord", "level", "count"):
            assert isinstance(record[key], (int, float)) and not isinstance(record[key], bool), key

out = {}
manager = JSONLCheckpointManager(folder)
for stage, model in MODELS.items():
    lines = 0
    with open(f"{folder}/{stage}.jsonl", encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            model.model_validate_json(line)
            ui_check(stage, json.loads(line))
            lines += 1
    loaded = manager.load_checkpoint(stage, model)
    out[stage] = {"model": model.__name__, "lines": lines, "loaded": len(loaded or [])}
print(json.dumps(out))
"""

# A checkpoint folder as Kura itself writes it: its conversation dump (a JSON list) and its
# summaries through its own checkpoint manager (a file named `summaries`, no extension).
KURA_WRITES = r"""
import sys
from datetime import datetime, timezone
from kura.checkpoint import CheckpointManager
from kura.types import Conversation, ConversationSummary, Message

folder = sys.argv[1]
when = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)
conversations = [
    Conversation(chat_id=f"k{i}", created_at=when, metadata={"model": "m", "turns": [1, 2]},
                 messages=[Message(created_at=when, role="user", content=f"question {i}"),
                           Message(created_at=when, role="assistant", content=f"answer {i}")])
    for i in range(3)
]
Conversation.generate_conversation_dump(conversations, f"{folder}/conversations.json")
summaries = [
    ConversationSummary(chat_id=c.chat_id, summary=f"The user asked question {i}.", request="ask",
                        languages=["english"], task="answer", concerning_score=1,
                        user_frustration=1, assistant_errors=[], metadata=c.metadata)
    for i, c in enumerate(conversations[:2])
]
CheckpointManager(folder).save_checkpoint("summaries", summaries)
"""


def _bench_kura():  # benchmarks/ is not a package: load bench_kura.py by its path
    spec = importlib.util.spec_from_file_location("bench_kura", REPO / "benchmarks" / "bench_kura.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kura_python() -> Path:
    """The real kura==0.5.4 in a venv of its own under .kura_cache/ (built once, reused)."""
    bench = _bench_kura()
    try:
        return bench.kura_python(REPO / ".kura_cache", bench.KURA_VERSION)
    except (subprocess.CalledProcessError, OSError) as error:
        pytest.skip(f"kura=={bench.KURA_VERSION} could not be installed in its own venv with pip: {error}")


@pytest.mark.slow
def test_the_cli_export_validates_line_by_line_under_the_real_kura_package(
    kura_python: Path, odd_conversations: list[Conversation], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    for stage, frame in stage_tables(odd_conversations).items():
        path = Path(str(stage_path(str(data), stage, "chats")))
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
    (tmp_path / "chats.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "datasets.yaml").write_text(
        json.dumps({"datasets": {"chats": {"loader": "jsonl", "options": {"path": "chats.jsonl"}}}}),
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KURA_", "DAGSTER_"))}
    exported = subprocess.run(
        [
            KURA_PIPELINE,
            "--registry",
            "datasets.yaml",
            "--data-dir",
            "data",
            "export",
            "chats",
            "--format",
            "kura",
        ]
        + ["--out", "checkpoint"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (
        f"{tmp_path / 'checkpoint' / 'conversations.jsonl'}: {len(odd_conversations)} records"
        in exported.stdout
    )
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == sorted(CHECKPOINT_FILES.values())

    validated = subprocess.run(
        [str(kura_python), "-c", VALIDATE, str(tmp_path / "checkpoint")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env | {"OPENAI_API_KEY": "unused"},
    )
    assert validated.returncode == 0, validated.stderr[-3000:]
    report = json.loads(validated.stdout.strip().splitlines()[-1])
    n = len(odd_conversations)
    assert report == {
        "conversations": {"model": "Conversation", "lines": n, "loaded": n},
        "summaries": {"model": "ConversationSummary", "lines": n - 1, "loaded": n - 1},
        "clusters": {"model": "Cluster", "lines": 3, "loaded": 3},
        "meta_clusters": {"model": "Cluster", "lines": 5, "loaded": 5},
        "dimensionality": {"model": "ProjectedCluster", "lines": 5, "loaded": 5},
    }


@pytest.mark.slow
def test_the_loader_reads_a_folder_the_real_kura_package_wrote(kura_python: Path, tmp_path: Path) -> None:
    written = subprocess.run(
        [str(kura_python), "-c", KURA_WRITES, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert written.returncode == 0, written.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conversations.json", "summaries"]

    result = load("kura_checkpoint", path=str(tmp_path))
    assert not result.skipped
    assert [c.chat_id for c in result.conversations] == ["k0", "k1", "k2"]
    first = result.conversations[0]
    assert first.created_at == datetime(2026, 1, 2, 3, 4, tzinfo=UTC)
    assert [(m.role, m.content) for m in first.messages] == [
        ("user", "question 0"),
        ("assistant", "answer 0"),
    ]
    assert first.metadata == {"model": "m", "turns": [1, 2]}

    summaries = prior_summaries("kura_checkpoint", {"path": str(tmp_path)})
    assert sorted(summaries) == ["k0", "k1"]  # k2 has none: only it would be summarised
    assert summaries["k1"].summary == "The user asked question 1."
    assert summaries["k1"].languages == ["english"] and summaries["k1"].concerning_score == 1
