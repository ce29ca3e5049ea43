import asyncio

import polars as pl
from dagster import AssetExecutionContext, Config, Output, asset

from kura_pipeline.core.extract import extract_properties, load_extractor
from kura_pipeline.core.frames import frame_to_conversations, properties_to_frame
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.llm import LLMResource


class ExtractorsConfig(Config):
    """Built-in names or 'module:function' references (Kura's extractor signature)."""

    extractors: list[str] = ["message_count", "user_turns", "conversation_characters"]


@asset(partitions_def=datasets_partitions, group_name="kura", kinds={"polars", "parquet"}, pool="llm")
def extracted_properties(
    context: AssetExecutionContext,
    config: ExtractorsConfig,
    raw_conversations: pl.DataFrame,
    llm: LLMResource,
) -> Output:
    """The user's extractors and the conversations' own metadata, long form (chat_id, name, value)."""
    extractors = {reference: load_extractor(reference) for reference in config.extractors}
    clients = {} if llm.is_offline else {"default": llm.client(log=context.log.info)}
    run = asyncio.run(
        extract_properties(
            frame_to_conversations(raw_conversations),
            extractors,
            clients=clients,
        )
    )
    for failure in run.failures[:20]:
        context.log.warning(f"extractor failed: {failure}")
    frame = properties_to_frame(run.rows)
    return Output(
        frame,
        metadata={
            "backend": llm.label,
            "properties": frame["name"].n_unique(),
            "extractor_failures": len(run.failures),
        },
    )
