"""Figures of the HTML reports, each returned as a PNG data URI.

Embedding the PNGs in the page keeps a report one self-contained file that
opens offline and can be mailed or archived. Brain figures use nilearn's
plotting on the MNI152 template that ships with nilearn (no download);
maps in other spaces are drawn without a template and without a glass brain
(whose outline is MNI's).
"""

from __future__ import annotations

import base64
import functools
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

DPI = 72


@functools.lru_cache(maxsize=1)
def _pyplot():
    # matplotlib keeps a font cache in its config folder; where HOME is unwritable
    # (containers, some clusters) use one in the temporary folder, without its warning
    if "MPLCONFIGDIR" not in os.environ and not os.access(Path.home(), os.W_OK):
        os.environ["MPLCONFIGDIR"] = str(Path(tempfile.gettempdir()) / f"bidsglm-matplotlib-{os.getuid()}")
    import matplotlib

    matplotlib.use("Agg")  # draw off-screen; no display is needed
    import matplotlib.pyplot as plt

    return plt


@functools.lru_cache(maxsize=1)
def _mni_template():
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=2)


def png_uri(fig) -> str:
    """Render a matplotlib figure to a data URI and close it."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _tight(fig) -> None:
    with warnings.catch_warnings():  # crowded labels: matplotlib warns and keeps the layout
        warnings.simplefilter("ignore")
        fig.tight_layout()


def design_matrix_figure(design: pd.DataFrame) -> str:
    """Columns scaled to their maximum, as nilearn draws design matrices."""
    plt = _pyplot()
    from nilearn.plotting import plot_design_matrix

    width = min(3 + 0.28 * design.shape[1], 16)
    fig, ax = plt.subplots(figsize=(width, 6))
    plot_design_matrix(design, axes=ax)
    ax.set_ylabel("volume")
    _tight(fig)
    return png_uri(fig)


def correlation_figure(corr: pd.DataFrame) -> str:
    """Correlation between design columns (constant left out)."""
    plt = _pyplot()
    n = corr.shape[0]
    size = min(3 + 0.3 * n, 14)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(corr.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), corr.columns, rotation=90, fontsize=8)
    ax.set_yticks(range(n), corr.index, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.7, label="correlation")
    _tight(fig)
    return png_uri(fig)


def contrast_matrix_figure(weights: pd.DataFrame) -> str:
    """Rows: contrasts; columns: design columns; cells: weights."""
    plt = _pyplot()
    values = weights.to_numpy(dtype=float)
    vmax = max(float(np.abs(values).max()), 1e-12)
    width = min(3 + 0.28 * weights.shape[1], 16)
    fig, ax = plt.subplots(figsize=(width, 2.2 + 0.4 * weights.shape[0]))
    ax.imshow(values, vmin=-vmax, vmax=vmax, cmap="RdBu_r", aspect="auto")
    ax.set_xticks(range(weights.shape[1]), weights.columns, rotation=90, fontsize=8)
    ax.set_yticks(range(weights.shape[0]), weights.index, fontsize=9)
    for (i, j), w in np.ndenumerate(values):
        if w != 0:
            ax.text(j, i, f"{w:g}", ha="center", va="center", fontsize=7)
    _tight(fig)
    return png_uri(fig)


def design_figure_from_table(design: pd.DataFrame) -> str:
    """A group design: participants (rows) by columns, values as numbers."""
    plt = _pyplot()
    values = design.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.5 * design.shape[1], 14), min(1.5 + 0.18 * design.shape[0], 12)))
    vmax = max(float(np.abs(values).max()), 1e-12)
    ax.imshow(values, vmin=-vmax, vmax=vmax, cmap="RdBu_r", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(design.shape[1]), design.columns, rotation=90, fontsize=8)
    step = max(1, design.shape[0] // 40)
    ax.set_yticks(range(0, design.shape[0], step), design.index[::step], fontsize=7)
    _tight(fig)
    return png_uri(fig)


def _peak_coords(img) -> tuple[float, float, float] | None:
    data = np.nan_to_num(np.asanyarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3]))
    if not data.any():
        return None
    ijk = np.unravel_index(int(np.argmax(np.abs(data))), data.shape)
    return tuple(float(v) for v in (img.affine @ [*ijk, 1])[:3])


def brain_figure(path: Path, *, threshold: float | None, mni: bool, title: str,
                 symmetric: bool = True, glass_threshold: float = 3.09) -> str:
    """Glass brain (MNI maps) beside orthogonal slices through the peak.

    ``threshold`` hides |values| below it on the slices (None: every value);
    the glass brain shows |values| above ``glass_threshold`` (or ``threshold``
    when given). ``symmetric=False`` draws positive maps (-log10 p) with a
    one-sided colour scale. An empty map is drawn too, with a note in the
    title, so that every expected figure is present."""
    import nibabel as nib
    from nilearn import plotting

    plt = _pyplot()
    img = nib.load(str(path))
    data = np.nan_to_num(np.asanyarray(img.dataobj, dtype=np.float32))
    vmax = float(np.abs(data).max()) or 1.0
    peak = _peak_coords(img)
    cmap = "RdBu_r" if symmetric else "hot"
    fig = plt.figure(figsize=(13, 3.3) if mni else (8, 3.3))
    slices_left = 0.41 if mni else 0.0
    with warnings.catch_warnings():  # nilearn warns about empty maps, which are drawn on purpose
        warnings.simplefilter("ignore")
        if mni:
            glass = fig.add_axes([0.0, 0.0, 0.40, 0.9])
            plotting.plot_glass_brain(img, threshold=threshold or glass_threshold, plot_abs=False,
                                      vmax=vmax, vmin=-vmax if symmetric else 0, colorbar=False, cmap=cmap,
                                      axes=glass, figure=fig, black_bg=False)
        slices = fig.add_axes([slices_left, 0.0, 1.0 - slices_left, 0.9])
        plotting.plot_stat_map(img, bg_img=_mni_template() if mni else None, threshold=threshold,
                               vmax=vmax, symmetric_cbar=symmetric, cut_coords=peak, axes=slices,
                               figure=fig, draw_cross=False, colorbar=True, black_bg=False, cmap=cmap)
    note = "" if peak is not None else " (empty map)"
    fig.suptitle(title + note, fontsize=10, x=0.01, ha="left")
    return png_uri(fig)
