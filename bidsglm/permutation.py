"""Permutation inference: family-wise error by the maximum statistic.

Model Y = M b + e (N inputs, P columns, possibly rank deficient) and a contrast
C (k estimable rows). Freedman-Lane: the null model Z = M null(C) is fitted,
its residuals E = (I - H_Z) Y are permuted (or sign flipped), the fit of Z is
added back, and the full model is refitted. Moving the permutation P from the
data to the design shows that the refit only needs a few projections of P E:

    effect of interest  U_x' P E   (k rows; U_x spans M pinv(M'M) C', the part
                                    of the design the contrast tests)
    nuisance            U_z' P E   (U_z spans Z, less what P leaves in place)
    RSS                 ||E||^2 - ||U_x' P E||^2 - ||U_z' P E||^2

so a batch of B permutations is one (B (k + q), N) x (N, V) matrix product.
For a one-sample test this is sign flipping with a single row per
permutation; for the repeated-measures model, permuting conditions within
subjects leaves the subject columns in place, so only the condition part of
the nuisance remains (number of conditions - 1 - k rows).

When the rows u (less their block means, which E is orthogonal to) take only a
few distinct values over the inputs ("levels": the ANOVA's conditions), u' P E
is a weighted sum of the level sums S of P E: N row additions and a few
multiply-adds per level replace (k + q) x N multiply-adds per voxel. In a balanced
ANOVA the k + q rows span every contrast of the conditions, so their sum of squares
is ||S||^2 / subjects and only the k effect rows are needed (the 3 x 3 ANOVA's t:
144 additions and 18 multiply-adds per voxel against 1152 multiply-adds).

Which rearrangement: sign flips (symmetric errors) when the null model does
not contain the constant (a mean is tested); otherwise permutations
(exchangeable errors), within exchangeability blocks when given.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from scipy import stats
from threadpoolctl import threadpool_limits

from . import clusterkernels as ck
from . import interrupts
from .errors import ModelError

log = logging.getLogger("bidsglm")

SIGN_FLIP = "sign flipping"
PERMUTE = "permutation"
TFCE_E, TFCE_H, TFCE_DH = 0.5, 2.0, 0.1
TIE_TOLERANCE = 1e-5  # relative: null values computed in float32 count as ties within this
BATCH_BYTES = 64 * 2**20  # bound on the (B, V) float32 maps of one batch (kept for cluster/TFCE nulls)


def _orthonormal_basis(A: np.ndarray, scale: float | None = None, tol: float = 1e-10) -> np.ndarray:
    """(N, r) orthonormal basis of the column space of A (N, p); singular values
    below tol * scale (default: the largest) count as zero."""
    if A.size == 0:
        return np.zeros((A.shape[0], 0))
    u, s, _ = np.linalg.svd(A, full_matrices=False)
    return u[:, s > tol * (s.max() if scale is None else scale)]


def _contains(space: np.ndarray, vectors: np.ndarray) -> bool:
    """Every column of ``vectors`` lies in the span of orthonormal ``space``."""
    residual = vectors - space @ (space.T @ vectors)
    return bool(np.allclose(residual, 0, atol=1e-8 * max(1.0, np.abs(vectors).max())))


@dataclass
class PermutationDesign:
    """What the permutations need from a design and a contrast.

    basis : (k + q, N) rows U_x' then the permuted nuisance U_z'
    null_basis : (N, rank Z) orthonormal basis of the whole null model (for the residuals)
    k : numerator degrees of freedom (1 for a t contrast)
    blocks : (N,) exchangeability block per input (permutations stay within blocks)
    levels, level_weights : (N,) level of each input and (k + q, L) the basis rows' value
        at each level (less block means), when few levels make the level sums cheaper; else None
    level_scale : s > 0 when the rows' total sum of squares is s ||level sums||^2, else 0"""

    scheme: str
    basis: np.ndarray
    null_basis: np.ndarray
    k: int
    dof: float
    f_test: bool
    blocks: np.ndarray
    levels: np.ndarray | None = None
    level_weights: np.ndarray | None = None
    level_scale: float = 0.0

    @property
    def freedman_lane(self) -> bool:
        return self.null_basis.shape[1] > 0

    def describe(self) -> str:
        where = (" within subjects" if len(np.unique(self.blocks)) > 1 else "")
        how = f"{self.scheme}{where}"
        return f"{how} of Freedman-Lane residuals" if self.freedman_lane else how


