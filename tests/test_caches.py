"""Cache folders on shared machines: per user and version, and an unusable cache
never fails a run (bidsglm/caches.py, used by clusterkernels before numba loads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bidsglm import __version__, caches

ROOT = Path(__file__).resolve().parents[1]
OTHER_UID = 65534  # nobody


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache base, no numba settings from outside, warnings re-armed;
    whatever configure_numba sets is undone afterwards."""
    import tempfile

    monkeypatch.setenv("BIDSGLM_CACHE_DIR", str(tmp_path / "base"))
    for var in ("NUMBA_CACHE_DIR", "BIDSGLM_NUMBA_SHIPPED"):
        monkeypatch.setenv(var, "")  # recorded, so restored (or removed) afterwards
        monkeypatch.delenv(var)
    if "numba" in sys.modules:
        monkeypatch.setattr(sys.modules["numba"].config, "CACHE_DIR", sys.modules["numba"].config.CACHE_DIR)
    monkeypatch.setattr(caches, "_warned", False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path


def tempfile_module():
    import tempfile

    return tempfile


def test_user_cache_dir_is_per_user_and_version(fresh):
    path = caches.user_cache_dir("numba")
    assert path == fresh / "base" / f"bidsglm-{os.geteuid()}" / __version__ / "numba"
    assert path.is_dir() and (path.stat().st_mode & 0o777) == 0o700


def test_a_file_where_the_cache_folder_should_be_falls_back_with_one_warning(fresh, caplog):
    blocked = fresh / "base" / f"bidsglm-{os.geteuid()}" / __version__
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")
    with caplog.at_level("WARNING", logger="bidsglm"):
        first = caches.user_cache_dir("numba")
        second = caches.user_cache_dir("matplotlib")
    assert first.is_dir() and second.is_dir()
    assert first.parent == second.parent == fresh / "tmp"  # private mkdtemp folders
    assert len(caplog.records) == 1 and "not usable" in caplog.records[0].getMessage()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder another user's needs root")
def test_a_cache_folder_owned_by_another_user_is_not_used(fresh, caplog):
    theirs = fresh / "base" / f"bidsglm-{os.geteuid()}" / __version__ / "numba"
    theirs.mkdir(parents=True)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    assert caches.usable_dir(theirs) and not caches.usable_dir(theirs, private=True)
    with caplog.at_level("WARNING", logger="bidsglm"):
        path = caches.user_cache_dir("numba")
    assert path != theirs and path.parent == fresh / "tmp"
    assert len(caplog.records) == 1


def test_given_numba_cache_dir_that_is_unusable_falls_back(fresh, monkeypatch, caplog):
    bad = fresh / "a-file"
    bad.write_text("")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(bad))
    with caplog.at_level("WARNING", logger="bidsglm"):
        assert caches.configure_numba(ROOT / "bidsglm") is True
    used = Path(os.environ["NUMBA_CACHE_DIR"])
    assert used == fresh / "base" / f"bidsglm-{os.geteuid()}" / __version__ / "numba"
    assert len(caplog.records) == 1 and "NUMBA_CACHE_DIR" in caplog.records[0].getMessage()


def test_no_writable_folder_at_all_means_no_caching(fresh, monkeypatch, caplog):
    monkeypatch.setattr(caches, "usable_dir", lambda path, private=False: False)

    def no_mkdtemp(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(tempfile_module(), "mkdtemp", no_mkdtemp)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/nonexistent")
    with caplog.at_level("WARNING", logger="bidsglm"):
        assert caches.configure_numba(ROOT / "bidsglm") is False
    assert "NUMBA_CACHE_DIR" not in os.environ
    assert len(caplog.records) == 1


def test_shipped_kernels_are_copied_into_the_user_cache(fresh, monkeypatch):
    shipped = fresh / "shipped" / "opt" / "site-packages" / "bidsglm"
    shipped.mkdir(parents=True)
    (shipped / "clusterkernels._find-60.py311.nbi").write_bytes(b"index")
    (shipped / "clusterkernels._find-60.py311.1.nbc").write_bytes(b"code")
    monkeypatch.setenv("BIDSGLM_NUMBA_SHIPPED", str(fresh / "shipped"))
    assert caches.configure_numba(ROOT / "bidsglm")
    cache = Path(os.environ["NUMBA_CACHE_DIR"])
    copied = cache / "opt" / "site-packages" / "bidsglm"
    assert (copied / "clusterkernels._find-60.py311.nbi").read_bytes() == b"index"
    assert (copied / "clusterkernels._find-60.py311.1.nbc").read_bytes() == b"code"
    (copied / "clusterkernels._find-60.py311.nbi").write_bytes(b"newer")  # numba updated it
    caches.configure_numba(ROOT / "bidsglm")
    assert (copied / "clusterkernels._find-60.py311.nbi").read_bytes() == b"newer"  # not overwritten


KERNEL_RUN = textwrap.dedent("""
    import numpy as np
    import bidsglm.clusterkernels as ck
    mask = np.ones((4, 4, 4), bool)
    values = np.random.default_rng(0).normal(size=64)
    print(float(ck.tfce_max(values, ck.neighbour_table(mask), True)))
    print(ck.CACHE, ck.numba.config.CACHE_DIR)
""")


def _kernel_run(env: dict, **kwargs) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "BIDSGLM_"))}
    return subprocess.run([sys.executable, "-c", KERNEL_RUN], capture_output=True, text=True,
                          env={**full, **env}, cwd="/", timeout=600, **kwargs)


def _readable_by_others(path: Path) -> bool:
    """Every folder down to ``path`` is searchable, and ``path`` readable, by other users."""
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in path.parents) and bool(path.stat().st_mode & 0o004)


