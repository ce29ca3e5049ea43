"""Projections: a 2-D UMAP map of the conversations, and where each cluster sits on it.

UMAP's kernels are numba functions, compiled to machine code on first call: about 15 s of CPU in
every new process, most of it for kernels umap-learn does not mark ``cache=True``. Here they are
cached on disk too, so the compilation is paid once per machine (``make install`` pays it, see
``warm_umap_cache``) and every later process loads the machine code:

- numba's cache folder is the checkout's ``.kura_cache/numba/<numba, umap, pynndescent versions>``
  (set as ``NUMBA_CACHE_DIR`` before umap, pynndescent or numba are imported; a user's own
  ``NUMBA_CACHE_DIR`` is kept). Outside a checkout (a wheel install), or when that folder cannot
  be created or written, numba's own places are used: ``__pycache__`` beside umap's sources, else
  the user-wide cache (``~/.cache/numba``); with none writable the kernels compile in memory, as
  before.
- the versions in the folder's name: numba keys a cached function by its own file's content, so
  a kernel with a callee in another file (changed by an upgrade) would otherwise load stale code.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from kura_pipeline.core.models import Cluster

# UMAP needs a handful of neighbours; below this many points a PCA map is drawn instead.
MIN_POINTS_FOR_UMAP = 10
# Above this many points UMAP starts from PCA, not its spectral layout: the spectral layout
# solves an eigenproblem per connected component of the neighbour graph, and near-duplicate
# conversations make many small components (at 100,000 it had not finished after 18 minutes;
# from PCA the whole stage took about 2 minutes).
SPECTRAL_INIT_MAX_POINTS = 20_000


def project_2d(embeddings: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """(n, 2) coordinates: UMAP with cosine distance, PCA for tiny inputs."""
    n = len(embeddings)
    if n == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if n < MIN_POINTS_FOR_UMAP:
        return _pca_2d(embeddings)
    umap = _import_umap()  # imported here: it takes seconds to load (numba); only this stage needs it

    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, n - 1),
        metric="cosine",
        random_state=seed,
        n_jobs=1,  # a seed only gives a repeatable map single-threaded
        init="pca" if n > SPECTRAL_INIT_MAX_POINTS else "spectral" if n > 50 else "random",
    )
    return reducer.fit_transform(embeddings).astype(np.float32)


# The checkout this module runs from in an editable install (`make install`); in a wheel install,
# site-packages (numba_cache_dir tells them apart).
_CHECKOUT = Path(__file__).resolve().parents[2]
_CACHED_PACKAGES = ("umap", "pynndescent")
_umap_lock = threading.Lock()


def numba_cache_dir(root: Path | None = None) -> Path | None:
    """The folder for numba's compiled UMAP: ``ROOT/.kura_cache/numba/<versions>``, ROOT being the
    checkout. None outside a checkout (numba's own places are used then)."""
    if root is None:
        if not (_CHECKOUT / "pyproject.toml").is_file() or not (_CHECKOUT / "kura_pipeline").is_dir():
            return None
        root = _CHECKOUT
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for dist in ("numba", "umap-learn", "pynndescent"):
        try:
            versions.append(f"{dist}-{version(dist)}")
        except PackageNotFoundError:
            versions.append(f"{dist}-unknown")
    return Path(root) / ".kura_cache" / "numba" / "_".join(versions)


def configure_numba_cache(root: Path | None = None) -> str | None:
    """Point numba's on-disk cache at ``numba_cache_dir(root)``, unless NUMBA_CACHE_DIR is already
    set. Returns the folder numba will use, None for numba's own places. Must run before umap and
    pynndescent are imported: their functions pick their cache folder when defined."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return os.environ["NUMBA_CACHE_DIR"] or None
    folder = numba_cache_dir(root)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # writable? (numba's own test)
    except OSError:
        return None  # read-only or not a folder: numba's own places, or compiling in memory
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    if "numba" in sys.modules:  # imported already by someone else: numba reads its config again
        from numba.core import config

        config.reload_config()
    return str(folder)


def _import_umap():
    """``import umap``, numba's cache configured first and every umap/pynndescent kernel cached."""
    with _umap_lock:
        if "umap" not in sys.modules:
            configure_numba_cache()
        umap = importlib.import_module("umap")
        _cache_kernels()
    return umap


_kernels_cached = False


def _cache_kernels() -> None:
    """Give umap's and pynndescent's numba functions an on-disk cache, as ``cache=True`` would.

    umap-learn marks few of its kernels ``cache=True``: the rest (``smooth_knn_dist``,
    ``compute_membership_strengths``, the layout's epoch, ...) compiled again in every process.
    A function jitted twice with different options (umap's epoch, serial and parallel) gets a
    cache for its serial twin only: numba's cache index does not tell the options apart, so the
    two would load each other's code. Kernels with an eager signature compile at import, before
    this runs (a fraction of a second). Any failure leaves a kernel uncached (it compiles)."""
    global _kernels_cached
    if _kernels_cached:
        return
    _kernels_cached = True
    try:
        from numba.core.caching import NullCache
        from numba.core.dispatcher import Dispatcher
        from numba.core.errors import NumbaWarning
    except ImportError:
        return
    # A few of them cannot be cached (pynndescent's `nn_descent`: "dynamic globals"); numba says so
    # at each compile and compiles them, as before. Not a user's concern: silenced for these files.
    warnings.filterwarnings(
        "ignore",
        message="Cannot cache compiled function",
        category=NumbaWarning,
        module=r".*[\\/](umap|pynndescent)[\\/]",
    )
    by_function: dict[object, list] = {}
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in _CACHED_PACKAGES:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, Dispatcher) and getattr(value.py_func, "__module__", None) == name:
                twins = by_function.setdefault(value.py_func, [])
                if value not in twins:
                    twins.append(value)
    for twins in by_function.values():
        uncached = [d for d in twins if isinstance(getattr(d, "_cache", None), NullCache)]
        if len(twins) > 1:
            if len(uncached) < len(twins):
                continue  # a twin caches already (cache=True): another would share its index
            uncached = [d for d in uncached if not d.targetoptions.get("parallel")][:1]
        for dispatcher in uncached:
            # no cache folder numba can write (RuntimeError): it compiles, as before
            with contextlib.suppress(Exception):
                dispatcher.enable_caching()


