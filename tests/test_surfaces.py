"""Surfaces and grayordinates: CIFTI dtseries and GIfTI pairs at both levels.

The test data are built here with nibabel, with the structure of fMRIPrep's outputs:
a ``space-fsLR_den-test_bold.dtseries.nii`` (``den-91k`` when its cortex is on fsLR's 32k mesh) whose brain models are a left and a right
cortex (vertex subsets of a mesh: the medial wall is left out, as in the real file's
29,696 of 32,492 left vertices) followed by subcortical voxel structures on a 2 mm grid,
a series axis in seconds; and ``hemi-L|R_space-fsaverage5_bold.func.gii`` pairs of
10,242 vertices per hemisphere (one data array per volume). Meshes are tiny (a grid
of triangles) where no mesh is needed. Signal follows condition ``A`` in a known patch.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsglm.cli import main
from bidsglm import surfaces

TR = 2.0
N_VOL = 80
N_SIDE = 24  # grid mesh of N_SIDE x N_SIDE vertices per hemisphere
MEDIAL = np.arange(40)  # vertices left out of the CIFTI cortex models (a "medial wall")
VOX_SHAPE = (6, 6, 6)
VOX_AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
PATCH = np.arange(300, 330)  # elements carrying the signal (left cortex)


def grid_faces(n: int) -> np.ndarray:
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    return np.vstack([np.c_[a, b, c], np.c_[b, d, c]])


def cifti_models(n_vertex: int = N_SIDE * N_SIDE, medial=MEDIAL, extra_voxel: bool = False):
    keep = np.setdiff1d(np.arange(n_vertex), medial)
    left = nib.cifti2.BrainModelAxis.from_surface(keep, n_vertex, "CortexLeft")
    right = nib.cifti2.BrainModelAxis.from_surface(keep, n_vertex, "CortexRight")
    thal = np.zeros(VOX_SHAPE, bool)
    thal[1:4, 1:4, 1:3] = True
    if extra_voxel:
        thal[5, 5, 5] = True
    put = np.zeros(VOX_SHAPE, bool)
    put[3:5, 2:5, 3:6] = True
    vox_l = nib.cifti2.BrainModelAxis.from_mask(thal, "ThalamusLeft", VOX_AFFINE)
    vox_r = nib.cifti2.BrainModelAxis.from_mask(put, "PutamenRight", VOX_AFFINE)
    return left + right + vox_l + vox_r


def events_table() -> pd.DataFrame:
    onsets_a = np.arange(10, N_VOL * TR - 20, 40.0)
    onsets_b = onsets_a + 20
    rows = [(o, 10.0, "A") for o in onsets_a] + [(o, 10.0, "B") for o in onsets_b]
    return pd.DataFrame(rows, columns=["onset", "duration", "trial_type"]).sort_values("onset")


def task_signal() -> np.ndarray:
    frame = np.arange(N_VOL) * TR
    box = np.zeros(N_VOL)
    for onset in events_table().query("trial_type == 'A'")["onset"]:
        box[(frame >= onset) & (frame < onset + 10)] = 1
    hrf = np.exp(-((np.arange(0, 30, TR) - 6) ** 2) / 8)
    return np.convolve(box, hrf)[:N_VOL]


def gifti_patch() -> np.ndarray:
    """30 neighbouring vertices of the left fsaverage5 hemisphere (nearest to vertex 300 on the sphere)."""
    from nilearn import datasets

    sphere = np.asarray(datasets.load_fsaverage("fsaverage5")["sphere"].parts["left"].coordinates)
    return np.sort(np.argsort(np.linalg.norm(sphere - sphere[300], axis=1))[:30])


def simulate_series(rng, n_elements: int, amplitude: float = 2.0, patch=PATCH) -> np.ndarray:
    data = 100 + rng.normal(0, 1, (N_VOL, n_elements))
    data[:, patch] += amplitude * task_signal()[:, None]
    return data.astype(np.float32)


def confounds(rng) -> pd.DataFrame:
    cols = {n: np.cumsum(rng.normal(0, 0.02, N_VOL)) for n in
            ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")}
    cols["framewise_displacement"] = np.r_[np.nan, np.abs(rng.normal(0.1, 0.03, N_VOL - 1))]
    return pd.DataFrame(cols)


def make_dataset(root: Path, kind: str, subjects=("01", "02"), runs=(1, 2), seed=0, step=TR,
                 n_vertex: int | None = None, models_for=None, patch=PATCH) -> Path:
    """A raw dataset with events and a derivatives/fmriprep folder of CIFTI or GIfTI runs.

    ``models_for(sub, run)`` may return other brain models for one run (a bad input)."""
    rng = np.random.default_rng(seed)
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "surf", "BIDSVersion": "1.8.0"}))
    pd.DataFrame({"participant_id": [f"sub-{s}" for s in subjects],
                  "age": np.arange(len(subjects)) + 20.0}).to_csv(root / "participants.tsv", sep="\t", index=False)
    (root / "task-test_bold.json").write_text(json.dumps({"RepetitionTime": TR}))
    fmriprep = root / "derivatives" / "fmriprep"
    fmriprep.mkdir(parents=True)
    (fmriprep / "dataset_description.json").write_text(json.dumps(
        {"Name": "fMRIPrep", "BIDSVersion": "1.8.0", "DatasetType": "derivative"}))
    for sub in subjects:
        raw, out = root / f"sub-{sub}" / "func", fmriprep / f"sub-{sub}" / "func"
        raw.mkdir(parents=True)
        out.mkdir(parents=True)
        for run in runs:
            stem = f"sub-{sub}_task-test_run-{run}"
            events_table().to_csv(raw / f"{stem}_events.tsv", sep="\t", index=False)
            confounds(rng).to_csv(out / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False,
                                  na_rep="n/a")
            if kind == "cifti":
                models = (models_for and models_for(sub, run)) or cifti_models()
                series = nib.cifti2.SeriesAxis(0, step, N_VOL, "SECOND")
                img = nib.Cifti2Image(simulate_series(rng, len(models), patch=patch), header=(series, models))
                img.nifti_header.set_intent("ConnDenseSeries")
                # test grids of 576 vertices are not fsLR's 32,492: another density label (den-91k names that mesh)
                den = "91k" if set(models.nvertices.values()) == {32492} else "test"
                name = f"{stem}_space-fsLR_den-{den}_bold"
                nib.save(img, out / f"{name}.dtseries.nii")
                (out / f"{name}.json").write_text(json.dumps({"RepetitionTime": TR}))
            else:
                n = n_vertex or surfaces.SHIPPED_MESHES["fsaverage5"]
                data = simulate_series(rng, 2 * n, patch=gifti_patch() if n == 10242 else PATCH)
                for hemi, part in (("L", data[:, :n]), ("R", data[:, n:])):
                    darrays = [nib.gifti.GiftiDataArray(v, intent="NIFTI_INTENT_TIME_SERIES",
                                                        datatype="NIFTI_TYPE_FLOAT32") for v in part]
                    nib.save(nib.gifti.GiftiImage(darrays=darrays),
                             out / f"{stem}_hemi-{hemi}_space-fsaverage5_bold.func.gii")
    return root


def run_cli(capsys, *args):
    code = main([*map(str, args), "--skip-bids-validation"])  # the raw dataset has no BOLD files
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if " ERROR: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def nilearn_z(Y: np.ndarray, design: pd.DataFrame, weights: dict, noise_model: str) -> np.ndarray:
    """nilearn's first-level fit on the same (time x elements) matrix: mean scaling, run_glm."""
    from nilearn.glm.contrasts import compute_contrast
    from nilearn.glm.first_level import mean_scaling, run_glm

    Ys, _ = mean_scaling(np.asarray(Y, dtype=np.float32))  # float32, as the data (and a masker) give
    labels, results = run_glm(Ys, design.to_numpy(), noise_model=noise_model, n_jobs=1)
    con = np.array([weights.get(c, 0.0) for c in design.columns])
    return compute_contrast(labels, results, con, stat_type="t").z_score()


