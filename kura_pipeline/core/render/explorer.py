"""The explorer: one self-contained HTML page per dataset to browse the cluster hierarchy.

The page carries its data as JSON inside `<script type="application/json">` (with `<`, `>`, `&`
and U+2028/2029 escaped) and its script builds every element with DOM APIs and `textContent`,
so text that came from conversations is always shown as text, never run as markup. plotly.js
from the `plotly` package is inlined: the file opens from disk with no server and no network,
and a Content-Security-Policy that lets only the page's own two scripts run keeps it so.

The data is column-wise (one array per field, clusters and facet values by index) to stay
compact: a conversation costs its summary plus a few small integers.

Cluster counts, shares and the withheld lines come from shown_tree, as in the terminal tree and
the Dagster UI; the page only counts, itself, which of its conversations match the filters.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import polars as pl

from kura_pipeline.core.backends import OFFLINE_LABEL
from kura_pipeline.core.calibration import JUDGEMENT_FACETS, NOT_ASSESSED, NOT_ASSESSED_OFFLINE
from kura_pipeline.core.frames import frame_to_clusters
from kura_pipeline.core.models import LOADER_BOOKKEEPING_KEYS
from kura_pipeline.core.render.map_png import hex_to_rgb, scatter_png, swatch_png
from kura_pipeline.core.render.markdown import escape_markdown
from kura_pipeline.core.render.shown import ShownTree, hidden_ids, shown_tree, withheld_line

# Top-level clusters take these colours in order of size (the same in the page and the PNG).
PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948",
    "#b07aa1", "#ff9da7", "#9c755f", "#2f4b7c", "#a0cbe8", "#8cd17d",
]  # fmt: skip
MAP_RESOLUTION = 10_000  # coordinates are stored as integers in [0, MAP_RESOLUTION]
MAX_FACET_VALUES = 40  # beyond this, the rarer values of a facet are counted as "(other)"
MAX_EXACT_NUMBERS = 12  # a numeric facet with more distinct values is shown in ranges
NUMBER_BINS = 8
CONVERSATION_CHARS = 4_000  # with show_conversations, each conversation is cut to this many characters
OTHER = "(other)"

# Clio's facets, from the summaries table: (column, label, multi-valued, numeric).
SUMMARY_FACETS = [
    ("languages", "language", True, False),
    ("task", "task", False, False),
    ("topic", "topic", False, False),
    ("concerning_score", "concerning score", False, True),
    ("user_frustration", "user frustration", False, True),
    ("assistant_errors", "assistant errors", True, False),
]
BATCH_PROPERTIES = ("batch", "metadata.batch")
# What the summaries' `backend` metadata says for the offline backend: only then is it the reason
# facets that need judgement are empty.
OFFLINE_BACKEND = OFFLINE_LABEL


def share_label(tree: ShownTree, count: int) -> str:
    """A cluster's share of all conversations, written as the terminal tree writes it."""
    return f"{tree.share(count):.1f}%"


@dataclass
class Facet:
    """One way to break conversations down: its values, and each conversation's value index
    (-1 when unset; a list of indices for multi-valued facets)."""

    name: str
    group: str  # "summary", "metadata", "property" or "conversation": where it came from
    values: list[str]
    codes: list[int] | list[list[int]]
    multi: bool = False
    ordered: bool = False  # numbers and batches keep their natural order

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "values": self.values,
            "codes": self.codes,
            "multi": self.multi,
            "ordered": self.ordered,
        }