def permutation_design(X: np.ndarray, c: np.ndarray, f_test: bool = False,
                       blocks: np.ndarray | None = None, what: str = "contrast") -> PermutationDesign:
    """X : (N, P) design; c : (k, P) contrast rows (estimable); blocks : (N,) labels
    whose rows may only be permuted among themselves (the ANOVA's subjects)."""
    X = np.asarray(X, dtype=np.float64)
    c = np.atleast_2d(np.asarray(c, dtype=np.float64))
    n = X.shape[0]
    rank_m = np.linalg.matrix_rank(X)
    dof = n - rank_m
    null_space = scipy.linalg.null_space(c)
    U_z = _orthonormal_basis(X @ null_space)
    W = X @ scipy.linalg.pinv(X.T @ X) @ c.T
    if f_test or c.shape[0] > 1:
        U_x = _orthonormal_basis(W)
    else:
        U_x = W / np.linalg.norm(W)  # keeps the sign: positive t for a positive contrast
    k = U_x.shape[1]
    ones = np.ones((n, 1))
    if blocks is None:
        blocks = np.zeros(n, dtype=int)
    indicators = (np.asarray(blocks)[:, None] == np.unique(blocks)[None, :]).astype(float)
    if U_z.size and _contains(U_z, ones):
        scheme = PERMUTE
        if not _contains(U_z, indicators):
            raise ModelError(f"{what}: not testable by permuting within subjects (it involves "
                             "subject columns); permutation inference tests condition effects")
        # rearrangements within blocks leave the block indicators in place and E is
        # orthogonal to them: only the rest of the nuisance space changes
        invariant = _orthonormal_basis(indicators)
        moving = U_z - invariant @ (invariant.T @ U_z)
    else:
        scheme = SIGN_FLIP
        blocks = np.zeros(n, dtype=int)
        moving = U_z
    U_moving = _orthonormal_basis(moving, scale=1.0)  # U_z has unit columns
    basis = np.vstack([U_x.T, U_moving.T])
    levels, weights = _level_structure(basis, np.asarray(blocks)) if scheme == PERMUTE else (None, None)
    return PermutationDesign(scheme, basis, U_z, k, float(dof), bool(f_test or c.shape[0] > 1),
                             np.asarray(blocks), levels, weights, _level_scale(weights))


def _level_structure(basis: np.ndarray, blocks: np.ndarray, tol: float = 1e-9):
    """Inputs whose basis columns are equal once each block's mean is removed share a level.

    Permuted residuals stay orthogonal to the block indicators (they are in the null model),
    so u' P E only depends on u less its block means: the level weights. Returns (levels,
    weights), or (None, None) when the level sums would not save at least half the work."""
    centred = basis.copy()
    for b in np.unique(blocks):
        members = blocks == b
        centred[:, members] -= centred[:, members].mean(axis=1, keepdims=True)
    rows, n = centred.shape
    scale = max(float(np.abs(centred).max()), np.finfo(float).tiny)
    keys = np.round(centred.T / (scale * 1e-6))  # candidate levels; checked exactly below
    _, first, levels = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    levels = levels.ravel()
    weights = centred[:, first]
    if n + rows * len(first) > 0.5 * rows * n:
        return None, None
    if np.abs(weights[:, levels] - centred).max() > tol * scale:
        return None, None
    return levels, weights


def null_residuals(Y: np.ndarray, design: PermutationDesign) -> np.ndarray:
    """(N, V) residuals of the null model (float64 in, float64 out)."""
    Z = design.null_basis
    return Y - Z @ (Z.T @ Y) if Z.size else Y.copy()


