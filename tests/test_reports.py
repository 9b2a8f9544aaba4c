"""HTML reports: design diagnostics against statsmodels, contents read from OUTPUT_DIR,
self-containment, --reports-only, and rendering in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bidsglm.cli import main
from bidsglm.reports import variance_inflation
from conftest import shared_path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Injected at the top of <head> of a copy of the report (the product carries no script):
# records script errors, then on load measures every image through a canvas.
CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const images = [];
  for (const im of document.images) {
    const c = document.createElement('canvas');
    c.width = im.naturalWidth; c.height = im.naturalHeight;
    let std = 0, coloured = 0;
    if (c.width && c.height) {
      const g = c.getContext('2d'); g.drawImage(im, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      let s = 0, s2 = 0, n = 0;
      for (let i = 0; i < d.length; i += 4) {
        const v = (d[i] + d[i + 1] + d[i + 2]) / 3; s += v; s2 += v * v; n += 1;
        if (v < 245) coloured += 1;
      }
      std = Math.sqrt(Math.max(s2 / n - (s / n) ** 2, 0)); coloured /= n;
    }
    images.push({alt: im.alt, complete: im.complete, w: im.naturalWidth, h: im.naturalHeight,
                 std: std, coloured: coloured});
  }
  const pre = document.createElement('pre'); pre.id = 'bidsglm-check';
  pre.textContent = JSON.stringify({errors: window.__errors, images: images, title: document.title});
  document.body.appendChild(pre);
});
</script>"""


def render(report: Path, tmp_path: Path) -> dict:
    """Open a copy of the report in headless Chromium and return what the check script saw."""
    page = report.read_text(encoding="utf-8")
    copy = tmp_path / f"check-{report.name}"
    copy.write_text(page.replace("<head>", "<head>" + CHECK_SCRIPT, 1), encoding="utf-8")
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
         "--virtual-time-budget=20000", "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="bidsglm-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the page did not finish loading in Chromium: {proc.stderr[-2000:]}"
    text = found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


def assert_renders(report: Path, tmp_path: Path, min_images: int) -> dict:
    seen = render(report, tmp_path)
    assert seen["errors"] == [], seen["errors"]
    assert len(seen["images"]) >= min_images
    for im in seen["images"]:
        assert im["complete"] and im["w"] > 100 and im["h"] > 50, im
        # not blank: varied pixels, and more than a sliver of non-white
        assert im["std"] > 5 and im["coloured"] > 0.01, im
    return seen


