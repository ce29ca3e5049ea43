"""Local OpenAI-compatible servers for tests, demos and benchmarks.

- ``LoopbackServer`` (``loopback``): a schema-aware fake with fault injection
  and request accounting; needs only uvicorn + starlette.
- ``LlamaCppServer`` (``llamacpp``): llama.cpp's own server through xllamacpp.

Names are imported lazily: xllamacpp is a heavy native import, and
``python -m kura_pipeline.servers.loopback`` must not find its module already
imported by this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kura_pipeline.servers.llamacpp import LlamaCppServer, smollm2_gguf_path
    from kura_pipeline.servers.loopback import (
        Faults,
        LoopbackServer,
        Stats,
    )

_EXPORTS = {
    "Faults": "loopback",
    "LoopbackServer": "loopback",
    "Stats": "loopback",
    "LlamaCppServer": "llamacpp",
    "smollm2_gguf_path": "llamacpp",
}
__all__ = [
    "Faults",
    "LlamaCppServer",
    "LoopbackServer",
    "Stats",
    "smollm2_gguf_path",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
