"""The MaxText adapter against an independent float64 numpy MaxText-layout Llama.

The reference consumes the MaxText-shaped arrays directly, with MaxText's conventions as
read from its source: no run-time 1/sqrt(head_dim) (folded into the query kernel), RoPE
rotate-half with timescale ``base^(2i/head_dim)`` (``RotaryEmbedding``) or adjacent pairs
(``LLaMARotaryEmbedding`` without scaling), RMSNorm with the scale used as is, GQA
grouping ``[kv_heads, heads // kv_heads]``, SwiGLU ``wo(silu(wi_0 x) * wi_1 x)``, and tied
logits divided by sqrt(emb) (``normalize_embedding_logits``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.llama_fixtures import TIED, UNTIED, rel_err
from trackstar_jax import grads
from trackstar_jax.models import adapters
from trackstar_jax.models.llama import LlamaConfig, LlamaLM


def random_maxtext(cfg, *, scanned, scan_axis=1, seed=0):
    """A MaxText Llama param tree with random weights and non-trivial norm scales."""
    rng = np.random.default_rng(seed)
    d, h, kvh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads
    dh, f, nl = cfg.resolved_head_dim, cfg.mlp_dim, cfg.num_layers

    def mat(*shape, fan_in):
        return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

    def layer():
        return {
            'pre_self_attention_layer_norm': {'scale': (1 + 0.2 * rng.normal(size=d))},
            'self_attention': {
                # MaxText's query kernel carries 1/sqrt(head_dim) (init and converters).
                'query': {'kernel': mat(d, h, dh, fan_in=d) / np.sqrt(dh)},
                'key': {'kernel': mat(d, kvh, dh, fan_in=d)},
                'value': {'kernel': mat(d, kvh, dh, fan_in=d)},
                'out': {'kernel': mat(h, dh, d, fan_in=h * dh)},
            },
            'post_self_attention_layer_norm': {'scale': (1 + 0.2 * rng.normal(size=d))},
            'mlp': {
                'wi_0': {'kernel': mat(d, f, fan_in=d)},
                'wi_1': {'kernel': mat(d, f, fan_in=d)},
                'wo': {'kernel': mat(f, d, fan_in=f)},
            },
        }

    layers = [jax.tree.map(lambda x: np.asarray(x, np.float32), layer()) for _ in range(nl)]
    decoder = {'decoder_norm': {'scale': (1 + 0.2 * rng.normal(size=d)).astype(np.float32)}}
    if scanned:
        decoder['layers'] = jax.tree.map(lambda *xs: np.stack(xs, axis=scan_axis), *layers)
    else:
        decoder.update({f'layers_{i}': lw for i, lw in enumerate(layers)})
    if not cfg.tie_embeddings:
        decoder['logits_dense'] = {'kernel': mat(d, cfg.vocab_size, fan_in=d)}
    embedding = rng.normal(size=(cfg.vocab_size, d)).astype(np.float32)
    return {'token_embedder': {'embedding': embedding}, 'decoder': decoder}


def maxtext_forward(tree, cfg, tokens, *, scan_axis=1, rope_layout='half_split'):
    """MaxText's llama2 decoder in float64 numpy, on MaxText-shaped arrays: [B, T, V]."""
    tree = jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    dec = tree['decoder']
    b, t = tokens.shape
    h, kvh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    half = dh // 2
    # MaxText timescale = min * (max / min)^(2i / dh) with min_timescale 1.
    timescale = cfg.rope_base ** (2 * np.arange(half) / dh)
    angles = np.arange(t)[:, None] / timescale[None, :]  # [T, half]
    sin, cos = np.sin(angles)[:, None, :], np.cos(angles)[:, None, :]  # [T, 1, half]

    def rope(x):  # [B, T, N, dh]
        if rope_layout == 'half_split':  # RotaryEmbedding: rotate_half
            x1, x2 = x[..., :half], x[..., half:]
            return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        # LLaMARotaryEmbedding (use_scale=False): pairs (2i, 2i + 1) at frequency i.
        xe, xo = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = xe * cos - xo * sin
        out[..., 1::2] = xo * cos + xe * sin
        return out

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * scale

    def layer(i):
        if 'layers' in dec:
            return jax.tree.map(lambda a: np.take(a, i, axis=scan_axis), dec['layers'])
        return dec[f'layers_{i}']

    x = tree['token_embedder']['embedding'][tokens]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.num_layers):
        lw, att = layer(i), layer(i)['self_attention']
        y = rms(x, lw['pre_self_attention_layer_norm']['scale'])
        q = rope(np.einsum('btd,dnk->btnk', y, att['query']['kernel']))
        k = rope(np.einsum('btd,dnk->btnk', y, att['key']['kernel']))
        v = np.einsum('btd,dnk->btnk', y, att['value']['kernel'])
        q = q.reshape(b, t, kvh, h // kvh, dh)
        s = np.einsum('btkgd,bskd->bkgts', q, k)  # no 1/sqrt(dh): it is in the kernel
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum('bkgts,bskd->btkgd', p, v).reshape(b, t, h, dh)
        x = x + np.einsum('btnk,nke->bte', o, att['out']['kernel'])
        y = rms(x, lw['post_self_attention_layer_norm']['scale'])
        gate = y @ lw['mlp']['wi_0']['kernel']
        up = y @ lw['mlp']['wi_1']['kernel']
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ lw['mlp']['wo']['kernel']
    y = rms(x, dec['decoder_norm']['scale'])
    if 'logits_dense' in dec:
        return y @ dec['logits_dense']['kernel']
    return y @ tree['token_embedder']['embedding'].T / np.sqrt(cfg.d_model)


CASES = {
    'tied_scanned': (TIED, True, 1, 'half_split'),
    'untied_scanned': (UNTIED, True, 1, 'half_split'),
    'tied_unscanned': (TIED, False, 1, 'half_split'),
    'untied_unscanned': (UNTIED, False, 1, 'half_split'),
    'untied_scan0_interleaved': (UNTIED, True, 0, 'interleaved'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_adapted_llama_matches_maxtext_reference(case):
    cfg, scanned, scan_axis, rope_layout = CASES[case]
    mt = random_maxtext(cfg, scanned=scanned, scan_axis=scan_axis, seed=len(case))
    model = LlamaLM(cfg)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 11)).astype(np.int32)
    want = maxtext_forward(mt, cfg, tokens, scan_axis=scan_axis, rope_layout=rope_layout)
    # The scanned cases go in as jax arrays under MaxText's {'params': ...} wrapper.
    given = {'params': jax.tree.map(jnp.asarray, mt)} if scanned else mt
    params = adapters.maxtext_to_llama(given, cfg, scan_axis=scan_axis, rope_layout=rope_layout)
    init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), nn.unbox(init)['params']
    )
    leaf_type = jax.Array if scanned else np.ndarray
    assert all(isinstance(x, leaf_type) for x in jax.tree.leaves(params))
    apply = jax.jit(model.apply)
    logits = apply({'params': params}, tokens)
    assert rel_err(logits, want) < 1e-5

    # The reference tells the conventions apart: dropping the query-scale undo, or the
    # wrong RoPE layout, is far off.
    unscaled = adapters.maxtext_to_llama(
        mt, cfg, scan_axis=scan_axis, rope_layout=rope_layout, query_scale_folded=False
    )
    assert rel_err(apply({'params': unscaled}, tokens), want) > 1e-2
    other = 'half_split' if rope_layout == 'interleaved' else 'interleaved'
    wrong_rope = adapters.maxtext_to_llama(mt, cfg, scan_axis=scan_axis, rope_layout=other)
    assert rel_err(apply({'params': wrong_rope}, tokens), want) > 1e-3

    # The inverse restores the MaxText tree (layout, names, shapes and values).
    back = adapters.llama_to_maxtext(
        params, cfg, scan_layers=scanned, scan_axis=scan_axis, rope_layout=rope_layout
    )
    assert jax.tree.structure(back) == jax.tree.structure(mt)
    for got, ref in zip(jax.tree.leaves(back), jax.tree.leaves(mt), strict=True):
        assert got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-7)


