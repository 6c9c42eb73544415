"""Exact full-space gradient scores (eval.full_space) against one jax.grad per example
and optax's own Adafactor update, in float64 numpy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import losses
from trackstar_jax.eval import full_space

MIN_DIM = 16  # fx.trained's Adafactor factors every matrix with both dims >= 16
# Update clipping's threshold: here some per-tensor updates of one example are above it
# and some below (checked), so both branches of the clip are compared.
CLIP = 3.0


def _flat_grad(model, params, ex, mean: bool = False):
    """{path: float64 flat gradient} of one example's summed (or mean token) loss."""
    t, m = jnp.asarray(ex['tokens'][None]), jnp.asarray(ex['loss_mask'][None], jnp.float32)

    def loss(p):
        value = losses.example_losses(model.apply({'params': p}, t), t, m)[0]
        return value / jnp.sum(m) if mean else value

    g = jax.grad(loss)(params)
    return {
        '/'.join(str(k.key) for k in path): np.asarray(leaf, np.float64).ravel()
        for path, leaf in jax.tree_util.tree_leaves_with_path(g)
    }, g


def _factored_state(state):
    found = [s for s in state if isinstance(s, optax.FactoredState)]
    assert len(found) == 1
    return found[0]


def _optax_update(tx, grads, fs, params):
    """optax's update of ``grads`` from the saved second moments, held fixed (decay
    exponent 100: at the state's step count the new g² gets weight 0 in float32)."""
    rest = (optax.EmptyState(),) * (len(tx.init(params)) - 1)  # the stateless transforms
    updates, _ = tx.update(grads, (fs, *rest), params)
    return {
        '/'.join(str(k.key) for k in path): np.asarray(leaf, np.float64).ravel()
        for path, leaf in jax.tree_util.tree_leaves_with_path(updates)
    }


@pytest.fixture(scope='module')
def setup():
    model, params, state = fx.model_and_state()
    queries, examples = fx.query_examples(3), fx.train_examples(5)
    products = full_space.gradient_products(
        model,
        params,
        state,
        queries,
        examples,
        seq_len=fx.SEQ_LEN,
        query_len=12,
        batch_size=4,
        grams=True,
    )
    return model, params, state, queries, examples, products


def _norms(a):
    return np.linalg.norm(a, axis=1)


def _cosine_rows(a, b):
    return (a @ b.T) / np.outer(_norms(a), _norms(b))


