"""Group models against nilearn's SecondLevelModel, statsmodels' OLS and simulated truth."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bidsglm.design import parse_contrast
from bidsglm.errors import ModelError
from bidsglm.groupmodels import (
    anova_design,
    check_enough_inputs,
    code_covariates,
    contrast_rows,
    fit_ols,
    is_estimable,
)

SHAPE = (6, 5, 4)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def _images(Y):
    """(N, V) -> list of 3D images on SHAPE (V = all voxels) and an all-ones mask."""
    imgs = [nib.Nifti1Image(row.reshape(SHAPE).astype(np.float64), AFFINE) for row in Y]
    return imgs, nib.Nifti1Image(np.ones(SHAPE, np.uint8), AFFINE)


def _nilearn_contrast(Y, design, contrast, stat_type):
    from nilearn.glm.second_level import SecondLevelModel

    imgs, mask = _images(Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SecondLevelModel(mask_img=mask).fit(imgs, design_matrix=design)
        out = model.compute_contrast(contrast, second_level_stat_type=stat_type, output_type="all")
    return {k: np.asanyarray(v.dataobj).reshape(-1) for k, v in out.items()}


def test_one_sample_with_covariates_matches_nilearn():
    rng = np.random.default_rng(0)
    n, v = 12, int(np.prod(SHAPE))
    table = pd.DataFrame({"age": rng.integers(20, 60, n).astype(str),
                          "sex": rng.choice(["F", "M"], n)}, index=[f"{i:02d}" for i in range(n)])
    design, excluded = code_covariates(table, ["age", "sex"], list(table.index))
    assert not excluded and list(design.columns) == ["mean", "age", "sex_M"]
    Y = 0.5 + 0.02 * design["age"].to_numpy()[:, None] + rng.normal(size=(n, v))
    fit = fit_ols(Y, design.to_numpy())
    for name, vec in (("mean", [1, 0, 0]), ("age", [0, 1, 0]), ("sexdiff", [0, 0, 1])):
        ours = fit.contrast(np.array(vec, float))
        ref = _nilearn_contrast(Y, design.reset_index(drop=True), vec, "t")
        # nilearn stores float32 images: compare at float32 precision
        np.testing.assert_allclose(ours.stat, ref["stat"], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(ours.z, ref["z_score"], rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(ours.effect, ref["effect_size"], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(ours.variance, ref["effect_variance"], rtol=1e-5, atol=1e-8, err_msg=name)
    assert fit.dof == n - 3


def _three_by_three(rng, n_subjects=10, v=int(np.prod(SHAPE)), interaction=0.0, noise=1.0):
    """Condition maps of a 3 x 3 within-subject design; returns Y (N, V), design, conditions."""
    conditions = [f"{a}{b}" for a in ("Ini", "Imm", "Del") for b in ("FF", "UF", "SF")]
    rows = [(f"{s:02d}", c) for s in range(n_subjects) for c in conditions]
    subject_mean = rng.normal(0, 2, size=(n_subjects, v))
    Y = np.empty((len(rows), v))
    for i, (sub, cond) in enumerate(rows):
        effect = 1.2 * ("SF" not in cond)  # faces > scrambled everywhere
        if cond in ("IniFF", "DelSF"):
            effect += interaction
        if cond in ("IniSF", "DelFF"):
            effect -= interaction
        Y[i] = subject_mean[int(sub)] + effect + rng.normal(0, noise, v)
    return Y, anova_design(rows, conditions), conditions


INTERACTION_ROWS = ["IniFF - IniSF - DelFF + DelSF", "ImmFF - ImmSF - DelFF + DelSF",
                    "IniUF - IniSF - DelUF + DelSF", "ImmUF - ImmSF - DelUF + DelSF"]


def _rows(exprs, columns):
    return contrast_rows([parse_contrast("c", e) for e in exprs], columns)


def test_anova_f_and_t_match_statsmodels():
    import statsmodels.api as sm

    rng = np.random.default_rng(1)
    Y, design, conditions = _three_by_three(rng, interaction=0.5)
    X = design.to_numpy()
    assert np.linalg.matrix_rank(X) == X.shape[1] - 1  # one column per condition and per subject
    fit = fit_ols(Y, X)
    assert fit.dof == X.shape[0] - (len(conditions) + 10 - 1)
    F = _rows(INTERACTION_ROWS, list(design.columns))
    t = _rows(["IniFF + ImmFF + DelFF - IniSF - ImmSF - DelSF"], list(design.columns))
    ours_f, ours_t = fit.contrast(F), fit.contrast(t[0])
    for voxel in (0, 7, 33, 101):
        with warnings.catch_warnings():  # statsmodels warns that X is rank deficient, as intended
            warnings.simplefilter("ignore")
            ref = sm.OLS(Y[:, voxel], X).fit()
        ftest = ref.f_test(F)
        assert ours_f.stat[voxel] == pytest.approx(float(np.squeeze(ftest.fvalue)), rel=1e-9)
        assert ours_f.p[voxel] == pytest.approx(float(ftest.pvalue), rel=1e-7, abs=1e-300)
        assert ours_f.dim == 4 and ours_f.dof == pytest.approx(ftest.df_denom)
        ttest = ref.t_test(t)
        assert ours_t.stat[voxel] == pytest.approx(float(np.squeeze(ttest.tvalue)), rel=1e-9)
        assert ours_t.effect[voxel] == pytest.approx(float(np.squeeze(ttest.effect)), rel=1e-9)


def test_anova_matches_nilearn_on_the_equivalent_full_rank_design():
    """nilearn divides the residual sum of squares by N - P, so give it the same model
    without the redundant last subject column (same column space, same estimable contrasts)."""
    rng = np.random.default_rng(2)
    Y, design, _ = _three_by_three(rng, n_subjects=6, interaction=0.4)
    full_rank = design.iloc[:, :-1].reset_index(drop=True)
    fit = fit_ols(Y, design.to_numpy())
    F = _rows(INTERACTION_ROWS, list(design.columns))
    t = _rows(["IniFF - DelFF"], list(design.columns))[0]
    ours_f, ours_t = fit.contrast(F), fit.contrast(t)
    ref_f = _nilearn_contrast(Y, full_rank, F[:, :-1], "F")
    ref_t = _nilearn_contrast(Y, full_rank, t[:-1], "t")
    np.testing.assert_allclose(ours_f.stat, ref_f["stat"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_f.z, ref_f["z_score"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_t.stat, ref_t["stat"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours_t.effect, ref_t["effect_size"], rtol=1e-5, atol=1e-6)


def test_redundant_f_rows_test_the_same_hypothesis():
    rng = np.random.default_rng(3)
    Y, design, _ = _three_by_three(rng, n_subjects=5)
    cols = list(design.columns)
    two = _rows(["IniFF - ImmFF", "ImmFF - DelFF"], cols)
    three = _rows(["IniFF - ImmFF", "ImmFF - DelFF", "IniFF - DelFF"], cols)
    fit = fit_ols(Y, design.to_numpy())
    a, b = fit.contrast(two), fit.contrast(three)
    np.testing.assert_allclose(a.stat, b.stat, rtol=1e-9)
    assert a.dim == b.dim == 2


def test_interaction_found_and_null_at_nominal_rate():
    """Ground truth: an interaction in half the voxels, none in the other half."""
    rng = np.random.default_rng(4)
    n_vox = 4000
    Y_null, design, _ = _three_by_three(rng, n_subjects=12, v=n_vox, interaction=0.0)
    Y_eff, _, _ = _three_by_three(rng, n_subjects=12, v=n_vox, interaction=0.8)
    cols = list(design.columns)
    F = _rows(INTERACTION_ROWS, cols)
    main = _rows(["IniFF + ImmFF + DelFF + IniUF + ImmUF + DelUF - 2*IniSF - 2*ImmSF - 2*DelSF"], cols)[0]
    for Y, expect_interaction in ((Y_null, False), (Y_eff, True)):
        fit = fit_ols(Y, design.to_numpy())
        p_int = fit.contrast(F).p
        p_main = fit.contrast(main).p
        if expect_interaction:
            assert np.mean(p_int < 0.001) > 0.9
        else:
            rate = np.mean(p_int < 0.05)
            assert 0.04 < rate < 0.06, rate  # 4000 voxels: sd of the rate is 0.0034
            # F p-values are uniform under the null
            assert stats.kstest(p_int, "uniform").pvalue > 0.001
        assert np.mean(p_main < 0.001) > 0.9  # faces > scrambled holds in both halves


def test_non_zero_sum_contrast_is_not_estimable_in_the_anova():
    rng = np.random.default_rng(5)
    Y, design, _ = _three_by_three(rng, n_subjects=4)
    cols = list(design.columns)
    assert is_estimable(_rows(["IniFF - DelFF"], cols), design.to_numpy())
    assert not is_estimable(_rows(["IniFF"], cols), design.to_numpy())


def test_covariate_coding_and_its_errors():
    table = pd.DataFrame({"age": ["30", "40", "n/a", "50"], "group": ["b", "a", "a", "b"],
                          "site": ["x", "x", "x", "x"]}, index=["01", "02", "03", "04"])
    table = table.replace("n/a", np.nan)
    design, excluded = code_covariates(table, ["age"], ["01", "02", "03", "04", "05"])
    assert excluded == {"03": "n/a in participants.tsv column(s) age", "05": "not listed in participants.tsv"}
    np.testing.assert_allclose(design["age"], [-10, 0, 10])
    design, _ = code_covariates(table, ["group"], ["01", "02", "04"])
    np.testing.assert_allclose(design["group_b"], np.array([1, 0, 1]) - 2 / 3)  # centred indicator
    design, _ = code_covariates(table, [], ["01", "02", "03", "04"], group_by="group")
    assert list(design.columns) == ["group_a", "group_b"]
    with pytest.raises(ModelError, match="'site' is constant"):
        code_covariates(table, ["site"], ["01", "02", "04"])
    with pytest.raises(ModelError, match="'height' is not in participants.tsv"):
        code_covariates(table, ["height"], ["01"])


def test_too_few_inputs_and_unknown_columns_are_model_errors():
    with pytest.raises(ModelError, match="at least 3 are needed"):
        check_enough_inputs(pd.DataFrame({"mean": [1.0, 1.0], "age": [-1.0, 1.0]}), "test")
    with pytest.raises(ModelError, match="unknown condition"):
        contrast_rows([parse_contrast("x", "IniFF - Nope")], ["IniFF", "DelFF"])


def test_numeric_covariate_with_a_typo_is_refused_not_coded_as_categories():
    from bidsglm.groupmodels import code_covariates

    table = pd.DataFrame({"age": ["21", "2O", "25", "30"], "sex": ["M", "F", "M", "F"]},
                         index=["01", "02", "03", "04"])
    with pytest.raises(ModelError, match=r"column 'age', line 3 \(sub-02\): '2O' is not a number"):
        code_covariates(table, ["age"], ["01", "02", "03", "04"], "participants.tsv")
    table.loc["02", "age"] = "inf"
    with pytest.raises(ModelError, match="'inf' is not a finite number"):
        code_covariates(table, ["age"], ["01", "02", "03", "04"], "participants.tsv")
    design, _ = code_covariates(table, ["sex"], ["01", "02", "03", "04"], "participants.tsv")
    assert list(design.columns) == ["mean", "sex_M"]  # a text column stays categorical
    table["age"] = np.nan
    with pytest.raises(ModelError, match="no included subject has a value in column"):
        code_covariates(table, ["age"], ["01", "02", "03", "04"], "participants.tsv")
