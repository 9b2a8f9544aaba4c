"""Hostile surface and grayordinate inputs (attack findings A1, A2, B1-B5, C1, C2, E, F): each is
refused in one line with its documented exit code, or handled right, with no raw numpy warning.

Runs go through the CLI with RuntimeWarning raised as an error: a raw numpy warning on the way
would end the run with an internal error (70) instead of the code asserted."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bidsglm.cli import main
from bidsglm.errors import DataError, one_line
from test_surfaces import GIFTI_ENT, N_VOL, TR, cifti_models, make_dataset

PREP = "derivatives/fmriprep/sub-01/func"
CIFTI_BOLD = f"{PREP}/sub-01_task-test_run-1_space-fsLR_den-91k_bold.dtseries.nii"
GIFTI_BOLD = f"{PREP}/sub-01_task-test_run-1_hemi-%s_{GIFTI_ENT}_bold.func.gii"
DESIGN = "sub-01/func/sub-01_task-test_run-1_design.json"


def run_cli(capsys, *args) -> tuple[int, str]:
    """The CLI with raw RuntimeWarnings turned into errors; (exit code, stderr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        code = main([*map(str, args), "--skip-bids-validation"])
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if " ERROR: " in line]
    assert len(lines) == 1 and "Traceback" not in err and "RuntimeWarning" not in err, err
    assert all(" bidsglm " in line for line in err.strip().splitlines()), err  # nothing raw
    return lines[0]


def rewrite_cifti(root: Path, change, series=None) -> Path:
    path = root / CIFTI_BOLD
    img = nib.load(path)
    data = np.asarray(img.get_fdata(), np.float64)
    new = nib.Cifti2Image(np.asarray(change(data), np.float32),
                          header=(series or img.header.get_axis(0), img.header.get_axis(1)))
    new.nifti_header.set_intent("ConnDenseSeries")
    nib.save(new, path)
    return path


def rewrite_gifti(root: Path, change, hemis="LR", meta=None) -> None:
    for hemi in hemis:
        path = root / (GIFTI_BOLD % hemi)
        data = np.stack([d.data for d in nib.load(path).darrays]).astype(np.float64)
        darrays = [nib.gifti.GiftiDataArray(np.asarray(v, np.float32), datatype="NIFTI_TYPE_FLOAT32")
                   for v in change(data)]
        nib.save(nib.gifti.GiftiImage(darrays=darrays, meta=nib.gifti.GiftiMetaData(meta or {})), path)


def cifti_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "bids", "cifti", subjects=("01",), runs=(1,))


def gifti_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "bids", "gifti", subjects=("01",), runs=(1,))


def participant(capsys, root, out, space, *options):
    return run_cli(capsys, root, out, "participant", "--space", space, "--participant-label", "01", *options)


# --- A2 / B1: degenerate elements follow the volume rules ----------------------------------

@pytest.mark.parametrize("kind,change", [
    ("gifti", lambda Y: Y * 0),
    ("cifti", lambda Y: Y * 0 + 5),
    ("cifti", lambda Y: Y * np.nan),
])
def test_surface_run_unusable_everywhere_refused(tmp_path, capsys, kind, change):
    if kind == "cifti":
        root = cifti_dataset(tmp_path)
        rewrite_cifti(root, change)
        code, err = participant(capsys, root, tmp_path / "out", "fsLR")
        bold = CIFTI_BOLD
    else:
        root = gifti_dataset(tmp_path)
        rewrite_gifti(root, change)
        code, err = participant(capsys, root, tmp_path / "out", "fsaverage5")
        bold = GIFTI_BOLD % "L"
    assert code == 65
    line = error_line(err)
    assert Path(bold).name in line and "constant in time or non-finite in all" in line
    assert not list((tmp_path / "out").rglob("*_statmap*"))


@pytest.mark.parametrize("case", ["inf in 60%", "hemi-L constant and most of hemi-R"])
def test_surface_run_mostly_unusable_refused(tmp_path, capsys, case):
    if case == "inf in 60%":
        root = cifti_dataset(tmp_path)
        n = len(cifti_models())
        rewrite_cifti(root, lambda Y: np.where(np.arange(n) < 0.6 * n, np.inf, Y))
        code, err = participant(capsys, root, tmp_path / "out", "fsLR")
        name = Path(CIFTI_BOLD).name
    else:
        root = gifti_dataset(tmp_path)
        rewrite_gifti(root, lambda Y: Y * 0 + 100, hemis="L")
        rewrite_gifti(root, lambda Y: np.where(np.arange(Y.shape[1]) < 9000, 100, Y), hemis="R")
        code, err = participant(capsys, root, tmp_path / "out", "fsaverage5")
        name = Path(GIFTI_BOLD % "L").name
    assert code == 65
    line = error_line(err)
    assert name in line and "an empty or broken run" in line
    assert not list((tmp_path / "out").rglob("*_statmap*"))


