"""The Parquet IO manager: real files, nested columns intact, local folders and fsspec URLs."""

from pathlib import Path

import polars as pl
from dagster import AssetIn, DynamicPartitionsDefinition, asset, materialize
from upath import UPath

from kura_pipeline.core.frames import (
    INITIAL_BATCH,
    ConversationFrameBuilder,
    conversations_to_frame,
    frame_to_conversations,
    iter_conversation_chunks,
    summaries_by_chat,
    summaries_to_frame,
)
from kura_pipeline.core.models import ConversationSummary
from kura_pipeline.resources.io_manager import ParquetIOManager

partitions = DynamicPartitionsDefinition(name="datasets")


@asset(partitions_def=partitions)
def upstream(context) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "chat_id": ["a", "b"],
            "tags": [["x", "y"], []],
            "nested": [{"role": "user", "n": 1}, {"role": "assistant", "n": 2}],
            "dataset": [context.partition_key] * 2,
        }
    )


@asset(partitions_def=partitions)
def downstream(upstream: pl.DataFrame) -> pl.DataFrame:
    return upstream.with_columns(pl.col("tags").list.len().alias("tag_count"))


def _run(base_path: str, instance) -> None:
    instance.add_dynamic_partitions("datasets", ["alpha"])
    result = materialize(
        [upstream, downstream],
        partition_key="alpha",
        instance=instance,
        resources={"io_manager": ParquetIOManager(base_path=base_path)},
    )
    assert result.success


def test_round_trip_on_a_local_folder_keeps_nested_fields(tmp_path: Path):
    from dagster import DagsterInstance

    _run(str(tmp_path), DagsterInstance.ephemeral())
    written = tmp_path / "downstream" / "alpha.parquet"
    assert written.exists() and (tmp_path / "upstream" / "alpha.parquet").exists()
    frame = pl.read_parquet(written)
    assert frame["tags"].to_list() == [["x", "y"], []]
    assert frame["nested"].to_list() == [{"role": "user", "n": 1}, {"role": "assistant", "n": 2}]
    assert frame["tag_count"].to_list() == [2, 0]
    assert not list(tmp_path.rglob("*.partial"))  # no half-written leftovers


def test_same_code_path_works_on_an_fsspec_url():
    from dagster import DagsterInstance

    base = "memory://kura-test-bucket/stages"
    _run(base, DagsterInstance.ephemeral())
    with (UPath(base) / "downstream" / "alpha.parquet").open("rb") as file:
        frame = pl.read_parquet(file)
    assert frame["dataset"].to_list() == ["alpha", "alpha"]


def test_conversations_survive_parquet_with_messages_as_nested_structs(tmp_path: Path, conversations):
    frame = conversations_to_frame(conversations)
    frame.write_parquet(tmp_path / "c.parquet")
    back = frame_to_conversations(pl.read_parquet(tmp_path / "c.parquet"))
    assert back == conversations


def test_duckdb_can_query_a_stage(tmp_path: Path, conversations):
    import duckdb as duck

    conversations_to_frame(conversations).write_parquet(tmp_path / "c.parquet")
    count = duck.sql(
        f"select count(*) from read_parquet('{tmp_path / 'c.parquet'}') where len(messages) = 2"
    ).fetchall()
    assert count == [(len(conversations),)]


def test_the_conversations_table_built_in_chunks_is_the_same_table(tmp_path: Path, conversations):
    # Chunks of 3 (several of them, the last one short) against one chunk for everything.
    batch_of = {conversations[0].chat_id: "b1"}
    small = ConversationFrameBuilder(chunk_size=3)
    for conversation in conversations:
        small.add(conversation, batch_of.get(conversation.chat_id, INITIAL_BATCH))
    chunked = small.frame()
    whole = conversations_to_frame(conversations, batch_of)
    assert chunked.equals(whole) and chunked.schema == whole.schema
    assert small.conversations == len(conversations)
    assert small.messages == sum(len(c.messages) for c in conversations)
    assert chunked["batch"].to_list()[:2] == ["b1", INITIAL_BATCH]
    chunked.write_parquet(tmp_path / "c.parquet")
    back = pl.read_parquet(tmp_path / "c.parquet")
    assert frame_to_conversations(back) == conversations
    # Read back a chunk of models at a time: the same conversations, in order.
    chunks = list(iter_conversation_chunks(back, chunk_size=4))
    assert [len(c) for c in chunks][:-1] == [4] * (len(chunks) - 1)
    assert [c for chunk in chunks for c in chunk] == conversations
    assert ConversationFrameBuilder().frame().schema == whole.schema  # empty, still typed


