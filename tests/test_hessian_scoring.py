"""Fit and score against brute-force float64 numpy computations from the index vectors."""

import os

import jax
import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import hessian, index, pipeline, preconditioners
from trackstar_jax import sharding as shd
from trackstar_jax.pipeline import FitConfig, ScoreConfig


@pytest.fixture(scope='module')
def indices(tmp_path_factory):
    root = tmp_path_factory.mktemp('indices')
    feat = fx.featurizer()
    train = fx.build_index(feat, fx.train_examples(45), str(root / 'train'), chunk_rows=8)
    queries = fx.build_index(feat, fx.query_examples(6), str(root / 'queries'), chunk_rows=8)
    return str(root), train, queries


def _blocks(v, nb):
    return v.reshape(len(v), nb, -1)


def _numpy_r(vectors, nb):
    v = _blocks(vectors.astype(np.float64), nb)
    return np.einsum('nbi,nbj->bij', v, v) / len(v)


def _numpy_inv_sqrt(r, damping):
    out = []
    for block in r:
        e, u = np.linalg.eigh(block)
        e = np.maximum(e, 0)
        out.append(u @ np.diag(1 / np.sqrt(e + damping * e.mean())) @ u.T)
    return np.stack(out)


def test_full_preconditioner_is_the_dense_numpy_inverse_sqrt(indices):
    _, train, queries = indices
    t = train.read(slice(0, len(train))).astype(np.float64)
    q = queries.read(slice(0, len(queries))).astype(np.float64)
    h = pipeline.fit(train, None, FitConfig(preconditioner='full', damping=0.05, chunk_rows=7))
    want = _numpy_inv_sqrt((t.T @ t / len(t))[None], 0.05)
    got = h.arrays['r_inv_sqrt']
    assert got.shape == (1, train.dim, train.dim)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4 * np.abs(want).max())
    # Scores: q (R + δI)^-1 v, the TRAK form, for every pair (k = all).
    res = pipeline.score(queries, train, h, ScoreConfig(k=len(train), unit_norm=False))
    dense = q @ want[0] @ want[0] @ t.T
    for i in range(len(q)):
        order = np.argsort(-dense[i], kind='stable')
        np.testing.assert_allclose(res.scores[i], dense[i, order], rtol=2e-3, atol=1e-5)
    # It differs from the block-diagonal R_train (the blocks are not independent here).
    block = pipeline.fit(train, None, FitConfig(preconditioner='train', damping=0.05))
    assert not np.allclose(block.apply(q), h.apply(q), rtol=1e-2)


def test_fit_matches_numpy_and_whitens(indices):
    root, train, queries = indices
    nb = 4
    t = train.read(slice(0, len(train)))
    q = queries.read(slice(0, len(queries)))
    r_train, r_eval = _numpy_r(t, nb), _numpy_r(q, nb)
    for lam in (0.3, 'auto'):
        h = pipeline.fit(train, queries, FitConfig(lam=lam, damping=0.05, chunk_rows=7))
        if lam == 'auto':
            # k scales with D: 1000 of 65536 -> at least component 1 here.
            assert h.info['k_component'] == max(1, round(1000 * train.dim / 65536))
            e_t = np.sort(np.concatenate([np.linalg.eigvalsh(b) for b in r_train]))[::-1]
            e_e = np.sort(np.concatenate([np.linalg.eigvalsh(b) for b in r_eval]))[::-1]
            k = h.info['k_component'] - 1
            assert h.info['lam'] * e_e[k] == pytest.approx((1 - h.info['lam']) * e_t[k], rel=1e-4)
            np.testing.assert_allclose(
                h.diagnostics['eig_train'], e_t, rtol=1e-4, atol=1e-6 * e_t[0]
            )
            # Fewer queries than a block's width: R_eval's spectrum came from their Gram
            # matrices (zeros past the query count), not from R_eval itself.
            assert len(queries) < train.dim // nb
            np.testing.assert_allclose(
                h.diagnostics['eig_eval'], e_e, rtol=1e-4, atol=1e-6 * e_e[0]
            )
        r = h.info['lam'] * r_eval + (1 - h.info['lam']) * r_train
        np.testing.assert_allclose(
            h.arrays['r_inv_sqrt'],
            _numpy_inv_sqrt(r, 0.05),
            rtol=2e-3,
            atol=1e-4 * np.abs(h.arrays['r_inv_sqrt']).max(),
        )
        # R^-1/2 (R + δ I) R^-1/2 = I on the damped spectrum.
        for b in range(nb):
            e = np.maximum(np.linalg.eigvalsh(r[b]), 0)
            damped = r[b] + 0.05 * e.mean() * np.eye(r.shape[1])
            m = h.arrays['r_inv_sqrt'][b].astype(np.float64)
            np.testing.assert_allclose(m @ damped @ m, np.eye(r.shape[1]), atol=2e-3)


