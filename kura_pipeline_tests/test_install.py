"""What an install carries and what a run pays once: the runtime imports nothing of the test
machinery (uvicorn, starlette: the loopback server's), and UMAP's numba kernels are compiled into
the checkout's cache once, then loaded by every later process (kura_pipeline/core/project.py)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = ("uvicorn", "starlette")

# Any import of uvicorn/starlette raises, and the names of every module imported are checked at
# the end: a `try: import uvicorn / except ImportError` would pass the first check, not the second.
_BLOCK_TEST_ONLY = f"""
import importlib, json, pkgutil, sys
BLOCKED = {set(TEST_ONLY)!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked for this test: " + name)
        return None

sys.meta_path.insert(0, Block())
"""


def _run(script: str, tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 900):
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        cwd=tmp_path,  # not the checkout: what is found must not depend on the working folder
        env=env if env is not None else os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the lean install ---------------------------------------------------------------------------


def test_uvicorn_and_starlette_are_test_extras_not_runtime_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {
            r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
            for r in requirements
        }

    runtime = names(project["dependencies"])
    test = names(project["optional-dependencies"]["test"])
    for package in TEST_ONLY:
        assert package not in runtime, f"{package} is a runtime dependency"
        assert package in test, f"{package} missing from the test extra (the loopback server needs it)"


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def test_no_runtime_module_imports_the_test_servers_even_lazily():
    """Every import statement of the package, inside functions too: none reaches for the tests'
    support package (the loopback server) or its web stack."""
    offenders = []
    for path in sorted((ROOT / "kura_pipeline").rglob("*.py")):
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in modules:
                if module.split(".")[0] in (*TEST_ONLY, "kura_pipeline_tests"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    assert not offenders, offenders


@pytest.mark.slow
def test_runtime_modules_import_and_load_without_uvicorn_or_starlette(tmp_path):
    """The definitions, the CLI, every asset, resource and core module, with uvicorn and starlette
    made unimportable in a fresh process: nothing of the runtime reaches for them."""
    script = (
        _BLOCK_TEST_ONLY
        + """
import kura_pipeline
import kura_pipeline.cli
import kura_pipeline.definitions as definitions
imported = []
for info in pkgutil.walk_packages(kura_pipeline.__path__, "kura_pipeline."):
    if info.name.endswith("__main__"):
        continue
    importlib.import_module(info.name)
    imported.append(info.name)
repository = definitions.defs.get_repository_def()
assets = [key.to_user_string() for key in repository.asset_graph.get_all_asset_keys()]
loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
print(json.dumps({"imported": imported, "assets": assets, "loaded": loaded}))
"""
    )
    result = _run(script, tmp_path)
    assert result["loaded"] == []
    assert "kura_pipeline.assets.projections" in result["imported"]
    assert "kura_pipeline.resources.llm" in result["imported"]
    assert "projections" in result["assets"]


# --- UMAP compiled once per machine -------------------------------------------------------------

# The folder numba is told when it is imported (NUMBA_CACHE_DIR, read by numba at import), and for
# a few of umap's kernels (none marked cache=True by umap-learn): where they cache and whether this
# process compiled them (a miss) or loaded them (a hit).
_WATCH_NUMBA = """
import json, os, sys
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "numba" and "numba" not in seen:
            seen["numba"] = os.environ.get("NUMBA_CACHE_DIR")
        return None

sys.meta_path.insert(0, Watch())
import numpy as np
from kura_pipeline.core import project
"""
_REPORT_KERNELS = """
import umap.layouts, umap.umap_, umap.utils
kernels = {
    "smooth_knn_dist": umap.umap_.smooth_knn_dist,
    "compute_membership_strengths": umap.umap_.compute_membership_strengths,
    "layout_epoch": umap.layouts._nb_optimize_layout_euclidean_single_epoch,
    "fast_knn_indices": umap.utils.fast_knn_indices,
}
report = {
    name: {
        "cache_path": k.stats.cache_path,
        "hits": sum(k.stats.cache_hits.values()),
        "misses": sum(k.stats.cache_misses.values()),
    }
    for name, k in kernels.items()
}
print(json.dumps({
    "numba_cache_dir_at_import": seen.get("numba"),
    "env": os.environ.get("NUMBA_CACHE_DIR"),
    "expected": str(project.numba_cache_dir()),
    "coords_finite": bool(np.isfinite(coords).all()),
    "kernels": report,
}))
"""
_DRAW = """
coords = project.project_2d(np.random.default_rng(0).normal(size=(60, 16)).astype(np.float32), seed=0)
"""


def _env_without_numba_cache() -> dict[str, str]:
    env = os.environ.copy()
    env.pop("NUMBA_CACHE_DIR", None)  # the project's own choice, as a user's first run gets it
    return env


@pytest.mark.slow
def test_numba_caches_umap_in_the_checkout_and_a_second_process_loads_it(tmp_path):
    script = _WATCH_NUMBA + _DRAW + _REPORT_KERNELS
    first = _run(script, tmp_path, _env_without_numba_cache())
    cache = Path(first["expected"])
    assert cache.is_relative_to(ROOT / ".kura_cache" / "numba"), cache
    # set before numba was imported, and kept for the processes this one starts
    assert first["numba_cache_dir_at_import"] == str(cache)
    assert first["env"] == str(cache)
    assert first["coords_finite"]
    for name, kernel in first["kernels"].items():
        assert kernel["cache_path"] and Path(kernel["cache_path"]).is_relative_to(cache), (name, kernel)
    # the first process (this one, or `make install` before it) left each kernel's index there
    indexes = {p.name for p in cache.rglob("*.nbi")}
    for stem in (
        "umap_.smooth_knn_dist-",
        "umap_.compute_membership_strengths-",
        "layouts._optimize_layout_euclidean_single_epoch-",
        "utils.fast_knn_indices-",
    ):
        assert any(name.startswith(stem) for name in indexes), (stem, sorted(indexes))

    second = _run(script, tmp_path, _env_without_numba_cache())
    for name, kernel in second["kernels"].items():
        assert kernel["misses"] == 0 and kernel["hits"] >= 1, (name, kernel)  # loaded, not compiled


def test_a_users_numba_cache_dir_is_kept(tmp_path, monkeypatch):
    from kura_pipeline.core import project

    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert project.configure_numba_cache(tmp_path / "checkout") == str(tmp_path / "mine")
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "mine")
    assert not (tmp_path / "checkout").exists()


def test_an_absent_cache_folder_is_created(tmp_path, monkeypatch):
    from kura_pipeline.core import project

    monkeypatch.setenv("NUMBA_CACHE_DIR", "x")
    monkeypatch.delenv("NUMBA_CACHE_DIR")  # recorded, so restored after the test
    folder = project.configure_numba_cache(tmp_path)
    assert (
        folder and Path(folder).is_dir() and Path(folder).is_relative_to(tmp_path / ".kura_cache" / "numba")
    )
    assert os.environ["NUMBA_CACHE_DIR"] == folder


@pytest.mark.slow
def test_an_unwritable_cache_and_no_cache_at_all_still_draw_the_map(tmp_path):
    """The project's cache folder cannot be made (a file in its way, as a read-only one would; the
    tests run as root, whom permissions do not stop), and numba finds no folder at all for umap's
    kernels: they compile in memory, as before, and the map is drawn."""
    (tmp_path / ".kura_cache").write_text("a file where the cache folder would go")
    script = (
        _WATCH_NUMBA
        + f"""