def test_an_unusable_numba_cache_never_fails_the_kernels():
    """numba alone fails at import when its cache folder is unusable ("no locator
    available"); through bidsglm the kernels run, with a private folder and one warning.
    As root: the per-user folder belongs to another uid, NUMBA_CACHE_DIR is a file."""
    import tempfile

    node_tmp = Path(tempfile.mkdtemp(prefix="bidsglm-node-tmp-", dir="/tmp"))
    try:
        node_tmp.chmod(0o1777)
        blocked = node_tmp / "numba-cache-is-a-file"
        blocked.write_text("")
        theirs = node_tmp / f"bidsglm-{os.geteuid()}"
        if os.geteuid() == 0:
            theirs.mkdir()
            os.chown(theirs, OTHER_UID, OTHER_UID)
        else:
            theirs.write_text("")
        env = {"NUMBA_CACHE_DIR": str(blocked), "TMPDIR": str(node_tmp), "HOME": "/nonexistent"}
        plain = subprocess.run([sys.executable, "-c", "import numba\n@numba.njit(cache=True)\ndef f(x):\n"
                                "    return x\nprint(f(1))"], capture_output=True, text=True, cwd="/",
                               env={**os.environ, **env}, timeout=600)
        assert plain.returncode != 0 and "cannot cache" in plain.stderr  # the failure users met
        proc = _kernel_run(env)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.split("\n")
        assert float(out[0]) > 0
        assert out[1].startswith("True " + str(node_tmp / "bidsglm-numba-"))  # a private mkdtemp folder
        warnings = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(warnings) == 1 and "NUMBA_CACHE_DIR" in warnings[0], proc.stderr
    finally:
        shutil.rmtree(node_tmp, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not _readable_by_others(Path(sys.executable)),
                    reason="needs root, and a Python that other users can run")
def test_second_user_on_a_node_runs_the_kernels():
    """The reported failure: a shared /tmp where the first user made the cache folder;
    the second user (another uid) still runs the kernels, with one warning."""
    import tempfile

    node_tmp = Path(tempfile.mkdtemp(prefix="bidsglm-node-tmp-", dir="/tmp"))
    try:
        node_tmp.chmod(0o1777)
        shared = node_tmp / "bidsglm-cache" / "numba"
        shared.mkdir(parents=True)  # made by the first user (root here), 0755
        proc = _kernel_run({"NUMBA_CACHE_DIR": str(shared), "TMPDIR": str(node_tmp), "HOME": "/nonexistent"},
                           user=OTHER_UID, group=OTHER_UID)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout.split("\n")
        assert float(out[0]) > 0
        assert out[1] == f"True {node_tmp / f'bidsglm-{OTHER_UID}' / __version__ / 'numba'}"
        warnings = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(warnings) == 1 and "NUMBA_CACHE_DIR" in warnings[0], proc.stderr
    finally:
        shutil.rmtree(node_tmp, ignore_errors=True)


@pytest.mark.slow
def test_shipped_kernels_load_without_compiling(tmp_path):
    """Compile once (as the image build does), then a fresh user cache seeded from
    it: every kernel call in the second process is a cache hit."""
    shipped = tmp_path / "shipped"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "BIDSGLM_"))}
    subprocess.run([sys.executable, "-m", "bidsglm.caches"], check=True, timeout=900,
                   env={**env, "NUMBA_CACHE_DIR": str(shipped)})
    probe = textwrap.dedent("""
        import bidsglm.clusterkernels as ck
        from bidsglm.caches import compile_kernels
        compile_kernels()
        misses = sum(sum(f.stats.cache_misses.values()) for f in vars(ck).values() if hasattr(f, "stats"))
        hits = sum(sum(f.stats.cache_hits.values()) for f in vars(ck).values() if hasattr(f, "stats"))
        print(hits, misses, ck.numba.config.CACHE_DIR)
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=900,
                          env={**env, "BIDSGLM_NUMBA_SHIPPED": str(shipped),
                               "BIDSGLM_CACHE_DIR": str(tmp_path / "users")})
    assert proc.returncode == 0, proc.stderr
    hits, misses, where = proc.stdout.split()
    assert int(hits) > 0 and int(misses) == 0
    assert where.startswith(str(tmp_path / "users"))


def test_tool_caches_where_home_is_not_writable(fresh, monkeypatch):
    monkeypatch.setenv("HOME", str(fresh / "no-home"))  # does not exist: not writable
    for var in ("MPLCONFIGDIR", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("MPLCONFIGDIR", str(fresh / "mine"))  # the user's own setting is kept
    caches.configure_tool_caches()
    assert os.environ["MPLCONFIGDIR"] == str(fresh / "mine")
    assert os.environ["XDG_CACHE_HOME"] == str(fresh / "base" / f"bidsglm-{os.geteuid()}" / __version__ / "xdg")


def test_validator_cache_is_per_user_or_in_the_work_dir(fresh, monkeypatch, tmp_path):
    """A fixed /tmp/deno failed for the second user of a node."""
    from bidsglm import validation

    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen["DENO_DIR"] = env.get("DENO_DIR")
        return subprocess.CompletedProcess(cmd, 0, stdout='{"issues": {"issues": []}}', stderr="")

    monkeypatch.setattr(validation.subprocess, "run", fake_run)
    monkeypatch.setattr(validation, "validator_command", lambda: "bids-validator-deno")
    monkeypatch.setenv("DENO_DIR", "")
    monkeypatch.delenv("DENO_DIR")
    validation.validate_dataset(tmp_path)
    assert seen["DENO_DIR"] == str(fresh / "base" / f"bidsglm-{os.geteuid()}" / __version__ / "deno")
    validation.validate_dataset(tmp_path, tmp_path / "work")
    assert seen["DENO_DIR"] == str(tmp_path / "work" / "deno")
