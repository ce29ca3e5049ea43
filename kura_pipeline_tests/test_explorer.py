"""The explorer page: built by the real pipeline (offline), opened from disk in a real headless
Chromium, clicked through, filtered, and fed conversations that carry script payloads."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from dagster import instance_for_test, materialize

from kura_pipeline.assets import ALL_ASSETS
from kura_pipeline.assets.explorer import HtmlIOManager
from kura_pipeline.core.frames import (
    CLUSTERS_SCHEMA,
    CONVERSATIONS_SCHEMA,
    PROJECTIONS_SCHEMA,
    PROPERTIES_SCHEMA,
    SUMMARIES_SCHEMA,
    TIMESTAMP,
    frame_to_clusters,
)
from kura_pipeline.core.render.explorer import (
    build_explorer_data,
    render_explorer,
    render_html,
    script_json,
)
from kura_pipeline.core.render.shown import shown_tree
from kura_pipeline.resources.privacy import PrivacyPolicy
from kura_pipeline_tests.conftest import make_conversations, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "explorer"
DATASET = "explore"
STAGE_INPUTS = [
    "conversation_summaries",
    "extracted_properties",
    "meta_clusters",
    "projections",
    "raw_conversations",
]
RUN_CONFIG = {
    "ops": {
        "base_clusters": {"config": {"conversations_per_cluster": 4, "max_top_clusters": 4}},
        "meta_clusters": {"config": {"max_top_clusters": 4, "branching_factor": 2.5}},
    }
}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PAYLOAD_TEXT = "<script>window.__pwned = 1; document.title = 'pwned'</script>"


# ---------- the data: the real pipeline, offline, through Dagster ----------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """40 topic conversations in two monthly batches plus 6 hostile ones, all stages and the
    explorer materialised once for the module (UMAP's numba compilation dominates)."""
    root = tmp_path_factory.mktemp("explorer")
    conversations = make_conversations()
    for conversation in conversations:
        conversation.metadata["batch"] = conversation.created_at.strftime("%Y-%m")
    path = write_jsonl(conversations, root / DATASET)
    path.write_text(
        path.read_text(encoding="utf-8")
        + (FIXTURES / "hostile_conversations.jsonl").read_text(encoding="utf-8"),
        encoding="utf-8",
    )
    (root / "datasets.yaml").write_text(
        json.dumps({"datasets": {DATASET: {"loader": "jsonl", "options": {"path": DATASET}}}}),
        encoding="utf-8",
    )
    data_dir = root / "data"
    with pytest.MonkeyPatch.context() as env, instance_for_test() as instance:
        for name in ("KURA_LLM_MODEL", "KURA_LLM_BASE_URL", "KURA_LLM_LOCAL_MODEL", "KURA_EMBEDDINGS_MODEL"):
            env.delenv(name, raising=False)
        env.setenv("KURA_DATA_DIR", str(data_dir))
        env.setenv("KURA_DATASETS", str(root / "datasets.yaml"))
        env.setenv("KURA_LLM_CACHE", str(root / "cache.sqlite3"))
        from kura_pipeline.definitions import build_resources

        instance.add_dynamic_partitions("datasets", [DATASET])
        result = materialize(
            ALL_ASSETS,
            partition_key=DATASET,
            instance=instance,
            run_config=RUN_CONFIG,
            resources={
                **build_resources(),
                "html_io_manager": HtmlIOManager(base_path=str(data_dir)),
                # Every cluster shown: these tests are about the page (withholding has its own test).
                "privacy": PrivacyPolicy(min_cluster_conversations=1, min_cluster_users=1),
            },
        )
    [materialization] = result.asset_materializations_for_node("explorer")
    frames = {name: pl.read_parquet(data_dir / name / f"{DATASET}.parquet") for name in STAGE_INPUTS}
    return {
        "root": root,
        "page": data_dir / "explorer" / f"{DATASET}.html",
        "metadata": {key: value.value for key, value in materialization.metadata.items()},
        "frames": frames,
    }


def top_level_of(frames: dict[str, pl.DataFrame], chat_id: str) -> str:
    [path] = frames["projections"].filter(pl.col("id") == chat_id)["cluster_ids"].to_list()
    return path[-1]


# ---------- a real browser, with every network request blocked and recorded ----------


@pytest.fixture(scope="module")
def browser(pipeline: dict[str, Any]) -> Iterator[Any]:
    # After the pipeline fixture: Playwright's sync API must not overlap Dagster's asyncio runs.
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        # `make test` installs it where it can (root, as in CI); elsewhere these tests are skipped.
        (pytest.fail if os.getenv("CI") else pytest.skip)(
            "Debian's chromium is not installed: apt-get install -y chromium"
        )
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Opened:
    """A page opened from disk, with what it tried to fetch and every error it logged."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.url = path.resolve().as_uri()
        self.context = browser.new_context(viewport={"width": 1400, "height": 900}, service_workers="block")
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.context.route(re.compile(r"^(?!file:).*"), lambda route: route.abort())
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=30_000)

    def attr(self, selector: str, name: str) -> str | None:
        return self.page.get_attribute(selector, name)

    def tree_row(self, cluster_id: str) -> Any:
        return self.page.locator(f"#tree .node-row[data-cluster='{cluster_id}']")

    def root_counts(self) -> list[int]:
        return [
            int(c)
            for c in self.page.eval_on_selector_all(
                "#tree > li > .node-row", "rows => rows.map(r => r.dataset.count)"
            )
        ]

    def filter_by(self, facet: str, value: str) -> None:
        self.page.select_option("#facet-select", label=facet)
        options = self.page.eval_on_selector_all(
            "#value-select option", "options => options.map(o => [o.value, o.textContent])"
        )
        [code] = [code for code, text in options if text.rsplit(" (", 1)[0] == value]
        self.page.select_option("#value-select", value=code)

    def hover_conversation(self, chat_index: int) -> tuple[float, float]:
        x, y = self.page.evaluate(
            """(i) => {
                const data = JSON.parse(document.getElementById('explorer-data').textContent);
                const gd = document.getElementById('map'), box = gd.getBoundingClientRect();
                const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
                return [box.left + xa._offset + xa.l2p(data.conv.x[i]),
                        box.top + ya._offset + ya.l2p(data.conv.y[i])];
            }""",
            chat_index,
        )
        self.page.mouse.move(x, y)
        self.page.wait_for_timeout(150)
        return x, y

    def click_conversation(self, chat_index: int) -> None:
        self.page.mouse.click(*self.hover_conversation(chat_index))

    def assert_clean(self) -> None:
        """Nothing but the file itself was requested, no error was logged, no payload ran."""
        assert set(self.requests) <= {self.url}, self.requests
        assert self.errors == []
        assert self.page.evaluate("() => window.__pwned") is None
        assert "pwned" not in self.page.title()
        tags = self.page.evaluate(
            "() => ({scripts: document.scripts.length, imgs: document.images.length,"
            " iframes: document.querySelectorAll('iframe, svg[onload], [onerror], [onmouseover]').length})"
        )
        assert tags == {"scripts": 3, "imgs": 0, "iframes": 0}
        # The map was drawn (plotly swallows WebGL failures and shows a notice instead).
        assert self.page.locator("#map .no-webgl").count() == 0
        assert self.attr("#map", "data-renderer") in ("scattergl", "scatter")

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def opened(browser: Any, pipeline: dict[str, Any]) -> Iterator[Opened]:
    page = Opened(browser, pipeline["page"])
    yield page
    page.close()


# ---------- the asset ----------


@pytest.mark.slow
def test_the_asset_writes_one_html_page_with_a_map_image_and_the_top_clusters(pipeline):
    page, metadata = pipeline["page"], pipeline["metadata"]
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and metadata["size_bytes"] == len(html.encode())
    assert metadata["conversations"] == metadata["dagster/row_count"] == 46
    assert metadata["map"].startswith("![map of 46 conversations](data:image/png;base64,iVBORw0KGgo")
    top = pipeline["frames"]["meta_clusters"].filter(pl.col("parent_id").is_null())
    table = metadata["top_clusters"]
    assert table.count("\n| ![") == top.height
    assert "language" in metadata["facets"] and "batch" in metadata["facets"]
    assert metadata["show_conversations"] is False
    # The UI's table says the terminal tree's counts and shares (shown_tree).
    tree = shown_tree(frame_to_clusters(pipeline["frames"]["meta_clusters"]))
    for root in tree.roots:
        assert f" | {root.count} | {tree.share(root.count):.1f}% | " in table
    assert f"| **all conversations** | {tree.total} | 100.0% |" in table
    # The summaries were made offline, as their materialization says: the page may say so.
    notes = json.loads(re.search(r'id="explorer-data">(.*?)</script>', html).group(1))["notes"]
    assert any("The offline backend leaves facets that need judgement empty" in n for n in notes)
    # Nothing is fetched: plotly is inline, and no URL to load anything from is in the page.
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", html)
    # Summaries are in the page; what users and assistants wrote is not, by default.
    assert "Here is a recipe with ingredients" not in html


# ---------- the page in a browser ----------


@pytest.mark.slow
def test_clicking_the_tree_selects_on_the_map_and_fills_the_detail_panel(opened, pipeline):
    clusters = pipeline["frames"]["meta_clusters"]
    biggest = clusters.filter(pl.col("parent_id").is_null()).sort("count", descending=True).row(0, named=True)
    page = opened.page
    assert opened.attr("#map", "data-selected") == ""
    opened.tree_row(biggest["id"]).locator("button.name").click()

    assert opened.attr("#map", "data-selected") == biggest["id"]
    assert int(opened.attr("#map", "data-selected-points")) == biggest["count"]
    assert "selected" in opened.tree_row(biggest["id"]).get_attribute("class")
    assert page.text_content("#detail-name") == biggest["name"]
    assert page.text_content("#detail-description") == biggest["description"]
    assert int(opened.attr("#detail-count", "data-count")) == biggest["count"]
    children = clusters.filter(pl.col("parent_id") == biggest["id"])
    assert page.locator("#detail-children li").count() == children.height
    assert page.locator("#summaries li").count() == min(biggest["count"], 30)
    assert page.locator("#breakdowns section[data-facet='language']").count() == 1

    # A child chosen in the detail panel moves the tree and the map along.
    # Children are listed biggest first, ties by name (as in the terminal tree).
    child = children.sort(["count", "name"], descending=[True, False]).row(0, named=True)
    page.locator("#detail-children li button").first.click()
    assert opened.attr("#map", "data-selected") == child["id"]
    assert "selected" in opened.tree_row(child["id"]).get_attribute("class")
    opened.assert_clean()


@pytest.mark.slow
def test_clicking_a_point_on_the_map_selects_its_cluster_in_the_tree(opened, pipeline):
    frames = pipeline["frames"]
    chat_ids = json.loads(opened.page.text_content("#explorer-data"))["conv"]
    points = frames["projections"].filter(pl.col("kind") == "conversation")
    # A point of the biggest top-level cluster, far from the other clusters' points.
    xy = np.array([chat_ids["x"], chat_ids["y"]], dtype=float).T
    top = [top_level_of(frames, c) for c in points["id"].to_list()]
    biggest = max(set(top), key=top.count)
    distance = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    isolation = [
        min((distance[i, j] for j in range(len(top)) if top[j] != top[i]), default=1e9)
        for i in range(len(top))
    ]
    index = max((i for i in range(len(top)) if top[i] == biggest), key=lambda i: isolation[i])
    opened.click_conversation(index)
    assert opened.attr("#map", "data-selected") == biggest
    assert "selected" in opened.tree_row(biggest).get_attribute("class")
    assert (
        opened.page.text_content("#detail-name")
        == frames["meta_clusters"].filter(pl.col("id") == biggest)["name"].item()
    )
    opened.assert_clean()


@pytest.mark.slow
def test_a_filter_recolours_the_map_and_recounts_the_tree(opened):
    page = opened.page
    assert sum(opened.root_counts()) == 46
    opened.filter_by("topic", "cooking")
    assert page.text_content("#filter-status") == "showing 8 of 46 conversations"
    assert sum(opened.root_counts()) == 8
    assert opened.attr("#map", "data-shown-points") == "8"
    assert int(opened.attr("#detail-count", "data-count")) == 8
    assert page.locator("#summaries li").count() == 8
    greyed = page.evaluate("() => document.getElementById('map').data[0].x.length")
    assert greyed == 46 - 8  # the filtered-out points stay on the map, in grey
    # A second value of the same facet widens the filter; a chip removes it again.
    opened.filter_by("topic", "poetry")
    assert sum(opened.root_counts()) == 16
    page.locator(".chip", has_text="topic: cooking").locator("button").click()
    assert sum(opened.root_counts()) == 8
    page.click("#clear-filters")
    assert sum(opened.root_counts()) == 46 and page.text_content("#filter-status") == "all 46 conversations"
    # Time by batch: the dataset has a `batch` metadata key.
    page.get_by_role("button", name="by batch").click()
    assert page.text_content("#time-title").startswith("Conversations per batch")
    opened.assert_clean()


@pytest.mark.slow
def test_payloads_in_conversations_stay_text_and_never_run(opened, pipeline):
    page = opened.page
    # A payload as a metadata value: in the filter list, on a chip, in the breakdowns.
    opened.filter_by("model", PAYLOAD_TEXT)
    assert page.locator(".chip", has_text=PAYLOAD_TEXT).count() == 1
    assert page.locator("#breakdowns section[data-facet='model']", has_text=PAYLOAD_TEXT).count() == 1
    # The offline summary is an abstraction: the payload the user typed is not in it.
    [summary] = page.locator("#summaries li .text").all_text_contents()
    assert PAYLOAD_TEXT not in summary and "window.__pwned" not in summary
    # plotly's hover label shows the summary as text.
    index = json.loads(page.text_content("#explorer-data"))["conv"]["summary"].index(summary)
    # The mouse would reach the cluster's name label first: take the labels away, then hover.
    page.evaluate("() => Plotly.relayout('map', {annotations: []})")
    opened.hover_conversation(index)
    page.wait_for_selector(".hoverlayer .hovertext")
    assert summary.split(" · ")[0] in page.text_content(".hoverlayer")
    # Every hostile conversation's summary, listed as it was written, none with the markup.
    page.click("#clear-filters")
    opened.filter_by("topic", "hostile")
    summaries = pipeline["frames"]["conversation_summaries"]
    expected = summaries.filter(pl.col("chat_id").str.starts_with("hostile-"))["summary"].to_list()
    assert sorted(page.locator("#summaries li .text").all_text_contents()) == sorted(expected)
    assert not any("<img src=x onerror=" in s or "</script><script>" in s for s in expected)
    # The metadata key with markup became a facet, its name shown as text.
    assert page.locator("#breakdowns h4", has_text='<b onmouseover="window.').count() == 1
    page.keyboard.press("Escape")
    opened.assert_clean()


@pytest.mark.slow
def test_conversation_text_appears_only_when_allowed(browser, pipeline, tmp_path):
    frames = pipeline["frames"]
    shown = tmp_path / "shown.html"
    shown.write_text(render_explorer(dataset=DATASET, show_conversations=True, **frames), encoding="utf-8")
    opened = Opened(browser, shown)
    try:
        page = opened.page
        opened.filter_by("model", PAYLOAD_TEXT)
        page.get_by_role("button", name="show conversation").click()
        text = page.text_content("#summaries pre.conversation")
        assert text.startswith("user: " + PAYLOAD_TEXT)
        assert "assistant: Here is my answer to that. <img src=x onerror=" in text
        opened.assert_clean()
    finally:
        opened.close()
    hidden = Opened(browser, pipeline["page"])
    try:
        assert hidden.page.locator("text=show conversation").count() == 0
        assert (
            hidden.page.evaluate(
                "() => JSON.parse(document.getElementById('explorer-data').textContent).conv.text"
            )
            is None
        )
    finally:
        hidden.close()


@pytest.mark.slow
def test_without_webgl_the_map_is_drawn_in_svg(browser, pipeline, tmp_path):
    """Where WebGL fails (here: its code generation is forbidden), plotly's SVG scatter takes over."""
    html = pipeline["page"].read_text(encoding="utf-8")
    no_webgl = tmp_path / "no_webgl.html"
    no_webgl.write_text(html.replace(" 'unsafe-eval'", "", 1), encoding="utf-8")
    opened = Opened(browser, no_webgl)
    try:
        assert opened.attr("#map", "data-renderer") == "scatter"
        assert opened.page.locator("#map .scatterlayer .point").count() == 46
        opened.page.locator("#tree .node-row button.name").first.click()
        assert opened.attr("#map", "data-selected") != ""
        opened.assert_clean()
    finally:
        opened.close()


# ---------- the pure render function ----------


def test_script_json_cannot_close_its_script_element_or_break_a_line():
    text = script_json({"a": "</script><!-- & \u2028\u2029 >"})
    assert not re.search("[<>&\u2028\u2029]", text)
    assert json.loads(text) == {"a": "</script><!-- & \u2028\u2029 >"}


def test_the_page_embeds_hostile_names_as_escaped_json_only(tmp_path):
    frames = synthetic_frames(30, name="</script><script>window.__pwned=1</script>@@PLOTLY_JS@@")
    page = render_explorer(dataset="<b>x</b>", **frames)
    assert page.count("</script>") == 3  # the data block, plotly and the page's own script
    assert "<script>window.__pwned" not in page and "<b>x</b>" not in page
    assert "&lt;b&gt;x&lt;/b&gt; · kura explorer" in page  # the title, escaped
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "connect-src 'none'" in csp and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]