@dataclass
class ExplorerData:
    """Everything the page shows, already aligned: conversation i is row i of every array."""

    dataset: str
    cluster_ids: list[str]
    cluster_names: list[str]
    cluster_descriptions: list[str]
    cluster_parents: list[int]
    cluster_levels: list[int]
    # All of each cluster's conversations (withheld descendants included) and its share of
    # `hierarchy_total`, from shown_tree: the same numbers as the terminal tree.
    cluster_counts: list[int]
    cluster_shares: list[str]
    # Conversations in withheld children, said as one line under the cluster (0: none).
    cluster_withheld: list[int]
    cluster_fallbacks: list[str | None]  # why an LLM run named or grouped it without the model
    x: np.ndarray
    y: np.ndarray
    base_cluster: np.ndarray  # each conversation's level-0 cluster (an index into the clusters)
    days: list[int | None]  # days since 1970-01-01 (UTC) of each conversation's start
    summaries: list[str]
    facets: list[Facet]
    chat_ids: list[str] | None = None  # only with show_conversations
    texts: list[str] | None = None  # only with show_conversations
    total_conversations: int = 0  # in the raw table, placed on the map or not
    hierarchy_total: int = 0  # in the hierarchy: what every share is a share of
    withheld_top: int = 0  # conversations in withheld top-level clusters
    withheld_clusters: int = 0
    withheld_conversations: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def conversations(self) -> int:
        return len(self.summaries)

    def top_of(self) -> np.ndarray:
        """Each cluster's top-level ancestor."""
        top = list(range(len(self.cluster_ids)))
        for c in range(len(top)):
            while self.cluster_parents[top[c]] >= 0:
                top[c] = self.cluster_parents[top[c]]
        return np.array(top, dtype=np.int64)

    def top_colours(self) -> dict[int, str]:
        """Top-level clusters coloured by rank of size (shown_tree's order), as in the page."""
        sizes = self.cluster_counts
        roots = [c for c, p in enumerate(self.cluster_parents) if p < 0]
        roots.sort(key=lambda c: (-sizes[c], self.cluster_names[c]))
        return {c: PALETTE[rank % len(PALETTE)] for rank, c in enumerate(roots)}

    def as_json(self) -> dict[str, Any]:
        def line(count: int) -> str | None:
            return withheld_line(count) if count else None

        return {
            "version": 2,
            "dataset": self.dataset,
            "total": self.hierarchy_total,
            "withheld": self.withheld_conversations,
            "withheldTop": self.withheld_top,
            "withheldTopLine": line(self.withheld_top),
            "palette": PALETTE,
            "clusters": {
                "id": self.cluster_ids,
                "name": self.cluster_names,
                "description": self.cluster_descriptions,
                "parent": self.cluster_parents,
                "level": self.cluster_levels,
                "count": self.cluster_counts,
                "share": self.cluster_shares,
                "withheld": self.cluster_withheld,
                "withheldLine": [line(k) for k in self.cluster_withheld],
                "fallback": self.cluster_fallbacks,
            },
            "conv": {
                "x": self.x.tolist(),
                "y": self.y.tolist(),
                "cluster": self.base_cluster.tolist(),
                "day": self.days,
                "summary": self.summaries,
                "id": self.chat_ids,
                "text": self.texts,
            },
            "facets": [f.as_json() for f in self.facets],
            "notes": self.notes,
        }


