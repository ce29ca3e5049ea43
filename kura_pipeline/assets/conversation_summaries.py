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

from kura_pipeline.core.backends import OfflineBackend
from kura_pipeline.core.calibration import gate_facets
from kura_pipeline.core.frames import summaries_to_frame
from kura_pipeline.core.kura_format import split_summarised
from kura_pipeline.core.loaders import prior_summaries
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.llm import LLMResource
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline.resources.registry import DatasetRegistry


@asset(
    partitions_def=datasets_partitions,
    group_name="kura",
    kinds={"polars", "parquet"},
    pool="llm",
    check_specs=[AssetCheckSpec("every_conversation_summarised", asset="conversation_summaries")],
)
def conversation_summaries(
    context: AssetExecutionContext,
    raw_conversations: pl.DataFrame,
    llm: LLMResource,
    privacy: PrivacyPolicy,
    registry: DatasetRegistry,
) -> Iterator[Output | AssetCheckResult]:
    """One summary per conversation with Clio's facets; a conversation whose summary failed keeps
    its row, with the reason in `failure_reason`. Offline, a summary is a task type and phrases
    that enough conversations share, never the user's sentences.

    The judgement facets (concerning score, user frustration) are kept only when the summariser
    passed the facet calibration (core/calibration.py); otherwise they are null, with
    `facets_assessed` False, and read "not assessed by this model"."""
    backend = llm.select_backend(log=context.log.info)
    calibration = backend.calibrate_facets()
    if isinstance(backend, OfflineBackend):  # expected, not a fault: said once, plainly
        context.log.info(f"judgement facets not assessed: {calibration.reason}")
    elif not calibration.passed:
        context.log.warning(f"judgement facets not assessed: {calibration.model} {calibration.reason}")
    spec = registry.get(context.partition_key)
    # A source that already carries summaries (a Kura checkpoint): those are kept, not paid again.
    prior = prior_summaries(spec.loader, spec.options) if spec.inbox is None else {}
    todo, kept = split_summarised(raw_conversations, prior)
    run = backend.summarise(todo, privacy.threshold, privacy.user_id_field)
    run.summaries.extend(kept)
    if run.failures:
        context.log.warning(f"{len(run.failures)} conversations could not be summarised")
    yield Output(
        summaries_to_frame(gate_facets(run.summaries, calibration), run.failures),
        metadata={
            "backend": backend.label,
            "summarised": len(run.summaries),
            "summaries_kept_from_source": len(kept),
            "failed": len(run.failures),
            "facet_calibration": MetadataValue.json(calibration.as_metadata()),
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
