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
CIFTI_BOLD = f"{PREP}/sub-01_task-test_run-1_space-fsLR_den-test_bold.dtseries.nii"
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


# --- B2-B4: inputs checked against their templates, brain models and TR --------------------

def relabel(root: Path, old: str, new: str) -> None:
    """Rename the preprocessed files whose names hold ``old`` to hold ``new`` (a false label)."""
    for path in (root / PREP).glob(f"*{old}*"):
        path.rename(path.with_name(path.name.replace(old, new)))


def test_vertex_count_checked_for_every_template_space(tmp_path, capsys):
    """fsaverage5 data (10,242 vertices) named fsaverage6 (40,962): refused."""
    root = gifti_dataset(tmp_path)
    relabel(root, "fsaverage5", "fsaverage6")
    code, err = participant(capsys, root, tmp_path / "out", "fsaverage6")
    assert code == 65
    assert "10242 vertices per hemisphere, but fsaverage6 has 40962" in error_line(err)


def test_cifti_density_label_checked_against_the_cortex_vertex_count(tmp_path, capsys):
    """576-vertex cortex named den-91k (fsLR 32k: 32,492 vertices per hemisphere): refused."""
    root = cifti_dataset(tmp_path)
    relabel(root, "den-test", "den-91k")
    code, err = participant(capsys, root, tmp_path / "out", "fsLR")
    assert code == 65
    line = error_line(err)
    assert "CORTEX_LEFT is on a surface of 576 vertices, but fsLR den-91k has 32492 per hemisphere" in line


@pytest.mark.parametrize("problem", ["vertex out of range", "duplicate vertex", "voxel out of range"])
def test_cifti_brain_models_validated(tmp_path, capsys, problem):
    root = cifti_dataset(tmp_path)
    path = root / CIFTI_BOLD
    img = nib.load(path)
    bm = img.header.get_axis(1)
    vertex, voxel = bm.vertex.copy(), bm.voxel.copy()
    if problem == "vertex out of range":
        vertex[5] = 99999
    elif problem == "duplicate vertex":
        vertex[5] = vertex[6]
    else:
        voxel[np.flatnonzero(bm.volume_mask)[0]] = (40, 0, 0)
    bad = nib.cifti2.BrainModelAxis(name=bm.name, voxel=voxel, vertex=vertex, affine=bm.affine,
                                    volume_shape=bm.volume_shape, nvertices=bm.nvertices)
    nib.save(nib.Cifti2Image(img.get_fdata().astype(np.float32), header=(img.header.get_axis(0), bad)), path)
    code, err = participant(capsys, root, tmp_path / "out", "fsLR")
    assert code == 65
    line = error_line(err)
    assert path.name in line
    assert {"vertex out of range": "vertex 99999, outside its surface of 576 vertices",
            "duplicate vertex": "lists a vertex twice", "voxel out of range": "outside the volume"}[problem] in line
    assert not (tmp_path / "out" / "sub-01").exists()


@pytest.mark.parametrize("series", [nib.cifti2.SeriesAxis(0, 0.0, N_VOL, "SECOND"),
                                    nib.cifti2.SeriesAxis(0, 0.5, N_VOL, "HERTZ")], ids=["step 0", "hertz"])
def test_cifti_series_axis_not_in_seconds_refused(tmp_path, capsys, series):
    root = cifti_dataset(tmp_path)
    rewrite_cifti(root, lambda Y: Y, series=series)
    code, err = participant(capsys, root, tmp_path / "out", "fsLR")
    assert code == 65
    line = error_line(err)
    assert Path(CIFTI_BOLD).name in line and ("step is 0 s" in line or "not SECOND" in line)


def test_gifti_derivative_sidecar_tr_checked_against_the_raw_one(tmp_path, capsys):
    root = gifti_dataset(tmp_path)
    sidecar = root / PREP / f"sub-01_task-test_run-1_{GIFTI_ENT}_bold.json"
    sidecar.write_text(json.dumps({"RepetitionTime": 1.0}))
    code, err = participant(capsys, root, tmp_path / "out", "fsaverage5")
    assert code == 65
    line = error_line(err)
    assert "task-test_bold.json: RepetitionTime 2 s here differs from 1 s" in line and "--allow-tr-mismatch" in line
    code, err = participant(capsys, root, tmp_path / "out2", "fsaverage5", "--allow-tr-mismatch")
    assert code == 0, err
    assert json.loads((tmp_path / "out2" / DESIGN).read_text())["RepetitionTime"] == 1.0


