"""Summarise real ShareGPT conversations with a local GGUF model through llama.cpp + instructor.

    python benchmarks/bench_local_llm.py --model qwen2.5-coder-0.5b -n 10
    python benchmarks/bench_local_llm.py --model smollm2-135m -n 10 --json-out smollm2.json
    python benchmarks/bench_local_llm.py --model /path/to/own.gguf -n 5

The model is resolved with ``kura_pipeline.core.local_models`` (catalogue name or GGUF path),
served in-process by ``LlamaCppServer`` and queried with instructor's JSON_SCHEMA mode using the
pipeline's own summary prompt and response model. Results go to stdout (and ``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import instructor
import openai

from kura_pipeline.core.loaders import load_sharegpt_package
from kura_pipeline.core.local_models import resolve_local_model
from kura_pipeline.core.prompts import SUMMARY_PROMPT, SummaryResponse, format_conversation
from kura_pipeline.servers.llamacpp import LlamaCppServer


def _rss_mb() -> float | None:
    """This process's resident memory (the model lives in-process), from /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    # Other work on the machine skews every number here: record how busy it was.
    load_before = os.getloadavg()
    started = time.perf_counter()
    model = resolve_local_model(args.model, Path(args.cache_dir) if args.cache_dir else None)
    resolve_s = time.perf_counter() - started
    n_ctx = args.n_ctx or model.n_ctx
    char_budget = args.char_budget or model.char_budget
    conversations = load_sharegpt_package(max_conversations=args.n).conversations

    started = time.perf_counter()
    server = LlamaCppServer(
        model.path, alias=model.alias, n_ctx=n_ctx, threads=args.threads, n_predict=args.max_tokens
    )
    server.start()
    load_s = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    try:
        client = instructor.from_openai(
            openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0),
            mode=instructor.Mode.JSON_SCHEMA,
        )
        for conversation in conversations:
            transcript = format_conversation(conversation, char_budget)
            row: dict[str, Any] = {"chat_id": conversation.chat_id, "chars": len(transcript)}
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                summary, completion = client.chat.completions.create_with_completion(
                    model=model.alias,
                    response_model=SummaryResponse,
                    messages=SUMMARY_PROMPT.messages(transcript=transcript),
                    max_tokens=args.max_tokens,
                    temperature=0,
                    max_retries=0,  # measure single-shot validity, not retries
                    extra_body=model.extra_body or None,
                )
            except Exception as error:  # a benchmark reports failures instead of stopping
                row["seconds"] = time.perf_counter() - started
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            else:
                row["seconds"] = time.perf_counter() - started
                # The server runs in this process: CPU seconds are the work itself, which a busy
                # machine inflates far less than wall seconds (with threads=1, no spin-waiting).
                row["cpu_s"] = time.process_time() - cpu_started
                usage = completion.usage
                if usage is not None:
                    row.update(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
                # llama.cpp's server adds a non-standard `timings` object to each response.
                timings = (completion.model_extra or {}).get("timings") or {}
                row.update(
                    prompt_tok_s=timings.get("prompt_per_second"),
                    gen_tok_s=timings.get("predicted_per_second"),
                    first_user_message=conversation.messages[0].content[:160],
                    summary=summary.model_dump(),
                )
            rows.append(row)
            print(_line(row), flush=True)
        rss = _rss_mb()
    finally:
        server.stop()

    ok = [row for row in rows if "error" not in row]
    seconds = [row["seconds"] for row in ok]
    cpu = [row["cpu_s"] for row in ok]
    return {
        "model": model.alias,
        "path": str(model.path),
        "gguf_bytes": model.path.stat().st_size,
        "n_ctx": n_ctx,
        "threads": args.threads,
        "char_budget": char_budget,
        "prompt": SUMMARY_PROMPT.key,
        "response_schema": SummaryResponse.model_json_schema(),
        "extra_body": model.extra_body,
        "nproc": os.cpu_count(),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "date": time.strftime("%Y-%m-%d"),
        "resolve_s": resolve_s,
        "load_s": load_s,
        "rss_mb_after": rss,
        "ok": len(ok),
        "failed": len(rows) - len(ok),
        "mean_s": statistics.fmean(seconds) if seconds else None,
        "median_s": statistics.median(seconds) if seconds else None,
        "mean_cpu_s": statistics.fmean(cpu) if cpu else None,
        "rows": rows,
    }


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['chat_id']:>10} {row['chars']:>6} ch  {row['seconds']:6.1f} s  FAILED {row['error']}"
    prompt_rate = f"{row['prompt_tok_s']:.0f}" if row.get("prompt_tok_s") else "?"
    gen_rate = f"{row['gen_tok_s']:.0f}" if row.get("gen_tok_s") else "?"
    return (
        f"{row['chat_id']:>10} {row['chars']:>6} ch  {row['seconds']:6.1f} s ({row['cpu_s']:5.1f} cpu)  "
        f"{row.get('prompt_tokens', '?'):>5} prompt tok @ {prompt_rate}/s  "
        f"{row.get('completion_tokens', '?'):>4} gen tok @ {gen_rate}/s  | {row['summary']['summary'][:90]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="catalogue name or GGUF path")
    parser.add_argument("-n", type=int, default=10, help="conversations from the ShareGPT package")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=0, help="default: the model's recommended size")
    parser.add_argument("--char-budget", type=int, default=0, help="default: the model's recommendation")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--cache-dir", default=None, help="where chunked models are assembled")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    summary = {key: value for key, value in result.items() if key != "rows"}
    print(json.dumps(summary, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
