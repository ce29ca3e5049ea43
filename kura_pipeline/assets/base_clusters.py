
import numpy as np
import polars as pl
from dagster import AssetExecutionContext, AssetIn, Config, MetadataValue, Output, asset

from kura_pipeline.core.cluster import base_cluster_groups, centroid, choose_k, cluster_id, slugify
from kura_pipeline.core.frames import (
    clusters_to_frame,
    content_sha256,
    frame_to_clusters,
    frame_to_embeddings,
    summaries_by_chat,
)
from kura_pipeline.core.identity import batch_counts, farthest_points, match_lineage, previous_centroids
from kura_pipeline.core.llm import run_llm
from kura_pipeline.core.models import Cluster
from kura_pipeline.core.naming import ClusterLabel, llm_labels, offline_labels
from kura_pipeline.core.privacy import users_from_metadata, withheld_cluster_ids
from kura_pipeline.core.render.markdown import escape_markdown
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.io_manager import StageReader
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy


class BaseClustersConfig(Config):
    conversations_per_cluster: int = 10
    max_clusters: int | None = None
    seed: int = 0
    keep_identity: bool = True  # start from the last run's clusters and keep their ids and names


@asset(
    partitions_def=datasets_partitions,
    group_name="kura",
    kinds={"polars", "parquet"},
    pool="llm",
    # Only the batch of each conversation is read here: not the messages (1.3 GB at 100,000).
    ins={"raw_conversations": AssetIn(metadata={"columns": ["chat_id", "batch"]})},
)
def base_clusters(
    context: AssetExecutionContext,
    config: BaseClustersConfig,
    raw_conversations: pl.DataFrame,
    conversation_summaries: pl.DataFrame,
    summary_embeddings: pl.DataFrame,
    llm: LLMResource,
    stages: StageReader,
    privacy: PrivacyPolicy,
) -> Output:
    """k-means over the summary embeddings, each cluster named and described (contrastively,
    against its nearest outsiders, when an LLM is configured). A cluster that is substantially
    the same as in the last run keeps its id and name, and costs no naming call."""
    summary_of = summaries_by_chat(conversation_summaries)
    batch_of = dict(zip(raw_conversations["chat_id"], raw_conversations["batch"], strict=True))
    chat_ids, embeddings = frame_to_embeddings(summary_embeddings)
    embedding_of = dict(zip(chat_ids, embeddings, strict=True))
    k = choose_k(len(chat_ids), config.conversations_per_cluster, config.max_clusters)

    previous_frame = stages.read("base_clusters", context.partition_key) if config.keep_identity else None
    previous = frame_to_clusters(previous_frame) if previous_frame is not None else []
    init = None
    if previous:
        init = previous_centroids(previous, embedding_of, limit=k)
        if 0 < len(init) < k:
            init = np.vstack([init, farthest_points(embeddings, init, k - len(init))])
    # Offline names read every member, not a sample against outsiders: skip computing those.
    limits = {"inside_limit": 0, "outside_limit": 0} if llm.is_offline else {}
    members, inside, outside = base_cluster_groups(embeddings, k, seed=config.seed, init=init, **limits)
    member_ids = [[chat_ids[r] for r in rows] for rows in members]
    lineages = match_lineage(
        member_ids,
        np.stack([centroid(embeddings[rows]) for rows in members]) if members else embeddings,
        previous,
        embedding_of,
    )

    # Only clusters that are not an earlier one get (and pay for) a name.
    to_name = [i for i, lineage in enumerate(lineages) if lineage.previous is None]

    def texts(rows_per_group: list) -> list[list[str]]:
        return [[summary_of[chat_ids[r]] for r in rows] for rows in rows_per_group]

    stats: dict[str, int] = {}
    labels: dict[int, ClusterLabel] = {}
    if llm.is_offline:
        all_labels = offline_labels(texts(members))  # contrast needs every group
        labels = {i: all_labels[i] for i in to_name}
    elif to_name:
        client = llm.client(llm.cluster_client, log=context.log.info)
        named = run_llm(
            llm_labels(client, texts([inside[i] for i in to_name]), texts([outside[i] for i in to_name])),
            client,
        )
        labels = dict(zip(to_name, named, strict=True))
        stats = client.metadata()

    taken = {lineage.previous.slug for lineage in lineages if lineage.previous is not None}
    clusters = []
    for i, (ids, lineage) in enumerate(zip(member_ids, lineages, strict=True)):
        kept = lineage.previous
        clusters.append(
            Cluster(
                id=kept.id if kept else cluster_id(0, ids),
                name=kept.name if kept else labels[i].name,
                description=kept.description if kept else labels[i].description,
                slug=kept.slug if kept else slugify(labels[i].name, taken),
                chat_ids=sorted(ids),
                level=0,
                batch_counts=batch_counts(ids, batch_of),
                lineage=lineage.lineage if previous else "new",
                previous_ids=lineage.previous_ids,
            )
        )
    # Only clusters above the privacy threshold may be named to a person, here as anywhere.
    users = users_from_metadata(
        conversation_summaries["metadata"].to_list(),
        conversation_summaries["chat_id"].to_list(),
        privacy.user_id_field,
    )
    hidden = withheld_cluster_ids(clusters, privacy.threshold, users or None)
    top = sorted((c for c in clusters if c.id not in hidden), key=lambda c: -c.count)[:20]
    return Output(
        clusters_to_frame(clusters),
        metadata={
            "backend": llm.label,
            "clusters": len(clusters),
            "kept_from_last_run": sum(1 for c in clusters if c.lineage == "kept"),
            "named_this_run": len(to_name),
            "naming_failures": sum(1 for label in labels.values() if label.failed_reason),
            # What the schedule compares to decide whether re-clustering is due.
            "embeddings_content_sha256": content_sha256(summary_embeddings),
            "below_privacy_threshold": len(hidden),
            "largest": MetadataValue.md(
                "| cluster | conversations |\n|---|---|\n"
                + "\n".join(f"| {escape_markdown(c.name)} | {c.count} |" for c in top)
            ),
            **stats,
        },
    )