def test_featurizer_runs_on_adapted_params():
    """Fused kernel == reference on adapted params, with V estimated for them."""
    cfg = TIED
    model = LlamaLM(cfg)
    params = adapters.maxtext_to_llama(random_maxtext(cfg, scanned=True, seed=3), cfg)
    rng = np.random.default_rng(0)
    sample = {
        'tokens': rng.integers(0, cfg.vocab_size, (6, 12)).astype(np.int32),
        'loss_mask': np.ones((6, 12), np.float32),
    }
    # A MaxText checkpoint's optimizer state is on MaxText's shapes: V is estimated for
    # the adapted params instead (factored like Adafactor: min dim 16 factors q/o/MLP).
    moments = grads.estimate_second_moments(
        model, params, [sample], min_dim_size_to_factor=16, chunk_size=6
    )
    spec = grads.GradientSpec(block_dim=16, num_layer_blocks=2, correction='adafactor')
    feat = grads.Featurizer(model, params, spec, opt_state=moments)

    blocks = {e.path: feat.layout.block_names[e.block] for e in feat.layout.entries}
    assert [e.path for e in feat.layout.entries if e.excluded] == ['embedding/embedding']
    assert blocks['layers_0/attention/query/kernel'] == 'attention_0'
    assert blocks['layers_0/attention_norm/scale'] == 'attention_0'
    assert blocks['layers_1/mlp/wo/kernel'] == 'mlp_1'
    assert blocks['final_norm/scale'] == 'mlp_1'
    fused_names = ('query', 'out', 'wi_gate', 'wi_up', 'wo')
    assert feat.fused_paths == {
        p for p in blocks if p.endswith('/kernel') and p.split('/')[-2] in fused_names
    }

    tokens = rng.integers(0, cfg.vocab_size, (4, 12)).astype(np.int32)
    mask = np.zeros((4, 12), np.float32)
    for i, (p, e) in enumerate([(3, 12), (8, 10), (1, 4), (6, 7)]):
        mask[i, p:e] = 1
    batch = {'tokens': tokens, 'loss_mask': mask}
    fused, ref = feat(batch), feat.reference(batch)
    assert fused.shape == (4, 2 * 2 * 16)
    assert float(jnp.max(jnp.abs(ref))) > 0
    assert rel_err(fused, ref) < 1e-4


