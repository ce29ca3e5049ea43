"""The `kura-pipeline` CLI answers (issue #14, item 4): every user error is one line and exit
code 2, never a traceback; one bad registry entry blocks only itself. The real CLI, in a subprocess."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance

from kura_pipeline.cli import format_llm_totals, llm_totals
from kura_pipeline.core.frames import conversations_to_frame
from kura_pipeline.core.models import Conversation
from kura_pipeline.partitions import datasets_partitions
from kura_pipeline_tests.support.llm_fixtures import KURA_PIPELINE, cli_env, loopback_env
from kura_pipeline_tests.support.llm_fixtures import kura_pipeline as kura
from kura_pipeline_tests.support.loopback import LoopbackServer


def registry(folder: Path, text: str) -> None:
    (folder / "datasets.yaml").write_text(text, encoding="utf-8")


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit code 2, one line in all (stderr), holding every word, and no traceback."""
    output = result.stderr + result.stdout
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = output.strip().splitlines()
    assert len(lines) == 1, output[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    result = kura(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kura-pipeline, version {version('kura_pipeline')}"


@pytest.mark.parametrize("command", ["run", "tree"])
def test_an_unknown_dataset_is_one_line_listing_the_known_ones(dataset_dir: Path, command: str) -> None:
    line = one_line_error(kura(dataset_dir, command, "nope"), "unknown dataset 'nope'", "topics")
    assert line.startswith("kura-pipeline: ")


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    registry(tmp_path, "datasets:\n  demo:\n    loader: jsonl\n   options: {path: x.jsonl}\n")
    one_line_error(kura(tmp_path, "register"), str(tmp_path / "datasets.yaml"), "not valid YAML", "line 4")


def test_a_misspelt_option_names_the_unknown_key_and_the_allowed_ones(tmp_path: Path) -> None:
    registry(tmp_path, "datasets:\n  chats:\n    loader: claude\n    options: {paht: c.json}\n")
    one_line_error(kura(tmp_path, "run", "chats"), "'chats'", "unknown option 'paht'", "options: path")


def test_a_missing_required_option_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    # Before: `list` showed it registered, and `run` failed the raw_conversations stage after
    # some 90 lines of stack traces.
    registry(tmp_path, "datasets:\n  chats:\n    loader: jsonl\n")
    one_line_error(kura(tmp_path, "run", "chats"), "'chats'", "loader 'jsonl' needs the option 'path'")


def test_a_bad_dataset_name_is_one_line(tmp_path: Path) -> None:
    registry(tmp_path, json.dumps({"datasets": {"my chats!": {"loader": "jsonl", "options": {"path": "x"}}}}))
    one_line_error(kura(tmp_path, "run", "my chats!"), "'my chats!'", "letters, digits")


def test_a_bad_entry_warns_in_one_line_and_the_others_still_register(dataset_dir: Path) -> None:
    text = (dataset_dir / "datasets.yaml").read_text(encoding="utf-8")
    entries = json.loads(text)
    entries["datasets"]["typo"] = {"loader": "jsonl", "options": {"paht": "topics.jsonl"}}
    entries["datasets"]["bad name!"] = {"loader": "jsonl", "options": {"path": "topics.jsonl"}}
    registry(dataset_dir, json.dumps(entries))
    result = kura(dataset_dir, "register")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "registered: topics"
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert all(line.startswith("kura-pipeline: warning: ") for line in warnings)
    assert "'typo'" in warnings[0] and "'paht'" in warnings[0]
    assert "'bad name!'" in warnings[1]

    listed = kura(dataset_dir, "list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert listed.stdout.strip().splitlines() == ["topics: registered"]


@pytest.mark.slow
def test_run_other_works_beside_a_bad_entry_and_list_counts_its_stages(dataset_dir: Path) -> None:
    entries = json.loads((dataset_dir / "datasets.yaml").read_text(encoding="utf-8"))
    entries["datasets"]["typo"] = {"loader": "jsonl", "options": {"paht": "topics.jsonl"}}
    registry(dataset_dir, json.dumps(entries))
    result = kura(dataset_dir, "run", "topics", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Every stage of 'topics' done" in result.stdout
    assert "LLM: not used (offline backend)" in result.stdout.splitlines()
    page = dataset_dir / "data" / "explorer" / "topics.html"
    assert f"Explorer: {page} (open it: kura-pipeline open topics)" in result.stdout.splitlines()
    warnings = [line for line in result.stderr.splitlines() if line.startswith("kura-pipeline: warning:")]
    assert len(warnings) == 1 and "'typo'" in warnings[0], result.stderr[-3000:]

    listed = kura(dataset_dir, "list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    [line] = listed.stdout.strip().splitlines()
    assert line.startswith("topics: registered, ") and " conversations, " in line, line
    assert re.search(r" clusters, last run success \d{4}-\d\d-\d\d \d\d:\d\d$", line), line


def test_registry_and_data_dir_options_point_the_cli_elsewhere(dataset_dir: Path) -> None:
    (dataset_dir / "datasets.yaml").rename(dataset_dir / "elsewhere.yaml")  # KURA_DATASETS: no file
    stage = dataset_dir / "other-data" / "raw_conversations" / "topics.parquet"
    stage.parent.mkdir(parents=True)
    pl.DataFrame({"chat_id": ["a", "b", "c"]}).write_parquet(stage)
    options = ["--registry", "elsewhere.yaml", "--data-dir", "other-data"]
    listed = kura(dataset_dir, *options, "list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    # Loading the definitions registered the dataset named by --registry (the fresh-instance fix).
    assert listed.stdout.strip().splitlines() == ["topics: registered, 3 conversations"]
    one_line_error(kura(dataset_dir, *options, "tree", "nope"), str(dataset_dir / "elsewhere.yaml"), "topics")


# --- open / serve ------------------------------------------------------------------------------

PAGE = "<!doctype html><title>topics</title><p>the explorer of topics</p>"


def explorer_page(folder: Path, dataset: str = "topics") -> Path:
    page = folder / "data" / "explorer" / f"{dataset}.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(PAGE, encoding="utf-8")
    return page


def test_open_prints_the_page_path_and_hands_its_url_to_the_browser(dataset_dir: Path) -> None:
    page = explorer_page(dataset_dir)
    opened = dataset_dir / "opened.txt"
    browser = dataset_dir / "browser.sh"  # webbrowser runs $BROWSER with the URL
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n', encoding="utf-8")
    browser.chmod(0o755)
    result = kura(dataset_dir, "open", "topics", BROWSER=str(browser))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(page)
    assert opened.read_text(encoding="utf-8").strip() == page.as_uri()

    opened.unlink()
    quiet = kura(dataset_dir, "open", "topics", "--no-browser", BROWSER=str(browser))
    assert quiet.returncode == 0 and quiet.stdout.strip() == str(page), quiet.stderr[-3000:]
    assert not opened.exists()


@pytest.mark.parametrize("command", ["open", "serve"])
def test_open_or_serve_before_a_run_is_one_line(dataset_dir: Path, command: str) -> None:
    one_line_error(
        kura(dataset_dir, command, "topics"), "no explorer page for 'topics'", "kura-pipeline run topics"
    )
    one_line_error(kura(dataset_dir, command, "nope"), "unknown dataset 'nope'", "topics")


def test_serve_answers_on_127_0_0_1_with_the_page_and_stops_on_ctrl_c(dataset_dir: Path) -> None:
    explorer_page(dataset_dir)
    server = subprocess.Popen(
        [KURA_PIPELINE, "serve", "topics", "--port", "0"],
        env=cli_env(dataset_dir),
        cwd=dataset_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT as a terminal's Ctrl-C delivers it, whatever the test runner's own disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/ \(Ctrl-C stops\)$", line.strip())
        assert found, line
        url = f"http://127.0.0.1:{found.group(1)}/"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert response.read().decode("utf-8") == PAGE
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + "secrets.parquet", timeout=10)
        assert missing.value.code == 404
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=20)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, err[-3000:]
    assert out.strip() == "stopped" and "Traceback" not in err, (out, err)


def test_serve_on_a_port_in_use_is_one_line(dataset_dir: Path) -> None:
    explorer_page(dataset_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(
            kura(dataset_dir, "serve", "topics", "--port", str(port)), f"127.0.0.1:{port}", "in use"
        )


# --- export ------------------------------------------------------------------------------------


def stage_file(folder: Path, stage: str, frame: pl.DataFrame, dataset: str = "topics") -> Path:
    path = folder / "data" / stage / f"{dataset}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    return path


def test_export_parquet_copies_each_stage_table_and_csv_flattens_nested_columns(
    dataset_dir: Path, conversations: list[Conversation]
) -> None:
    raw = stage_file(dataset_dir, "raw_conversations", conversations_to_frame(conversations))
    stage_file(dataset_dir, "projections", pl.DataFrame({"id": ["a"], "cluster_ids": [["c1", "c2"]]}))

    parquet = kura(dataset_dir, "export", "topics", "--format", "parquet", "--out", "out-parquet")
    assert parquet.returncode == 0, parquet.stderr[-3000:]
    out = dataset_dir / "out-parquet"
    assert parquet.stdout.splitlines() == [
        f"{out / 'raw_conversations.parquet'}: {len(conversations)} rows",
        f"{out / 'projections.parquet'}: 1 rows",
    ]
    assert (out / "raw_conversations.parquet").read_bytes() == raw.read_bytes()

    csv = kura(dataset_dir, "export", "topics", "--format", "csv", "--out", "out-csv")
    assert csv.returncode == 0, csv.stderr[-3000:]
    table = pl.read_csv(dataset_dir / "out-csv" / "raw_conversations.csv")
    assert table.height == len(conversations)
    first = json.loads(table["messages"][0])
    assert first[0]["role"] == "user" and first[0]["content"] == conversations[0].messages[0].content
    assert json.loads(pl.read_csv(dataset_dir / "out-csv" / "projections.csv")["cluster_ids"][0]) == [
        "c1",
        "c2",
    ]


def test_export_errors_are_one_line(dataset_dir: Path, conversations: list[Conversation]) -> None:
    one_line_error(kura(dataset_dir, "export", "topics", "--out", "x"), "nothing to export for 'topics'")
    stage_file(dataset_dir, "raw_conversations", conversations_to_frame(conversations))
    one_line_error(
        kura(dataset_dir, "export", "topics", "--format", "kura", "--out", "x"),
        "no conversation_summaries, meta_clusters, projections for 'topics'",
    )
    one_line_error(
        kura(dataset_dir, "export", "topics", "--format", "xml", "--out", "x"), "'--format'", "'xml'"
    )
    one_line_error(kura(dataset_dir, "export", "topics"), "Missing option '--out'")
    (dataset_dir / "afile").write_text("", encoding="utf-8")
    one_line_error(kura(dataset_dir, "export", "topics", "--out", "afile"), "is a file, not a folder")
    one_line_error(kura(dataset_dir, "exprot", "topics"), "No such command 'exprot'")


def test_tree_before_a_run_is_one_line(dataset_dir: Path) -> None:
    one_line_error(
        kura(dataset_dir, "tree", "topics"), "no clusters for 'topics'", "kura-pipeline run topics"
    )


# --- LLM totals at the end of a run ------------------------------------------------------------


def test_llm_totals_add_up_the_stages_and_say_when_there_was_no_model() -> None:
    stages = [
        {"backend": "offline"},
        {
            "llm_calls": 40,
            "llm_cache_hits": 2,
            "llm_input_tokens": 1000,
            "llm_output_tokens": 300,
            "llm_cost_usd": 0.01,
        },
        {
            "llm_calls": 5,
            "llm_cache_hits": 0,
            "llm_input_tokens": 200,
            "llm_output_tokens": 50,
            "llm_failures": 1,
        },
    ]
    totals = llm_totals(stages)
    assert format_llm_totals(totals) == (
        "LLM: 45 calls, 2 cache hits, 1,200 input + 350 output tokens, 1 failed, $0.0100"
    )
    assert llm_totals([{"backend": "offline"}]) is None
    assert format_llm_totals(None) == "LLM: not used (offline backend)"


@pytest.mark.slow
def test_run_prints_the_llm_totals_and_the_explorer_page(dataset_dir: Path, server: LoopbackServer) -> None:
    result = kura(
        dataset_dir,
        "run",
        "topics",
        timeout=600,
        **loopback_env(server),
        KURA_LLM_INPUT_PRICE="1.0",
        KURA_LLM_OUTPUT_PRICE="2.0",
    )
    calls = server.stats.count("chat")
    assert result.returncode == 0, result.stderr[-3000:]
    [totals] = [line for line in result.stdout.splitlines() if line.startswith("LLM: ")]
    assert totals.startswith(f"LLM: {calls:,} calls, 0 cache hits, "), (totals, calls)
    assert re.search(r"\d input \+ [\d,]+ output tokens, \$\d+\.\d{4}$", totals), totals
    page = dataset_dir / "data" / "explorer" / "topics.html"
    assert f"Explorer: {page} (open it: kura-pipeline open topics)" in result.stdout.splitlines()
    assert page.exists()


# --- `dagster asset materialize` on a fresh instance -------------------------------------------


@pytest.mark.slow
def test_dagster_asset_materialize_works_on_a_fresh_instance_for_every_registry_dataset(
    dataset_dir: Path,
) -> None:
    entries = json.loads((dataset_dir / "datasets.yaml").read_text(encoding="utf-8"))
    entries["datasets"]["topics-again"] = entries["datasets"]["topics"]
    registry(dataset_dir, json.dumps(entries))
    home = dataset_dir / "fresh_home"  # never touched by `kura-pipeline register`
    home.mkdir()
    env = cli_env(dataset_dir, DAGSTER_HOME=str(home))
    dagster = str(Path(sys.executable).parent / "dagster")
    for dataset in ("topics", "topics-again"):
        done = subprocess.run(
            [dagster, "asset", "materialize", "-m", "kura_pipeline.definitions"]
            + ["--select", "raw_conversations", "--partition", dataset],
            env=env,
            cwd=dataset_dir,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert pl.read_parquet(dataset_dir / "data" / "raw_conversations" / f"{dataset}.parquet").height == 40
    with DagsterInstance.from_config(str(home)) as instance:
        assert sorted(instance.get_dynamic_partitions(datasets_partitions.name)) == ["topics", "topics-again"]


# ----- a run you can trust: every dataset tried, lost input said, places checked first -----


@pytest.mark.slow
def test_run_all_goes_on_past_a_bad_dataset_and_says_what_was_skipped(dataset_dir: Path) -> None:
    # "topics" has one record that cannot be used; "absent" names a file that does not exist and
    # sorts first, so before, `run --all` stopped there and never ran "topics".
    with (dataset_dir / "topics.jsonl").open("a", encoding="utf-8") as file:
        file.write('{"chat_id": "broken", "messages": "not a list"}\n')
    registry(
        dataset_dir,
        "datasets:\n"
        "  absent: {loader: jsonl, options: {path: nowhere.jsonl}}\n"
        "  topics: {loader: jsonl, options: {path: topics.jsonl}}\n",
    )
    result = kura(dataset_dir, "run", "--all", timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Every stage of 'topics' done" in result.stdout
    assert "Input: 1 record skipped (each listed in raw_conversations' metadata" in result.stdout
    assert "'absent': raw_conversations failed:" in result.stderr and "nowhere.jsonl" in result.stderr
    # Errors without their stack traces (115 lines of stderr before, for one missing file).
    assert "Stack Trace:" not in result.stderr and "stack trace: in the run's event log" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "1 of 2 datasets failed: absent (the lines above say why)"
    # Then a run of "topics" fails: its tree is still the one the good run left, and says so.
    (dataset_dir / "topics.jsonl").unlink()
    assert kura(dataset_dir, "run", "topics", timeout=600).returncode == 1
    shown = kura(dataset_dir, "tree", "topics")
    assert shown.returncode == 0 and shown.stdout.startswith("Clusters (")
    assert "note: the last run of 'topics' did not finish (failure)" in shown.stderr


@pytest.mark.slow
def test_an_interrupted_run_says_so_and_exits_130_and_a_re_run_finishes(tmp_path: Path) -> None:
    registry(tmp_path, "datasets:\n  demo: {loader: sharegpt_package, options: {max_conversations: 300}}\n")
    process = subprocess.Popen(
        [KURA_PIPELINE, "run", "demo"],
        env=cli_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    raw = tmp_path / "data" / "raw_conversations" / "demo.parquet"
    deadline = time.monotonic() + 300
    while not raw.exists():  # interrupt once the first stage is written: later ones take seconds
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    if process.returncode == 0:
        pytest.skip("the run finished before the interrupt reached a stage (a very fast machine)")
    assert process.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("'demo': interrupted during ") and "`kura-pipeline run demo` goes on" in last
    assert "Every stage" not in out
    again = kura(tmp_path, "run", "demo", timeout=600)
    assert again.returncode == 0 and "Every stage of 'demo' done" in again.stdout, again.stderr[-3000:]


def test_a_dagster_home_or_data_folder_that_cannot_work_is_one_line(tmp_path: Path) -> None:
    registry(tmp_path, "datasets:\n  demo: {loader: jsonl, options: {path: x.jsonl}}\n")
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    one_line_error(kura(tmp_path, "list", DAGSTER_HOME=str(afile)), "DAGSTER_HOME=", "is a file")
    one_line_error(kura(tmp_path, "--data-dir", str(afile), "list"), "the data folder", "is a file")
    one_line_error(kura(tmp_path, "--data-dir", "s3://bucket/kura", "list"), "s3://bucket/kura", "s3fs")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("run_monitoring: [unclosed\n")
    one_line_error(kura(tmp_path, "list", DAGSTER_HOME=str(home)), "cannot open the Dagster instance")
    # A relative DAGSTER_HOME is made absolute (Dagster refuses one), not a traceback.
    relative = kura(tmp_path, "list", DAGSTER_HOME="relative_home")
    assert relative.returncode == 0 and "Traceback" not in relative.stderr, relative.stderr[-3000:]
    assert (tmp_path / "relative_home").is_dir()


def test_export_into_a_folder_under_a_file_is_one_line(tmp_path: Path) -> None:
    registry(tmp_path, "datasets:\n  demo: {loader: jsonl, options: {path: x.jsonl}}\n")
    stage = tmp_path / "data" / "raw_conversations"
    stage.mkdir(parents=True)
    conversations_to_frame([]).write_parquet(stage / "demo.parquet")
    (tmp_path / "afile").write_text("not a folder")
    under_a_file = kura(tmp_path, "export", "demo", "--out", str(tmp_path / "afile" / "sub"))
    one_line_error(under_a_file, "--out", "cannot make the folder")


@pytest.mark.parametrize("depth", ["0", "-1"])
def test_a_depth_below_one_is_one_line(dataset_dir: Path, depth: str) -> None:
    one_line_error(kura(dataset_dir, "tree", "topics", "--depth", depth), "--depth", ">=1")
