"""Atomic, collision-free writes (issue #13): two real processes writing the same stage file
again and again, while a reader reads it, never tear it and never fail. Each write goes to a
temporary sibling of its own, then replaces the file atomically."""

from __future__ import annotations

import io
import multiprocessing
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from upath import UPath

from kura_pipeline.resources.io_manager import PolarsParquetUPathIOManager, write_atomically

WRITES = 100
ROWS = 250_000
HTML_REPEATS = 60_000


class _Context:
    """What `dump_to_path` uses of an OutputContext."""

    def add_output_metadata(self, metadata: dict[str, Any]) -> None:
        pass


def table(writer: int, write: int) -> pl.DataFrame:
    # Random floats do not compress: a couple of megabytes, so writes take long enough to overlap.
    values = np.random.default_rng(writer * 1000 + write).random(ROWS)
    return pl.DataFrame({"tag": [f"w{writer}-{write}"] * ROWS, "n": range(ROWS), "x": values})


def page(writer: int, write: int) -> str:
    tag = f"w{writer}-{write:03d};"
    return f"<html><body data-tag='{tag}'>{tag * HTML_REPEATS}</body></html>"


def _write_many(kind: str, target: str, writer: int, start: Any, errors: Any) -> None:
    """One writer process: WRITES different contents to the same file, as fast as it can."""
    try:
        path = UPath(target)
        if kind == "parquet":
            parquet = PolarsParquetUPathIOManager(base_path=path.parent)
            contents = [table(writer, i) for i in range(WRITES)]
            start.wait(timeout=60)
            for content in contents:
                parquet.dump_to_path(_Context(), content, path)  # type: ignore[arg-type]
        else:
            # Imported here: a parquet writer process need not load the explorer's libraries.
            from kura_pipeline.assets.explorer import HtmlUPathIOManager

            html = HtmlUPathIOManager(base_path=path.parent)
            contents = [page(writer, i) for i in range(WRITES)]
            start.wait(timeout=60)
            for content in contents:
                html.dump_to_path(_Context(), content, path)  # type: ignore[arg-type]
    except BaseException:
        errors.put(f"writer {writer}: {traceback.format_exc()}")


def check_parquet(data: bytes) -> str | None:
    try:
        frame = pl.read_parquet(io.BytesIO(data))
    except Exception as error:
        return f"unreadable Parquet ({len(data)} bytes): {error}"
    tags = frame["tag"].unique().to_list()
    if frame.height != ROWS or len(tags) != 1 or not frame.equals(table(*_parse(tags[0]))):
        return f"torn Parquet: {frame.height} rows, tags {tags[:3]}"
    return None


def _parse(tag: str) -> tuple[int, int]:
    writer, write = tag[1:].split("-")
    return int(writer), int(write)


def check_html(data: bytes) -> str | None:
    text = data.decode("utf-8", errors="replace")
    if not text.endswith("</html>"):
        return f"torn page ({len(data)} bytes) ending {text[-20:]!r}"
    tag = text[text.index("data-tag='") + 10 :].split("'", 1)[0]
    writer, write = _parse(tag.rstrip(";"))
    if text != page(writer, write):
        return f"torn page: {tag} mixed with another write"
    return None


def race(kind: str, target: Path) -> tuple[int, list[str]]:
    """Two writer processes (spawned) and this process reading until both are done: the
    number of reads and every problem seen (writer errors and bad reads)."""
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(3)
    errors = spawn.Queue()
    writers = [
        spawn.Process(target=_write_many, args=(kind, str(target), writer, start, errors))
        for writer in (1, 2)
    ]
    for process in writers:
        process.start()
    check = check_parquet if kind == "parquet" else check_html
    problems: list[str] = []
    reads = 0
    try:
        start.wait(timeout=120)
        deadline = time.monotonic() + 120
        while any(p.is_alive() for p in writers) and time.monotonic() < deadline:
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                if reads:  # once written, the file never disappears
                    problems.append("the stage file disappeared")
                continue
            reads += 1
            if (problem := check(data)) is not None:
                problems.append(problem)
    finally:
        for process in writers:
            process.join(timeout=120)
            if process.is_alive():
                process.kill()
    while not errors.empty():
        problems.append(errors.get())
    problems += [f"writer exited with {p.exitcode}" for p in writers if p.exitcode != 0]
    if (problem := check(target.read_bytes())) is not None:
        problems.append(f"final file: {problem}")
    return reads, problems


@pytest.mark.parametrize("kind", ["parquet", "html"])
def test_two_processes_writing_the_same_stage_never_tear_it(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "stage" / f"dataset.{kind}"
    target.parent.mkdir()
    reads, problems = race(kind, target)
    assert problems == [], "\n".join(problems[:5])
    assert reads >= 5  # the reader really read while the writers wrote
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = UPath(tmp_path) / "stage" / "dataset.html"
    write_atomically(target, b"<html>old</html>")

    with pytest.raises(TypeError):
        write_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"<html>old</html>"
    assert [p.name for p in (tmp_path / "stage").iterdir()] == ["dataset.html"]


@pytest.mark.parametrize("url", ["memory://kura-atomic-test", "file://{tmp}"])
def test_fsspec_urls_get_whole_files_and_no_temporary(tmp_path: Path, url: str) -> None:
    target = UPath(url.format(tmp=tmp_path)) / "stage" / "dataset.parquet"
    write_atomically(target, b"one")
    write_atomically(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["dataset.parquet"]