def statistics_from_projections(Q: np.ndarray, ss_total: np.ndarray, k: int, dof: float,
                                f_test: bool) -> np.ndarray:
    """Q : (B, rows, V) projections of rearranged residuals -> (B, V) t or F.

    Works in place on a few (B, V) arrays: Q is the largest thing a batch holds."""
    effect_ss = np.square(Q[:, 0])
    for r in range(1, k):
        effect_ss += np.square(Q[:, r])
    rss = ss_total - effect_ss
    for r in range(k, Q.shape[1]):
        rss -= np.square(Q[:, r])
    np.maximum(rss, np.finfo(Q.dtype).tiny, out=rss)
    rss /= dof  # now the residual variance
    if f_test:
        effect_ss /= k
        effect_ss /= rss
        return effect_ss
    np.sqrt(rss, out=rss)
    return np.divide(Q[:, 0], rss, out=rss)


def residuals_and_observed(Y: np.ndarray, design: PermutationDesign, chunk: int = 20000):
    """Null-model residuals E (N, V) as float32, their sums of squares (V,) and the
    observed statistic (V,), computed in float64 a block of voxels at a time."""
    n, v = Y.shape
    E = np.empty((n, v), dtype=np.float32)
    ss = np.empty(v, dtype=np.float64)
    stat = np.empty(v, dtype=np.float64)
    for start in range(0, v, chunk):
        part = null_residuals(np.asarray(Y[:, start:start + chunk], dtype=np.float64), design)
        ss_part = np.einsum("nv,nv->v", part, part)
        stat[start:start + chunk] = statistics_from_projections(
            (design.basis @ part)[None], ss_part, design.k, design.dof, design.f_test)[0]
        ss[start:start + chunk] = ss_part
        E[:, start:start + chunk] = part
    return E, ss, stat


# --- rearrangements ------------------------------------------------------------------

def count_rearrangements(design: PermutationDesign) -> float:
    n = len(design.blocks)
    try:
        if design.scheme == SIGN_FLIP:
            return 2.0 ** n
        sizes = np.unique(design.blocks, return_counts=True)[1]
        return float(math.prod(math.factorial(int(s)) for s in sizes))  # Python ints: no overflow
    except OverflowError:  # more than a float holds (over 1,023 sign-flipped or 170 permuted inputs)
        return math.inf


def all_sign_flips(n: int) -> np.ndarray:
    """(2^n - 1, n) every sign vector but all +1 (the data as observed)."""
    codes = np.arange(1, 2 ** n)[:, None]
    return 1 - 2 * ((codes >> np.arange(n)) & 1).astype(np.int8)


def all_permutations(blocks: np.ndarray) -> np.ndarray:
    """(count - 1, N) every within-block permutation but the identity."""
    import itertools

    members = [np.flatnonzero(blocks == b) for b in np.unique(blocks)]
    out = []
    for choice in itertools.product(*(itertools.permutations(m) for m in members)):
        perm = np.empty(len(blocks), dtype=np.int64)
        for m, order in zip(members, choice):
            perm[m] = order
        out.append(perm)
    return np.array(out[1:])  # the first is the identity