@pytest.mark.parametrize("step,code", [("1000", 65), ("2000", 0), ("2.0", 0)])
def test_gifti_time_step_metadata_checked(tmp_path, capsys, step, code):
    """Workbench's TimeStep (ms) or seconds, against the sidecar's 2 s."""
    root = gifti_dataset(tmp_path)
    rewrite_gifti(root, lambda Y: Y, meta={"TimeStep": step})
    got, err = participant(capsys, root, tmp_path / "out", "fsaverage5")
    assert got == code, err
    if code:
        assert "TR in the GIfTI TimeStep metadata (1 s) differs from RepetitionTime in the sidecar (2 s)" in error_line(err)


def test_gifti_design_names_both_hemispheres_and_logs_no_smoothing(tmp_path, capsys):
    root = gifti_dataset(tmp_path)
    code, err = participant(capsys, root, tmp_path / "out", "fsaverage5")
    assert code == 0, err
    sources = json.loads((tmp_path / "out" / DESIGN).read_text())["Sources"]
    assert any("hemi-L" in s for s in sources) and any("hemi-R" in s for s in sources)
    assert "smooth" not in err and "reading 80 volumes" in err


# --- group level ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def surface_outputs(tmp_path_factory):
    """Participant-level outputs of 3 subjects, GIfTI (fsaverage5) and CIFTI."""
    outs = {}
    for kind, space in (("gifti", "fsaverage5"), ("cifti", "fsLR")):
        root = make_dataset(tmp_path_factory.mktemp(kind) / "bids", kind, subjects=("01", "02", "03"), runs=(1,),
                            seed=3)
        out = root.parent / "out"
        assert main([str(root), str(out), "participant", "--space", space, "--contrast", "AvsB=A-B",
                     "--skip-bids-validation", "-q"]) == 0
        outs[kind] = (root, out)
    return outs


def read_surface_map(path: Path, kind: str) -> np.ndarray:
    if kind == "cifti":
        return nib.load(path).get_fdata()[0]
    return np.concatenate([nib.load(str(path).replace("_hemi-L_", f"_hemi-{h}_")).darrays[0].data for h in "LR"])


