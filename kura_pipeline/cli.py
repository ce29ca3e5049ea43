"""The terminal entry points: run a dataset end to end, register datasets, print the tree."""

from __future__ import annotations

import os
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

import click
import polars as pl
import pyarrow.parquet as pq
from dagster import DagsterInstance
from upath import UPath

from kura_pipeline.core.frames import frame_to_clusters
from kura_pipeline.core.registry import DatasetSpec, RegistryError, read_registry_entries
from kura_pipeline.core.render.tree import fallback_note, render_tree
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.io_manager import stage_path
from kura_pipeline.resources.registry import DatasetRegistry
from kura_pipeline.sensors import unregistered_datasets

DEFAULT_DAGSTER_HOME = ".dagster_home"


def cli_instance() -> DagsterInstance:
    """The persistent instance `dagster dev` also uses: DAGSTER_HOME, or ./.dagster_home."""
    if not os.getenv("DAGSTER_HOME"):
        home = Path(DEFAULT_DAGSTER_HOME).resolve()
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").touch()  # an empty one: Dagster's defaults, stored in this folder
        os.environ["DAGSTER_HOME"] = str(home)
    return DagsterInstance.get()


def _definitions() -> Any:
    """kura_pipeline.definitions, or one line and exit 2 for a bad setting (SettingError)."""
    try:
        from kura_pipeline import definitions
    except ValueError as error:  # a bad setting (SettingError): its one line, not a traceback
        _fail(str(error))
    return definitions


def _fail(message: str) -> NoReturn:
    """A user error: one line on stderr, exit code 2."""
    click.echo(f"kura-pipeline: {' '.join(message.split())}", err=True)
    sys.exit(2)


def _registry() -> DatasetRegistry:
    return _definitions().defs.resources["registry"]


def _registry_entries(wanted: tuple[str, ...] = ()) -> tuple[dict[str, DatasetSpec], dict[str, str]]:
    """The registry's good datasets, warning (one line each) about the bad entries it skips
    (except those `wanted`: using one is an error of its own); a registry that cannot be read at
    all is a user error."""
    try:
        datasets, problems = read_registry_entries(_registry().path)
    except RegistryError as error:
        _fail(str(error))
    for name, problem in problems.items():
        if name not in wanted:
            click.echo(f"kura-pipeline: warning: skipped: {' '.join(problem.split())}", err=True)
    return datasets, problems


def _known(dataset: str, datasets: dict[str, DatasetSpec], problems: dict[str, str]) -> None:
    """Exit 2 with one line unless `dataset` is a good entry of the registry."""
    if dataset in problems:
        _fail(f"dataset {dataset!r} cannot be used: {problems[dataset]}")
    if dataset not in datasets:
        known = ", ".join(sorted(datasets)) or "none"
        where = _registry().path
        _fail(f"unknown dataset {dataset!r}: it is not in the registry {where} (known datasets: {known})")


def register_datasets(instance: DagsterInstance) -> list[str]:
    """Add the registry's datasets as partitions; returns the ones that were new."""
    registry = _registry()
    new = unregistered_datasets(registry, instance.get_dynamic_partitions(datasets_partitions.name))
    if new:
        instance.add_dynamic_partitions(datasets_partitions.name, new)
    return new


def data_stage_path(asset: str, dataset: str) -> UPath:
    return stage_path(_definitions().defs.resources["io_manager"].base_path, asset, dataset)


@click.group()
@click.version_option(version("kura_pipeline"), "--version", prog_name="kura-pipeline")
@click.option(
    "--registry",
    type=click.Path(dir_okay=False),
    default=None,
    help="The dataset registry YAML (sets KURA_DATASETS).",
)
@click.option(
    "--data-dir",
    default=None,
    help="Where the Parquet goes: a folder or an fsspec URL (sets KURA_DATA_DIR).",
)
def main(registry: str | None, data_dir: str | None) -> None:
    """kura_pipeline: from chatbot conversations to a browsable hierarchy of usage patterns."""
    # Read when kura_pipeline.definitions is imported, which every command does after this.
    if registry is not None:
        os.environ["KURA_DATASETS"] = str(Path(registry).resolve())
    if data_dir is not None:
        os.environ["KURA_DATA_DIR"] = data_dir if "://" in data_dir else str(Path(data_dir).resolve())


