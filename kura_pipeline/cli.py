"""The terminal entry points: run a dataset end to end, register and list datasets, print the
tree, open or serve the explorer page, export the tables (Parquet, CSV, a Kura checkpoint)."""

from __future__ import annotations

import errno
import http.server
import json
import os
import shutil
import sys
import time
import warnings
import webbrowser
from collections.abc import Iterable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

import click
import polars as pl
from dagster import DagsterInstance
from upath import UPath

from kura_pipeline.core.frames import frame_to_clusters
from kura_pipeline.core.kura_format import write_kura_checkpoint
from kura_pipeline.core.registry import DatasetSpec, RegistryError, read_registry_entries
from kura_pipeline.core.render.tree import fallback_note, render_tree
from kura_pipeline.instance import open_instance
from kura_pipeline.partitions import add_missing_partitions, datasets_partitions
from kura_pipeline.resources.registry import DatasetRegistry
from kura_pipeline.resources.storage import page_path, stage_path, table_rows
from kura_pipeline.run_health import fail_abandoned_runs, failed_steps, in_process_run_tags, interrupted_step

DEFAULT_DAGSTER_HOME = ".dagster_home"


def cli_instance() -> DagsterInstance:
    """The persistent instance `dagster dev` also uses: DAGSTER_HOME, or ./.dagster_home."""
    if not os.getenv("DAGSTER_HOME"):
        home = Path(DEFAULT_DAGSTER_HOME).resolve()
        home.mkdir(parents=True, exist_ok=True)
        config = home / "dagster.yaml"
        if not config.exists():  # Dagster's defaults, stored in this folder, and a daemon (the
            # one `dagster dev` starts) that fails runs whose worker died
            config.write_text("run_monitoring:\n  enabled: true\n", encoding="utf-8")
        os.environ["DAGSTER_HOME"] = str(home)
    return _open_or_fail()


