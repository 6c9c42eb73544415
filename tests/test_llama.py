"""LlamaLM against an independent float64 numpy Llama, the GGUF importer, and the kernel."""

import flax.linen as nn

# The importer's packages come with the `llama` extra (.ci/run installs it); a missing one
# is an error here, never a silent skip.
import gguf  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tokenizers  # noqa: F401

from tests.llama_fixtures import TIED, UNTIED, rel_err
from trackstar_jax import grads, losses
from trackstar_jax.models import gguf_import
from trackstar_jax.models.llama import LlamaConfig, LlamaLM

# --- An independent Llama in float64 numpy, on HF-layout weights ([out, in] matrices). ---


def random_hf_weights(cfg, seed=0):
    """HF LlamaForCausalLM-shaped weights with non-trivial norm scales."""
    rng = np.random.default_rng(seed)
    d, h, kvh, dh, f = (
        cfg.d_model,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.resolved_head_dim,
        cfg.mlp_dim,
    )

    def mat(out, inp):
        return (rng.normal(size=(out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm():
        return (1.0 + 0.2 * rng.normal(size=d)).astype(np.float32)

    w = {
        'embed': rng.normal(size=(cfg.vocab_size, d)).astype(np.float32),
        'final_norm': norm(),
        'layers': [
            {
                'attn_norm': norm(),
                'q': mat(h * dh, d),
                'k': mat(kvh * dh, d),
                'v': mat(kvh * dh, d),
                'o': mat(d, h * dh),
                'mlp_norm': norm(),
                'gate': mat(f, d),
                'up': mat(f, d),
                'down': mat(d, f),
            }
            for _ in range(cfg.num_layers)
        ],
    }
    if not cfg.tie_embeddings:
        w['lm_head'] = mat(cfg.vocab_size, d)
    return w


def numpy_llama(w, cfg, tokens):
    """HF Llama forward (rotate_half RoPE, repeat_kv GQA) in float64: logits [B, T, V]."""
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), w)
    b, t = tokens.shape
    h, kvh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
    inv_freq = 1.0 / cfg.rope_base ** (np.arange(0, dh, 2) / dh)
    freqs = np.arange(t)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [T, dh], as HF's rotary embedding
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]

    def rope(x):  # [B, T, H, dh]
        rotated = np.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], axis=-1)
        return x * cos + rotated * sin

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * g

    x = w['embed'][tokens]
    causal = np.tril(np.ones((t, t), bool))
    for lw in w['layers']:
        y = rms(x, lw['attn_norm'])
        q = rope((y @ lw['q'].T).reshape(b, t, h, dh))
        k = rope((y @ lw['k'].T).reshape(b, t, kvh, dh))
        v = (y @ lw['v'].T).reshape(b, t, kvh, dh)
        k, v = np.repeat(k, h // kvh, axis=2), np.repeat(v, h // kvh, axis=2)
        s = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(dh)
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum('bhqk,bkhd->bqhd', p, v).reshape(b, t, h * dh)
        x = x + o @ lw['o'].T
        y = rms(x, lw['mlp_norm'])
        gate, up = y @ lw['gate'].T, y @ lw['up'].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ lw['down'].T
    x = rms(x, w['final_norm'])
    return x @ (w['embed'] if cfg.tie_embeddings else w['lm_head']).T


def flax_params(w, cfg):
    """Our param tree from HF-layout weights (Dense kernels are [in, out])."""
    p = {
        'embedding': {'embedding': w['embed']},
        'final_norm': {'scale': w['final_norm']},
    }
    for i, lw in enumerate(w['layers']):
        p[f'layers_{i}'] = {
            'attention_norm': {'scale': lw['attn_norm']},
            'attention': {
                name: {'kernel': lw[key].T}
                for name, key in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o'))
            },
            'mlp_norm': {'scale': lw['mlp_norm']},
            'mlp': {
                name: {'kernel': lw[key].T}
                for name, key in (('wi_gate', 'gate'), ('wi_up', 'up'), ('wo', 'down'))
            },
        }
    if not cfg.tie_embeddings:
        p['lm_head'] = {'kernel': w['lm_head'].T}
    return jax.tree.map(jnp.asarray, p)


@pytest.mark.parametrize('cfg', [TIED, UNTIED], ids=['tied', 'untied_head_dim'])
def test_llama_matches_numpy_reference(cfg):
    model = LlamaLM(cfg)
    init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    w = random_hf_weights(cfg)
    params = flax_params(w, cfg)
    # Same names and shapes as the model's own init: the naming contract holds.
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, nn.unbox(init)['params'])
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 11)).astype(np.int32)
    apply = jax.jit(model.apply)
    logits = apply({'params': params}, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (3, 11, cfg.vocab_size)
    assert rel_err(logits, numpy_llama(w, cfg, tokens)) < 1e-5
    # Causal: changing the last token changes nothing before it.
    tokens2 = tokens.copy()
    tokens2[:, -1] = (tokens2[:, -1] + 1) % cfg.vocab_size
    np.testing.assert_array_equal(
        np.asarray(apply({'params': params}, tokens2))[:, :-1], np.asarray(logits)[:, :-1]
    )


def test_qk_permutation_round_trip():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    permuted = gguf_import.permute_qk(w, 6)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_import.unpermute_qk(permuted, 6), w)
    # Head 0 of llama.cpp's layout interleaves HF rows (0, 4), (1, 5), ...
    np.testing.assert_array_equal(permuted[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])