# --- CIFTI ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifti_out(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("cifti") / "bids", "cifti", subjects=("01", "02", "03", "04"))
    out = root.parent / "out"
    code = main([str(root), str(out), "participant", "--space", "fsLR:den-test", "--contrast", "AvsB=A-B",
                 "--contrast", "A=A", "--contrast", "B=B", "--noise-model", "ols", "--skip-bids-validation"])  # OLS: exact null distribution (white noise)
    assert code == 0
    return root, out


def test_cifti_run_maps_match_nilearn(cifti_out):
    root, out = cifti_out
    func = out / "sub-01" / "func"
    z_path = func / "sub-01_task-test_run-1_space-fsLR_den-test_contrast-avsB_stat-z_statmap.dscalar.nii"
    assert z_path.is_file()
    side = json.loads((func / "sub-01_task-test_run-1_space-fsLR_den-test_contrast-avsB_stat-z_statmap.json").read_text())
    assert side["RepetitionTime"] == TR and side["SmoothingFWHM"] is None
    img = nib.load(z_path)
    bold = nib.load(root / "derivatives/fmriprep/sub-01/func/sub-01_task-test_run-1_space-fsLR_den-test_bold.dtseries.nii")
    assert img.header.get_axis(1) == bold.header.get_axis(1)  # brain models copied from the input
    design = pd.read_csv(func / "sub-01_task-test_run-1_design.tsv", sep="\t")
    expected = nilearn_z(np.asarray(bold.get_fdata()), design, side["Contrast"]["Weights"], "ols")
    np.testing.assert_allclose(img.get_fdata()[0], expected, atol=1e-4)


def test_cifti_patch_found_nulls_at_nominal_rate(cifti_out):
    _, out = cifti_out
    z = nib.load(out / "sub-01/func/sub-01_task-test_space-fsLR_den-test_contrast-avsB_stat-z_statmap.dscalar.nii").get_fdata()[0]
    assert (z[PATCH] > 3.1).all()
    null = np.delete(z, PATCH)
    rate = np.mean(null > 1.6449)  # one-sided p < 0.05
    # binomial: 5 % of ~1.1k elements, 4.5 standard deviations either side
    sd = np.sqrt(0.05 * 0.95 / null.size)
    assert abs(rate - 0.05) < 4.5 * sd, rate


def test_cifti_fixed_effects_precision_weighted(cifti_out):
    _, out = cifti_out
    func = out / "sub-02" / "func"

    def read(run, stat):
        ent = f"sub-02_task-test{'_run-' + str(run) if run else ''}_space-fsLR_den-test"
        return nib.load(func / f"{ent}_contrast-avsB_stat-{stat}_statmap.dscalar.nii").get_fdata()[0]

    eff = np.array([read(r, "effect") for r in (1, 2)])
    var = np.array([read(r, "variance") for r in (1, 2)])
    w = 1 / var
    np.testing.assert_allclose(read(None, "effect"), (eff * w).sum(0) / w.sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(read(None, "variance"), 1 / w.sum(0), rtol=1e-5)


def test_cifti_series_step_checked_against_sidecar(tmp_path, capsys):
    root = make_dataset(tmp_path / "bids", "cifti", subjects=("01",), runs=(1,), step=1.5)
    code, err = run_cli(capsys, root, tmp_path / "out", "participant", "--space", "fsLR")
    assert code == 65
    assert "CIFTI series axis (1.5 s) differs" in one_error_line(err)
    assert not list((tmp_path / "out").rglob("*_statmap*"))


def test_cifti_brain_models_differing_between_runs_refused(tmp_path, capsys):
    root = make_dataset(tmp_path / "bids", "cifti", subjects=("01",),
                        models_for=lambda sub, run: cifti_models(extra_voxel=True) if run == 2 else None)
    code, err = run_cli(capsys, root, tmp_path / "out", "participant", "--space", "fsLR")
    assert code == 65
    assert "must share brain models" in one_error_line(err)
    assert not list((tmp_path / "out").rglob("*_statmap*"))  # refused before any fit


def test_smoothing_refused_on_cifti_not_on_the_fslr_mesh(tmp_path, capsys):
    """These test data's cortex has 576 vertices, not the shipped fsLR 32k mesh's 32,492."""
    root = make_dataset(tmp_path / "bids", "cifti", subjects=("01",), runs=(1,))
    code, err = run_cli(capsys, root, tmp_path / "out", "participant", "--space", "fsLR",
                        "--smoothing-fwhm", "4")
    assert code == 65
    assert "the data are not on this mesh" in one_error_line(err)
    assert not (tmp_path / "out" / "sub-01").exists()


# --- GIfTI pairs ----------------------------------------------------------------------

GIFTI_ENT = "space-fsaverage5"


@pytest.fixture(scope="module")
def gifti_out(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("gifti") / "bids", "gifti", subjects=("01", "02", "03"),
                        runs=(1,), seed=1)
    out = root.parent / "out"
    code = main([str(root), str(out), "participant", "--space", "fsaverage5", "--contrast", "AvsB=A-B",
                 "--skip-bids-validation"])  # default AR(1) model
    assert code == 0
    return root, out


def test_gifti_pair_fitted_as_one_run_matches_nilearn(gifti_out):
    root, out = gifti_out
    func = out / "sub-01" / "func"
    base = f"sub-01_task-test_run-1_hemi-%s_{GIFTI_ENT}_contrast-avsB_stat-z_statmap.shape.gii"
    z = np.concatenate([nib.load(func / (base % h)).darrays[0].data for h in "LR"])
    side = json.loads((func / f"sub-01_task-test_run-1_{GIFTI_ENT}_contrast-avsB_stat-z_statmap.json").read_text())
    src = root / "derivatives/fmriprep/sub-01/func"
    Y = np.hstack([np.stack([d.data for d in nib.load(src / f"sub-01_task-test_run-1_hemi-{h}_{GIFTI_ENT}_bold.func.gii").darrays])
                   for h in "LR"])
    design = pd.read_csv(func / "sub-01_task-test_run-1_design.tsv", sep="\t")
    np.testing.assert_allclose(z, nilearn_z(Y, design, side["Contrast"]["Weights"], "ar1"), atol=1e-4)
    assert (z[gifti_patch()] > 3.1).all()
    # the subject map of a single run is that run's map, per hemisphere
    sub = func / f"sub-01_task-test_hemi-R_{GIFTI_ENT}_contrast-avsB_stat-z_statmap.shape.gii"
    np.testing.assert_array_equal(nib.load(sub).darrays[0].data, z[10242:])


@pytest.mark.parametrize("problem", ["vertex count", "missing hemisphere"])
def test_bad_gifti_pairs_refused(tmp_path, capsys, problem):
    root = make_dataset(tmp_path / "bids", "gifti", subjects=("01",), runs=(1,))
    right = root / f"derivatives/fmriprep/sub-01/func/sub-01_task-test_run-1_hemi-R_{GIFTI_ENT}_bold.func.gii"
    if problem == "missing hemisphere":
        right.unlink()
    else:
        img = nib.load(right)
        nib.save(nib.gifti.GiftiImage(darrays=[nib.gifti.GiftiDataArray(d.data[:-2], datatype="NIFTI_TYPE_FLOAT32")
                                               for d in img.darrays]), right)
    code, err = run_cli(capsys, root, tmp_path / "out", "participant", "--space", "fsaverage5")
    assert code == 65
    line = one_error_line(err)
    assert ("differ in vertex count" in line) if problem == "vertex count" else ("found 0 hemi-R" in line)
    assert not list((tmp_path / "out").rglob("*_statmap*"))


# --- group level ----------------------------------------------------------------------

def subject_effects(out: Path, ent: str, subjects, kind: str) -> np.ndarray:
    rows = []
    for sub in subjects:
        func = out / f"sub-{sub}" / "func"
        if kind == "cifti":
            rows.append(nib.load(func / f"sub-{sub}_task-test_{ent}_contrast-avsB_stat-effect_statmap.dscalar.nii").get_fdata()[0])
        else:
            rows.append(np.concatenate([nib.load(func / f"sub-{sub}_task-test_hemi-{h}_{ent}_contrast-avsB_stat-effect_statmap.shape.gii").darrays[0].data for h in "LR"]))
    return np.array(rows)


def test_cifti_group_one_sample_and_voxelwise_permutations(cifti_out, capsys):
    from scipy import stats

    _, out = cifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsLR", "--height-control", "fdr",
                        "--permutations", "100", "--random-seed", "1")
    assert code == 0, err
    group = out / "group"
    ent = "task-test_space-fsLR_den-test_contrast-avsB"
    t = nib.load(group / f"{ent}_stat-t_statmap.dscalar.nii").get_fdata()[0]
    Y = subject_effects(out, "space-fsLR_den-test", ("01", "02", "03", "04"), "cifti")
    t_ref = stats.ttest_1samp(Y, 0).statistic
    np.testing.assert_allclose(t, t_ref, rtol=1e-4)
    # 4 subjects: all 16 sign flips; voxel-wise FWE p = share of flips whose max |t| reaches |t|
    flips = np.array(np.meshgrid(*[[1, -1]] * 4)).reshape(4, -1).T
    null_max = np.array([np.abs(stats.ttest_1samp(f[:, None] * Y, 0).statistic).max() for f in flips])
    p_ref = (null_max[None, :] >= np.abs(t_ref)[:, None] * (1 - 1e-9)).mean(axis=1)
    logp = nib.load(group / f"{ent}_stat-logp_desc-voxelFWE_statmap.dscalar.nii").get_fdata()[0]
    np.testing.assert_allclose(logp, -np.log10(p_ref), atol=1e-4)
    # the test cortex (a 24 x 24 grid) is not the fsLR 32k mesh: no cluster inference, said why
    assert not list(group.glob("*clustersizeFWE*"))
    thr = json.loads((group / f"{ent}_stat-z_desc-thresholded_statmap.json").read_text())
    assert "not available" in thr["ClusterTable"] and "576 vertices" in thr["ClusterTable"]