@pytest.mark.parametrize('n', [5, 24])
def test_low_rank_spectrum_equals_the_full_one(n):
    rng = np.random.default_rng(n)
    v = rng.standard_normal((n, 3 * 16)) * rng.uniform(0.1, 3.0, 3 * 16)
    full = hessian.sorted_eigs(_numpy_r(v, 3))
    np.testing.assert_allclose(
        hessian.low_rank_sorted_eigs(v.astype(np.float32), 3), full, atol=1e-5 * full[0]
    )


def test_auto_lambda_recovers_a_known_crossing():
    d = 65536 // 64
    comp = np.arange(1, d + 1, dtype=np.float64)
    e_train = 10.0 * comp**-0.5
    e_eval = 1000.0 * comp**-1.5
    # Curves λ e_eval and (1-λ) e_train meet at component k exactly when
    # λ / (1 - λ) = e_train[k] / e_eval[k].
    for k in (1, 16, 100, 700):
        lam = hessian.auto_lambda(e_eval, e_train, k)
        expected = e_train[k - 1] / (e_eval[k - 1] + e_train[k - 1])
        assert lam == pytest.approx(expected, rel=1e-12)
        diff = lam * e_eval - (1 - lam) * e_train
        assert diff[k - 2] > 0 if k > 1 else True  # eval curve above before k
        assert abs(diff[k - 1]) < 1e-12 * e_train[0] and diff[k] < 0  # below after


def test_save_load_round_trip(indices, tmp_path):
    _, train, queries = indices
    h = pipeline.fit(train, queries)
    h.save(str(tmp_path / 'h'))
    h.save(str(tmp_path / 'h'))  # a second save replaces the first whole
    loaded = preconditioners.load(str(tmp_path / 'h'))
    np.testing.assert_array_equal(loaded.arrays['r_inv_sqrt'], h.arrays['r_inv_sqrt'])
    assert loaded.info == h.info and loaded.manifest == h.manifest and loaded.kind == 'mixed'
    np.testing.assert_array_equal(loaded.diagnostics['eig_eval'], h.diagnostics['eig_eval'])
    assert len([d for d in os.listdir(tmp_path / 'h') if d.startswith('arrays_')]) == 1
    v = train.read(slice(0, 5))
    np.testing.assert_allclose(
        np.asarray(loaded.apply(v)),
        np.einsum('nbi,bij->nbj', _blocks(v, 4), h.arrays['r_inv_sqrt']).reshape(5, -1),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match='needs a query index'):
        pipeline.fit(train, None, FitConfig(preconditioner='mixed', lam=0.5))
    with pytest.raises(ValueError, match='registered'):
        pipeline.fit(train, queries, FitConfig(preconditioner='ekfac'))


def _brute_force(q, t, r_inv_sqrt, unit_norm, k, ids):
    def tf(v):
        v = v.astype(np.float64)
        if r_inv_sqrt is not None:
            r = r_inv_sqrt.astype(np.float64)
            v = np.einsum('nbi,bij->nbj', _blocks(v, r.shape[0]), r).reshape(len(v), -1)
        if unit_norm:
            v = v / np.linalg.norm(v, axis=1, keepdims=True)
        return v

    s = tf(q) @ tf(t).T
    order = [sorted(range(len(t)), key=lambda j, row=row: (-row[j], ids[j]))[:k] for row in s]
    return np.array(order), np.take_along_axis(s, np.array(order), 1)


