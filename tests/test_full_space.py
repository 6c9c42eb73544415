"""Exact full-space gradient scores (eval.full_space) against one jax.grad per example
and optax's own Adafactor update, in float64 numpy."""

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
    updates, _ = tx.update(grads, (fs, optax.EmptyState()), params)
    return {
        '/'.join(str(k.key) for k in path): np.asarray(leaf, np.float64).ravel()
        for path, leaf in jax.tree_util.tree_leaves_with_path(updates)
    }


@pytest.fixture(scope='module')
def setup():
    model, params, state = fx.model_and_state()
    queries, examples = fx.query_examples(3), fx.train_examples(5)
    products = full_space.gradient_products(
        model, params, state, queries, examples, seq_len=fx.SEQ_LEN, query_len=12, batch_size=4
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

    def keep(flat):
        paths = sorted(p for p in flat if not any(x in p for x in exclude))
        return np.concatenate([flat[p] for p in paths])

    gq, cq = [], []
    for ex in queries:
        flat, tree = _flat_grad(model, params, ex)
        gq.append(keep(flat))
        cq.append(keep(_optax_update(scale, tree, fs, params)))
    gm, cm, um = [], [], []
    for ex in examples:
        flat, tree = _flat_grad(model, params, ex)
        gm.append(keep(flat))
        cm.append(keep(_optax_update(scale, tree, fs, params)))
        um.append(
            keep(_optax_update(clipped, _flat_grad(model, params, ex, mean=True)[1], fs, params))
        )
    gq, cq, gm, cm, um = map(np.stack, (gq, cq, gm, cm, um))
    # ⟨C g_q, C g_m⟩ and ⟨g_q, C g_m⟩ from optax's C g on each side.
    expected = {
        'dot': gq @ gm.T,
        'cosine': _cosine_rows(gq, gm),
        'corrected': _cosine_rows(cq, cm),
        'train_corrected': (gq @ cm.T) / np.outer(_norms(gq), _norms(cm)),
        'step': (gq @ um.T) / _norms(gq)[:, None],
    }
    assert not np.allclose(cm, gm), 'the correction must change the gradients here'
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
    }
    for form, want in expected.items():
        got = full_space.score(products, form, exclude=exclude, clipping_threshold=CLIP)
        err, allowed = np.abs(got - want), 2e-5 * np.abs(want) + 1e-6 * bound[form]
        assert (err <= allowed).all(), (form, (err / allowed).max(), got, want)


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
