"""Estimating V when a checkpoint has no optimizer state (most public checkpoints).

V is estimated as the mean over examples of the squared per-example loss gradient,
E_z[(∇θ Loss(z))²], in one pass over data. With ``factored=True`` it is stored the way
optax's Adafactor stores its state (v_row, v_col for matrices whose two largest dims
are >= ``min_dim_size_to_factor``, full v otherwise), so ``correction='adafactor'``
applies it through the fused kernel's rank-one scalings exactly as it would a real
Adafactor state. With ``factored=False`` every parameter keeps a full v (elementwise
correction: exact, but non-Dense-fusable, so the kernel falls back to per-example
gradients for those parameters).

Cost: one forward + backward per example; per-example gradients are formed for
``chunk_size`` examples at a time (memory chunk_size x params).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trackstar_jax import losses
from trackstar_jax.grads.correction import factored_axes


def _factored(shape: tuple[int, ...], factored: bool, min_dim: int) -> bool:
    if not factored or len(shape) < 2:
        return False
    d1, _ = factored_axes(shape)
    return shape[d1] >= min_dim


def estimate_second_moments(
    model: nn.Module,
    params: Any,
    batches: Iterable[Mapping],
    *,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    chunk_size: int = 8,
) -> optax.FactoredState:
    """Mean squared per-example loss gradient, in optax Adafactor's state format.

    Args:
      model: the LM.
      params: its parameters.
      batches: iterable of {'tokens', 'loss_mask'} batches (the loss convention).
      factored: store matrices factored (v_row, v_col) as Adafactor does.
      min_dim_size_to_factor: as optax's argument of the same name.
      chunk_size: examples whose per-example gradients are formed at once.

    Returns:
      An ``optax.FactoredState`` usable as ``opt_state`` with correction='adafactor'.

    Raises:
      ValueError: if ``batches`` is empty.
    """
    params = nn.unbox(params)

    def example_loss(p, toks, mask):
        logits = model.apply({'params': p}, toks[None])
        return losses.example_losses(logits, toks[None], mask[None])[0]

    @jax.jit
    def sum_sq(p, toks, mask):
        g = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(p, toks, mask)
        return jax.tree.map(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)), axis=0), g)

    total, count = None, 0
    for batch in batches:
        toks = np.asarray(batch['tokens'], np.int32)
        mask = np.asarray(batch['loss_mask'], np.float32)
        for s in range(0, len(toks), chunk_size):
            part = sum_sq(params, toks[s : s + chunk_size], mask[s : s + chunk_size])
            total = part if total is None else jax.tree.map(jnp.add, total, part)
            count += len(toks[s : s + chunk_size])
    if not count:
        raise ValueError('estimate_second_moments needs at least one example.')
    mean_sq = jax.tree.map(lambda x: x / count, total)

    def split(v):
        shape = tuple(v.shape)
        if _factored(shape, factored, min_dim_size_to_factor):
            d1, d0 = factored_axes(shape)
            one = jnp.zeros((1,), jnp.float32)
            return jnp.mean(v, axis=d0), jnp.mean(v, axis=d1), one
        one = jnp.zeros((1,), jnp.float32)
        return one, one, v

    parts = jax.tree.map(split, mean_sq)
    is_triple = lambda x: isinstance(x, tuple) and len(x) == 3  # noqa: E731
    pick = lambda i: jax.tree.map(lambda t: t[i], parts, is_leaf=is_triple)  # noqa: E731
    return optax.FactoredState(
        count=jnp.asarray(count, jnp.int32), v_row=pick(0), v_col=pick(1), v=pick(2)
    )