@pytest.mark.parametrize(
    'use_r,unit_norm', [(False, False), (False, True), (True, False), (True, True)]
)
def test_scores_equal_brute_force(indices, use_r, unit_norm):
    root, train, queries = indices
    h = pipeline.fit(train, queries) if use_r else None
    res = pipeline.score(
        queries,
        train,
        h,
        ScoreConfig(k=7, unit_norm=unit_norm, chunk_rows=10),
        out_path=os.path.join(root, f'scores_{use_r}.jsonl'),
    )
    rows, scores = _brute_force(
        queries.read(slice(0, 6)),
        train.read(slice(0, 45)),
        h.arrays['r_inv_sqrt'] if h else None,
        unit_norm,
        7,
        train.ids,
    )
    np.testing.assert_array_equal(res.rows, rows)
    np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-6 * np.abs(scores).max())
    assert res.ids[0] == [train.ids[r] for r in rows[0]]
    lines = open(os.path.join(root, f'scores_{use_r}.jsonl')).read().splitlines()
    assert len(lines) == 6 * 7 and '"rank": 1' in lines[0]


@pytest.mark.parametrize('use_r', [False, True])
def test_opponents_equal_brute_force(indices, use_r):
    """The most negative scores, from the same streamed pass, on the 8-device mesh."""
    root, train, queries = indices
    h = pipeline.fit(train, queries) if use_r else None
    out = os.path.join(root, f'opp_{use_r}.jsonl')
    res = pipeline.score(
        queries, train, h, ScoreConfig(k=4, chunk_rows=10, opponents=5), out_path=out
    )
    q, t = queries.read(slice(0, 6)), train.read(slice(0, 45))
    r = h.arrays['r_inv_sqrt'] if h else None
    rows, _ = _brute_force(q, t, r, True, 4, train.ids)
    np.testing.assert_array_equal(res.rows, rows)
    # Opponents: ascending score, ties by id, as the brute force on -score gives them.
    _, all_scores = _brute_force(q, t, r, True, 45, train.ids)
    s = np.empty_like(all_scores)
    order, _ = _brute_force(q, t, r, True, 45, train.ids)
    np.put_along_axis(s, order, all_scores, 1)
    low = np.array(
        [sorted(range(45), key=lambda j, row=row: (row[j], train.ids[j]))[:5] for row in s]
    )
    np.testing.assert_array_equal(res.opponent_rows, low)
    want = np.take_along_axis(s, low, 1)
    np.testing.assert_allclose(res.opponent_scores, want, rtol=1e-5, atol=1e-6)
    assert (res.opponent_scores <= res.scores[:, -1:]).all()
    back = pipeline.ScoreResult.from_jsonl(out)  # opponents round-trip, rank -1, -2, ...
    np.testing.assert_array_equal(back.opponent_rows, res.opponent_rows)
    assert back.opponent_ids == res.opponent_ids and back.ids == res.ids


def test_identical_for_devices_and_chunk_sizes(indices):
    _, train, queries = indices
    h = pipeline.fit(train, queries)
    one = shd.make_mesh((('data', 1), ('model', 1)), devices=jax.devices()[:1])
    base = pipeline.score(queries, train, h, ScoreConfig(k=5, chunk_rows=45), mesh=one)
    for mesh, chunk in [
        (None, 8),
        (shd.make_mesh((('data', 8), ('model', 1))), 3),
        (shd.make_mesh((('data', 2), ('model', 4))), 16),
    ]:
        got = pipeline.score(queries, train, h, ScoreConfig(k=5, chunk_rows=chunk), mesh=mesh)
        np.testing.assert_array_equal(got.rows, base.rows)
        np.testing.assert_allclose(got.scores, base.scores, rtol=1e-6)
    # Fitting on 1 device or 8 gives the same R^-1/2.
    h1 = pipeline.fit(train, queries, FitConfig(chunk_rows=45), mesh=one)
    np.testing.assert_allclose(
        h1.arrays['r_inv_sqrt'],
        h.arrays['r_inv_sqrt'],
        rtol=1e-4,
        atol=1e-5 * np.abs(h.arrays['r_inv_sqrt']).max(),
    )


def test_ties_are_broken_by_example_id(tmp_path):
    feat = fx.featurizer()
    ex = fx.train_examples(6)
    # Three identical examples under different ids, in non-sorted row order.
    dup = [dict(ex[0], id=i) for i in ('c-dup', 'a-dup', 'b-dup')]
    train = fx.build_index(feat, ex[1:] + dup, str(tmp_path / 't'), chunk_rows=2)
    queries = fx.build_index(feat, [dict(ex[0], id='q')], str(tmp_path / 'q'), chunk_rows=2)
    for chunk in (1, 3, 8):
        res = pipeline.score(queries, train, None, ScoreConfig(k=3, chunk_rows=chunk))
        assert res.ids[0] == ['a-dup', 'b-dup', 'c-dup']
        assert res.scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_score_refuses_mismatched_indices(indices, tmp_path):
    _, train, _ = indices
    other = fx.featurizer(spec=fx.grads.GradientSpec(block_dim=16, num_layer_blocks=2, seed=9))
    q = fx.build_index(other, fx.query_examples(2), str(tmp_path / 'q'), chunk_rows=2)
    with pytest.raises(index.ManifestMismatchError):
        pipeline.score(q, train)