@pytest.mark.parametrize("kind", ["gifti", "cifti"])
def test_a_few_unusable_elements_left_out_with_one_recorded_warning(tmp_path, capsys, kind):
    """50 NaN elements and 10 constant ones: left out of the run's mask, one warning (logged and in
    _design.json), VoxelsLeftOut counts them; every map finite with a positive variance."""
    bad_nan, bad_flat = np.arange(500, 550), np.arange(600, 610)

    def break_some(Y):
        Y = Y.copy()
        Y[:, bad_nan] = np.nan
        Y[:, bad_flat] = 100.0
        return Y
    out = tmp_path / "out"
    if kind == "cifti":
        root = cifti_dataset(tmp_path)
        rewrite_cifti(root, break_some)
        code, err = participant(capsys, root, out, "fsLR")
    else:
        root = gifti_dataset(tmp_path)
        rewrite_gifti(root, break_some, hemis="L")
        code, err = participant(capsys, root, out, "fsaverage5")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "left out of this run's mask" in line]
    assert len(warned) == 1 and "60 of" in warned[0], err
    assert "RuntimeWarning" not in err
    record = json.loads((out / DESIGN).read_text())
    assert record["VoxelsLeftOut"] == 60
    assert sum("left out" in w for w in record["Warnings"]) == 1
    mask_files = sorted((out / "sub-01" / "func").glob("sub-01_task-test_run-1_*desc-brain_mask*"))
    if kind == "cifti":
        mask = nib.load(mask_files[0]).get_fdata()[0] > 0
    else:
        mask = np.concatenate([nib.load(p).darrays[0].data for p in sorted(mask_files, key=lambda p: "hemi-R" in p.name)
                               if p.suffix == ".gii"]) > 0
    assert not mask[bad_nan].any() and not mask[bad_flat].any() and mask.sum() == mask.size - 60
    for path in out.rglob("sub-01_task-test_run-1_*stat-variance_statmap.*"):
        if path.suffix == ".json":
            continue
        values = nib.load(path).get_fdata()[0] if kind == "cifti" else nib.load(path).darrays[0].data
        assert np.isfinite(values).all()


# --- C1: values near the float limits ------------------------------------------------------

@pytest.mark.parametrize("kind", ["gifti", "cifti"])
def test_data_scaled_by_1e35_give_the_same_statistics(tmp_path, capsys, kind):
    """Percent signal change does not depend on the data's unit: x1e35 gives the same z maps
    (float32 sums of 1e37 overflow; the means are taken in float64 there), no raw warning."""
    zs = []
    for scale in (1.0, 1e35):
        base = tmp_path / f"s{scale:g}"
        root = make_dataset(base / "bids", kind, subjects=("01",), runs=(1,))
        if kind == "cifti":
            rewrite_cifti(root, lambda Y: Y * scale)
        else:
            rewrite_gifti(root, lambda Y: Y * scale)
        code, err = participant(capsys, root, base / "out", "fsLR" if kind == "cifti" else "fsaverage5",
                                "--contrast", "AvsB=A-B")
        assert code == 0, err
        assert "RuntimeWarning" not in err and "left out" not in err, err
        func = base / "out" / "sub-01" / "func"
        if kind == "cifti":
            z = nib.load(next(func.glob("*run-1*avsB_stat-z_statmap.dscalar.nii"))).get_fdata()[0]
        else:
            z = np.concatenate([nib.load(next(func.glob(f"*run-1_hemi-{h}_*avsB_stat-z_statmap.shape.gii")))
                                .darrays[0].data for h in "LR"])
        zs.append(z)
    np.testing.assert_allclose(zs[1], zs[0], atol=2e-3)


def test_data_scaled_by_1e_30_refused_with_the_true_reason(tmp_path, capsys):
    """Values near 1e-28 have a mean below 1: percent-signal scaling (nilearn's max(mean, 1)) keeps
    nothing of their variation; the refusal says so rather than only "constant"."""
    root = cifti_dataset(tmp_path)
    rewrite_cifti(root, lambda Y: Y * 1e-30)
    code, err = participant(capsys, root, tmp_path / "out", "fsLR")
    assert code == 65
    line = error_line(err)
    assert "mean signal below 1" in line and Path(CIFTI_BOLD).name in line


def test_element_means_finite_where_float32_sums_overflow():
    from bidsglm.firstlevel import element_means, mean_scaling

    Y = (np.linspace(1, 2, 40)[:, None] * np.array([1e37, 3e37, 100.0])).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mean = element_means(Y)
        scaled = mean_scaling(Y.copy(), in_place=True, mean=mean)
    np.testing.assert_allclose(mean, Y.astype(np.float64).mean(axis=0), rtol=1e-6)
    expected = 100 * (Y.astype(np.float64) / Y.astype(np.float64).mean(axis=0) - 1)
    np.testing.assert_allclose(scaled, expected, atol=1e-3)


# --- C2: one line, whatever the library says -----------------------------------------------

def test_error_messages_are_folded_onto_one_line(tmp_path, capsys):
    assert one_line("a (Expected 1 bytes\n - could it be damaged?)") == "a (Expected 1 bytes - could it be damaged?)"
    assert "\n" not in DataError("x\ny", Path("/a\nb.nii"), "row\n2").message
    root = cifti_dataset(tmp_path)
    path = root / CIFTI_BOLD
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated data
    code, err = participant(capsys, root, tmp_path / "out", "fsLR")
    assert code == 65
    assert path.name in error_line(err)
