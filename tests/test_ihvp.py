"""ihvp: dense GGN / Hessian, damped inverses, LiSSA, CG and influence vs independent references.

Two models: a float64 toy causal LM (flax, every op in float64, so the references are
exact to ~1e-12) and a tiny DecoderLM, the library's model, which computes in float32
internally whatever its parameter dtype; its tolerances are float32 ones.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from trackstar_jax import ihvp, losses
from trackstar_jax.data.examples import pad_batch
from trackstar_jax.models import DecoderConfig, DecoderLM

VOCAB, T = 11, 6


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


class ToyLM(nn.Module):
    """Causal prefix-mean of embeddings, a tanh layer, logits: non-convex, float64."""

    @nn.compact
    def __call__(self, tokens):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
        x = nn.Embed(VOCAB, 6, **f64)(tokens)
        x = jnp.cumsum(x, axis=-2) / jnp.arange(1, tokens.shape[-1] + 1)[:, None]
        return nn.Dense(VOCAB, **f64)(jnp.tanh(nn.Dense(6, **f64)(x)))


def _examples(rng, n, vocab, length, query):
    out = []
    for i in range(n):
        size = int(rng.integers(3, length + 1))
        mask = np.ones(size, np.float32)
        mask[: int(rng.integers(2, size)) if query else 1] = 0  # queries: completion only
        out.append({'id': str(i), 'tokens': rng.integers(0, vocab, size), 'loss_mask': mask})
    return out


@functools.cache
def toy(query=False):
    model = ToyLM()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))['params']
    rng = np.random.default_rng(7 if query else 3)
    batch = pad_batch(_examples(rng, 3 if query else 5, VOCAB, T, query), 3 if query else 5, T)
    return ihvp.make_objective(model, params, batch), model, params, batch


@functools.cache
def decoder():
    cfg = DecoderConfig(
        vocab_size=16, num_layers=1, d_model=8, num_heads=2, num_kv_heads=1, mlp_dim=16, max_len=8
    )
    model = DecoderLM(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32)))['params']
    batch = pad_batch(_examples(np.random.default_rng(5), 4, 16, 8, False), 4, 8)
    return ihvp.make_objective(model, params, batch), model, params, batch


@functools.cache
def toy_ggn():
    obj = toy()[0]
    g = ihvp.gauss_newton_matrix(obj)
    return obj, g, ihvp.damping_value(g, 0.1)


def _explicit_ggn(obj, model, params, batch):
    """Jᵀ H_out J from jacfwd's dense logit Jacobian and a numpy float64 softmax Hessian."""
    theta, unravel = ravel_pytree(params)
    logits_of = lambda th: model.apply({'params': unravel(th)}, jnp.asarray(batch['tokens']))
    jac = np.asarray(jax.jacfwd(logits_of)(theta), np.float64)  # [B, T, V, P]
    logits = np.asarray(logits_of(theta), np.float64)
    mask = batch['loss_mask'].astype(np.float64)
    g = np.zeros((theta.size, theta.size))
    for b, t in zip(*np.nonzero(mask[:, 1:]), strict=True):  # logits at t predict t + 1
        z = logits[b, t] - logits[b, t].max()
        p = np.exp(z) / np.exp(z).sum()
        g += mask[b, t + 1] * jac[b, t].T @ (np.diag(p) - np.outer(p, p)) @ jac[b, t]
    return g / mask.sum()


def test_loss_and_example_grads_follow_the_house_convention():
    obj, model, params, batch = decoder()
    logits = model.apply({'params': params}, batch['tokens'])
    want = losses.mean_token_loss(logits, batch['tokens'], batch['loss_mask'])
    np.testing.assert_allclose(obj.loss(obj.theta), want, rtol=1e-6)
    rows = obj.example_grads(obj.theta)
    for i in range(len(batch['tokens'])):
        tok, mask = batch['tokens'][i : i + 1], batch['loss_mask'][i : i + 1]
        loss_i = lambda p, tok=tok, mask=mask: losses.example_losses(
            model.apply({'params': p}, tok), tok, mask
        )[0]
        want_i = ravel_pytree(jax.grad(loss_i)(params))[0]
        np.testing.assert_allclose(rows[i], want_i, rtol=1e-5, atol=1e-6)
    n_targets = batch['loss_mask'].sum()
    np.testing.assert_allclose(rows.sum(0) / n_targets, obj.grad(obj.theta), atol=1e-6)