def assert_self_contained(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    external = [s for s in sources if not (s.startswith("data:image/png;base64,") or s.startswith("#"))]
    assert external == []
    assert "<script" not in page and "@import" not in page and "url(" not in page


# --- design diagnostics ---------------------------------------------------------

def test_variance_inflation_matches_statsmodels():
    sm = pytest.importorskip("statsmodels.stats.outliers_influence")
    rng = np.random.default_rng(0)
    a = rng.standard_normal(200)
    design = pd.DataFrame({"a": a, "b": 0.8 * a + 0.6 * rng.standard_normal(200),
                           "c": rng.standard_normal(200), "constant": 1.0})
    ours = variance_inflation(design)
    exog = design[["constant", "a", "b", "c"]].to_numpy()
    for i, col in enumerate(["a", "b", "c"], start=1):
        assert ours[col] == pytest.approx(sm.variance_inflation_factor(exog, i), rel=1e-8)
    assert "constant" not in ours.index


def test_variance_inflation_of_collinear_columns_is_infinite():
    x = np.arange(50.0)
    ours = variance_inflation(pd.DataFrame({"x": x, "y": 2 * x + 1, "z": np.sin(x), "constant": 1.0}))
    assert np.isinf(ours["x"]) and np.isinf(ours["y"]) and np.isfinite(ours["z"])


# --- reports from real outputs ------------------------------------------------------

@pytest.fixture(scope="module")
def reported(demo_small, tmp_path_factory, _no_reports_by_default):
    """Both levels with reports on the small demo: one contrast that some runs lack
    (error trials) and permutation inference at the group level."""
    import bidsglm.cli

    root, _ = demo_small
    out = tmp_path_factory.mktemp("reports") / "out"
    patch = pytest.MonkeyPatch()
    patch.setattr(bidsglm.cli, "write_reports", _no_reports_by_default)  # the real one
    try:
        assert main([str(root), str(out), "participant", "--skip-bids-validation", "-q", "--n-cpus", "2",
                     "--contrast", "IncongruentMinusCongruent=incongruent_correct - congruent_correct",
                     "--contrast", "errors=incongruent_incorrect"]) == 0
        assert main([str(root), str(out), "group", "-q", "--permutations", "20", "--random-seed", "3",
                     "--allow-incomplete",
                     "--cluster-forming-p", "0.05"]) == 0
    finally:
        patch.undo()
    return root, out


def test_participant_reports_written_and_complete(reported):
    _, out = reported
    for sub in ("01", "02"):
        report = out / f"sub-{sub}.html"
        assert report.is_file()
        assert_self_contained(report)
        page = report.read_text()
        for text in ("run-1", "run-2", "Design matrix", "Correlation between regressors",
                     "Variance inflation factors", "Contrast IncongruentMinusCongruent", "Contrast errors",
                     "mean framewise displacement", "confounds used"):
            assert text in page, (sub, text)
        # every image the page promises: the design matrix of each run (correlations and
        # contrast weights are coloured tables) and a z map per run and subject where the
        # contrast exists; 'errors' exists in run 2 of sub-01 only
        expected = 2 * 1 + 3 + (2 if sub == "01" else 0)
        assert page.count("<img ") == expected, (sub, page.count("<img "))
    # the demo's error trials are absent from some runs: the report names the dropped run and why
    pages = "".join((out / f"sub-{s}.html").read_text() for s in ("01", "02"))
    assert "absent from this run" in pages
    # MNI maps are drawn over the template: no mean image is written for MNI runs
    assert "over the MNI152 template" in pages and not list(out.rglob("*_boldref.nii.gz"))


def test_group_report_written_and_complete(reported):
    _, out = reported
    report = out / "group" / "report.html"
    assert report.is_file()
    assert_self_contained(report)
    page = report.read_text().replace("<wbr>", "")  # line-break hints in table cells
    for text in ("Participants", "Contents", "unthresholded z", "thresholded z", "Clusters",
                 "Permutation inference", "voxel FWE", "clustersize FWE", "clustermass FWE",
                 "AAL (peak)", "sign flipping", "number of rearrangements", "cluster-forming threshold"):
        assert text in page, text
    assert "NumberOfRearrangements" not in page and "ClusterFormingThreshold" not in page  # words, not fields
    # headers in words; the TSVs keep their column names
    assert ">aal_peak<" not in page and ">cluster_size_mm3<" not in page and ">peak_z<" not in page
    tsv = next((out / "group").glob("*contrast-?ncongruentMinusCongruent_clusters.tsv"))
    assert {"cluster_id", "peak_z", "cluster_size_mm3", "aal_peak"} <= set(pd.read_csv(tsv, sep="\t").columns)
    assert "the group mean (intercept)" in page and "= <code>mean</code>" not in page
    assert page.count('href="#') >= 3  # the index links to its sections


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package 'chromium')")
def test_reports_render_in_chromium(reported, tmp_path):
    _, out = reported
    seen = assert_renders(out / "sub-01.html", tmp_path, min_images=7)
    assert seen["title"] == "bidsglm participant report: sub-01"
    assert_renders(out / "group" / "report.html", tmp_path, min_images=8)


