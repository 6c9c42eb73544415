"""A Llama-architecture decoder (SmolLM2, Llama 2/3 without RoPE scaling) in Flax linen.

Hugging Face ``LlamaForCausalLM`` semantics: serial pre-norm blocks, RMSNorm
``x * rsqrt(mean(x²) + eps) * weight``, grouped-query causal attention with RoPE in the
"rotate_half" layout on q and k, SwiGLU MLP ``down(silu(gate x) * up x)``, no biases, and
an output head that is either the token embedding (tied, no scaling) or its own matrix.

Parameter names follow the contract of ``trackstar_jax.grads`` (as ``decoder.py``), so
the gradient kernel and the block layout need no model-specific code:

    embedding/embedding                            token embedding (excluded from attribution)
    layers_{i}/attention_norm/scale                -> attention block of layer i
    layers_{i}/attention/{query,key,value,out}/kernel
    layers_{i}/mlp_norm/scale                      -> MLP block of layer i
    layers_{i}/mlp/{wi_gate,wi_up,wo}/kernel
    final_norm/scale
    lm_head/kernel [d, V]                          only when tie_embeddings is False

A Llama block is exactly ``decoder.DecoderBlock`` with ``parallel_block=False`` (same
RMSNorm, rotate-half RoPE with HF's inverse frequencies, GQA grouping as HF's
``repeat_kv``), so the blocks are reused rather than re-implemented; what differs from
:class:`~trackstar_jax.models.decoder.DecoderLM` is the head (no 1/sqrt(d) logit scaling,
optional untied ``lm_head``) and the initialisers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trackstar_jax import sharding as shd
from trackstar_jax.models.decoder import DecoderBlock, DecoderConfig, RMSNorm


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a :class:`LlamaLM`.

    Attributes:
      vocab_size: number of token ids (rows of the embedding).
      num_layers: number of decoder blocks.
      d_model: width of the residual stream (HF ``hidden_size``).
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention).
      head_dim: size of each head; d_model // num_heads if None.
      mlp_dim: hidden width of the SwiGLU MLP (HF ``intermediate_size``).
      max_len: longest sequence the model is used with (HF ``max_position_embeddings``).
      rope_base: RoPE wavelength base (HF ``rope_theta``; SmolLM2 uses 1e5).
      norm_eps: RMSNorm epsilon (HF ``rms_norm_eps``).
      tie_embeddings: output head is the token embedding (True) or ``lm_head``.
      dtype: compute dtype of activations ('float32' or 'bfloat16').
      param_dtype: parameter dtype.
    """

    vocab_size: int = 4096
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None
    mlp_dim: int = 256
    max_len: int = 128
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = 'float32'
    param_dtype: str = 'float32'

    def __post_init__(self):
        # DecoderConfig validates heads, head_dim and RoPE parity; fail at construction.
        self.block_config()

    @property
    def resolved_head_dim(self) -> int:
        """The head size actually used."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    def block_config(self) -> DecoderConfig:
        """The equivalent serial-block ``DecoderConfig`` the layers are built from."""
        return DecoderConfig(
            vocab_size=self.vocab_size,
            num_layers=self.num_layers,
            d_model=self.d_model,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            max_len=self.max_len,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_base=self.rope_base,
            parallel_block=False,
            norm_eps=self.norm_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (stored beside checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**d)


class LlamaLM(nn.Module):
    """Llama decoder: ``apply({'params': p}, tokens[B, T]) -> float32 logits[B, T, V]``.

    Logits at position t predict token t+1 (see ``trackstar_jax.losses``).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        if tokens.shape[-1] > cfg.max_len:
            raise ValueError(f'Sequence length {tokens.shape[-1]} > max_len {cfg.max_len}.')
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # HF initializer_range: small enough that tied logits start O(1) without the
        # 1/sqrt(d) scaling DecoderLM applies (Llama has none, and imported weights
        # expect none).
        embedding = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (shd.VOCAB, shd.EMBED)
            ),
            dtype=dtype,
            param_dtype=param_dtype,
            name='embedding',
        )
        x = embedding(tokens)
        block_cfg = cfg.block_config()
        for i in range(cfg.num_layers):
            x = DecoderBlock(block_cfg, name=f'layers_{i}')(x)
        x = RMSNorm(cfg.norm_eps, dtype, param_dtype, name='final_norm')(x)
        if cfg.tie_embeddings:
            # Not an nn.Dense, so the gradient kernel never taps it (the embedding is
            # excluded from attribution); gradients still flow through it to x.
            logits = embedding.attend(x)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(0.02), (shd.EMBED, shd.VOCAB)
                ),
                name='lm_head',
            )(x)
        return logits.astype(jnp.float32)