def warm_umap_cache() -> str | None:
    """Compile and cache UMAP's kernels for the paths the pipeline takes below 4,096 points
    (spectral and random initialisation; from 4,096 points UMAP's neighbour search is
    pynndescent's, compiled and cached on first use). Run by ``make install``. Returns the folder
    numba cached into (None: numba's own places)."""
    rng = np.random.default_rng(0)
    for n in (60, 30):
        project_2d(rng.normal(size=(n, 16)).astype(np.float32), seed=0)
    return os.environ.get("NUMBA_CACHE_DIR") or None


def _pca_2d(embeddings: np.ndarray) -> np.ndarray:
    centred = embeddings - embeddings.mean(axis=0)
    if len(embeddings) == 1:
        return np.zeros((1, 2), dtype=np.float32)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords.astype(np.float32)


def cluster_positions(
    clusters: list[Cluster], chat_ids: list[str], coords: np.ndarray
) -> dict[str, tuple[float, float]]:
    """Each cluster at the mean position of its conversations."""
    index = {chat: i for i, chat in enumerate(chat_ids)}
    positions = {}
    for cluster in clusters:
        rows = [index[c] for c in cluster.chat_ids if c in index]
        if rows:
            x, y = coords[rows].mean(axis=0)
            positions[cluster.id] = (float(x), float(y))
    return positions


def cluster_path_per_conversation(clusters: list[Cluster]) -> dict[str, list[str]]:
    """For each conversation, its cluster ids from the base level up to the top."""
    by_id = {c.id: c for c in clusters}
    paths: dict[str, list[str]] = {}
    for cluster in clusters:
        if cluster.level != 0:
            continue
        path = [cluster.id]
        parent = cluster.parent_id
        while parent is not None and parent in by_id:  # a dangling parent ends the path
            path.append(parent)
            parent = by_id[parent].parent_id
        for chat in cluster.chat_ids:
            paths[chat] = path
    return paths


def cluster_at_each_level(clusters: list[Cluster]) -> dict[str, list[str]]:
    """For each conversation, its cluster at level 0, 1, ..., top (the hierarchy's depth for
    everyone). A level its branch skips (no parent is made with a single child) or stops below
    is filled by the nearest cluster below it, so every level is a partition of every clustered
    conversation."""
    level_of = {c.id: c.level for c in clusters}
    depth = max(level_of.values(), default=-1) + 1
    result: dict[str, list[str]] = {}
    for chat, path in cluster_path_per_conversation(clusters).items():
        at_level, step = [], 0
        for level in range(depth):
            while step + 1 < len(path) and level_of[path[step + 1]] <= level:
                step += 1
            at_level.append(path[step])
        result[chat] = at_level
    return result