from pathlib import Path
assert project.configure_numba_cache(Path({str(tmp_path)!r})) is None
assert "NUMBA_CACHE_DIR" not in os.environ
import umap  # umap's own cache=True kernels find their usual place; then none is left for ours
from numba.core import config
os.environ["NUMBA_CACHE_LOCATOR_CLASSES"] = "IPythonCacheLocator"  # matches no file here
config.reload_config()
"""
        + _DRAW
        + """
from numba.core.caching import NullCache
import umap.umap_
print(json.dumps({"coords_finite": bool(np.isfinite(coords).all()), "shape": list(coords.shape),
                  "uncached": isinstance(umap.umap_.smooth_knn_dist._cache, NullCache)}))
"""
    )
    result = _run(script, tmp_path, _env_without_numba_cache())
    assert result == {"coords_finite": True, "shape": [60, 2], "uncached": True}


def test_the_installed_package_carries_no_test_server():
    """What `pip install .` copies: the packages setuptools finds with the project's own rules."""
    from setuptools import find_packages

    rules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(ROOT, include=rules["include"], exclude=rules["exclude"])
    assert "kura_pipeline" in packages and "kura_pipeline.servers" in packages
    assert not [package for package in packages if package.startswith("kura_pipeline_tests")]
    modules = {path.stem for package in packages for path in (ROOT / package.replace(".", "/")).glob("*.py")}
    assert not modules & {"loopback", "schema_instance"}