@main.command()
def register() -> None:
    """Register every dataset of the registry as a partition (before `dagster asset materialize`)."""
    _registry_entries()
    new = register_datasets(cli_instance())
    click.echo(f"registered: {', '.join(new)}" if new else "every dataset is already registered")


@main.command(name="list")
def list_datasets() -> None:
    """One line per registry dataset: registered as a partition or not, and how many
    conversations and clusters its stage files hold where they exist."""
    datasets, problems = _registry_entries()
    registered = set(cli_instance().get_dynamic_partitions(datasets_partitions.name))
    if not datasets:
        click.echo(f"no datasets in the registry {_registry().path}")
    for name in sorted(datasets):
        parts = ["registered" if name in registered else "not registered (run `kura-pipeline register`)"]
        for asset, noun in (("raw_conversations", "conversations"), ("meta_clusters", "clusters")):
            rows = _rows(data_stage_path(asset, name))
            if rows is not None:
                parts.append(f"{rows} {noun}")
        click.echo(f"{name}: {', '.join(parts)}")


def _rows(path: UPath) -> int | None:
    """The row count of a stage's Parquet file (from its footer), or None if there is none yet."""
    if not path.exists():
        return None
    with path.open("rb") as file:
        return pq.ParquetFile(file).metadata.num_rows


@main.command()
@click.argument("datasets", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dataset of the registry, one after another.")
@click.option("--descriptions/--no-descriptions", default=False, help="Print cluster descriptions.")
def run(datasets: tuple[str, ...], every: bool, descriptions: bool) -> None:
    """Materialise every stage for DATASETS (default: demo) in this process, then print each tree."""
    definitions = _definitions()
    defs, kura_job = definitions.defs, definitions.kura_job
    datasets = datasets or (() if every else ("demo",))
    known, problems = _registry_entries(datasets)
    if every:
        datasets = tuple(sorted(known))
    for dataset in datasets:
        _known(dataset, known, problems)

    instance = cli_instance()
    register_datasets(instance)
    for dataset in datasets:
        started = time.monotonic()
        result = defs.resolve_job_def(kura_job.name).execute_in_process(
            instance=instance,
            partition_key=dataset,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        )
        elapsed = time.monotonic() - started
        if not result.success:
            for event in result.all_events:
                if event.is_step_failure and event.step_failure_data:
                    click.echo(f"{event.step_key} failed: {_reason(event.step_failure_data.error)}", err=True)
            sys.exit(1)
        _print_tree(dataset, descriptions, depth=None)
        click.echo(
            f"\nEvery stage of {dataset!r} done in {elapsed:.0f} s; Parquet under "
            f"{data_stage_path('raw_conversations', dataset).parent.parent}\n"
        )


def _reason(error: Any) -> str:
    """What went wrong in a step, in its own words: Dagster wraps the stage's exception in
    "Error occurred while executing op ...", so the innermost cause, without its class path."""
    while error.cause is not None:
        error = error.cause
    kind, _, message = error.message.strip().partition(": ")
    return message if message and kind.endswith(error.cls_name or "\0") else error.message.strip()


@main.command()
@click.argument("dataset", default="demo")
@click.option("--descriptions/--no-descriptions", default=False, help="Print cluster descriptions.")
@click.option("--depth", type=int, default=None, help="Levels to show from the top.")
def tree(dataset: str, descriptions: bool, depth: int | None) -> None:
    """Print DATASET's cluster tree (like Kura's visualise_clusters)."""
    _known(dataset, *_registry_entries((dataset,)))
    _print_tree(dataset, descriptions, depth)


def _print_tree(dataset: str, descriptions: bool, depth: int | None) -> None:
    path = data_stage_path("meta_clusters", dataset)
    if not path.exists():
        raise click.ClickException(
            f"no clusters for {dataset!r} at {path}: run `kura-pipeline run {dataset}` first"
        )
    with path.open("rb") as file:
        clusters = frame_to_clusters(pl.read_parquet(file))
    click.echo(render_tree(clusters, descriptions=descriptions, max_depth=depth))
    if note := fallback_note(clusters):
        click.echo(note, err=True)