@pytest.mark.fault(
    'A changed byte in the cached row norms ||M v|| beside an index',
    'CRC mismatch: recomputed from the index (warning), same scores',
)
def test_row_norms_are_cached_verified_and_recomputed_when_damaged(indices, tmp_path):
    """Folded scoring reads ||M v|| from the index's cache; a damaged cache is rebuilt."""
    import shutil

    from trackstar_jax import scoring

    root, train, queries = indices
    path = str(tmp_path / 'train_copy')
    shutil.copytree(train.path, path, ignore=shutil.ignore_patterns('cache'))
    train = index.open(path)
    h = pipeline.fit(train, queries)
    cfg = ScoreConfig(k=5, chunk_rows=16)
    first = pipeline.score(queries, train, h, cfg)
    cache = [f for f in os.listdir(os.path.join(path, 'cache')) if f.endswith('.bin')]
    assert len(cache) == 1 and h.digest() in cache[0]
    brute = np.linalg.norm(
        hessian.apply_blocks(h.arrays['r_inv_sqrt'], train.read(slice(0, 45))), axis=1
    )
    np.testing.assert_allclose(scoring.row_norms(train, h), brute, rtol=1e-5)
    with open(os.path.join(path, 'cache', cache[0]), 'r+b') as f:  # flip one byte
        f.seek(17)
        byte = f.read(1)
        f.seek(17)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = pipeline.score(queries, train, h, cfg)
    np.testing.assert_array_equal(again.rows, first.rows)
    np.testing.assert_allclose(scoring.row_norms(train, h), brute, rtol=1e-5)


def test_k_above_n_on_eight_devices_returns_the_n_real_rows(tmp_path):
    assert len(jax.devices()) == 8, 'needs the 8 fake CPU devices of conftest'
    feat = fx.featurizer()
    train = fx.build_index(feat, fx.train_examples(5), str(tmp_path / 'train'), chunk_rows=2)
    queries = fx.build_index(feat, fx.query_examples(3), str(tmp_path / 'q'), chunk_rows=2)
    mesh = shd.make_mesh((('data', 8), ('model', 1)))
    for use_r in (False, True):
        h = pipeline.fit(train, queries) if use_r else None
        res = pipeline.score(queries, train, h, ScoreConfig(k=50, opponents=50), mesh=mesh)
        for q in range(3):
            assert sorted(res.rows[q].tolist()) == list(range(5))
            assert sorted(res.opponent_rows[q].tolist()) == list(range(5))


def test_streamed_chunk_sizes():
    """Chunks never exceed the index, are multiples of the data axis, and on CPU keep
    each device's shard within the staging size."""
    from trackstar_jax import streaming

    class Fake:
        def __init__(self, n, dim, dtype='float32'):
            self.n, self.dim, self.manifest = n, dim, {'dtype': dtype}

        def __len__(self):
            return self.n

    eight = shd.make_mesh(((shd.DATA, 8), (shd.MODEL, 1)))
    one = shd.make_mesh(((shd.DATA, 1), (shd.MODEL, 1)), devices=jax.devices()[:1])
    cap_rows = streaming.CPU_STAGE_BYTES // (16384 * 4)  # rows of 16,384 float32 per shard
    assert streaming.chunk_rows_for(Fake(100, 8), eight, 4096) == 104  # the index, rounded
    assert streaming.chunk_rows_for(Fake(10**6, 16384), one, 4096) == cap_rows
    assert streaming.chunk_rows_for(Fake(10**6, 16384), eight, 4096) == 8 * cap_rows
    assert streaming.chunk_rows_for(Fake(10**6, 16384, 'bfloat16'), one, 4096) == 2 * cap_rows
    assert streaming.chunk_rows_for(Fake(10**6, 2**24), one, 4096) == 1  # at least a row
