"""Markdown for the Dagster UI, where conversation-derived text is data, never markup."""

from __future__ import annotations

import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~-])")


def escape_markdown(text: str) -> str:
    """Show the text as typed: markdown and HTML characters escaped, whitespace folded."""
    return _SPECIAL.sub(r"\\\1", " ".join(text.split()))
