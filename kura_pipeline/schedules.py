"""Re-clustering on a schedule: only datasets whose summaries changed since they were clustered."""

from __future__ import annotations

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.io_manager import CONTENT_HASH_KEY


def _latest_metadata(instance: DagsterInstance, asset: str, partition: str) -> dict[str, object] | None:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    return {key: value.value for key, value in records[0].asset_materialization.metadata.items()}


def datasets_due_for_reclustering(instance: DagsterInstance) -> dict[str, str]:
    """Dataset -> the embeddings fingerprint that its clusters do not reflect yet."""
    due = {}
    for dataset in instance.get_dynamic_partitions(datasets_partitions.name):
        embeddings = _latest_metadata(instance, "summary_embeddings", dataset)
        if embeddings is None or CONTENT_HASH_KEY not in embeddings:
            continue  # nothing to cluster yet
        clusters = _latest_metadata(instance, "base_clusters", dataset) or {}
        if clusters.get("embeddings_content_sha256") != embeddings[CONTENT_HASH_KEY]:
            due[dataset] = str(embeddings[CONTENT_HASH_KEY])
    return due


@schedule(cron_schedule="0 * * * *", job_name="recluster", default_status=DefaultScheduleStatus.RUNNING)
def recluster_schedule(context: ScheduleEvaluationContext) -> list[RunRequest] | SkipReason:
    """Hourly: re-cluster each dataset whose summaries (hence embeddings) changed since its last
    clustering; a dataset with nothing new is left alone (no run, no LLM call)."""
    due = datasets_due_for_reclustering(context.instance)
    if not due:
        return SkipReason("no dataset has new summaries since it was last clustered")
    return [RunRequest(run_key=f"{d}:{sha[:16]}", partition_key=d) for d, sha in sorted(due.items())]