def build_explorer_data(
    *,
    dataset: str,
    conversation_summaries: pl.DataFrame,
    extracted_properties: pl.DataFrame,
    meta_clusters: pl.DataFrame,
    projections: pl.DataFrame,
    raw_conversations: pl.DataFrame,
    show_conversations: bool = False,
    backend: str | None = None,
    user_id_field: str = "user_id",
) -> ExplorerData:
    """Align the stages' tables on the conversations placed on the map.

    Withheld clusters (below the privacy threshold), what hangs below them and their
    conversations are left out of the data entirely, not just hidden: the page is a file anyone
    holding it can read. Only their number is said, as the terminal tree says it (shown_tree).
    `backend` is the summaries' `backend` metadata, when known. The user id
    (`metadata.<user_id_field>`) is never a breakdown: it would let a reader pick out one person.
    """
    if "withheld" in meta_clusters.columns:  # a null there means not withheld, as it always has
        meta_clusters = meta_clusters.with_columns(pl.col("withheld").fill_null(False))
    every_cluster = frame_to_clusters(meta_clusters)
    tree = shown_tree(every_cluster)
    hidden = hidden_ids(every_cluster)
    shown = sorted((c for c in every_cluster if c.id not in hidden), key=lambda c: (c.level, c.id))
    cluster_ids = [c.id for c in shown]
    index_of = {cid: i for i, cid in enumerate(cluster_ids)}
    parents = [-1 if c.parent_id is None else index_of.get(c.parent_id, -1) for c in shown]

    placed = projections.filter(
        (pl.col("kind") == "conversation") & (pl.col("cluster_ids").list.len() > 0)
    ).with_columns(pl.col("cluster_ids").list.first().alias("base"))
    points = placed.filter(pl.col("base").is_in(cluster_ids))
    withheld_placed = placed.filter(pl.col("base").is_in(list(hidden))).height
    chat_ids = points["id"].to_list()
    order = pl.DataFrame({"chat_id": chat_ids}, schema={"chat_id": pl.String}).with_row_index("row")

    summaries = order.join(conversation_summaries, on="chat_id", how="left", maintain_order="left")
    raw = order.join(raw_conversations, on="chat_id", how="left", maintain_order="left")
    summary_texts = [
        s if s else f"(no summary: {reason or 'missing'})"
        for s, reason in zip(
            summaries["summary"].to_list(), summaries["failure_reason"].to_list(), strict=True
        )
    ]
    offline = backend == OFFLINE_BACKEND
    not_assessed_value = NOT_ASSESSED_OFFLINE if offline else NOT_ASSESSED
    facets, missing, not_assessed = _summary_facets(summaries, not_assessed_value)
    properties = _property_facets(order, extracted_properties, private={user_id_field})
    # A dataset's own metadata key may share a summary facet's name (`topic`): two facets of one
    # name cannot be told apart in the filter list, so the summary's says where it comes from.
    taken = {f.name for f in properties}
    for facet in facets:
        if facet.name in taken:
            facet.name = f"summary {facet.name}"
    facets += properties
    batch = _batch_facet(raw, facets)
    if batch is not None:
        facets.insert(0, batch)

    notes = []
    if missing:
        note = f"Not filled for this dataset: {', '.join(missing)}."
        if backend == OFFLINE_BACKEND:
            # Only a run known to be offline is blamed: an LLM run can leave a facet empty too.
            note += (
                " The offline backend leaves facets that need judgement empty rather than guess;"
                " configure an LLM to fill them."
            )
        notes.append(note)
    if not_assessed and offline:
        notes.append(
            f"{', '.join(not_assessed).capitalize()}: {NOT_ASSESSED_OFFLINE}. The offline backend does "
            "not judge concerning content or frustration; an LLM that passes the facet calibration "
            "(benign and concerning requests it must rate right) does."
        )
    elif not_assessed:
        notes.append(
            f"{', '.join(not_assessed).capitalize()}: {NOT_ASSESSED}. The model that wrote the summaries "
            "did not pass the facet calibration (benign and concerning requests it must rate right), "
            "so its ratings are not shown; see facet_calibration in the summaries' metadata."
        )
    fallbacks = [c.fallback for c in shown]
    if any(fallbacks):
        marked = sum(1 for f in fallbacks if f)
        notes.append(
            f"{marked} of the {len(shown)} clusters shown {'was' if marked == 1 else 'were'} named or "
            "grouped without the LLM "
            "(its answer could not be used); they are marked in the tree."
        )
    if hidden:
        notes.append(
            f"{len(hidden)} clusters with {tree.withheld_conversations} conversations are withheld "
            "(below the privacy threshold) and left out of this page."
        )
    unplaced = raw_conversations.height - len(chat_ids) - withheld_placed
    if unplaced > 0:
        notes.append(
            f"{unplaced} of {raw_conversations.height} conversations are not on the map "
            "(no summary or no cluster)."
        )

    texts = None
    if show_conversations:
        texts = [_conversation_text(messages) for messages in raw["messages"].to_list()]
    x, y = _scaled(points["x"].to_numpy(), points["y"].to_numpy())
    return ExplorerData(
        dataset=dataset,
        cluster_ids=cluster_ids,
        cluster_names=[c.name for c in shown],
        cluster_descriptions=[c.description for c in shown],
        cluster_parents=parents,
        cluster_levels=[c.level for c in shown],
        cluster_counts=[c.count for c in shown],
        cluster_shares=[share_label(tree, c.count) for c in shown],
        cluster_withheld=[tree.withheld_under.get(c.id, 0) for c in shown],
        cluster_fallbacks=[c.fallback or None for c in shown],
        x=x,
        y=y,
        base_cluster=np.array([index_of[b] for b in points["base"].to_list()], dtype=np.int64),
        days=raw.select(pl.col("created_at").dt.epoch("d"))["created_at"].to_list(),
        summaries=summary_texts,
        facets=facets,
        chat_ids=chat_ids if show_conversations else None,
        texts=texts,
        total_conversations=raw_conversations.height,
        hierarchy_total=tree.total,
        withheld_top=tree.withheld_under.get(None, 0),
        withheld_clusters=len(hidden),
        withheld_conversations=tree.withheld_conversations,
        notes=notes,
    )


