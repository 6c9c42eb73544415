"""The loss convention every job uses.

A batch is ``{'tokens': int32[B, T], 'loss_mask': float32[B, T]}``.
``loss_mask[b, t] = 1`` marks token t as a *target*, predicted from ``tokens[b, :t]``
(so ``loss_mask[:, 0]`` must be 0: nothing predicts the first token). Padding goes at
the end with mask 0; under causal attention it can never affect a real position.

    Loss(z) = sum_t loss_mask[t] * -log p(tokens[t] | tokens[:t])      (summed, not mean)

Training examples mask every real token; queries mask only the completion.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

Batch = Mapping[str, jax.Array]


def validate_batch(batch: Mapping[str, np.ndarray | jax.Array]) -> None:
    """Raises ValueError if ``batch`` breaks the convention (checked on host arrays)."""
    if 'tokens' not in batch or 'loss_mask' not in batch:
        raise ValueError(f"A batch needs 'tokens' and 'loss_mask', got {sorted(batch)}.")
    tokens, mask = batch['tokens'], batch['loss_mask']
    if tokens.ndim != 2 or mask.shape != tokens.shape:
        raise ValueError(f'tokens {tokens.shape} and loss_mask {mask.shape} must both be [B, T].')
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f'tokens must be integer, got {tokens.dtype}.')
    if isinstance(mask, np.ndarray) and tokens.shape[1] and np.any(mask[:, 0] != 0):
        raise ValueError('loss_mask[:, 0] must be 0: no token predicts the first one.')


def target_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(tokens[t] | tokens[:t]) for t >= 1, as float32[..., T] (position 0 is 0)."""
    logp = jax.nn.log_softmax(logits[..., :-1, :].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[..., 1:, None], axis=-1)[..., 0]
    return jnp.concatenate([jnp.zeros_like(picked[..., :1]), picked], axis=-1)


def target_logits(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logit of the target, logsumexp of all other logits), aligned like target_log_probs.

    Both are float32[..., T] with position 0 set to 0. The margin log(p / (1 - p)) is
    their difference, computed without forming 1 - p (which underflows when p -> 1).
    """
    lg = logits[..., :-1, :].astype(jnp.float32)
    tgt = tokens[..., 1:]
    picked = jnp.take_along_axis(lg, tgt[..., None], axis=-1)[..., 0]
    others = jnp.where(jax.nn.one_hot(tgt, lg.shape[-1], dtype=bool), -jnp.inf, lg)
    lse_others = jax.nn.logsumexp(others, axis=-1)
    pad = lambda a: jnp.concatenate([jnp.zeros_like(a[..., :1]), a], axis=-1)  # noqa: E731
    return pad(picked), pad(lse_others)


def example_losses(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Loss(z) for every example: float32[B], summed over target tokens."""
    return -jnp.sum(target_log_probs(logits, tokens) * loss_mask.astype(jnp.float32), axis=-1)


def mean_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """The training objective: sum of Loss(z) over the batch / number of target tokens."""
    total = jnp.sum(example_losses(logits, tokens, loss_mask))
    return total / jnp.maximum(jnp.sum(loss_mask.astype(jnp.float32)), 1.0)