# --- The GGUF importer on a synthetic file written like llama.cpp's convert script. ---

# A byte-level BPE vocab: control tokens, bytes, merges a+b -> ab, Ġ+ab -> Ġab.
VOCAB = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', 'a', 'b', 'c', 'Ġ', '1', '2']
VOCAB += ['ab', 'Ġab', 'Ċ'] + [f'<extra_{i}>' for i in range(20)]
MERGES = ['a b', 'Ġ ab']
TYPES = [3, 3, 3] + [1] * 9 + [4] * 20  # CONTROL, NORMAL, USER_DEFINED


def write_gguf(path, cfg, w, quantize):
    """A llama-arch GGUF as convert_hf_to_gguf.py writes it (q/k rows permuted).

    With ``quantize``, the embedding and ffn_down are stored as Q8_0 (as in real files,
    where the byte shape of ``tensor.data`` differs from the element shape).
    """
    writer = gguf.GGUFWriter(str(path), 'llama')
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.mlp_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_dimension_count(cfg.resolved_head_dim)
    if cfg.head_dim is not None:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model('gpt2')
    writer.add_tokenizer_pre('smollm')
    writer.add_token_list(VOCAB)
    writer.add_token_types(TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)

    def add(name, arr, quant=False):
        if quant:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(arr, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, arr)

    add('token_embd.weight', w['embed'], quantize)
    for i, lw in enumerate(w['layers']):
        add(f'blk.{i}.attn_norm.weight', lw['attn_norm'])
        add(f'blk.{i}.attn_q.weight', gguf_import.permute_qk(lw['q'], cfg.num_heads))
        add(f'blk.{i}.attn_k.weight', gguf_import.permute_qk(lw['k'], cfg.num_kv_heads))
        add(f'blk.{i}.attn_v.weight', lw['v'])
        add(f'blk.{i}.attn_output.weight', lw['o'])
        add(f'blk.{i}.ffn_norm.weight', lw['mlp_norm'])
        add(f'blk.{i}.ffn_gate.weight', lw['gate'])
        add(f'blk.{i}.ffn_up.weight', lw['up'])
        add(f'blk.{i}.ffn_down.weight', lw['down'], quantize)
    add('output_norm.weight', w['final_norm'])
    if not cfg.tie_embeddings:
        add('output.weight', w['lm_head'])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized_like_file(w, quantize):
    """What the file holds after Q8_0 round-off (the importer's exact target)."""
    if not quantize:
        return w
    q8 = gguf.GGMLQuantizationType.Q8_0
    rt = lambda a: gguf.quants.dequantize(gguf.quants.quantize(a, q8), q8)  # noqa: E731
    out = dict(w, embed=rt(w['embed']))
    out['layers'] = [dict(lw, down=rt(lw['down'])) for lw in w['layers']]
    return out


