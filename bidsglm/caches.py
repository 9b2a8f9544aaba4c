"""Cache folders that work for every user on a shared machine.

numba (compiled permutation kernels), matplotlib (font cache) and deno (the BIDS
validator) keep caches on disk. A fixed shared path breaks on a cluster node:
the first user creates it, every other user cannot write it. So caches live in
a per-user, per-version folder, ``<tmp>/bidsglm-<uid>/<version>/<tool>``
(``<tmp>`` is ``$BIDSGLM_CACHE_DIR`` if set, else the system temporary folder),
used only if this user owns it and no one else can write it. Otherwise a private
``mkdtemp`` folder is used, and where not even that works numba runs without
its cache. An unusable cache never fails a run; it costs at most one warning.

A container image can ship numba's compiled kernels (``BIDSGLM_NUMBA_SHIPPED``,
compiled at build time): they are copied into the per-user numba cache, so the
first group run loads them instead of compiling.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import __version__

log = logging.getLogger("bidsglm")
_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("%s", message)


def usable_dir(path: Path, private: bool = False) -> bool:
    """``path`` is (or can be made) a folder this user can write into; ``private``:
    also owned by this user and writable by no one else (numba loads pickled code
    from its cache, so a cache another user can write is not used)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.is_dir():
            return False
        if private:
            st = path.stat()
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return False
        with tempfile.TemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def _private_tree(top: Path, leaf: Path) -> bool:
    """Every folder from ``top`` down to ``leaf`` is private to this user."""
    levels = [leaf, *[p for p in leaf.parents if p == top or top in p.parents]]
    return all(usable_dir(p, private=True) for p in reversed(levels))


def _user_root() -> Path:
    base = os.environ.get("BIDSGLM_CACHE_DIR") or tempfile.gettempdir()
    return Path(base) / f"bidsglm-{os.geteuid()}" / __version__


def user_cache_dir(tool: str) -> Path | None:
    """The per-user, per-version cache folder of ``tool``; a private temporary
    folder when that is unusable; None when no folder can be written at all."""
    root = _user_root()
    path = root / tool
    if _private_tree(root.parent, path):
        return path
    try:
        private = Path(tempfile.mkdtemp(prefix=f"bidsglm-{tool}-"))
    except OSError:
        _warn_once(f"no writable cache folder for {tool} ({path} is not usable and the temporary "
                   "folder is not writable); running without it")
        return None
    _warn_once(f"cache folder {path} is not usable (another user's, or not writable); "
               f"using {private} for this run")
    return private


def _in_tree_writable(package_dir: Path) -> bool:
    """numba's default cache: the package's own __pycache__ (a development install)."""
    return usable_dir(package_dir / "__pycache__")  # writable; numba's own requirement


def _seed_from_shipped(cache: Path) -> None:
    """Copy kernels compiled at image build time into ``cache`` (files it lacks)."""
    shipped = os.environ.get("BIDSGLM_NUMBA_SHIPPED")
    if not shipped or not Path(shipped).is_dir():
        return
    try:
        for source in Path(shipped).rglob("*"):
            target = cache / source.relative_to(shipped)
            if source.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif not target.exists():
                shutil.copyfile(source, target)
    except OSError:  # a partial copy only means some kernels compile
        pass


def configure_numba(package_dir: Path) -> bool:
    """Choose numba's cache folder before numba is imported; return whether
    ``cache=True`` can be used at all."""
    given = os.environ.get("NUMBA_CACHE_DIR")
    if given:
        if usable_dir(Path(given)):
            _seed_from_shipped(Path(given))
            return True
        _warn_once(f"NUMBA_CACHE_DIR={given} is not a folder this user can write")
    elif not os.environ.get("BIDSGLM_NUMBA_SHIPPED") and _in_tree_writable(package_dir):
        return True  # numba's default, beside the sources
    cache = user_cache_dir("numba")
    if cache is None:
        os.environ.pop("NUMBA_CACHE_DIR", None)
        return False
    _seed_from_shipped(cache)
    os.environ["NUMBA_CACHE_DIR"] = str(cache)  # also for worker processes
    if "numba" in sys.modules:  # numba read its configuration when first imported
        sys.modules["numba"].config.CACHE_DIR = str(cache)
    return True


def configure_tool_caches() -> None:
    """Per-user folders for matplotlib and other XDG caches where the user set none
    and HOME is not writable (containers, some platforms). deno's folder is chosen
    where the validator runs (validation.py: --work-dir, else a per-user folder)."""
    if os.access(Path.home(), os.W_OK):
        return
    for var, tool in (("MPLCONFIGDIR", "matplotlib"), ("XDG_CACHE_HOME", "xdg")):
        if var not in os.environ:
            path = user_cache_dir(tool)
            if path is not None:
                os.environ[var] = str(path)


def compile_kernels() -> None:
    """Compile every permutation kernel, for the dtypes the group level uses, into
    numba's cache (run at image build time with NUMBA_CACHE_DIR pointing at the
    folder the image ships as BIDSGLM_NUMBA_SHIPPED)."""
    import numpy as np

    from .permutation import PermutationOptions, permutation_design, run_permutations

    rng = np.random.default_rng(0)
    mask = np.zeros((6, 6, 6), bool)
    mask[1:-1, 1:-1, 1:-1] = True
    n = 8
    designs = [permutation_design(np.ones((n, 1)), [1.0]),
               permutation_design(np.c_[np.ones(n), rng.normal(size=n)], [[0.0, 1.0]], f_test=True)]
    for dtype in (np.float64, np.float32):
        Y = rng.normal(size=(n, int(mask.sum()))).astype(dtype)
        for design in designs:
            for tfce in (True, False):
                run_permutations(Y, design, mask, PermutationOptions(20, seed=0, tfce=tfce))


if __name__ == "__main__":  # python -m bidsglm.caches: compile the kernels into the cache
    compile_kernels()
    if not any(Path(os.environ.get("NUMBA_CACHE_DIR", ".")).rglob("*.nbi")):
        sys.exit("bidsglm.caches: no kernel was written to NUMBA_CACHE_DIR")