def test_cifti_cluster_options_on_a_mesh_not_matching_refused(cifti_out, capsys):
    """The test cortex has 576 vertices, not fsLR 32k's 32,492: cluster options are refused (bad data)."""
    _, out = cifti_out
    words = "on a mesh of 576 vertices, but the fsLR template mesh shipped has 32492"
    for extra in (["--cluster-extent", "5"], ["--permutations", "10", "--tfce"]):
        before = sorted(out.rglob("*"))
        code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsLR", *extra)
        assert code == 65
        assert words in one_error_line(err)
        assert sorted(out.rglob("*")) == before  # refused before anything is written


def test_gifti_group_clusters_on_the_mesh(gifti_out, capsys):
    import scipy.sparse as sp
    from nilearn import datasets
    from scipy.sparse.csgraph import connected_components

    _, out = gifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsaverage5",
                        "--height-control", "fpr", "--alpha", "0.01", "--cluster-extent", "3")
    assert code == 0, err
    group = out / "group"
    ent = "task-test_space-fsaverage5_contrast-avsB"
    kept = np.concatenate([nib.load(group / f"{ent.replace('task-test_', 'task-test_hemi-' + h + '_')}"
                                            f"_stat-z_desc-thresholded_statmap.shape.gii").darrays[0].data for h in "LR"])
    table = pd.read_csv(group / f"{ent}_clusters.tsv", sep="\t")
    assert len(table) >= 1 and table.loc[0, "hemisphere"] == "L" and table.loc[0, "vertex"] in gifti_patch()
    # reference: from the z map and the recorded height threshold, connected components (scipy) of the
    # positive and negative supra-threshold vertices per hemisphere; components below 3 vertices dropped
    z = np.concatenate([nib.load(group / f"{ent.replace('task-test_', 'task-test_hemi-' + h + '_')}"
                                         f"_stat-z_statmap.shape.gii").darrays[0].data for h in "LR"])
    threshold = json.loads((group / f"{ent}_stat-z_desc-thresholded_statmap.json").read_text())["Threshold"]
    fs = datasets.load_fsaverage("fsaverage5")
    sizes, expected = [], np.zeros(z.size, bool)
    for offset, part in ((0, "left"), (10242, "right")):
        faces = np.asarray(fs["pial"].parts[part].faces)
        edges = np.vstack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        values = z[offset:offset + 10242]
        for sign in (1, -1):
            above = sign * values >= threshold
            e = edges[above[edges[:, 0]] & above[edges[:, 1]]]
            graph = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(10242, 10242))
            _, labels = connected_components(graph, directed=False)
            counts = np.bincount(labels, weights=above)
            big = above & (counts[labels] >= 3)
            expected[offset:offset + 10242] |= big
            sizes += [int(c) for c in counts if c >= 3]
    np.testing.assert_array_equal(kept != 0, expected)
    assert sorted(sizes) == sorted(table["cluster_size_vertices"])
    assert expected.sum() < (np.abs(z) >= threshold).sum()  # the extent removed small clusters
    assert (table["cluster_size_mm2"] > 0).all()
    # the peak's label: the MNI volume atlas at its fsaverage5 coordinate (lookup checked in test_mesh_clusters)
    from bidsglm.atlases import surface_labeller

    label = surface_labeller(["aal"])
    for _, row in table.iterrows():
        assert row["aal_peak"] == label(row[["x", "y", "z"]].to_numpy(float))["aal_peak"]