@pytest.mark.parametrize('which, atol', [('toy', 1e-12), ('decoder', 2e-6)])
def test_gauss_newton_matrix_is_the_explicit_jacobian_ggn(which, atol):
    obj, model, params, batch = toy() if which == 'toy' else decoder()
    got, want = ihvp.gauss_newton_matrix(obj), _explicit_ggn(obj, model, params, batch)
    assert obj.dim < 1000 and np.abs(want).max() > 1e-2  # tiny, and not vacuous
    np.testing.assert_allclose(got, want, rtol=0, atol=atol * np.abs(want).max())


def test_hessian_matrix_is_jax_hessian_and_finite_differences():
    obj = toy()[0]
    got = ihvp.hessian_matrix(obj)
    np.testing.assert_allclose(got, jax.hessian(obj.loss)(obj.theta), rtol=0, atol=1e-12)
    eps = 1e-5
    fd = jax.vmap(
        lambda e: (obj.grad(obj.theta + eps * e) - obj.grad(obj.theta - eps * e)) / (2 * eps)
    )(jnp.eye(obj.dim))
    np.testing.assert_allclose(got, fd.T, rtol=0, atol=1e-8 * np.abs(got).max())
    dec = decoder()[0]  # float32 model: jax.hessian only (float32 differences are noise)
    want = np.asarray(jax.hessian(dec.loss)(dec.theta))
    assert np.allclose(ihvp.hessian_matrix(dec), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_matrix_free_products_match_the_dense_matrices():
    obj, g, _ = toy_ggn()
    h = ihvp.hessian_matrix(obj)
    v = np.random.default_rng(0).standard_normal((3, obj.dim))
    for vec in v:
        np.testing.assert_allclose(obj.gnvp(jnp.asarray(vec)), g @ vec, atol=1e-12)
        np.testing.assert_allclose(obj.hvp(jnp.asarray(vec)), h @ vec, atol=1e-12)


def test_damping_is_relative_to_the_mean_eigenvalue():
    m = np.diag([1.0, 2.0, 3.0, 6.0])
    assert ihvp.damping_value(m, 0.5) == pytest.approx(1.5)
    assert ihvp.damping_value(12.0, 0.5, dim=4) == pytest.approx(1.5)
    with pytest.raises(ValueError, match='needs dim'):
        ihvp.damping_value(12.0, 0.5)
    with pytest.raises(ValueError, match='trace'):
        ihvp.damping_value(-m, 0.5)


def test_explicit_inverse_is_a_linear_solve():
    obj, g, lam = toy_ggn()
    v = np.random.default_rng(1).standard_normal((obj.dim, 2))
    want = np.linalg.solve(g + lam * np.eye(obj.dim), v)
    np.testing.assert_allclose(ihvp.explicit_inverse_hvp(g, v, lam), want, rtol=1e-9)
    np.testing.assert_allclose(ihvp.explicit_inverse_hvp(g, v[:, 0], lam), want[:, 0], rtol=1e-9)


def test_indefinite_matrices_raise():
    obj, g, _ = toy_ggn()
    h, lam = ihvp.hessian_matrix(obj), ihvp.damping_value(g, 1e-6)
    # Precondition, so the test cannot pass vacuously: the toy Hessian is indefinite.
    assert np.linalg.eigvalsh(h)[0] + lam < -1e-6
    with pytest.raises(ValueError, match='not positive definite'):
        ihvp.explicit_inverse_hvp(h, np.ones(obj.dim), lam)
    with pytest.raises(ValueError, match='not positive definite'):
        ihvp.explicit_inverse_hvp(-np.eye(3), np.ones(3), 0.5)
    with pytest.raises(ihvp.SolverDivergedError, match='not positive definite'):
        ihvp.conjugate_gradient(lambda x: -2.0 * x, jnp.ones(3), 0.5)


def test_lissa_is_the_stated_recursion():
    _, g, lam = toy_ggn()
    v, s = np.random.default_rng(2).standard_normal(g.shape[0]), 2.0 * np.abs(g).sum(1).max()
    h = v.copy()
    for _ in range(7):
        h = v + (1 - lam / s) * h - g @ h / s
    got = ihvp.lissa(lambda x: jnp.asarray(g) @ x, jnp.asarray(v), lam, s, num_steps=7)
    assert got.num_steps == 7 and not got.converged
    np.testing.assert_allclose(got.x, h / s, rtol=1e-12)
    a = g + lam * np.eye(g.shape[0])
    want_residual = np.linalg.norm(v - a @ h / s) / np.linalg.norm(v)
    np.testing.assert_allclose(got.relative_residual, want_residual)


def test_lissa_and_cg_converge_to_the_explicit_inverse():
    obj, g, lam = toy_ggn()
    v = jnp.asarray(np.random.default_rng(3).standard_normal(obj.dim))
    want = ihvp.explicit_inverse_hvp(g, np.asarray(v), lam)
    rel = lambda x: np.linalg.norm(np.asarray(x) - want) / np.linalg.norm(want)
    scale = 1.05 * (np.linalg.eigvalsh(g)[-1] + lam)  # s > λ_max(G + λI)
    res = ihvp.lissa(obj.gnvp, v, lam, scale, num_steps=20_000, tol=1e-9)
    assert res.converged and res.num_steps < 20_000 and rel(res.x) < 1e-4
    cg = ihvp.conjugate_gradient(obj.gnvp, v, lam, tol=1e-12, max_steps=2 * obj.dim)
    assert cg.converged and cg.num_steps <= 2 * obj.dim and rel(cg.x) < 1e-6
    assert cg.relative_residual <= 1e-12


def test_lissa_with_too_small_a_scale_diverges():
    obj, g, lam = toy_ggn()
    scale = (np.linalg.eigvalsh(g)[-1] + lam) / 3  # λ_max / s = 3: |1 - 3| > 1 grows
    with pytest.raises(ihvp.SolverDivergedError, match='diverged'):
        ihvp.lissa(obj.gnvp, jnp.ones(obj.dim), lam, scale, num_steps=10_000)


def test_influence_is_the_brute_force_double_loop():
    obj, g, lam = toy_ggn()
    queries = toy(query=True)[0]
    q, tr = queries.example_grads(queries.theta), obj.example_grads(obj.theta)
    a = g + lam * np.eye(obj.dim)
    want = np.array([[qi @ np.linalg.solve(a, gm) for gm in np.asarray(tr)] for qi in q])
    got = ihvp.influence(q, tr, lambda v: ihvp.explicit_inverse_hvp(g, v, lam))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    by_cg = ihvp.influence(q, tr, lambda v: ihvp.conjugate_gradient(obj.gnvp, v, lam, 1e-12).x)
    np.testing.assert_allclose(by_cg, want, rtol=0, atol=1e-6 * np.abs(want).max())
    # Sign: upweighting m by ε moves θ by -ε A⁻¹ g_m, so the score is minus the summed
    # query loss's derivative along that step, i.e. its derivative along +A⁻¹ g_m.
    step = ihvp.explicit_inverse_hvp(g, np.asarray(tr[0]), lam)
    n_q, eps = queries.loss_mask.sum(), 1e-5
    slope = n_q * (queries.loss(obj.theta + eps * step) - queries.loss(obj.theta - eps * step))
    np.testing.assert_allclose(slope / (2 * eps), want[:, 0].sum(), rtol=1e-7)


def test_dense_matrices_refuse_big_models():
    class Big(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            w = self.param('w', nn.initializers.zeros, (ihvp.MAX_DENSE_DIM + 1,))
            return jnp.zeros((*tokens.shape, 4)) + w[:4]

    batch = {'tokens': np.zeros((1, 3), np.int32), 'loss_mask': np.array([[0, 1, 1]], 'f4')}
    params = Big().init(jax.random.PRNGKey(0), batch['tokens'])['params']
    obj = ihvp.make_objective(Big(), params, batch)
    for dense in (ihvp.gauss_newton_matrix, ihvp.hessian_matrix):
        with pytest.raises(ValueError, match='not a tiny model'):
            dense(obj)
