import polars as pl
from dagster import AssetExecutionContext, Config, Failure, Output, asset

from kura_pipeline.core.extract import ExtractorError, extract_properties, load_extractor
from kura_pipeline.core.frames import iter_conversation_chunks, properties_to_frame
from kura_pipeline.core.llm import combined_metadata, run_llm
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.registry import DatasetRegistry


class ExtractorsConfig(Config):
    """Built-in names or 'module:function' references: Kura's signature (conversation, sems,
    clients) or the project's (conversation, clients=, semaphores=). The dataset's own
    `extractors:` in the registry are added to these."""

    extractors: list[str] = ["message_count", "user_turns", "conversation_characters"]


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"}, pool="llm")
def extracted_properties(
    context: AssetExecutionContext,
    config: ExtractorsConfig,
    raw_conversations: pl.DataFrame,
    llm: LLMResource,
    registry: DatasetRegistry,
) -> Output:
    """The user's extractors and the conversations' own metadata, long form (chat_id, name, value)."""
    spec = registry.get(context.partition_key)
    references = list(dict.fromkeys([*config.extractors, *spec.extractors]))  # in order, once each
    try:
        extractors = {reference: load_extractor(reference) for reference in references}
    except ExtractorError as error:
        # One line naming the dataset and the entry, not an import traceback.
        raise Failure(description=f"dataset {spec.name!r}: {error}") from None
    clients = llm.all_clients(log=context.log.info)

    async def extract_in_chunks() -> tuple[list[pl.DataFrame], list[str]]:
        # A chunk of conversations at a time, each chunk's rows straight into a table: every
        # conversation as models, and a coroutine per conversation and extractor, took 4.3 GB
        # at 100,000 conversations. One event loop, so LLM clients keep their semaphores.
        frames, failures = [], []
        for chunk in iter_conversation_chunks(raw_conversations):
            part = await extract_properties(chunk, extractors, clients=clients)
            frames.append(properties_to_frame(part.rows))
            failures.extend(part.failures)
        return frames, failures

    frames, failures = run_llm(extract_in_chunks(), *clients.values())
    frame = pl.concat(frames) if frames else properties_to_frame([])
    for failure in failures[:20]:
        context.log.warning(f"extractor failed: {failure}")
    return Output(
        frame,
        metadata={
            "backend": llm.label,
            "extractors": ", ".join(references),
            "properties": frame["name"].n_unique(),
            "extractor_failures": len(failures),
            **({"first_extractor_failure": failures[0]} if failures else {}),
            **(combined_metadata(list(clients.values())) if clients else {}),
        },
    )
