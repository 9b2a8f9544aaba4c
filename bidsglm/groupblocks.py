"""Group level in voxel blocks: memory bounded by the block, not by the number of maps.

With thousands of input maps the (maps x voxels) float64 array of the in-memory
path (and the copies an OLS fit makes of it) outgrows a laptop: 2,000 maps at
MNI 2 mm are 3.8 GB each copy. Here every map is read once and written, as
float32 (the participant level writes float32 maps, so nothing is lost), to a
temporary file laid out block by block: one block of voxels of every map is one
contiguous read. The OLS fit, which is voxel-wise, is then done a block at a
time and its pieces put together into one GroupFit (P x V coefficients: small).

Permutations:
- voxel-level only (max-t, ``PermutationOptions.clusters`` off, no TFCE): the
  same rearrangements (same seed, same batches) for every block, each
  rearrangement's maximum tracked across blocks; memory is one block.
- cluster size/mass or TFCE need each rearrangement's whole map: the null-model
  residuals are put together block by block into the kernels' float32 tiles,
  4 N V bytes held once (1.9 GB for 2,000 maps of 235,000 voxels), plus the
  batch of statistic maps (permutation.BATCH_BYTES).

Results equal the in-memory path's to rounding (tests/test_groupblocks.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from . import clusterkernels as ck
from . import interrupts
from .errors import DataError
from .firstlevel import ZERO_VARIANCE
from .groupmodels import GroupFit, fit_ols
from .permutation import (
    SIGN_FLIP,
    PermutationDesign,
    PermutationOptions,
    _batch_rows,
    all_permutations,
    all_sign_flips,
    count_rearrangements,
    random_rearrangements,
    residuals_and_observed,
)

log = logging.getLogger("bidsglm")

BLOCK_BYTES = 64 * 2**20  # float64 (maps x block voxels) of one block; the fit holds a few such arrays
# models whose (maps x voxels) float64 data would exceed this are fitted in blocks (the in-memory
# path holds about three such arrays at its peak: the data, the fitted values and the residuals)
STREAM_ABOVE_BYTES = 1 * 2**30
MAX_NONFINITE_SHARE = 0.5  # as group.MAX_NONFINITE_SHARE
PERMUTATION_BATCH = 64  # rearrangements per batch of the voxel-level null (as permutation.py)


def block_voxels(n_maps: int, n_voxels: int, block_bytes: int | None = None) -> int:
    """Voxels per block: a float64 (n_maps, block) array of about ``block_bytes``, whole tiles
    of the permutation kernels when a block holds more than one."""
    width = max(1, (block_bytes or BLOCK_BYTES) // (8 * n_maps))
    if width > ck.TILE:
        width -= width % ck.TILE
    return min(width, n_voxels)


def streams(n_maps: int, n_voxels: int, estimator: str, kind: str) -> bool:
    """Fit in blocks? OLS models other than the repeated-measures ANOVA (whose sphericity
    correction needs every map at once), when the data would be large."""
    return estimator == "ols" and kind != "anova" and 8 * n_maps * n_voxels > STREAM_ABOVE_BYTES


class BlockStore:
    """(maps x voxels) float32 in a file, block-major: block j (voxels start..end of every
    map) is one contiguous (maps, end - start) array."""

    def __init__(self, path: Path, n_maps: int, n_voxels: int, block: int):
        self.n_maps, self.n_voxels, self.block = n_maps, n_voxels, block
        self.starts = list(range(0, n_voxels, block))
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self._fd, 4 * n_maps * n_voxels)

    def bounds(self, j: int) -> tuple[int, int]:
        start = self.starts[j]
        return start, min(start + self.block, self.n_voxels)

    def write_map(self, i: int, values: np.ndarray) -> None:
        row = np.ascontiguousarray(values, dtype=np.float32)
        for j in range(len(self.starts)):
            start, end = self.bounds(j)
            os.pwrite(self._fd, row[start:end].tobytes(), 4 * (self.n_maps * start + i * (end - start)))

    def read_block(self, j: int) -> np.ndarray:
        start, end = self.bounds(j)
        size = 4 * self.n_maps * (end - start)
        data = bytearray(size)
        view, done = memoryview(data), 0
        while done < size:  # pread may return less than asked for
            done += os.preadv(self._fd, [view[done:]], 4 * self.n_maps * start + done)
        return np.frombuffer(data, dtype=np.float32).reshape(self.n_maps, end - start)

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class BlockedData:
    """What the blocked pass leaves: the group mask (with the voxels left out), the fit and,
    per contrast, the permutation result (or None)."""

    mask: np.ndarray
    fit: GroupFit
    permuted: list


def work_folder(output_dir: Path) -> Path:
    """The output session's temporary folder inside OUTPUT_DIR (removed with the session,
    also on rollback), else OUTPUT_DIR itself."""
    from .outputs import active_session

    session = active_session()
    return session.tmp_dir if session is not None and session.folder is not None else Path(output_dir)


def fit_in_blocks(maps, read_map, mask: np.ndarray, X: np.ndarray, where: str, work_dir: Path,
                  designs=None, options: PermutationOptions | None = None, permute=None,
                  block_bytes: int | None = None) -> BlockedData:
    """The group fit (and permutations) of ``maps`` in voxel blocks.

    maps : the inputs (their ``effect`` path names them in messages); read_map(m) -> (V,) values
    in ``mask``; X : (N, P) design; where : the model's name in messages; designs : a
    PermutationDesign per contrast (or None each); permute(design, mask, prepared) runs the
    permutations on residuals prepared here (permutation.run_permutations, ``prepared=``)."""
    n, v = len(maps), int(mask.sum())
    block = block_voxels(n, v, block_bytes)
    with tempfile.TemporaryDirectory(prefix=".bidsglm-blocks-", dir=work_dir) as folder:
        store = BlockStore(Path(folder) / "maps.f32", n, v, block)
        try:
            finite = _store_maps(store, maps, read_map, where)
            if not finite.any():
                raise DataError(f"{where.split(' ')[0]}: no voxel has a finite effect in every input map")
            keep = [finite[slice(*store.bounds(j))] for j in range(len(store.starts))]
            fit, keep = _fit(store, keep, X, where)  # keep: per block, the voxels of ``mask`` kept
            mask = mask.copy()
            mask[mask] = np.concatenate(keep)
            permuted = [None if d is None else permute(d, mask, _prepared(store, keep, d, options))
                        for d in designs or []]
        finally:
            store.close()
    return BlockedData(mask, fit, permuted)


def _store_maps(store: BlockStore, maps, read_map, where: str) -> np.ndarray:
    """Each map read once into the store; returns (V,) voxels finite in every map. A map
    non-finite in most of the mask is refused (the worst one named), as in memory."""
    finite = np.ones(store.n_voxels, dtype=bool)
    share_bad = np.zeros(len(maps))
    for i, m in enumerate(maps):
        values = read_map(m)
        ok = np.isfinite(values)
        share_bad[i] = 1.0 - ok.mean()
        finite &= ok
        store.write_map(i, values)
        interrupts.check()
    worst = int(np.argmax(share_bad))
    if share_bad[worst] > MAX_NONFINITE_SHARE:
        raise DataError(f"effect map is non-finite (NaN or infinite) in {share_bad[worst]:.0%} of the "
                        f"{store.n_voxels} voxels of the group mask", maps[worst].effect)
    if not finite.all():
        bad = [maps[i].effect.name for i in np.flatnonzero(share_bad > 0)]
        log.warning("%s: %d voxel(s) left out of the group mask: non-finite in %s", where,
                    int((~finite).sum()), ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
    return finite


def _block(store: BlockStore, j: int, keep: np.ndarray) -> np.ndarray:
    return store.read_block(j)[:, keep].astype(np.float64)


def _fit(store: BlockStore, keep: list, X: np.ndarray, where: str):
    """OLS per block; voxels the model fits exactly (no error variance) leave the mask, as
    in memory. Returns the whole fit and the voxels kept per block."""
    betas, dispersions, kept, fit = [], [], [], None
    n_flat = 0
    for j in range(len(store.starts)):
        Y = _block(store, j, keep[j])
        fit = fit_ols(Y, X)
        flat = ~(fit.dispersion > ZERO_VARIANCE * np.einsum("nv,nv->v", Y, Y) / Y.shape[0])
        n_flat += int(flat.sum())
        betas.append(fit.beta[:, ~flat])
        dispersions.append(fit.dispersion[~flat])
        block_keep = keep[j].copy()
        block_keep[block_keep] = ~flat
        kept.append(block_keep)
        interrupts.check()
    total = sum(int(k.sum()) for k in keep)
    if n_flat == total:
        raise DataError(f"{where}: the model fits the input maps exactly in every voxel (identical or "
                        "constant maps?): no error variance to test against")
    if n_flat:
        log.warning("%s: %d voxel(s) left out of the group mask: the model fits the inputs exactly there "
                    "(zero variance)", where, n_flat)
    whole = GroupFit(fit.design, np.concatenate(betas, axis=1), np.concatenate(dispersions), fit.cov,
                     fit.dof, fit.rank)
    return whole, kept


# --- permutations --------------------------------------------------------------------

@dataclass
class PreparedResiduals:
    """What permutation.run_permutations needs instead of the data: the observed statistic
    (V,), and either the kernels' tiles of the whole map (cluster and TFCE nulls) or the
    voxel-level null maxima computed block by block (first the observed maximum)."""

    stat: np.ndarray
    tiles: np.ndarray | None = None
    ss_tiles: np.ndarray | None = None
    null_max_stat: np.ndarray | None = None


def _prepared(store, keep, design: PermutationDesign, options: PermutationOptions) -> PreparedResiduals:
    with interrupts.deferred():  # Ctrl-C between kernel calls only (see interrupts.py)
        if options.clusters or options.tfce:
            return _whole_map_tiles(store, keep, design)
        return _voxel_level_null(store, keep, design, options)


def _whole_map_tiles(store, keep, design) -> PreparedResiduals:
    """Null-model residuals of every block, put into float32 tiles of the whole map."""
    v = sum(int(k.sum()) for k in keep)
    count = -(-v // ck.TILE)
    tiles = np.zeros((count, store.n_maps, ck.TILE), dtype=np.float32)
    ss_tiles = np.ones((count, ck.TILE), dtype=np.float32)  # padding: statistic 0 (see tile_residuals)
    stats, start = [], 0
    for j in range(len(store.starts)):
        E, ss, stat = residuals_and_observed(_block(store, j, keep[j]), design)
        _fill_tiles(tiles, ss_tiles, start, E, ss.astype(np.float32))
        stats.append(stat)
        start += E.shape[1]
        interrupts.check()
    return PreparedResiduals(np.concatenate(stats), tiles, ss_tiles)


def _fill_tiles(tiles, ss_tiles, start: int, E: np.ndarray, ss: np.ndarray) -> None:
    """Columns start.. of the whole map's tiles from a block's residuals (any block width)."""
    pos, width = 0, E.shape[1]
    while pos < width:
        t, offset = divmod(start + pos, ck.TILE)
        w = min(ck.TILE - offset, width - pos)
        tiles[t, :, offset:offset + w] = E[:, pos:pos + w]
        ss_tiles[t, offset:offset + w] = ss[pos:pos + w]
        pos += w


def rearrangement_batches(design: PermutationDesign, options: PermutationOptions):
    """The rearrangements of permutation.run_permutations, batch by batch (the same ones for
    every block: the generator is started again from the seed)."""
    total = count_rearrangements(design)
    if total <= options.n_permutations + 1:
        every = (all_sign_flips(len(design.blocks)) if design.scheme == SIGN_FLIP
                 else all_permutations(design.blocks))
        for done in range(0, len(every), PERMUTATION_BATCH):
            yield every[done:done + PERMUTATION_BATCH]
        return
    rng = np.random.default_rng(options.seed)
    for done in range(0, options.n_permutations, PERMUTATION_BATCH):
        yield random_rearrangements(design, min(PERMUTATION_BATCH, options.n_permutations - done), rng)


def _voxel_level_null(store, keep, design, options) -> PreparedResiduals:
    """Each rearrangement's maximum statistic over the mask, one block at a time."""
    two_sided = options.two_sided and not design.f_test
    rows = design.basis.shape[0]
    null, stats = None, []
    for j in range(len(store.starts)):
        E, ss, stat = residuals_and_observed(_block(store, j, keep[j]), design)
        stats.append(stat)
        if E.shape[1] == 0:
            continue
        tiles, ss_tiles = ck.tile_residuals(E, ss.astype(np.float32))
        maxima = []
        with threadpool_limits(1, "blas"):
            for chunk in rearrangement_batches(design, options):
                A = _batch_rows(design, chunk).astype(np.float32)
                _, best = ck.batch_statistics(A, tiles, ss_tiles, rows, design.k, np.float32(design.dof),
                                              design.f_test, two_sided, False, E.shape[1])
                maxima.append(best)
                interrupts.check()
        maxima = np.concatenate(maxima)
        null = maxima if null is None else np.maximum(null, maxima)
    stat = np.concatenate(stats)
    observed = np.max(np.abs(stat) if two_sided else stat)
    return PreparedResiduals(stat, null_max_stat=np.concatenate([[observed], null]))
