"""Privacy by design (Clio's layers that need no model): rule-based PII scrubbing, which runs
with no LLM and over LLM output too, and aggregation thresholds, which withhold clusters too
small to be anonymous from everything a person reads."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

from kura_pipeline.core.models import Cluster

# Order matters: URLs before emails (a URL may contain '@'), cards before phone numbers.
_PATTERNS: list[tuple[str, re.Pattern[str], str]] = [
    ("url", re.compile(r"\b(?:https?://|www\.)[^\s<>\"')\]]+", re.IGNORECASE), "[URL]"),
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "[EMAIL]"),
    (
        "ip_address",
        re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"),
        "[IP]",
    ),
    ("card_number", re.compile(r"\b(?:\d[ -]?){13,19}\b"), "[NUMBER]"),
    # API keys, access tokens, hashes: long runs mixing letters and digits.
    ("token", re.compile(r"\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{24,}\b"), "[TOKEN]"),
    # Names where they can be told: after a title, or an introduction ("my name is ...").
    (
        "name",
        re.compile(
            r"(?P<lead>\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s+"
            r"|\b(?:[Mm]y name is|I am called|[Dd]ear|[Ss]incerely,?)\s+)"
            r"[A-Z][a-z]+(?:\s+[A-Z][a-z]+)?"
        ),
        "\\g<lead>[NAME]",  # keep the words that gave the name away, drop the name
    ),
    ("phone", re.compile(r"(?<![\w/])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{2,4}\)?){2,5}(?![\w/])"), "[PHONE]"),
]


def scrub_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace emails, URLs, IP addresses, card-like numbers and phone numbers with placeholders."""
    counts: Counter[str] = Counter()
    for kind, pattern, placeholder in _PATTERNS:
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[kind] += n
    return text, counts


@dataclass(frozen=True)
class AggregationThreshold:
    """Clio's minimum cluster size: below it, a cluster could point at a few people."""

    min_conversations: int = 5
    min_users: int = 2  # applied where conversations carry a user id


def withheld_cluster_ids(
    clusters: list[Cluster], threshold: AggregationThreshold, user_of: dict[str, str] | None = None
) -> set[str]:
    """Clusters too small (in conversations, or in distinct users where known) to show anyone."""
    withheld = set()
    for cluster in clusters:
        users = {user_of[c] for c in cluster.chat_ids if c in user_of} if user_of else None
        if cluster.count < threshold.min_conversations or (
            users is not None and len(users) < threshold.min_users
        ):
            withheld.add(cluster.id)
    return withheld


def parents_with_nothing_shown(clusters: list[Cluster], withheld: set[str]) -> set[str]:
    """Parents every child of which is withheld (for size or by the audit), level by level up:
    nothing under them can be shown, so their name and description would stand on nothing a
    reader may see ("Of the 0 in clusters shown"). They are withheld too, and their conversations
    counted in the withheld line of their own parent."""
    children: dict[str, list[str]] = {}
    for cluster in clusters:
        if cluster.parent_id is not None:
            children.setdefault(cluster.parent_id, []).append(cluster.id)
    hidden = set(withheld)
    for cluster in sorted(clusters, key=lambda c: c.level):
        kids = children.get(cluster.id)
        if kids and cluster.id not in hidden and all(kid in hidden for kid in kids):
            hidden.add(cluster.id)
    return hidden - set(withheld)


def users_from_metadata(metadata_json: list[str | None], chat_ids: list[str], field: str) -> dict[str, str]:
    """chat_id -> user id, from a metadata field (conversations without it are left out)."""
    users = {}
    for chat, text in zip(chat_ids, metadata_json, strict=True):
        value = json.loads(text or "{}").get(field)
        if value is not None:
            users[chat] = str(value)
    return users