def test_facets_cover_summaries_metadata_and_properties_compactly():
    data = build_explorer_data(dataset="d", **synthetic_frames(500))
    facets = {f.name: f for f in data.facets}
    assert facets["language"].multi and set(facets["language"].values) <= {"english", "python", "sql"}
    assert facets["concerning score"].values == ["1", "2", "3", "4", "5"]
    assert facets["model"].group == "metadata" and facets["batch"].ordered
    characters = facets["conversation characters"]
    assert characters.ordered and len(characters.values) <= 8 and characters.values[0].startswith("<")
    assert "(no summary" not in " ".join(data.summaries)
    # Integers on one grid for both axes (the map keeps its proportions).
    assert max(data.x.max(), data.y.max()) == 10_000 and data.x.min() == data.y.min() == 0


def test_withheld_clusters_and_their_conversations_are_left_out_of_the_page():
    frames = synthetic_frames(400)
    clusters = frames["meta_clusters"]
    secret = clusters.filter(pl.col("level") == 1)["id"][0]  # a middle cluster: it and its children go
    frames["meta_clusters"] = clusters.with_columns(
        withheld=pl.col("id") == secret,
        name=pl.when(pl.col("id") == secret).then(pl.lit("Secret name")).otherwise("name"),
    )
    data = build_explorer_data(dataset="d", **frames)
    children = clusters.filter(pl.col("parent_id") == secret)["id"].to_list()
    gone = frames["projections"].filter(pl.col("cluster_ids").list.get(1) == secret)
    assert gone.height > 0 and secret not in data.cluster_ids
    assert not set(children) & set(data.cluster_ids)
    assert data.conversations == 400 - gone.height and data.withheld_conversations == gone.height
    page = render_html(data)
    summary_of = dict(frames["conversation_summaries"].select("chat_id", "summary").iter_rows())
    assert "Secret name" not in page and summary_of[gone["id"][0]] not in page
    assert f"{1 + len(children)} clusters with {gone.height} conversations are withheld" in page


