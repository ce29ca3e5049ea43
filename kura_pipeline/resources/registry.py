"""The dataset registry as a Dagster resource, so assets and sensors read the same file."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from kura_pipeline.core.registry import DatasetSpec, RegistryError, read_registry_entries

DEFAULT_REGISTRY = str(Path(__file__).resolve().parents[1] / "datasets.yaml")


class DatasetRegistry(ConfigurableResource):
    """The YAML file that names each dataset, its loader and the loader's options."""

    path: str = DEFAULT_REGISTRY

    def datasets(self) -> dict[str, DatasetSpec]:
        """The good entries; a bad one is left out (see `problems`), so it blocks only itself."""
        return read_registry_entries(self.path)[0]

    def problems(self) -> dict[str, str]:
        """A one-line problem for each bad entry, by dataset name."""
        return read_registry_entries(self.path)[1]

    def get(self, name: str) -> DatasetSpec:
        datasets, problems = read_registry_entries(self.path)
        if name in problems:
            raise RegistryError(problems[name])
        if name not in datasets:
            raise RegistryError(
                f"dataset {name!r} is not in the registry {self.path} (known: {', '.join(sorted(datasets))})"
            )
        return datasets[name]
