"""Bootstrap intervals and paired tests equal brute-force computations."""

import itertools
import math

import numpy as np
import pytest

from trackstar_jax.eval import stats


def _percentile(sorted_values, q):
    # numpy's default 'linear' method, by hand.
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def test_bootstrap_interval_equals_a_loop_over_the_same_draws():
    values = [1.0, 0.5, 0.0, 0.0, 1 / 3, 1.0, 0.25, 0.0, 0.2]
    mean, low, high = stats.bootstrap_ci(values, resamples=500, seed=3)
    draws = stats.resample_indices(len(values), 500, seed=3)
    means = sorted(sum(values[i] for i in row) / len(row) for row in draws)
    assert mean == pytest.approx(sum(values) / len(values), abs=1e-15)
    assert low == pytest.approx(_percentile(means, 2.5), abs=1e-12)
    assert high == pytest.approx(_percentile(means, 97.5), abs=1e-12)
    assert low <= mean <= high
    assert stats.bootstrap_ci([0.4] * 7) == pytest.approx((0.4, 0.4, 0.4))


def test_bootstrap_converges_to_the_exact_bootstrap_distribution():
    values = np.array([0.0, 1.0, 0.5, 0.0, 0.25])
    n = len(values)
    # All n^n equally likely resamples: the exact bootstrap distribution of the mean.
    exact = sorted(np.mean(values[list(r)]) for r in itertools.product(range(n), repeat=n))
    _, low, high = stats.bootstrap_ci(values, resamples=200_000, seed=0)
    # Percentiles of a discrete distribution: within one atom's spacing (1/(n*4) here).
    assert abs(low - np.percentile(exact, 2.5)) <= 0.05 + 1e-12
    assert abs(high - np.percentile(exact, 97.5)) <= 0.05 + 1e-12


def test_paired_bootstrap_and_sign_flip_equal_brute_force():
    a = [0.5, 1.0, 0.0, 0.2, 1.0, 0.1, 0.0, 0.3]
    b = [0.25, 1.0, 0.0, 0.0, 0.5, 0.2, 0.1, 0.0]
    d = [x - y for x, y in zip(a, b, strict=True)]
    got = stats.paired_bootstrap(a, b, resamples=400, seed=1)
    draws = stats.resample_indices(len(d), 400, seed=1)
    means = sorted(sum(d[i] for i in row) / len(row) for row in draws)
    assert got['diff'] == pytest.approx(sum(d) / len(d), abs=1e-15)
    assert got['low'] == pytest.approx(_percentile(means, 2.5), abs=1e-12)
    assert got['high'] == pytest.approx(_percentile(means, 97.5), abs=1e-12)
    below = sum(m <= 0 for m in means) / len(means)
    above = sum(m >= 0 for m in means) / len(means)
    assert got['p_bootstrap'] == pytest.approx(min(1.0, 2 * min(below, above)))
    # Exact sign-flip p: every one of the 2^8 sign assignments, in a plain loop.
    observed = abs(sum(d) / len(d))
    count = 0
    for signs in itertools.product((1, -1), repeat=len(d)):
        count += abs(sum(s * x for s, x in zip(signs, d, strict=True)) / len(d)) >= observed - 1e-12
    assert stats.sign_flip_test(a, b) == pytest.approx(count / 2 ** len(d), abs=1e-15)
    # The Monte Carlo version (forced) agrees with the exact one within its noise.
    mc = stats.sign_flip_test(a, b, resamples=40_000, exact_max=0)
    assert abs(mc - count / 2 ** len(d)) < 0.02


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match='No values'):
        stats.bootstrap_ci([])
    with pytest.raises(ValueError, match='Non-finite'):
        stats.bootstrap_ci([1.0, float('nan')])
    with pytest.raises(ValueError, match='same queries'):
        stats.paired_bootstrap([1.0, 2.0], [1.0])