def test_summaries_by_chat_leaves_failed_rows_out():
    summaries = [
        ConversationSummary(chat_id="b", summary="The user asked: b"),
        ConversationSummary(chat_id="a", summary="The user asked: a"),
    ]
    frame = summaries_to_frame(summaries, failures={"c": "timeout"})
    assert summaries_by_chat(frame) == {"a": "The user asked: a", "b": "The user asked: b"}


@asset(partitions_def=partitions, ins={"upstream": AssetIn(metadata={"columns": ["chat_id", "dataset"]})})
def narrow(upstream: pl.DataFrame) -> pl.DataFrame:
    return upstream


def test_an_input_can_ask_for_some_columns_only(tmp_path: Path):
    from dagster import DagsterInstance

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("datasets", ["alpha"])
    result = materialize(
        [upstream, narrow],
        partition_key="alpha",
        instance=instance,
        resources={"io_manager": ParquetIOManager(base_path=str(tmp_path))},
    )
    assert result.success
    assert pl.read_parquet(tmp_path / "narrow" / "alpha.parquet").columns == ["chat_id", "dataset"]
    assert len(pl.read_parquet(tmp_path / "upstream" / "alpha.parquet").columns) == 4


@asset(partitions_def=partitions, io_manager_key="html_io_manager")
def page(downstream: pl.DataFrame) -> str:
    return f"<html>{downstream.height} rows</html>"


def test_every_stage_is_stored_exactly_where_the_storage_layout_says(tmp_path: Path):
    # One module owns the layout: the CLI, the notebook API and StageReader read from the paths
    # it gives, so the IO managers must write exactly there, tables and pages alike.
    from dagster import DagsterInstance

    from kura_pipeline.resources.io_manager import storage_resources
    from kura_pipeline.resources.storage import StageReader, page_path, stage_path, table_rows

    base = str(tmp_path / "data")
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("datasets", ["alpha"])
        result = materialize(
            [upstream, downstream, page],
            partition_key="alpha",
            instance=instance,
            resources=storage_resources(base),
        )
    assert result.success
    assert table_rows(stage_path(base, "downstream", "alpha")) == 2
    assert table_rows(stage_path(base, "downstream", "beta")) is None
    assert page_path(base, "alpha", asset="page").read_text() == "<html>2 rows</html>"
    assert StageReader(base_path=base).read("upstream", "alpha")["chat_id"].to_list() == ["a", "b"]
    written = sorted(str(path.relative_to(tmp_path / "data")) for path in (tmp_path / "data").rglob("*.*"))
    assert written == ["downstream/alpha.parquet", "page/alpha.html", "upstream/alpha.parquet"]


def test_a_run_with_nothing_new_rewrites_no_table_and_no_page(tmp_path: Path):
    # The README's promise; the explorer page was rewritten (same bytes, new mtime) every run.
    import os

    from dagster import DagsterInstance

    from kura_pipeline.resources.io_manager import storage_resources

    base = tmp_path / "data"
    files = [base / "upstream" / "alpha.parquet", base / "downstream" / "alpha.parquet"]
    files.append(base / "page" / "alpha.html")

    def run() -> None:
        with DagsterInstance.ephemeral() as instance:
            instance.add_dynamic_partitions("datasets", ["alpha"])
            assert materialize(
                [upstream, downstream, page], partition_key="alpha", instance=instance,
                resources=storage_resources(str(base)),
            ).success  # fmt: skip

    run()
    for path in files:  # an old timestamp: a rewrite would move it
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    run()
    assert [path.stat().st_mtime_ns for path in files] == [1_000_000_000] * 3