@pytest.mark.slow
def test_100k_conversations_render_in_seconds_to_a_predictable_size():
    frames = synthetic_frames(100_000)
    started = time.monotonic()
    page = render_html(build_explorer_data(dataset="big", **frames))
    seconds = time.monotonic() - started
    megabytes = len(page.encode()) / 1e6
    print(f"100k conversations: {megabytes:.1f} MB in {seconds:.1f} s")
    assert megabytes < 40 and seconds < 60


# ---------- synthetic stage tables (the schemas of the real ones) ----------

WORDS = ["python", "sql", "recipe", "travel", "poem", "error", "query", "bake", "trip", "rhyme", "loop"]


def synthetic_frames(n: int, name: str | None = None, seed: int = 0) -> dict[str, pl.DataFrame]:
    """n conversations in about n/10 base clusters under a 3-level hierarchy, with facets,
    metadata and properties shaped like the real pipeline's tables."""
    rng = np.random.default_rng(seed)
    chat_ids = [f"c{i:06d}" for i in range(n)]
    n_base = max(1, n // 10)
    n_mid = max(1, n_base // 8)
    n_top = min(10, n_mid)
    base_of = rng.integers(0, n_base, n)
    mid_of_base = rng.integers(0, n_mid, n_base)
    top_of_mid = np.arange(n_mid) % n_top

    def clusters(prefix: str, count: int, level: int, parents: list[str | None]) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "id": [f"{prefix}{i}" for i in range(count)],
                "name": [name or f"{WORDS[i % len(WORDS)].title()} {i}" for i in range(count)],
                "description": [name or "About " + " ".join(rng.choice(WORDS, 12)) for _ in range(count)],
                "parent_id": parents,
                "level": [level] * count,
            },
            schema={k: CLUSTERS_SCHEMA[k] for k in ("id", "name", "description", "parent_id", "level")},
        )  # fmt: skip

    meta_clusters = pl.concat(
        [
            clusters("B", n_base, 0, [f"M{m}" for m in mid_of_base]),
            clusters("M", n_mid, 1, [f"T{t}" for t in top_of_mid]),
            clusters("T", n_top, 2, [None] * n_top),
        ]
    )
    top = top_of_mid[mid_of_base[base_of]]
    # Each cluster's conversations, at every level, as the real table holds them.
    members = pl.DataFrame(
        {
            "chat_id": chat_ids,
            "B": [f"B{b}" for b in base_of],
            "M": [f"M{mid_of_base[b]}" for b in base_of],
            "T": [f"T{t}" for t in top],
        }
    )
    chats_of = pl.concat(
        [members.group_by(level).agg(pl.col("chat_id").sort()).rename({level: "id"}) for level in "BMT"]
    )
    built = {
        "id",
        "name",
        "description",
        "parent_id",
        "level",
        "chat_ids",
        "count",
        "slug",
        "withheld",
        "previous_ids",
    }
    meta_clusters = (
        meta_clusters.join(chats_of, on="id", how="left", maintain_order="left")
        .with_columns(
            chat_ids=pl.col("chat_id").fill_null([]),
            count=pl.col("chat_id").list.len().fill_null(0),
            slug=pl.col("id").str.to_lowercase(),
            withheld=pl.lit(False),
        )
        .with_columns(previous_ids=pl.col("chat_ids").list.head(0))
        .select([pl.col(k) if k in built else pl.lit(None).alias(k) for k in CLUSTERS_SCHEMA])
        .cast(CLUSTERS_SCHEMA)
    )
    xy = rng.normal(0, 10, (n_top, 2))[top] + rng.normal(0, 2, (n, 2))
    # List columns built by polars expressions: Python lists of lists are slow to convert.
    projections = pl.DataFrame(
        {
            "kind": "conversation",
            "id": chat_ids,
            "x": xy[:, 0],
            "y": xy[:, 1],
            "base": [f"B{b}" for b in base_of],
            "mid": [f"M{mid_of_base[b]}" for b in base_of],
            "top": [f"T{t}" for t in top],
        }
    ).select(
        "kind", "id", "x", "y",
        level=pl.lit(None),
        cluster_ids=pl.concat_list("base", "mid", "top"),
    ).cast(PROJECTIONS_SCHEMA)  # fmt: skip
    words = np.array(WORDS)[rng.integers(0, len(WORDS), (n, 40))]
    texts = [
        "The user asked: " + " ".join(w[:k]) for w, k in zip(words, rng.integers(15, 40, n), strict=True)
    ]
    row = pl.int_range(pl.len())
    summaries = pl.DataFrame(
        {
            "chat_id": chat_ids,
            "summary": texts,
            "concerning_score": rng.integers(1, 6, n),
            "user_frustration": rng.integers(1, 6, n),
        }
    ).with_columns(
        languages=pl.concat_list(
            pl.lit("english"),
            pl.when(row % 3 == 0).then(pl.lit("python")),
            pl.when(row % 5 == 0).then(pl.lit("sql")),
        ).list.drop_nulls()
    )
    summaries = summaries.select(
        [
            pl.col(k).cast(t) if k in summaries.columns else pl.lit(None, t).alias(k)
            for k, t in SUMMARIES_SCHEMA.items()
        ]
    )

    def prop(name: str, values: Any, kind: str) -> pl.DataFrame:
        return pl.DataFrame({"chat_id": chat_ids, "name": [name] * n, "value": values, "type": [kind] * n})

    properties = pl.concat(
        [
            prop("metadata.model", rng.choice(["a-large", "a-small", "b"], n).tolist(), "str"),
            prop("metadata.batch", [f"2026-{1 + i * 6 // n:02d}" for i in range(n)], "str"),
            prop("conversation_characters", rng.lognormal(7, 1, n).astype(int).astype(str).tolist(), "int"),
            prop("message_count", (2 * rng.integers(1, 5, n)).astype(str).tolist(), "int"),
        ]
    ).cast(PROPERTIES_SCHEMA)
    message = pl.struct(role=pl.lit("user"), content="text", created_at=pl.lit(None, TIMESTAMP))
    raw = pl.DataFrame(
        {
            "chat_id": chat_ids,
            "created_at": pl.Series(rng.integers(0, 180 * 86_400, n) * 1_000_000).cast(pl.Duration("us")),
            "text": texts,
        }
    ).select(
        "chat_id",
        (pl.lit(datetime(2026, 1, 1, tzinfo=UTC)).cast(TIMESTAMP) + pl.col("created_at")).alias("created_at"),
        pl.concat_list(message).cast(CONVERSATIONS_SCHEMA["messages"]).alias("messages"),
        pl.lit("{}").alias("metadata"),
    )
    return {
        "conversation_summaries": summaries,
        "extracted_properties": properties,
        "meta_clusters": meta_clusters,
        "projections": projections,
        "raw_conversations": raw,
    }
