"""Tiny Llama configs and the error measure shared by test_llama and test_adapters."""

import numpy as np

from trackstar_jax.models.llama import LlamaConfig

# GQA everywhere (6 query heads over 2 key/value heads); the second shape has a head_dim
# that is not d_model // num_heads and an untied head.
TIED = LlamaConfig(
    vocab_size=40, num_layers=2, d_model=24, num_heads=6, num_kv_heads=2, mlp_dim=40, max_len=16
)
UNTIED = LlamaConfig(
    vocab_size=40,
    num_layers=3,
    d_model=24,
    num_heads=6,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=40,
    max_len=16,
    rope_base=1e5,
    norm_eps=1e-6,
    tie_embeddings=False,
)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