def test_reports_only_regenerates_without_refitting(reported, tmp_path, with_reports):
    root, out = reported
    work = tmp_path / "out"
    shutil.copytree(out, work)
    maps = sorted(work.rglob("*_statmap.nii.gz"))
    before = {p: p.stat().st_mtime_ns for p in maps}
    (work / "sub-02.html").unlink()
    (work / "group" / "report.html").unlink()
    assert main([str(root), str(work), "participant", "--reports-only", "--participant-label", "sub-02", "-q"]) == 0
    assert main([str(root), str(work), "group", "--reports-only", "-q"]) == 0
    assert (work / "sub-02.html").is_file() and (work / "group" / "report.html").is_file()
    assert (work / "sub-01.html").read_bytes() == (out / "sub-01.html").read_bytes()  # not selected
    assert {p: p.stat().st_mtime_ns for p in maps} == before  # nothing refitted or rewritten


def test_reports_only_without_results_is_one_line_error(tmp_path, capsys, with_reports):
    raw = tmp_path / "raw"
    raw.mkdir()
    code = main([str(raw), str(tmp_path / "empty"), "participant", "--reports-only"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 65 and len(err) == 1 and "no participant-level results" in err[0]
    code = main([str(raw), str(tmp_path / "empty"), "group", "--reports-only"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 65 and len(err) == 1 and "no group-level maps" in err[0]


def test_no_reports_option(demo_copy, tmp_path, with_reports):
    out = tmp_path / "out"
    assert main([str(demo_copy), str(out), "participant", "--skip-bids-validation", "-q", "--no-reports",
                 "--participant-label", "01", "--contrast", "congruent_correct"]) == 0
    assert list(out.rglob("*.html")) == []


# --- what the figures show ---------------------------------------------------------

FIGURE = re.compile(r'<figure data-key="[0-9a-f]+" data-glass-threshold="([^"]+)" data-voxels-shown="(\d+)" '
                    r'data-vmax="([^"]+)"><figcaption>([^<]*)</figcaption>')


def _figures(page: str, start: str, end: str | None = None) -> list[tuple[float, int, float, str]]:
    part = page[page.index(start):page.index(end) if end else None]
    return [(float(g), int(n), float(v), t) for g, n, v, t in FIGURE.findall(part)]


def _z(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj, dtype=np.float32)


def test_group_glass_brain_uses_the_applied_threshold(reported):
    _, out = reported
    page = (out / "group" / "report.html").read_text()
    side = next((out / "group").glob("*contrast-?ncongruentMinusCongruent_stat-z_desc-thresholded_statmap.json"))
    base = str(side).removesuffix("_stat-z_desc-thresholded_statmap.json")
    applied = json.loads(side.read_text())["Threshold"]
    figs = _figures(page, f'id="{Path(base).name}"', "Permutation inference")
    assert [f[3] for f in figs] == ["unthresholded z", "thresholded z"]
    for glass, shown, _, _ in figs:
        assert glass == pytest.approx(applied, abs=1e-12)  # not the default 3.09
    # the glass brain of the unthresholded map shows exactly the voxels at or above it
    z = _z(Path(f"{base}_stat-z_statmap.nii.gz"))
    assert figs[0][1] == int(np.count_nonzero(np.abs(z) >= applied))
    assert f"&ge; {applied:.3g}" in page


def test_one_colour_scale_per_contrast_across_runs_and_subject(reported):
    _, out = reported
    page = (out / "sub-01.html").read_text()
    figs = _figures(page, 'id="task-flanker-contrast-IncongruentMinusCongruent"', 'id="task-flanker-contrast-errors"')
    assert [f[3] for f in figs] == ["IncongruentMinusCongruent: subject (runs combined)",
                                    "IncongruentMinusCongruent: task-flanker run-1",
                                    "IncongruentMinusCongruent: task-flanker run-2"]
    maps = sorted((out / "sub-01").rglob("*contrast-?ncongruentMinusCongruent_stat-z_statmap.nii.gz"))
    assert len(maps) == 3
    largest = max(float(np.abs(_z(m)).max()) for m in maps)
    assert [f[2] for f in figs] == [pytest.approx(largest, rel=1e-6)] * 3
    for glass, shown, _, _ in figs:  # glass brains of unthresholded maps: |z| >= 3.09, voxels of the map
        assert glass == 3.09
    counts = sorted(int(np.count_nonzero(np.abs(_z(m)) >= 3.09)) for m in maps)
    assert sorted(f[1] for f in figs) == counts
    assert page.count('class="cbar"') >= 2  # the scale is shown, once per contrast


def test_reports_read_like_text(reported):
    _, out = reported
    page = (out / "sub-01.html").read_text()
    assert "high-pass 1/128 Hz (cosine)" in page and "smoothing 6 mm FWHM" in page
    assert "HighPassFilterCutoffHz" not in page
    dof = re.findall(r"<th>(?:residual )?degrees of freedom</th><td>([^<]*)</td>", page)
    assert dof and all(re.fullmatch(r"\d+", d) for d in dof), dof
    # contents: task, then its runs and contrasts one level below
    nav = page[page.index("<nav>"):page.index("</nav>")]
    assert re.search(r'<li><a href="#task-flanker">task-flanker</a><ul><li><a href="#task-flanker-run-1">'
                     r"run-1: design</a>", nav), nav


def test_group_report_contents_are_task_then_contrast(reported):
    _, out = reported
    page = (out / "group" / "report.html").read_text()
    nav = page[page.index("<nav>"):page.index("</nav>")]
    # task, then its contrasts one level below, in words (no file-name prefixes)
    assert re.search(r'<li><a href="#task-flanker">task flanker</a><ul><li><a href="#[^"]+">'
                     r"contrast IncongruentMinusCongruent</a>", nav), nav
    texts = re.findall(r">([^<]+)</a>", nav)
    assert texts == ["Participants", "task flanker", "contrast IncongruentMinusCongruent"], texts
    n = len(json.loads(next((out / "group").glob("*contrast-?ncongruentMinusCongruent_stat-z_statmap.json"))
                       .read_text())["Participants"])
    assert f"task flanker, contrast IncongruentMinusCongruent: one-sample t-test, {n} subjects</h3>" in page
    assert "Model <code>" not in page  # the design file is named below the heading, not as it


def test_group_contents_group_models_by_task_and_space(tmp_path):
    from bidsglm.reports import _model_names, _nav

    models = {}
    for task, space, con in [("flanker", "MNI152NLin2009cAsym", "a"), ("flanker", "MNI152NLin6Asym", "a"),
                             ("stroop", "MNI152NLin2009cAsym", "b")]:
        z = tmp_path / f"task-{task}_space-{space}_contrast-{con}_stat-z_statmap.nii.gz"
        (tmp_path / z.name.replace(".nii.gz", ".json")).write_text(json.dumps(
            {"Model": "one-sample t-test (OLS)", "SubjectContrast": con, "Participants": ["sub-01", "sub-02"]}))
        models[f"task-{task}_space-{space}_contrast-{con}_design.tsv"] = [z]
    names = _model_names(models)
    assert [n[:2] for n in names.values()] == [("task flanker, space MNI152NLin2009cAsym", "contrast a"),
                                               ("task flanker, space MNI152NLin6Asym", "contrast a"),
                                               ("task stroop, space MNI152NLin2009cAsym", "contrast b")]
    assert list(names.values())[2][2] == "task stroop, space MNI152NLin2009cAsym, contrast b: one-sample t-test, " \
                                         "2 subjects"
    one_space = {k: v for k, v in models.items() if "NLin6" not in k}
    assert [n[0] for n in _model_names(one_space).values()] == ["task flanker", "task stroop"]  # space unsaid
    nav = _nav([("t1", "task flanker", 0), ("c1", "contrast a", 1), ("t2", "task stroop", 0), ("c2", "contrast b", 1)])
    assert nav == ('<ul><li><a href="#t1">task flanker</a><ul><li><a href="#c1">contrast a</a></li></ul></li>'
                   '<li><a href="#t2">task stroop</a><ul><li><a href="#c2">contrast b</a></li></ul></li></ul>')


def _clusters(n: int, sizes, atlases=("aal", "harvard_oxford")) -> pd.DataFrame:
    """A clusters TSV as the group level writes it: ordered by peak |z|, one row per cluster."""
    table = pd.DataFrame({"cluster_id": range(1, n + 1), "x": 0.0, "y": 0.0, "z": 0.0,
                          "peak_z": np.linspace(8, 3.1, n), "peak_t": np.linspace(20, 4, n),
                          "cluster_size_voxels": sizes, "cluster_size_mm3": np.asarray(sizes) * 8.0})
    for atlas in atlases:
        table[f"{atlas}_peak"] = "Supp_Motor_Area_L"
        table[f"{atlas}_cluster"] = "60.0% Left_Lateral_Occipital_Cortex_superior_division; 40.0% Supp_Motor_Area_L"
    return table


def test_cluster_tables_have_readable_headers():
    from bidsglm.reports import cluster_table

    page = cluster_table(_clusters(3, [5, 4, 3]))
    head = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert head == ["Cluster", "x", "y", "z", "Peak z", "Peak t", "Size (voxels)", "Size (mm³)",
                    "AAL (peak)", "AAL (cluster)", "Harvard-Oxford (peak)", "Harvard-Oxford (cluster)"]
    assert "Supp_<wbr>Motor" in page  # atlas labels wrap inside their column
    # more than two atlases: an atlas's peak and cluster labels share one column
    page = cluster_table(_clusters(3, [5, 4, 3], ("aal", "harvard_oxford", "juelich", "destrieux")))
    head = re.findall(r"<th[^>]*>([^<]*)</th>", page)
    assert head[8:] == ["AAL (peak, cluster)", "Harvard-Oxford (peak, cluster)", "Jülich (peak, cluster)",
                        "Destrieux (peak, cluster)"]


def test_cluster_tables_show_the_20_largest_and_fold_the_rest():
    from bidsglm.reports import cluster_table

    rng = np.random.default_rng(1)
    sizes = rng.permutation(np.arange(1, 58)) * 3
    table = _clusters(57, sizes)
    page = cluster_table(table)
    shown, folded = page.split("<details>")
    ids = [int(i) for i in re.findall(r'<tr><td class="n">(\d+)</td>', shown)]
    largest = sorted(np.argsort(-sizes)[:20] + 1)
    assert ids == largest  # the 20 largest, in the table's order (peak |z|), not the 20 strongest peaks
    assert ids != list(range(1, 21))
    folded_ids = [int(i) for i in re.findall(r'<tr><td class="n">(\d+)</td>', folded)]
    assert sorted(ids + folded_ids) == list(range(1, 58)) and folded_ids == sorted(folded_ids)
    assert "The 20 largest of 57 clusters; 37 more below." in shown
    # a cluster's sub-peaks (1a, 1b) go with it; sizes are on the cluster's first row only
    table = pd.DataFrame({"cluster_id": ["1", "1a", "2", "3", "3a"], "peak_z": [9.0, 8, 7, 6, 5],
                          "cluster_size_voxels": [2, None, 50, 40, None]})
    shown, folded = cluster_table(table, shown=2).split("<details>")
    assert re.findall(r"<tr><td>(\w+)</td>", shown) == ["2", "3", "3a"]
    assert re.findall(r"<tr><td>(\w+)</td>", folded) == ["1", "1a"]
    assert "The 2 largest of 3 clusters; 1 more below." in shown
    assert "<details>" not in cluster_table(_clusters(20, np.arange(20)))  # nothing to fold


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package 'chromium')")
def test_four_atlases_fit_a_1400_pixel_window(tmp_path):
    from bidsglm.reports import _page, cluster_table

    atlases = ("aal", "harvard_oxford", "juelich", "destrieux")
    table = _clusters(25, np.arange(25, 0, -1), atlases)
    table["juelich_cluster"] = "43.0% GM_Visual_cortex_V1_BA17_R; 42.0% GM_Visual_cortex_V1_BA17_L; 8.0% GM_Visual"
    table["destrieux_cluster"] = "16.0% Unknown; 16.0% ctx_lh_G_oc-temp_med-Lingual; 14.0% Left-Cerebral-White-Matter"
    report = tmp_path / "clusters.html"
    report.write_bytes(_page("clusters", "<h4>Clusters</h4>" + cluster_table(table), []))
    page = report.read_text().replace("<head>", "<head><script>window.addEventListener('load', () => {"
                                      "const p = document.createElement('pre'); p.id = 'width'; p.textContent = "
                                      "document.documentElement.scrollWidth + ' ' + window.innerWidth;"
                                      "document.body.appendChild(p);});</script>", 1)
    report.write_text(page)
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--window-size=1400,1000",
         "--virtual-time-budget=5000", "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="width">(\d+) (\d+)</pre>', proc.stdout)
    assert found, proc.stderr[-2000:]
    scroll, window = int(found.group(1)), int(found.group(2))
    assert window == 1400 and scroll <= window, (scroll, window)


def test_model_text():
    from bidsglm.reports import model_text

    assert model_text({"HRFModel": "glover", "DriftModel": "cosine", "HighPassFilterCutoffHz": 1 / 128,
                       "NoiseModel": "ar1", "SmoothingFWHM": 6.0}) == \
        "HRF glover, high-pass 1/128 Hz (cosine), AR(1) noise model, smoothing 6 mm FWHM"
    assert model_text({"DriftModel": "none", "NoiseModel": "ols", "SmoothingFWHM": 0}) == \
        "no drift model, OLS (no prewhitening), no smoothing"


def test_display_resampling_matches_nilearn_nearest():
    """Each display voxel shows a value of the map: nearest neighbour, as nilearn resamples."""
    import nibabel as nib
    from nilearn.image import resample_img

    from bidsglm.figures import mni_grid, resample

    rng = np.random.default_rng(1)
    data = rng.standard_normal((40, 49, 41)).astype(np.float32)
    for affine in (np.array([[4.0, 0, 0, -78], [0, 4, 0, -114], [0, 0, 4, -72], [0, 0, 0, 1]]),
                   np.array([[-3.0, 0.3, 0, 60], [0.2, 3, 0, -100], [0, 0, 3.3, -60], [0, 0, 0, 1]])):
        grid = mni_grid()
        ours = resample(data, affine, grid.shape, grid.affine)
        ref = resample_img(nib.Nifti1Image(data, affine), target_affine=grid.affine, target_shape=grid.shape,
                           interpolation="nearest", force_resample=True, copy_header=True).get_fdata()
        # voxels exactly half-way between two source voxels may round either way
        assert np.mean(ours == ref) > 0.995


def test_brain_figure_glass_brain_is_a_signed_maximum_projection():
    from bidsglm.figures import Grid, brain_figure

    shape = (20, 24, 18)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    brain = np.zeros(shape, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    grid = Grid(shape, affine, np.where(brain, 0.5, np.nan).astype(np.float32), brain, 1)
    data = np.zeros(shape, np.float32)
    data[5, 6, 7], data[12, 6, 7], data[8, 8, 8] = 5.0, -6.0, 2.0
    fig = brain_figure(data, affine, grid, vmax=6, glass_threshold=3.0, slice_threshold=None)
    assert fig.n_shown == 2 and fig.peak_mm == (24.0, 12.0, 14.0)  # the largest |value|: -6 at (12, 6, 7)
    png = _decode_png(fig.uri)
    # glass row, gap, slice row, each as tall as the tallest view (axial: y); 3 panels + 2 gaps
    assert png.shape == (2 * 24 + 6, 24 + 20 + 20 + 12, 3)
    coronal = png[:18, 24 + 6:24 + 6 + 20]  # glass brain, coronal: x across, z up
    row = 17 - 7
    # +5 of 6 lies 2/3 of the way from the stop at +3 (255, 40, 0) to yellow (255, 255, 0) at +6
    r, g, b = (int(v) for v in coronal[row, 5])
    assert r == 255 and b == 0 and abs(g - (40 + 2 / 3 * 215)) <= 3
    assert tuple(coronal[row, 12]) == (0, 255, 255)  # -6: the negative end of the scale, cyan
    assert tuple(coronal[17 - 8, 8]) == (236, 236, 236)  # 2 < 3: not shown, the silhouette grey


def _decode_png(uri: str) -> np.ndarray:
    """Our encoder writes one IDAT with filter 0 rows; decode that independently with zlib."""
    import base64
    import struct
    import zlib

    data = base64.b64decode(uri.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(height, width, 3)


def test_projecting_on_the_map_grid_equals_projecting_the_resampled_map(monkeypatch):
    """The fast path (project on the map's own grid, resample the 2D views) draws what
    resampling the whole map to the display grid and projecting there draws."""
    import bidsglm.figures as figures

    rng = np.random.default_rng(3)
    data = (rng.standard_normal((40, 49, 41)) * 2).astype(np.float32)
    affine = np.array([[4.0, 0, 0, -78], [0, 4, 0, -114], [0, 0, 4, -72], [0, 0, 0, 1]])
    grid = figures.mni_grid()
    fast = figures._map_views(data, affine, grid, 3.09)
    monkeypatch.setattr(figures, "_axis_indices", lambda *args: None)
    slow = figures._map_views(data, affine, grid, 3.09)
    for a, b in zip(fast[0], slow[0]):  # the glass brain, pixel for pixel
        np.testing.assert_array_equal(a, b)
    # the peak: the display voxel nearest the peak voxel's centre, or the first of the display
    # voxels that repeat it
    assert all(abs(int(f) - int(s)) <= 1 for f, s in zip(fast[2], slow[2]))


def test_native_space_maps_are_drawn_over_the_run_mean(tmp_path, with_reports):
    """A BOLD-space run (the real studyforrest run) gets its mean image, the mean of the smoothed
    BOLD inside the mask as nilearn computes it, and its report draws the maps over it."""
    import nibabel as nib
    from nilearn.image import smooth_img

    root = shared_path("real", "studyforrest-localizer")
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "--space", "native", "--skip-bids-validation", "-q",
                 "--contrast", "faceMinusHouse=face - house"]) == 0
    mean = next(out.rglob("*_run-1_desc-mean_boldref.nii.gz"))
    bold = next(root.rglob("*_desc-preproc_bold.nii.gz"))
    mask_path = next(out.rglob("*_run-1_desc-brain_mask.nii.gz"))
    mask = np.asanyarray(nib.load(str(mask_path)).dataobj) > 0
    expected = smooth_img(str(bold), 6.0).get_fdata(dtype=np.float64).mean(axis=3)
    ours = np.asanyarray(nib.load(str(mean)).dataobj, dtype=np.float64)
    np.testing.assert_allclose(ours[mask], expected[mask], rtol=1e-5)
    assert (ours[~mask] == 0).all()
    page = (out / "sub-02.html").read_text()
    # the run and the subject map (runs combined), each naming the run it is drawn over
    assert page.count("over the mean BOLD image of run-1") == 2
    assert "MNI152" not in page.split("Contrast faceMinusHouse")[1]


def _count_drawn(monkeypatch) -> list:
    """Threads in which brain figures are drawn, one entry per figure."""
    import threading

    import bidsglm.figures as figures

    drawn = []
    real = figures.brain_figure
    monkeypatch.setattr(figures, "brain_figure",
                        lambda *a, **k: drawn.append(threading.current_thread().name) or real(*a, **k))
    return drawn


def test_rerun_draws_only_the_figures_of_changed_maps(reported, tmp_path, monkeypatch, with_reports):
    import nibabel as nib

    root, out = reported
    work = tmp_path / "moved" / "out"  # reuse survives moving OUTPUT_DIR
    shutil.copytree(out, work)
    drawn = _count_drawn(monkeypatch)
    before = _figures((work / "sub-01.html").read_text(), "<body>")
    assert main([str(root), str(work), "participant", "--reports-only", "--participant-label", "01", "-q"]) == 0
    assert drawn == []
    assert _figures((work / "sub-01.html").read_text(), "<body>") == before
    # a map written again with the same values (a new file, as a rerun of the participant level
    # writes it): nothing is drawn again
    z = next((work / "sub-01").rglob("*_run-1_*contrast-?ncongruentMinusCongruent_stat-z_statmap.nii.gz"))
    img = nib.load(z)
    values = np.asanyarray(img.dataobj, dtype=np.float32)
    z.unlink()
    nib.save(nib.Nifti1Image(values, img.affine, img.header), z)
    assert main([str(root), str(work), "participant", "--reports-only", "--participant-label", "01", "-q"]) == 0
    assert drawn == []
    # a map whose values changed (its largest |z|, so the contrast's colour scale, unchanged): its
    # figure alone is drawn again
    changed = np.where(np.abs(values) < 1, values / 2, values)
    assert np.abs(changed).max() == np.abs(values).max() and not np.array_equal(changed, values)
    nib.save(nib.Nifti1Image(changed, img.affine, img.header), z)
    assert main([str(root), str(work), "participant", "--reports-only", "--participant-label", "01", "-q"]) == 0
    assert len(drawn) == 1
    assert _figures((work / "sub-01.html").read_text(), "<body>") == before
    # the group report likewise: unchanged group maps are not drawn again
    assert main([str(root), str(work), "group", "--reports-only", "-q"]) == 0
    assert len(drawn) == 1


def test_participant_rerun_draws_nothing_again(reported, tmp_path, monkeypatch, with_reports):
    """The participant level run again with the same options rewrites the reports without
    drawing any figure: every map has the values it had."""
    root, out = reported
    work = tmp_path / "out"
    shutil.copytree(out, work)
    pages = {s: (work / f"sub-{s}.html").read_text() for s in ("01", "02")}
    drawn = _count_drawn(monkeypatch)
    # --n-cpus 1: the reports are drawn in this process, where brain_figure is counted
    assert main([str(root), str(work), "participant", "--skip-bids-validation", "-q", "--n-cpus", "1",
                 "--contrast", "IncongruentMinusCongruent=incongruent_correct - congruent_correct",
                 "--contrast", "errors=incongruent_incorrect"]) == 0
    assert drawn == []
    for s, page in pages.items():
        assert _STAMP.sub("", (work / f"sub-{s}.html").read_text()) == _STAMP.sub("", page)


_STAMP = re.compile(r"written \d{4}-\d\d-\d\d \d\d:\d\d")  # the time a page was written


def test_reports_drawn_in_parallel_equal_serial(reported, tmp_path, monkeypatch):
    """Reports of several subjects (processes) and the figures of one report (threads) drawn
    in parallel: the same pages, byte for byte but the time they were written."""
    from bidsglm.reports import group_report, participant_reports

    _, out = reported
    copies = {}
    for name in ("serial", "subjects", "figures"):
        copies[name] = tmp_path / name
        shutil.copytree(out, copies[name])
        for page in [*copies[name].glob("sub-*.html"), copies[name] / "group" / "report.html"]:
            page.unlink()  # nothing to reuse: every figure is drawn
    drawn = _count_drawn(monkeypatch)
    participant_reports(copies["serial"], ["01", "02"], n_jobs=1)
    group_report(copies["serial"], n_jobs=1)
    assert drawn and set(drawn) == {"MainThread"}
    participant_reports(copies["subjects"], ["01", "02"], n_jobs=2)  # worker processes
    drawn.clear()
    participant_reports(copies["figures"], ["01"], n_jobs=2)
    participant_reports(copies["figures"], ["02"], n_jobs=2)
    group_report(copies["figures"], n_jobs=2)
    assert len(drawn) > 2 and all(name.startswith("bidsglm-figure") for name in drawn)  # threads drew them
    pages = ["sub-01.html", "sub-02.html"]
    for name in ("subjects", "figures"):
        for page in pages + (["group/report.html"] if name == "figures" else []):
            serial, parallel = (copies["serial"] / page).read_bytes(), (copies[name] / page).read_bytes()
            assert _STAMP.sub("", parallel.decode()) == _STAMP.sub("", serial.decode()), (name, page)
            assert b"\x00" not in parallel  # no placeholder left
