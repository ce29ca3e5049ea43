from pathlib import Path

from dagster import AssetExecutionContext, Failure, MetadataValue, Output, asset

from kura_pipeline.core.batches import list_batch_files, load_batches
from kura_pipeline.core.frames import INITIAL_BATCH, ConversationFrameBuilder
from kura_pipeline.core.loaders import DUPLICATE_REASONS, LoaderError, SkippedRecord, iter_load
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.registry import DatasetRegistry

SKIPS_SHOWN = 50


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"})
def raw_conversations(context: AssetExecutionContext, registry: DatasetRegistry) -> Output:
    """The dataset's conversations, loaded, validated and de-duplicated by chat_id, each with
    the batch it arrived with (the inbox file, or "initial" for a dataset loaded whole).

    Records that cannot be used are skipped, counted and listed here with their reason;
    a file that cannot be read at all fails the run with a message naming it, and the
    stored table stays as it was. Characters replaced by U+FFFD (invalid UTF-8 bytes, lone
    surrogates) are counted too. created_at is null where the source has no date.
    """
    spec = registry.get(context.partition_key)
    # Conversations go into the table a chunk at a time as they are read: at 100,000
    # conversations, holding every one as models as well as the table took 4.8 GB.
    builder = ConversationFrameBuilder()
    skipped: list[SkippedRecord] = []
    batches: list[str] = []
    updated = 0
    try:
        if spec.inbox is not None:
            # Later batches update earlier conversations, so batches are merged as models first.
            files = list_batch_files(spec.inbox)
            batches = [f.batch for f in files]
            loaded = load_batches(files, spec.loader, spec.options)
            skipped, updated = loaded.skipped, loaded.updated
            for conversation in loaded.conversations:
                builder.add(conversation, loaded.batch_of.get(conversation.chat_id, INITIAL_BATCH))
            del loaded
        else:
            for item in iter_load(spec.loader, **spec.options):
                if isinstance(item, SkippedRecord):
                    skipped.append(item)
                else:
                    builder.add(item)
            # The loader's own skips first, then the duplicates, as `load` reports them.
            skipped.sort(key=lambda record: record.reason in DUPLICATE_REASONS)
    except LoaderError as error:
        raise Failure(description=f"dataset {spec.name!r}: {error}") from error
    if skipped:
        context.log.warning(f"{len(skipped)} records skipped in dataset {spec.name!r}")
    if not builder.conversations:
        where = f"inbox {Path(spec.inbox)}" if spec.inbox else spec.loader
        raise Failure(
            description=f"dataset {spec.name!r} ({where}) has no usable conversation; "
            f"{len(skipped)} records skipped"
            + "".join(f"\n- {s.source} {s.record}: {s.reason}" for s in skipped[:10])
        )
    skipped_table = "\n".join(
        ["| source | record | reason |", "|---|---|---|"]
        + [f"| {_cell(s.source)} | {_cell(s.record)} | {_cell(s.reason)} |" for s in skipped[:SKIPS_SHOWN]]
    )
    return Output(
        builder.frame(),
        metadata={
            "dataset": spec.name,
            "loader": spec.loader,
            "conversations": builder.conversations,
            "messages": builder.messages,
            "batches": len(batches) if spec.inbox else 1,
            "updated_by_later_batches": updated,
            "skipped_records": len(skipped),
            # Loaded, but with characters that could not be kept (see metadata.replaced_characters).
            "replaced_characters": builder.replaced_characters,
            "skipped": MetadataValue.md(skipped_table if skipped else "none"),
        },
    )


def _cell(text: str) -> str:
    """Text for a markdown table cell: a '|' or a line break in a record's id must not break the table."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")
