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

from kura_pipeline.core.frames import frame_to_conversations, iter_conversation_chunks, summaries_to_frame
from kura_pipeline.core.llm import run_llm
from kura_pipeline.core.summarise import SummaryRun, summarise_all_offline, summarise_all_with_llm
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
    stats: dict[str, int] = {}
    if llm.is_offline:
        # A chunk of conversations as models at a time: all of them next to the table took
        # 4 GB at 100,000 conversations.
        run = SummaryRun(summaries=[])
        for chunk in iter_conversation_chunks(raw_conversations):
            part = summarise_all_offline(chunk)
            run.summaries.extend(part.summaries)
            run.pii_scrubbed.update(part.pii_scrubbed)
    else:
        # One gather over every conversation: one progress line and ETA for the whole stage.
        client = llm.client(llm.summary_client, log=context.log.info)
        conversations = frame_to_conversations(raw_conversations)
        run = run_llm(summarise_all_with_llm(conversations, client, llm.char_budget), client)
        del conversations
        stats = client.metadata()
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
        metadata={"failed": len(run.failures), "of": raw_conversations.height},
    )
