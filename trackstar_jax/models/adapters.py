"""Checkpoint adapters: MaxText Llama param trees <-> :class:`~trackstar_jax.models.LlamaLM`.

    params = adapters.maxtext_to_llama(restored['params'], LlamaConfig(...))
    logits = LlamaLM(config).apply({'params': params}, tokens)

A MaxText ``decoder_block: llama2`` model (Llama 2/3 and the like) computes exactly what
``LlamaLM`` computes, up to these conventions, all verified against the MaxText source
(``src/maxtext/layers/{attentions,attention_op,embeddings,normalizations,decoders}.py``,
``src/maxtext/models/llama2.py``, ``src/maxtext/checkpoint_conversion/standalone_scripts/
llama_or_mistral_ckpt.py`` and ``checkpoint_conversion/utils/param_mapping.py``):

* **Query scaling is folded into the query kernel.** MaxText's attention never divides
  the logits by sqrt(head_dim) at run time (``attention_op.apply_attention_dot`` takes
  q·k as is); instead ``Attention.init_query_w`` divides the query *initialiser* by
  sqrt(head_dim) and the Llama converters divide the imported query kernel by it
  (``scale_query``). ``LlamaLM`` scales at run time, so the adapter multiplies the query
  kernel by sqrt(head_dim) (``query_scale_folded=True``; the inverse divides).
* **RoPE.** MaxText's default ``RotaryEmbedding`` is the half-split ("rotate_half")
  layout with inverse frequencies ``1 / base^(2i/head_dim)``, the same as ``LlamaLM``:
  no permutation (``rope_layout='half_split'``). Meta's original weights rotate adjacent
  pairs, which is why ``llama_or_mistral_ckpt.py`` permutes their q/k columns evens-first
  (``permute_to_match_maxtext_rope``); a finished MaxText checkpoint is already
  half-split. Models run with ``rope_type: llama3.1`` use ``LLaMARotaryEmbedding``,
  which rotates adjacent pairs (2i, 2i+1), and MaxText's HF converter for it
  (``param_mapping.LLAMA31_MAXTEXT_TO_HF_PARAM_HOOK_FN``) writes q/k in that pair order:
  ``rope_layout='interleaved'`` permutes q/k back to half-split. That is exact only
  with ``rope_use_scale: false``; Llama 3.1's frequency scaling has no equivalent in
  ``LlamaLM`` (it has no RoPE scaling).
* **RMSNorm** is ``x * rsqrt(mean(x²) + eps) * scale`` with the scale used as is (no
  ``1 + scale``), as in ``LlamaLM``; eps is MaxText's ``normalization_layer_epsilon``
  (1e-5 for the Llama configs) and goes into ``LlamaConfig.norm_eps``.
* **Tied logits.** With ``logits_via_embedding: true`` MaxText divides the logits by
  sqrt(emb_dim) when ``normalize_embedding_logits`` (default true); ``LlamaLM``'s tied
  head does not. ``decoder_norm`` feeds only the head, so the adapter folds 1/sqrt(emb)
  into the final norm's scale: the forward pass is identical.
* **GQA grouping.** MaxText reshapes queries to ``[.., kv_heads, heads // kv_heads, ..]``
  (query head j uses kv head j // group), as ``LlamaLM`` does.
* **MLP.** ``mlp_activations: [silu, linear]``: ``wo(silu(wi_0 x) * wi_1 x)``; ``wi_0``
  is the gate (HF ``gate_proj``), ``wi_1`` the up projection.
* **Layer stacking.** With ``scan_layers: true`` every layer parameter lives once under
  ``decoder/layers/...`` with the layer axis at ``param_scan_axis`` (default 1); with
  ``scan_layers: false`` under ``decoder/layers_0``, ``decoder/layers_1``, ...

The two rescalings (query kernel, tied final norm) are reparametrisations: the model
function is unchanged but the gradient of the rescaled parameter is divided by the same
constant. The TrackStar correction g / sqrt(V) is invariant to that provided V is
estimated for *these* params (``grads.estimate_second_moments``), which is also the only
practical route: MaxText's optimizer state is laid out on the stacked MaxText shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trackstar_jax.models.llama import LlamaConfig

Path = tuple[str, ...]

ROPE_LAYOUTS = ('half_split', 'interleaved')


def _xp(x: Any) -> Any:
    # jax arrays (and tracers, so the adapter also works under jax.eval_shape / jit)
    # stay jax; everything else (numpy, ml_dtypes bfloat16, lists) is handled by numpy.
    return jnp if isinstance(x, jax.Array) else np


def _path_str(path: Path) -> str:
    return '/'.join(path)


def _flatten(tree: Mapping[str, Any]) -> dict[Path, Any]:
    """{path tuple: leaf} of a nested mapping (dict, FrozenDict); leaves are non-mappings."""
    out: dict[Path, Any] = {}

    def visit(node: Any, prefix: Path) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                visit(child, (*prefix, str(key)))
        else:
            out[prefix] = node

    visit(tree, ())
    return out


def _unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def _strip_params_wrappers(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    # MaxText's TrainState holds params as {'params': {'decoder': ..., 'token_embedder':
    # ...}}, and restored checkpoints may add one more level; unwrap while 'params' is
    # the only key.
    while isinstance(tree, Mapping) and set(tree.keys()) == {'params'}:
        tree = tree['params']
    return tree


class _Reader:
    """Takes leaves out of a flattened tree, checking shapes; reports what is left over."""

    def __init__(self, tree: Mapping[str, Any], what: str):
        if not isinstance(tree, Mapping):
            raise ValueError(f'Expected a nested mapping of {what} params, got {type(tree)}.')
        self.flat = _flatten(nn.unbox(tree))
        self.what = what
        self.used: set[Path] = set()

    def has(self, path: Path) -> bool:
        return path in self.flat or any(p[: len(path)] == path for p in self.flat)

    def take(self, path: Path, shape: tuple[int, ...]) -> Any:
        if path not in self.flat:
            raise ValueError(
                f'{self.what} params are missing {_path_str(path)!r} (expected shape {shape}).'
            )
        x = self.flat[path]
        got = tuple(getattr(x, 'shape', np.shape(x)))
        if got != tuple(shape):
            raise ValueError(
                f'{self.what} param {_path_str(path)!r} has shape {got}, expected {tuple(shape)}.'
            )
        self.used.add(path)
        # Lists and the like become numpy; jax arrays (and tracers) stay as they are.
        return x if isinstance(x, jax.Array) else np.asarray(x)

    def check_all_used(self, hint: str = '') -> None:
        extra = sorted(_path_str(p) for p in self.flat if p not in self.used)
        if extra:
            # An unknown parameter means an architecture the adapter does not model
            # (biases, MoE, qk-norm, ...): converting the rest would be silently wrong.
            shown = ', '.join(extra[:8]) + (
                f', ... ({len(extra)} in all)' if len(extra) > 8 else ''
            )
            raise ValueError(f'Unexpected {self.what} params: {shown}.{hint}')


def _layer_specs(config: LlamaConfig) -> list[tuple[Path, Path, tuple[int, ...], tuple[int, ...]]]:
    """Per layer: (MaxText sub-path, our sub-path, MaxText shape, our shape)."""
    d, h, kvh = config.d_model, config.num_heads, config.num_kv_heads
    dh, f = config.resolved_head_dim, config.mlp_dim
    return [
        (('pre_self_attention_layer_norm', 'scale'), ('attention_norm', 'scale'), (d,), (d,)),
        (
            ('self_attention', 'query', 'kernel'),
            ('attention', 'query', 'kernel'),
            (d, h, dh),
            (d, h * dh),
        ),
        (
            ('self_attention', 'key', 'kernel'),
            ('attention', 'key', 'kernel'),
            (d, kvh, dh),
            (d, kvh * dh),
        ),
        (
            ('self_attention', 'value', 'kernel'),
            ('attention', 'value', 'kernel'),
            (d, kvh, dh),
            (d, kvh * dh),
        ),
        (
            ('self_attention', 'out', 'kernel'),
            ('attention', 'out', 'kernel'),
            (h, dh, d),
            (h * dh, d),
        ),
        (('post_self_attention_layer_norm', 'scale'), ('mlp_norm', 'scale'), (d,), (d,)),
        (('mlp', 'wi_0', 'kernel'), ('mlp', 'wi_gate', 'kernel'), (d, f), (d, f)),
        (('mlp', 'wi_1', 'kernel'), ('mlp', 'wi_up', 'kernel'), (d, f), (d, f)),
        (('mlp', 'wo', 'kernel'), ('mlp', 'wo', 'kernel'), (f, d), (f, d)),
    ]


def _interleaved_to_half_split(x: Any) -> Any:
    """Head-dim (last axis) order (0, 1, 2, 3, ...) -> (0, 2, 4, ..., 1, 3, 5, ...).

    An adjacent-pair RoPE on the original columns equals the rotate-half RoPE on the
    permuted ones (pair (2i, 2i+1) becomes (i, i + head_dim/2)); q and k get the same
    permutation, so q·k is unchanged.
    """
    xp = _xp(x)
    return xp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _half_split_to_interleaved(x: Any) -> Any:
    """Inverse of :func:`_interleaved_to_half_split`."""
    xp = _xp(x)
    half = x.shape[-1] // 2
    return xp.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)


def _scaled(x: Any, factor: float) -> Any:
    # Multiply in float32 at least (bf16 checkpoints), keep the leaf's dtype.
    xp = _xp(x)
    dtype = x.dtype
    wide = xp.promote_types(dtype, xp.float32)
    return (x.astype(wide) * xp.asarray(factor, wide)).astype(dtype)


def _check_options(config: LlamaConfig, scan_axis: int, rope_layout: str) -> None:
    if not isinstance(config, LlamaConfig):
        raise ValueError(f'config must be a LlamaConfig, got {type(config)}.')
    if scan_axis not in (0, 1):
        # Layer norm scales are vectors, so the stacked layer axis can only be 0 or 1.
        raise ValueError(f'scan_axis must be 0 or 1 (MaxText param_scan_axis), got {scan_axis}.')
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f'rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}.')


def _stacked_shape(shape: tuple[int, ...], num_layers: int, axis: int) -> tuple[int, ...]:
    return (*shape[:axis], num_layers, *shape[axis:])


def maxtext_to_llama(
    params: Mapping[str, Any],
    config: LlamaConfig,
    *,
    scan_axis: int = 1,
    rope_layout: str = 'half_split',
    query_scale_folded: bool = True,
    normalize_embedding_logits: bool = True,
) -> dict[str, Any]:
    """Converts a MaxText Llama param tree into :class:`LlamaLM` params.

    Accepts the scanned layout (``scan_layers: true``: ``decoder/layers/...`` with the
    layer axis at ``scan_axis``) and the unscanned one (``decoder/layers_0/...``),
    detected from the tree. Leading ``{'params': ...}`` wrappers (MaxText's TrainState)
    and boxed (``nn.Partitioned``) leaves are accepted. MaxText shapes (emb = d_model,
    L = num_layers, per layer; scanned arrays have L inserted at ``scan_axis``)::

        token_embedder/embedding                     [vocab, emb]
        decoder/decoder_norm/scale                   [emb]
        decoder/logits_dense/kernel                  [emb, vocab]   (untied only)
        decoder/layers/pre_self_attention_layer_norm/scale     [emb]
        decoder/layers/post_self_attention_layer_norm/scale    [emb]
        decoder/layers/self_attention/query/kernel   [emb, heads, head_dim]
        decoder/layers/self_attention/{key,value}/kernel       [emb, kv_heads, head_dim]
        decoder/layers/self_attention/out/kernel     [heads, head_dim, emb]
        decoder/layers/mlp/{wi_0,wi_1}/kernel        [emb, mlp]
        decoder/layers/mlp/wo/kernel                 [mlp, emb]

    Args:
      params: the MaxText param tree (numpy or jax arrays; jax arrays stay jax arrays).
      config: the ``LlamaConfig`` it corresponds to (MaxText ``base_emb_dim`` ->
        d_model, ``base_num_query_heads`` -> num_heads, ``base_num_kv_heads`` ->
        num_kv_heads, ``head_dim``, ``base_mlp_dim`` -> mlp_dim,
        ``base_num_decoder_layers`` -> num_layers, ``rope_max_timescale`` -> rope_base,
        ``normalization_layer_epsilon`` -> norm_eps, ``logits_via_embedding`` ->
        tie_embeddings).
      scan_axis: MaxText's ``param_scan_axis`` (0 or 1); ignored for unscanned trees.
      rope_layout: 'half_split' (MaxText's default ``RotaryEmbedding``) or 'interleaved'
        (``rope_type: llama3.1``'s ``LLaMARotaryEmbedding``; exact only without its
        frequency scaling, see the module docstring).
      query_scale_folded: the query kernel carries MaxText's 1/sqrt(head_dim) (true for
        MaxText-trained and MaxText-converted Llama checkpoints; false only for models
        with qk-norm or ``query_pre_attn_scalar``, which this adapter does not model).
      normalize_embedding_logits: MaxText's flag of that name (default true); with tied
        embeddings, its 1/sqrt(emb) logit scaling is folded into the final norm scale.

    Returns:
      ``LlamaLM`` params (a plain nested dict), in ``config.param_dtype``.

    Raises:
      ValueError: if a parameter is missing, has the wrong shape, or is not part of a
        MaxText Llama (naming its path), or if the tree's tying disagrees with config.
    """
    _check_options(config, scan_axis, rope_layout)
    reader = _Reader(_strip_params_wrappers(params), 'MaxText')
    d, v, nl = config.d_model, config.vocab_size, config.num_layers
    dh = config.resolved_head_dim
    dtype = jnp.dtype(config.param_dtype)
    has_dense = reader.has(('decoder', 'logits_dense'))
    if config.tie_embeddings and has_dense:
        raise ValueError(
            "config.tie_embeddings is True but the checkpoint has 'decoder/logits_dense' "
            '(MaxText logits_via_embedding: false): set tie_embeddings=False.'
        )
    if not config.tie_embeddings and not has_dense:
        raise ValueError(
            "config.tie_embeddings is False but the checkpoint has no 'decoder/logits_dense/"
            "kernel' (MaxText logits_via_embedding: true?): set tie_embeddings=True."
        )
    scanned = reader.has(('decoder', 'layers'))
    if scanned and reader.has(('decoder', 'layers_0')):
        raise ValueError("The checkpoint has both 'decoder/layers' and 'decoder/layers_0'.")
    if not scanned and not reader.has(('decoder', 'layers_0')):
        raise ValueError(
            "MaxText params have neither 'decoder/layers' (scanned) nor 'decoder/layers_0' "
            '(unscanned).'
        )

    def take(path: Path, shape: tuple[int, ...]) -> Any:
        # Cast first, so the rescalings below round once, in the target precision.
        return reader.take(path, shape).astype(dtype)

    out: dict[Path, Any] = {}
    out[('embedding', 'embedding')] = take(('token_embedder', 'embedding'), (v, d))
    final_scale = take(('decoder', 'decoder_norm', 'scale'), (d,))
    if config.tie_embeddings and normalize_embedding_logits:
        # logits = (norm(x) * s) Eᵀ / sqrt(d) = (norm(x) * (s / sqrt(d))) Eᵀ, and the
        # final norm feeds nothing but the head.
        final_scale = _scaled(final_scale, 1.0 / math.sqrt(d))
    out[('final_norm', 'scale')] = final_scale
    if not config.tie_embeddings:
        out[('lm_head', 'kernel')] = take(('decoder', 'logits_dense', 'kernel'), (d, v))

    for mt_sub, our_sub, mt_shape, our_shape in _layer_specs(config):
        if scanned:
            stacked = take(('decoder', 'layers', *mt_sub), _stacked_shape(mt_shape, nl, scan_axis))
            per_layer = [_xp(stacked).take(stacked, i, axis=scan_axis) for i in range(nl)]
        else:
            per_layer = [take(('decoder', f'layers_{i}', *mt_sub), mt_shape) for i in range(nl)]
        for i, x in enumerate(per_layer):
            name = mt_sub[-2]
            if name in ('query', 'key') and rope_layout == 'interleaved':
                x = _interleaved_to_half_split(x)
            if name == 'query' and query_scale_folded:
                x = _scaled(x, math.sqrt(dh))
            out[(f'layers_{i}', *our_sub)] = x.reshape(our_shape)

    reader.check_all_used(
        ' The adapter models MaxText decoder_block "llama2" (dense Llama, no biases); pass '
        'the params tree only (not opt_state), and check config.num_layers.'
    )
    return _unflatten(out)


def llama_to_maxtext(
    params: Mapping[str, Any],
    config: LlamaConfig,
    *,
    scan_layers: bool = True,
    scan_axis: int = 1,
    rope_layout: str = 'half_split',
    query_scale_folded: bool = True,
    normalize_embedding_logits: bool = True,
) -> dict[str, Any]:
    """The inverse of :func:`maxtext_to_llama`: ``LlamaLM`` params -> a MaxText tree.

    Args:
      params: ``LlamaLM`` params (boxed leaves and a ``{'params': ...}`` wrapper are
        accepted).
      config: their ``LlamaConfig``.
      scan_layers: write the scanned layout (``decoder/layers`` stacked along
        ``scan_axis``) or the unscanned one (``decoder/layers_{i}``).
      scan_axis: MaxText's ``param_scan_axis`` (0 or 1).
      rope_layout: the RoPE layout of the MaxText model to be (see
        :func:`maxtext_to_llama`).
      query_scale_folded: fold 1/sqrt(head_dim) into the query kernel as MaxText expects.
      normalize_embedding_logits: the MaxText flag; with tied embeddings the final norm
        scale is multiplied by sqrt(emb) to undo what :func:`maxtext_to_llama` folded in.

    Returns:
      ``{'token_embedder': ..., 'decoder': ...}`` (wrap it as ``{'params': ...}`` for a
      MaxText TrainState), leaves in the input dtype.

    Raises:
      ValueError: for a missing, misshapen or unexpected parameter (naming its path).
    """
    _check_options(config, scan_axis, rope_layout)
    reader = _Reader(_strip_params_wrappers(params), 'LlamaLM')
    d, v, nl = config.d_model, config.vocab_size, config.num_layers
    dh = config.resolved_head_dim
    out: dict[Path, Any] = {}
    out[('token_embedder', 'embedding')] = reader.take(('embedding', 'embedding'), (v, d))
    final_scale = reader.take(('final_norm', 'scale'), (d,))
    if config.tie_embeddings and normalize_embedding_logits:
        final_scale = _scaled(final_scale, math.sqrt(d))
    out[('decoder', 'decoder_norm', 'scale')] = final_scale
    if not config.tie_embeddings:
        out[('decoder', 'logits_dense', 'kernel')] = reader.take(('lm_head', 'kernel'), (d, v))

    transforms: list[Callable[[Any], Any]]
    for mt_sub, our_sub, mt_shape, our_shape in _layer_specs(config):
        name = mt_sub[-2]
        transforms = []
        if name == 'query' and query_scale_folded:
            transforms.append(lambda x: _scaled(x, 1.0 / math.sqrt(dh)))
        if name in ('query', 'key') and rope_layout == 'interleaved':
            transforms.append(_half_split_to_interleaved)
        per_layer = []
        for i in range(nl):
            x = reader.take((f'layers_{i}', *our_sub), our_shape).reshape(mt_shape)
            for fn in transforms:
                x = fn(x)
            per_layer.append(x)
        if scan_layers:
            out[('decoder', 'layers', *mt_sub)] = _xp(per_layer[0]).stack(per_layer, axis=scan_axis)
        else:
            for i, x in enumerate(per_layer):
                out[('decoder', f'layers_{i}', *mt_sub)] = x
    reader.check_all_used(' Check config.num_layers and tie_embeddings.')
    return _unflatten(out)