def test_surface_reports_list_maps_and_tables(gifti_out, capsys, with_reports):
    _, out = gifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsaverage5",
                        "--height-control", "fpr", "--alpha", "0.01")
    assert code == 0, err
    page = (out / "group" / "report.html").read_text()
    assert "contrast-avsB_stat-z_statmap.shape.gii" in page and "clusters.tsv" in page
    assert "<th>Peak z</th>" in page and "<th>peak_z</th>" not in page  # cluster table headers in words
    code, err = run_cli(capsys, out.parent / "bids", out, "participant", "--space", "fsaverage5",
                        "--reports-only")
    assert code == 0, err
    assert "stat-t_statmap.shape.gii" in (out / "sub-01.html").read_text()


def test_cifti_group_repeated_measures_anova(cifti_out, capsys):
    """Two conditions: the repeated-measures F equals the squared paired t (scipy)."""
    from scipy import stats

    _, out = cifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsLR", "--group-model", "anova",
                        "--conditions", "A", "B")
    assert code == 0, err
    F = nib.load(out / "group" / "task-test_space-fsLR_den-test_contrast-effectOfCondition_stat-F_statmap.dscalar.nii")
    subjects = ("01", "02", "03", "04")
    effects = {}
    for name in ("A", "B"):
        rows = []
        for sub in subjects:
            for side in (out / f"sub-{sub}" / "func").glob(f"sub-{sub}_task-test_space-fsLR_den-test_contrast-*_stat-effect_statmap.json"):
                if json.loads(side.read_text())["Contrast"]["Name"] == name:
                    rows.append(nib.load(str(side).replace(".json", ".dscalar.nii")).get_fdata()[0])
        effects[name] = np.array(rows)
    assert effects["A"].shape == effects["B"].shape == (4, F.shape[1])
    t = stats.ttest_rel(effects["A"], effects["B"]).statistic
    np.testing.assert_allclose(F.get_fdata()[0], t**2, rtol=1e-4)


def test_gifti_not_matching_the_template_mesh_refused(tmp_path, capsys):
    root = make_dataset(tmp_path / "bids", "gifti", subjects=("01",), runs=(1,), n_vertex=642)
    code, err = run_cli(capsys, root, tmp_path / "out", "participant", "--space", "fsaverage5")
    assert code == 65
    assert "642 vertices per hemisphere, but fsaverage5 has 10242" in one_error_line(err)


def test_cifti_group_covariate(cifti_out, capsys):
    """One-sample model with a mean-centred covariate: the mean's t against a numpy least-squares fit."""
    _, out = cifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsLR", "--covariates", "age")
    assert code == 0, err
    t = nib.load(out / "group" / "task-test_space-fsLR_den-test_contrast-avsB_stat-t_statmap.dscalar.nii").get_fdata()[0]
    Y = subject_effects(out, "space-fsLR_den-test", ("01", "02", "03", "04"), "cifti")
    age = np.arange(4) + 20.0
    X = np.c_[np.ones(4), age - age.mean()]
    beta, *_ = np.linalg.lstsq(X, Y, rcond=None)
    sigma2 = ((Y - X @ beta) ** 2).sum(0) / (4 - 2)
    se = np.sqrt(sigma2 * np.linalg.inv(X.T @ X)[0, 0])
    np.testing.assert_allclose(t, beta[0] / se, rtol=1e-4)


def test_gifti_tfce_on_the_mesh_matches_connected_components(gifti_out, capsys):
    """TFCE (E 1, H 2, dh 0.1) on fsaverage5 against its definition, computed with scipy's connected
    components of the mesh at every height: TFCE(v) = sum over h <= t(v) of extent(v, h)^E h^H dh."""
    import scipy.sparse as sp
    from nilearn import datasets
    from scipy import stats
    from scipy.sparse.csgraph import connected_components

    _, out = gifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsaverage5", "--permutations", "20",
                        "--tfce", "--random-seed", "3")
    assert code == 0, err
    group = out / "group"

    def read(name):
        return np.concatenate([nib.load(group / name.replace("task-test_", f"task-test_hemi-{h}_")).darrays[0].data
                               for h in "LR"])

    ent = "task-test_space-fsaverage5_contrast-avsB"
    tfce = read(f"{ent}_stat-tfce_statmap.shape.gii")
    mask = read("task-test_space-fsaverage5_contrast-avsB_mask.shape.gii") > 0
    t = stats.ttest_1samp(subject_effects(out, "space-fsaverage5", ("01", "02", "03"), "gifti"), 0).statistic
    t = np.where(mask, t, 0.0)
    fs = datasets.load_fsaverage("fsaverage5")
    edges = np.vstack([np.vstack([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]) + off for off, f in
                       ((0, np.asarray(fs["pial"].parts["left"].faces)),
                        (10242, np.asarray(fs["pial"].parts["right"].faces)))])
    expected = np.zeros(t.size)
    for sign in (1, -1):
        values = sign * t
        for i in range(1, int(values.max() / 0.1) + 1):
            h = i * 0.1
            above = mask & (values >= h)
            e = edges[above[edges[:, 0]] & above[edges[:, 1]]]
            graph = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(t.size, t.size))
            _, labels = connected_components(graph, directed=False)
            extent = np.bincount(labels, weights=above)[labels]
            expected[above] += sign * extent[above] * h**2 * 0.1
    np.testing.assert_allclose(tfce, expected, rtol=1e-4, atol=1e-3)
    assert np.abs(tfce[gifti_patch()]).min() > np.percentile(np.abs(tfce[mask]), 99)
    assert (group / f"{ent}_stat-logp_desc-tfceFWE_statmap.json").is_file()


def test_cifti_group_run_exclusion_recomputes_fixed_effects(cifti_out, capsys):
    _, out = cifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsLR", "--exclude-run", "sub-01_run-2")
    assert code == 0, err
    effect = nib.load(out / "group" / "task-test_space-fsLR_den-test_contrast-avsB_stat-effect_statmap.dscalar.nii")
    run1 = nib.load(out / "sub-01/func/sub-01_task-test_run-1_space-fsLR_den-test_contrast-avsB_stat-effect_statmap.dscalar.nii")
    others = subject_effects(out, "space-fsLR_den-test", ("02", "03", "04"), "cifti")
    expected = np.vstack([run1.get_fdata()[0], others]).mean(axis=0)  # sub-01 = its one remaining run
    np.testing.assert_allclose(effect.get_fdata()[0], expected, rtol=1e-5, atol=1e-6)


# --- CIFTI on the fsLR 32k mesh ----------------------------------------------------------