GGUF_SHAPES = {
    # Row lengths (d_model, mlp_dim) are multiples of Q8_0's block of 32.
    'tied_q8': (
        LlamaConfig(
            vocab_size=len(VOCAB),
            num_layers=2,
            d_model=32,
            num_heads=4,
            num_kv_heads=2,
            mlp_dim=64,
            max_len=64,
            rope_base=1e5,
        ),
        True,
    ),
    'untied_f32': (
        LlamaConfig(
            vocab_size=len(VOCAB),
            num_layers=2,
            d_model=24,
            num_heads=6,
            num_kv_heads=3,
            head_dim=8,
            mlp_dim=40,
            max_len=32,
            norm_eps=1e-6,
            tie_embeddings=False,
        ),
        False,
    ),
}


@pytest.mark.parametrize('shape', sorted(GGUF_SHAPES))
def test_gguf_import_round_trip(tmp_path, shape):
    cfg, quantize = GGUF_SHAPES[shape]
    w = random_hf_weights(cfg, seed=2)
    path = tmp_path / 'model.gguf'
    write_gguf(path, cfg, w, quantize)
    out_dir = str(tmp_path / 'ckpt')
    got_cfg, _, _ = gguf_import.import_gguf(str(path), out_dir)
    assert got_cfg == cfg
    model, params, tokenizer = gguf_import.load_imported(out_dir)
    assert model.config == cfg
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    want = numpy_llama(dequantized_like_file(w, quantize), cfg, tokens)
    assert rel_err(model.apply({'params': params}, tokens), want) < 1e-5
    # The importer really undid llama.cpp's permutation (the file holds permuted rows).
    reader = gguf.GGUFReader(str(path))
    raw_q = next(t for t in reader.tensors if t.name == 'blk.0.attn_q.weight').data
    assert not np.allclose(raw_q, w['layers'][0]['q'])
    np.testing.assert_array_equal(
        np.asarray(params['layers_0']['attention']['query']['kernel']).T, w['layers'][0]['q']
    )
    # Tokenizer: control tokens stay whole, digits split one by one, BPE merges apply.
    text = '<|im_start|>ab ab 12<|im_end|>'
    enc = tokenizer.encode(text)
    assert enc.tokens == ['<|im_start|>', 'ab', 'Ġab', 'Ġ', '1', '2', '<|im_end|>']
    assert enc.ids == [VOCAB.index(t) for t in enc.tokens]
    assert tokenizer.decode(enc.ids, skip_special_tokens=False) == text
    assert tokenizer.decode(enc.ids) == 'ab ab 12'


def test_gguf_import_refuses_what_it_cannot_represent(tmp_path):
    cfg, _ = GGUF_SHAPES['untied_f32']
    w = random_hf_weights(cfg)
    path = tmp_path / 'model.gguf'
    write_gguf(path, cfg, w, quantize=False)
    out_dir = str(tmp_path / 'ckpt')
    gguf_import.import_gguf(str(path), out_dir)
    with pytest.raises(FileExistsError):
        gguf_import.import_gguf(str(path), out_dir)
    tensors = {'token_embd.weight': w['embed'], 'rope_freqs.weight': np.ones(4, np.float32)}
    with pytest.raises(ValueError, match='rope_freqs'):
        gguf_import.params_from_tensors(tensors, cfg)
    with pytest.raises(ValueError, match='missing'):
        gguf_import.params_from_tensors({'token_embd.weight': w['embed']}, cfg)


