import polars as pl
from dagster import AssetExecutionContext, Config, MetadataValue, Output, asset

from kura_pipeline.core.evaluate import (
    DEFAULT_MAJORITY_SHARE,
    evaluate_hierarchy,
    labels_from_metadata,
    markdown_table,
)
from kura_pipeline.core.frames import frame_to_clusters
from kura_pipeline.partitions import datasets_partitions


class EvaluationConfig(Config):
    # The metadata field holding each conversation's ground-truth label.
    label_field: str = "topic"
    # spillover_rate_majority: a label spills if less than this share is in its largest cluster.
    majority_share: float = DEFAULT_MAJORITY_SHARE


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"})
def evaluation(
    context: AssetExecutionContext,
    config: EvaluationConfig,
    raw_conversations: pl.DataFrame,
    meta_clusters: pl.DataFrame,
) -> Output:
    """How well each level of the hierarchy recovers a ground-truth label kept in the
    conversations' metadata: Hungarian-matched accuracy, NMI, ARI, purity and Kura's spillover
    rate, one row per level. Empty (and says so) when no conversation carries the label."""
    label_of = labels_from_metadata(
        raw_conversations["chat_id"].to_list(), raw_conversations["metadata"].to_list(), config.label_field
    )
    table = evaluate_hierarchy(frame_to_clusters(meta_clusters), label_of, config.majority_share)
    if table.height == 0:
        context.log.info(f"no clustered conversation has metadata.{config.label_field}: nothing to score")
    return Output(
        table,
        metadata={
            "label_field": config.label_field,
            "labelled_conversations": len(label_of),
            "scored_conversations": int(table["conversations"][0]) if table.height else 0,
            "evaluation": MetadataValue.md(
                markdown_table(table) if table.height else f"no conversation has `{config.label_field}`"
            ),
        },
    )
