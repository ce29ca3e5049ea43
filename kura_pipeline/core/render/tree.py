"""The cluster tree as text: for the terminal (like Kura's visualise_clusters) and as markdown.

Counts and shares come from `shown.shown_tree`, as in the explorer: a parent's count is the sum
of its shown children and one line for what is withheld under it."""

from __future__ import annotations

from kura_pipeline.core.models import Cluster
from kura_pipeline.core.render.markdown import escape_markdown
from kura_pipeline.core.render.shown import ShownTree, shown_tree, withheld_line


def withheld_note(clusters: list[Cluster], tree: ShownTree | None = None) -> str | None:
    """What a reader is told about what they are not shown (counts only)."""
    tree = tree or shown_tree(clusters)
    if not tree.withheld_clusters:
        return None
    n = tree.withheld_clusters
    return (
        f"{_counted(n, 'cluster')} withheld: below the privacy threshold, failed the privacy audit, "
        f"or holding only such clusters; {tree.withheld_conversations} of {tree.total} conversations "
        f"are in {'it' if n == 1 else 'them'}"
    )


DESCRIBED_ONLY = "described without the LLM"


def fallback_mark(reason: str) -> str:
    """What a view prints after a cluster the LLM did not fully name: only its description was
    written without the model (the name is the model's), or its name too."""
    return DESCRIBED_ONLY if reason.startswith(DESCRIBED_ONLY) else "named without the LLM"


def fallback_note(clusters: list[Cluster]) -> str | None:
    """One line when an LLM run named or grouped clusters without the model."""
    fallen = [c for c in clusters if c.fallback]
    if not fallen:
        return None
    shown = [c for c in fallen if not c.withheld]
    first = fallen[0].fallback
    return (
        f"warning: {_counted(len(fallen), 'cluster')} ({len(shown)} shown) "
        f"{'was' if len(fallen) == 1 else 'were'} named or grouped without the LLM "
        f"(marked in meta_clusters.fallback; first: {first})"
    )


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _conversations(count: int) -> str:
    return _counted(count, "conversation")


def render_tree(clusters: list[Cluster], descriptions: bool = False, max_depth: int | None = None) -> str:
    """Box-drawn tree, biggest first, with counts and each cluster's share of all conversations."""
    tree = shown_tree(clusters)
    lines = [f"Clusters ({_conversations(tree.total)})"]

    def entries(parent: str | None, kids: list[Cluster]) -> list[Cluster | int]:
        withheld = tree.withheld_under.get(parent, 0)
        return [*kids, withheld] if withheld else list(kids)

    def walk(entry: Cluster | int, prefix: str, last: bool, depth: int) -> None:
        branch = "╚══ " if last else "╠══ "
        if isinstance(entry, int):
            lines.append(f"{prefix}{branch}({withheld_line(entry)}, {tree.share(entry):.1f}%)")
            return
        mark = f" [{fallback_mark(entry.fallback)}]" if entry.fallback else ""
        size = f"{_conversations(entry.count)}, {tree.share(entry.count):.1f}%"
        lines.append(f"{prefix}{branch}{entry.name} ({size}){mark}")
        inner = prefix + ("    " if last else "║   ")
        if descriptions:
            lines.append(f"{inner}  {entry.description}")
        if max_depth is not None and depth + 1 >= max_depth:
            return
        below = entries(entry.id, tree.children.get(entry.id, []))
        for i, child in enumerate(below):
            walk(child, inner, i == len(below) - 1, depth + 1)

    top = entries(None, tree.roots)
    for i, root in enumerate(top):
        walk(root, "", i == len(top) - 1, 0)
    if note := withheld_note(clusters, tree):
        lines.append(f"({note})")
    return "\n".join(lines)


def render_markdown_tree(clusters: list[Cluster], max_depth: int = 3) -> str:
    """Nested markdown bullets for the Dagster UI's metadata panel, with the same numbers."""
    tree: ShownTree = shown_tree(clusters)
    lines: list[str] = []

    def add_withheld_line(parent: str | None, depth: int) -> None:
        if count := tree.withheld_under.get(parent, 0):
            lines.append(
                f"{'  ' * depth}- _{withheld_line(count)}_ — {count} ({tree.share(count):.1f}%)"
            )

    def walk(cluster: Cluster, depth: int) -> None:
        name = escape_markdown(cluster.name)
        mark = f" _({fallback_mark(cluster.fallback)})_" if cluster.fallback else ""
        lines.append(f"{'  ' * depth}- **{name}** — {cluster.count} ({tree.share(cluster.count):.1f}%){mark}")
        if depth + 1 < max_depth:
            for child in tree.children.get(cluster.id, []):
                walk(child, depth + 1)
            add_withheld_line(cluster.id, depth + 1)

    lines.append(f"{tree.total} conversations")
    for root in tree.roots:
        walk(root, 0)
    add_withheld_line(None, 0)
    if note := withheld_note(clusters, tree):
        lines.append(f"\n_{note}_")
    return "\n".join(lines)
