"""Nonsphericity correction of repeated-measures F tests (Greenhouse-Geisser, Huynh-Feldt).

The repeated-measures model's F test refers its statistic to F(k, (S-1)(K-1))
for S subjects and K conditions, which is exact only under sphericity: every
difference between conditions has the same variance. When that fails the test
is liberal. Box's epsilon measures the departure: with M the (K-1, K-1)
covariance of orthonormal condition contrasts across subjects,

    epsilon_GG = tr(M)^2 / ((K - 1) tr(M^2))            (1 / (K-1) <= epsilon <= 1)

(Greenhouse & Geisser 1959), and Huynh & Feldt's (1976) less biased estimate

    epsilon_HF = min(1, (S (K-1) epsilon_GG - 2) / ((K-1) (S - 1 - (K-1) epsilon_GG)))

both degrees of freedom of the F test are multiplied by epsilon. Estimated per
voxel, as a repeated-measures ANOVA (or AFNI's 3dMVM) does at each voxel.

Arrays only: data are (S, K, V) subject x condition x voxel.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy import special

from .statistics import z_from_p

CORRECTIONS = ("none", "gg", "hf")
NAMES = {"none": "none", "gg": "Greenhouse-Geisser", "hf": "Huynh-Feldt"}


def orthonormal_contrasts(k: int) -> np.ndarray:
    """(K-1, K) orthonormal rows, each orthogonal to the constant."""
    return scipy.linalg.null_space(np.ones((1, k))).T


def greenhouse_geisser(data: np.ndarray) -> np.ndarray:
    """(V,) Greenhouse-Geisser epsilon of (S, K, V) subject x condition data (nan where the
    conditions do not differ at all)."""
    s, k, _ = data.shape
    if s < 2 or k < 2:
        raise ValueError(f"epsilon needs at least 2 subjects and 2 conditions, got {s} and {k}")
    z = np.einsum("ck,skv->scv", orthonormal_contrasts(k), data)  # (S, K-1, V)
    z -= z.mean(axis=0)
    m = np.einsum("scv,sdv->cdv", z, z) / (s - 1)  # (K-1, K-1, V) covariance
    trace = np.einsum("ccv->v", m)
    trace_sq = np.einsum("cdv,cdv->v", m, m)  # tr(M^2) of a symmetric M
    centred = data - data.mean(axis=(0, 1))
    total = np.einsum("skv,skv->v", centred, centred) / (s - 1)
    # conditions that never differ (beyond rounding): nothing to estimate epsilon from (nan)
    degenerate = trace <= 1e-12 * total
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(degenerate, np.nan, trace**2 / ((k - 1) * trace_sq))


def huynh_feldt(data: np.ndarray) -> np.ndarray:
    """(V,) Huynh-Feldt epsilon (capped at 1) of (S, K, V) subject x condition data."""
    s, k, _ = data.shape
    gg = greenhouse_geisser(data)
    numerator = s * (k - 1) * gg - 2
    denominator = (k - 1) * (s - 1 - (k - 1) * gg)
    with np.errstate(divide="ignore", invalid="ignore"):
        hf = np.where(denominator > 0, numerator / denominator, 1.0)
    return np.minimum(hf, 1.0)


def epsilon(data: np.ndarray, correction: str) -> np.ndarray:
    """(V,) epsilon for ``correction`` ('gg' or 'hf'); ones for 'none'.

    Kept within its bounds [1 / (K-1), 1]; a voxel where the conditions never differ
    (no variance to estimate it from) gets 1: its F is 0 whatever the degrees of freedom."""
    if correction == "gg":
        eps = greenhouse_geisser(data)
    elif correction == "hf":
        eps = huynh_feldt(data)
    elif correction == "none":
        return np.ones(data.shape[2])
    else:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    eps = np.where(np.isfinite(eps) & (eps > 0), eps, 1.0)
    return np.clip(eps, 1.0 / (data.shape[1] - 1), 1.0)


def corrected_f_tails(f: np.ndarray, df1: float, df2: float, eps: np.ndarray):
    """Upper-tail p and the matching z of F with both degrees of freedom times epsilon (per voxel)."""
    a = np.asarray(eps, dtype=np.float64) * df1
    b = np.asarray(eps, dtype=np.float64) * df2
    f = np.asarray(f, dtype=np.float64)
    p = special.fdtrc(a, b, f)
    return p, z_from_p(p, special.fdtr(a, b, f))
