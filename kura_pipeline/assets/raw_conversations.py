from pathlib import Path

from dagster import AssetExecutionContext, Failure, MetadataValue, Output, asset

from kura_pipeline.core.batches import list_batch_files, load_batches
from kura_pipeline.core.frames import conversations_to_frame
from kura_pipeline.core.loaders import LoaderError, load
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.registry import DatasetRegistry

SKIPS_SHOWN = 50


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"})
def raw_conversations(context: AssetExecutionContext, registry: DatasetRegistry) -> Output:
    """The dataset's conversations, loaded, validated and de-duplicated by chat_id, each with
    the batch it arrived with (the inbox file, or "initial" for a dataset loaded whole).

    Records that cannot be used are skipped, counted and listed here with their reason;
    a file that cannot be read at all fails the run with a message naming it, and the
    stored table stays as it was.
    """
    spec = registry.get(context.partition_key)
    batch_of: dict[str, str] = {}
    batches: list[str] = []
    updated = 0
    try:
        if spec.inbox is not None:
            files = list_batch_files(spec.inbox)
            batches = [f.batch for f in files]
            loaded = load_batches(files, spec.loader, spec.options)
            conversations, skipped, batch_of, updated = (
                loaded.conversations,
                loaded.skipped,
                loaded.batch_of,
                loaded.updated,
            )
        else:
            result = load(spec.loader, **spec.options)
            conversations, skipped = result.conversations, result.skipped
    except LoaderError as error:
        raise Failure(description=f"dataset {spec.name!r}: {error}") from error
    if skipped:
        context.log.warning(f"{len(skipped)} records skipped in dataset {spec.name!r}")
    if not conversations:
        where = f"inbox {Path(spec.inbox)}" if spec.inbox else spec.loader
        raise Failure(
            description=f"dataset {spec.name!r} ({where}) has no usable conversation; "
            f"{len(skipped)} records skipped"
            + "".join(f"\n- {s.source} {s.record}: {s.reason}" for s in skipped[:10])
        )
    skipped_table = "\n".join(
        ["| source | record | reason |", "|---|---|---|"]
        + [f"| {s.source} | {s.record} | {s.reason} |" for s in skipped[:SKIPS_SHOWN]]
    )
    return Output(
        conversations_to_frame(conversations, batch_of),
        metadata={
            "dataset": spec.name,
            "loader": spec.loader,
            "conversations": len(conversations),
            "messages": sum(len(c.messages) for c in conversations),
            "batches": len(batches) if spec.inbox else 1,
            "updated_by_later_batches": updated,
            "skipped_records": len(skipped),
            "skipped": MetadataValue.md(skipped_table if skipped else "none"),
        },
    )
