"""The local OpenAI-compatible server of the fully local LLM path.

``LlamaCppServer`` (``llamacpp``): llama.cpp's own server through xllamacpp. The name is imported
lazily: xllamacpp is a heavy native import that only the local backend needs.

The fault-drill server of the tests and benchmarks is not part of the package: it lives in
``kura_pipeline_tests/support/loopback.py``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kura_pipeline.servers.llamacpp import LlamaCppServer, smollm2_gguf_path

_EXPORTS = {
    "LlamaCppServer": "llamacpp",
    "smollm2_gguf_path": "llamacpp",
}
__all__ = ["LlamaCppServer", "smollm2_gguf_path"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
