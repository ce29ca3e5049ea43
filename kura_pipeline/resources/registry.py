"""The dataset registry as a Dagster resource, so assets and sensors read the same file."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from kura_pipeline.core.registry import DatasetSpec, RegistryError, read_registry

DEFAULT_REGISTRY = str(Path(__file__).resolve().parents[1] / "datasets.yaml")


class DatasetRegistry(ConfigurableResource):
    """The YAML file that names each dataset, its loader and the loader's options."""

    path: str = DEFAULT_REGISTRY

    def datasets(self) -> dict[str, DatasetSpec]:
        return read_registry(self.path)

    def get(self, name: str) -> DatasetSpec:
        datasets = self.datasets()
        if name not in datasets:
            raise RegistryError(
                f"dataset {name!r} is not in the registry {self.path} (known: {', '.join(sorted(datasets))})"
            )
        return datasets[name]
