"""Rule-based PII scrubbing: works with no LLM, and runs over LLM output too."""

from __future__ import annotations

import re
from collections import Counter

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