def _open_or_fail() -> DagsterInstance:
    try:
        return open_instance()
    except Exception as error:  # a bad DAGSTER_HOME or dagster.yaml: Dagster's reason, one line
        _fail(f"cannot open the Dagster instance at {os.environ['DAGSTER_HOME']}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _check_places(data_dir: str | None) -> None:
    """DAGSTER_HOME and the data folder, before anything opens them: a relative DAGSTER_HOME is
    made absolute (Dagster refuses one), and a path that is a file, or an object-store URL whose
    filesystem package is not installed, is one line and exit 2 instead of a traceback at the
    first read or write."""
    if home := os.getenv("DAGSTER_HOME"):
        if Path(home).is_file():
            _fail(f"DAGSTER_HOME={home} is a file, not a folder")
        os.environ["DAGSTER_HOME"] = str(Path(home).resolve())
    if data_dir is None:
        return
    if "://" in data_dir:
        import fsspec

        try:
            fsspec.get_filesystem_class(data_dir.split("://", 1)[0])
        except (ImportError, ValueError) as error:
            _fail(f"the data folder {data_dir}: {_first_line(error)}")
    elif Path(data_dir).is_file():
        _fail(f"the data folder {data_dir} is a file, not a folder")


def _definitions() -> Any:
    """kura_pipeline.definitions, or one line and exit 2 for a bad setting (SettingError)."""
    try:
        with warnings.catch_warnings():
            # The definitions register the registry's datasets in the instance as they load, and
            # warn when it cannot be opened; a command that needs it says why in one line.
            warnings.filterwarnings("ignore", message="could not register the registry's datasets")
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
    return add_missing_partitions(instance, _registry().datasets())


def _data_dir() -> str:
    return _definitions().defs.resources["io_manager"].base_path


def data_stage_path(asset: str, dataset: str) -> UPath:
    return stage_path(_data_dir(), asset, dataset)


class OneLineErrors(click.Group):
    """Click's own usage errors (a bad option value, an unknown option or command) as one line
    and exit 2 too, like every other user error, instead of a usage block."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as error:
            _fail(_usage_problem(error))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            _fail(_usage_problem(error))


def _usage_problem(error: click.UsageError) -> str:
    command = error.ctx.info_name if error.ctx is not None and error.ctx.parent is not None else None
    return f"{command}: {error.format_message()}" if command else error.format_message()


@click.group(cls=OneLineErrors)
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
    _check_places(os.getenv("KURA_DATA_DIR"))


@main.command()
def register() -> None:
    """Register every dataset of the registry as a partition (before `dagster asset materialize`)."""
    _registry_entries()
    instance = cli_instance()
    # Loading the definitions already registers them on a persistent instance (see
    # definitions.register_registry_datasets): those count as registered by this command too.
    new = sorted({*_definitions().registered_on_load, *register_datasets(instance)})
    click.echo(f"registered: {', '.join(new)}" if new else "every dataset is already registered")


@main.command(name="list")
def list_datasets() -> None:
    """One line per registry dataset: registered as a partition or not, and how many
    conversations and clusters its stage files hold where they exist."""
    datasets, problems = _registry_entries()
    instance = cli_instance()
    _report_abandoned(instance)
    registered = set(instance.get_dynamic_partitions(datasets_partitions.name))
    if not datasets:
        click.echo(f"no datasets in the registry {_registry().path}")
    for name in sorted(datasets):
        parts = ["registered" if name in registered else "not registered (run `kura-pipeline register`)"]
        for asset, noun in (("raw_conversations", "conversations"), ("meta_clusters", "clusters")):
            rows = table_rows(data_stage_path(asset, name))
            if rows is not None:
                parts.append(f"{rows} {noun}")
        if last := _last_run(instance, name):
            parts.append(last)
        click.echo(f"{name}: {', '.join(parts)}")


def _latest_run(instance: DagsterInstance, dataset: str) -> Any:
    """The record of the dataset's latest run of any job, or None."""
    from dagster import RunsFilter

    runs = instance.get_run_records(filters=RunsFilter(tags={"dagster/partition": dataset}), limit=1)
    return runs[0] if runs else None


def _last_run(instance: DagsterInstance, dataset: str) -> str | None:
    """ "last run <status> <when>" for the dataset's latest run of any job, or None."""
    record = _latest_run(instance, dataset)
    if record is None:
        return None
    when = record.end_time or record.start_time
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if when else "not started"
    return f"last run {record.dagster_run.status.value.lower()} {stamp}"


def _report_abandoned(instance: DagsterInstance) -> None:
    """Runs of this host whose process died (a `kill -9`) are failed now, each said in a line."""
    for run_id in fail_abandoned_runs(instance):
        click.echo(
            f"kura-pipeline: run {run_id[:8]} was left unfinished by a process that ended; marked failed",
            err=True,
        )


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
    _report_abandoned(instance)
    register_datasets(instance)
    failed: list[str] = []
    for dataset in datasets:
        started = time.monotonic()
        result = defs.resolve_job_def(kura_job.name).execute_in_process(
            instance=instance,
            partition_key=dataset,
            raise_on_error=False,
            tags=in_process_run_tags(),  # so a later run can tell when this process died mid-run
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        )
        elapsed = time.monotonic() - started
        if stage := interrupted_step(result):
            click.echo(
                f"{dataset!r}: interrupted during {stage}; the stages it finished are kept, and "
                f"`kura-pipeline run {dataset}` goes on from there",
                err=True,
            )
            sys.exit(130)
        if not result.success:
            # One dataset's failure is its own: say it, and go on with the others.
            for line in failed_steps(result):
                click.echo(f"{dataset!r}: {line}", err=True)
            failed.append(dataset)
            continue
        _print_tree(dataset, descriptions, depth=None)
        materialized = {
            event.step_key: {
                key: entry.value
                for key, entry in event.step_materialization_data.materialization.metadata.items()
            }
            for event in result.all_events
            if event.is_step_materialization
        }
        click.echo(
            f"\nEvery stage of {dataset!r} done in {elapsed:.0f} s; Parquet under "
            f"{data_stage_path('raw_conversations', dataset).parent.parent}"
        )
        if note := input_note(materialized.get("raw_conversations", {})):
            click.echo(note)
        click.echo(format_llm_totals(llm_totals(materialized.values())))
        click.echo(f"Explorer: {explorer_path(dataset)} (open it: kura-pipeline open {dataset})\n")
    if failed:
        which = (
            f"{failed[0]!r} failed"
            if len(datasets) == 1
            else f"{len(failed)} of {len(datasets)} datasets failed: {', '.join(failed)}"
        )
        click.echo(f"{which} (the lines above say why)", err=True)
        sys.exit(1)


def input_note(metadata: Mapping[str, Any]) -> str | None:
    """What the run did not take as it was given: records skipped, characters replaced (from the
    raw_conversations stage's metadata), so the last lines never say "done" over lost input."""
    parts = []
    if skipped := metadata.get("skipped_records"):
        parts.append(f"{skipped} record{'' if skipped == 1 else 's'} skipped")
    if replaced := metadata.get("replaced_characters"):
        parts.append(f"{replaced} unreadable character{'' if replaced == 1 else 's'} replaced")
    if not parts:
        return None
    return f"Input: {' and '.join(parts)} (each listed in raw_conversations' metadata: `dagster dev`)"


@main.command()
@click.argument("dataset", default="demo")
@click.option("--descriptions/--no-descriptions", default=False, help="Print cluster descriptions.")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="Levels to show from the top.")
def tree(dataset: str, descriptions: bool, depth: int | None) -> None:
    """Print DATASET's cluster tree (like Kura's visualise_clusters)."""
    _known(dataset, *_registry_entries((dataset,)))
    _warn_if_last_run_failed(dataset)
    _print_tree(dataset, descriptions, depth)