def fslr_models():
    """CIFTI brain models on the real fsLR 32k mesh: a disc of left cortex (30 mm around a vertex, medial
    wall left out) and a smaller right one, as fMRIPrep's den-91k cortex is a vertex subset of that mesh;
    plus the subcortical voxels of ``cifti_models``. Returns the models and a 25-element patch (left)."""
    parts = []
    for hemi, radius in (("L", 30.0), ("R", 15.0)):
        coords, _ = surfaces.template_mesh("fsLR", hemi)
        centre = coords[np.flatnonzero(surfaces.fslr_cortex_mask(hemi))[4000]]
        keep = np.flatnonzero(surfaces.fslr_cortex_mask(hemi) & (np.linalg.norm(coords - centre, axis=1) < radius))
        parts.append(nib.cifti2.BrainModelAxis.from_surface(keep, 32492, "Cortex" + {"L": "Left", "R": "Right"}[hemi]))
        if hemi == "L":
            patch = np.sort(np.argsort(np.linalg.norm(coords[keep] - centre, axis=1))[:25])
    voxels = cifti_models()[2 * (N_SIDE * N_SIDE - len(MEDIAL)):]
    return parts[0] + parts[1] + voxels, patch


def grayordinate_graph(models) -> "sp.csr_matrix":
    """Reference adjacency of grayordinates, built here from the brain models: cortex elements joined
    along the fsLR triangles' edges, voxels with a face in common."""
    import scipy.sparse as sp

    n = len(models)
    names = np.asarray(models.name)
    pairs = []
    for structure, hemi in (("CIFTI_STRUCTURE_CORTEX_LEFT", "L"), ("CIFTI_STRUCTURE_CORTEX_RIGHT", "R")):
        where = np.flatnonzero(names == structure)
        _, faces = surfaces.template_mesh("fsLR", hemi)
        element = dict(zip(models.vertex[where].tolist(), where.tolist()))
        for a, b in ((0, 1), (1, 2), (2, 0)):
            for u, v in zip(faces[:, a].tolist(), faces[:, b].tolist()):
                if u in element and v in element:
                    pairs.append((element[u], element[v]))
    vox = {tuple(ijk): i for i, ijk in enumerate(models.voxel.tolist()) if not models.surface_mask[i]}
    for ijk, i in vox.items():
        for axis in range(3):
            other = list(ijk)
            other[axis] += 1
            if tuple(other) in vox:
                pairs.append((i, vox[tuple(other)]))
    pairs = np.array(pairs)
    graph = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    return ((graph + graph.T) > 0).tocsr()


@pytest.fixture(scope="module")
def fslr_out(tmp_path_factory):
    models, patch = fslr_models()
    root = make_dataset(tmp_path_factory.mktemp("fslr") / "bids", "cifti", subjects=("01", "02", "03", "04"),
                        runs=(1,), seed=5, models_for=lambda sub, run: models, patch=patch)
    out = root.parent / "out"
    code = main([str(root), str(out), "participant", "--space", "fsLR", "--contrast", "AvsB=A-B",
                 "--noise-model", "ols", "--skip-bids-validation"])
    assert code == 0
    return root, out, models, patch


def test_cifti_fslr_clusters_tfce_and_permutations_on_the_mesh(fslr_out, capsys):
    """Cluster extent, the cluster table, cluster-size/mass FWE (all 16 sign flips) and TFCE on
    grayordinates, against scipy connected components of the reference grayordinate graph."""
    from scipy import stats
    from scipy.sparse.csgraph import connected_components

    _, out, models, patch = fslr_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsLR", "--height-control", "fpr",
                        "--alpha", "0.01", "--cluster-extent", "3", "--permutations", "100", "--tfce",
                        "--cluster-forming-p", "0.01", "--random-seed", "1")
    assert code == 0, err
    group = out / "group"
    ent = "task-test_space-fsLR_den-91k_contrast-avsB"

    def read(name):
        return nib.load(group / f"{ent}_{name}.dscalar.nii").get_fdata()[0]

    graph = grayordinate_graph(models)
    z, kept = read("stat-z_statmap"), read("stat-z_desc-thresholded_statmap")
    threshold = json.loads((group / f"{ent}_stat-z_desc-thresholded_statmap.json").read_text())["Threshold"]
    expected, sizes = np.zeros(z.size, bool), []
    for sign in (1, -1):
        above = sign * z >= threshold
        _, labels = connected_components(graph[above][:, above], directed=False)
        counts = np.bincount(labels)
        big = np.zeros(z.size, bool)
        big[np.flatnonzero(above)] = counts[labels] >= 3
        expected |= big
        sizes += [int(c) for c in counts if c >= 3]
    np.testing.assert_array_equal(kept != 0, expected)
    table = pd.read_csv(group / f"{ent}_clusters.tsv", sep="\t")
    assert sorted(sizes) == sorted(table["cluster_size_vertices"] + table["cluster_size_voxels"])
    top = table.iloc[0]
    assert top["structure"] == "CORTEX_LEFT" and top["hemisphere"] == "L"
    peak = np.flatnonzero((models.vertex == top["vertex"]) & (np.asarray(models.name) == "CIFTI_STRUCTURE_CORTEX_LEFT"))
    assert peak[0] in patch
    coords, _ = surfaces.template_mesh("fsLR", "L")
    np.testing.assert_allclose(top[["x", "y", "z"]].to_numpy(float), coords[top["vertex"]], atol=1e-4)
    # atlas label of the peak's template (MNI) coordinate; the lookup itself is checked against nibabel in
    # test_mesh_clusters.py: here, that the table carries it
    assert top["aal_peak"] == "Precentral_L" and "Precentral" in top["harvard_oxford_peak"]

    # permutations: every sign flip of the 4 subject maps, clusters at the cluster-forming t
    Y = subject_effects(out, "space-fsLR_den-91k", ("01", "02", "03", "04"), "cifti")
    t_threshold = stats.t.isf(0.005, 3)

    def max_size_and_tfce(t):
        best = 0
        tfce = np.zeros(t.size)
        for sign in (1, -1):
            above = sign * t > t_threshold
            if above.any():
                best = max(best, np.bincount(connected_components(graph[above][:, above], directed=False)[1]).max())
            for step in range(1, int(np.floor((sign * t).max() / 0.1)) + 1):
                above = sign * t >= step * 0.1
                labels = connected_components(graph[above][:, above], directed=False)[1]
                tfce[above] += sign * np.bincount(labels)[labels] * (step * 0.1) ** 2 * 0.1
        return best, tfce

    # the 8 flips that keep sub-04's sign; each other flip is one of these negated, which turns t
    # into -t and leaves both maxima (over both signs) as they are: all 16 of the null in half the time
    flips = 1 - 2 * ((np.arange(8)[:, None] >> np.arange(4)) & 1)
    null = 2 * [max_size_and_tfce(stats.ttest_1samp(f[:, None] * Y, 0).statistic) for f in flips]
    t = stats.ttest_1samp(Y, 0).statistic
    _, tfce = max_size_and_tfce(t)
    np.testing.assert_allclose(read("stat-tfce_statmap"), tfce, rtol=1e-3, atol=1e-2)
    p_tfce = (np.array([np.abs(n[1]).max() for n in null])[None, :] >= np.abs(tfce)[:, None] * (1 - 1e-4)).mean(1)
    np.testing.assert_allclose(read("stat-logp_desc-tfceFWE_statmap"), -np.log10(p_tfce), atol=1e-4)
    size = np.zeros(t.size)
    for sign in (1, -1):
        above = sign * t > t_threshold
        labels = connected_components(graph[above][:, above], directed=False)[1]
        size[above] = np.bincount(labels)[labels]
    p_size = np.where(size > 0, (np.array([n[0] for n in null])[None, :] >= size[:, None]).mean(1), 1.0)
    np.testing.assert_allclose(read("stat-logp_desc-clustersizeFWE_statmap"), -np.log10(p_size), atol=1e-4)
    # the patch is the largest cluster, beaten only by its mirror image (all signs flipped): p = 2/16
    np.testing.assert_allclose(p_size[patch], 2 / 16)
    assert (group / f"{ent}_desc-clustersizeFWE_clusters.tsv").is_file()


