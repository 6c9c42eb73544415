"""kfac: K-FAC / EK-FAC against a brute-force float64 computation of the same definitions.

The references never use the module's interception: activations and output gradients come
from a hand-written forward of the toy model, per-example gradients from jax.grad of each
example's loss, and the preconditioners are explicit dense (d_in·d_out)² matrices solved
with np.linalg.solve.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trackstar_jax import kfac, losses
from trackstar_jax import sharding as shd
from trackstar_jax.data.examples import pad_batch
from trackstar_jax.models import DecoderConfig, DecoderLM

VOCAB, WIDTH, HIDDEN, T = 9, 5, 7, 6


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


class ToyLM(nn.Module):
    """Prefix-mean of embeddings -> Dense -> tanh -> Dense: positions interact, float64."""

    @nn.compact
    def __call__(self, tokens):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64, use_bias=False)
        x = nn.Embed(VOCAB, WIDTH, dtype=jnp.float64, param_dtype=jnp.float64)(tokens)
        x = jnp.cumsum(x, axis=-2) / jnp.arange(1, tokens.shape[-1] + 1)[:, None]
        return nn.Dense(VOCAB, name='out', **f64)(
            jnp.tanh(nn.Dense(HIDDEN, name='hidden', **f64)(x))
        )


def _examples(seed, n, query=False):
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        size = int(rng.integers(3, T + 1))
        mask = np.ones(size, np.float32)
        mask[: int(rng.integers(2, size)) if query else 1] = 0
        out.append({'id': f'{seed}-{i}', 'tokens': rng.integers(0, VOCAB, size), 'loss_mask': mask})
    return out


@functools.cache
def toy():
    model = ToyLM()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))['params']
    params = jax.tree.map(lambda x: x * 2.0, params)  # larger weights: a less trivial softmax
    return model, params, _examples(1, 11), _examples(2, 3, query=True)


def _reference_stats(params, examples, targets=None):
    """Per layer: a [n, T, d_in], s [n, T, d_out] and the reach mask, by hand (labels:
    ``targets`` [n, T] if given, else the tokens)."""
    batch = pad_batch(examples, len(examples), T)
    tokens, mask = jnp.asarray(batch['tokens']), jnp.asarray(batch['loss_mask'])
    labels = tokens if targets is None else jnp.asarray(targets)
    emb = params['Embed_0']['embedding'][tokens]
    x = jnp.cumsum(emb, axis=1) / jnp.arange(1, T + 1)[:, None]

    def loss(p_hidden, p_out):
        y1 = x @ params['hidden']['kernel'] + p_hidden
        h = jnp.tanh(y1)
        logits = h @ params['out']['kernel'] + p_out
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, labels[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * mask[:, 1:]), h

    zeros = (jnp.zeros((len(examples), T, HIDDEN)), jnp.zeros((len(examples), T, VOCAB)))
    (s_hidden, s_out), h = jax.grad(loss, argnums=(0, 1), has_aux=True)(*zeros)
    m = np.asarray(batch['loss_mask'])
    reach = np.array([[float(m[b, t + 1 :].sum() > 0) for t in range(T)] for b in range(len(m))])
    a = {'hidden': np.asarray(x), 'out': np.asarray(h)}
    s = {'hidden': np.asarray(s_hidden), 'out': np.asarray(s_out)}
    return a, s, reach


def _example_grads(model, params, examples, targets=None):
    """{layer: [n, d_in, d_out]} from jax.grad of each example's loss, one at a time."""
    out = {'hidden': [], 'out': []}
    for i, ex in enumerate(examples):
        b = pad_batch([ex], 1, T)
        labels = b['tokens'][0] if targets is None else np.asarray(targets[i])

        def loss(p, b=b, labels=labels):
            logits = model.apply({'params': p}, b['tokens'])
            logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
            return (
                -np.asarray(b['loss_mask'][0, 1:], np.float64) @ logp[np.arange(T - 1), labels[1:]]
            )

        g = jax.grad(loss)(params)
        for k in out:
            out[k].append(np.asarray(g[k]['kernel']))
    return {k: np.stack(v) for k, v in out.items()}


