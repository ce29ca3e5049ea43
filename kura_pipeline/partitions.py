"""Every asset is partitioned by dataset; the registry's datasets become its keys."""

from dagster import DynamicPartitionsDefinition

datasets_partitions = DynamicPartitionsDefinition(name="datasets")