@pytest.mark.parametrize('exclude', [(), ('embedding',)])
def test_forms_equal_brute_force(setup, exclude):
    model, params, state, queries, examples, products = setup
    fs = _factored_state(state)
    # C g by optax's own factored-RMS scaling (no clipping), with V held at the state.
    scale = optax.chain(
        optax.scale_by_factored_rms(decay_rate=100.0, min_dim_size_to_factor=MIN_DIM),
        optax.clip_by_block_rms(1e30),
    )
    clipped = optax.chain(
        optax.scale_by_factored_rms(decay_rate=100.0, min_dim_size_to_factor=MIN_DIM),
        optax.clip_by_block_rms(CLIP),
    )
    # The same step of a model trained with Adafactor's parameter scaling.
    scaled = optax.chain(
        optax.scale_by_factored_rms(decay_rate=100.0, min_dim_size_to_factor=MIN_DIM),
        optax.clip_by_block_rms(CLIP),
        optax.scale_by_param_block_rms(),
    )

    def keep(flat):
        paths = sorted(p for p in flat if not any(x in p for x in exclude))
        return np.concatenate([flat[p] for p in paths])

    gq, cq = [], []
    for ex in queries:
        flat, tree = _flat_grad(model, params, ex)
        gq.append(keep(flat))
        cq.append(keep(_optax_update(scale, tree, fs, params)))
    # One tensor's parameters shrunk to RMS 1e-5, below the scale's 1e-3 floor: only the
    # scale reads the params, so the same gradients give the floored step.
    small_path = [p for p in products.paths if p.endswith('kernel')][-1]

    def shrink(path, p):
        if '/'.join(str(k.key) for k in path) != small_path:
            return p
        return p * (1e-5 / jnp.sqrt(jnp.mean(jnp.square(p))))

    small_params = jax.tree_util.tree_map_with_path(shrink, params)
    gm, cm, um, us, uf = [], [], [], [], []
    for ex in examples:
        flat, tree = _flat_grad(model, params, ex)
        gm.append(keep(flat))
        cm.append(keep(_optax_update(scale, tree, fs, params)))
        mean_grad = _flat_grad(model, params, ex, mean=True)[1]
        um.append(keep(_optax_update(clipped, mean_grad, fs, params)))
        us.append(keep(_optax_update(scaled, mean_grad, fs, params)))
        uf.append(keep(_optax_update(scaled, mean_grad, fs, small_params)))
    gq, cq, gm, cm, um, us, uf = map(np.stack, (gq, cq, gm, cm, um, us, uf))
    # ⟨C g_q, C g_m⟩ and ⟨g_q, C g_m⟩ from optax's C g on each side.
    expected = {
        'dot': gq @ gm.T,
        'cosine': _cosine_rows(gq, gm),
        'corrected': _cosine_rows(cq, cm),
        'train_corrected': (gq @ cm.T) / np.outer(_norms(gq), _norms(cm)),
        'step': (gq @ um.T) / _norms(gq)[:, None],
        'step, parameter scale': (gq @ us.T) / _norms(gq)[:, None],
        'step, parameter scale, floored': (gq @ uf.T) / _norms(gq)[:, None],
    }
    assert not np.allclose(cm, gm), 'the correction must change the gradients here'
    # Parameter RMS differs between tensors (norm scales 1, weights ~0.02), so the
    # scaled step is not the unscaled one times a constant.
    ratio = expected['step, parameter scale'] / expected['step']
    assert ratio.std() > 0.1 * np.abs(ratio).mean(), ratio
    # ... and the shrunk tensor carries enough of the step for its floor to show.
    floor_change = expected['step, parameter scale, floored'] - expected['step, parameter scale']
    assert np.abs(floor_change).max() > 1e-2 * np.abs(expected['step, parameter scale']).max()
    # Clipping must bind on some (tensor, example) pairs and not on others, or 'step'
    # tests only one branch of it.
    rms = np.sqrt(products.example_sq_corrected) / products.example_tokens
    rms = rms / np.sqrt(products.sizes)[:, None]
    assert (rms > CLIP).any() and (rms < CLIP).any(), rms
    # Each entry's Cauchy-Schwarz bound: the gradients (and optax's C g) are float32, so an
    # inner product is exact to a few float32 ulps of that bound, not of the result (a
    # near-orthogonal pair's score is a small difference of large terms).
    bound = {
        'dot': np.outer(_norms(gq), _norms(gm)),
        'cosine': 1.0,
        'corrected': 1.0,
        'train_corrected': 1.0,
        'step': _norms(um)[None, :],
        'step, parameter scale': _norms(us)[None, :],
        'step, parameter scale, floored': _norms(uf)[None, :],
    }
    rms = products.param_rms.copy()
    rms[products.paths.index(small_path)] = 1e-5
    floored = dataclasses.replace(products, param_rms=rms)
    for name, want in expected.items():
        form, _, scale_by = name.partition(', ')
        got = full_space.score(floored if 'floored' in name else products, form,
                               exclude=exclude, clipping_threshold=CLIP,
                               parameter_scale=bool(scale_by))  # fmt: skip
        err, allowed = np.abs(got - want), 2e-5 * np.abs(want) + 1e-6 * bound[name]
        assert (err <= allowed).all(), (name, (err / allowed).max(), got, want)
    # The Gram matrices preconditioned_score builds R from, within the same ulps.
    kept = full_space.tensor_mask(products, exclude)
    grams = {
        'raw_example_gram': gm,
        'corrected_example_gram': cm,
        'raw_query_gram': gq,
        'corrected_query_gram': cq,
    }
    for field, x in grams.items():
        got, want = getattr(products, field)[kept].sum(0), x @ x.T
        err = np.abs(got - want)
        allowed = 2e-5 * np.abs(want) + 1e-6 * np.outer(_norms(x), _norms(x))
        assert (err <= allowed).all(), (field, (err / allowed).max())


