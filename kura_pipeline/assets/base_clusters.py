import numpy as np
import polars as pl
from dagster import AssetExecutionContext, AssetIn, Config, MetadataValue, Output, asset

from kura_pipeline.core.backends import BaseGroups, dataset_corpus
from kura_pipeline.core.cluster import (
    base_cluster_groups,
    centroid,
    choose_k,
    cluster_id,
    coarse_partition,
    slugify,
)
from kura_pipeline.core.frames import (
    clusters_to_frame,
    content_sha256,
    frame_to_clusters,
    frame_to_embeddings,
)
from kura_pipeline.core.identity import batch_counts, farthest_points, match_lineage, previous_centroids
from kura_pipeline.core.models import Cluster
from kura_pipeline.core.naming import ClusterLabel
from kura_pipeline.core.privacy import withheld_cluster_ids
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
    # Base clusters are made inside the hierarchy's top-level groups (flat k-means, at most this
    # many, their number chosen from the data), so the top level loses nothing to them; set it
    # as meta_clusters' max_top_clusters. 0: plain k-means over everything.
    max_top_clusters: int = 10


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
    backend = llm.select_backend(log=context.log.info)
    batch_of = dict(zip(raw_conversations["chat_id"], raw_conversations["batch"], strict=True))
    chat_ids, embeddings = frame_to_embeddings(summary_embeddings)
    embedding_of = dict(zip(chat_ids, embeddings, strict=True))
    corpus = dataset_corpus(conversation_summaries, chat_ids, privacy.threshold, privacy.user_id_field)
    k = choose_k(len(chat_ids), config.conversations_per_cluster, config.max_clusters)

    previous_frame = stages.read("base_clusters", context.partition_key) if config.keep_identity else None
    previous = frame_to_clusters(previous_frame) if previous_frame is not None else []
    coarse = (
        coarse_partition(embeddings, config.max_top_clusters, config.seed)
        if config.max_top_clusters
        else None
    )
    init = None
    if previous and coarse is not None:  # each top-level group restarts from its own clusters
        init = previous_centroids(previous, embedding_of, limit=len(previous))
    elif previous:
        init = previous_centroids(previous, embedding_of, limit=k)
        if 0 < len(init) < k:
            init = np.vstack([init, farthest_points(embeddings, init, k - len(init))])
    # Offline names read every member, not a sample against outsiders: skip computing those.
    inside_limit, outside_limit = backend.sample_limits or (0, 0)
    members, inside, outside = base_cluster_groups(
        embeddings,
        k,
        seed=config.seed,
        init=init,
        inside_limit=inside_limit,
        outside_limit=outside_limit,
        coarse=coarse,
    )
    member_ids = [[chat_ids[r] for r in rows] for rows in members]
    lineages = match_lineage(
        member_ids,
        np.stack([centroid(embeddings[rows]) for rows in members]) if members else embeddings,
        previous,
        embedding_of,
    )

    # Only clusters that are not an earlier one get (and pay for) a name; names that cost
    # nothing (offline) are made afresh, so a better namer reaches every cluster.
    to_name = [i for i, lineage in enumerate(lineages) if lineage.previous is None or backend.names_are_free]
    rows_of = [corpus.rows(ids) for ids in member_ids]  # embedding rows are corpus rows
    groups = BaseGroups(
        members=rows_of,
        inside=[[int(r) for r in rows] for rows in inside],
        outside=[[int(r) for r in rows] for rows in outside],
    )
    labels = backend.name(corpus, groups, to_name)

    # Nothing moved since the last run: its lineage still says how these clusters came to be (a
    # run over unchanged data changes no file).
    unchanged = bool(previous) and sorted(map(sorted, member_ids)) == sorted(
        sorted(p.chat_ids) for p in previous
    )
    taken = {lineage.previous.slug for lineage in lineages if lineage.previous is not None}
    clusters = []
    for i, (ids, lineage) in enumerate(zip(member_ids, lineages, strict=True)):
        kept = lineage.previous
        label = labels.get(i) or ClusterLabel(kept.name, kept.description)  # type: ignore[union-attr]
        same_name = kept is not None and kept.name == label.name
        clusters.append(
            Cluster(
                id=kept.id if kept else cluster_id(0, ids),
                name=label.name,
                description=label.description,
                slug=kept.slug if kept and same_name else slugify(label.name, taken),
                chat_ids=sorted(ids),
                level=0,
                batch_counts=batch_counts(ids, batch_of),
                lineage=(kept.lineage if unchanged and kept else lineage.lineage if previous else "new"),
                previous_ids=kept.previous_ids if unchanged and kept else lineage.previous_ids,
                fallback=label.failed_reason if i in labels else kept.fallback,  # type: ignore[union-attr]
            )
        )
    # Only clusters above the privacy threshold may be named to a person, here as anywhere.
    hidden = withheld_cluster_ids(clusters, privacy.threshold, corpus.user_of() or None)
    top = sorted((c for c in clusters if c.id not in hidden), key=lambda c: -c.count)[:20]
    return Output(
        clusters_to_frame(clusters),
        metadata={
            "backend": backend.label,
            "clusters": len(clusters),
            "kept_from_last_run": sum(1 for c in clusters if c.lineage == "kept"),
            "named_this_run": len(to_name),
            "naming_fallbacks": sum(1 for label in labels.values() if label.failed_reason),
            "top_level_groups": int(coarse.max()) + 1 if coarse is not None and len(coarse) else 0,
            # What the schedule compares to decide whether re-clustering is due.
            "embeddings_content_sha256": content_sha256(summary_embeddings),
            "below_privacy_threshold": len(hidden),
            "largest": MetadataValue.md(
                "| cluster | conversations |\n|---|---|\n"
                + "\n".join(f"| {escape_markdown(c.name)} | {c.count} |" for c in top)
            ),
            **backend.metadata(),
        },
    )