def random_rearrangements(design: PermutationDesign, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, N): sign vectors, or permutations (row i of P E is row perm[i] of E)."""
    n = len(design.blocks)
    if design.scheme == SIGN_FLIP:
        return (1 - 2 * rng.integers(0, 2, size=(count, n))).astype(np.int8)
    # sorting random keys offset by block keeps every row within its block
    _, block_index = np.unique(design.blocks, return_inverse=True)
    positions = np.argsort(block_index, kind="stable")
    keys = block_index[positions][None, :] * 2.0 + rng.random((count, n))
    perms = np.empty((count, n), dtype=np.int64)
    perms[:, positions] = positions[np.argsort(keys, axis=1)]
    return perms


def _level_scale(weights: np.ndarray | None, tol: float = 1e-10) -> float:
    """s such that ||W S||^2 = s ||S||^2 for every S whose entries sum to zero (the level sums
    of permuted residuals do: the constant is in the null model), or 0 where there is none."""
    if weights is None:
        return 0.0
    n_levels = weights.shape[1]
    centre = np.eye(n_levels) - 1.0 / n_levels
    gram = centre @ weights.T @ weights @ centre
    scale = np.trace(gram) / max(n_levels - 1, 1)
    if scale <= 0 or not np.allclose(gram, scale * centre, rtol=0, atol=tol * scale):
        return 0.0
    return float(scale)


def _level_gather(design: PermutationDesign, permutations: np.ndarray):
    """(B, N) rows of E that make each level's sum of P E, grouped by level, and (L + 1,)
    where each level's group starts (row i of P E is row perm[i] of E)."""
    order = np.argsort(design.levels, kind="stable")
    starts = np.searchsorted(design.levels[order], np.arange(design.level_weights.shape[1] + 1))
    return np.ascontiguousarray(permutations[:, order], dtype=np.int32), starts.astype(np.int64)


def _batch_rows(design: PermutationDesign, rearrangements: np.ndarray) -> np.ndarray:
    """(B * rows, N) rows u' P so that (u' P) E = u' (P E)."""
    basis = design.basis
    if design.scheme == SIGN_FLIP:
        rows = basis[None, :, :] * rearrangements[:, None, :]
    else:
        inverse = np.argsort(rearrangements, axis=1)
        rows = basis[:, inverse].transpose(1, 0, 2)
    return rows.reshape(-1, basis.shape[1])


# --- the permutation run ---------------------------------------------------------------

@dataclass
class PermutationOptions:
    n_permutations: int
    seed: int
    two_sided: bool = True
    cluster_forming_p: float = 0.001
    tfce: bool = False
    clusters: bool = True  # cluster size and mass (off: voxel-level only)
    connectivity: int = 6  # neighbours that join clusters and TFCE extents: 6, 18 or 26
    batch_bytes: int = BATCH_BYTES


@dataclass
class PermutationResult:
    """Observed maps and FWE p-values, all (V,) over the mask's voxels.

    null_* : the maximum over the map for the data as observed (first) and each
    rearrangement; p-values are the share of them at least as large."""

    stat: np.ndarray
    p_voxel: np.ndarray
    cluster_threshold: float
    cluster_ids: np.ndarray  # -1 outside clusters
    cluster_size: np.ndarray  # per voxel, size of its cluster (0 outside)
    cluster_mass: np.ndarray
    p_cluster_size: np.ndarray
    p_cluster_mass: np.ndarray
    tfce: np.ndarray | None
    p_tfce: np.ndarray | None
    null_max_stat: np.ndarray
    null_max_size: np.ndarray
    null_max_mass: np.ndarray
    null_max_tfce: np.ndarray | None
    n_rearrangements: int
    exhaustive: bool
    two_sided: bool  # as tested: an F test is one-sided whatever the options say
    scheme: str


def cluster_forming_threshold(p: float, design: PermutationDesign, two_sided: bool) -> float:
    """Statistic height that defines clusters: upper-tail p (split between tails when two-sided)."""
    if design.f_test:
        return float(stats.f.isf(p, design.k, design.dof))
    return float(stats.t.isf(p / 2 if two_sided else p, design.dof))


def fwe_p(values: np.ndarray, null_max: np.ndarray) -> np.ndarray:
    """Share of the null maxima >= each value (the observed maximum is one of them)."""
    ordered = np.sort(null_max)
    tol = TIE_TOLERANCE * np.abs(values)
    below = np.searchsorted(ordered, values - tol, side="left")
    return (len(ordered) - below) / len(ordered)


def _signed_for_max(stat: np.ndarray, design: PermutationDesign, two_sided: bool) -> np.ndarray:
    return np.abs(stat) if (two_sided and not design.f_test) else stat