def _warn_if_last_run_failed(dataset: str) -> None:
    """What `tree`, `open`, `serve` and `export` show is what the last successful run left: when
    a later run failed (or was interrupted), say so, once, on stderr."""
    if not os.getenv("DAGSTER_HOME") and not Path(DEFAULT_DAGSTER_HOME).is_dir():
        return  # no instance yet: no run to speak of
    from dagster import DagsterRunStatus

    with cli_instance() as instance:
        record = _latest_run(instance, dataset)
    status = record.dagster_run.status if record is not None else None
    if status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        click.echo(
            f"note: the last run of {dataset!r} did not finish ({status.value.lower()}); "
            "this is what the run before it left",
            err=True,
        )


def _print_tree(dataset: str, descriptions: bool, depth: int | None) -> None:
    path = data_stage_path("meta_clusters", dataset)
    if not path.exists():
        _fail(f"no clusters for {dataset!r} at {path}: run `kura-pipeline run {dataset}` first")
    with path.open("rb") as file:
        clusters = frame_to_clusters(pl.read_parquet(file))
    click.echo(render_tree(clusters, descriptions=descriptions, max_depth=depth))
    if note := fallback_note(clusters):
        click.echo(note, err=True)


# --- LLM totals ----------------------------------------------------------------------------------

# The stages' accounting keys (LLMStats.as_metadata, plus llm_cost_usd where prices are set).
LLM_COUNTS = (
    "llm_calls",
    "llm_cache_hits",
    "llm_retries",
    "llm_failures",
    "llm_input_tokens",
    "llm_output_tokens",
)


def llm_totals(materializations: Iterable[Mapping[str, Any]]) -> dict[str, float] | None:
    """The LLM accounting summed over the stages' materialisation metadata, or None when no
    stage reported any (the offline backend). Each stage builds its own clients, so the
    stages' numbers add up without counting a call twice."""
    totals: dict[str, float] = {}
    for metadata in materializations:
        for key in (*LLM_COUNTS, "llm_cost_usd"):
            value = metadata.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + value
    return totals or None


def format_llm_totals(totals: Mapping[str, float] | None) -> str:
    if totals is None:
        return "LLM: not used (offline backend)"
    count = {key: int(totals.get(key, 0)) for key in LLM_COUNTS}
    parts = [
        f"{count['llm_calls']:,} calls",
        f"{count['llm_cache_hits']:,} cache hits",
        f"{count['llm_input_tokens']:,} input + {count['llm_output_tokens']:,} output tokens",
    ]
    if count["llm_failures"]:
        parts.append(f"{count['llm_failures']:,} failed")
    if "llm_cost_usd" in totals:
        parts.append(f"${totals['llm_cost_usd']:.4f}")
    else:
        parts.append("cost not priced (set KURA_LLM_INPUT_PRICE / KURA_LLM_OUTPUT_PRICE)")
    return "LLM: " + ", ".join(parts)


# --- The explorer page ---------------------------------------------------------------------------


def explorer_path(dataset: str) -> UPath:
    """Where the explorer asset's page for `dataset` is (the storage layout's)."""
    return page_path(_data_dir(), dataset)


def _existing_page(dataset: str) -> UPath:
    _known(dataset, *_registry_entries((dataset,)))
    page = explorer_path(dataset)
    if not page.exists():
        _fail(f"no explorer page for {dataset!r} at {page}: run `kura-pipeline run {dataset}` first")
    _warn_if_last_run_failed(dataset)
    return page


@main.command(name="open")
@click.argument("dataset", default="demo")
@click.option("--browser/--no-browser", default=True, help="Open the page in the web browser.")
def open_page(dataset: str, browser: bool) -> None:
    """Print DATASET's explorer page path and open it in the web browser."""
    page = _existing_page(dataset)
    click.echo(str(page))
    if not browser:
        return
    if page.protocol not in ("", "file", "local"):
        _fail(f"{page} is not on this machine: use `kura-pipeline serve {dataset}` to browse it")
    if not webbrowser.open(Path(page.path).resolve().as_uri()):
        click.echo("kura-pipeline: no web browser found; open the file above yourself", err=True)


