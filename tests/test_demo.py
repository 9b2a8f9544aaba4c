"""The demo generator: datasets of any size pass BIDS validation."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from bidsglm.demo import bids_sex, make_demo


def test_source_codes_become_bids_sex_values():
    assert [bids_sex(v) for v in ("M", "F", "male", "Female", "o", " m ")] == ["M", "F", "M", "F", "O", "M"]
    assert bids_sex("D") == bids_sex("") == bids_sex(float("nan")) == "n/a"


def test_demo_with_more_subjects_than_the_first_six_passes_validation(tmp_path):
    """ds000102's participants 7 and 8 have sex 'D', which BIDS does not define
    (the validator's TSV_VALUE_INCORRECT_TYPE): the demo writes n/a for them."""
    from bidsglm.validation import validate_dataset, validator_command

    root = tmp_path / "bids"
    make_demo(root, n_subjects=8, voxel_size=10, seed=3)
    table = pd.read_csv(root / "participants.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(table["participant_id"]) == [f"sub-{i:02d}" for i in range(1, 9)]
    assert set(table["sex"]) <= {"M", "F", "O", "n/a"} and list(table["sex"][6:]) == ["n/a", "n/a"]
    if validator_command() is None:
        pytest.skip("bids-validator-deno is not installed")
    validate_dataset(root, tmp_path / "work")  # raises DataError on any validation error


@pytest.mark.parametrize("kind, space, suffix", [
    pytest.param("cifti", "fsLR", "space-fsLR_den-91k_contrast-incongruentCorrect_stat-z_statmap.dscalar.nii",
                 marks=pytest.mark.slow),  # 34 MB runs; the CIFTI path on the fsLR mesh is in test_surfaces
    ("gifti", "fsaverage5", "hemi-L_space-fsaverage5_contrast-incongruentCorrect_stat-z_statmap.shape.gii"),
])
def test_surface_demo_runs_both_levels_and_finds_its_patches(tmp_path, capsys, kind, space, suffix):
    """The surface demos (the README's commands) on the real template meshes: both levels run,
    clusters are formed on the mesh, and the responding patches stand out from the rest."""
    import nibabel as nib
    import numpy as np

    from bidsglm.cli import main
    from bidsglm.demo import main as demo_main
    from bidsglm.demosurface import _patches

    root, out = tmp_path / "bids", tmp_path / "out"
    assert demo_main([str(root), "--subjects", "4", "--voxel-size", "8", "--surface", kind]) == 0
    assert main([str(root), str(out), "participant", "--space", space, "--skip-bids-validation", "-q",
                 "--contrast", "incongruent_correct"]) == 0
    assert main([str(root), str(out), "group", "--space", space, "-q", "--cluster-extent", "5",
                 "--atlases", "none"]) == 0
    z_file = next((out / "group").glob(f"*{suffix}"))
    z = np.asarray(nib.load(z_file).get_fdata() if kind == "cifti" else nib.load(z_file).darrays[0].data).ravel()
    patches, n_vertex = _patches(kind)
    responding = np.zeros(2 * n_vertex, bool)
    for patch in patches.values():
        responding |= patch
    if kind == "cifti":
        from bidsglm.demosurface import _cifti_models

        _, keep = _cifti_models(n_vertex)
        in_patch = np.r_[responding[:n_vertex][keep["L"]], responding[n_vertex:][keep["R"]]]
        z = z[:len(in_patch)]
    else:
        in_patch = responding[:n_vertex]
    assert np.median(z[in_patch]) > 3 and abs(np.median(z[~in_patch])) < 0.5
    table = next((out / "group").glob("*contrast-incongruentCorrect*clusters.tsv"))
    import pandas as pd

    clusters = pd.read_csv(table, sep="\t")
    assert len(clusters) >= 1 and (clusters["cluster_size_mm2"] > 0).all()


@pytest.mark.parametrize("args, message", [
    (["--voxel-size", "0"], "--voxel-size: 0 is outside 2..10"),
    (["--voxel-size", "2.5"], "'2.5' is not a whole number"),
    (["--subjects", "0"], "--subjects: 0 is outside 1..50"),
    (["--subjects", "-3"], "--subjects: -3 is outside 1..50"),
])
def test_demo_options_out_of_range_are_usage_errors(tmp_path, capsys, args, message):
    """--voxel-size 0 once built a 1 mm grid for ten minutes and 5 GB; --subjects 0 raised a traceback."""
    from bidsglm.demo import main as demo_main

    with pytest.raises(SystemExit) as exc:
        demo_main([str(tmp_path / "demo"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 64 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_a_file_and_a_demo_made_with_other_options(tmp_path, capsys):
    from bidsglm.demo import main as demo_main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert demo_main([str(a_file)]) == 64
    assert "exists and is not a folder" in capsys.readouterr().err
    root = tmp_path / "demo"
    assert demo_main([str(root), "--subjects", "1", "--voxel-size", "10"]) == 0
    listing = sorted(root.rglob("*"))
    assert demo_main([str(root), "--subjects", "1", "--voxel-size", "10"]) == 0  # the same: reused
    assert "reusing" in capsys.readouterr().out
    assert demo_main([str(root), "--subjects", "2", "--voxel-size", "10"]) == 64
    err = capsys.readouterr().err
    assert "made with --subjects 1 --voxel-size 10 --seed 42, not --subjects 2" in err
    assert sorted(root.rglob("*")) == listing


@pytest.mark.parametrize("signum, code, existed", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)])
def test_interrupted_demo_leaves_nothing(tmp_path, signum, code, existed):
    """Interrupted while writing subjects: the folder is removed (or emptied again, if it was
    given empty), so a rerun is not refused as 'not empty' or handed a partial dataset."""
    root = tmp_path / "demo"
    if existed:
        root.mkdir()
    # started with SIGINT ignored, as children of test workers and of shells' background jobs are
    proc = subprocess.Popen([sys.executable, "-m", "bidsglm.demo", str(root), "--subjects", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while not (root / "sub-01").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == ["bidsglm-demo: interrupted; nothing of this demo was kept"]
    assert (list(root.iterdir()) == [] if existed else not root.exists())
