"""Every asset is partitioned by dataset; the registry's datasets become its keys."""

from __future__ import annotations

from collections.abc import Iterable

from dagster import DagsterInstance, DynamicPartitionsDefinition

datasets_partitions = DynamicPartitionsDefinition(name="datasets")


def missing_partitions(instance: DagsterInstance, datasets: Iterable[str]) -> list[str]:
    """The `datasets` that are not yet partitions of `datasets_partitions` on `instance`, sorted."""
    return sorted(set(datasets) - set(instance.get_dynamic_partitions(datasets_partitions.name)))


def add_missing_partitions(instance: DagsterInstance, datasets: Iterable[str]) -> list[str]:
    """Add the `datasets` that are not yet partitions of `datasets_partitions` to `instance`;
    returns the ones that were new, sorted. (The registry sensor asks for the same ones with a
    dynamic partitions request instead of writing to the instance: `missing_partitions`.)"""
    new = missing_partitions(instance, datasets)
    if new:
        instance.add_dynamic_partitions(datasets_partitions.name, new)
    return new
