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

from kura_pipeline.core.frames import summaries_to_frame
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy


@asset(
    partitions_def=datasets_partitions,
    group_name="kura",
    kinds={"polars", "parquet"},
    pool="llm",
    check_specs=[AssetCheckSpec("every_conversation_summarised", asset="conversation_summaries")],
)
def conversation_summaries(
    context: AssetExecutionContext, raw_conversations: pl.DataFrame, llm: LLMResource, privacy: PrivacyPolicy
) -> Iterator[Output | AssetCheckResult]:
    """One summary per conversation with Clio's facets; a conversation whose summary failed keeps
    its row, with the reason in `failure_reason`. Offline, a summary is a task type and phrases
    that enough conversations share, never the user's sentences."""
    backend = llm.select_backend(log=context.log.info)
    run = backend.summarise(raw_conversations, privacy.threshold, privacy.user_id_field)
    if run.failures:
        context.log.warning(f"{len(run.failures)} conversations could not be summarised")
    yield Output(
        summaries_to_frame(run.summaries, run.failures),
        metadata={
            "backend": backend.label,
            "summarised": len(run.summaries),
            "failed": len(run.failures),
            "pii_scrubbed": MetadataValue.json(dict(run.pii_scrubbed)),
            **backend.metadata(),
        },
    )
    # A warning, not an error: failed rows keep their reason, and a re-run retries only them.
    yield AssetCheckResult(
        check_name="every_conversation_summarised",
        passed=not run.failures,
        severity=AssetCheckSeverity.WARN,
        metadata={"failed": len(run.failures), "of": raw_conversations.height},
    )