@pytest.mark.parametrize("kind", ["gifti", "cifti"])
def test_mixed_estimator_on_surfaces_writes_tau2_as_pymare(surface_outputs, capsys, kind):
    """A1: the tau^2 map goes through the format layer; it, the effect and t equal PyMARE's REML on
    the subject maps as written (float32 maps: 1e-4 relative), as on volumes."""
    pytest.importorskip("pymare")
    from pymare.estimators import VarianceBasedLikelihoodEstimator

    root, out = surface_outputs[kind]
    space = "fsLR" if kind == "cifti" else "fsaverage5"
    code, err = run_cli(capsys, root, out, "group", "--space", space, "--group-estimator", "mixed")
    assert code == 0, err
    ent = "space-fsLR_den-test" if kind == "cifti" else GIFTI_ENT
    suffix = "dscalar.nii" if kind == "cifti" else "shape.gii"
    hemi = "" if kind == "cifti" else "hemi-L_"
    group = out / "group"
    tau2_path = next(group.glob(f"task-test_{hemi}{ent}_contrast-*_stat-tau2_statmap.{suffix}"))
    assert not list(group.glob("*tau2*.nii.gz"))
    tau2 = read_surface_map(tau2_path, kind)
    effect = read_surface_map(group / f"task-test_{hemi}{ent}_contrast-avsB_stat-effect_statmap.{suffix}", kind)

    def subject(sub, stat):
        func = out / f"sub-{sub}" / "func"
        return read_surface_map(func / f"sub-{sub}_task-test_{hemi}{ent}_contrast-avsB_stat-{stat}_statmap.{suffix}",
                                kind)
    Y = np.array([subject(s, "effect") for s in ("01", "02", "03")], np.float64)
    V = np.array([subject(s, "variance") for s in ("01", "02", "03")], np.float64)
    cols = np.arange(0, Y.shape[1], max(1, Y.shape[1] // 300))  # 300 elements spread over the map
    est = VarianceBasedLikelihoodEstimator(method="REML", small_sample_correction="wald", xtol=1e-12,
                                           maxiter=200).fit(Y[:, cols], V[:, cols], np.ones((3, 1)))
    summary = est.summary()
    np.testing.assert_allclose(tau2[cols], np.asarray(summary.tau2).ravel(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(effect[cols], summary.get_fe_stats()["est"][0], rtol=1e-4, atol=1e-5)
    assert (tau2 >= 0).all() and np.isfinite(tau2).all()


def test_group_on_fsnative_refused(surface_outputs, capsys, tmp_path):
    import shutil

    _, out = surface_outputs["gifti"]
    native = tmp_path / "out"
    shutil.copytree(out, native, ignore=shutil.ignore_patterns("group"))
    for path in sorted(native.rglob("*fsaverage5*")):
        path.rename(path.with_name(path.name.replace("fsaverage5", "fsnative")))
    code, err = run_cli(capsys, tmp_path / "nobids", native, "group", "--space", "fsnative")
    assert code == 65
    assert "vertices do not correspond across subjects" in error_line(err)
    assert not (native / "group").exists()


@pytest.mark.parametrize("options,flag", [(("--connectivity", "26"), "--connectivity 26"),
                                          (("--connectivity", "18", "--cluster-extent", "5"), "--connectivity 18"),
                                          (("--cluster-forming-p", "0.01"), "--cluster-forming-p 0.01 needs --permutations")])
def test_options_that_do_nothing_on_surfaces_refused(surface_outputs, capsys, options, flag):
    root, out = surface_outputs["gifti"]
    code, err = run_cli(capsys, root, out, "group", "--space", "fsaverage5", *options)
    assert code == 64
    assert flag in error_line(err)


def test_group_input_with_several_maps_or_a_series_refused(surface_outputs, tmp_path):
    """B5: a subject map is a one-map dscalar; two maps (the first 100x the effect) or a series axis
    would be read as its first row: refused, naming the file."""
    from bidsglm.surfaces import read_map

    _, out = surface_outputs["cifti"]
    path = next((out / "sub-01" / "func").glob("*_contrast-avsB_stat-effect_statmap.dscalar.nii"))
    img = nib.load(path)
    values, models = img.get_fdata(), img.header.get_axis(1)
    two = tmp_path / "two.dscalar.nii"
    nib.save(nib.Cifti2Image(np.vstack([100 * values, values]).astype(np.float32),
                             header=(nib.cifti2.ScalarAxis(["a", "b"]), models)), two)
    series = tmp_path / "one.dtseries.nii"
    nib.save(nib.Cifti2Image(values.astype(np.float32), header=(nib.cifti2.SeriesAxis(0, 2.0, 1), models)), series)
    with pytest.raises(DataError, match="expected a dscalar with one map, got 2 rows") as exc:
        read_map(two)
    assert exc.value.path == two
    with pytest.raises(DataError, match="got a series"):
        read_map(series)
    np.testing.assert_array_equal(read_map(path)[0], values[0].astype(np.float32))


# --- C1 on volumes: the same class, the same code -------------------------------------------

def test_volume_bold_scaled_by_1e35_gives_the_same_maps(demo_copy, tmp_path, capsys):
    """The demo's sub-01 run-1 BOLD x1e35 (float32, finite, varying): the same z map as the data
    as they are, no raw warning (float32 means overflow; bidsglm takes them in float64 there)."""
    bold = demo_copy / "derivatives/fmriprep/sub-01/func/sub-01_task-flanker_run-1_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    zs = []
    for scale in (1.0, 1e35):
        if scale != 1.0:
            img = nib.load(bold)
            data = (np.asanyarray(img.dataobj).astype(np.float64) * scale).astype(np.float32)
            header = img.header.copy()
            header.set_data_dtype(np.float32)
            header.set_slope_inter(1, 0)
            nib.save(nib.Nifti1Image(data, img.affine, header), bold)
        out = tmp_path / f"out{scale:g}"
        code, err = run_cli(capsys, demo_copy, out, "participant", "--participant-label", "01", "-q",
                            "--smoothing-fwhm", "0", "--contrast", "congruent_correct")
        assert code == 0, err
        assert "RuntimeWarning" not in err and "left out" not in err, err
        z = next(out.rglob("sub-01_task-flanker_run-1_*contrast-congruentCorrect_stat-z_statmap.nii.gz"))
        zs.append(np.asanyarray(nib.load(z).dataobj))
    np.testing.assert_allclose(zs[1], zs[0], atol=2e-3)


def test_extreme_contrast_weights_refused_without_a_raw_warning():
    """Weights of 1e300 overflow the effect: no raw numpy warning, and the map check refuses it."""
    from bidsglm.firstlevel import RunGLM, check_statistic_maps

    rng = np.random.default_rng(0)
    X = np.column_stack([rng.standard_normal(60), np.ones(60)])
    Y = (100 + X[:, :1] * 2 + rng.standard_normal((60, 20))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        glm = RunGLM("ols").fit(Y, X)
        res = glm.contrast(np.array([1e300, 1e300]))
        with pytest.raises(DataError, match="non-finite"):
            check_statistic_maps({"effect": res.effect, "variance": res.variance, "t": res.stat})


def test_cluster_forming_p_on_a_surface_without_cluster_inference_refused(surface_outputs, capsys):
    """The test CIFTI cortex (576 vertices) is not on a shipped mesh: permutations give vertex-wise FWE
    only, so a cluster-forming p would do nothing."""
    root, out = surface_outputs["cifti"]
    code, err = run_cli(capsys, root, out, "group", "--space", "fsLR", "--permutations", "10",
                        "--cluster-forming-p", "0.01")
    assert code == 64
    line = error_line(err)
    assert "--cluster-forming-p 0.01 on --space fsLR: cluster inference is not available" in line


def test_mixed_on_surfaces_leaves_out_elements_without_a_positive_variance(surface_outputs, capsys, tmp_path):
    """As on volumes: elements where a subject's first-level variance is negative or NaN leave the
    group mask (the checks the tau^2 crash used to hide); the others are fitted."""
    import shutil

    root, out = surface_outputs["gifti"]
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("group"))
    func = copy / "sub-01" / "func"
    path = func / f"sub-01_task-test_hemi-L_{GIFTI_ENT}_contrast-avsB_stat-variance_statmap.shape.gii"
    values = nib.load(path).darrays[0].data.copy()
    values[:20] = -1.0
    values[20:40] = np.nan
    path.unlink()
    nib.save(nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(values, datatype="NIFTI_TYPE_FLOAT32")]), path)
    code, err = run_cli(capsys, root, copy, "group", "--space", "fsaverage5", "--group-estimator", "mixed")
    assert code == 0, err
    mask = read_surface_map(next((copy / "group").glob(f"*hemi-L_{GIFTI_ENT}*_mask.shape.gii")), "gifti") > 0
    assert not mask[:40].any() and mask[40:].all()
    tau2 = read_surface_map(next((copy / "group").glob(f"*hemi-L_{GIFTI_ENT}*stat-tau2_statmap.shape.gii")), "gifti")
    assert (tau2[:40] == 0).all() and np.isfinite(tau2).all()


def test_gifti_tr_checked_on_the_stats_model_path_too(tmp_path, capsys):
    """The TR checks live in participant.repetition_time, which both front doors use."""
    root = gifti_dataset(tmp_path)
    (root / PREP / f"sub-01_task-test_run-1_{GIFTI_ENT}_bold.json").write_text(json.dumps({"RepetitionTime": 1.0}))
    model = tmp_path / "model.json"
    model.write_text(json.dumps({
        "Name": "surf", "BIDSModelVersion": "1.0.0", "Input": {"task": ["test"]},
        "Nodes": [{"Level": "Run", "Name": "runs", "GroupBy": ["run", "subject"],
                   "Transformations": {"Transformer": "pybids-transforms-v1",
                                       "Instructions": [{"Name": "Factor", "Input": ["trial_type"]}]},
                   "Model": {"Type": "glm", "X": [1, "trial_type.A", "trial_type.B"]},
                   "Contrasts": [{"Name": "AvsB", "ConditionList": ["trial_type.A", "trial_type.B"],
                                  "Weights": [1, -1], "Test": "t"}]}]}))
    code, err = participant(capsys, root, tmp_path / "out", "fsaverage5", "--model", model)
    assert code == 65
    assert "RepetitionTime 2 s here differs from 1 s" in error_line(err)
