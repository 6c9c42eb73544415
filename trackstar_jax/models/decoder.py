"""A PaLM-style decoder-only language model in Flax linen.

The architecture of the TrackStar paper's models (its Table A.4, after Chowdhery et al.
2023): RoPE, SwiGLU MLP, no biases, multi-query attention, input and output embedding
shared, a parallel attention + MLP block.

Names are part of the contract with the gradient kernel (``trackstar_jax.grads``):

    embedding                      token embedding (excluded from attribution)
    layers_{i}/attention_norm      RMSNorm scale           -> attention block of layer i
    layers_{i}/attention/{query,key,value,out}/kernel      -> attention block of layer i
    layers_{i}/mlp_norm            RMSNorm scale           -> MLP block of layer i
    layers_{i}/mlp/{wi_gate,wi_up,wo}/kernel               -> MLP block of layer i
    final_norm                     RMSNorm scale

Every matrix multiply with a parameter is an ``nn.Dense`` (2-D kernel), so the kernel
can reach it by method interception without touching this file. In the parallel block
each branch has its own RMSNorm (PaLM shares one), so that every parameter belongs to
exactly one of attention or MLP.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trackstar_jax import sharding as shd

Dtype = Any


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and numerics of a :class:`DecoderLM`.

    Attributes:
      vocab_size: number of token ids.
      num_layers: number of decoder blocks.
      d_model: width of the residual stream (embedding size).
      num_heads: query heads.
      mlp_dim: hidden width of the SwiGLU MLP.
      max_len: longest sequence the model is used with (RoPE tables are computed on the
        fly, so this is only checked, not baked into parameters).
      num_kv_heads: key/value heads; 1 is multi-query attention (the paper), equal to
        num_heads is multi-head.
      head_dim: size of each head; d_model // num_heads if None.
      rope_base: RoPE wavelength base.
      parallel_block: PaLM's parallel attention + MLP (True) or the serial block.
      norm_eps: RMSNorm epsilon.
      dtype: compute dtype of activations ('float32' or 'bfloat16').
      param_dtype: parameter dtype.
    """

    vocab_size: int = 4096
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    mlp_dim: int = 256
    max_len: int = 128
    num_kv_heads: int = 1
    head_dim: int | None = None
    rope_base: float = 10_000.0
    parallel_block: bool = True
    norm_eps: float = 1e-6
    dtype: str = 'float32'
    param_dtype: str = 'float32'

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f'num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.'
            )
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f'd_model={self.d_model} is not divisible by '
                f'num_heads={self.num_heads}; set head_dim.'
            )
        if self.resolved_head_dim % 2:
            raise ValueError('RoPE needs an even head_dim.')

    @property
    def resolved_head_dim(self) -> int:
        """The head size actually used."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (stored beside checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**d)


def _dense(features: int, in_axis: str, out_axis: str, cfg: DecoderConfig, name: str):
    return nn.Dense(
        features,
        use_bias=False,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal'), (in_axis, out_axis)
        ),
        name=name,
    )


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale (no bias)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            'scale',
            nn.with_logical_partitioning(nn.initializers.ones, (shd.EMBED,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        return self.normalize(x, scale, self.eps, self.dtype)

    @staticmethod
    def normalize(x: jax.Array, scale: jax.Array, eps: float, dtype: Dtype) -> jax.Array:
        """The norm's math; ``scale`` [d] or, in the batched gradient kernel, one copy
        per example [B, 1, d]."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return (normed * scale.astype(jnp.float32)).astype(dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Applies RoPE (rotate-half layout) to x of shape [..., T, H, Dh]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions[:, None].astype(jnp.float32) * inv_freq[None, :]  # [T, half]
    sin = jnp.sin(angles)[:, None, :]
    cos = jnp.cos(angles)[:, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE; multi-query when num_kv_heads == 1."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h, kvh, dh = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        *lead, t, _ = x.shape
        q = _dense(h * dh, shd.EMBED, shd.HEADS, cfg, 'query')(x)
        k = _dense(kvh * dh, shd.EMBED, shd.KV, cfg, 'key')(x)
        v = _dense(kvh * dh, shd.EMBED, shd.KV, cfg, 'value')(x)
        q = q.reshape(*lead, t, h, dh)
        k = k.reshape(*lead, t, kvh, dh)
        v = v.reshape(*lead, t, kvh, dh)
        positions = jnp.arange(t)
        q = rotary_embedding(q, positions, cfg.rope_base)
        k = rotary_embedding(k, positions, cfg.rope_base)
        # Group the query heads over their shared key/value head.
        q = q.reshape(*lead, t, kvh, h // kvh, dh)
        logits = jnp.einsum('...qkgd,...skd->...kgqs', q, k).astype(jnp.float32)
        logits = logits / jnp.sqrt(jnp.float32(dh))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum('...kgqs,...skd->...qkgd', weights, v)
        out = out.reshape(*lead, t, h * dh)
        return _dense(cfg.d_model, shd.HEADS, shd.EMBED, cfg, 'out')(out)


class Mlp(nn.Module):
    """SwiGLU MLP: wo(silu(wi_gate x) * wi_up x)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg.mlp_dim, shd.EMBED, shd.MLP, cfg, 'wi_gate')(x)
        up = _dense(cfg.mlp_dim, shd.EMBED, shd.MLP, cfg, 'wi_up')(x)
        return _dense(cfg.d_model, shd.MLP, shd.EMBED, cfg, 'wo')(nn.silu(gate) * up)


class DecoderBlock(nn.Module):
    """One decoder layer, parallel (PaLM) or serial."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        norm = lambda name: RMSNorm(
            cfg.norm_eps,
            jnp.dtype(cfg.dtype),  # noqa: E731
            jnp.dtype(cfg.param_dtype),
            name=name,
        )
        attention = Attention(cfg, name='attention')
        mlp = Mlp(cfg, name='mlp')
        if cfg.parallel_block:
            return x + attention(norm('attention_norm')(x)) + mlp(norm('mlp_norm')(x))
        x = x + attention(norm('attention_norm')(x))
        return x + mlp(norm('mlp_norm')(x))


class DecoderLM(nn.Module):
    """Decoder-only LM: ``apply({'params': p}, tokens[B, T]) -> logits[B, T, V]``.

    Logits at position t predict token t+1 (see ``trackstar_jax.losses``).
    """

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        if tokens.shape[-1] > cfg.max_len:
            raise ValueError(f'Sequence length {tokens.shape[-1]} > max_len {cfg.max_len}.')
        embedding = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(1.0), (shd.VOCAB, shd.EMBED)
            ),
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            name='embedding',
        )
        x = embedding(tokens)
        for i in range(cfg.num_layers):
            x = DecoderBlock(cfg, name=f'layers_{i}')(x)
        x = RMSNorm(
            cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name='final_norm'
        )(x)
        # Shared input/output embedding; the 1/sqrt(d) keeps initial logits O(1)
        # with a unit-variance embedding (as T5X does for shared embeddings).
        logits = embedding.attend(x) / jnp.sqrt(jnp.float32(cfg.d_model)).astype(x.dtype)
        return logits.astype(jnp.float32)