def test_adapter_errors_name_the_path():
    cfg = UNTIED
    mt = random_maxtext(cfg, scanned=True)

    bad = jax.tree.map(lambda x: x, mt)
    bad['decoder']['layers']['self_attention']['query']['kernel'] = np.zeros((24, 3, 6, 9))
    with pytest.raises(ValueError, match=r'decoder/layers/self_attention/query/kernel.*shape'):
        adapters.maxtext_to_llama(bad, cfg)
    # The layer count is checked through the stacked shapes, and scan_axis matters.
    with pytest.raises(ValueError, match='pre_self_attention_layer_norm/scale'):
        adapters.maxtext_to_llama(mt, LlamaConfig(**{**cfg.to_dict(), 'num_layers': 2}))
    with pytest.raises(ValueError, match='shape'):
        adapters.maxtext_to_llama(mt, cfg, scan_axis=0)

    missing = jax.tree.map(lambda x: x, mt)
    del missing['decoder']['decoder_norm']
    with pytest.raises(ValueError, match=r"missing 'decoder/decoder_norm/scale'"):
        adapters.maxtext_to_llama(missing, cfg)

    extra = jax.tree.map(lambda x: x, mt)
    extra['decoder']['layers']['self_attention']['query']['bias'] = np.zeros((3, 6, 8))
    with pytest.raises(ValueError, match='Unexpected MaxText params: decoder/layers/self_att'):
        adapters.maxtext_to_llama(extra, cfg)

    with pytest.raises(ValueError, match='logits_dense'):
        adapters.maxtext_to_llama(mt, LlamaConfig(**{**cfg.to_dict(), 'tie_embeddings': True}))
    tied = random_maxtext(TIED, scanned=False)
    with pytest.raises(ValueError, match='logits_dense'):
        adapters.maxtext_to_llama(tied, LlamaConfig(**{**TIED.to_dict(), 'tie_embeddings': False}))
    # An unscanned tree with more layers than the config says.
    with pytest.raises(ValueError, match='Unexpected MaxText params: decoder/layers_2/'):
        adapters.maxtext_to_llama(
            random_maxtext(UNTIED, scanned=False), LlamaConfig(**{**cfg.to_dict(), 'num_layers': 2})
        )
    with pytest.raises(ValueError, match='scan_axis'):
        adapters.maxtext_to_llama(mt, cfg, scan_axis=2)
    with pytest.raises(ValueError, match='rope_layout'):
        adapters.maxtext_to_llama(mt, cfg, rope_layout='llama3.1')
    # The inverse checks our names too.
    params = adapters.maxtext_to_llama(mt, cfg)
    del params['layers_1']['mlp']['wo']
    with pytest.raises(ValueError, match=r"missing 'layers_1/mlp/wo/kernel'"):
        adapters.llama_to_maxtext(params, cfg)