@main.command()
@click.argument("dataset", default="demo")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port."
)
def serve(dataset: str, port: int) -> None:
    """Serve DATASET's explorer page on http://127.0.0.1:PORT/ (this machine only; Ctrl-C stops)."""
    page = _existing_page(dataset)

    class PageHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path.split("?")[0] not in ("/", "/index.html"):
                self.send_error(404, "only the explorer page is served here: /")
                return
            body = page.read_bytes()  # read per request: a new run's page shows on reload
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # one line per request would bury the address

    try:
        # 127.0.0.1 only: the page holds the dataset's summaries; never the whole network.
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), PageHandler)
    except OSError as error:
        reason = "it is in use" if error.errno == errno.EADDRINUSE else error.strerror
        _fail(f"cannot serve on 127.0.0.1:{port}: {reason} (choose another with --port)")
    host, bound = server.server_address[:2]
    click.echo(f"Serving {page} at http://{host}:{bound}/ (Ctrl-C stops)", nl=True)
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped")
    finally:
        server.server_close()


# --- Export --------------------------------------------------------------------------------------

# The stages a Kura checkpoint is made of.
KURA_STAGES = ("raw_conversations", "conversation_summaries", "meta_clusters", "projections")


def _table_stages() -> list[str]:
    """Every asset stored as a Parquet table, in pipeline order (the explorer is a page)."""
    from kura_pipeline.assets import ALL_ASSETS

    return [
        key.to_user_string()
        for asset in ALL_ASSETS
        for key in asset.keys
        if key.to_user_string() != "explorer"
    ]


def _read(path: UPath) -> pl.DataFrame:
    with path.open("rb") as file:
        return pl.read_parquet(file)


def csv_ready(frame: pl.DataFrame) -> pl.DataFrame:
    """CSV has no lists or structs: each nested column becomes JSON text."""
    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    return frame.with_columns(
        pl.Series(
            name,
            [
                None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                for v in frame[name].to_list()
            ],
            dtype=pl.String,
        )
        for name in nested
    )


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _fail(f"--out {folder}: cannot make the folder ({error.strerror or error})")


@main.command()
@click.argument("dataset", default="demo")
@click.option(
    "--format",
    "kind",
    type=click.Choice(["parquet", "csv", "kura"]),
    default="parquet",
    show_default=True,
    help="kura: a Kura 0.5 checkpoint folder its UI and models load.",
)
@click.option("--out", type=click.Path(), required=True, help="The folder to write to.")
def export(dataset: str, kind: str, out: str) -> None:
    """Write DATASET's tables to the folder OUT: Parquet or CSV files (one per stage), or a Kura
    checkpoint (conversations, summaries, clusters, meta_clusters, dimensionality)."""
    _known(dataset, *_registry_entries((dataset,)))
    folder = Path(out).resolve()
    if folder.exists() and not folder.is_dir():
        _fail(f"--out {folder} is a file, not a folder")
    _warn_if_last_run_failed(dataset)
    paths = {stage: data_stage_path(stage, dataset) for stage in _table_stages()}
    if kind == "kura":
        missing = [stage for stage in KURA_STAGES if not paths[stage].exists()]
        if missing:
            _fail(f"no {', '.join(missing)} for {dataset!r} yet: run `kura-pipeline run {dataset}` first")
        _make_folder(folder)
        counts = write_kura_checkpoint(folder, *(_read(paths[stage]) for stage in KURA_STAGES))
        for name, count in counts.items():
            click.echo(f"{folder / name}: {count} records")
        click.echo(
            f"a Kura checkpoint of {dataset!r}: Kura's UI (`kura`, then Load Checkpoint) takes "
            "conversations.jsonl, summaries.jsonl and dimensionality.jsonl"
        )
        return
    present = {stage: path for stage, path in paths.items() if path.exists()}
    if not present:
        _fail(f"nothing to export for {dataset!r}: run `kura-pipeline run {dataset}` first")
    _make_folder(folder)
    for stage, path in present.items():
        target = folder / f"{stage}.{kind}"
        if kind == "parquet":
            with path.open("rb") as source, target.open("wb") as copy:
                shutil.copyfileobj(source, copy)  # the stored table as it is
            rows = table_rows(path)
        else:
            frame = _read(path)
            csv_ready(frame).write_csv(target)
            rows = frame.height
        click.echo(f"{target}: {rows} rows")
