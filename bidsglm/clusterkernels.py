"""Compiled cluster and TFCE kernels on the in-mask voxel list, or on any graph.

A map is a (V,) vector over the mask's voxels (C order of the grid) plus a
(V, C) table of neighbours, so no kernel touches the full grid. Clusters are
face-connected by default (C = 6, as nilearn); C = 18 adds edges, 26 corners
(FSL's default); the table's shape carries the choice into every kernel.

The kernels need one property of the table: its first C/2 columns hold every
neighbour of lower index ("earlier": union-find then sees each edge once) and
the rest the neighbours of higher index, -1 padded. A voxel grid's table has it
by construction; ``graph_neighbour_table`` builds it for any undirected graph
(a mesh's triangle edges, CIFTI grayordinates), so the same kernels run there.

TFCE (Smith & Nichols 2009) is computed for every height at once: voxels are
added from the highest value down and merged with union-find; every addition
creates a node of the component tree whose size is constant over the heights
it lives for, so one sort and one pass give what per-threshold labelling
(nilearn: 100 labellings of the grid per map) gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .caches import configure_numba

# a cache folder this user can write (or none: then numba compiles in memory), chosen
# before numba is imported since numba reads NUMBA_CACHE_DIR then
CACHE = configure_numba(Path(__file__).parent)
import numba  # noqa: E402  (reads NUMBA_CACHE_DIR when imported)

CONNECTIVITIES = (6, 18, 26)
CONNECTIVITY = "faces (6-neighbour, NN1)"
CONNECTIVITY_NAMES = {6: CONNECTIVITY, 18: "faces and edges (18-neighbour, NN2)",
                      26: "faces, edges and corners (26-neighbour, NN3)"}
TFCE_CONNECTIVITY_NAMES = {6: "faces (6-neighbour)", 18: "faces and edges (18-neighbour)",
                           26: "faces, edges and corners (26-neighbour)"}


def neighbour_offsets(connectivity: int = 6) -> np.ndarray:
    """(C, 3) offsets of a voxel's neighbours: 6 share a face, 18 a face or an edge, 26 any
    corner. The first C/2 point to voxels earlier in C order, the rest are their negatives."""
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    order = {6: 1, 18: 2, 26: 3}[connectivity]  # most non-zero components allowed
    earlier = [off for off in np.ndindex(3, 3, 3)
               if 0 < np.count_nonzero(np.array(off) - 1) <= order
               and tuple(np.array(off) - 1) < (0, 0, 0)]  # lexicographically negative: earlier
    earlier = np.array(earlier) - 1
    return np.vstack([earlier, -earlier])


def neighbour_table(mask: np.ndarray, connectivity: int = 6) -> np.ndarray:
    """(V, C) int32 in-mask index of each voxel's neighbours (C = connectivity), -1 outside
    the mask; the first C/2 columns are the neighbours earlier in C order."""
    index = np.full(np.array(mask.shape) + 2, -1, dtype=np.int32)
    inner = index[1:-1, 1:-1, 1:-1]
    inner[mask] = np.arange(int(mask.sum()), dtype=np.int32)
    ijk = np.argwhere(mask) + 1
    offsets = neighbour_offsets(connectivity)
    table = np.empty((len(ijk), len(offsets)), dtype=np.int32)
    for n, off in enumerate(offsets):
        table[:, n] = index[tuple((ijk + off).T)]
    return table


def edge_adjacency(edges: np.ndarray, n: int):
    """(n, n) symmetric CSR adjacency (scipy) of an undirected graph given as (E, 2) index pairs
    (repeats and self-loops ignored)."""
    import scipy.sparse as sp

    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    e = e[e[:, 0] != e[:, 1]]
    i, j = np.concatenate([e[:, 0], e[:, 1]]), np.concatenate([e[:, 1], e[:, 0]])
    adj = sp.csr_matrix((np.ones(i.size, dtype=np.int8), (i, j)), shape=(n, n))
    adj.sum_duplicates()
    adj.sort_indices()
    return adj


def graph_neighbour_table(adjacency) -> np.ndarray:
    """(V, 2D) int32 neighbour table of a graph (a symmetric scipy sparse adjacency, or anything with
    CSR ``indptr``/``indices``) in the kernels' layout: columns [0, D) hold the neighbours of lower
    index, [D, 2D) those of higher index, -1 padded; D is the most of either kind any element has."""
    adj = adjacency.tocsr() if hasattr(adjacency, "tocsr") else adjacency
    indptr, indices = np.asarray(adj.indptr, dtype=np.int64), np.asarray(adj.indices, dtype=np.int64)
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n), np.diff(indptr))
    keep = indices != rows
    rows, cols = rows[keep], indices[keep]
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    later = cols > rows
    halves = []
    for part in (~later, later):
        r, c = rows[part], cols[part]
        count = np.bincount(r, minlength=n)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        halves.append((r, c, np.arange(r.size) - start[r], int(count.max(initial=0))))
    width = max(1, max(h[3] for h in halves))
    table = np.full((n, 2 * width), -1, dtype=np.int32)
    for half, (r, c, slot, _) in enumerate(halves):
        table[r, half * width + slot] = c
    return table


def restrict_table(table: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The table over the elements in ``keep`` (bool), renumbered; neighbours outside become -1.
    Renumbering keeps the order, so the earlier/later layout holds."""
    index = np.full(len(keep) + 1, -1, dtype=np.int32)  # index[-1] (for -1 entries) stays -1
    index[:-1][keep] = np.arange(int(keep.sum()), dtype=np.int32)
    return index[table[keep]]


