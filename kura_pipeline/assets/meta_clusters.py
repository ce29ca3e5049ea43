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

from kura_pipeline.core.backends import HierarchyInputs, dataset_corpus
from kura_pipeline.core.frames import clusters_to_frame, frame_to_clusters, frame_to_embeddings
from kura_pipeline.core.hierarchy import hierarchy_problems
from kura_pipeline.core.privacy import parents_with_nothing_shown, withheld_cluster_ids
from kura_pipeline.core.render.shown import shown_tree
from kura_pipeline.core.render.tree import fallback_note, render_markdown_tree
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy


class MetaClustersConfig(Config):
    # The top level's size is chosen from the data within [2, max_top_clusters].
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
    `parent_id` linking them); the top level has between 2 and `max_top_clusters` clusters, as
    many as the data holds. Clusters below the privacy policy's thresholds (or failing the
    audit), and parents all of whose children are, are flagged `withheld`: the tree here, in the
    terminal and in the explorer never shows them, and they lend no words to their parents'
    names. Clusters an LLM run named or grouped without the model say why in `fallback`."""
    backend = llm.select_backend(log=context.log.info)
    chat_ids, embeddings = frame_to_embeddings(summary_embeddings)
    corpus = dataset_corpus(conversation_summaries, chat_ids, privacy.threshold, privacy.user_id_field)
    base = frame_to_clusters(base_clusters)
    users = corpus.user_of() or None
    result = backend.build(
        HierarchyInputs(
            base_clusters=base,
            embedding_of=dict(zip(chat_ids, embeddings, strict=True)),
            corpus=corpus,
            withheld_base=withheld_cluster_ids(base, privacy.threshold, users),
            max_top_clusters=config.max_top_clusters,
            branching_factor=config.branching_factor,
            seed=config.seed,
        )
    )
    clusters = result.clusters
    withheld = withheld_cluster_ids(clusters, privacy.threshold, users)
    audited = backend.withheld([c for c in clusters if c.id not in withheld], privacy.min_audit_rating)
    emptied = parents_with_nothing_shown(clusters, withheld | audited)
    for cluster in clusters:
        cluster.withheld = cluster.id in withheld or cluster.id in audited or cluster.id in emptied
    levels = max(c.level for c in clusters) + 1 if clusters else 0
    fallbacks = [c for c in clusters if c.fallback]
    if note := fallback_note(clusters):
        context.log.warning(note)
    yield Output(
        clusters_to_frame(clusters),
        metadata={
            "backend": backend.label,
            "levels": levels,
            "clusters_per_level": MetadataValue.json(
                {str(level): sum(1 for c in clusters if c.level == level) for level in range(levels)}
            ),
            "top_level_clusters": sum(1 for c in clusters if c.parent_id is None),
            "assignment_fallbacks": sum(p.fallbacks for p in result.plans),
            "fallback_clusters": len(fallbacks),
            "withheld_clusters": len(withheld | audited | emptied),
            "withheld_by_privacy_audit": len(audited),
            # Conversations a reader is not shown, as the tree's withheld lines count them.
            "withheld_conversations": shown_tree(clusters).withheld_conversations,
            "tree": MetadataValue.md(render_markdown_tree(clusters)),
            **backend.metadata(),
        },
    )
    problems = hierarchy_problems(clusters, chat_ids, config.max_top_clusters)
    yield AssetCheckResult(
        check_name="hierarchy_is_consistent",
        passed=not problems,
        severity=AssetCheckSeverity.ERROR,
        metadata={"problems": MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none")},
    )
