"""The one real BOLD run in ../shared (studyforrest localizer, native space, int16
with scl_slope and a non-zero scl_inter): agreement with nilearn and the
expected face/house pattern at the peaks its README lists."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bidsglm.cli import main
from conftest import shared_path

MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


@pytest.fixture(scope="module")
def localizer(tmp_path_factory):
    root = shared_path("real", "studyforrest-localizer")
    out = tmp_path_factory.mktemp("sf") / "out"
    code = main([str(root), str(out), "participant", "--space", "native", "--smoothing-fwhm", "5", "-q",
                 "--skip-bids-validation", "--contrast", "faceMinusHouse=face - house",
                 "--contrast", "houseMinusFace=house - face"])
    assert code == 0
    return root, out


def _z(out, label, run=True):
    run_part = "_run-1" if run else ""
    return nib.load(out / "sub-02" / "func" /
                    f"sub-02_task-localizer{run_part}_contrast-{label}_stat-z_statmap.nii.gz").get_fdata()


@pytest.mark.filterwarnings("ignore")
def test_localizer_matches_nilearn(localizer):
    from nilearn.glm.first_level import FirstLevelModel

    root, out = localizer
    d = root / "derivatives" / "fmriprep" / "sub-02" / "func"
    conf = pd.read_csv(d / "sub-02_task-localizer_run-1_desc-confounds_timeseries.tsv", sep="\t")[MOTION]
    events = pd.read_csv(root / "sub-02" / "func" / "sub-02_task-localizer_run-1_events.tsv", sep="\t")
    mask_path = d / "sub-02_task-localizer_run-1_desc-brain_mask.nii.gz"
    model = FirstLevelModel(t_r=2.0, slice_time_ref=0.0, hrf_model="glover", drift_model="cosine",
                            high_pass=1 / 128, noise_model="ar1", smoothing_fwhm=5, mask_img=str(mask_path),
                            minimize_memory=True)
    model.fit(str(d / "sub-02_task-localizer_run-1_desc-preproc_bold.nii.gz"), events=events, confounds=conf)
    mask = nib.load(mask_path).get_fdata() > 0
    ref = model.compute_contrast("face - house", output_type="z_score").get_fdata()[mask]
    np.testing.assert_allclose(_z(out, "faceMinusHouse")[mask], ref, atol=1e-4, rtol=0)
    # a single run passes through the fixed-effects step unchanged
    np.testing.assert_allclose(_z(out, "faceMinusHouse", run=False)[mask], ref, atol=1e-4, rtol=0)


def test_localizer_face_house_pattern(localizer):
    """Peaks from the dataset README (voxel indices): fusiform face > house, PPA house > face."""
    _, out = localizer
    face = _z(out, "faceMinusHouse")
    house = _z(out, "houseMinusFace")
    assert face[37, 12, 8] == pytest.approx(7.30, abs=0.01)  # global max listed
    assert face[25, 20, 6] > 5  # right lateral fusiform (FFA-like)
    assert face[51, 20, 6] > 4  # left fusiform
    assert house[29, 26, 8] > 4  # right parahippocampal (PPA-like)
    assert house[47, 26, 8] > 4  # left parahippocampal
    np.testing.assert_allclose(face, -house, atol=1e-5)
