"""The dataset registry: a YAML file the user edits, naming each dataset and how to load it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

# Partition keys show up in paths and URLs: keep them plain.
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# An extractor entry: a built-in name, or 'package.module:function' (imported when the stage runs).
EXTRACTOR_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?$")


class DatasetSpec(BaseModel):
    """A dataset: its loader and options, and optionally an inbox folder where batches land
    (each file one batch, read with the loader)."""

    name: str
    loader: str
    options: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    inbox: str | None = None
    # Extractors for this dataset, added to the stage's configured ones: checked for shape
    # here, imported only when extracted_properties runs (a registry read must stay cheap).
    extractors: list[str] = Field(default_factory=list)

    @field_validator("extractors")
    @classmethod
    def _references(cls, values: list[str]) -> list[str]:
        for value in values:
            if not EXTRACTOR_REFERENCE.match(value):
                raise ValueError(f"{value!r} is neither a built-in extractor nor 'package.module:function'")
        return values


class InboxRoot(BaseModel):
    """A folder whose every sub-folder is a dataset's inbox (a new sub-folder, a new dataset)."""

    path: str
    loader: str = "jsonl"
    options: dict[str, Any] = Field(default_factory=dict)


class RegistryError(ValueError):
    pass


def read_registry(path: str | Path) -> dict[str, DatasetSpec]:
    """Datasets by name. Relative `path` options are resolved against the registry's folder.
    A bad entry is left out (see `read_registry_entries` for why); a bad file raises."""
    return read_registry_entries(path)[0]


def read_registry_entries(path: str | Path) -> tuple[dict[str, DatasetSpec], dict[str, str]]:
    """The good datasets by name, and a one-line problem for each bad entry by name: one bad
    entry never hides the others. A file that cannot be read at all raises RegistryError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as error:
        raise RegistryError(f"dataset registry {path} does not exist") from error
    except yaml.YAMLError as error:
        raise RegistryError(f"dataset registry {path} is not valid YAML: {_yaml_problem(error)}") from None
    entries = raw.get("datasets") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise RegistryError(f"dataset registry {path} needs a top-level 'datasets:' mapping")
    datasets: dict[str, DatasetSpec] = {}
    problems: dict[str, str] = {}
    for name, entry in _discovered_inboxes(raw.get("inbox_root"), path).items():
        entries.setdefault(name, entry)
    for name, entry in entries.items():
        try:
            spec = _spec(str(name), entry, path)
        except RegistryError as error:
            problems[str(name)] = str(error)
        else:
            datasets[spec.name] = spec
    return datasets, problems


def _spec(name: str, entry: Any, path: Path) -> DatasetSpec:
    if not DATASET_NAME.match(name):
        raise RegistryError(
            f"{path}: dataset name {name!r} must start with a letter or digit and have at most 64 "
            "letters, digits, '_', '-', '.'"
        )
    if entry is not None and not isinstance(entry, dict):
        raise RegistryError(f"{path}: dataset {name!r} must be a mapping with a 'loader:' key")
    try:
        spec = DatasetSpec(name=name, **(entry or {}))
    except ValidationError as error:
        raise RegistryError(f"{path}: dataset {name!r} is malformed: {_validation_problem(error)}") from None
    except TypeError as error:
        raise RegistryError(f"{path}: dataset {name!r} is malformed: {error}") from None
    _check_options(spec, path)
    for key in ("path", "data_files"):
        value = spec.options.get(key)
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            spec.options[key] = str((path.parent / value).resolve())
    if spec.inbox is not None:
        spec.inbox = str((path.parent / spec.inbox).resolve())
    return spec


def _check_options(spec: DatasetSpec, path: Path) -> None:
    """An unknown loader, or an option key the loader does not take, named with what it takes."""
    from kura_pipeline.core.loaders import LOADERS

    if spec.loader not in LOADERS:
        raise RegistryError(
            f"{path}: dataset {spec.name!r}: unknown loader {spec.loader!r}; "
            f"known loaders: {', '.join(LOADERS)}"
        )
    parameters = inspect.signature(LOADERS[spec.loader]).parameters.values()
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        allowed = [p.name for p in named]
        unknown = [str(key) for key in spec.options if key not in allowed]
        if unknown:
            raise RegistryError(
                f"{path}: dataset {spec.name!r}: unknown option {', '.join(map(repr, unknown))} for "
                f"loader {spec.loader!r}; its options: {', '.join(allowed)}"
            )
    # A required option left out (`path`) is said here, not as a failed stage at run time; an
    # inbox dataset's files come from its inbox, one batch file at a time.
    supplied = {*spec.options, *(("path",) if spec.inbox is not None else ())}
    missing = [p.name for p in named if p.default is p.empty and p.name not in supplied]
    if missing:
        raise RegistryError(
            f"{path}: dataset {spec.name!r}: loader {spec.loader!r} needs the option "
            f"{', '.join(map(repr, missing))} (under `options:`)"
        )


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def _validation_problem(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, item['loc'])) or 'entry'}: {item['msg']}" for item in error.errors()
    )


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