def _scaled(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integers in [0, MAP_RESOLUTION], the same scale on both axes: shorter than floats in JSON."""
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    x = np.nan_to_num(x.astype(np.float64))
    y = np.nan_to_num(y.astype(np.float64))
    span = max(float(np.ptp(x)), float(np.ptp(y))) or 1.0
    return (
        np.rint((x - x.min()) / span * MAP_RESOLUTION).astype(np.int64),
        np.rint((y - y.min()) / span * MAP_RESOLUTION).astype(np.int64),
    )


def _conversation_text(messages: list[dict[str, Any]] | None) -> str:
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages or [])
    return text if len(text) <= CONVERSATION_CHARS else text[:CONVERSATION_CHARS] + " …"


def _summary_facets(
    summaries: pl.DataFrame, not_assessed_value: str = NOT_ASSESSED
) -> tuple[list[Facet], list[str], list[str]]:
    """The summary facets, the labels of those never filled, and of the judgement facets a
    model left not assessed (it failed the facet calibration, or there was no model)."""
    facets, missing, not_assessed = [], [], []
    assessed = summaries["facets_assessed"].to_list() if "facets_assessed" in summaries.columns else []
    for column, label, multi, numeric in SUMMARY_FACETS:
        if column not in summaries.columns:
            continue
        values = summaries[column].to_list()
        if column in JUDGEMENT_FACETS and False in assessed:
            # Said as a value, not left blank: a reader sees the model was not trusted to judge.
            facet = _categorical_facet(
                label,
                "summary",
                [
                    not_assessed_value if a is False else None if v is None else _number(v)
                    for v, a in zip(values, assessed, strict=True)
                ],
                ordered=True,
            )
            not_assessed.append(label)
        elif multi:
            facet = _multi_facet(label, "summary", values)
        elif numeric:
            facet = _numeric_facet(label, "summary", values)
        else:
            facet = _categorical_facet(label, "summary", values)
        if facet is None:
            missing.append(label)
        else:
            facets.append(facet)
    return facets, missing, not_assessed


def _property_facets(
    order: pl.DataFrame, properties: pl.DataFrame, private: set[str] | None = None
) -> list[Facet]:
    """One facet per extracted property: metadata keys (`metadata.model`) and extractor outputs.
    A loader's bookkeeping keys (how a record was put together) say nothing about usage: they
    stay in the tables and are not offered as breakdowns."""
    facets = []
    bookkeeping = [f"metadata.{key}" for key in sorted(LOADER_BOOKKEEPING_KEYS | (private or set()))]
    properties = properties.filter(~pl.col("name").is_in(bookkeeping))
    joined = properties.join(order, on="chat_id", how="inner").unique(
        ["row", "name"], keep="first", maintain_order=True
    )
    for name in sorted(joined["name"].unique().to_list()):
        rows = joined.filter(pl.col("name") == name)
        aligned: list[Any] = [None] * order.height
        types = {t for t, v in zip(rows["type"], rows["value"], strict=True) if v is not None}
        numeric = bool(types) and types <= {"int", "float"}
        for row, value in zip(rows["row"].to_list(), rows["value"].to_list(), strict=True):
            aligned[row] = float(value) if numeric and value is not None else value
        group = "metadata" if name.startswith("metadata.") else "property"
        label = name.removeprefix("metadata.").replace("_", " ")
        if numeric:
            facet = _numeric_facet(label, group, aligned)
        else:
            ordered = name in BATCH_PROPERTIES
            facet = _categorical_facet(label, group, aligned, ordered=ordered)
        if facet is not None:
            facets.append(facet)
    return facets


def _batch_facet(raw: pl.DataFrame, facets: list[Facet]) -> Facet | None:
    """The batch each conversation came with, from the raw table, when there is more than one
    (a `batch` metadata key or property is already a facet of its own)."""
    if "batch" not in raw.columns or any(f.name == "batch" for f in facets):
        return None
    batches = raw["batch"].to_list()
    if len({b for b in batches if b is not None}) < 2:
        return None
    return _categorical_facet("batch", "conversation", batches, ordered=True)


def _categorical_facet(name: str, group: str, values: list[Any], ordered: bool = False) -> Facet | None:
    text = [None if v is None or v == "" else str(v) for v in values]
    counts = Counter(v for v in text if v is not None)
    if not counts:
        return None
    ranked = sorted(counts) if ordered else sorted(counts, key=lambda v: (-counts[v], v))
    kept = ranked[:MAX_FACET_VALUES]
    index = {v: i for i, v in enumerate(kept)}
    other = len(kept)
    codes = [-1 if v is None else index.get(v, other) for v in text]
    labels = kept + ([OTHER] if len(ranked) > len(kept) else [])
    return Facet(name, group, labels, codes, ordered=ordered)


def _multi_facet(name: str, group: str, values: list[list[str] | None]) -> Facet | None:
    lists = [[v for v in (vs or []) if v] for vs in values]
    counts = Counter(v for vs in lists for v in set(vs))
    if not counts:
        return None
    ranked = sorted(counts, key=lambda v: (-counts[v], v))
    kept = ranked[:MAX_FACET_VALUES]
    index = {v: i for i, v in enumerate(kept)}
    other = len(kept)
    codes = [sorted({index.get(v, other) for v in vs}) for vs in lists]
    labels = kept + ([OTHER] if len(ranked) > len(kept) else [])
    return Facet(name, group, labels, codes, multi=True)


def _numeric_facet(name: str, group: str, values: list[float | None]) -> Facet | None:
    """Few distinct numbers stay as they are; many are put in ranges of about equal counts."""
    numbers = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    known = np.isfinite(numbers)
    if not known.any():
        return None
    distinct = np.unique(numbers[known])
    if distinct.size <= MAX_EXACT_NUMBERS:
        labels = [_number(v) for v in distinct]
        codes = np.searchsorted(distinct, numbers)
    else:
        quantiles = np.quantile(numbers[known], np.linspace(0, 1, NUMBER_BINS + 1))
        edges = np.unique([_round_significant(q) for q in quantiles])
        inner = edges[1:-1]  # range i holds inner[i-1] <= value < inner[i]
        if inner.size:
            labels = [f"< {_number(inner[0])}"]
            labels += [f"{_number(a)}–{_number(b)}" for a, b in zip(inner[:-1], inner[1:], strict=True)]
            labels += [f"≥ {_number(inner[-1])}"]
        else:
            labels = [f"{_number(edges[0])}–{_number(edges[-1])}"]
        codes = np.searchsorted(inner, numbers, side="right")
    return Facet(name, group, labels, np.where(known, codes, -1).tolist(), ordered=True)


def _round_significant(value: float, digits: int = 2) -> float:
    if value == 0 or not np.isfinite(value):
        return float(value)
    return float(round(value, digits - 1 - int(np.floor(np.log10(abs(value))))))


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


# ---- the page ----

_PLACEHOLDER = re.compile(r"@@(TITLE|CSP|PLOTLY_JS|EXPLORER_JS|DATA_JSON)@@")
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(payload: Any) -> str:
    """JSON that is safe inside a <script> element: no `</script>`, `<!--` or line separators
    can appear, because every `<`, `>`, `&`, U+2028 and U+2029 is written as a \\u escape."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _JSON_ESCAPES[m.group(0)], text)


@cache
def _asset_text(name: str) -> str:
    return resources.files("kura_pipeline.core.render").joinpath(name).read_text(encoding="utf-8")


@cache
def plotly_js() -> str:
    """plotly.js as shipped inside the `plotly` Python package."""
    text = resources.files("plotly").joinpath("package_data", "plotly.min.js").read_text(encoding="utf-8")
    return _script_safe(text)


def _script_safe(code: str) -> str:
    # Inline code must not close its own <script> element early.
    return re.sub(r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE)


def _csp(*scripts: str) -> str:
    """Only the page's own scripts run (by hash, so an injected handler could not), and nothing
    is fetched: no connections, images only from data: and blob: URLs."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts
    )
    # plotly's WebGL traces (regl) compile their drawing code with `new Function`.
    return (
        f"default-src 'none'; script-src {hashes} 'unsafe-eval'; style-src 'unsafe-inline'; "
        "img-src data: blob:; font-src data:; worker-src blob:; connect-src 'none'; "
        "base-uri 'none'; form-action 'none'"
    )


def render_html(data: ExplorerData) -> str:
    """The self-contained page for already aligned data."""
    plotly, app = plotly_js(), _script_safe(_asset_text("explorer.js"))
    parts = {
        "TITLE": html.escape(f"{data.dataset} · kura explorer"),
        "CSP": html.escape(_csp(plotly, app), quote=False),  # our own text, with no double quote
        "PLOTLY_JS": plotly,
        "EXPLORER_JS": app,
        "DATA_JSON": script_json(data.as_json()),
    }
    # One pass over the template: inserted text is never searched for placeholders again.
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], _asset_text("explorer.html"))


def render_explorer(
    *,
    dataset: str,
    conversation_summaries: pl.DataFrame,
    extracted_properties: pl.DataFrame,
    meta_clusters: pl.DataFrame,
    projections: pl.DataFrame,
    raw_conversations: pl.DataFrame,
    show_conversations: bool = False,
) -> str:
    """The explorer page for one dataset, from its stages' tables (no Dagster involved)."""
    return render_html(
        build_explorer_data(
            dataset=dataset,
            conversation_summaries=conversation_summaries,
            extracted_properties=extracted_properties,
            meta_clusters=meta_clusters,
            projections=projections,
            raw_conversations=raw_conversations,
            show_conversations=show_conversations,
        )
    )


# ---- for the Dagster UI ----


def map_png(data: ExplorerData, width: int = 560, height: int = 360) -> bytes:
    """The map as a small PNG, conversations coloured by top-level cluster as in the page."""
    top, colours = data.top_of(), data.top_colours()
    rgb = np.array([hex_to_rgb(colours[int(t)]) for t in top], dtype=np.uint8).reshape(-1, 3)
    point_colours = rgb[data.base_cluster] if data.conversations else np.zeros((0, 3), np.uint8)
    dot = 3 if data.conversations < 2_000 else 2 if data.conversations < 20_000 else 1
    return scatter_png(data.x, data.y, point_colours, width, height, dot=dot)


def png_markdown(png: bytes, alt: str) -> str:
    return f"![{escape_markdown(alt)}](data:image/png;base64,{base64.b64encode(png).decode()})"


def top_clusters_markdown(data: ExplorerData, limit: int = 15) -> str:
    """The top-level clusters (biggest first, with their map colour) as a markdown table, with
    the counts and shares of the terminal tree and the page (withheld ones as one line)."""
    colours = data.top_colours()
    lines = ["| | cluster | conversations | share of all | children |", "|---|---|---|---|---|"]
    children = Counter(p for p in data.cluster_parents if p >= 0)
    for c, colour in list(colours.items())[:limit]:
        lines.append(
            f"| {png_markdown(swatch_png(colour), colour)} | {escape_markdown(data.cluster_names[c])} "
            f"| {data.cluster_counts[c]} | {data.cluster_shares[c]} | {children[c]} |"
        )
    if len(colours) > limit:
        rest = sum(data.cluster_counts[c] for c in list(colours)[limit:])
        lines.append(f"| | … and {len(colours) - limit} more | {rest} | | |")
    if data.withheld_top:
        lines.append(f"| | {withheld_line(data.withheld_top)} | {data.withheld_top} | | |")
    if data.hierarchy_total:  # what the shares are shares of, so the column visibly adds up
        lines.append(f"| | **all conversations** | {data.hierarchy_total} | 100.0% | |")
    return "\n".join(lines)
