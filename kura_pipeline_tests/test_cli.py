"""The `kura-pipeline` CLI answers (issue #14, item 4): every user error is one line and exit
code 2, never a traceback; one bad registry entry blocks only itself. The real CLI, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import polars as pl
import pytest

KURA_PIPELINE = str(Path(sys.executable).parent / "kura-pipeline")


def kura(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KURA_", "DAGSTER_", "OPENAI_"))}
    (tmp_path / "dagster.yaml").touch()
    return subprocess.run(
        [KURA_PIPELINE, *args],
        env=env
        | {
            "KURA_DATASETS": str(tmp_path / "datasets.yaml"),
            "KURA_DATA_DIR": str(tmp_path / "data"),
            "KURA_LLM_CACHE": str(tmp_path / "cache.sqlite3"),
            "DAGSTER_HOME": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )


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
    warnings = [line for line in result.stderr.splitlines() if line.startswith("kura-pipeline: warning:")]
    assert len(warnings) == 1 and "'typo'" in warnings[0], result.stderr[-3000:]

    listed = kura(dataset_dir, "list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    [line] = listed.stdout.strip().splitlines()
    assert line.startswith("topics: registered, ") and line.endswith(" clusters"), line
    assert " conversations, " in line, line


def test_registry_and_data_dir_options_point_the_cli_elsewhere(dataset_dir: Path) -> None:
    (dataset_dir / "datasets.yaml").rename(dataset_dir / "elsewhere.yaml")  # KURA_DATASETS: no file
    stage = dataset_dir / "other-data" / "raw_conversations" / "topics.parquet"
    stage.parent.mkdir(parents=True)
    pl.DataFrame({"chat_id": ["a", "b", "c"]}).write_parquet(stage)
    options = ["--registry", "elsewhere.yaml", "--data-dir", "other-data"]
    listed = kura(dataset_dir, *options, "list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert listed.stdout.strip().splitlines() == [
        "topics: not registered (run `kura-pipeline register`), 3 conversations"
    ]
    one_line_error(kura(dataset_dir, *options, "tree", "nope"), str(dataset_dir / "elsewhere.yaml"), "topics")