def _synthetic_products(rng, sizes, nq, n):
    """GradientProducts of random per-tensor vectors (raw x, corrected c x), and the
    vectors themselves."""
    xq = [rng.normal(size=(nq, d)) * rng.uniform(0.5, 2) for d in sizes]
    xm = [rng.normal(size=(n, d)) + 0.3 * rng.normal(size=(1, d)) for d in sizes]
    c = [rng.uniform(0.2, 3.0, size=(1, d)) for d in sizes]
    cq, cm = (
        [x * ct for x, ct in zip(xq, c, strict=True)],
        [x * ct for x, ct in zip(xm, c, strict=True)],
    )

    def stack(f, a, b):
        return np.stack([f(x, y) for x, y in zip(a, b, strict=True)])

    def dot(x, y):
        return x @ y.T

    def sq(x, _):
        return (x * x).sum(1)

    products = full_space.GradientProducts(
        paths=tuple(f't{i}' for i in range(len(sizes))),
        sizes=np.array(sizes),
        raw=stack(dot, xq, xm),
        corrected=stack(dot, cq, cm),
        train_corrected=stack(dot, xq, cm),
        query_sq=stack(sq, xq, xq),
        query_sq_corrected=stack(sq, cq, cq),
        example_sq=stack(sq, xm, xm),
        example_sq_corrected=stack(sq, cm, cm),
        example_tokens=np.ones(n),
        raw_example_gram=stack(dot, xm, xm),
        corrected_example_gram=stack(dot, cm, cm),
        raw_query_gram=stack(dot, xq, xq),
        corrected_query_gram=stack(dot, cq, cq),
    )
    return products, {False: (xq, xm), True: (cq, cm)}


def _dense_preconditioned(xq, xm, blocks, lam, damping, unit_norm):
    """The index's recipe on explicit vectors: per block R = λ R_eval + (1 − λ) R_train,
    (R + δI)^{-1/2} by eigh with δ = damping x mean eigenvalue, both sides, unit norm."""
    fq, fm = [], []
    for b in sorted(set(blocks) - {-1}):
        q = np.concatenate([x for x, bb in zip(xq, blocks, strict=True) if bb == b], axis=1)
        m = np.concatenate([x for x, bb in zip(xm, blocks, strict=True) if bb == b], axis=1)
        r = lam * q.T @ q / len(q) + (1 - lam) * m.T @ m / len(m)
        evals, evecs = np.linalg.eigh(r)
        evals = np.maximum(evals, 0.0)
        inv_sqrt = (evecs / np.sqrt(evals + damping * evals.mean())) @ evecs.T
        fq.append(q @ inv_sqrt)
        fm.append(m @ inv_sqrt)
    fq, fm = np.concatenate(fq, axis=1), np.concatenate(fm, axis=1)
    if unit_norm:
        return _cosine_rows(fq, fm)
    return fq @ fm.T


# Block 0: two tensors, 65 values > N + Q = 16 (R rank-deficient: the push-through case);
# block 1: 6 values < 16 (R full rank); the last tensor is left out.
SIZES, BLOCKS = (40, 25, 6, 30), (0, 0, 1, -1)


