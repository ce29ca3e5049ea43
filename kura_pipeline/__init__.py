"""kura_pipeline: from chatbot conversations to a browsable hierarchy of usage patterns.

Kura's notebook API is exported here (`from kura_pipeline import Kura, SummaryModel,
Conversation, ExtractedProperty`); names are resolved on first use, so importing the package
stays cheap (Dagster, polars and the LLM stack load only when a run needs them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kura_pipeline.core.models import (
        Cluster,
        Conversation,
        ConversationSummary,
        ExtractedProperty,
        Message,
    )
    from kura_pipeline.notebook import Kura, KuraRunFailed, SummaryModel

_EXPORTS = {
    "Cluster": "kura_pipeline.core.models",
    "Conversation": "kura_pipeline.core.models",
    "ConversationSummary": "kura_pipeline.core.models",
    "ExtractedProperty": "kura_pipeline.core.models",
    "Message": "kura_pipeline.core.models",
    "Kura": "kura_pipeline.notebook",
    "KuraRunFailed": "kura_pipeline.notebook",
    "SummaryModel": "kura_pipeline.notebook",
}
__all__ = [
    "Cluster",
    "Conversation",
    "ConversationSummary",
    "ExtractedProperty",
    "Kura",
    "KuraRunFailed",
    "Message",
    "SummaryModel",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
