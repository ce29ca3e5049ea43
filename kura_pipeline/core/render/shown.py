"""What a person is shown of a hierarchy, and the one definition of its counts.

Every view (the terminal tree, the Dagster UI's markdown, the explorer page) reads its numbers
from here, so they agree:
- a cluster's count is all of its conversations, withheld descendants included, so a parent's
  count is the sum of its shown children plus one line for the withheld part;
- `withheld_under[parent]` is that line: conversations in children withheld for privacy (too
  small, or failed the audit), said as a number, never by name (`None` = the top level);
- every percentage is a share of `total`, the conversations in the hierarchy.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from kura_pipeline.core.models import Cluster


def withheld_line(count: int) -> str:
    """The line that stands for the conversations of withheld clusters under one parent."""
    if count == 1:
        return "1 conversation in a cluster too small or too specific to show"
    return f"{count} conversations in clusters too small or too specific to show"


@dataclass
class ShownTree:
    total: int
    roots: list[Cluster]
    children: dict[str, list[Cluster]]
    withheld_under: dict[str | None, int] = field(default_factory=dict)
    withheld_clusters: int = 0

    def share(self, count: int) -> float:
        """Percent of all conversations in the hierarchy: the one definition every view uses."""
        return 100.0 * count / self.total if self.total else 0.0

    @property
    def withheld_conversations(self) -> int:
        return sum(self.withheld_under.values())


def hidden_ids(clusters: list[Cluster]) -> set[str]:
    """Withheld clusters and everything below one."""
    by_id = {c.id: c for c in clusters}
    hidden: set[str] = set()
    for cluster in clusters:
        node: Cluster | None = cluster
        while node is not None and not node.withheld:
            node = by_id.get(node.parent_id) if node.parent_id else None
        if node is not None:
            hidden.add(cluster.id)
    return hidden


def shown_tree(clusters: list[Cluster]) -> ShownTree:
    """Roots and children a person may see, biggest first, with the withheld part counted."""
    hidden = hidden_ids(clusters)
    known = {c.id for c in clusters}
    children: dict[str, list[Cluster]] = defaultdict(list)
    withheld_under: dict[str | None, int] = defaultdict(int)
    roots: list[Cluster] = []
    total = 0
    for cluster in clusters:
        parent = cluster.parent_id if cluster.parent_id in known else None
        if parent is None:
            total += cluster.count
        if cluster.id in hidden:
            # Only the topmost withheld cluster of a hidden branch is counted, under its parent.
            if cluster.withheld and (parent is None or parent not in hidden):
                withheld_under[parent] += cluster.count
            continue
        if parent is None:
            roots.append(cluster)
        else:
            children[parent].append(cluster)
    order = lambda c: (-c.count, c.name)  # noqa: E731
    roots.sort(key=order)
    for siblings in children.values():
        siblings.sort(key=order)
    return ShownTree(
        total=total,
        roots=roots,
        children=dict(children),
        withheld_under={k: v for k, v in withheld_under.items() if v},
        withheld_clusters=sum(1 for c in clusters if c.withheld),
    )