def run_permutations(Y: np.ndarray, design: PermutationDesign, mask: np.ndarray,
                     options: PermutationOptions, label: str = "", neighbours=None,
                     tfce_extent: float = TFCE_E, prepared=None) -> PermutationResult:
    """Y : (N, V) inputs in the mask (bool 3D array with V voxels); ``neighbours``: a table as
    clusterkernels.neighbour_table gives (default: the mask's neighbours at options.connectivity);
    ``tfce_extent``: TFCE's E (0.5 for volumes; 1 is the usual choice on surfaces);
    ``prepared``: instead of Y, residuals computed in voxel blocks (groupblocks.PreparedResiduals).

    An interrupt (Ctrl-C) is taken between batches of permutations, never inside a
    (parallel) numba kernel, which it would crash."""
    with interrupts.deferred():
        return _run_permutations(Y, design, mask, options, label, neighbours, tfce_extent, prepared)


def _run_permutations(Y, design, mask, options, label, neighbours, tfce_extent, prepared=None) -> PermutationResult:
    two_sided = options.two_sided and not design.f_test
    neighbours = ck.neighbour_table(mask, options.connectivity) if neighbours is None else neighbours
    if prepared is None:
        E, ss64, stat = residuals_and_observed(Y, design)
    else:
        stat = prepared.stat
    threshold = cluster_forming_threshold(options.cluster_forming_p, design, two_sided)
    observed = _observed_measures(stat, neighbours, threshold, two_sided, options.tfce, tfce_extent)

    total = count_rearrangements(design)
    exhaustive = total <= options.n_permutations + 1
    if exhaustive:
        rearrangements = (all_sign_flips(len(design.blocks)) if design.scheme == SIGN_FLIP
                          else all_permutations(design.blocks))
    else:
        rng = np.random.default_rng(options.seed)
        rearrangements = None
    n_total = len(rearrangements) if exhaustive else options.n_permutations

    by_level = design.levels is not None
    if prepared is None:
        tiles, ss_tiles = ck.tile_residuals(E, ss64.astype(np.float32), ck.LEVEL_TILE if by_level else ck.TILE)
        del E
    else:  # residuals tiled block by block (groupblocks.py; the kernels take any tile width)
        tiles, ss_tiles = prepared.tiles, prepared.ss_tiles
    n_voxels = len(stat)
    spatial = options.clusters or options.tfce  # maps are kept only for cluster and TFCE nulls
    batch = int(max(1, min(256, options.batch_bytes // (4 * n_voxels)))) if spatial else 64
    null_stat = [observed["max_stat"]]
    null_size, null_mass, null_tfce = [observed["max_size"]], [observed["max_mass"]], [observed["max_tfce"]]
    progress = _Progress(n_total, label)
    done = 0
    if prepared is not None and prepared.null_max_stat is not None:  # voxel-level null, done by block
        null_stat, done = list(prepared.null_max_stat), n_total
    with threadpool_limits(1, "blas"):  # the kernels parallelise over voxel tiles themselves
        while done < n_total:
            count = min(batch, n_total - done)
            chunk = rearrangements[done:done + count] if exhaustive else random_rearrangements(design, count, rng)
            perm_stats, maxima = _batch_statistics(design, chunk, tiles, ss_tiles, two_sided, spatial, n_voxels)
            null_stat.extend(maxima.tolist())
            if spatial:
                sizes, masses, tfces = ck.batch_maxima(perm_stats, neighbours, threshold, two_sided,
                                                       options.tfce, tfce_extent, TFCE_H, TFCE_DH)
                null_size.extend(sizes.tolist())
                null_mass.extend(masses.tolist())
                null_tfce.extend(tfces.tolist())
            done += count
            interrupts.check()
            progress.update(done)
    progress.finish()

    null_stat = np.array(null_stat)
    if not spatial:  # no cluster null: every cluster p-value is 1
        null_size = null_size + [np.inf] * n_total
        null_mass = null_mass + [np.inf] * n_total
    null_size, null_mass = np.array(null_size, dtype=float), np.array(null_mass)
    in_cluster = observed["ids"] >= 0
    p_size = np.ones_like(stat)
    p_mass = np.ones_like(stat)
    p_size[in_cluster] = fwe_p(observed["size"][in_cluster].astype(float), null_size)
    p_mass[in_cluster] = fwe_p(observed["mass"][in_cluster], null_mass)
    tfce = p_tfce = tfce_null = None
    if options.tfce:
        tfce = observed["tfce"]
        tfce_null = np.array(null_tfce)
        p_tfce = fwe_p(np.abs(tfce), tfce_null)
    return PermutationResult(
        stat=stat, p_voxel=fwe_p(_signed_for_max(stat, design, two_sided), null_stat),
        cluster_threshold=threshold, cluster_ids=observed["ids"], cluster_size=observed["size"],
        cluster_mass=observed["mass"], p_cluster_size=p_size, p_cluster_mass=p_mass,
        tfce=tfce, p_tfce=p_tfce, null_max_stat=null_stat, null_max_size=null_size,
        null_max_mass=null_mass, null_max_tfce=tfce_null, n_rearrangements=len(null_stat),
        exhaustive=exhaustive, two_sided=two_sided, scheme=design.describe())


def _batch_statistics(design, chunk, tiles, ss_tiles, two_sided, keep, n_voxels):
    """(B, V) maps of a batch of rearrangements (when ``keep``) and their maxima."""
    dof = np.float32(design.dof)
    if design.levels is not None:
        gather, starts = _level_gather(design, chunk)
        weights = design.level_weights
        if design.level_scale > 0:  # the total comes from the level sums: only the effect rows
            every_contrast = design.f_test and design.k == weights.shape[1] - 1  # effect = the total
            weights = weights[:0] if every_contrast else weights[:design.k]
        return ck.batch_statistics_levels(gather, starts, np.ascontiguousarray(weights, dtype=np.float32),
                                          np.float32(design.level_scale), design.k, tiles, ss_tiles, dof,
                                          design.f_test, two_sided, keep, n_voxels)
    A = _batch_rows(design, chunk).astype(np.float32)
    return ck.batch_statistics(A, tiles, ss_tiles, design.basis.shape[0], design.k, dof, design.f_test,
                               two_sided, keep, n_voxels)


def _observed_measures(stat, neighbours, threshold, two_sided, with_tfce, tfce_extent=TFCE_E) -> dict:
    """Cluster ids, per-voxel cluster size and mass, TFCE, and their maxima."""
    ids = ck.cluster_roots(stat, neighbours, threshold, two_sided)
    inside = ids >= 0
    sizes = np.bincount(ids[inside], minlength=len(stat))
    masses = np.bincount(ids[inside], weights=np.abs(stat[inside]) - threshold, minlength=len(stat))
    size = np.where(inside, sizes[np.maximum(ids, 0)], 0)
    mass = np.where(inside, masses[np.maximum(ids, 0)], 0.0)
    tfce = ck.tfce_map(stat, neighbours, two_sided, tfce_extent, TFCE_H, TFCE_DH) if with_tfce else None
    return {
        "ids": ids, "size": size, "mass": mass, "tfce": tfce,
        "max_stat": float(np.max(np.abs(stat) if two_sided else stat)),
        "max_size": float(size.max(initial=0)), "max_mass": float(mass.max(initial=0.0)),
        "max_tfce": float(np.max(np.abs(tfce))) if with_tfce else 0.0,
    }


class _Progress:
    """Permutations done, rate and time left, every few seconds."""

    def __init__(self, total: int, label: str, every: float = 5.0):
        self.total, self.label, self.every = total, label, every
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every or done >= self.total:
            return
        self.last = now
        rate = done / (now - self.start)
        log.info("%spermutations %d/%d (%.0f/s, about %s left)", self.label, done, self.total, rate,
                 _duration((self.total - done) / rate))

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.start
        log.info("%s%d permutations in %s (%.0f/s)", self.label, self.total, _duration(elapsed),
                 self.total / max(elapsed, 1e-9))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
