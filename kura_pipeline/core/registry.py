"""The dataset registry: a YAML file the user edits, naming each dataset and how to load it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

# Partition keys show up in paths and URLs: keep them plain.
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class DatasetSpec(BaseModel):
    """A dataset: its loader and options, and optionally an inbox folder where batches land
    (each file one batch, read with the loader)."""

    name: str
    loader: str
    options: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    inbox: str | None = None


class InboxRoot(BaseModel):
    """A folder whose every sub-folder is a dataset's inbox (a new sub-folder, a new dataset)."""

    path: str
    loader: str = "jsonl"
    options: dict[str, Any] = Field(default_factory=dict)


class RegistryError(ValueError):
    pass


def read_registry(path: str | Path) -> dict[str, DatasetSpec]:
    """Datasets by name. Relative `path` options are resolved against the registry's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as error:
        raise RegistryError(f"dataset registry {path} does not exist") from error
    except yaml.YAMLError as error:
        raise RegistryError(f"dataset registry {path} is not valid YAML: {error}") from error
    entries = raw.get("datasets") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise RegistryError(f"dataset registry {path} needs a top-level 'datasets:' mapping")
    datasets = {}
    for name, entry in _discovered_inboxes(raw.get("inbox_root"), path).items():
        entries.setdefault(name, entry)
    for name, entry in entries.items():
        if not DATASET_NAME.match(str(name)):
            raise RegistryError(f"{path}: dataset name {name!r} must be letters, digits, '_', '-', '.'")
        try:
            spec = DatasetSpec(name=str(name), **(entry or {}))
        except (ValidationError, TypeError) as error:
            raise RegistryError(f"{path}: dataset {name!r} is malformed: {error}") from error
        for key in ("path", "data_files"):
            value = spec.options.get(key)
            if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
                spec.options[key] = str((path.parent / value).resolve())
        if spec.inbox is not None:
            spec.inbox = str((path.parent / spec.inbox).resolve())
        datasets[spec.name] = spec
    return datasets


def _discovered_inboxes(root_entry: Any, registry_path: Path) -> dict[str, dict[str, Any]]:
    if root_entry is None:
        return {}
    try:
        root = InboxRoot(**root_entry) if isinstance(root_entry, dict) else InboxRoot(path=str(root_entry))
    except (ValidationError, TypeError) as error:
        raise RegistryError(f"{registry_path}: inbox_root is malformed: {error}") from error
    folder = (registry_path.parent / root.path).resolve()
    if not folder.is_dir():
        return {}
    return {
        sub.name: {"loader": root.loader, "options": dict(root.options), "inbox": str(sub)}
        for sub in sorted(folder.iterdir())
        if sub.is_dir() and DATASET_NAME.match(sub.name)
    }