# --- The fused gradient kernel on a Llama. ---


def test_fused_kernel_equals_reference_on_llama():
    cfg = TIED
    model = LlamaLM(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))['params']
    # A real Adafactor state; min_dim_size_to_factor=16 factors the matrices (fused
    # rank-one path) and leaves the norm scales elementwise (per-example path).
    tx = optax.adafactor(1e-2, min_dim_size_to_factor=16)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    mask = jnp.ones((4, 12)).at[:, 0].set(0)

    @jax.jit
    def step(params, state, toks):
        g = jax.grad(
            lambda p: losses.mean_token_loss(model.apply({'params': p}, toks), toks, mask)
        )(params)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(2):
        params, state = step(params, state, jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 12))))
    spec = grads.GradientSpec(block_dim=16, num_layer_blocks=2, correction='adafactor')
    feat = grads.Featurizer(model, params, spec, opt_state=state)

    blocks = {e.path: feat.layout.block_names[e.block] for e in feat.layout.entries}
    excluded = [e.path for e in feat.layout.entries if e.excluded]
    assert excluded == ['embedding/embedding']
    for path, block in blocks.items():
        if path in excluded:
            continue
        layer = path.split('/')[0]
        if layer.startswith('layers_'):
            kind = 'attention' if '/attention' in path else 'mlp'
            assert block == f'{kind}_{int(layer.split("_")[1])}', path
        else:
            assert block == 'mlp_1', path  # the final norm goes with the last MLP block
    assert blocks['layers_0/attention_norm/scale'] == 'attention_0'
    assert blocks['layers_1/mlp/wo/kernel'] == 'mlp_1'
    # Factored (both dims >= 16) Dense kernels take the fused path; key/value (24 x 8)
    # stay unfactored, so the per-example fallback is exercised too. The tied head is not
    # a Dense and is never tapped.
    fused_names = ('query', 'out', 'wi_gate', 'wi_up', 'wo')
    assert feat.fused_paths == {
        p for p in blocks if p.endswith('/kernel') and p.split('/')[-2] in fused_names
    }

    tokens = rng.integers(0, cfg.vocab_size, (5, 12)).astype(np.int32)
    mask = np.zeros((5, 12), np.float32)
    for i, (p, e) in enumerate([(3, 12), (8, 10), (1, 4), (6, 7), (10, 12)]):
        mask[i, p:e] = 1  # prompt / completion: only the completion is a target
    batch = {'tokens': tokens, 'loss_mask': mask}
    fused, ref = feat(batch), feat.reference(batch)
    assert fused.shape == (5, 2 * 2 * 16)
    assert float(jnp.max(jnp.abs(ref))) > 0
    assert rel_err(fused, ref) < 1e-4


# --- An imported checkpoint through the unchanged jobs, with estimated V. ---