@numba.njit(cache=CACHE, nogil=True)
def _find(parent, i):
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        nxt = parent[i]
        parent[i] = root
        i = nxt
    return root


@numba.njit(cache=CACHE, nogil=True)
def cluster_roots(values, neighbours, threshold, two_sided):
    """(V,) cluster id (a member voxel's index) of voxels above ``threshold``
    (or below -threshold when ``two_sided``; signs never join), -1 elsewhere."""
    n = values.shape[0]
    parent = np.full(n, -1, dtype=np.int32)
    for i in range(n):
        v = values[i]
        if v > threshold:
            sign = 1
        elif two_sided and v < -threshold:
            sign = -1
        else:
            continue
        parent[i] = i
        for k in range(neighbours.shape[1] // 2):  # earlier neighbours are already labelled
            j = neighbours[i, k]
            if j >= 0 and parent[j] >= 0 and (values[j] > 0) == (sign > 0):
                rj = _find(parent, j)
                ri = _find(parent, i)
                if ri != rj:
                    parent[rj] = ri
    for i in range(n):
        if parent[i] >= 0:
            parent[i] = _find(parent, i)
    return parent


@numba.njit(cache=CACHE, nogil=True)
def max_cluster_size_mass(values, neighbours, threshold, two_sided):
    """Largest cluster size and largest mass (sum of |value| - threshold) of a map."""
    roots = cluster_roots(values, neighbours, threshold, two_sided)
    n = values.shape[0]
    size = np.zeros(n, dtype=np.int64)
    mass = np.zeros(n, dtype=np.float64)
    best_size = 0
    best_mass = 0.0
    for i in range(n):
        r = roots[i]
        if r >= 0:
            size[r] += 1
            mass[r] += abs(values[i]) - threshold
            if size[r] > best_size:
                best_size = size[r]
            if mass[r] > best_mass:
                best_mass = mass[r]
    return best_size, best_mass


TFCE_MAX_STEPS = 10_000  # height steps per map at most (dh 0.1 up to a statistic of 1,000)


@numba.njit(cache=CACHE, nogil=True)
def tfce_step(values, two_sided, dh):
    """The height step used for a map: ``dh``, or peak / TFCE_MAX_STEPS when that is larger
    (peak: the largest finite value, or |value| when ``two_sided``). A t of 1 degree of
    freedom reaches 1e4..1e15 (permuted maps of 2 subjects): dh 0.1 would need up to 1e16
    steps. The sum stays a fine approximation of TFCE's integral, and memory and time
    never depend on the statistic's range."""
    peak = 0.0
    for i in range(values.shape[0]):
        v = abs(values[i]) if two_sided else values[i]
        if v > peak and v < np.inf:
            peak = v
    return max(dh, peak / TFCE_MAX_STEPS)


@numba.njit(cache=CACHE, nogil=True)
def _height_step(value, dh):
    """floor(value / dh), at most TFCE_MAX_STEPS (rounding, or +inf)."""
    ratio = value / dh
    if ratio >= TFCE_MAX_STEPS:
        return TFCE_MAX_STEPS
    return int(np.floor(ratio))


@numba.njit(cache=CACHE, nogil=True)
def _tfce_positive(values, neighbours, E, H, dh, out, sign, write):
    """TFCE of the positive part of ``values``: adds sign * TFCE to ``out`` when
    ``write``; returns the largest TFCE value.

    TFCE(v) = sum over heights h_i = i * dh <= value(v) (i = 1, 2, ...) of
    extent(v, h_i)^E * h_i^H * dh, extent being the size of v's cluster in {value >= h_i}.
    Only the height step of each voxel matters, so a counting sort on it
    replaces a full sort: voxels within one step can join in any order.

    ``dh`` comes from tfce_step, so there are at most TFCE_MAX_STEPS steps; +inf counts
    as the top step and NaN as below every height."""
    n = values.shape[0]
    top = 0
    count = 0
    for i in range(n):
        if values[i] >= dh:
            count += 1
            step = _height_step(values[i], dh)
            if step > top:
                top = step
    if count == 0:
        return 0.0
    starts = np.zeros(top + 2, dtype=np.int64)  # counting sort, highest step first
    for i in range(n):
        if values[i] >= dh:
            starts[top - _height_step(values[i], dh) + 1] += 1
    for s in range(1, top + 2):
        starts[s] += starts[s - 1]
    order = np.empty(count, dtype=np.int64)
    steps = np.empty(count, dtype=np.int64)
    for i in range(n):
        if values[i] >= dh:
            step = _height_step(values[i], dh)
            slot = starts[top - step]
            order[slot] = i
            steps[slot] = step
            starts[top - step] += 1
    uf = np.full(n, -1, dtype=np.int64)  # union-find over voxels; -1 = not yet added
    latest = np.empty(n, dtype=np.int64)  # component root -> its newest tree node
    node_parent = np.full(count, -1, dtype=np.int64)
    node_size = np.empty(count, dtype=np.int64)
    for k in range(count):
        v = order[k]
        uf[v] = v
        size = 1
        for m in range(neighbours.shape[1]):
            u = neighbours[v, m]
            if u < 0 or uf[u] < 0:
                continue
            r = _find(uf, u)
            if r == v:
                continue
            child = latest[r]
            node_parent[child] = k
            size += node_size[child]
            uf[r] = v
        node_size[k] = size
        latest[v] = k
    # a node lives for the heights between its parent's step (exclusive) and its own
    scale = dh ** (H + 1)
    acc = np.empty(count, dtype=np.float64)
    best = 0.0
    for k in range(count - 1, -1, -1):
        p = node_parent[k]
        died = steps[p] if p >= 0 else 0
        gain = 0.0
        if steps[k] > died:
            gain = (node_size[k] ** E) * (_power_sum(steps[k], H) - _power_sum(died, H)) * scale
        acc[k] = gain + (acc[p] if p >= 0 else 0.0)
        if acc[k] > best:
            best = acc[k]
        if write:
            out[order[k]] += sign * acc[k]
    return best


@numba.njit(cache=CACHE, nogil=True)
def _power_sum(m, H):
    """sum_{i=1..m} i^H (closed form for H = 2, the standard)."""
    if m <= 0:
        return 0.0
    if H == 2.0:
        return m * (m + 1) * (2 * m + 1) / 6.0
    total = 0.0
    for i in range(1, int(m) + 1):
        total += i ** H
    return total


@numba.njit(cache=CACHE, nogil=True)
def tfce_map(values, neighbours, two_sided, E=0.5, H=2.0, dh=0.1):
    """(V,) TFCE of a map; with ``two_sided`` the negative part gets negative TFCE.
    ``dh`` is the height step up to |value| dh * TFCE_MAX_STEPS, beyond which see tfce_step."""
    out = np.zeros(values.shape[0], dtype=np.float64)
    dh = tfce_step(values, two_sided, dh)
    _tfce_positive(values, neighbours, E, H, dh, out, 1.0, True)
    if two_sided:
        _tfce_positive(-values, neighbours, E, H, dh, out, -1.0, True)
    return out


@numba.njit(cache=CACHE, nogil=True)
def tfce_max(values, neighbours, two_sided, E=0.5, H=2.0, dh=0.1):
    """Largest |TFCE| of a map (what the permutation null needs), without the map."""
    unused = np.empty(0, dtype=np.float64)
    dh = tfce_step(values, two_sided, dh)
    best = _tfce_positive(values, neighbours, E, H, dh, unused, 1.0, False)
    if two_sided:
        best = max(best, _tfce_positive(-values, neighbours, E, H, dh, unused, -1.0, False))
    return best


@numba.njit(cache=CACHE, parallel=True)
def batch_maxima(stats, neighbours, cluster_threshold, two_sided, with_tfce, E, H, dh):
    """Per map (row of ``stats``): largest cluster size and mass at
    ``cluster_threshold`` and, when ``with_tfce``, largest |TFCE|."""
    b = stats.shape[0]
    sizes = np.zeros(b, dtype=np.int64)
    masses = np.zeros(b, dtype=np.float64)
    tfce_best = np.zeros(b, dtype=np.float64)
    for j in numba.prange(b):
        values = stats[j].astype(np.float64)
        sizes[j], masses[j] = max_cluster_size_mass(values, neighbours, cluster_threshold, two_sided)
        if with_tfce:
            tfce_best[j] = tfce_max(values, neighbours, two_sided, E, H, dh)
    return sizes, masses, tfce_best


TILE = 2048  # voxels per tile: a tile of residuals and its products stay in cache
LEVEL_TILE = 512  # tiles of the level kernel: (N, 512) float32 residuals fit a core's L2 cache


def tile_residuals(E: np.ndarray, ss_total: np.ndarray, width: int = TILE):
    """(N, V) residuals -> (tiles, N, width) contiguous blocks and (tiles, width) sums of
    squares, zero-padded (padding gets a sum of squares of 1 and statistic 0)."""
    n, v = E.shape
    count = -(-v // width)
    tiles = np.zeros((count, n, width), dtype=np.float32)
    ss = np.ones((count, width), dtype=np.float32)
    for t in range(count):
        used = min(width, v - t * width)
        tiles[t, :, :used] = E[:, t * width:t * width + used]
        ss[t, :used] = ss_total[t * width:t * width + used]
    return tiles, ss


@numba.njit(cache=CACHE, nogil=True, fastmath=True)
def _effect_and_rss(Q, first, ss, used, rows, k, effect, rss):
    """effect = sum of squares of Q's first k rows (from ``first``) and rss = ss - all rows'
    squares (permutation.statistics_from_projections), along voxels (vectorised loops)."""
    q0 = Q[first]
    for i in range(used):
        effect[i] = q0[i] * q0[i]
    for r in range(1, k):
        qr = Q[first + r]
        for i in range(used):
            effect[i] += qr[i] * qr[i]
    for i in range(used):
        rss[i] = ss[i] - effect[i]
    for r in range(k, rows):
        qr = Q[first + r]
        for i in range(used):
            rss[i] -= qr[i] * qr[i]


@numba.njit(cache=CACHE, nogil=True, fastmath=True)
def _tile_best(q0, effect, rss, used, k, dof, f_test, two_sided, keep, out, j, start):
    """t (q0 / sqrt(rss / dof)) or F (effect / k / (rss / dof)) of one rearrangement over one
    tile; written to out[j, start:] when ``keep``. Returns their maximum (of |t| when
    ``two_sided``); without ``keep`` only the maximum of effect / rss is tracked (no square
    root per voxel), which is all the voxel-level null needs."""
    tiny = np.float32(1e-30)
    best = np.float32(-np.inf)
    if keep:
        for i in range(used):
            r = max(rss[i], tiny)
            if f_test:
                value = effect[i] / r * (dof / k)
            else:
                value = q0[i] / np.sqrt(r / dof)
            out[j, start + i] = value
            best = max(best, abs(value) if two_sided else value)
    elif f_test or two_sided:
        for i in range(used):
            best = max(best, effect[i] / max(rss[i], tiny))
    else:
        for i in range(used):
            best = max(best, q0[i] * abs(q0[i]) / max(rss[i], tiny))  # signed square: same order as t
    return best


@numba.njit(cache=CACHE, nogil=True)
def _batch_maxima_from_tiles(tile_best, keep, f_test, dof, k):
    """Each rearrangement's maximum over the tiles, back on the statistic's scale."""
    n_tiles, b = tile_best.shape
    maxima = np.empty(b, dtype=np.float64)
    for j in range(b):
        best = tile_best[0, j]
        for t in range(1, n_tiles):
            best = max(best, tile_best[t, j])
        if keep:
            maxima[j] = best
        elif f_test:
            maxima[j] = best * dof / k
        else:
            maxima[j] = np.sign(best) * np.sqrt(abs(best) * dof)
    return maxima


@numba.njit(cache=CACHE, parallel=True, fastmath=True)
def batch_statistics(A, tiles, ss_tiles, rows, k, dof, f_test, two_sided, keep, v):
    """t or F of a batch of rearrangements, the product and the statistic fused per tile.

    A : (B * rows, N) rows u' P of each rearrangement; tiles, ss_tiles : from
    tile_residuals. Returns the maps (B, v) (empty when not ``keep``) and each map's
    maximum (of |t| when ``two_sided``).
    Call with BLAS limited to one thread: the tiles are the parallel loop."""
    b = A.shape[0] // rows
    n_tiles, _, width = tiles.shape
    out = np.empty((b if keep else 0, v), dtype=np.float32)
    tile_best = np.full((n_tiles, b), -np.inf, dtype=np.float32)
    for t in numba.prange(n_tiles):
        Q = np.dot(A, tiles[t])
        effect = np.empty(width, dtype=np.float32)
        rss = np.empty(width, dtype=np.float32)
        start = t * width
        used = min(width, v - start)
        for j in range(b):
            _effect_and_rss(Q, j * rows, ss_tiles[t], used, rows, k, effect, rss)
            tile_best[t, j] = _tile_best(Q[j * rows], effect, rss, used, k, dof, f_test, two_sided, keep,
                                         out, j, start)
    return out, _batch_maxima_from_tiles(tile_best, keep, f_test, dof, k)


@numba.njit(cache=CACHE, nogil=True, fastmath=True)
def _add_rows(acc, tile, rows, used):
    """acc = sum of tile[rows], four rows per pass (fewer loads and stores of acc)."""
    src = tile[rows[0]]
    for i in range(used):
        acc[i] = src[i]
    m = 1
    while m + 4 <= rows.shape[0]:
        s1, s2, s3, s4 = tile[rows[m]], tile[rows[m + 1]], tile[rows[m + 2]], tile[rows[m + 3]]
        for i in range(used):
            acc[i] += (s1[i] + s2[i]) + (s3[i] + s4[i])
        m += 4
    while m < rows.shape[0]:
        src = tile[rows[m]]
        for i in range(used):
            acc[i] += src[i]
        m += 1


@numba.njit(cache=CACHE, parallel=True, fastmath=True)
def batch_statistics_levels(gather, starts, weights, scale, k, tiles, ss_tiles, dof, f_test, two_sided, keep, v):
    """batch_statistics for designs whose projection rows take few distinct values ("levels",
    the ANOVA's conditions): u' P E = sum over levels l of w_l * S_l, S_l the sum of the rows
    of P E at level l, so a rearrangement costs N row additions per voxel plus a few
    multiply-adds per level instead of (k + q) x N.

    gather : (B, N) for each rearrangement the rows of E to add, grouped by level;
    starts : (L + 1,) where each level's group begins in a row of ``gather``;
    weights : (R, L) the rows computed explicitly, effect rows first;
    scale : when > 0, the sum of squares of all k + q projections is scale * ||S||^2 (the
        rows span every contrast of the levels and are orthonormal: a balanced ANOVA), so
        only the k effect rows are explicit (none for an F test on all of them: R = 0);
        when 0, all k + q rows are explicit (R = k + q).
    Returns what batch_statistics returns."""
    b = gather.shape[0]
    explicit, levels = weights.shape
    n_tiles, _, width = tiles.shape
    out = np.empty((b if keep else 0, v), dtype=np.float32)
    tile_best = np.full((n_tiles, b), -np.inf, dtype=np.float32)
    for t in numba.prange(n_tiles):
        tile = tiles[t]
        ss = ss_tiles[t]
        acc = np.empty(width, dtype=np.float32)
        squares = np.empty(width, dtype=np.float32)
        Q = np.empty((max(explicit, 1), width), dtype=np.float32)
        effect = np.empty(width, dtype=np.float32)
        rss = np.empty(width, dtype=np.float32)
        start = t * width
        used = min(width, v - start)
        for j in range(b):
            squares[:] = 0.0
            Q[:] = 0.0
            for lev in range(levels):
                _add_rows(acc, tile, gather[j, starts[lev]:starts[lev + 1]], used)
                if scale > 0:
                    for i in range(used):
                        squares[i] += acc[i] * acc[i]
                for r in range(explicit):
                    w = weights[r, lev]
                    q = Q[r]
                    for i in range(used):
                        q[i] += w * acc[i]
            if scale > 0:
                if explicit == 0:  # F on every contrast of the levels
                    for i in range(used):
                        effect[i] = scale * squares[i]
                else:
                    _effect_and_rss(Q, 0, ss, used, k, k, effect, rss)
                for i in range(used):
                    rss[i] = ss[i] - scale * squares[i]
            else:
                _effect_and_rss(Q, 0, ss, used, explicit, k, effect, rss)
            tile_best[t, j] = _tile_best(Q[0], effect, rss, used, k, dof, f_test, two_sided, keep, out, j, start)
    return out, _batch_maxima_from_tiles(tile_best, keep, f_test, dof, k)
