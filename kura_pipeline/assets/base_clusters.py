import asyncio

import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset

from kura_pipeline.core.cluster import base_cluster_groups, choose_k, cluster_id, slugify
from kura_pipeline.core.frames import clusters_to_frame, frame_to_embeddings, frame_to_summaries
from kura_pipeline.core.models import Cluster
from kura_pipeline.core.naming import llm_labels, offline_labels
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.llm import LLMResource


class BaseClustersConfig(Config):
    conversations_per_cluster: int = 10
    max_clusters: int | None = None
    seed: int = 0


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"})
def base_clusters(
    context: AssetExecutionContext,
    config: BaseClustersConfig,
    conversation_summaries: pl.DataFrame,
    summary_embeddings: pl.DataFrame,
    llm: LLMResource,
) -> Output:
    """k-means over the summary embeddings, each cluster named and described (contrastively,
    against its nearest outsiders, when an LLM is configured)."""
    summary_of = {s.chat_id: s.summary for s in frame_to_summaries(conversation_summaries)}
    chat_ids, embeddings = frame_to_embeddings(summary_embeddings)
    k = choose_k(len(chat_ids), config.conversations_per_cluster, config.max_clusters)
    members, inside, outside = base_cluster_groups(embeddings, k, seed=config.seed)

    def texts(rows_per_group: list) -> list[list[str]]:
        return [[summary_of[chat_ids[r]] for r in rows] for rows in rows_per_group]

    stats: dict[str, int] = {}
    if llm.is_offline:
        labels = offline_labels(texts(members))
    else:
        client = llm.client(log=context.log.info)
        labels = asyncio.run(llm_labels(client, texts(inside), texts(outside)))
        stats = client.stats.as_metadata()
    taken: set[str] = set()
    clusters = [
        Cluster(
            id=cluster_id(0, [chat_ids[r] for r in rows]),
            name=label.name,
            description=label.description,
            slug=slugify(label.name, taken),
            chat_ids=sorted(chat_ids[r] for r in rows),
            level=0,
        )
        for rows, label in zip(members, labels, strict=True)
    ]
    top = sorted(clusters, key=lambda c: -c.count)[:20]
    return Output(
        clusters_to_frame(clusters),
        metadata={
            "backend": llm.label,
            "clusters": len(clusters),
            "naming_failures": sum(1 for label in labels if label.failed_reason),
            "largest": MetadataValue.md(
                "| cluster | conversations |\n|---|---|\n"
                + "\n".join(f"| {c.name} | {c.count} |" for c in top)
            ),
            **stats,
        },
    )
