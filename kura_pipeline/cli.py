"""The terminal entry points: run a dataset end to end, register datasets, print the tree."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import polars as pl
from dagster import DagsterInstance
from upath import UPath

from kura_pipeline.core.frames import frame_to_clusters
from kura_pipeline.core.render.tree import fallback_note, render_tree
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline.resources.io_manager import stage_path
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


def register_datasets(instance: DagsterInstance) -> list[str]:
    """Add the registry's datasets as partitions; returns the ones that were new."""
    from kura_pipeline.definitions import defs

    registry = defs.resources["registry"]
    new = unregistered_datasets(registry, instance.get_dynamic_partitions(datasets_partitions.name))  # type: ignore[arg-type]
    if new:
        instance.add_dynamic_partitions(datasets_partitions.name, new)
    return new


def data_stage_path(asset: str, dataset: str) -> UPath:
    from kura_pipeline.definitions import defs

    return stage_path(defs.resources["io_manager"].base_path, asset, dataset)  # type: ignore[attr-defined]


@click.group()
def main() -> None:
    """kura_pipeline: from chatbot conversations to a browsable hierarchy of usage patterns."""


@main.command()
def register() -> None:
    """Register every dataset of the registry as a partition (before `dagster asset materialize`)."""
    new = register_datasets(cli_instance())
    click.echo(f"registered: {', '.join(new)}" if new else "every dataset is already registered")


@main.command()
@click.argument("datasets", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dataset of the registry, one after another.")
@click.option("--descriptions/--no-descriptions", default=False, help="Print cluster descriptions.")
def run(datasets: tuple[str, ...], every: bool, descriptions: bool) -> None:
    """Materialise every stage for DATASETS (default: demo) in this process, then print each tree."""
    try:
        from kura_pipeline.definitions import defs, kura_job
    except ValueError as error:  # a bad setting (SettingError): its one line, not a traceback
        click.echo(f"kura-pipeline: {error}", err=True)
        sys.exit(2)

    instance = cli_instance()
    register_datasets(instance)
    if every:
        datasets = tuple(sorted(defs.resources["registry"].datasets()))  # type: ignore[attr-defined]
    for dataset in datasets or ("demo",):
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