def test_imported_checkpoint_runs_the_jobs_with_estimated_moments(tmp_path):
    """import -> estimate_moments -> load_model -> index_corpus, against direct calls."""
    import json

    from trackstar_jax import index, pipeline, train
    from trackstar_jax import sharding as shd
    from trackstar_jax.data import examples as examples_lib
    from trackstar_jax.grads import second_moments
    from trackstar_jax.jobs import attribution, common

    cfg = LlamaConfig(
        vocab_size=len(VOCAB), num_layers=2, d_model=16, num_heads=4, num_kv_heads=2,
        mlp_dim=24, max_len=32,
    )  # fmt: skip
    path, ckpt = tmp_path / 'model.gguf', str(tmp_path / 'ckpt')
    write_gguf(path, cfg, random_hf_weights(cfg, seed=5), quantize=False)
    gguf_import.import_gguf(str(path), ckpt)
    corpus_path = tmp_path / 'corpus.jsonl'
    texts = ['ab ab 12', 'a b c', 'ab 1 2 ab c', 'c c ab', '21 ab', 'b ab ab ab a']
    with open(corpus_path, 'w') as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({'id': f'doc{i}', 'text': t}) + '\n')
    mesh_axes = ((shd.DATA, 4), (shd.MODEL, 2))
    meta = attribution.estimate_moments(
        workdir=str(tmp_path / 'work'),
        checkpoint_dir=ckpt,
        corpus_path=str(corpus_path),
        num_examples=5,
        seq_len=12,
        chunk_size=2,
        min_dim_size_to_factor=8,
        tail_patch_learning_rate=3e-3,
        mesh_axes=mesh_axes,
    )
    assert meta['num_examples'] == 5 and len(set(meta['example_ids'])) == 5

    # The document separator, not the chat tokens, starts every example.
    tok = gguf_import.imported_tokenizer(ckpt)
    assert tok.eos_id == VOCAB.index('<|endoftext|>')
    assert tok.encode('ab ab 12') == [VOCAB.index(t) for t in ['ab', 'Ġab', 'Ġ', '1', '2']]

    # Direct: the same sample through estimate_second_moments on one device.
    model, params, _ = gguf_import.load_imported(ckpt)
    by_id = {f'doc{i}': t for i, t in enumerate(texts)}
    recs = [{'id': i, 'text': by_id[i]} for i in meta['example_ids']]
    exs = examples_lib.corpus_examples(recs, tok, 12)
    toks = np.zeros((5, 12), np.int32)
    mask = np.zeros((5, 12), np.float32)
    for i, ex in enumerate(exs):
        toks[i, : len(ex['tokens'])] = ex['tokens']
        mask[i, : len(ex['loss_mask'])] = ex['loss_mask']
    direct = grads.estimate_second_moments(
        model, params, [{'tokens': toks, 'loss_mask': mask}], min_dim_size_to_factor=8
    )
    assert any(np.size(x) > 1 for x in jax.tree.leaves(direct.v_row))  # factored path used

    mesh = shd.make_mesh(mesh_axes)
    loaded = common.load_model(ckpt, mesh)
    assert loaded.train_config.learning_rate == 3e-3
    is_factored = lambda n: isinstance(n, optax.FactoredState)  # noqa: E731
    found = [s for s in jax.tree.leaves(loaded.opt_state, is_leaf=is_factored) if is_factored(s)]
    assert len(found) == 1
    for a, b in zip(jax.tree.leaves(found[0]), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-12)

    # index_corpus on the imported checkpoint == the reference path with the direct V.
    spec = grads.GradientSpec(block_dim=16, num_layer_blocks=2, correction='adafactor')
    built = attribution.index_corpus(
        workdir=str(tmp_path / 'work'),
        checkpoint_dir=ckpt,
        spec=spec,
        corpus_path=str(corpus_path),
        config=pipeline.IndexConfig(seq_len=12, batch_size=4, chunk_rows=4),
        mesh_axes=mesh_axes,
    )
    idx = index.open(built)
    rows, ids = idx.read(slice(0, len(idx))), idx.ids
    feat = grads.Featurizer(model, params, spec, opt_state=direct)
    all_ex = examples_lib.corpus_examples(
        [{'id': f'doc{i}', 'text': t} for i, t in enumerate(texts)], tok, 12
    )
    for ex in all_ex:
        row = rows[list(ids).index(ex['id'])]
        want = feat.reference({'tokens': ex['tokens'][None], 'loss_mask': ex['loss_mask'][None]})[0]
        assert rel_err(row, want) < 1e-4

    # A stale or foreign estimate is refused, not silently misapplied.
    fresh = train.make_optimizer(train.TrainConfig(min_dim_size_to_factor=128)).init(params)
    with pytest.raises(ValueError, match='min_dim_size_to_factor'):
        second_moments.with_moments(fresh, direct)
