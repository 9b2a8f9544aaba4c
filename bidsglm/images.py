"""Reading, checking, smoothing and masking NIfTI images.

The 4D BOLD is decompressed once, with ISA-L's inflater (several times faster
than zlib), and smoothed volume by volume inside the bounding box of the
brain mask. The Gaussian filter and its parameters are nilearn's, and the box
is padded by the filter's radius, so in-mask values equal those of smoothing
the whole 4D image as nilearn does, without nilearn's whole-array copies.
"""

from __future__ import annotations

import queue
import threading
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter1d

from .errors import DataError

try:  # ISA-L: fast gzip; fall back to zlib where the wheel is unavailable
    from isal import igzip as _gzip
except ImportError:  # pragma: no cover - exercised only without isal
    import gzip as _gzip

FWHM_OVER_SIGMA = np.sqrt(8 * np.log(2))
_TRUNCATE = 4.0  # scipy's default kernel truncation, in standard deviations


def read_header(path: Path) -> nib.Nifti1Header:
    """Header only (cheap): shape, affine, zooms, units."""
    try:
        img = nib.load(str(path))
        return img.header
    except Exception as exc:  # nibabel raises many types for broken files
        raise DataError(f"not a readable NIfTI image ({exc})", path) from exc


def load_image(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI file fully into memory, decompressing it exactly once."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror})", path) from exc
    if path.name.endswith(".gz"):
        try:
            raw = _gzip.decompress(raw)
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise DataError(f"corrupt or truncated gzip data ({exc})", path) from exc
    try:
        img = nib.Nifti1Image.from_bytes(raw)
    except Exception as exc:
        raise DataError(f"not a valid NIfTI-1 image ({exc})", path) from exc
    expected = int(img.dataobj.offset) + int(
        np.prod(img.shape) * img.get_data_dtype().itemsize
    )
    if len(raw) < expected:
        raise DataError(
            f"truncated image: {len(raw)} bytes, header says at least {expected}", path
        )
    return img


def load_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Boolean 3D mask and its affine."""
    img = load_image(path)
    if len(img.shape) != 3 and not (len(img.shape) == 4 and img.shape[3] == 1):
        raise DataError(f"a brain mask must be 3D, got shape {img.shape}", path)
    data = np.asanyarray(img.dataobj).reshape(img.shape[:3])
    mask = np.nan_to_num(data) > 0
    if not mask.any():
        raise DataError("brain mask is empty", path)
    return mask, img.affine


def check_same_grid(bold_path: Path, bold_shape, bold_affine, mask_path: Path, mask_shape, mask_affine) -> None:
    if tuple(bold_shape[:3]) != tuple(mask_shape[:3]) or not np.allclose(bold_affine, mask_affine):
        raise DataError(
            f"BOLD grid (shape {tuple(bold_shape[:3])}) differs from brain mask grid "
            f"(shape {tuple(mask_shape[:3])}, {mask_path.name}); affines "
            f"{'match' if np.allclose(bold_affine, mask_affine) else 'differ'}",
            bold_path,
        )


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))


def smoothing_sigmas(affine: np.ndarray, fwhm: float | None) -> np.ndarray:
    if not fwhm:
        return np.zeros(3)
    return fwhm / (FWHM_OVER_SIGMA * voxel_sizes(affine))


def _padded_box(mask: np.ndarray, sigmas: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the mask, padded by the Gaussian kernel radius."""
    idx = np.nonzero(mask)
    box = []
    for axis, s in enumerate(sigmas):
        radius = int(_TRUNCATE * s + 0.5) if s > 0 else 0
        lo = max(int(idx[axis].min()) - radius, 0)
        hi = min(int(idx[axis].max()) + radius + 1, mask.shape[axis])
        box.append(slice(lo, hi))
    return tuple(box)


