"""The explorer says the numbers of the terminal tree (shown_tree): a cluster counts all its
conversations, withheld children are one line, every share is of all conversations; and it
shows nothing invented (bookkeeping facets, made-up dates, an offline note for an LLM run)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from kura_pipeline.core.frames import (
    CLUSTERS_SCHEMA,
    CONVERSATIONS_SCHEMA,
    PROJECTIONS_SCHEMA,
    PROPERTIES_SCHEMA,
    SUMMARIES_SCHEMA,
    frame_to_clusters,
)
from kura_pipeline.core.render.explorer import (
    OFFLINE_BACKEND,
    build_explorer_data,
    render_html,
    top_clusters_markdown,
)
from kura_pipeline.core.render.shown import shown_tree, withheld_line

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
]
FALLBACK = "the model's name was too generic"

# id: (parent, level, conversations in it if a base cluster, withheld)
HIERARCHY: dict[str, tuple[str | None, int, int, bool]] = {
    "T1": (None, 2, 0, False),
    "M1": ("T1", 1, 0, False),
    "B1": ("M1", 0, 6, False),
    "B2": ("M1", 0, 4, False),
    "B3": ("M1", 0, 2, True),  # a withheld child of a shown parent
    "M2": ("T1", 1, 0, True),  # a withheld middle cluster: it and its child go
    "B4": ("M2", 0, 3, False),
    "T2": (None, 2, 0, False),
    "M3": ("T2", 1, 0, False),  # named without the LLM
    "B5": ("M3", 0, 5, False),
    "T3": (None, 2, 0, True),  # a withheld top-level cluster
    "M4": ("T3", 1, 0, False),
    "B6": ("M4", 0, 2, False),
}
UNDATED = {"c01", "c07"}  # conversations whose source had no timestamp


def path_of(cluster: str) -> list[str]:
    path = [cluster]
    while (parent := HIERARCHY[path[-1]][0]) is not None:
        path.append(parent)
    return path


def is_hidden(cluster: str) -> bool:
    return any(HIERARCHY[c][3] for c in path_of(cluster))


def counts_frames(fallback_column: bool = True) -> dict[str, pl.DataFrame]:
    """22 conversations in the hierarchy above: 15 in T1 (3 of them under withheld M2, 2 in
    withheld B3), 5 in T2, 2 in withheld T3. The withheld ones carry secrets."""
    base_of: list[str] = []
    for cluster, (_, level, size, _) in HIERARCHY.items():
        if level == 0:
            base_of += [cluster] * size
    chat_ids = [f"c{i:02d}" for i in range(len(base_of))]
    members: dict[str, list[str]] = {c: [] for c in HIERARCHY}
    for chat, base in zip(chat_ids, base_of, strict=True):
        for cluster in path_of(base):
            members[cluster].append(chat)
    clusters = pl.DataFrame(
        [
            {
                "id": c,
                "name": f"Secret name {c}" if is_hidden(c) else f"Cluster {c}",
                "description": f"Secret description {c}" if is_hidden(c) else f"About {c}",
                "slug": c.lower(),
                "chat_ids": members[c],
                "parent_id": parent,
                "level": level,
                "count": len(members[c]),
                "batch_counts": [],
                "lineage": None,
                "previous_ids": [],
                "withheld": withheld,
                "fallback": FALLBACK if c == "M3" else None,
            }
            for c, (parent, level, _, withheld) in HIERARCHY.items()
        ],
        schema=CLUSTERS_SCHEMA,
    )
    if not fallback_column:
        clusters = clusters.drop("fallback")
    projections = pl.DataFrame(
        [
            {
                "kind": "conversation",
                "id": chat,
                "x": float(i % 5),
                "y": float(i // 5),
                "level": None,
                "cluster_ids": path_of(base),
            }
            for i, (chat, base) in enumerate(zip(chat_ids, base_of, strict=True))
        ],
        schema=PROJECTIONS_SCHEMA,
    )
    summaries = pl.DataFrame(
        [
            {
                "chat_id": chat,
                "summary": f"Secret summary {chat}" if is_hidden(base) else f"The user asked about {base}",
                "topic": "cooking" if i % 2 else "travel",
                "languages": ["english"],
                "assistant_errors": [],
            }
            for i, (chat, base) in enumerate(zip(chat_ids, base_of, strict=True))
        ],
        schema=SUMMARIES_SCHEMA,
    )
    properties = pl.DataFrame(
        [
            row
            for chat in chat_ids
            for row in (
                {"chat_id": chat, "name": "metadata.model", "value": "m-1", "type": "str"},
                {"chat_id": chat, "name": "metadata.sharegpt_parts", "value": "2", "type": "int"},
                {"chat_id": chat, "name": "metadata.dropped_messages", "value": "1", "type": "int"},
            )
        ],
        schema=PROPERTIES_SCHEMA,
    )
    raw = pl.DataFrame(
        [
            {
                "chat_id": chat,
                "batch": "initial",
                "created_at": None if chat in UNDATED else datetime(2026, 3, 1 + i % 9, tzinfo=UTC),
                "messages": [{"role": "user", "content": "hello", "created_at": None}],
                "metadata": "{}",
            }
            for i, chat in enumerate(chat_ids)
        ],
        schema=CONVERSATIONS_SCHEMA,
    )
    return {
        "conversation_summaries": summaries,
        "extracted_properties": properties,
        "meta_clusters": clusters,
        "projections": projections,
        "raw_conversations": raw,
    }


def page_data(page: str) -> dict[str, Any]:
    start = page.index('id="explorer-data">') + len('id="explorer-data">')
    return json.loads(page[start : page.index("</script>", start)])


def by_id(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    c = data["clusters"]
    return {cid: {key: c[key][i] for key in c} | {"index": i} for i, cid in enumerate(c["id"])}


# ---------- the data ----------


def test_a_parent_with_a_withheld_child_counts_it_as_one_line_and_shows_nothing_of_it():
    frames = counts_frames()
    page = render_html(build_explorer_data(dataset="d", **frames))
    data = page_data(page)
    clusters = by_id(data)
    assert set(clusters) == {"T1", "M1", "B1", "B2", "T2", "M3", "B5"}
    # All its conversations, withheld ones included: the number the terminal tree prints.
    assert clusters["T1"]["count"] == 15 and clusters["M1"]["count"] == 12
    assert clusters["T1"]["withheldLine"] == withheld_line(3)
    assert clusters["M1"]["withheldLine"] == withheld_line(2)
    assert data["withheldTopLine"] == withheld_line(2) and data["total"] == 22
    # Every parent is the sum of its shown children and its withheld line; so is the whole.
    for cid, cluster in clusters.items():
        kids = [k for k in clusters.values() if k["parent"] == cluster["index"]]
        if kids:
            assert cluster["count"] == sum(k["count"] for k in kids) + cluster["withheld"], cid
    roots = [k for k in clusters.values() if k["parent"] < 0]
    assert sum(r["count"] for r in roots) + data["withheldTop"] == data["total"]
    # ...and nothing of what was withheld is in the file.
    assert "Secret" not in page
    assert len(data["conv"]["summary"]) == 22 - 2 - 3 - 2


def test_every_share_is_of_all_conversations_in_the_shown_tree_and_the_dagster_table_agrees():
    frames = counts_frames()
    data = build_explorer_data(dataset="d", **frames)
    tree = shown_tree(frame_to_clusters(frames["meta_clusters"]))
    assert data.hierarchy_total == tree.total == 22
    for cid, count, share in zip(data.cluster_ids, data.cluster_counts, data.cluster_shares, strict=True):
        [cluster] = [c for c in frame_to_clusters(frames["meta_clusters"]) if c.id == cid]
        assert count == cluster.count and share == f"{tree.share(cluster.count):.1f}%"
    assert data.cluster_shares[data.cluster_ids.index("T1")] == "68.2%"  # 15 of 22
    table = top_clusters_markdown(data)
    assert "| Cluster T1 | 15 | 68.2% | 1 |" in table and "| Cluster T2 | 5 | 22.7% | 1 |" in table
    assert f"| | {withheld_line(2)} | 2 | | |" in table
    assert "| **all conversations** | 22 | 100.0% |" in table


def test_loader_bookkeeping_keys_are_not_facets():
    data = build_explorer_data(dataset="d", **counts_frames())
    names = {f.name for f in data.facets}
    assert "model" in names
    assert not names & {"sharegpt parts", "dropped messages"}


def test_the_offline_backend_is_blamed_only_when_the_summaries_came_from_it():
    frames = counts_frames()
    for backend in (None, "openai-compatible:gpt-4o-mini", "local llama.cpp:qwen"):
        [note] = [
            n for n in build_explorer_data(dataset="d", backend=backend, **frames).notes if "filled" in n
        ]
        assert note == (
            "Not filled for this dataset: task, concerning score, user frustration, assistant errors."
        )
    notes = build_explorer_data(dataset="d", backend=OFFLINE_BACKEND, **frames).notes
    assert any("The offline backend leaves facets that need judgement empty" in n for n in notes)


def test_a_cluster_named_without_the_llm_is_marked_and_counted_in_the_notes():
    data = build_explorer_data(dataset="d", **counts_frames())
    assert data.cluster_fallbacks[data.cluster_ids.index("M3")] == FALLBACK
    assert sum(1 for f in data.cluster_fallbacks if f) == 1
    assert any(
        n.startswith("1 of the 7 clusters shown was named or grouped without the LLM") for n in data.notes
    )
    older = build_explorer_data(dataset="d", **counts_frames(fallback_column=False))
    assert not any(older.cluster_fallbacks) and not any("without the LLM" in n for n in older.notes)


def test_a_conversation_without_a_date_has_no_day():
    data = build_explorer_data(dataset="d", **counts_frames())
    assert len(data.days) == 15 and data.days.count(None) == len(UNDATED) == 2  # c01, c07 are shown


# ---------- the page in a browser ----------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        (pytest.fail if os.getenv("CI") else pytest.skip)("Debian's chromium is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Opened:
    """A page opened from disk in the browser, with the errors it logged."""

    def __init__(self, browser: Any, html: str, path: Path) -> None:
        path.write_text(html, encoding="utf-8")
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_selector("body[data-ready='1']", timeout=30_000)

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def page(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    html = render_html(build_explorer_data(dataset="d", **counts_frames()))
    opened = Opened(browser, html, tmp_path_factory.mktemp("counts") / "counts.html")
    yield opened.page
    assert opened.errors == []
    opened.close()


def tree_size(page: Any, cluster: str) -> str:
    return page.text_content(f"#tree .node-row[data-cluster='{cluster}'] .size")


@pytest.mark.slow
def test_the_tree_and_the_detail_pane_say_the_same_numbers_for_a_parent_with_a_withheld_child(page):
    page.locator("#tree .node-row[data-cluster='T1'] button.name").click()
    # The tree: the parent's full count and share, its children and the withheld line add up.
    assert tree_size(page, "T1") == "15 · 68.2%" and tree_size(page, "M1") == "12 · 54.5%"
    under = page.locator("#tree .node-row[data-cluster='T1'] + ul > li")
    child_counts = under.evaluate_all(
        "items => items.map(li => Number((li.querySelector('.node-row') || li).dataset.count))"
    )
    assert sum(child_counts) == 15
    assert page.text_content(
        "#tree .node-row[data-cluster='T1'] + ul > li.withheld-line"
    ) == withheld_line(3)
    assert page.text_content("#tree > li.withheld-line") == withheld_line(2)
    # The detail pane: the same count and share, in words; its children as in the tree.
    assert page.text_content("#detail-count") == "15 conversations · 68.2% of all conversations · level 2"
    assert page.locator("#detail-children .size").all_text_contents() == ["12 · 54.5%"]
    assert page.text_content("#detail-withheld") == withheld_line(3)
    assert page.text_content("#stats").startswith("22 conversations")
    # A filter counts matches of each cluster's count; the share stays the cluster's share.
    page.select_option("#facet-select", label="topic")
    option = page.locator("#value-select option", has_text="cooking").get_attribute("value")
    page.select_option("#value-select", value=option)
    matched = page.get_attribute("#tree .node-row[data-cluster='T1']", "data-count")
    assert tree_size(page, "T1") == f"{matched} of 15 match · 68.2%"
    assert page.text_content("#detail-count").startswith(
        f"{matched} of its 15 conversations match the filters"
    )
    assert "68.2% of all conversations" in page.text_content("#detail-count")
    page.click("#clear-filters")


@pytest.mark.slow
def test_the_page_marks_a_fallback_cluster_and_says_a_missing_date_is_unknown(page):
    page.locator("#tree .node-row[data-cluster='T2'] button.name").click()
    mark = page.locator("#tree .node-row[data-cluster='M3'] .fallback-mark")
    assert (
        mark.text_content() == "no LLM"
        and mark.get_attribute("title") == f"named without the LLM: {FALLBACK}"
    )
    page.locator("#tree .node-row[data-cluster='M3'] button.name").click()
    assert page.text_content("#detail-fallback") == f"named without the LLM: {FALLBACK}"
    # Undated conversations: said as unknown, counted next to the chart, not plotted.
    page.locator("#detail .crumbs button", has_text="All conversations").click()
    dates = [m.split(" · ")[1] for m in page.locator("#summaries li .meta").all_text_contents()]
    assert dates.count("date unknown") == 2 and all(
        d == "date unknown" or d.startswith("2026-03-") for d in dates
    )
    assert page.text_content("#time-undated") == "2 conversations without a date, not plotted"
    plotted = page.evaluate(
        "() => document.getElementById('time').data.reduce((s, t) => s + t.y.reduce((a, b) => a + b, 0), 0)"
    )
    assert plotted == 15 - 2  # the 15 conversations in this page, less the 2 without a date


@pytest.mark.slow
def test_a_dataset_without_any_date_says_so_instead_of_charting(browser, tmp_path):
    frames = counts_frames()
    frames["raw_conversations"] = frames["raw_conversations"].with_columns(
        created_at=pl.lit(None, CONVERSATIONS_SCHEMA["created_at"])
    )
    opened = Opened(
        browser, render_html(build_explorer_data(dataset="d", **frames)), tmp_path / "undated.html"
    )
    try:
        assert opened.errors == []
        assert opened.page.text_content("#time-note") == (
            "No conversation has a date, so there is no change over time to show."
        )
        assert opened.page.locator("#time").is_hidden()
        metas = opened.page.locator("#summaries li .meta").all_text_contents()
        assert len(metas) == 15 and all(m.endswith(" · date unknown") for m in metas)
    finally:
        opened.close()
