import asyncio
from collections.abc import Iterator

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MetadataValue,
    Output,
    asset,
)

from kura_pipeline.core.frames import frame_to_conversations, summaries_to_frame
from kura_pipeline.core.summarise import summarise_all_offline, summarise_all_with_llm
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.llm import LLMResource


@asset(
    partitions_def=datasets_partitions,
    group_name="kura",
    kinds={"polars", "parquet"},
    pool="llm",
    check_specs=[AssetCheckSpec("every_conversation_summarised", asset="conversation_summaries")],
)
def conversation_summaries(
    context: AssetExecutionContext, raw_conversations: pl.DataFrame, llm: LLMResource
) -> Iterator[Output | AssetCheckResult]:
    """One summary per conversation with Clio's facets; a conversation whose summary failed keeps
    its row, with the reason in `failure_reason`."""
    conversations = frame_to_conversations(raw_conversations)
    stats: dict[str, int] = {}
    if llm.is_offline:
        run = summarise_all_offline(conversations)
    else:
        client = llm.client(log=context.log.info)
        run = asyncio.run(summarise_all_with_llm(conversations, client, llm.char_budget))
        stats = client.stats.as_metadata()
    if run.failures:
        context.log.warning(f"{len(run.failures)} conversations could not be summarised")
    yield Output(
        summaries_to_frame(run.summaries, run.failures),
        metadata={
            "backend": llm.label,
            "summarised": len(run.summaries),
            "failed": len(run.failures),
            "pii_scrubbed": MetadataValue.json(dict(run.pii_scrubbed)),
            **stats,
        },
    )
    # A warning, not an error: failed rows keep their reason, and a re-run retries only them.
    yield AssetCheckResult(
        check_name="every_conversation_summarised",
        passed=not run.failures,
        severity=AssetCheckSeverity.WARN,
        metadata={"failed": len(run.failures), "of": len(conversations)},
    )
