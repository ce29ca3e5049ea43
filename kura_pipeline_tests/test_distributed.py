"""Beyond one machine (docs/DISTRIBUTED.md): the shipped deploy/ configuration, the pipeline with
the multiprocess executor on a data dir given as a URL, the LLM stages in one concurrency pool,
and the instance on Postgres (a throwaway cluster started here)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import polars as pl
import pytest
import yaml
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, materialize
from upath import UPath

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.definitions import defs
from kura_pipeline.resources.embedder import EmbedderResource
from kura_pipeline.resources.io_manager import storage_resources
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DatasetRegistry

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BIN = Path(sys.executable).parent
LLM_STAGES = {"conversation_summaries", "extracted_properties", "base_clusters", "meta_clusters"}
STAGES = [a.key.to_user_string() for a in ALL_ASSETS]
# 5 topics x 8 conversations: one base cluster per topic, then a small hierarchy on top.
OPS_CONFIG = {
    "ops": {
        "base_clusters": {"config": {"conversations_per_cluster": 4, "max_top_clusters": 4}},
        "meta_clusters": {"config": {"max_top_clusters": 4, "branching_factor": 2.5}},
    }
}


def _deploy_config(**changes: object) -> dict:
    config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    return config


def _instance_home(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _offline_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KURA_", "OPENAI_", "DAGSTER_"))}
    return {**env, **extra}


def _read(url: UPath) -> pl.DataFrame:
    with url.open("rb") as file:
        return pl.read_parquet(file)


def _assert_the_tree_finds_the_topics(raw: pl.DataFrame, base: pl.DataFrame, tree: pl.DataFrame) -> None:
    assert raw.height == 40
    assert sorted(base.explode("chat_ids")["chat_ids"].to_list()) == sorted(raw["chat_id"].to_list())
    majority = 0
    for chat_ids in base["chat_ids"].to_list():
        topics = [chat.rsplit("-", 1)[0] for chat in chat_ids]
        majority += max(topics.count(t) for t in set(topics))
    assert majority / 40 >= 0.9
    top = tree.filter(pl.col("parent_id").is_null())
    assert top["count"].sum() == 40 and tree["level"].max() >= 1


def test_the_stages_that_call_the_llm_share_one_pool():
    graph = defs.resolve_asset_graph()
    pools = {key.to_user_string(): graph.get(key).pools for key in graph.get_all_asset_keys()}
    assert {name for name, names in pools.items() if names} == LLM_STAGES
    assert all(pools[name] == {"llm"} for name in LLM_STAGES)


def test_the_shipped_instance_config_loads_with_queue_and_pool_limits(tmp_path):
    home = _instance_home(tmp_path / "home", _deploy_config(storage=None))  # Postgres: see below
    instance = DagsterInstance.from_config(str(home))
    try:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        concurrency = instance.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 2
        limits = concurrency.run_queue_config.tag_concurrency_limits
        assert {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
    finally:
        instance.dispose()
    example = (DEPLOY / "kura.env.example").read_text(encoding="utf-8")
    settings = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    assert settings["KURA_DATA_DIR"].startswith("s3://")
    for secret in ("OPENAI_API_KEY", "DAGSTER_PG_PASSWORD"):
        assert secret not in settings  # named in comments only, never given a value


@pytest.mark.slow
def test_multiprocess_run_writes_parquet_to_a_file_url_and_the_llm_pool_holds(tmp_path, dataset_dir):
    """The shell command of docs/DISTRIBUTED.md: every step in its own process, the tables at a
    `file://` URL, and the "llm" pool (limit 1 here) never lets two LLM stages run at once."""
    concurrency = _deploy_config()["concurrency"]
    concurrency["pools"]["default_limit"] = 1
    home = _instance_home(tmp_path / "home", _deploy_config(storage=None, concurrency=concurrency))
    data_url = f"file://{tmp_path / 'stages'}"
    env = _offline_env(
        DAGSTER_HOME=str(home),
        KURA_DATASETS=str(dataset_dir / "datasets.yaml"),
        KURA_DATA_DIR=data_url,
        KURA_LLM_CACHE=str(tmp_path / "llm.sqlite3"),
    )
    instance = DagsterInstance.from_config(str(home))
    instance.add_dynamic_partitions("datasets", ["topics"])

    (tmp_path / "ops.yaml").write_text(yaml.safe_dump(OPS_CONFIG), encoding="utf-8")
    command = [
        str(BIN / "dagster"), "asset", "materialize", "-m", "kura_pipeline.definitions",
        "--select", "*", "--partition", "topics",
        "-c", str(DEPLOY / "run_config" / "multiprocess.yaml"), "-c", str(tmp_path / "ops.yaml"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    [record] = instance.get_run_records()
    assert record.dagster_run.status == DagsterRunStatus.SUCCESS
    run_id = record.dagster_run.run_id
    events = instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS})
    starts = {e.step_key: e for e in events if e.dagster_event_type == DagsterEventType.STEP_START}
    ends = {e.step_key: e.timestamp for e in events if e.dagster_event_type == DagsterEventType.STEP_SUCCESS}
    assert set(starts) == set(ends) == set(STAGES)
    # The multiprocess executor: each step in a process of its own.
    assert len({e.dagster_event.pid for e in starts.values()}) == len(STAGES)
    # The pool: LLM stages one after another (summaries and properties could otherwise overlap).
    spans = sorted((starts[s].timestamp, ends[s]) for s in LLM_STAGES)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    assert instance.event_log_storage.get_concurrency_info("llm").slot_count == 1
    instance.dispose()

    base = UPath(data_url)
    for stage in STAGES:
        suffix = ".html" if stage == "explorer" else ".parquet"
        assert (base / stage / f"topics{suffix}").exists(), stage
    assert not list((tmp_path / "stages").rglob("*.partial"))
    # polars reads the URL itself too
    assert pl.read_parquet(f"{data_url}/raw_conversations/topics.parquet").height == 40
    _assert_the_tree_finds_the_topics(
        _read(base / "raw_conversations" / "topics.parquet"),
        _read(base / "base_clusters" / "topics.parquet"),
        _read(base / "meta_clusters" / "topics.parquet"),
    )


# --- Postgres ---------------------------------------------------------------------------------


def _postgres_bin() -> Path | None:
    installed = sorted(glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)  # Debian's, newest first
    found = shutil.which("initdb") or (installed[0] if installed else None)
    return Path(found).resolve().parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL cluster on a loopback port (trust auth), removed afterwards.
    As root (CI), it runs as the `postgres` user Debian's package creates: initdb refuses root."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed: `make postgres` installs them")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("as root, initdb needs the `postgres` user (Debian's postgresql package makes it)")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="kura-pg-"))
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    port = str(_free_port())
    data = folder / "data"

    def pg(*command: str) -> None:
        done = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command[0]} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "kura", "-A", "trust", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": port,
            "DAGSTER_PG_DB": "postgres",
            "DAGSTER_PG_USERNAME": "kura",
            "DAGSTER_PG_PASSWORD": "unused-with-trust-auth",
        }
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                capture_output=True, timeout=60,
            )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Found version mismatch:UserWarning")  # dagster-postgres 0.29.27
def test_the_shipped_dagster_yaml_keeps_runs_and_materialisations_in_postgres(
    tmp_path, dataset_dir, postgres, monkeypatch
):
    """deploy/dagster.yaml as shipped, its connection from the environment; one dataset through
    every stage, the tables at a `memory://` URL (in-process: memory is per process)."""
    for name, value in postgres.items():
        monkeypatch.setenv(name, value)
    home = _instance_home(tmp_path / "home", _deploy_config())
    data_url = "memory://kura-distributed-test/stages"
    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        instance.add_dynamic_partitions("datasets", ["topics"])
        result = materialize(
            ALL_ASSETS,
            partition_key="topics",
            instance=instance,
            resources={
                **storage_resources(data_url),
                "privacy": PrivacyPolicy(),
                "registry": DatasetRegistry(path=str(dataset_dir / "datasets.yaml")),
                "llm": LLMResource(cache_path=str(tmp_path / "llm.sqlite3")),
                "embedder": EmbedderResource(),
            },
            run_config=OPS_CONFIG,
        )
        assert result.success

    # A fresh instance from the same file sees it all: the run, a materialisation per stage.
    with DagsterInstance.from_config(str(home)) as again:
        [record] = again.get_run_records()
        assert record.dagster_run.run_id == result.run_id
        assert record.dagster_run.status == DagsterRunStatus.SUCCESS
        for stage in STAGES:
            event = again.get_latest_materialization_event(AssetKey(stage))
            assert event is not None and event.dagster_event.partition == "topics", stage
        assert again.get_dynamic_partitions("datasets") == ["topics"]

    # ...and it is Postgres that holds them (asked directly, not through Dagster).
    import psycopg2

    with (
        psycopg2.connect(
            host="127.0.0.1", port=postgres["DAGSTER_PG_PORT"], user="kura", dbname="postgres"
        ) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute("select count(*) from runs where run_id = %s", (result.run_id,))
        assert cursor.fetchone() == (1,)
        cursor.execute(
            "select count(distinct asset_key) from event_logs"
            " where dagster_event_type = 'ASSET_MATERIALIZATION'"
        )
        assert cursor.fetchone() == (len(STAGES),)
    connection.close()

    base = UPath(data_url)
    _assert_the_tree_finds_the_topics(
        _read(base / "raw_conversations" / "topics.parquet"),
        _read(base / "base_clusters" / "topics.parquet"),
        _read(base / "meta_clusters" / "topics.parquet"),
    )
    assert "<html" in (base / "explorer" / "topics.html").read_text().lower()
    base.fs.rm(base.path, recursive=True)
