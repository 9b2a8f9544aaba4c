"""Container recipes and packaging: Dockerfile (hadolint, run-time settings),
Singularity recipe (same entry point and environment), CircleCI config (schema),
and an install from the repository into a fresh virtual environment.

Building and running the image itself needs podman: scripts/container-check.sh."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY = ROOT / "Singularity.def"
CIRCLECI = ROOT / ".circleci" / "config.yml"


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install .[test])")
    return found


def dockerfile_env() -> dict[str, str]:
    """The ENV of the final stage (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final = text.split("\nFROM ")[-1]
    env = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def singularity_sections() -> tuple[dict[str, str], dict[str, str]]:
    """Header keywords and %sections of the recipe."""
    header, sections, current = {}, {}, None
    for line in SINGULARITY.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("%"):
            current = stripped[1:].split()[0]
            sections[current] = ""
        elif current is None:
            key, _, value = stripped.partition(":")
            header[key.strip()] = value.strip()
        else:
            sections[current] += stripped + "\n"
    return header, sections


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runtime_settings():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.M), "base image not pinned"
    assert 'ENTRYPOINT ["bidsglm"]' in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    env = dockerfile_env()
    for var in ("MPLCONFIGDIR", "NUMBA_CACHE_DIR", "DENO_DIR", "XDG_CACHE_HOME"):
        assert env[var].startswith("/tmp/"), var  # writable under --read-only --tmpfs /tmp
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    for label in ("org.opencontainers.image.version", "org.opencontainers.image.source"):
        assert label in text


def test_singularity_recipe_uses_the_same_entry_point_and_environment():
    header, sections = singularity_sections()
    assert header["Bootstrap"] in ("docker-daemon", "docker", "docker-archive")
    assert header["From"].startswith("bidsglm")
    assert sections["runscript"].strip() == 'exec bidsglm "$@"'
    assert sections["test"].strip() == "bidsglm --version"
    exported = dict(re.findall(r"export (\w+)=(\S+)", sections["environment"]))
    docker_env = dockerfile_env()
    for var in ("MPLCONFIGDIR", "NUMBA_CACHE_DIR", "DENO_DIR", "XDG_CACHE_HOME", "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert exported[var] == docker_env[var], var
    # the entry point both recipes call is the package's console script
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^bidsglm = "bidsglm\.cli:main"$', pyproject, re.M)


def test_circleci_config_validates_against_its_schema():
    proc = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.circle-ci", str(CIRCLECI)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_circleci_config_covers_the_container_workflow():
    text = CIRCLECI.read_text()
    for needed in ("docker build", "--version", "--read-only", "participant", "group", "bash .ci/run",
                   "docker push", "CIRCLE_TAG"):
        assert needed in text, needed


def test_package_installs_from_the_repository_and_runs_the_demo(tmp_path):
    """A fresh virtual environment, `pip install` of a copy of the repository, then
    the console scripts: --version, the demo generator and the participant level."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "*.egg-info", "build", "__pycache__", "demo_data", "demo_output"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(source)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    bin_dir = venv / "bin"
    from bidsglm import __version__

    version = subprocess.run([str(bin_dir / "bidsglm"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and __version__ in version.stdout + version.stderr
    data, out = tmp_path / "demo", tmp_path / "out"
    subprocess.run([str(bin_dir / "bidsglm-demo"), str(data), "--subjects", "1", "--voxel-size", "6"],
                   check=True, capture_output=True)
    run = subprocess.run([str(bin_dir / "bidsglm"), str(data), str(out), "participant", "-q",
                          "--contrast", "congruent_correct", "--no-reports"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Version"] == __version__
    assert len(list(out.rglob("*_stat-z_statmap.nii.gz"))) == 3  # two runs and the subject
