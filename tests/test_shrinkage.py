"""R_eval shrunk toward R_train: the Ledoit-Wolf intensity against an explicit float64 loop,
its choices on query sets of known structure, and the mixed_shrunk preconditioner."""

import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import hessian, pipeline, shrinkage
from trackstar_jax.pipeline import FitConfig, ScoreConfig


def _moment(rows, nb):
    v = np.asarray(rows, np.float64).reshape(len(rows), nb, -1)
    return np.einsum('nbi,nbj->bij', v, v) / len(rows)


def _brute_force_intensity(queries, r_train, nb):
    """Ledoit-Wolf with every per-query outer product formed explicitly."""
    s = _moment(queries, nb)
    c = np.trace(s, axis1=1, axis2=2).sum() / np.trace(r_train, axis1=1, axis2=2).sum()
    x = queries.reshape(len(queries), nb, -1)
    out = []
    for b in range(nb):
        delta = np.linalg.norm(s[b] - c * r_train[b]) ** 2
        beta = sum(np.linalg.norm(np.outer(xi, xi) - s[b]) ** 2 for xi in x[:, b])
        beta /= len(queries) ** 2
        out.append(1 - min(beta, delta) / delta)
    return np.array(out), c


def test_intensity_equals_the_explicit_outer_product_loop():
    rng = np.random.default_rng(0)
    r_train = _moment(rng.normal(size=(300, 24)) * np.geomspace(2, 0.2, 24), 2)
    queries = rng.normal(size=(9, 24)) + 3 * rng.normal(size=(9, 1)) * rng.normal(size=24)
    got, c = shrinkage.ledoit_wolf_intensity(_moment(queries, 2), r_train, queries)
    want, c_want = _brute_force_intensity(queries, r_train, 2)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert c == pytest.approx(c_want, rel=1e-12)
    assert np.all((got >= 0) & (got <= 1))


def test_shared_directions_are_kept_and_single_query_directions_shrunk():
    nb, db, n = 2, 256, 32
    rng = np.random.default_rng(1)
    scales = np.geomspace(3.0, 0.1, nb * db)
    draw = lambda k: rng.normal(size=(k, nb * db)) * scales  # noqa: E731
    r_train = _moment(draw(2000), nb)

    def alphas(q):
        return shrinkage.ledoit_wolf_intensity(_moment(q, nb), r_train, q)[0]

    template = rng.normal(size=nb * db)
    template /= np.linalg.norm(template)
    own = rng.normal(size=(n, nb * db))
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    same = alphas(draw(n))  # queries like the training rows: nothing to keep
    shared = alphas(draw(n) + 10 * rng.normal(size=(n, 1)) * template)  # a template
    single = alphas(draw(n) + 10 * rng.normal(size=(n, 1)) * own)  # each query its own
    assert same.max() < 0.1
    assert shared.max() > 0.8
    assert single.max() < 0.1


def test_mixed_shrunk_fit_is_the_numpy_mixture_and_zero_intensity_ranks_as_r_train(tmp_path):
    feat = fx.featurizer()
    train = fx.build_index(feat, fx.train_examples(45), str(tmp_path / 'train'), chunk_rows=8)
    queries = fx.build_index(feat, fx.query_examples(6), str(tmp_path / 'queries'), chunk_rows=8)
    nb = len(train.manifest['layout']['block_names'])
    t = np.asarray(train.read(slice(0, len(train))), np.float64)
    q = np.asarray(queries.read(slice(0, len(queries))), np.float64)
    r_t, r_e = _moment(t, nb), _moment(q, nb)
    alphas, c = _brute_force_intensity(q, r_t, nb)
    h = pipeline.fit(train, queries, FitConfig(preconditioner='mixed_shrunk', lam=0.7))
    np.testing.assert_allclose(h.info['shrinkage_alpha'], alphas, rtol=1e-4, atol=1e-6)
    shrunk = alphas[:, None, None] * r_e + (1 - alphas[:, None, None]) * c * r_t
    want = hessian.inverse_sqrt(0.7 * shrunk + 0.3 * r_t, FitConfig().damping)
    np.testing.assert_allclose(
        h.arrays['r_inv_sqrt'], want, rtol=2e-3, atol=1e-4 * np.abs(want).max()
    )
    # λ auto reads the crossing off the shrunk curve; the fit records it.
    auto = pipeline.fit(train, queries, FitConfig(preconditioner='mixed_shrunk'))
    assert 0 <= auto.info['lam'] <= 1 and len(auto.info['shrinkage_alpha']) == nb
    # With every intensity 0 the mixture is a multiple of R_train: the same ranking as the
    # 'train' preconditioner.
    zero = hessian.inverse_sqrt(0.7 * c * r_t + 0.3 * r_t, FitConfig().damping).astype(np.float32)
    h.arrays['r_inv_sqrt'] = zero
    h._digest = None
    cfg = ScoreConfig(k=10)
    got = pipeline.score(queries, train, h, cfg)
    base = pipeline.score(
        queries, train, pipeline.fit(train, None, FitConfig(preconditioner='train')), cfg
    )
    assert got.ids == base.ids
    np.testing.assert_allclose(got.scores, base.scores, rtol=1e-4, atol=1e-6)