def _reference_matrices(model, params, examples, damping, corrected, targets=None):
    """{layer: F + λI} as explicit dense matrices in row-major vec(G) order."""
    a, s, reach = _reference_stats(params, examples, targets)
    grads = _example_grads(model, params, examples, targets)
    out = {}
    for k in ('hidden', 'out'):
        w = reach.ravel()
        av, sv = a[k].reshape(-1, a[k].shape[-1]), s[k].reshape(-1, s[k].shape[-1])
        A = (av * w[:, None]).T @ av / w.sum()
        S = (sv * w[:, None]).T @ sv / w.sum()
        if corrected:
            _, ua = np.linalg.eigh(A)
            _, us = np.linalg.eigh(S)
            basis = np.kron(ua, us)  # columns: the eigenvectors of A ⊗ S
            coords = grads[k].reshape(len(examples), -1) @ basis
            lam_star = np.mean(coords**2, axis=0)
            F = basis @ np.diag(lam_star) @ basis.T
        else:
            F = np.kron(A, S)
        out[k] = F + damping * np.trace(F) / F.shape[0] * np.eye(F.shape[0])
    return out


@pytest.mark.parametrize('corrected', [False, True], ids=['kfac', 'ekfac'])
def test_influence_equals_the_brute_force_float64_computation(corrected):
    model, params, train, queries = toy()
    config = kfac.KfacConfig(seq_len=T, batch_size=8, damping=0.05, eigenvalue_correction=corrected)
    fitted = kfac.fit(model, params, train, config)
    assert fitted.num_tokens > 0 and fitted.num_examples == (len(train) if corrected else 0)
    got = kfac.influence(fitted, model, params, queries, train)
    mats = _reference_matrices(model, params, train, 0.05, corrected)
    gq, gm = _example_grads(model, params, queries), _example_grads(model, params, train)
    want = sum(
        np.linalg.solve(mats[k], gq[k].reshape(len(queries), -1).T).T
        @ gm[k].reshape(len(train), -1).T
        for k in mats
    )
    assert got.shape == (len(queries), len(train)) and np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize('corrected', [False, True], ids=['kfac', 'ekfac'])
def test_sampled_label_fisher_equals_the_brute_force_with_the_same_draws(corrected):
    model, params, train, queries = toy()
    config = kfac.KfacConfig(seq_len=T, batch_size=16, damping=0.05, seed=3,
                             eigenvalue_correction=corrected, fisher='sampled')  # fmt: skip
    fitted = kfac.fit(model, params, train, config)
    # The labels the fit drew for its one batch (16 rows: the 11 examples, then padding).
    batch = {k: jnp.asarray(v) for k, v in pad_batch(train, 16, T).items()}
    drawn = np.asarray(kfac.sample_targets(model, params, batch, kfac.batch_key(config, 0)))
    drawn = drawn[: len(train)]
    assert (drawn[:, 1:] != np.asarray(batch['tokens'])[: len(train), 1:]).mean() > 0.3
    mats = _reference_matrices(model, params, train, 0.05, corrected, targets=drawn)
    # Influence itself uses the examples' own gradients (the training labels).
    gq, gm = _example_grads(model, params, queries), _example_grads(model, params, train)
    want = sum(
        np.linalg.solve(mats[k], gq[k].reshape(len(queries), -1).T).T
        @ gm[k].reshape(len(train), -1).T
        for k in mats
    )
    got = kfac.influence(fitted, model, params, queries, train)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())
    empirical = kfac.influence(
        kfac.fit(model, params, train, dataclasses.replace(config, fisher='empirical')),
        model, params, queries, train,
    )  # fmt: skip
    assert not np.allclose(got, empirical, rtol=1e-3)


def test_sampled_labels_follow_the_model_distribution():
    model, params, train, _ = toy()
    batch = {k: jnp.asarray(v) for k, v in pad_batch(train[:2], 2, T).items()}
    probs = np.asarray(jax.nn.softmax(model.apply({'params': params}, batch['tokens']), -1))
    draws = np.stack([
        np.asarray(kfac.sample_targets(model, params, batch, jax.random.PRNGKey(i)))
        for i in range(3000)
    ])  # fmt: skip
    np.testing.assert_array_equal(draws[:, :, 0], np.broadcast_to(batch['tokens'][:, 0], (3000, 2)))
    freq = (draws[:, :, 1:, None] == np.arange(VOCAB)).mean(0)  # [2, T - 1, VOCAB]
    np.testing.assert_allclose(freq, probs[:, :-1], atol=0.04)  # ~4.5 binomial sigmas
    with pytest.raises(ValueError, match='fisher'):
        kfac.KfacConfig(seq_len=T, fisher='true')


