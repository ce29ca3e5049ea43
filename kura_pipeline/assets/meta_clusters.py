from collections.abc import Iterator

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MetadataValue,
    Output,
    asset,
)

from kura_pipeline.core.frames import (
    clusters_to_frame,
    frame_to_clusters,
    frame_to_embeddings,
    summaries_by_chat,
)
from kura_pipeline.core.hierarchy import (
    build_hierarchy,
    hierarchy_problems,
    plan_level_clio,
    plan_level_offline,
)
from kura_pipeline.core.llm import run_llm
from kura_pipeline.core.privacy import users_from_metadata, withheld_cluster_ids
from kura_pipeline.core.privacy_audit import audit_clusters, withheld_by_audit
from kura_pipeline.core.render.tree import render_markdown_tree
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy


class MetaClustersConfig(Config):
    max_top_clusters: int = 10
    branching_factor: float = 4.0
    seed: int = 0


@asset(
    partitions_def=datasets_partitions,
    group_name="kura",
    kinds={"polars", "parquet"},
    pool="llm",
    check_specs=[AssetCheckSpec("hierarchy_is_consistent", asset="meta_clusters")],
)
def meta_clusters(
    context: AssetExecutionContext,
    config: MetaClustersConfig,
    base_clusters: pl.DataFrame,
    summary_embeddings: pl.DataFrame,
    conversation_summaries: pl.DataFrame,
    llm: LLMResource,
    privacy: PrivacyPolicy,
) -> Iterator[Output | AssetCheckResult]:
    """The whole hierarchy, every level in one table (level 0 = base clusters, parents above,
    `parent_id` linking them), built until the top level has at most `max_top_clusters`.
    Clusters below the privacy policy's thresholds are flagged `withheld`: the tree here, in the
    terminal and in the explorer never shows them."""
    chat_ids, embeddings = frame_to_embeddings(summary_embeddings)
    embedding_of = dict(zip(chat_ids, embeddings, strict=True))
    stats: dict[str, int] = {}
    if llm.is_offline:
        summary_of = summaries_by_chat(conversation_summaries)
        plan = plan_level_offline(summary_of, seed=config.seed)
    else:
        client = llm.client(llm.cluster_client, log=context.log.info)

        def plan(children, centroids, target):  # type: ignore[no-untyped-def]
            return run_llm(plan_level_clio(client, children, centroids, target, seed=config.seed), client)

    clusters, plans = build_hierarchy(
        frame_to_clusters(base_clusters),
        embedding_of,
        plan,
        max_top_clusters=config.max_top_clusters,
        branching_factor=config.branching_factor,
    )
    user_of = users_from_metadata(
        conversation_summaries["metadata"].to_list(),
        conversation_summaries["chat_id"].to_list(),
        privacy.user_id_field,
    )
    withheld = withheld_cluster_ids(clusters, privacy.threshold, user_of or None)
    audited: set[str] = set()
    if not llm.is_offline:
        shown = [c for c in clusters if c.id not in withheld]
        audited = withheld_by_audit(run_llm(audit_clusters(client, shown), client), privacy.min_audit_rating)
        stats = client.metadata()
    for cluster in clusters:
        cluster.withheld = cluster.id in withheld or cluster.id in audited
    levels = max(c.level for c in clusters) + 1 if clusters else 0
    yield Output(
        clusters_to_frame(clusters),
        metadata={
            "backend": llm.label,
            "levels": levels,
            "clusters_per_level": MetadataValue.json(
                {str(level): sum(1 for c in clusters if c.level == level) for level in range(levels)}
            ),
            "assignment_fallbacks": sum(p.fallbacks for p in plans),
            "withheld_clusters": len(withheld | audited),
            "withheld_by_privacy_audit": len(audited),
            "withheld_conversations": sum(c.count for c in clusters if c.withheld and c.level == 0),
            "tree": MetadataValue.md(render_markdown_tree(clusters)),
            **stats,
        },
    )
    problems = hierarchy_problems(clusters, chat_ids, config.max_top_clusters)
    yield AssetCheckResult(
        check_name="hierarchy_is_consistent",
        passed=not problems,
        severity=AssetCheckSeverity.ERROR,
        metadata={"problems": MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none")},
    )
