"""K-FAC / EK-FAC in the projected space against dense float64 Kronecker algebra in numpy."""

import jax
import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import index, pipeline, preconditioners, projected_kfac
from trackstar_jax import sharding as shd
from trackstar_jax.pipeline import FitConfig, ScoreConfig

DAMPING = 0.05


@pytest.fixture(scope='module')
def indices(tmp_path_factory):
    root = tmp_path_factory.mktemp('kron')
    feat = fx.featurizer()
    train = fx.build_index(feat, fx.train_examples(45), str(root / 'train'), chunk_rows=8)
    queries = fx.build_index(feat, fx.query_examples(6), str(root / 'queries'), chunk_rows=8)
    return train, queries


def _dense_second_moments(rows, nb, side, corrected):
    """The per-block D_b x D_b F each kind approximates, built as explicit Kronecker products."""
    g = rows.astype(np.float64).reshape(len(rows), nb, side, side)
    out = []
    for b in range(nb):
        gb = g[:, b]
        left = np.einsum('nij,nkj->ik', gb, gb) / len(gb)
        right = np.einsum('nji,njk->ik', gb, gb) / len(gb)
        if not corrected:
            out.append(np.kron(left, right) / np.trace(left))
            continue
        basis = np.kron(np.linalg.eigh(left)[1], np.linalg.eigh(right)[1])
        flat = gb.reshape(len(gb), -1)
        exact = flat.T @ flat / len(gb)  # E[vec G vec Gᵀ], the moment EK-FAC corrects toward
        out.append(basis @ np.diag(np.diag(basis.T @ exact @ basis)) @ basis.T)
    return out


def _dense_inverse_sqrt(f, damping):
    evals, evecs = np.linalg.eigh(f)
    lam = damping * np.trace(f) / len(f)
    return (evecs / np.sqrt(np.maximum(evals, 0) + lam)) @ evecs.T


@pytest.mark.parametrize('kind', ['kfac_projected', 'ekfac_projected'])
def test_fit_and_scores_equal_the_dense_kronecker_inverse(indices, kind):
    train, queries = indices
    nb, side = projected_kfac.block_shape(train)
    assert side * side == train.dim // nb and side > 1
    t = train.read(slice(0, len(train))).astype(np.float64)
    q = queries.read(slice(0, len(queries))).astype(np.float64)
    fs = _dense_second_moments(t, nb, side, corrected=kind.startswith('ek'))
    m = [_dense_inverse_sqrt(f, DAMPING) for f in fs]

    def dense_apply(v):
        blocks = v.reshape(len(v), nb, -1)
        return np.concatenate([blocks[:, b] @ m[b] for b in range(nb)], axis=1)

    h = pipeline.fit(train, None, FitConfig(preconditioner=kind, damping=DAMPING, chunk_rows=7))
    np.testing.assert_allclose(np.asarray(h.apply(q)), dense_apply(q), rtol=1e-4, atol=1e-6)
    # Unnormalised scores are q (F + λI)⁻¹ m for every pair (k = all rows).
    res = pipeline.score(queries, train, h, ScoreConfig(k=len(train), unit_norm=False))
    want = dense_apply(q) @ dense_apply(t).T
    for i in range(len(q)):
        order = np.argsort(-want[i], kind='stable')
        np.testing.assert_allclose(res.scores[i], want[i, order], rtol=1e-4, atol=1e-6)
    if kind == 'ekfac_projected':
        # The corrected eigenvalues are the exact moment's diagonal in the basis, so they
        # differ from K-FAC's products (the index is not exactly Kronecker-structured).
        assert h.info['kfac_eigenvalue_error'] > 1e-3


def test_kronecker_structured_rows_make_kfac_and_ekfac_agree(tmp_path):
    # Rows G = a bᵀ (one position of one matrix): the second moment is exactly Kronecker
    # when a and b are independent, so K-FAC and EK-FAC converge to the same F and its
    # inverse; with a finite sample they differ at sampling error only.
    rng = np.random.default_rng(0)
    n, side = 4000, 4
    a = rng.normal(size=(n, side)) * np.array([3.0, 1.0, 0.5, 0.2])
    b = rng.normal(size=(n, side)) @ rng.normal(size=(side, side))
    rows = np.einsum('ni,nj->nij', a, b).reshape(n, side * side).astype(np.float32)
    idx = fx_index(tmp_path, rows, block_dim=side * side)
    kf = pipeline.fit(idx, None, FitConfig(preconditioner='kfac_projected', damping=DAMPING))
    ek = pipeline.fit(idx, None, FitConfig(preconditioner='ekfac_projected', damping=DAMPING))
    assert ek.info['kfac_eigenvalue_error'] < 0.1
    probe = rng.normal(size=(8, side * side)).astype(np.float32)
    want = np.asarray(ek.apply(probe))
    np.testing.assert_allclose(
        np.asarray(kf.apply(probe)), want, rtol=0.1, atol=0.05 * np.abs(want).max()
    )


def fx_index(tmp_path, rows, block_dim):
    """An index of ``rows`` whose manifest declares side x side blocks of ``block_dim``."""
    nb = rows.shape[1] // block_dim
    layout = {'block_names': [f'b{i}' for i in range(nb)], 'block_dim': block_dim}
    url = str(tmp_path / f'rows{block_dim}')
    w = index.create(url, {'layout': layout}, [f'r{i:05d}' for i in range(len(rows))],
                     dim=rows.shape[1], chunk_rows=len(rows))  # fmt: skip
    w.write_chunk(0, rows, np.ones(len(rows)))
    return w.finish()


def test_fit_is_the_same_on_one_and_eight_devices_and_survives_save_load(indices, tmp_path):
    train, queries = indices
    assert len(jax.devices()) == 8
    q = queries.read(slice(0, len(queries)))
    eight = pipeline.fit(train, None, FitConfig(preconditioner='ekfac_projected', chunk_rows=16))
    one = pipeline.fit(
        train,
        None,
        FitConfig(preconditioner='ekfac_projected', chunk_rows=5),
        mesh=shd.make_mesh((('data', 1), ('model', 1)), devices=jax.devices()[:1]),
    )
    # The same up to float32 summation order (per-device partial sums).
    want = np.asarray(eight.apply(q))
    np.testing.assert_allclose(
        np.asarray(one.apply(q)), want, rtol=1e-5, atol=1e-6 * np.abs(want).max()
    )
    eight.save(str(tmp_path / 'ek'))
    back = preconditioners.load(str(tmp_path / 'ek'))
    assert back.kind == 'ekfac_projected' and back.info == eight.info
    np.testing.assert_array_equal(np.asarray(back.apply(q)), np.asarray(eight.apply(q)))


def test_refuses_non_square_blocks_and_bad_damping(indices, tmp_path):
    train, _ = indices
    with pytest.raises(ValueError, match='damping'):
        pipeline.fit(train, None, FitConfig(preconditioner='kfac_projected', damping=0.0))
    idx = fx_index(tmp_path, np.ones((4, 12), np.float32), block_dim=6)
    with pytest.raises(ValueError, match='not a square'):
        pipeline.fit(idx, None, FitConfig(preconditioner='ekfac_projected'))