def test_captured_statistics_are_the_hand_written_forward():
    model, params, train, _ = toy()
    batch = pad_batch(train, len(train), T)
    acts, outs = kfac.layer_statistics(model, params, {k: jnp.asarray(v) for k, v in batch.items()})
    a, s, reach = _reference_stats(params, train)
    assert set(acts) == set(outs) == {'hidden', 'out'}
    for k in acts:
        np.testing.assert_allclose(acts[k], a[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(outs[k], s[k], rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(kfac.reach_mask(jnp.asarray(batch['loss_mask'])), reach)
    # Σ_t a_t s_tᵀ is each example's kernel gradient.
    grads = _example_grads(model, params, train)
    for k, g in kfac.kernel_grads(acts, outs).items():
        np.testing.assert_allclose(g, grads[k], rtol=1e-10, atol=1e-13)


def test_kfac_inverse_hvp_is_the_explicit_kronecker_inverse():
    model, params, train, _ = toy()
    fitted = kfac.fit(model, params, train, kfac.KfacConfig(seq_len=T, batch_size=8, damping=0.3,
                                                          eigenvalue_correction=False))  # fmt: skip
    mats = _reference_matrices(model, params, train, 0.3, corrected=False)
    rng = np.random.default_rng(0)
    g = {
        'hidden': rng.standard_normal((2, WIDTH, HIDDEN)),
        'out': rng.standard_normal((2, HIDDEN, VOCAB)),
    }
    got = fitted.precondition(g)
    for k in g:
        want = np.linalg.solve(mats[k], g[k].reshape(2, -1).T).T.reshape(g[k].shape)
        np.testing.assert_allclose(got[k], want, rtol=1e-9, atol=1e-12)


def test_sharded_fit_equals_one_device():
    assert jax.device_count() == 8, 'tests run on 8 fake CPU devices (tests/conftest.py)'
    model, params, train, queries = toy()
    config = kfac.KfacConfig(seq_len=T, batch_size=8)
    one = shd.make_mesh(devices=jax.devices()[:1])
    many = kfac.influence(kfac.fit(model, params, train, config), model, params, queries, train)
    single = kfac.influence(kfac.fit(model, params, train, config, mesh=one), model, params,
                            queries, train, mesh=one)  # fmt: skip
    np.testing.assert_allclose(many, single, rtol=1e-10, atol=1e-13 * np.abs(single).max())


def test_decoder_kernels_are_covered_and_match_jax_grad():
    cfg = DecoderConfig(vocab_size=16, num_layers=1, d_model=8, num_heads=2, num_kv_heads=1,
                        mlp_dim=16, max_len=8)  # fmt: skip
    model = DecoderLM(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32)))['params']
    examples = _examples(3, 8)
    grads = next(
        kfac.example_kernel_grads(model, params, examples, kfac.KfacConfig(seq_len=8, batch_size=8))
    )
    assert sorted(grads) == sorted(
        f'layers_0/{b}/{n}' for b, names in (('attention', ('query', 'key', 'value', 'out')),
                                            ('mlp', ('wi_gate', 'wi_up', 'wo'))) for n in names
    )  # fmt: skip
    for i, ex in enumerate(examples):
        b = pad_batch([ex], 1, 8)

        def loss(p, b=b):
            logits = model.apply({'params': p}, b['tokens'])
            return losses.example_losses(logits, b['tokens'], b['loss_mask'])[0]

        want = jax.grad(loss)(params)
        for name, g in grads.items():
            w = want
            for part in name.split('/'):
                w = w[part]
            np.testing.assert_allclose(g[i], w['kernel'], rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise():
    model, params, train, _ = toy()
    with pytest.raises(ValueError, match='damping'):
        kfac.KfacConfig(seq_len=T, damping=0.0)
    with pytest.raises(ValueError, match='multiple of the data axis'):
        kfac.fit(model, params, train, kfac.KfacConfig(seq_len=T, batch_size=3))
    with pytest.raises(ValueError, match='No examples'):
        kfac.fit(model, params, [], kfac.KfacConfig(seq_len=T, batch_size=8))

    class Biased(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return nn.Dense(VOCAB)(nn.Embed(VOCAB, 4)(tokens))

    biased = Biased()
    p = biased.init(jax.random.PRNGKey(0), jnp.zeros((1, T), jnp.int32))['params']
    with pytest.raises(ValueError, match='has a bias'):
        kfac.fit(biased, p, train, kfac.KfacConfig(seq_len=T, batch_size=8))
