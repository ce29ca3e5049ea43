"""The cluster tree as text: for the terminal (like Kura's visualise_clusters) and as markdown."""

from __future__ import annotations

from kura_pipeline.core.models import Cluster
from kura_pipeline.core.render.markdown import escape_markdown


def withheld_note(clusters: list[Cluster]) -> str | None:
    """What a reader is told about what they are not shown (counts only)."""
    hidden = [c for c in clusters if c.withheld]
    if not hidden:
        return None
    conversations = sum(c.count for c in hidden if c.level == 0)
    return (
        f"{len(hidden)} clusters ({conversations} conversations in base clusters) withheld: "
        "below the privacy threshold"
    )


def _children_of(clusters: list[Cluster]) -> tuple[list[Cluster], dict[str, list[Cluster]]]:
    """Roots and children among the clusters a person may see (withheld ones, and what hangs
    below them, are left out)."""
    clusters = [c for c in clusters if not c.withheld]
    children: dict[str, list[Cluster]] = {}
    for cluster in clusters:
        if cluster.parent_id is not None:
            children.setdefault(cluster.parent_id, []).append(cluster)
    for siblings in children.values():
        siblings.sort(key=lambda c: (-c.count, c.name))
    roots = sorted((c for c in clusters if c.parent_id is None), key=lambda c: (-c.count, c.name))
    return roots, children


def render_tree(clusters: list[Cluster], descriptions: bool = False, max_depth: int | None = None) -> str:
    """Box-drawn tree, biggest first, with counts and each cluster's share of all conversations."""
    roots, children = _children_of(clusters)
    total = sum(c.count for c in clusters if c.parent_id is None) or 1  # shares of everything
    lines = [f"Clusters ({total} conversations)"]

    def walk(cluster: Cluster, prefix: str, last: bool, depth: int) -> None:
        branch = "╚══ " if last else "╠══ "
        share = 100 * cluster.count / total
        lines.append(f"{prefix}{branch}{cluster.name} ({cluster.count} conversations, {share:.1f}%)")
        inner = prefix + ("    " if last else "║   ")
        if descriptions:
            lines.append(f"{inner}  {cluster.description}")
        if max_depth is not None and depth + 1 >= max_depth:
            return
        kids = children.get(cluster.id, [])
        for i, child in enumerate(kids):
            walk(child, inner, i == len(kids) - 1, depth + 1)

    for i, root in enumerate(roots):
        walk(root, "", i == len(roots) - 1, 0)
    if note := withheld_note(clusters):
        lines.append(f"({note})")
    return "\n".join(lines)


def render_markdown_tree(clusters: list[Cluster], max_depth: int = 3) -> str:
    """Nested markdown bullets for the Dagster UI's metadata panel."""
    roots, children = _children_of(clusters)
    total = sum(c.count for c in clusters if c.parent_id is None) or 1
    lines: list[str] = []

    def walk(cluster: Cluster, depth: int) -> None:
        share = 100 * cluster.count / total
        name = escape_markdown(cluster.name)
        lines.append(f"{'  ' * depth}- **{name}** — {cluster.count} ({share:.1f}%)")
        if depth + 1 < max_depth:
            for child in children.get(cluster.id, []):
                walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    if note := withheld_note(clusters):
        lines.append(f"\n_{note}_")
    return "\n".join(lines)
