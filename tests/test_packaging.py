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
from conftest import installed_tool

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
SINGULARITY = ROOT / "Singularity.def"
CIRCLECI = ROOT / ".circleci" / "config.yml"




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
    proc = subprocess.run([installed_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runtime_settings():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", text, re.M), "base image not pinned"
    assert 'ENTRYPOINT ["bidsglm"]' in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    env = dockerfile_env()
    # no fixed cache folder: a shared path breaks the second user of a node (issue 20);
    # bidsglm/caches.py chooses per-user folders
    for var in ("MPLCONFIGDIR", "NUMBA_CACHE_DIR", "DENO_DIR", "XDG_CACHE_HOME", "PYTHONDONTWRITEBYTECODE"):
        assert var not in env, var
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["PATH"].count("/opt/bidsglm/bin") == 1
    # bytecode and numba kernels compiled at build time, and found at run time
    assert "__pycache__" not in text and "PYTHONDONTWRITEBYTECODE" not in text  # bytecode is kept
    assert re.search(r"compileall .*--invalidation-mode unchecked-hash", text.replace("\\\n", " "))
    shipped = env["BIDSGLM_NUMBA_SHIPPED"]
    assert re.search(rf"NUMBA_CACHE_DIR={re.escape(shipped)} python3 -m bidsglm\.caches", text)
    assert env["NUMBA_CPU_NAME"] == "generic"  # the shipped kernels are valid on any x86-64 host
    # reproducible: the lock file installs the dependencies, the revision is stamped
    assert "--require-hashes -r requirements.lock" in text and "--no-deps /src" in text
    for label in ("org.opencontainers.image.version", "org.opencontainers.image.source",
                  "org.opencontainers.image.revision=\"${VCS_REF}\""):
        assert label in text
    assert env["BIDSGLM_CONTAINER_IMAGE"] == '"${IMAGE_NAME}:${VERSION}"'


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for name in (".git", ".venv", "tests"):
        assert name in ignored


def test_lock_file_pins_every_dependency_within_pyproject_ranges():
    """requirements.lock (the image's environment) satisfies pyproject.toml: every
    dependency pinned with hashes, each version inside its range."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = (ROOT / "requirements.lock").read_text()
    pins = {canonicalize_name(name): version for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M)}
    assert pins and lock.count("--hash=sha256:") >= len(pins)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{name} is not in requirements.lock (regenerate it)"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {dep.specifier}"
    assert re.search(r"^#\s+uv pip compile pyproject\.toml .*-o requirements\.lock$", lock, re.M)


def test_singularity_recipe_builds_from_the_published_image():
    header, sections = singularity_sections()
    assert header["Bootstrap"] == "docker"  # no Docker daemon needed on a cluster
    assert re.fullmatch(r"bidsglm/bidsglm:\d+\.\d+\.\d+", header["From"])
    from bidsglm import __version__

    assert header["From"].endswith(f":{__version__}")
    assert sections["runscript"].strip() == 'exec bidsglm "$@"'
    assert sections["test"].strip() == "bidsglm --version"
    # the image's ENV and labels come through; repeating them doubled PATH and
    # made apptainer warn about every label ("already exists ... not overwriting")
    assert "environment" not in sections and "labels" not in sections
    # the entry point both recipes call is the package's console script
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^bidsglm = "bidsglm\.cli:main"$', pyproject, re.M)
    # the commands the comments give for registry and offline builds
    text = SINGULARITY.read_text()
    assert "docker://bidsglm/bidsglm:" in text and "docker-archive://" in text


def test_circleci_config_validates_against_its_schema():
    proc = subprocess.run([installed_tool("check-jsonschema"), "--builtin-schema", "vendor.circle-ci", str(CIRCLECI)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_circleci_config_covers_the_container_workflow():
    text = CIRCLECI.read_text()
    for needed in ("docker build", "--version", "--read-only", "participant", "group", "bash .ci/run",
                   "docker push", "CIRCLE_TAG", "VCS_REF=", "IMAGE_NAME="):
        assert needed in text, needed


def copy_of_the_repository(tmp_path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "*.egg-info", "build", "__pycache__", "demo_data", "demo_output"))
    return source


def assert_console_scripts_run_the_demo(bin_dir: Path, tmp_path):
    """--version, the demo generator and the participant level of an installed package."""
    from bidsglm import __version__

    version = subprocess.run([str(bin_dir / "bidsglm"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and __version__ in version.stdout + version.stderr
    data, out = tmp_path / "demo", tmp_path / "out"
    subprocess.run([str(bin_dir / "bidsglm-demo"), str(data), "--subjects", "1", "--voxel-size", "6"],
                   check=True, capture_output=True)
    run = subprocess.run([str(bin_dir / "bidsglm"), str(data), str(out), "participant", "-q",
                          "--contrast", "congruent_correct", "--no-reports"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr  # (reports read no package data: their test is test_reports)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["GeneratedBy"][0]["Version"] == __version__
    assert len(list(out.rglob("*_stat-z_statmap.nii.gz"))) == 3  # two runs and the subject


@pytest.mark.slow
def test_package_installs_from_the_repository_and_runs_the_demo(tmp_path):
    """A fresh virtual environment, `pip install` of a copy of the repository with every
    dependency resolved from its declared ranges, then the console scripts (a minute: pip
    installs the whole numerical stack; the default run has the fast variant below)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # --no-compile: byte-compiling every dependency's modules was a third of the test's CPU time;
    # the commands below compile what they import
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-compile",
                          str(copy_of_the_repository(tmp_path))], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert_console_scripts_run_the_demo(venv / "bin", tmp_path)


def test_installed_package_carries_its_data_and_console_scripts(tmp_path):
    """A non-editable install (built from a copy of the repository, not this checkout) into a
    fresh virtual environment that borrows the test environment's dependencies: package data
    (the demo's events, the fsLR meshes) and console scripts work without the source tree.
    Whether the declared dependencies suffice is the next test's question."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    # a .pth line adds a folder to sys.path without running that folder's own .pth files,
    # so this checkout's editable install stays invisible to the new environment
    borrowed = [path for path in sys.path if path.endswith("site-packages")]
    (site_packages / "borrowed_dependencies.pth").write_text("\n".join(borrowed) + "\n")
    # the validator is a dependency's executable, looked up beside the interpreter
    (venv / "bin" / "bids-validator-deno").symlink_to(installed_tool("bids-validator-deno"))
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                          "--no-deps", "--no-build-isolation", "--no-compile", str(copy_of_the_repository(tmp_path))],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import bidsglm; print(bidsglm.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(site_packages), where.stdout
    mesh = subprocess.run([str(venv / "bin" / "python"), "-c", "from bidsglm.surfaces import template_mesh; "
                           "print(len(template_mesh('fsLR', 'R')[0]))"], capture_output=True, text=True, cwd=tmp_path)
    assert mesh.stdout.strip() == "32492", mesh.stderr[-2000:]  # the shipped fsLR 32k mesh
    assert_console_scripts_run_the_demo(venv / "bin", tmp_path)


def test_every_imported_distribution_is_declared():
    """Each third-party module that bidsglm/ imports belongs to a distribution named in
    pyproject's dependencies (or, for the Dask front door, its `dask` extra): an undeclared
    import works here only because the test extras or nilearn happen to bring it."""
    import ast
    import importlib.metadata
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-") for req in requirements}

    declared = names(project["dependencies"]) | names(project["optional-dependencies"]["dask"])
    declared |= {"distributed"} if "dask" in declared else set()  # dask[distributed]
    modules = set()
    for path in (ROOT / "bidsglm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m != "bidsglm"}
    assert {"numpy", "nilearn", "bids", "numba"} <= third_party  # the scan itself works
    distributions = importlib.metadata.packages_distributions()
    undeclared = {module: distributions.get(module) for module in third_party
                  if not {d.lower().replace("_", "-") for d in distributions.get(module, [])} & declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_version_and_help_load_no_numerical_stack():
    """`bidsglm --version` must start fast (containers, every worker): the command
    line imports numpy, pandas and numba only when a level runs."""
    code = ("import sys, bidsglm.cli; heavy = {'numpy', 'pandas', 'numba', 'nilearn', 'scipy'} & set(sys.modules); "
            "print(sorted(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
