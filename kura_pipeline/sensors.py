"""Sensors: the registry's datasets become partitions without hand work."""

from __future__ import annotations

from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor

from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.registry import DatasetRegistry


def unregistered_datasets(registry: DatasetRegistry, registered: list[str]) -> list[str]:
    return sorted(set(registry.datasets()) - set(registered))


@sensor(minimum_interval_seconds=30, default_status=DefaultSensorStatus.RUNNING)
def dataset_registry_sensor(
    context: SensorEvaluationContext, registry: DatasetRegistry
) -> SensorResult | SkipReason:
    """Adds every dataset named in the registry as a partition of every asset."""
    new = unregistered_datasets(registry, context.instance.get_dynamic_partitions(datasets_partitions.name))
    if not new:
        return SkipReason("every dataset in the registry is already a partition")
    context.log.info(f"registering datasets: {', '.join(new)}")
    return SensorResult(dynamic_partitions_requests=[datasets_partitions.build_add_request(new)])
