from dagster import AssetExecutionContext, Failure, MetadataValue, Output, asset

from kura_pipeline.core.frames import conversations_to_frame
from kura_pipeline.core.loaders import LoaderError, load
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.registry import DatasetRegistry

SKIPS_SHOWN = 50


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"})
def raw_conversations(context: AssetExecutionContext, registry: DatasetRegistry) -> Output:
    """The dataset's conversations, loaded, validated and de-duplicated by chat_id.

    Records that cannot be used are skipped, counted and listed here with their reason;
    a file that cannot be read at all fails the run with a message naming it.
    """
    spec = registry.get(context.partition_key)
    try:
        result = load(spec.loader, **spec.options)
    except LoaderError as error:
        raise Failure(description=f"dataset {spec.name!r}: {error}") from error
    if result.skipped:
        context.log.warning(f"{len(result.skipped)} records skipped in dataset {spec.name!r}")
    if not result.conversations:
        raise Failure(
            description=f"dataset {spec.name!r} ({spec.loader}) has no usable conversation; "
            f"{len(result.skipped)} records skipped"
            + "".join(f"\n- {s.source} {s.record}: {s.reason}" for s in result.skipped[:10])
        )
    skipped_table = "\n".join(
        ["| source | record | reason |", "|---|---|---|"]
        + [f"| {s.source} | {s.record} | {s.reason} |" for s in result.skipped[:SKIPS_SHOWN]]
    )
    return Output(
        conversations_to_frame(result.conversations),
        metadata={
            "dataset": spec.name,
            "loader": spec.loader,
            "conversations": len(result.conversations),
            "messages": sum(len(c.messages) for c in result.conversations),
            "skipped_records": len(result.skipped),
            "skipped": MetadataValue.md(skipped_table if result.skipped else "none"),
        },
    )
