"""Uncertainty over queries: bootstrap intervals and paired tests between methods.

Every metric of the evaluation is a mean over queries of a per-query value (reciprocal
rank, hit@k, tail-patch change), so its uncertainty is that of a mean over a sample of
queries. :func:`bootstrap_ci` resamples queries with replacement (percentile interval);
two methods are compared on the *same* queries, so :func:`paired_bootstrap` resamples the
per-query differences and :func:`sign_flip_test` tests "no difference" by flipping the
sign of each query's difference (exact enumeration for up to ``exact_max`` queries).
All draws come from a seeded ``numpy.random.Generator``: the same inputs give the same
intervals on every machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

DEFAULT_RESAMPLES = 10_000


def _values(x: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(x, np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError('No values to resample.')
    if not np.isfinite(v).all():
        raise ValueError('Non-finite per-query values: drop or fix them before resampling.')
    return v


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] query indices drawn with replacement (the bootstrap's samples)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap interval over queries."""
    v = _values(values)
    means = v[resample_indices(v.size, resamples, seed)].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(v.mean()), float(low), float(high)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of a - b over the same queries, its bootstrap interval, and a two-sided p.

    p is twice the smaller share of resampled mean differences on either side of 0
    (capped at 1): the bootstrap's estimate of how often a difference this far from 0
    would come out the other way.
    """
    a, b = _values(a), _values(b)
    if a.shape != b.shape:
        raise ValueError(f'Paired values need the same queries: {a.size} vs {b.size}.')
    d = a - b
    means = d[resample_indices(d.size, resamples, seed)].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    p = min(1.0, 2.0 * min(float(np.mean(means <= 0.0)), float(np.mean(means >= 0.0))))
    return {'diff': float(d.mean()), 'low': float(low), 'high': float(high), 'p_bootstrap': p}


def sign_flip_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    exact_max: int = 16,
) -> float:
    """Two-sided p of the paired permutation (sign-flip) test of mean(a - b) = 0.

    Under "the methods do not differ", each query's difference is as likely to have
    either sign. p is the share of sign assignments whose |mean| is at least the
    observed one: all 2^n of them when n <= ``exact_max``, else ``resamples`` random ones
    (plus the observed assignment, so p is never 0).
    """
    a, b = _values(a), _values(b)
    if a.shape != b.shape:
        raise ValueError(f'Paired values need the same queries: {a.size} vs {b.size}.')
    d = a - b
    observed = abs(d.mean())
    # A relative tolerance, so that assignments equal to the observed one up to
    # rounding count as "at least as extreme".
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if d.size <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d / d.size) >= observed - tol))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(resamples, d.size))
    extreme = int(np.sum(np.abs(signs @ d / d.size) >= observed - tol))
    return (extreme + 1) / (resamples + 1)


def format_ci(mean: float, low: float, high: float, scale: float = 1.0, digits: int = 3) -> str:
    """'0.412 [0.330, 0.494]' (values multiplied by ``scale``)."""
    return f'{mean * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]'