def _smooth_and_gather(vol: np.ndarray, sigmas: np.ndarray, inner: np.ndarray,
                       lines: np.ndarray | None = None) -> np.ndarray:
    """Zero non-finite values outside the mask (refused inside it), smooth along each axis in turn
    (as nilearn), take in-mask voxels.

    The last pass filters only the lines along the last axis that hold mask
    voxels (``lines``, a 2D mask over the first two axes); each line is
    filtered independently, so the values are those of filtering them all."""
    if not np.isfinite(vol).all():
        # outside the brain mask they are read as 0 (as nilearn); inside it they are bad data
        bad = int((~np.isfinite(vol[inner])).sum())
        if bad:
            raise DataError(f"{bad} non-finite value(s) (NaN or infinite) inside the brain mask")
        np.nan_to_num(vol, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    last = max((a for a, s in enumerate(sigmas) if s > 0), default=None)
    for axis, s in enumerate(sigmas):
        if s > 0 and not (axis == last == 2 and lines is not None):
            gaussian_filter1d(vol, s, output=vol, axis=axis, truncate=_TRUNCATE)
    if last == 2 and lines is not None:
        kept = vol[lines]  # (n_lines, K) copy, contiguous along the filtered axis
        gaussian_filter1d(kept, sigmas[2], output=kept, axis=1, truncate=_TRUNCATE)
        return kept[inner[lines]]
    return vol[inner]


def _volume_reader(path: Path, header, offset: int):
    """Yield the raw volumes of a 4D NIfTI in file order, inflating as it goes."""
    shape = header.get_data_shape()
    dtype = header.get_data_dtype()
    n_bytes = int(np.prod(shape[:3])) * dtype.itemsize
    opener = _gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(str(path), "rb") as fh:
            fh.read(offset)
            for t in range(shape[3]):
                buf = fh.read(n_bytes)
                if len(buf) < n_bytes:
                    raise DataError(
                        f"truncated image: volume {t + 1} of {shape[3]} is incomplete", path)
                yield np.frombuffer(buf, dtype=dtype).reshape(shape[:3], order="F")
    except DataError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise DataError(f"corrupt or truncated image data ({exc})", path) from exc


def _prefetch(iterator, depth: int = 4):
    """Run ``iterator`` in a thread (inflating the next volumes while the
    current one is smoothed); exceptions are re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def stream_masked_timeseries(path: Path, mask: np.ndarray, fwhm: float | None):
    """Read a 4D BOLD volume by volume: scale, smooth and gather in-mask voxels.

    Peak memory is the (V, T) result plus a few volumes, whatever the file
    size. Values equal nilearn's ``apply_mask_fmri`` on the whole image (nibabel's
    scaling per volume; smoothing over the padded mask box gives the same in-mask values).

    Returns
    -------
    Y : array (T, V), C-ordered (nilearn's layout)
    affine : (4, 4)
    """
    from nibabel.volumeutils import apply_read_scaling

    img = nib.load(str(path))  # header only; the data are streamed below
    header = img.header
    shape = header.get_data_shape()
    if len(shape) != 4:
        raise DataError(f"expected a 4D image, got shape {shape}", path)
    slope = np.asanyarray(img.dataobj.slope)
    inter = np.asanyarray(img.dataobj.inter)
    scaled = not (slope == 1 and inter == 0)
    if scaled and np.can_cast(slope, slope.dtype):
        slope, inter = slope.astype(slope.dtype), inter.astype(slope.dtype)
    affine = img.affine
    sigmas = smoothing_sigmas(affine, fwhm)
    box = _padded_box(mask, sigmas)
    inner = mask[box]
    lines = inner.any(axis=2)  # lines along the last axis that hold mask voxels
    out = None
    # the loaded header's vox_offset is reset by nibabel; the proxy keeps the file's
    for t, raw in enumerate(_prefetch(_volume_reader(path, header, int(img.dataobj.offset)))):
        vol = raw[box]
        vol = apply_read_scaling(vol, slope, inter) if scaled else vol
        vol = np.array(vol, dtype=vol.dtype if vol.dtype.kind == "f" else np.float32)
        if out is None:
            out = np.empty((shape[3], int(inner.sum())), dtype=vol.dtype.newbyteorder("="))
        try:
            out[t] = _smooth_and_gather(vol, sigmas, inner, lines)
        except DataError as exc:
            raise DataError(f"volume {t + 1}: {exc.problem}", path) from exc
    return out, affine


def unmask(values: np.ndarray, mask: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """(V,) in-mask values -> 3D float32 volume."""
    vol = np.full(mask.shape, fill, dtype=np.float32)
    vol[mask] = values
    return vol


def nifti_bytes(volume: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    """Serialise a float32 volume; gzip with ISA-L when compressing."""
    img = nib.Nifti1Image(volume.astype(np.float32, copy=False), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    data = img.to_bytes()
    if compress:
        # gzip header time 0: the bytes depend on the data only (the validator warns,
        # GZIP_HEADER_MTIME, about a time stamp in the header)
        data = (_gzip.compress(data, compresslevel=2, mtime=0) if _gzip.__name__.startswith("isal")
                else _gzip.compress(data, 6, mtime=0))
    return data
