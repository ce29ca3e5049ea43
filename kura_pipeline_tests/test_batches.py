"""New batches over time: the inbox sensor, incremental LLM work, clusters that keep their identity,
and the re-clustering schedule. LLM calls are counted at a real loopback HTTP endpoint."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import SensorResult, SkipReason, build_sensor_context, instance_for_test, materialize

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.core.batches import fingerprint, list_batch_files, load_batches
from kura_pipeline.core.calibration_set import CALIBRATION_CASES
from kura_pipeline.core.identity import farthest_points, match_lineage
from kura_pipeline.core.models import Cluster
from kura_pipeline.resources.embedder import EmbedderResource
from kura_pipeline.resources.io_manager import storage_resources
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DatasetRegistry
from kura_pipeline.schedules import datasets_due_for_reclustering
from kura_pipeline.sensors import inbox_sensor
from kura_pipeline_tests.support.llm_fixtures import loopback_resource
from kura_pipeline_tests.support.loopback import LoopbackServer

from .conftest import make_conversations, write_jsonl

AN_HOUR_AGO = time.time() - 3600


def _drop(inbox: Path, name: str, conversations, settled: bool = True) -> Path:
    inbox.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(conversations, inbox / name)
    if settled:
        os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))
    return path


# ----- plain functions -----


def test_inbox_listing_skips_temporary_hidden_and_unsettled_files(tmp_path):
    conversations = make_conversations(per_topic=1)
    _drop(tmp_path, "0001.jsonl", conversations)
    _drop(tmp_path, "0002.jsonl.partial", conversations)
    _drop(tmp_path, ".0003.jsonl", conversations)
    _drop(tmp_path, "0004.jsonl", conversations, settled=False)
    names = [f.path.name for f in list_batch_files(tmp_path, settle_seconds=10)]
    assert names == ["0001.jsonl"]
    assert [f.path.name for f in list_batch_files(tmp_path)] == ["0001.jsonl", "0004.jsonl"]


def test_later_batches_update_conversations_and_fingerprints_change(tmp_path):
    first = make_conversations(per_topic=2)
    changed = first[0].model_copy(update={"metadata": {"topic": "edited"}})
    _drop(tmp_path, "a.jsonl", first)
    files = list_batch_files(tmp_path)
    before = fingerprint(files)
    _drop(tmp_path, "b.jsonl", [changed, first[1]])  # one changed, one sent again unchanged
    files = list_batch_files(tmp_path)
    loaded = load_batches(files, "jsonl", {})
    assert fingerprint(files) != before
    assert len(loaded.conversations) == 10 and loaded.updated == 1
    assert loaded.batch_of[changed.chat_id] == "b" and loaded.batch_of[first[1].chat_id] == "a"
    assert next(c for c in loaded.conversations if c.chat_id == changed.chat_id).metadata == {
        "topic": "edited"
    }


def test_lineage_keeps_grown_clusters_and_records_merges_and_newcomers():
    rng = np.random.default_rng(0)
    embedding_of = {f"c{i}": v / np.linalg.norm(v) for i, v in enumerate(rng.normal(size=(30, 8)))}
    previous = [
        Cluster(id="A", name="a", description="", slug="a", chat_ids=[f"c{i}" for i in range(10)]),
        Cluster(id="B", name="b", description="", slug="b", chat_ids=[f"c{i}" for i in range(10, 15)]),
        Cluster(id="C", name="c", description="", slug="c", chat_ids=[f"c{i}" for i in range(15, 20)]),
    ]
    new_members = [
        [f"c{i}" for i in range(10)] + ["c25"],  # A grew by a new conversation: the same cluster
        [f"c{i}" for i in range(10, 20)],  # B and C merged
        [f"c{i}" for i in range(20, 25)],  # only new conversations
    ]
    centroids = np.stack([np.mean([embedding_of[c] for c in m], axis=0) for m in new_members])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    lineages = match_lineage(new_members, centroids, previous, embedding_of)
    assert (
        lineages[0].previous is not None and lineages[0].previous.id == "A" and lineages[0].lineage == "kept"
    )
    assert lineages[1].lineage == "merged" and lineages[1].previous_ids == ["B", "C"]
    assert lineages[2].lineage == "new" and lineages[2].previous is None


# ----- through Dagster, with the LLM at a loopback endpoint -----


def _registry(tmp_path: Path) -> DatasetRegistry:
    (tmp_path / "datasets.yaml").write_text("inbox_root: {path: inbox, loader: jsonl}\ndatasets: {}\n")
    return DatasetRegistry(path=str(tmp_path / "datasets.yaml"))


def _run(instance, tmp_path: Path, server: LoopbackServer, partition: str, assets=ALL_ASSETS):
    data = str(tmp_path / "data")
    return materialize(
        assets,
        partition_key=partition,
        instance=instance,
        run_config={"ops": {"base_clusters": {"config": {"conversations_per_cluster": 8}}}}
        if "base_clusters" in [a.key.to_user_string() for a in assets]
        else None,
        resources={
            **storage_resources(data),
            "privacy": PrivacyPolicy(),
            "registry": _registry(tmp_path),
            "llm": loopback_resource(server, cache_path=str(tmp_path / "llm.sqlite3")),
            "embedder": EmbedderResource(cache_path=str(tmp_path / "embeddings.sqlite3")),
        },
    )


def _calls(server: LoopbackServer, marker: str) -> int:
    return sum(1 for body in server.stats.bodies("chat") if marker in body["messages"][1]["content"])


def _tick(instance, tmp_path: Path):
    return inbox_sensor(build_sensor_context(instance=instance, resources={"registry": _registry(tmp_path)}))


def _files(data: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(data.rglob("*.parquet"))}


@pytest.mark.slow
def test_batches_cost_only_what_is_new_and_clusters_keep_their_identity(tmp_path, server):
    everything = make_conversations()  # 5 topics x 8
    inbox = tmp_path / "inbox" / "support"
    later = [c for c in everything if c.chat_id.startswith("poetry") and int(c.chat_id[-1]) >= 4]
    first = [c for c in everything if c not in later]  # 36 now, 4 (10 %) later
    with instance_for_test() as instance:
        # 1. The first batch lands: the sensor registers the new dataset and asks for a run.
        _drop(inbox, "2026-01-01.jsonl", first)
        tick = _tick(instance, tmp_path)
        assert isinstance(tick, SensorResult)
        [request] = tick.run_requests
        assert request.partition_key == "support"
        assert tick.dynamic_partitions_requests[0].partition_keys == ["support"]
        instance.add_dynamic_partitions("datasets", ["support"])
        cursor = tick.cursor
        assert _run(instance, tmp_path, server, "support").success
        # One summary per conversation, and the facet calibration's, once for the model.
        assert _calls(server, "<conversation>") == 36 + len(CALIBRATION_CASES)
        first_clusters = pl.read_parquet(tmp_path / "data" / "base_clusters" / "support.parquet")
        assert set(first_clusters["lineage"]) == {"new"}

        # 2. A second batch of 10 %: exactly 4 summary calls; unchanged clusters keep id and name.
        server.reset()
        _drop(inbox, "2026-01-02.jsonl", later)
        context = build_sensor_context(
            instance=instance, resources={"registry": _registry(tmp_path)}, cursor=cursor
        )
        tick = inbox_sensor(context)
        assert isinstance(tick, SensorResult) and len(tick.run_requests) == 1
        assert tick.run_requests[0].tags["kura/new_batches"] == "2026-01-02.jsonl"
        cursor = tick.cursor
        # The per-conversation stages alone: the schedule now sees clusters that are out of date.
        ingest = _run(instance, tmp_path, server, "support", assets=ALL_ASSETS[:4])
        assert ingest.success
        [embedded] = ingest.asset_materializations_for_node("summary_embeddings")
        assert embedded.metadata["computed"].value == 4  # only the new summaries are embedded
        assert list(datasets_due_for_reclustering(instance)) == ["support"]
        assert _run(instance, tmp_path, server, "support").success
        assert datasets_due_for_reclustering(instance) == {}
        assert _calls(server, "<conversation>") == 4
        clusters = pl.read_parquet(tmp_path / "data" / "base_clusters" / "support.parquet")
        before = {row["id"]: row["name"] for row in first_clusters.iter_rows(named=True)}
        kept = clusters.filter(pl.col("lineage") == "kept")
        assert kept.height >= 4
        assert all(before[row["id"]] == row["name"] for row in kept.iter_rows(named=True))
        # Naming only for the clusters not kept (a generic answer is asked for once more).
        named = clusters.height - kept.height
        assert named <= _calls(server, "<requests>") <= 2 * named
        # Sizes per batch: every cluster's batches add up to its size; the new batch counts 4.
        per_batch = [{b["batch"]: b["count"] for b in row} for row in clusters["batch_counts"]]
        assert [sum(c.values()) for c in per_batch] == clusters["count"].to_list()
        assert sum(c.get("2026-01-02", 0) for c in per_batch) == 4
        raw = pl.read_parquet(tmp_path / "data" / "raw_conversations" / "support.parquet")
        assert raw.filter(pl.col("batch") == "2026-01-02").height == 4

        # 3. Nothing new: the sensor asks for nothing, the schedule finds nothing due, and even a
        #    forced run makes no LLM call and changes no file.
        server.reset()
        context = build_sensor_context(
            instance=instance, resources={"registry": _registry(tmp_path)}, cursor=cursor
        )
        assert isinstance(inbox_sensor(context), SkipReason)
        assert datasets_due_for_reclustering(instance) == {}
        files_before = _files(tmp_path / "data")
        assert _run(instance, tmp_path, server, "support").success
        assert server.stats.count("chat") == 0
        assert _files(tmp_path / "data") == files_before


def test_a_half_written_batch_is_reported_by_name_and_nothing_runs(tmp_path):
    inbox = tmp_path / "inbox" / "support"
    _drop(inbox, "good.jsonl", make_conversations(per_topic=1))
    bad = inbox / "broken.jsonl"
    bad.write_text('{"chat_id": "x", "created_at": "2026-01-01T00:00:00Z", "messa', encoding="utf-8")
    os.utime(bad, (AN_HOUR_AGO, AN_HOUR_AGO))
    with instance_for_test() as instance:
        tick = _tick(instance, tmp_path)
        assert isinstance(tick, SkipReason)
        assert "broken.jsonl" in tick.skip_message and "support" in tick.skip_message
        # Once the file is fixed (here: removed), the dataset runs.
        bad.unlink()
        tick = _tick(instance, tmp_path)
        assert isinstance(tick, SensorResult) and len(tick.run_requests) == 1


def test_lineage_compares_only_overlapping_clusters_and_keeps_one_to_one_matches():
    rng = np.random.default_rng(1)
    embedding_of = {f"c{i}": v / np.linalg.norm(v) for i, v in enumerate(rng.normal(size=(40, 8)))}
    embedding_of.pop("c39")  # an earlier member no longer embedded: it counts for no one

    def cluster(cid: str, rows: range) -> Cluster:
        return Cluster(id=cid, name=cid, description="", slug=cid, chat_ids=[f"c{i}" for i in rows])

    previous = [cluster("A", range(0, 10)), cluster("B", range(10, 20)), cluster("D", range(30, 40))]
    new_members = [
        [f"c{i}" for i in range(0, 5)],  # half of A: Jaccard 0.5, below the bar: split
        [f"c{i}" for i in range(5, 10)],  # the other half: split too
        [f"c{i}" for i in range(10, 19)],  # B without one member: Jaccard 0.9, kept
        [f"c{i}" for i in range(20, 30)],  # never seen before: new
        [f"c{i}" for i in range(30, 39)],  # D's embedded members, all of them: kept
    ]
    centroids = np.stack([np.mean([embedding_of[c] for c in m], axis=0) for m in new_members])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    lineages = match_lineage(new_members, centroids, previous, embedding_of)
    assert [lineage.lineage for lineage in lineages] == ["split", "split", "kept", "new", "kept"]
    assert lineages[0].previous_ids == ["A"] and lineages[1].previous_ids == ["A"]
    assert lineages[2].previous is not None and lineages[2].previous.id == "B"
    assert lineages[4].previous is not None and lineages[4].previous.id == "D"
    # A centroid pointing elsewhere vetoes a match whatever the overlap.
    flipped = centroids.copy()
    flipped[2] = -flipped[2]
    assert match_lineage(new_members, flipped, previous, embedding_of)[2].lineage == "split"


@pytest.mark.parametrize("block_rows", [1, 3, 10_000])
def test_farthest_points_in_blocks_picks_the_same_seeds(monkeypatch, block_rows):
    from kura_pipeline.core import identity

    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(50, 6)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    centres = embeddings[:4]
    # The whole-matrix computation, as a reference.
    nearest = (embeddings @ centres.T).max(axis=1)
    expected = []
    for _ in range(3):
        expected.append(int(np.argmin(nearest)))
        nearest = np.maximum(nearest, embeddings @ embeddings[expected[-1]])
    monkeypatch.setattr(identity, "_FARTHEST_BLOCK_ROWS", block_rows)
    np.testing.assert_array_equal(farthest_points(embeddings, centres, 3), embeddings[expected])
    assert len(farthest_points(embeddings, centres[:0], 2)) == 2  # no centres yet: still seeds