@pytest.mark.parametrize('corrected', [False, True])
@pytest.mark.parametrize(
    'lam, damping',
    [
        (0.0, 0.01),
        (0.0, 1.0),
        (0.3, 0.01),
        (0.7, 0.1),
        (1.0, 0.01),
        # Near 0 and 1 one side's weight in R is below δ: the complement formula's case.
        (1e-9, 0.01),
        (1 - 1e-9, 0.01),
        # Damping above every eigenvalue: neither side's weight is above δ.
        (0.5, 1e4),
    ],
)
@pytest.mark.parametrize('unit_norm', [True, False])
def test_preconditioned_score_equals_dense_r(corrected, lam, damping, unit_norm):
    rng = np.random.default_rng(7)
    products, vectors = _synthetic_products(rng, SIZES, nq=4, n=12)
    xq, xm = vectors[corrected]
    got = full_space.preconditioned_score(
        products, BLOCKS, corrected=corrected, lam=lam, damping=damping, unit_norm=unit_norm
    )
    want = _dense_preconditioned(xq, xm, BLOCKS, lam, damping, unit_norm)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
    # R changes the scores here (else the test would not see it).
    plain = _dense_preconditioned(xq, xm, BLOCKS, 0.0, 1e12, unit_norm)
    assert not np.allclose(got / np.abs(got).max(), plain / np.abs(plain).max(), atol=1e-3)


def test_tensor_blocks_follow_the_layout(setup):
    _, params, *_, products = setup
    spec = dataclasses.replace(fx.SPEC, num_layer_blocks=2)
    blocks = full_space.tensor_blocks(products, spec, params)
    entries = {e.path: e.block for e in spec.layout(params).entries}
    assert [entries[p] for p in products.paths] == list(blocks)
    assert all(b == -1 for p, b in zip(products.paths, blocks, strict=True) if 'embedding' in p)
    assert len(set(blocks) - {-1}) == 4


def test_dense_corrections_match_the_kernels_scaling(setup):
    """C multiplied out equals ``kernel._correct``'s factors applied to a gradient."""
    _, params, state, *_ = setup
    dense = full_space.dense_corrections(params, 'adafactor', state)
    fs = _factored_state(state)
    tx = optax.scale_by_factored_rms(decay_rate=100.0, min_dim_size_to_factor=MIN_DIM)
    ones = jax.tree.map(jnp.ones_like, params)
    by_optax = _optax_update(optax.chain(tx, optax.clip_by_block_rms(1e30)), ones, fs, params)
    assert set(dense) == set(by_optax)
    for path, c in dense.items():
        np.testing.assert_allclose(c.ravel(), by_optax[path], rtol=1e-6, err_msg=path)
    assert any(c.ndim == 2 and not np.allclose(c, c.flat[0]) for c in dense.values())


def test_refusals(setup):
    products = setup[-1]
    with pytest.raises(ValueError, match='form must be one of'):
        full_space.score(products, 'trackstar')
    with pytest.raises(ValueError, match='leaves no parameter'):
        full_space.score(products, 'dot', exclude=('',))
    with pytest.raises(ValueError, match="parameter_scale needs form 'step'"):
        full_space.score(products, 'cosine', parameter_scale=True)
    blocks = np.zeros(len(products.paths), int)
    with pytest.raises(ValueError, match=r'lam must be in \[0, 1\]'):
        full_space.preconditioned_score(products, blocks, corrected=True, lam=1.5)
    with pytest.raises(ValueError, match='at least one kept'):
        full_space.preconditioned_score(products, blocks - 1, corrected=True)
    rng = np.random.default_rng(0)
    synthetic, _ = _synthetic_products(rng, SIZES, nq=4, n=12)
    zero = {f: getattr(synthetic, f).copy() for f in ('raw', 'raw_example_gram', 'raw_query_gram')}
    for field in zero.values():
        field[2] = 0.0  # tensor 2, block 1 on its own: every gradient zero
    zeroed = full_space.GradientProducts(**{**synthetic.__dict__, **zero})
    with pytest.raises(ValueError, match='every gradient in it is zero'):
        full_space.preconditioned_score(zeroed, BLOCKS, corrected=False)
    no_grams = full_space.GradientProducts(
        **{**products.__dict__, 'raw_example_gram': None, 'corrected_example_gram': None}
    )
    with pytest.raises(ValueError, match='grams=True'):
        full_space.preconditioned_score(no_grams, blocks, corrected=True)