# --- smoothing on the mesh and surface figures (h-surfviz) ----------------------------

def geodesic_graph(coords: np.ndarray, faces: np.ndarray):
    """Distances along the surface for Dijkstra: each edge, plus for each pair of triangles sharing
    an edge the straight line between their opposite vertices across the unfolded pair (where it
    crosses the shared edge). Paths along edges alone overestimate distances on a triangulation by up
    to 15%; the extra links bring that down to a few percent."""
    import scipy.sparse as sp

    c, f = np.asarray(coords, float), np.asarray(faces)
    pairs = [(0, 1), (1, 2), (2, 0)]
    rows = [f[:, a] for a, b in pairs]
    cols = [f[:, b] for a, b in pairs]
    dist = [np.linalg.norm(c[f[:, a]] - c[f[:, b]], axis=1) for a, b in pairs]
    edges = np.concatenate([np.sort(f[:, [a, b]], axis=1) for a, b in pairs])
    opposite = np.concatenate([f[:, 2], f[:, 0], f[:, 1]])
    order = np.lexsort((edges[:, 1], edges[:, 0]))
    edges, opposite = edges[order], opposite[order]
    k = np.flatnonzero((edges[1:] == edges[:-1]).all(axis=1))
    i, j, p, q = edges[k, 0], edges[k, 1], opposite[k], opposite[k + 1]
    length = np.linalg.norm(c[j] - c[i], axis=1)

    def unfolded(v):  # position in the plane: i at 0, j on the x axis, v above it
        a, b = np.linalg.norm(c[v] - c[i], axis=1), np.linalg.norm(c[v] - c[j], axis=1)
        x = (a ** 2 - b ** 2 + length ** 2) / (2 * length)
        return x, np.sqrt(np.maximum(a ** 2 - x ** 2, 0))

    (xp, yp), (xq, yq) = unfolded(p), unfolded(q)
    crossing = xp + yp / (yp + yq + 1e-12) * (xq - xp)
    ok = (crossing > 0) & (crossing < length)
    rows.append(p[ok])
    cols.append(q[ok])
    dist.append(np.hypot(xp - xq, yp + yq)[ok])
    graph = sp.coo_matrix((np.concatenate(dist), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(len(c), len(c))).tocsr()
    return graph.maximum(graph.T)


def measured_fwhm(smoothed: np.ndarray, distances: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """FWHM of smoothed impulses (vertices x impulses) from their second moment about the source:
    a 2D Gaussian of FWHM f has E[d^2] = 2 sigma^2, f = sqrt(8 ln 2) sigma."""
    mass = smoothed * areas[:, None]
    second = (np.nan_to_num(distances, posinf=0.0) ** 2 * mass).sum(axis=0) / mass.sum(axis=0)
    return np.sqrt(8 * np.log(2)) * np.sqrt(second / 2)


@pytest.mark.parametrize("space, fwhm", [("fsaverage5", 4.0), ("fsaverage5", 6.0), ("fsaverage5", 8.0),
                                         ("fsLR", 6.0)])
def test_mesh_smoothing_gives_the_requested_fwhm_along_the_surface(space, fwhm):
    """fsaverage5 (and fsLR 32k) midthickness, both hemispheres: impulses at 60 random vertices, smoothed, have the
    requested FWHM measured geodesically (Dijkstra on the surface): the median within 5%, at least 95%
    of them within 15% and all within 25% (at 4 mm, near the mesh's 2-4 mm vertex spacing, a rare
    vertex among small triangles measures up to 20% wide); each impulse keeps its mass."""
    from scipy.sparse.csgraph import dijkstra

    rng = np.random.default_rng(int(fwhm))
    for hemi in surfaces.HEMIS:
        coords, faces = surfaces.template_mesh(space, hemi)
        areas = surfaces.vertex_areas(coords, faces)
        sources = rng.choice(len(coords), 30, replace=False)
        impulses = np.zeros((len(coords), sources.size))
        impulses[sources, np.arange(sources.size)] = 1 / areas[sources]
        smoothed = surfaces.mesh_smoother(coords, faces, fwhm).apply(impulses).astype(float)
        distances = dijkstra(geodesic_graph(coords, faces), indices=sources, limit=8 * fwhm).T
        measured = measured_fwhm(smoothed, distances, areas)
        error = np.abs(measured / fwhm - 1)
        assert np.mean(error < 0.15) >= 0.95 and error.max() < 0.25, measured
        assert abs(np.median(measured) / fwhm - 1) < 0.05, np.median(measured)
        np.testing.assert_allclose((smoothed * areas[:, None]).sum(axis=0), 1.0, rtol=1e-4)


def test_mesh_smoothing_on_a_flat_grid_is_the_gaussian():
    """A flat equilateral triangulation (1 mm edges): an impulse smoothed to FWHM 5 mm has the
    Gaussian's second moment (exact for this Laplacian) and its values (within 5% of the peak)."""
    n = 61
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    xy = np.c_[(j + 0.5 * (i % 2)).ravel(), (i * np.sqrt(3) / 2).ravel()]
    coords = np.c_[xy, np.zeros(n * n)]
    idx = np.arange(n * n).reshape(n, n)
    faces = []
    for r in range(n - 1):
        a, b, c, d = idx[r, :-1], idx[r, 1:], idx[r + 1, :-1], idx[r + 1, 1:]
        faces += [np.c_[a, b, c], np.c_[b, d, c]] if r % 2 == 0 else [np.c_[a, b, d], np.c_[a, d, c]]
    faces = np.vstack(faces)
    centre = idx[n // 2, n // 2]
    areas = surfaces.vertex_areas(coords, faces)
    impulse = np.zeros(n * n)
    impulse[centre] = 1 / areas[centre]
    fwhm = 5.0
    out = surfaces.mesh_smoother(coords, faces, fwhm).apply(impulse).astype(float)
    d = np.linalg.norm(coords - coords[centre], axis=1)
    sigma = fwhm / np.sqrt(8 * np.log(2))
    assert measured_fwhm(out[:, None], d[:, None], areas)[0] == pytest.approx(fwhm, rel=0.02)
    gaussian = np.exp(-d ** 2 / (2 * sigma ** 2)) / (2 * np.pi * sigma ** 2)
    assert np.abs(out - gaussian).max() < 0.05 * gaussian.max()


def test_mesh_smoother_matches_matrix_powers_and_the_heat_kernel():
    """The smoother against an independent build of its operator (cotangents from angles with
    arccos, applied n times) and against the heat kernel itself (scipy expm_multiply of
    -t A^-1 K, no time steps)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import expm_multiply

    coords, faces = surfaces.template_mesh("fsaverage5", "L")
    fwhm = 6.0
    smoother = surfaces.mesh_smoother(coords, faces, fwhm)
    n = len(coords)
    c = np.asarray(coords)
    rows, cols, vals = [], [], []
    for k in range(3):
        o, a, b = faces[:, k], faces[:, (k + 1) % 3], faces[:, (k + 2) % 3]
        u, v = c[a] - c[o], c[b] - c[o]
        angle = np.arccos(np.clip((u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1), -1, 1))
        w = 0.5 / np.tan(angle)
        rows += [a, b]
        cols += [b, a]
        vals += [w, w]
    W = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    K = sp.diags(np.asarray(W.sum(axis=1)).ravel()) - W
    tri_area = 0.5 * np.linalg.norm(np.cross(c[faces[:, 1]] - c[faces[:, 0]], c[faces[:, 2]] - c[faces[:, 0]]), axis=1)
    areas = np.bincount(faces.ravel(), np.repeat(tri_area / 3, 3), minlength=n)
    t = (fwhm / np.sqrt(8 * np.log(2))) ** 2 / 2
    step = sp.identity(n) - sp.diags(t / smoother.n_steps / areas) @ K
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3))
    ours = smoother.apply(x).astype(float)
    powered = x
    for _ in range(smoother.n_steps):  # step^n x (matrix_power itself fills in: slow)
        powered = step @ powered
    np.testing.assert_allclose(ours, powered, atol=1e-4)
    heat = expm_multiply(-t * (sp.diags(1 / areas) @ K).tocsc(), x)
    assert np.linalg.norm(ours - heat) / np.linalg.norm(heat) < 0.05
    assert np.linalg.norm(ours - x) / np.linalg.norm(x) > 0.5  # it did smooth white noise


def test_mesh_smoothing_stays_within_usable_vertices():
    """Constant data with a block of unusable vertices (zeros, as a medial wall): usable vertices
    keep the constant (nothing leaks in), unusable ones keep their values."""
    n_left = surfaces.SHIPPED_MESHES["fsaverage5"]
    geom = surfaces.Geometry("gifti", 2 * n_left, hemi_sizes=(n_left, n_left), space="fsaverage5")
    Y = np.full((4, 2 * n_left), 7.0, np.float32)
    wall = np.zeros(2 * n_left, bool)
    wall[:500] = True
    wall[n_left + 3000:n_left + 3600] = True
    Y[:, wall] = 0
    out = surfaces.smooth_elements(Y, geom, 8.0, ~wall)
    np.testing.assert_allclose(out[:, ~wall], 7.0, rtol=1e-5)
    assert (out[:, wall] == 0).all()


def test_cifti_subcortical_voxels_smoothed_as_volumes_within_their_mask():
    """A CIFTI of voxels only (no cortex, so no mesh needed): an impulse far from the mask's edge
    is scipy's Gaussian of the volume path's sigmas; a constant stays constant up to the edge."""
    from scipy.ndimage import gaussian_filter

    mask = np.zeros((30, 30, 30), bool)
    mask[2:28, 2:28, 2:28] = True
    models = nib.cifti2.BrainModelAxis.from_mask(mask, "ThalamusLeft", VOX_AFFINE)
    geom = surfaces.Geometry("cifti", len(models), brain_models=models)
    impulse = np.zeros(len(models), np.float32)
    centre = np.flatnonzero((models.voxel == [15, 15, 15]).all(axis=1))[0]
    impulse[centre] = 1
    Y = np.vstack([impulse, np.full(len(models), 3.0, np.float32)])
    out = surfaces.smooth_elements(Y, geom, 6.0, np.ones(len(models), bool))
    vol = np.zeros(mask.shape)
    vol[15, 15, 15] = 1
    expected = gaussian_filter(vol, 6.0 / np.sqrt(8 * np.log(2)) / 2.0, truncate=4.0)[tuple(models.voxel.T)]
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    np.testing.assert_allclose(out[1], 3.0, rtol=1e-5)


def gifti_smoothed_out(tmp_path: Path, capsys, fwhm: str):
    root = make_dataset(tmp_path / "bids", "gifti", subjects=("01",), runs=(1,), seed=3)
    code, err = run_cli(capsys, root, tmp_path / "out", "participant", "--space", "fsaverage5",
                        "--contrast", "AvsB=A-B", "--noise-model", "ols", "--smoothing-fwhm", fwhm)
    assert code == 0, err
    return root, tmp_path / "out"


def test_gifti_run_smoothed_on_the_mesh_matches_nilearn_on_the_smoothed_data(tmp_path, capsys):
    root, out = gifti_smoothed_out(tmp_path, capsys, "6")
    func = out / "sub-01" / "func"
    z = np.concatenate([nib.load(func / f"sub-01_task-test_run-1_hemi-{h}_{GIFTI_ENT}_contrast-avsB_stat-z_statmap"
                                        ".shape.gii").darrays[0].data for h in "LR"])
    side = json.loads((func / f"sub-01_task-test_run-1_{GIFTI_ENT}_contrast-avsB_stat-z_statmap.json").read_text())
    assert side["SmoothingFWHM"] == 6.0
    src = root / "derivatives/fmriprep/sub-01/func"
    Y = np.hstack([np.stack([d.data for d in nib.load(src / f"sub-01_task-test_run-1_hemi-{h}_{GIFTI_ENT}_bold.func.gii").darrays])
                   for h in "LR"])
    smoothed = np.hstack([surfaces.mesh_smoother(*surfaces.template_mesh("fsaverage5", h), 6.0).apply(part.T).T
                          for h, part in (("L", Y[:, :10242]), ("R", Y[:, 10242:]))])
    design = pd.read_csv(func / "sub-01_task-test_run-1_design.tsv", sep="\t")
    expected = nilearn_z(smoothed, design, {"A": 1, "B": -1}, "ols")
    np.testing.assert_allclose(z, expected, atol=1e-3)
    # smoothing raises the patch's z (signal shared by neighbours, noise averaged)
    raw = nilearn_z(Y, design, {"A": 1, "B": -1}, "ols")
    assert np.median(z[gifti_patch()]) > np.median(raw[gifti_patch()])


@pytest.mark.parametrize("space,problem", [
    ("fsaverage6", "smoothing on --space fsaverage6 needs its template mesh"),
])
def test_smoothing_refused_where_no_mesh_ships(tmp_path, capsys, space, problem):
    kind = "cifti" if space == "fsLR" else "gifti"
    root = make_dataset(tmp_path / "bids", kind, subjects=("01",), runs=(1,), n_vertex=642 if kind == "gifti" else None)
    if kind == "gifti":
        for p in root.rglob("*fsaverage5*"):
            p.rename(p.with_name(p.name.replace("fsaverage5", space)))
    code, err = run_cli(capsys, root, tmp_path / "out", "participant", "--space", space, "--smoothing-fwhm", "4")
    assert code == 64
    assert problem in one_error_line(err)
    assert not (tmp_path / "out" / "sub-01").exists()


def test_surface_reports_draw_maps_on_the_inflated_surface(gifti_out, capsys, with_reports, tmp_path):
    """Group and participant reports on fsaverage5 draw the z maps (four views each) with the
    applied threshold; they render in headless Chromium where it is installed."""
    import re
    import shutil

    _, out = gifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsaverage5",
                        "--height-control", "fpr", "--alpha", "0.01")
    assert code == 0, err
    page = (out / "group" / "report.html").read_text()
    threshold = json.loads((out / "group" / "task-test_space-fsaverage5_contrast-avsB_stat-z_desc-thresholded_"
                                             "statmap.json").read_text())["Threshold"]
    figures = re.findall(r'<figure data-vmax="([^"]+)" data-threshold="([^"]+)" data-vertices-shown="(\d+)">', page)
    assert [f[1] for f in figures[:2]] == ["None", repr(float(threshold))]  # then FWE maps of earlier tests
    kept = np.concatenate([nib.load(out / "group" / f"task-test_hemi-{h}_space-fsaverage5_contrast-avsB_stat-z_desc-"
                                                    "thresholded_statmap.shape.gii").darrays[0].data for h in "LR"])
    assert int(figures[1][2]) == int((kept != 0).sum())  # the caption counts the vertices drawn
    assert "fsaverage5 inflated surface" in page and "No template mesh" not in page
    code, err = run_cli(capsys, out.parent / "bids", out, "participant", "--space", "fsaverage5", "--reports-only")
    assert code == 0, err
    sub = (out / "sub-01.html").read_text()
    assert sub.count("<figure") == 2  # the subject's map and its one run's, on one scale
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        from test_reports import assert_renders

        assert_renders(out / "group" / "report.html", tmp_path, min_images=2)
        assert_renders(out / "sub-01.html", tmp_path, min_images=2)


def test_cifti_report_says_no_mesh_in_one_line_and_lists_tables(cifti_out, capsys, with_reports):
    _, out = cifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsLR")
    assert code == 0, err
    page = (out / "group" / "report.html").read_text()
    assert "stat-z_statmap.dscalar.nii" in page
    try:
        surfaces.template_mesh("fsLR", "L")
    except Exception:  # no fsLR mesh in this build: one line says so
        assert page.count("No template mesh is available for --space fsLR") == 1 and "<img" not in page
    else:  # these test data are not on the fsLR 32k mesh: each map says it is not drawn, and why
        assert "not drawn (576 vertices in hemisphere L, the template mesh has" in page


def test_cifti_maps_drawn_through_the_template_mesh_accessor(cifti_out, capsys, monkeypatch):
    """Once a mesh is served for fsLR (here a stand-in: the tests' 24 x 24 grid, the vertex count of these
    data), CIFTI cortex values are drawn on it through the brain models: the medial wall's vertices (not in
    the brain models) stay background."""
    from bidsglm import surfacereports
    from bidsglm.surfacefigures import Hemisphere, render_view

    _, out = cifti_out
    code, err = run_cli(capsys, out.parent / "bids", out, "group", "--space", "fsLR", "--no-reports")
    assert code == 0, err
    idx = np.arange(N_SIDE * N_SIDE)
    grid = np.c_[np.zeros(idx.size), idx % N_SIDE * 3.0, idx // N_SIDE * 3.0]  # a flat sheet facing +-x
    real = surfaces.template_mesh

    def mesh(space, hemi=None, surface="midthickness"):
        if space == "fsLR" and hemi is not None:
            return grid, grid_faces(N_SIDE)
        return real(space, hemi, surface)

    monkeypatch.setattr(surfaces, "template_mesh", mesh)
    surfacereports._display_meshes.cache_clear()
    try:
        page = surfacereports.group_report(out / "group").read_text()
        z_maps = list((out / "group").glob("*_stat-z_statmap.dscalar.nii"))
        assert "No template mesh" not in page and "not drawn" not in page
        assert page.count("<img") >= len(z_maps) >= 1  # each z map (and its thresholded map) drawn
        z_path = out / "group" / "task-test_space-fsLR_den-test_contrast-avsB_stat-z_statmap.dscalar.nii"
        values, geom = surfaces.read_map(z_path)
        parts = surfacereports._hemisphere_values(values.astype(float), geom, {"L": idx.size, "R": idx.size})
        assert np.isnan(parts["L"][MEDIAL]).all() and np.isfinite(np.delete(parts["L"], MEDIAL)).all()
        left = values[geom.brain_models.name == "CIFTI_STRUCTURE_CORTEX_LEFT"]
        np.testing.assert_array_equal(np.delete(parts["L"], MEDIAL), left)
        image, vertex = render_view(Hemisphere(grid, grid_faces(N_SIDE), parts["L"]), "L", "lateral", 2.0,
                                    (150, 150), vmax=5.0, threshold=None)
        wall = np.isin(vertex, MEDIAL)
        assert wall.any() and ((image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2]))[wall].all()
    finally:
        surfacereports._display_meshes.cache_clear()


def test_cifti_cortex_smoothed_on_the_mesh_served_for_fslr(monkeypatch):
    """Once a mesh is served for fsLR (a stand-in here: the tests' grid, whose vertex count these brain
    models use), CIFTI cortex is smoothed on it between the vertices in the brain models (the medial
    wall is not data), the subcortical voxels as volumes; a mesh of another size is refused (65)."""
    from bidsglm.errors import DataError

    models = cifti_models()
    geom = surfaces.Geometry("cifti", len(models), brain_models=models)
    n = N_SIDE * N_SIDE
    xy = np.c_[np.arange(n) % N_SIDE * 2.0, np.arange(n) // N_SIDE * 2.0, np.zeros(n)]
    faces = grid_faces(N_SIDE)
    real = surfaces.template_mesh
    monkeypatch.setattr(surfaces, "template_mesh", lambda space, hemi=None, surface="midthickness":
                        (xy, faces) if space == "fsLR" and hemi else real(space, hemi, surface))
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((3, len(models))).astype(np.float32)
    usable = np.ones(len(models), bool)
    out = surfaces.smooth_elements(Y, geom, 5.0, usable)
    keep = np.setdiff1d(np.arange(n), MEDIAL)
    left = np.flatnonzero(models.name == "CIFTI_STRUCTURE_CORTEX_LEFT")
    full = np.zeros((n, 3), np.float32)
    full[keep] = Y[:, left].T
    inside = np.zeros(n, bool)
    inside[keep] = True
    expected = surfaces.mesh_smoother(xy, faces, 5.0, inside).apply(full)[keep].T
    np.testing.assert_allclose(out[:, left], expected, atol=1e-6)
    assert np.abs(out[:, left] - Y[:, left]).mean() > 0.3  # it smoothed
    voxels = np.flatnonzero(models.volume_mask)
    assert not np.allclose(out[:, voxels], Y[:, voxels])
    surfaces.check_smoothing("fsLR", 5.0, geom)  # the data are on this mesh
    monkeypatch.setattr(surfaces, "template_mesh", lambda space, hemi=None, surface="midthickness": (xy[:100], faces[:10]))
    with pytest.raises(DataError, match="the data are not on this mesh"):
        surfaces.check_smoothing("fsLR", 5.0, geom)
