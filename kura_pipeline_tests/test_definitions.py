"""The Definitions as Dagster loads them, the registry sensor, and the shell commands of the README."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context, instance_for_test

from kura_pipeline.definitions import build_resources, defs
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.registry import DatasetRegistry
from kura_pipeline.sensors import dataset_registry_sensor

STAGES = [
    "raw_conversations",
    "conversation_summaries",
    "extracted_properties",
    "summary_embeddings",
    "base_clusters",
    "meta_clusters",
    "projections",
    "explorer",
    "evaluation",
]
BIN = Path(sys.executable).parent


def test_definitions_hold_eight_assets_all_partitioned_by_dataset():
    repository = defs.get_repository_def()
    specs = {
        key.to_user_string(): repository.asset_graph.get(key)
        for key in repository.asset_graph.get_all_asset_keys()
    }
    assert sorted(specs) == sorted(STAGES)
    for node in specs.values():
        assert node.partitions_def == datasets_partitions
    assert defs.resolve_job_def("kura_pipeline").asset_layer  # the main job resolves
    assert set(defs.resources) >= {"io_manager", "html_io_manager", "registry", "llm", "embedder"}


def test_default_resources_are_offline_and_an_endpoint_switches_the_llm_on(monkeypatch):
    for name in ("KURA_LLM_MODEL", "KURA_LLM_BASE_URL", "OPENAI_API_KEY", "KURA_EMBEDDINGS_MODEL"):
        monkeypatch.delenv(name, raising=False)
    resources = build_resources()
    assert resources["llm"].backend == "offline" and resources["embedder"].backend == "local"
    monkeypatch.setenv("KURA_LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("KURA_LLM_MODEL", "some-model")
    resources = build_resources()
    assert resources["llm"].backend == "openai" and resources["llm"].model == "some-model"


def test_registry_sensor_adds_new_datasets_once(dataset_dir):
    registry = DatasetRegistry(path=str(dataset_dir / "datasets.yaml"))
    with instance_for_test() as instance:
        result = dataset_registry_sensor(
            build_sensor_context(instance=instance, resources={"registry": registry})
        )
        assert isinstance(result, SensorResult)
        [request] = result.dynamic_partitions_requests
        assert request.partition_keys == ["topics"]
        instance.add_dynamic_partitions(datasets_partitions.name, ["topics"])
        again = dataset_registry_sensor(
            build_sensor_context(instance=instance, resources={"registry": registry})
        )
        assert isinstance(again, SkipReason)


@pytest.mark.slow
def test_the_readme_shell_commands_materialize_a_dataset(tmp_path, dataset_dir):
    """`kura-pipeline register`, then `dagster asset materialize ... --partition`, then the tree."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "KURA_DATASETS": str(dataset_dir / "datasets.yaml"),
        "KURA_DATA_DIR": str(tmp_path / "data"),
    }
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").touch()

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    registered = run(str(BIN / "kura-pipeline"), "register")
    assert registered.returncode == 0, registered.stderr
    assert "topics" in registered.stdout
    materialized = run(
        str(BIN / "dagster"), "asset", "materialize", "-m", "kura_pipeline.definitions",
        "--select", "*", "--partition", "topics",
    )  # fmt: skip
    assert materialized.returncode == 0, materialized.stderr[-3000:]
    for stage in STAGES:
        suffix = ".html" if stage == "explorer" else ".parquet"  # the explorer is a page, not a table
        assert (tmp_path / "data" / stage / f"topics{suffix}").exists(), stage
    instance = DagsterInstance.from_config(str(tmp_path / "dagster_home"))
    assert instance.get_latest_materialization_event(defs.get_assets_def("projections").key) is not None
    tree = run(str(BIN / "kura-pipeline"), "tree", "topics", "--descriptions")
    assert tree.returncode == 0, tree.stderr
    tree_table = pl.read_parquet(tmp_path / "data" / "meta_clusters" / "topics.parquet")
    top = tree_table.filter(pl.col("parent_id").is_null())
    assert tree.stdout.startswith("Clusters (40 conversations)")
    assert all(name in tree.stdout for name in top.filter(~pl.col("withheld"))["name"])
    assert ("below the privacy threshold" in tree.stdout) == tree_table["withheld"].any()

    # The UI: `dagster dev` on the same instance lists the eight assets with the partition and
    # the metadata of the materialisation (asked through its GraphQL API, as the UI does).
    nodes = _asset_nodes_from_dagster_dev(env, tmp_path)
    assert sorted(nodes) == sorted(STAGES)
    assert all(node["partitionKeys"] == ["topics"] for node in nodes.values())
    labels = {m["label"] for m in nodes["meta_clusters"]["assetMaterializations"][0]["metadataEntries"]}
    assert {"tree", "backend", "dagster/row_count"} <= labels


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _asset_nodes_from_dagster_dev(env: dict[str, str], cwd: Path) -> dict[str, dict]:
    port = _free_port()
    workspace = Path(__file__).resolve().parents[1] / "workspace.yaml"
    # dagster dev ignores SIGTERM when SIGINT was ignored by its parent: restore it first.
    server = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(workspace)],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    query = (
        "{ assetNodes { assetKey { path } partitionKeys"
        " assetMaterializations(limit: 1) { metadataEntries { label } } } }"
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
                if answer.get("data", {}).get("assetNodes"):
                    return {"/".join(n["assetKey"]["path"]): n for n in answer["data"]["assetNodes"]}
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("dagster dev did not answer within 120 s")
            time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
