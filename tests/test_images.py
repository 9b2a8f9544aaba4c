"""Streaming load = full load; smoothing over the padded mask box = whole-image smoothing."""

import nibabel as nib
import numpy as np
import pytest
from nilearn.image import smooth_img

from bidsglm.errors import DataError
from nilearn.masking import apply_mask_fmri

from bidsglm.images import stream_masked_timeseries


def _image(tmp_path, dtype, slope=None, inter=0.0, name="bold.nii.gz"):
    rng = np.random.default_rng(0)
    data = (rng.normal(500, 50, (20, 22, 18, 12))).astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.3, 1.0])
    affine[:3, 3] = [-30, -33, -30]
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path = tmp_path / name
    nib.save(img, path)
    mask = np.zeros(data.shape[:3], bool)
    mask[5:15, 4:18, 6:12] = True
    return path, mask


@pytest.mark.parametrize("dtype,slope,inter", [(np.float32, None, 0.0), (np.int16, 0.37, 38.5),
                                               (np.float64, None, 0.0)])
@pytest.mark.parametrize("fwhm", [None, 6.0])
def test_stream_equals_nilearn_full_load(tmp_path, dtype, slope, inter, fwhm):
    """Reference: nilearn loads and smooths the whole 4D image, then masks it."""
    path, mask = _image(tmp_path, dtype, slope, inter)
    full = nib.load(path)
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), full.affine)
    expected = apply_mask_fmri(str(path), mask_img, smoothing_fwhm=fwhm)
    got, affine = stream_masked_timeseries(path, mask, fwhm)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)  # bit for bit
    np.testing.assert_array_equal(affine, full.affine)


def test_box_smoothing_equals_nilearn_whole_image(tmp_path):
    path, mask = _image(tmp_path, np.float32)
    got, _ = stream_masked_timeseries(path, mask, 6.0)
    ref = smooth_img(str(path), 6.0).get_fdata(dtype=np.float32)[mask].T
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_stream_detects_truncation(tmp_path):
    import gzip

    path, mask = _image(tmp_path, np.float32)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-5000]))
    with pytest.raises(DataError, match="volume 12 of 12 is incomplete"):
        stream_masked_timeseries(path, mask, 6.0)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match="corrupt or truncated|truncated image"):
        stream_masked_timeseries(path, mask, 6.0)


def test_irregular_mask_bit_for_bit_with_nilearn(tmp_path):
    """A ball-shaped mask: the last smoothing pass skips lines without mask voxels."""
    path, _ = _image(tmp_path, np.int16, 0.37, 38.5)
    i, j, k = np.indices((20, 22, 18))
    mask = (i - 9) ** 2 + (j - 12) ** 2 + ((k - 8) * 1.3) ** 2 < 40
    assert not mask.any(axis=2).all()  # some lines are skipped
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), nib.load(path).affine)
    expected = apply_mask_fmri(str(path), mask_img, smoothing_fwhm=5.0)
    got, _ = stream_masked_timeseries(path, mask, 5.0)
    np.testing.assert_array_equal(got, expected)


def test_long_int16_run_streams_without_a_float64_copy(tmp_path):
    """1200 int16 volumes with scaling: peak memory is the (T, V) in-mask result
    plus a few volumes, far below the 4D array in float64. (Scaled integers come
    out in float64, as nibabel scales them and nilearn analyses them.)"""
    import tracemalloc

    shape = (24, 24, 20, 1200)
    rng = np.random.default_rng(1)
    data = rng.integers(900, 1100, shape, dtype=np.int16)
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "long_bold.nii.gz"
    nib.save(img, path)
    del data, img
    mask = np.zeros(shape[:3], bool)
    mask[3:21, 3:21, 3:17] = True
    tracemalloc.start()
    got, _ = stream_masked_timeseries(path, mask, 6.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    full_float64 = np.prod(shape) * 8
    assert got.shape == (1200, mask.sum())
    assert peak < got.nbytes + 40 * np.prod(shape[:3]) * 8, (peak, got.nbytes)
    assert peak < full_float64 / 2  # the mask holds 39 % of the grid
    # the scaling was applied: raw 900..1099 -> 460..559.5 before smoothing
    assert 455 < got.mean() < 565
