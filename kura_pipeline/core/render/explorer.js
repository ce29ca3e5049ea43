/* The explorer page: reads the JSON data block, then draws the cluster tree, the map, the
 * time chart and the detail panel, and keeps them in step with one shared state.
 *
 * Every string from the data reaches the page through textContent or DOM properties, never
 * as markup. plotly reads a little HTML in its labels, so strings handed to plotly are
 * entity-escaped first (esc).
 *
 * Cluster sizes and shares come from the data (Python's shown_tree), not from the conversations
 * in the page: a cluster counts all its conversations, withheld ones included, so the page
 * says the same numbers as the terminal tree. Only what filters match is counted here.
 */
(function () {
  "use strict";

  const D = JSON.parse(document.getElementById("explorer-data").textContent);
  const C = D.clusters;
  const V = D.conv;
  const FACETS = D.facets;
  const nC = C.id.length;
  const n = V.x.length;
  const PAGE = 30; // summaries shown at a time
  const BREAKDOWN_ROWS = 8;
  const MAX_SERIES = 8; // series in the time chart; the rest are summed as "other"
  const MAX_LABELS = 12; // cluster names written on the map (the biggest ones)
  const FADED = "rgba(160,160,160,0.28)";

  // ---------- the hierarchy ----------
  const children = Array.from({ length: nC }, () => []);
  const roots = [];
  for (let c = 0; c < nC; c++) (C.parent[c] < 0 ? roots : children[C.parent[c]]).push(c);
  // A depth-first numbering: conversation i is in cluster c when the number of its base
  // cluster lies in [tin[c], tout[c]); a membership test is then two comparisons.
  const tin = new Int32Array(nC), tout = new Int32Array(nC), topOf = new Int32Array(nC);
  let clock = 0;
  const stack = roots.map((r) => [r, r, false]).reverse();
  while (stack.length) {
    const [c, top, done] = stack.pop();
    if (done) { tout[c] = clock; continue; }
    tin[c] = clock++; topOf[c] = top;
    stack.push([c, top, true]);
    for (let k = children[c].length - 1; k >= 0; k--) stack.push([children[c][k], top, false]);
  }
  const baseTin = new Int32Array(n), convTop = new Int32Array(n);
  for (let i = 0; i < n; i++) { baseTin[i] = tin[V.cluster[i]]; convTop[i] = topOf[V.cluster[i]]; }
  const inCluster = (i, c) => baseTin[i] >= tin[c] && baseTin[i] < tout[c];
  const byLevel = Array.from({ length: nC }, (_, c) => c).sort((a, b) => C.level[a] - C.level[b]);
  const totals = C.count; // all of a cluster's conversations, withheld descendants included
  // Conversations below a cluster that are in withheld clusters, hence not in this page.
  const withheldBelow = Int32Array.from(C.withheld);
  for (const c of byLevel) if (C.parent[c] >= 0) withheldBelow[C.parent[c]] += withheldBelow[c];
  // Top-level clusters keep one colour each, by rank of size (as in the PNG of the Dagster UI).
  const rootsBySize = roots.slice().sort((a, b) => totals[b] - totals[a] || cmp(C.name[a], C.name[b]));
  const colourOf = new Array(nC);
  rootsBySize.forEach((r, rank) => { colourOf[r] = D.palette[rank % D.palette.length]; });
  // While a cluster with children is selected, its children take their own colours on the map,
  // in the time chart, the tree and the detail panel; everything else keeps its top-level colour.
  let colours = new Map();
  function updateColours() {
    colours = new Map();
    const s = state.selected;
    if (s >= 0 && children[s].length) sortedBySize(children[s]).forEach((c, j) => colours.set(c, D.palette[j % D.palette.length]));
  }
  const colourFor = (c) => colours.get(c) || colourOf[topOf[c]];
  const pathOf = (c) => { const p = []; for (; c >= 0; c = C.parent[c]) p.unshift(c); return p; };

  // ---------- state ----------
  const state = { selected: -1, filters: new Map(), expanded: new Set(), shown: PAGE, timeMode: "date", open: new Set() };
  const match = new Uint8Array(n).fill(1);
  let matchCount = n;
  const counts = new Int32Array(nC);
  let overall = null; // per facet, value counts over all matching conversations
  const batchFacet = FACETS.findIndex((f) => f.name === "batch" && f.ordered);

  // ---------- small helpers ----------
  function cmp(a, b) { return a < b ? -1 : a > b ? 1 : 0; }
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function esc(text) { // for plotly labels only: it reads <b>, <br>, <a> and entities
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }
  function cut(text, limit) { text = String(text); return text.length > limit ? text.slice(0, limit - 1) + "…" : text; }
  function pct(part, whole) {
    if (!whole) return "0%";
    const p = (100 * part) / whole;
    return (p > 0 && p < 0.1 ? "<0.1" : p >= 10 ? p.toFixed(0) : p.toFixed(1)) + "%";
  }
  const fmt = (x) => x.toLocaleString("en-US");
  const filtered = () => state.filters.size > 0;
  // A cluster's size, the same words in the tree, the detail panel and on the map; its share is
  // always of all conversations, so a filter never changes it.
  function sizeText(c) {
    return (filtered() ? `${fmt(counts[c])} of ${fmt(totals[c])} match` : fmt(totals[c])) + ` · ${C.share[c]}`;
  }
  function plural(k, one, many) { return `${fmt(k)} ${k === 1 ? one : many}`; }
  function dayString(day) { return new Date(day * 86400000).toISOString().slice(0, 10); }
  function valueLabel(f, code) { return code < 0 ? "(not set)" : FACETS[f].values[code]; }
  function hasValue(f, i, code) {
    const v = FACETS[f].codes[i];
    if (FACETS[f].multi) return code < 0 ? v.length === 0 : v.includes(code);
    return v === code;
  }

  // Counts per cluster: base clusters from the conversations, parents from their children.
  function aggregate(target, mask) {
    target.fill(0);
    for (let i = 0; i < n; i++) if (!mask || mask[i]) target[V.cluster[i]]++;
    for (const c of byLevel) if (C.parent[c] >= 0) target[C.parent[c]] += target[c];
  }

  function applyFilters() {
    const active = [...state.filters.entries()];
    matchCount = 0;
    for (let i = 0; i < n; i++) {
      let ok = 1;
      for (const [f, codes] of active) {
        let any = false;
        for (const code of codes) if (hasValue(f, i, code)) { any = true; break; }
        if (!any) { ok = 0; break; }
      }
      match[i] = ok; matchCount += ok;
    }
    aggregate(counts, match);
    overall = FACETS.map((_, f) => valueCounts(f, null));
  }

  // Value counts of facet f over the matching conversations (of cluster c, if c >= 0).
  function valueCounts(f, members) {
    const facet = FACETS[f];
    const out = new Int32Array(facet.values.length + 1); // the last slot counts "not set"
    const unset = facet.values.length;
    const visit = (i) => {
      const v = facet.codes[i];
      if (facet.multi) { if (v.length === 0) out[unset]++; else for (const code of v) out[code]++; }
      else out[v < 0 ? unset : v]++;
    };
    if (members) members.forEach(visit);
    else for (let i = 0; i < n; i++) if (match[i]) visit(i);
    return out;
  }

  function membersOf(c) {
    const out = [];
    for (let i = 0; i < n; i++) if (match[i] && (c < 0 || inCluster(i, c))) out.push(i);
    return out;
  }

  // ---------- actions ----------
  function select(c, from) {
    state.selected = c;
    state.shown = PAGE;
    state.open.clear();
    if (c >= 0) for (const a of pathOf(c).slice(0, -1)) state.expanded.add(a);
    if (c >= 0 && from === "tree" && (children[c].length || C.withheld[c])) state.expanded.add(c);
    renderAll();
    if (c >= 0 && from !== "tree") {
      const row = document.querySelector(`#tree .node-row[data-index="${c}"]`);
      if (row) row.scrollIntoView({ block: "nearest" });
    }
  }

  function toggleFilter(f, code) {
    const codes = state.filters.get(f) || new Set();
    if (codes.has(code)) codes.delete(code); else codes.add(code);
    if (codes.size) state.filters.set(f, codes); else state.filters.delete(f);
    state.shown = PAGE;
    applyFilters();
    renderAll();
  }

  // A click on the map: drill into the selection, or move to the point's cluster at the
  // level where its path leaves the selected one.
  function clickedConversation(i) {
    const path = pathOf(V.cluster[i]);
    const sel = state.selected < 0 ? [] : pathOf(state.selected);
    let k = 0;
    while (k < sel.length && sel[k] === path[k]) k++;
    select(k < path.length ? path[k] : state.selected, "map");
  }

  // ---------- the header and filters ----------
  function renderHeader() {
    document.getElementById("title").textContent = `Explorer · ${D.dataset}`;
    document.title = `${D.dataset} · kura explorer`;
    const levels = new Set(C.level).size;
    document.getElementById("stats").textContent =
      `${fmt(D.total)} conversations · ${fmt(roots.length)} top-level clusters · ${fmt(nC)} clusters in ${levels} level${levels === 1 ? "" : "s"}` +
      (D.withheld ? ` · ${fmt(D.withheld)} of the conversations are in clusters too small or too specific to show` : "");
    const facetSelect = document.getElementById("facet-select");
    facetSelect.replaceChildren(new Option("by…", ""));
    const groups = new Map();
    FACETS.forEach((facet, f) => {
      if (!groups.has(facet.group)) groups.set(facet.group, []);
      groups.get(facet.group).push([facet.name, f]);
    });
    for (const [group, items] of groups) {
      const og = document.createElement("optgroup");
      og.label = group;
      for (const [name, f] of items) og.append(new Option(name, String(f)));
      facetSelect.append(og);
    }
    facetSelect.addEventListener("change", renderValueSelect);
    document.getElementById("value-select").addEventListener("change", (event) => {
      const f = Number(facetSelect.value), code = Number(event.target.value);
      if (event.target.value === "" || facetSelect.value === "") return;
      facetSelect.value = "";
      renderValueSelect();
      if (!(state.filters.get(f) || new Set()).has(code)) toggleFilter(f, code);
    });
    document.getElementById("clear-filters").addEventListener("click", () => {
      state.filters.clear(); applyFilters(); renderAll();
    });
  }

  function renderValueSelect() {
    const f = document.getElementById("facet-select").value;
    const valueSelect = document.getElementById("value-select");
    valueSelect.replaceChildren(new Option(f === "" ? "value…" : "choose a value…", ""));
    valueSelect.disabled = f === "";
    if (f === "") return;
    const facet = FACETS[Number(f)], tally = valueCounts(Number(f), null);
    const codes = facet.values.map((_, code) => code);
    if (!facet.ordered) codes.sort((a, b) => tally[b] - tally[a]);
    if (tally[facet.values.length]) codes.push(-1);
    for (const code of codes) {
      const count = tally[code < 0 ? facet.values.length : code];
      valueSelect.append(new Option(`${valueLabel(Number(f), code)} (${fmt(count)})`, String(code)));
    }
  }

  function renderFilters() {
    const chips = document.getElementById("chips");
    chips.replaceChildren();
    for (const [f, codes] of state.filters) {
      for (const code of codes) {
        const chip = el("span", "chip");
        chip.dataset.facet = FACETS[f].name;
        chip.append(el("span", "", `${FACETS[f].name}: ${valueLabel(f, code)}`));
        const remove = el("button", "", "×");
        remove.title = "Remove this filter";
        remove.addEventListener("click", () => toggleFilter(f, code));
        chip.append(remove);
        chips.append(chip);
      }
    }
    document.getElementById("clear-filters").hidden = state.filters.size === 0;
    // Withheld conversations are not in the page, so filters cannot look at them: said, not hidden.
    document.getElementById("filter-status").textContent = state.filters.size
      ? `showing ${fmt(matchCount)} of ${fmt(D.total)} conversations` +
        (D.withheld ? ` (filters apply to the ${fmt(n)} in this page, not to the ${fmt(D.withheld)} in withheld clusters)` : "")
      : `all ${fmt(D.total)} conversations`;
  }

  // ---------- the tree ----------
  // Biggest first, as the terminal tree orders them; by matches while a filter is on.
  function sortedBySize(list) {
    const first = filtered() ? counts : totals;
    return list.slice().sort((a, b) => first[b] - first[a] || totals[b] - totals[a] || cmp(C.name[a], C.name[b]));
  }

  // The one line that stands for a parent's withheld children (or withheld top-level clusters).
  function withheldItem(line, count) {
    const li = el("li", "withheld-line", line);
    li.dataset.count = String(count);
    return li;
  }

  // A guard's reason already says what was done without the model ("named/described without
  // the LLM: ..."); an older reason gets the prefix.
  function fallbackText(c) {
    const reason = C.fallback[c];
    return /^(named|described) without the LLM/.test(reason) ? reason : `named without the LLM: ${reason}`;
  }

  function renderTree() {
    document.getElementById("tree-hint").textContent = (filtered()
      ? "conversations matching the filters, of each cluster's conversations"
      : "conversations") + ` · share of all ${fmt(D.total)} conversations`;
    const list = document.getElementById("tree");
    list.replaceChildren(...sortedBySize(roots).map((c) => treeNode(c)));
    if (D.withheldTop) list.append(withheldItem(D.withheldTopLine, D.withheldTop));
  }

  function treeNode(c) {
    const li = el("li");
    li.setAttribute("role", "treeitem");
    const kids = children[c];
    const open = state.expanded.has(c);
    const expandable = kids.length > 0 || C.withheld[c] > 0; // the withheld line is inside too
    if (expandable) li.setAttribute("aria-expanded", String(open));
    const row = el("div", "node-row");
    row.dataset.index = String(c);
    row.dataset.cluster = C.id[c];
    row.dataset.count = String(filtered() ? counts[c] : totals[c]);
    row.dataset.total = String(totals[c]);
    row.dataset.share = C.share[c];
    if (c === state.selected) row.classList.add("selected");
    if ((filtered() ? counts[c] : totals[c]) === 0) row.classList.add("empty");
    const toggle = el("button", "toggle", expandable ? (open ? "▾" : "▸") : "");
    if (expandable) {
      toggle.setAttribute("aria-label", open ? "Collapse" : "Expand");
      toggle.addEventListener("click", () => {
        if (open) state.expanded.delete(c); else state.expanded.add(c);
        renderTree();
      });
    }
    const swatch = el("span", "swatch");
    swatch.style.background = colourFor(c);
    const name = el("button", "name", C.name[c]);
    name.title = C.description[c];
    name.addEventListener("click", () => select(c, "tree"));
    const mark = el("span", "fallback-mark", C.fallback[c] ? "no LLM" : "");
    if (C.fallback[c]) mark.title = fallbackText(c);
    const size = el("span", "size", sizeText(c));
    row.append(toggle, swatch, name, mark, size);
    li.append(row);
    if (expandable && open) {
      const sub = el("ul");
      sub.setAttribute("role", "group");
      sub.append(...sortedBySize(kids).map((k) => treeNode(k)));
      if (C.withheld[c]) sub.append(withheldItem(C.withheldLine[c], C.withheld[c]));
      li.append(sub);
    }
    return li;
  }

  // ---------- the map ----------
  const mapDiv = document.getElementById("map");
  const webgl = (() => {
    try { return !!document.createElement("canvas").getContext("webgl"); } catch (e) { return false; }
  })();
  let pointType = webgl ? "scattergl" : "scatter";
  const markerSize = n < 1000 ? 7 : n < 10000 ? 5 : n < 50000 ? 3 : 2;
  let hoverText = null;
  function hoverOf(i) {
    if (!hoverText) hoverText = new Array(n);
    if (hoverText[i] === undefined) {
      hoverText[i] = `<b>${esc(cut(C.name[V.cluster[i]], 60))}</b><br>${esc(cut(V.summary[i], 110))}`;
    }
    return hoverText[i];
  }

  function labelled() {
    const s = state.selected;
    if (s < 0) return roots;
    return children[s].length ? children[s] : [s];
  }

  function renderMap() {
    const s = state.selected;
    const out = { x: [], y: [] };
    const per = new Map(rootsBySize.map((r) => [r, { x: [], y: [], text: [], ids: [] }]));
    const groups = s < 0 ? [] : sortedBySize(labelled());
    const chosen = new Map(groups.map((c) => [c, { x: [], y: [], text: [], ids: [] }]));
    let selectedPoints = 0;
    for (let i = 0; i < n; i++) {
      if (!match[i]) { out.x.push(V.x[i]); out.y.push(V.y[i]); continue; }
      let t = per.get(convTop[i]);
      if (s >= 0 && inCluster(i, s)) {
        selectedPoints++;
        for (const c of groups) if (inCluster(i, c)) { t = chosen.get(c); break; }
      }
      t.x.push(V.x[i]); t.y.push(V.y[i]); t.text.push(hoverOf(i)); t.ids.push(i);
    }
    const traces = [{
      type: pointType, mode: "markers", name: "filtered out", x: out.x, y: out.y, hoverinfo: "skip",
      showlegend: false, marker: { size: Math.max(2, markerSize - 2), color: "rgba(190,190,190,0.35)" },
    }];
    for (const [r, t] of per) {
      traces.push({
        type: pointType, mode: "markers", name: esc(cut(C.name[r], 38)), x: t.x, y: t.y, text: t.text,
        customdata: t.ids, hoverinfo: "text", meta: r, legendgroup: String(r),
        marker: { size: markerSize, color: s >= 0 ? FADED : colourOf[r], opacity: s >= 0 ? 1 : 0.85 },
      });
    }
    for (const [c, t] of chosen) {
      traces.push({
        type: pointType, mode: "markers", name: esc(cut(C.name[c], 38)), x: t.x, y: t.y,
        text: t.text, customdata: t.ids, hoverinfo: "text", meta: c,
        marker: { size: markerSize + 1, color: colourFor(c), line: { width: 0.5, color: "#1f2328" } },
      });
    }
    const annotations = clusterLabels();
    const layout = {
      margin: { l: 8, r: 8, t: 8, b: 8 }, dragmode: "pan", hovermode: "closest", uirevision: "map",
      xaxis: { visible: false, zeroline: false }, yaxis: { visible: false, zeroline: false, scaleanchor: "x" },
      annotations,
      showlegend: false, // the tree is the legend: same colours, with sizes
    };
    Plotly.react(mapDiv, traces, layout, {
      responsive: true, scrollZoom: true, displaylogo: false, doubleClick: "reset",
      modeBarButtonsToRemove: ["select2d", "lasso2d", "toImage"],
    });
    // WebGL can exist and still fail (plotly then shows a notice): draw with SVG instead.
    if (pointType === "scattergl" && mapDiv.querySelector(".no-webgl")) {
      pointType = "scatter";
      Plotly.purge(mapDiv); // this takes the event listeners away too
      delete mapDiv.dataset.bound;
      renderMap();
      return;
    }
    spreadLabels(annotations);
    if (!mapDiv.dataset.bound) { bindMapEvents(); mapDiv.dataset.bound = "1"; }
    mapDiv.dataset.renderer = pointType;
    // What the map shows, for people using assistive tools and for tests.
    mapDiv.dataset.selected = s >= 0 ? C.id[s] : "";
    mapDiv.dataset.selectedPoints = String(selectedPoints);
    mapDiv.dataset.shownPoints = String(matchCount);
  }

  // Names at the centre of the clusters one level below the selection (top level at first).
  function clusterLabels() {
    const list = sortedBySize(labelled()).slice(0, MAX_LABELS);
    const sx = new Float64Array(nC), sy = new Float64Array(nC), k = new Int32Array(nC);
    const wanted = new Set(list);
    for (let i = 0; i < n; i++) {
      if (!match[i]) continue;
      for (const c of list) if (inCluster(i, c)) { sx[c] += V.x[i]; sy[c] += V.y[i]; k[c]++; break; }
    }
    return [...wanted].filter((c) => k[c] > 0).map((c) => ({
      x: sx[c] / k[c], y: sy[c] / k[c], text: esc(cut(C.name[c], 32)), showarrow: false,
      bgcolor: "rgba(255,255,255,0.85)", bordercolor: colourFor(c), borderwidth: 1.5, borderpad: 2,
      font: { size: 11, color: "#1f2328" }, captureevents: true, name: String(c),
      hovertext: esc(`${cut(C.name[c], 80)} · ${sizeText(c)}`),
    }));
  }

  // Names that would cover a bigger cluster's name are moved up or down a line, or left out
  // (the tree lists every cluster). Done in pixels, once the axes are laid out.
  function spreadLabels(annotations) {
    const xa = mapDiv._fullLayout && mapDiv._fullLayout.xaxis, ya = mapDiv._fullLayout && mapDiv._fullLayout.yaxis;
    if (!xa || !ya || !annotations.length) return;
    const placed = [], kept = [];
    let moved = false;
    for (const a of annotations) { // biggest clusters first
      const cx = xa.l2p(a.x), cy = ya.l2p(a.y), w = 6.4 * a.text.length + 10, h = 17;
      const shift = [0, 18, -18, 36, -36].find((dy) => !placed.some((b) =>
        Math.abs(cx - b.x) * 2 < w + b.w && Math.abs(cy - dy - b.y) * 2 < h + b.h));
      if (shift === undefined) { moved = true; continue; }
      if (shift) moved = true;
      placed.push({ x: cx, y: cy - shift, w, h });
      kept.push({ ...a, yshift: shift });
    }
    if (moved) Plotly.relayout(mapDiv, { annotations: kept });
  }

  function bindMapEvents() {
    mapDiv.on("plotly_click", (event) => {
      const point = event.points && event.points[0];
      if (point && point.customdata !== undefined) clickedConversation(point.customdata);
    });
    mapDiv.on("plotly_clickannotation", (event) => select(Number(event.annotation.name), "map"));
  }

  // ---------- the time chart ----------
  let firstDay = Infinity, lastDay = -Infinity, dated = 0;
  for (const d of V.day) if (d !== null) { firstDay = Math.min(firstDay, d); lastDay = Math.max(lastDay, d); dated++; }
  const span = lastDay >= firstDay ? lastDay - firstDay : 0;
  const unit = span <= 62 ? "day" : span <= 731 ? "week" : "month";
  function period(day) {
    if (unit === "day") return day;
    if (unit === "week") return day - ((day + 3) % 7); // the Monday of its week (1970-01-01 was a Thursday)
    const d = new Date(day * 86400000);
    return Math.round(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), 1) / 86400000);
  }

  function renderTimeModes() {
    const modes = document.getElementById("time-modes");
    modes.replaceChildren();
    if (batchFacet < 0) return;
    for (const [mode, label] of [["date", "by date"], ["batch", "by batch"]]) {
      const button = el("button", "", label);
      button.setAttribute("aria-pressed", String(state.timeMode === mode));
      button.addEventListener("click", () => { state.timeMode = mode; renderTimeModes(); renderTime(); });
      modes.append(button);
    }
  }

  function renderTime() {
    const s = state.selected;
    const series = sortedBySize(labelled());
    const shownSeries = series.slice(0, MAX_SERIES);
    const byBatch = state.timeMode === "batch" && batchFacet >= 0;
    const buckets = new Map(); // key -> Int32Array per series (+ other)
    const members = membersOf(s);
    let undated = 0; // a conversation without a date is counted and said, never put on a made-up day
    for (const i of members) {
      let key;
      if (byBatch) { key = FACETS[batchFacet].codes[i]; } else {
        if (V.day[i] === null) { undated++; continue; }
        key = period(V.day[i]);
      }
      let slot = shownSeries.length;
      for (let j = 0; j < shownSeries.length; j++) if (inCluster(i, shownSeries[j])) { slot = j; break; }
      if (!buckets.has(key)) buckets.set(key, new Int32Array(shownSeries.length + 1));
      buckets.get(key)[slot]++;
    }
    const keys = [...buckets.keys()].sort((a, b) => a - b);
    const what = s < 0 ? "all conversations" : C.name[s];
    // No dates, or one date for everything: a chart of one bar (or none) says nothing.
    const undatedAll = !dated;
    const flat = !byBatch && (undatedAll || span === 0) && n > 0;
    document.getElementById("time-title").textContent = flat ? "Over time"
      : `${byBatch ? "Conversations per batch" : `Conversations per ${unit}`} · ${cut(what, 60)}`;
    const timeNote = document.getElementById("time-note");
    timeNote.textContent = !flat ? ""
      : undatedAll ? "No conversation has a date, so there is no change over time to show."
      : `Every conversation ${dated < n ? "with a date " : ""}is dated ${dayString(firstDay)}, so there is no change over time to show.`;
    timeNote.title = timeNote.textContent; // the bar is one line: the whole text on hover
    const undatedNote = document.getElementById("time-undated");
    undatedNote.dataset.count = String(byBatch ? 0 : undated);
    undatedNote.textContent = !byBatch && undated && !undatedAll
      ? `${plural(undated, "conversation", "conversations")} without a date${flat ? "" : ", not plotted"}` : "";
    undatedNote.title = undatedNote.textContent;
    document.getElementById("time").hidden = flat;
    if (flat) return;
    const xs = keys.map((k) => (byBatch ? esc(valueLabel(batchFacet, k)) : dayString(k)));
    const traces = shownSeries.map((c, j) => ({
      type: "bar", name: esc(cut(C.name[c], 30)), x: xs, y: keys.map((k) => buckets.get(k)[j]),
      marker: { color: colourFor(c) }, hovertemplate: "%{y}<extra>%{fullData.name}</extra>",
    }));
    if (series.length > shownSeries.length) {
      traces.push({ type: "bar", name: "other", x: xs, y: keys.map((k) => buckets.get(k)[shownSeries.length]), marker: { color: "#bbb" } });
    }
    Plotly.react("time", traces, {
      barmode: "stack", margin: { l: 40, r: 8, t: 4, b: 30 }, showlegend: false, bargap: 0.1,
      xaxis: byBatch ? { type: "category" } : { type: "date", tickformat: unit === "month" ? "%b %Y" : "%b %d, %Y" },
      yaxis: { rangemode: "tozero" },
    }, { displaylogo: false, displayModeBar: false, responsive: true });
  }

  // ---------- the detail panel ----------
  function renderDetail() {
    const s = state.selected;
    const box = document.getElementById("detail");
    const crumbs = el("nav", "crumbs");
    const home = el("button", "", "All conversations");
    home.addEventListener("click", () => select(-1, "detail"));
    crumbs.append(home);
    if (s >= 0) {
      for (const a of pathOf(s).slice(0, -1)) {
        crumbs.append(el("span", "sep", "›"));
        const b = el("button", "", cut(C.name[a], 40));
        b.addEventListener("click", () => select(a, "detail"));
        crumbs.append(b);
      }
    }
    const heading = el("h2", "", s < 0 ? "All conversations" : C.name[s]);
    heading.id = "detail-name";
    const description = el("p", "description", s < 0
      ? "Pick a cluster in the tree or on the map. Each cluster groups conversations with similar summaries; its name and description describe the group, not any one conversation."
      : C.description[s]);
    description.id = "detail-description";
    const total = s < 0 ? D.total : totals[s];
    const count = !filtered() ? total : s < 0 ? matchCount : counts[s];
    const numbers = el("p", "numbers");
    numbers.id = "detail-count";
    numbers.dataset.count = String(count);
    numbers.dataset.total = String(total);
    // The share is the tree's: of all conversations, whatever the filters.
    const share = s < 0 ? "" : filtered()
      ? ` · the cluster is ${C.share[s]} of all conversations · level ${C.level[s]}`
      : ` · ${C.share[s]} of all conversations · level ${C.level[s]}`;
    if (s >= 0) numbers.dataset.share = C.share[s];
    numbers.textContent = (filtered()
      ? `${fmt(count)} of ${s < 0 ? "the" : "its"} ${fmt(total)} conversations match the filters`
      : `${fmt(count)} conversations`) + share;
    const parts = [crumbs, heading, description, numbers];
    if (s >= 0 && C.fallback[s]) {
      const mark = el("p", "fallback", fallbackText(s));
      mark.id = "detail-fallback";
      parts.push(mark);
    }
    const notes = el("div", "notes");
    for (const note of D.notes) notes.append(el("p", "", note));
    if (s < 0 && D.notes.length) parts.push(notes);

    const kids = s < 0 ? roots : children[s];
    const withheldHere = s < 0 ? D.withheldTop : C.withheld[s];
    if (kids.length || withheldHere) {
      parts.push(el("h3", "", (s < 0 ? "Top-level clusters" : `Children (${kids.length})`) +
        (filtered() ? " · matching, of each cluster's conversations" : " · conversations") + " · share of all conversations"));
      const list = el("ul", "child-list");
      list.id = "detail-children";
      for (const c of sortedBySize(kids)) {
        const li = el("li"), b = el("button");
        const sw = el("span", "swatch");
        sw.style.background = colourFor(c);
        const size = el("span", "size", sizeText(c));
        size.dataset.share = C.share[c];
        b.append(sw, el("span", "", C.name[c]), size);
        b.title = C.description[c] + (C.fallback[c] ? `\n(${fallbackText(c)})` : "");
        b.addEventListener("click", () => select(c, "detail"));
        li.append(b);
        list.append(li);
      }
      parts.push(list);
      // The rest of this cluster's count, so its children visibly add up to it.
      if (withheldHere) {
        const line = el("p", "withheld-line", s < 0 ? D.withheldTopLine : C.withheldLine[s]);
        line.id = "detail-withheld";
        line.dataset.count = String(withheldHere);
        parts.push(line);
      }
    }

    const members = membersOf(s);
    parts.push(el("h3", "", "Breakdowns"));
    parts.push(breakdownLegend(s, members.length));
    const facetsBox = el("div");
    facetsBox.id = "breakdowns";
    FACETS.forEach((_, f) => facetsBox.append(breakdown(f, members)));
    if (!FACETS.length) facetsBox.append(el("p", "empty-state", "No facets or properties in this dataset."));
    parts.push(facetsBox);

    parts.push(el("h3", "", `Summaries (${fmt(members.length)}${notInPage(s) ? " in this page" : ""})`));
    parts.push(summaryList(members));
    if (s >= 0 && D.notes.length) parts.push(notes);
    box.replaceChildren(...parts);
  }

  // Conversations of the selection that are in withheld clusters: in its count, not in the page.
  function notInPage(s) { return s < 0 ? D.withheld : withheldBelow[s]; }

  // Breakdowns count the conversations in this page (those that match the filters): what each
  // share is a share of is said in words, with the ones left out.
  function breakdownLegend(s, here) {
    const line = el("div", "legend-line");
    const matching = filtered() ? " matching the filters" : "";
    if (s < 0) {
      line.append(el("span", "fill-key"), document.createTextNode(` share of the ${fmt(here)} conversations${matching} in this page · click a value to filter by it`));
    } else {
      line.append(el("span", "fill-key"), document.createTextNode(` share of this cluster's ${fmt(here)} conversations${matching} in this page `),
        el("span", "tick-key"), document.createTextNode(` share of all ${fmt(matchCount)}${matching} in this page · click a value to filter by it`));
    }
    const missing = notInPage(s);
    if (missing) line.append(document.createTextNode(` · ${plural(missing, "conversation", "conversations")} in clusters too small or too specific to show ${missing === 1 ? "is" : "are"} not in this page`));
    return line;
  }

  function breakdown(f, members) {
    const facet = FACETS[f];
    const tally = valueCounts(f, members);
    const base = overall[f];
    const unset = facet.values.length;
    const size = members.length || 1, all = matchCount || 1;
    const codes = [...facet.values.keys()].filter((code) => tally[code] > 0);
    if (!facet.ordered) codes.sort((a, b) => tally[b] - tally[a]);
    let rows = codes;
    if (!facet.ordered || codes.length > 12) rows = codes.slice().sort((a, b) => tally[b] - tally[a]).slice(0, BREAKDOWN_ROWS);
    if (facet.ordered) rows.sort((a, b) => a - b);
    if (tally[unset]) rows = rows.concat([-1]);
    const box = el("section", "facet");
    box.dataset.facet = facet.name;
    const title = el("h4", "", facet.name);
    title.append(el("span", "group", facet.group + (facet.multi ? " · several per conversation" : "")));
    box.append(title);
    const active = state.filters.get(f) || new Set();
    for (const code of rows) {
      const k = tally[code < 0 ? unset : code], b = base[code < 0 ? unset : code];
      const row = el("button", "facet-row");
      if (active.has(code)) row.classList.add("active");
      row.title = `${valueLabel(f, code)}: ${fmt(k)} of the ${fmt(members.length)} here (${pct(k, size)}); ${pct(b, all)} of all ${fmt(matchCount)} in this page`;
      const track = el("span", "track"), fill = el("span", "fill"), tick = el("span", "tick");
      fill.style.width = `${(100 * k) / size}%`;
      tick.style.left = `calc(${(100 * b) / all}% - 1px)`;
      track.append(fill);
      if (state.selected >= 0) track.append(tick);
      row.append(el("span", "label", valueLabel(f, code)), track, el("span", "n", `${fmt(k)} · ${pct(k, size)}`));
      row.addEventListener("click", () => toggleFilter(f, code));
      box.append(row);
    }
    const hidden = codes.length - rows.filter((c) => c >= 0).length;
    if (hidden > 0) box.append(el("div", "more", `+ ${hidden} more value${hidden === 1 ? "" : "s"} (see the filter list)`));
    if (!rows.length) box.append(el("div", "more", "no conversation here"));
    return box;
  }

  function summaryList(members) {
    const list = el("ol", "summaries");
    list.id = "summaries";
    const s = state.selected;
    for (const i of members.slice(0, state.shown)) {
      const li = el("li");
      li.append(el("div", "text", V.summary[i]));
      const meta = el("div", "meta");
      const facts = [];
      if (s < 0 || children[s].length) facts.push(C.name[V.cluster[i]]);
      facts.push(V.day[i] === null ? "date unknown" : dayString(V.day[i]));
      if (V.id) facts.push(V.id[i]);
      meta.append(document.createTextNode(facts.join(" · ")));
      if (V.text) {
        const open = state.open.has(i);
        const b = el("button", "", open ? " · hide conversation" : " · show conversation");
        b.addEventListener("click", () => { if (open) state.open.delete(i); else state.open.add(i); renderDetail(); });
        meta.append(b);
      }
      li.append(meta);
      if (V.text && state.open.has(i)) li.append(el("pre", "conversation", V.text[i]));
      list.append(li);
    }
    const wrap = el("div");
    wrap.append(list);
    if (members.length > state.shown) {
      const more = el("button", "link", `Show ${Math.min(PAGE, members.length - state.shown)} more of ${fmt(members.length - state.shown)}`);
      more.addEventListener("click", () => { state.shown += PAGE; renderDetail(); });
      wrap.append(more);
    }
    if (!V.text) wrap.append(el("p", "hint", "Only summaries are included in this page; conversation text is left out unless the explorer is built with show_conversations."));
    return wrap;
  }

  // ---------- putting it together ----------
  function renderAll() {
    updateColours();
    renderFilters();
    renderTree();
    renderMap();
    renderTime();
    renderDetail();
  }

  renderHeader();
  renderValueSelect();
  renderTimeModes();
  applyFilters();
  renderAll();
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.selected >= 0) select(C.parent[state.selected], "key");
  });
  document.body.dataset.ready = "1";
})();
