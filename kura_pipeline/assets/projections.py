import polars as pl
from dagster import AssetExecutionContext, Config, Output, asset

from kura_pipeline.core.frames import PROJECTIONS_SCHEMA, frame_to_clusters, frame_to_embeddings
from kura_pipeline.core.project import (
    MIN_POINTS_FOR_UMAP,
    cluster_at_each_level,
    cluster_positions,
    project_2d,
)
from kura_pipeline.partitions import datasets_partitions


class ProjectionsConfig(Config):
    n_neighbors: int = 15
    seed: int = 0


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"})
def projections(
    context: AssetExecutionContext,
    config: ProjectionsConfig,
    summary_embeddings: pl.DataFrame,
    meta_clusters: pl.DataFrame,
) -> Output:
    """A 2-D UMAP map: one row per conversation (with its cluster at every level, base first)
    and one per cluster, placed at the mean of its conversations."""
    chat_ids, embeddings = frame_to_embeddings(summary_embeddings)
    clusters = frame_to_clusters(meta_clusters)
    coords = project_2d(embeddings, seed=config.seed, n_neighbors=config.n_neighbors)
    paths = cluster_at_each_level(clusters)
    level_of = {c.id: c.level for c in clusters}
    rows = [
        {
            "kind": "conversation",
            "id": chat,
            "x": float(x),
            "y": float(y),
            "level": None,
            "cluster_ids": paths.get(chat, []),
        }
        for chat, (x, y) in zip(chat_ids, coords, strict=True)
    ]
    rows += [
        {"kind": "cluster", "id": cid, "x": x, "y": y, "level": level_of[cid], "cluster_ids": [cid]}
        for cid, (x, y) in cluster_positions(clusters, chat_ids, coords).items()
    ]
    return Output(
        pl.DataFrame(rows, schema=PROJECTIONS_SCHEMA),
        metadata={
            "conversations": len(chat_ids),
            "clusters": len(clusters),
            "method": "umap" if len(chat_ids) >= MIN_POINTS_FOR_UMAP else "pca",
        },
    )
