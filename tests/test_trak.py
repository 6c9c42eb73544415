"""TRAK as its paper defines it: the one-sided JL projection and the model ensemble,
against float64 numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import compile as compile_lib
from trackstar_jax import grads, losses, pipeline
from trackstar_jax import sharding as shd
from trackstar_jax.grads import kernel
from trackstar_jax.grads.layout import ParamEntry
from trackstar_jax.grads.projection import one_sided_matrix

ONE_SIDED = grads.GradientSpec(
    block_dim=40, num_layer_blocks=2, seed=3, projection='one_sided', correction='none'
)


def _per_example_grads(model, params, batch, output_fn='loss'):
    """One jax.grad per example (no vmap), flattened by path, float64."""
    out = []
    for toks, mask in zip(batch['tokens'], batch['loss_mask'], strict=True):
        t, m = jnp.asarray(toks[None]), jnp.asarray(mask[None])
        g = jax.grad(
            lambda p, t=t, m=m: kernel.output_objective(
                model.apply({'params': p}, t), t, m, output_fn
            )
        )(params)
        out.append({k: np.asarray(v, np.float64) for k, v in kernel.tree_by_path(g).items()})
    return out


def _numpy_features(layout, seed, per_example):
    """Σ_{params of block b} vec(g) P in float64, the block vectors concatenated."""
    mats = {
        e.path: np.asarray(one_sided_matrix(seed, e, layout.block_dim), np.float64)
        for e in layout.entries
        if not e.excluded
    }
    rows = []
    for g in per_example:
        blocks = np.zeros((layout.num_blocks, layout.block_dim))
        for e in layout.entries:
            if not e.excluded:
                blocks[e.block] += g[e.path].reshape(-1) @ mats[e.path]
        rows.append(blocks.reshape(-1))
    return np.stack(rows)


def _batch(n=5, seed=1):
    ex = fx.train_examples(n, seed=seed)
    from trackstar_jax.data import examples as examples_lib

    return examples_lib.pad_batch(ex, n, fx.SEQ_LEN)


@pytest.mark.parametrize('output_fn', ['loss', 'trak'])
def test_one_sided_features_equal_float64_projection_of_each_gradient(output_fn):
    model, params, state = fx.trained(fx.CFG, steps=3)
    spec = grads.GradientSpec(**{**ONE_SIDED.to_dict(), 'output_fn': output_fn})
    feat = grads.Featurizer(model, params, spec)
    assert feat.dim == 2 * 2 * 40 and feat.layout.block_dim == 40  # not a square
    batch = _batch()
    want = _numpy_features(
        feat.layout, spec.seed, _per_example_grads(model, params, batch, output_fn)
    )
    got = np.asarray(feat(batch), np.float64)
    assert np.linalg.norm(got - want) < 1e-4 * np.linalg.norm(want)
    # The embedding is excluded; project() of one gradient tree is the same map.
    assert 'embedding' not in {e.path for e in feat.layout.entries if not e.excluded}
    t, m = jnp.asarray(batch['tokens'][:1]), jnp.asarray(batch['loss_mask'][:1])
    g = jax.grad(lambda p: losses.example_losses(model.apply({'params': p}, t), t, m)[0])(params)
    if output_fn == 'loss':
        np.testing.assert_allclose(np.asarray(feat.project(g)), got[0], rtol=1e-4, atol=1e-6)


def test_one_sided_adafactor_correction_is_the_gradient_over_sqrt_v():
    # One factored parameter: optax's V = v_row v_colᵀ / mean(v_row), float64.
    rng = np.random.default_rng(5)
    params = {'layers_0': {'mlp': {'w': jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)}}}
    tx = optax.adafactor(1e-2, min_dim_size_to_factor=8)
    state = tx.init(params)
    for _ in range(3):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) ** 3, jnp.float32), params)
        _, state = tx.update(g, state, params)
    fs = state[0]
    v_row = np.asarray(fs.v_row['layers_0']['mlp']['w'], np.float64)
    v_col = np.asarray(fs.v_col['layers_0']['mlp']['w'], np.float64)
    v = np.outer(v_row, v_col) / v_row.mean()
    grad = rng.normal(size=(24, 40))

    class Dummy(nn.Module):
        def __call__(self, x):
            return x

    spec = grads.GradientSpec(
        block_dim=30, num_layer_blocks=1, split_attention_mlp=False, projection='one_sided'
    )
    feat = grads.Featurizer(Dummy(), params, spec, opt_state=state)
    entry = feat.layout.by_path()['layers_0/mlp/w']
    want = (grad / np.sqrt(v)).reshape(-1) @ np.asarray(one_sided_matrix(0, entry, 30), np.float64)
    as_tree = {'layers_0': {'mlp': {'w': jnp.asarray(grad, jnp.float32)}}}
    got = np.asarray(feat.project(as_tree), np.float64)
    assert np.linalg.norm(got - want) < 1e-5 * np.linalg.norm(want)


def test_one_sided_projection_preserves_inner_products_in_expectation():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(20, 12))
    b = a + rng.normal(size=(20, 12))
    entry = ParamEntry('w', (20, 12), 0, (20, 12), 123)
    vals = np.array(
        [
            float((a.reshape(-1) @ (p := np.asarray(one_sided_matrix(s, entry, 8), np.float64)))
                  @ (b.reshape(-1) @ p))
            for s in range(600)
        ]
    )  # fmt: skip
    exact = float(np.sum(a * b))
    assert abs(vals.mean() - exact) < 4 * vals.std() / np.sqrt(len(vals)), (vals.mean(), exact)
    big = np.asarray(one_sided_matrix(0, ParamEntry('x', (300, 40), 0, (300, 40), 7), 25))
    assert abs(big.var() * 25 - 1) < 0.02 and abs(big.mean()) < 0.01
    # Not the two-sided pair's values: a different key.
    two = grads.GradientSpec(block_dim=16, num_layer_blocks=1)
    assert two.to_dict().get('projection') is None  # manifests of two-sided indices unchanged


def test_one_sided_index_is_the_same_on_one_and_eight_devices(tmp_path):
    assert len(jax.devices()) == 8, 'the suite runs on 8 fake CPU devices'
    model, params, state = fx.trained(fx.CFG)
    mesh = shd.make_mesh(((shd.DATA, 8), (shd.MODEL, 1)))
    one = grads.Featurizer(model, params, ONE_SIDED)
    eight = grads.Featurizer(model, params, ONE_SIDED, mesh=mesh)
    ex = fx.train_examples(13)
    a = fx.build_index(one, ex, tmp_path / 'one', chunk_rows=8)
    b = fx.build_index(eight, ex, tmp_path / 'eight', chunk_rows=8)
    va, vb = a.read(slice(0, len(a))), b.read(slice(0, len(b)))
    np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6 * np.abs(va).max())
    assert a.manifest['spec']['projection'] == 'one_sided' and a.dim == 160


def test_one_sided_refusals():
    model, params, state = fx.trained(fx.CFG)
    with pytest.raises(ValueError, match='GiB'):
        grads.Featurizer(model, params, ONE_SIDED, max_one_sided_bytes=1000)
    with pytest.raises(ValueError, match='projection must be one of'):
        grads.GradientSpec(projection='three_sided')
    with pytest.raises(ValueError, match='perfect square'):
        grads.Featurizer(model, params, grads.GradientSpec(block_dim=40, num_layer_blocks=2))
    mesh = shd.make_mesh(((shd.DATA, 8), (shd.MODEL, 1)))
    with pytest.raises(ValueError, match='two-sided'):
        compile_lib.index_program(model, ONE_SIDED, None, mesh, compile_lib.CompileConfig())


WEIGHTS = (0.5, 0.25, 0.25)


@pytest.fixture(scope='module')
def ensemble(tmp_path_factory):
    """Three models (different seeds and steps), TRAK's features of each: one-sided
    projection of the margin gradient times Q, a train and a query index per model."""
    root = tmp_path_factory.mktemp('trak')
    train_ex, query_ex = fx.train_examples(60), fx.query_examples(5)
    spec = grads.GradientSpec(**{**ONE_SIDED.to_dict(), 'output_fn': 'trak', 'block_dim': 8})
    out = []
    for i, (seed, steps) in enumerate(((0, 2), (1, 3), (2, 4))):
        model, params, _ = fx.trained(fx.CFG, steps=steps, seed=seed)
        feat = grads.Featurizer(model, params, spec)
        order = np.random.default_rng(i).permutation(len(train_ex))
        train = fx.build_index(
            feat, [train_ex[j] for j in order], root / f'train{i}', chunk_rows=16
        )
        queries = fx.build_index(feat, query_ex, root / f'queries{i}', chunk_rows=8)
        out.append((train, queries))
    return out


def _trak_brute_force(ensemble, damping, unit_norm):
    """Σ_i w_i ⟨(R_i + δ_i)^-1/2 q, (R_i + δ_i)^-1/2 m⟩ (unit norm: cosine), float64, with
    R_i = Φ_iᵀΦ_i / n and δ_i = damping · tr(R_i) / D."""
    names = sorted(ensemble[0][0].ids)
    total = 0.0
    for (train, queries), w in zip(ensemble, WEIGHTS, strict=True):
        phi = np.asarray(train.read(slice(0, len(train))), np.float64)
        r = phi.T @ phi / len(phi)
        evals, evecs = np.linalg.eigh(r + damping * np.trace(r) / len(r) * np.eye(len(r)))
        inv_sqrt = evecs @ np.diag(evals**-0.5) @ evecs.T
        q = np.asarray(queries.read(slice(0, len(queries))), np.float64) @ inv_sqrt
        by_id = dict(zip(train.ids, phi @ inv_sqrt, strict=True))
        m = np.stack([by_id[e] for e in names])
        if unit_norm:
            q = q / np.linalg.norm(q, axis=1, keepdims=True)
            m = m / np.linalg.norm(m, axis=1, keepdims=True)
        total = total + w * q @ m.T
    return names, total


@pytest.mark.parametrize('unit_norm', [False, True])
def test_trak_ensemble_equals_the_float64_brute_force(ensemble, unit_norm):
    damping = 0.01
    fit = pipeline.FitConfig(preconditioner='full', damping=damping)
    cps = [
        pipeline.Checkpoint(t, q, w, preconditioner=pipeline.fit(t, None, fit))
        for (t, q), w in zip(ensemble, WEIGHTS, strict=True)
    ]
    names, dense = _trak_brute_force(ensemble, damping, unit_norm)
    cfg = pipeline.ScoreConfig(k=7, opponents=2, unit_norm=unit_norm, chunk_rows=16)
    result = pipeline.score_checkpoints(cps, cfg)
    scale = np.abs(dense).max()
    for q in range(len(dense)):
        order = sorted(range(len(names)), key=lambda j: (-dense[q, j], names[j]))
        np.testing.assert_allclose(
            result.scores[q], dense[q, order[:7]], rtol=1e-4, atol=1e-5 * scale
        )
        # Ids agree wherever the brute-force scores are not within float32 noise.
        gaps = np.abs(np.diff(dense[q, order[:8]])) > 1e-4 * scale
        for j in range(7):
            if gaps[j] and (j == 0 or gaps[j - 1]):
                assert result.ids[q][j] == names[order[j]]
    # One model with its preconditioner is plain preconditioned scoring of that model.
    train, queries = ensemble[0]
    one = pipeline.score_checkpoints(
        [pipeline.Checkpoint(train, queries, 1.0, cps[0].preconditioner)], cfg
    )
    plain = pipeline.score(queries, train, cps[0].preconditioner, cfg)
    assert one.ids == plain.ids
    np.testing.assert_allclose(
        one.scores, plain.scores, rtol=1e-4, atol=1e-6 * np.abs(plain.scores).max()
    )


def test_ensemble_refuses_a_preconditioner_of_another_model(ensemble):
    (t0, q0), (t1, q1), _ = ensemble
    other = pipeline.fit(t1, None, pipeline.FitConfig(preconditioner='full'))
    with pytest.raises(ValueError, match='preconditioner'):
        pipeline.score_checkpoints([pipeline.Checkpoint(t0, q0, 1.0, preconditioner=other)])
