"""Sensors: the registry's datasets become partitions, and batches landing in an inbox start a run."""

from __future__ import annotations

import json

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from kura_pipeline.core.batches import BatchFile, fingerprint, list_batch_files, load_batch_file
from kura_pipeline.core.loaders import LoaderError
from kura_pipeline.core.registry import DatasetSpec
from kura_pipeline.partitions import datasets_partitions, missing_partitions
from kura_pipeline.resources.registry import DatasetRegistry

# A file modified more recently than this may still be being written: wait for the next tick.
SETTLE_SECONDS = 10.0


@sensor(minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def dataset_registry_sensor(
    context: SensorEvaluationContext, registry: DatasetRegistry
) -> SensorResult | SkipReason:
    """Adds every dataset named in the registry as a partition of every asset; an entry that
    cannot be used is skipped with a warning naming it, and the others are still added."""
    for problem in registry.problems():
        context.log.warning(f"skipped: {problem}")
    new = missing_partitions(context.instance, registry.datasets())
    if not new:
        return SkipReason("every dataset in the registry is already a partition")
    context.log.info(f"registering datasets: {', '.join(new)}")
    return SensorResult(dynamic_partitions_requests=[datasets_partitions.build_add_request(new)])


def unreadable_batches(spec: DatasetSpec, files: list[BatchFile], seen: dict[str, list[int]]) -> list[str]:
    """Try each new or changed batch file with the dataset's loader; say what is wrong where."""
    problems = []
    for file in files:
        if seen.get(file.path.name) == [file.size, file.modified_ns]:
            continue  # read fine on an earlier tick
        try:
            load_batch_file(file, spec.loader, spec.options)
        except LoaderError as error:
            problems.append(f"dataset {spec.name!r}: batch {file.path}: {error}")
    return problems


def inbox_sensor_tick(
    registry: DatasetRegistry, registered: list[str], cursor: str | None, settle_seconds: float
) -> tuple[list[RunRequest], list[str], list[str], str]:
    """The sensor's decision as plain data: runs to request, datasets to register, problems to
    report, and the new cursor (per dataset: the batch files read so far)."""
    state: dict[str, dict[str, list[int]]] = json.loads(cursor) if cursor else {}
    requests, new_datasets, problems = [], [], []
    for spec in registry.datasets().values():
        if spec.inbox is None:
            continue
        files = list_batch_files(spec.inbox, settle_seconds)
        seen = state.get(spec.name, {})
        current = {f.path.name: [f.size, f.modified_ns] for f in files}
        if not files or current == seen:
            continue
        found = unreadable_batches(spec, files, seen)
        if found:
            problems.extend(found)  # nothing is requested until every batch reads: no half loads
            continue
        if spec.name not in registered:
            new_datasets.append(spec.name)
        requests.append(
            RunRequest(
                run_key=f"{spec.name}:{fingerprint(files)}",
                partition_key=spec.name,
                tags={"kura/new_batches": ",".join(sorted(set(current) - set(seen)))[:200]},
            )
        )
        state[spec.name] = current
    return requests, new_datasets, problems, json.dumps(state, sort_keys=True)


@sensor(minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING, job_name="kura_pipeline")
def inbox_sensor(context: SensorEvaluationContext, registry: DatasetRegistry) -> SensorResult | SkipReason:
    """Watches every dataset's inbox: when batch files land (and read cleanly), registers the
    dataset if it is new and runs the pipeline for it. An unreadable or half-written file is
    reported here, by name, and nothing runs until it is fixed or removed."""
    registered = context.instance.get_dynamic_partitions(datasets_partitions.name)
    requests, new_datasets, problems, cursor = inbox_sensor_tick(
        registry, registered, context.cursor, SETTLE_SECONDS
    )
    for problem in problems:
        context.log.warning(problem)
    if not requests:
        context.update_cursor(cursor)
        return SkipReason("; ".join(problems) if problems else "no new batches")
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[datasets_partitions.build_add_request(new_datasets)]
        if new_datasets
        else [],
        cursor=cursor,
    )
