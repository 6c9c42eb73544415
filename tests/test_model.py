"""DecoderLM and the loss convention against independent references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trackstar_jax import losses
from trackstar_jax.models import DecoderConfig, DecoderLM

CFG = DecoderConfig(
    vocab_size=97, num_layers=2, d_model=32, num_heads=4, mlp_dim=48, max_len=16, num_kv_heads=2
)


def _params(cfg=CFG, seed=0):
    model = DecoderLM(cfg)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
    return model, nn.unbox(boxed)['params']


def test_logits_shape_and_names():
    model, params = _params()
    tokens = jnp.ones((3, 10), jnp.int32)
    assert model.apply({'params': params}, tokens).shape == (3, 10, CFG.vocab_size)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    assert "['layers_1']['attention']['query']['kernel']" in names
    assert "['layers_0']['mlp']['wi_gate']['kernel']" in names
    assert "['embedding']['embedding']" in names
    # No biases anywhere (PaLM style).
    assert not any('bias' in n for n in names)


@pytest.mark.parametrize('parallel', [True, False])
def test_causal(parallel):
    cfg = DecoderConfig(**{**CFG.to_dict(), 'parallel_block': parallel})
    model, params = _params(cfg)
    rng = np.random.default_rng(0)
    a = rng.integers(0, cfg.vocab_size, (1, 12))
    b = a.copy()
    b[0, 7:] = rng.integers(0, cfg.vocab_size, 5)
    la = model.apply({'params': params}, jnp.asarray(a))
    lb = model.apply({'params': params}, jnp.asarray(b))
    np.testing.assert_allclose(la[0, :7], lb[0, :7], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[0, 7:], lb[0, 7:])


def test_loss_matches_numpy_and_padding_never_contributes():
    model, params = _params()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, (2, 10)).astype(np.int32)
    mask = np.zeros((2, 10), np.float32)
    mask[0, 1:10] = 1
    mask[1, 4:7] = 1  # a completion in the middle, padding after it
    logits = np.asarray(model.apply({'params': params}, jnp.asarray(tokens)), np.float64)
    expected = np.zeros(2)
    for b in range(2):
        for t in range(1, 10):
            row = logits[b, t - 1]
            logp = row - np.log(np.sum(np.exp(row - row.max()))) - row.max()
            expected[b] -= mask[b, t] * logp[tokens[b, t]]
    got = losses.example_losses(jnp.asarray(logits, jnp.float32), tokens, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Changing what sits in the padding after the completion changes nothing.
    padded = tokens.copy()
    padded[1, 7:] = 0
    got2 = losses.example_losses(model.apply({'params': params}, jnp.asarray(padded)), padded, mask)
    np.testing.assert_allclose(got2[1], got[1], rtol=1e-6)


def test_margin_pieces_are_log_p_over_one_minus_p():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(1, 5, 7)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 7, (1, 5)))
    picked, lse_others = losses.target_logits(logits, tokens)
    p = np.exp(np.asarray(losses.target_log_probs(logits, tokens), np.float64))[0, 1:]
    np.testing.assert_allclose(
        np.asarray(picked - lse_others)[0, 1:], np.log(p / (1 - p)), rtol=1e-5
    )


def test_validate_batch_rejects_bad_input():
    with pytest.raises(ValueError, match='first'):
        losses.validate_batch(
            {'tokens': np.zeros((1, 3), np.int32), 'loss_mask': np.ones((1, 3), np.float32)}
        )
    with pytest.raises(ValueError, match='need'):
        losses.validate_batch({'tokens': np.zeros((1, 3), np.int32)})
    with pytest.raises(ValueError, match='max_len'):
        model, params = _params()
        model.apply({'params': params}, jnp.zeros((1, 17), jnp.int32))
