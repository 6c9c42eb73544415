"""LDS against hand-computed values and a brute-force loop."""

import numpy as np
import pytest

from trackstar_jax.eval import lds


def test_hand_computed_case():
    # 3 examples, 4 subsets, 1 query. Scores 1, 2, 4 make every subset sum distinct.
    scores = np.array([[1.0, 2.0, 4.0]])
    masks = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 0, 0]], bool)
    # Predicted sums: 3, 6, 5, 1 -> ranks 2, 4, 3, 1.
    np.testing.assert_array_equal(lds.predicted(scores, masks), [[3.0, 6.0, 5.0, 1.0]])
    # Outcomes ranked 1, 4, 2, 3: d = (1, 0, 1, -2), Σd² = 6, ρ = 1 - 6·6 / (4·15) = 0.4.
    outcome = np.array([[0.1, 0.9, 0.2, 0.5]])
    got = lds.lds(scores, masks, outcome)
    assert got.per_query[0] == pytest.approx(0.4)
    assert got.mean == pytest.approx(0.4)
    # A perfect predictor and its negation.
    assert lds.lds(scores, masks, [[3.0, 6.0, 5.0, 1.0]]).mean == pytest.approx(1.0)
    assert lds.lds(scores, masks, [[-3.0, -6.0, -5.0, -1.0]]).mean == pytest.approx(-1.0)


def test_spearman_with_ties_matches_pearson_of_mean_ranks():
    a = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    b = np.array([2.0, 1.0, 4.0, 4.0, 9.0])
    ra = np.array([1.0, 2.5, 2.5, 4.0, 5.0])  # by hand
    rb = np.array([2.0, 1.0, 3.5, 3.5, 5.0])
    assert lds.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert np.isnan(lds.spearman(a, np.ones(5)))


def test_lds_equals_brute_force_loop_and_ci_brackets_mean():
    rng = np.random.default_rng(0)
    q, n, m = 6, 20, 12
    scores = rng.normal(size=(q, n))
    masks = lds.subset_masks(n, m, 0.5, seed=3)
    assert masks.sum(1).tolist() == [10] * m
    assert (lds.subset_masks(n, 5, 0.5, seed=3) == masks[:5]).all()  # prefix-stable
    outcome = rng.normal(size=(q, m))
    got = lds.lds(scores, masks, outcome)
    want = []
    for i in range(q):
        pred = [sum(scores[i, k] for k in range(n) if masks[j, k]) for j in range(m)]
        # Spearman without ties: 1 - 6 Σ d² / (m (m² - 1)), ranks by double argsort.
        d = np.argsort(np.argsort(pred)) - np.argsort(np.argsort(outcome[i]))
        want.append(1 - 6 * (d**2).sum() / (m * (m * m - 1)))
    np.testing.assert_allclose(got.per_query, want, rtol=1e-12)
    assert got.ci[0] <= got.mean <= got.ci[1]
    with pytest.raises(ValueError, match='Shapes disagree'):
        lds.lds(scores, masks[:, :5], outcome)
