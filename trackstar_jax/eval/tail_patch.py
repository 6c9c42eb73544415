"""The tail-patch influence metric (paper §4.3).

From the final checkpoint, with the training hyperparameters and the saved optimizer
state, take one training step on a single proponent and measure the change in the
probability of the query's target sequence, p(target | prompt) = exp(−Loss(query)).
The step is the trainer's own (``train.loss_fn`` + ``train.make_optimizer``), vmapped
over proponents so a query's top-k steps run as one batched computation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from trackstar_jax import losses, train
from trackstar_jax.data import examples as examples_lib


def make_tail_patch(
    model: nn.Module,
    train_config: train.TrainConfig,
    proponent_batch: int | None = None,
    first_order: bool = False,
) -> Callable[..., jax.Array]:
    """``fn(params, opt_state, proponents, query) -> Δp [K]`` (jit-compiled).

    Args:
      model: the LM.
      train_config: the optimizer of the step.
      proponent_batch: proponents stepped at once (``lax.map`` over groups of this many;
        each holds its own gradient, update and patched params, so a 100M+ model wants
        1-2); None vmaps all K.
      first_order: ``fn`` returns [K, 3]: per proponent the measured Δp, its first-order
        prediction ⟨∇_θ p(target | prompt), u⟩ and ||u|| (as :func:`make_first_order`),
        from the one update u the step applies (computed once, not twice).

    Args of ``fn``:
      params, opt_state: the final checkpoint's.
      proponents: {'tokens', 'loss_mask'} of shape [K, T]: one step on each row alone.
      query: {'tokens', 'loss_mask'} of shape [T'] (the completion masked in).
    """
    tx = train.make_optimizer(train_config)
    target_prob = _target_prob(model)

    def one(params, opt_state, tokens, mask, query):
        updates = _update(model, tx, params, opt_state, tokens, mask)
        after = target_prob(optax.apply_updates(params, updates), query)
        if not first_order:
            return after
        return jnp.concatenate([after[None], _linearised(target_prob, params, updates, query)])

    @jax.jit
    def fn(params, opt_state, proponents, query):
        before = target_prob(params, query)
        if first_order:  # only the measured column is a difference from `before`
            before = jnp.array([1.0, 0.0, 0.0]) * before
        if proponent_batch is None:
            after = _each_proponent(one)(params, opt_state, proponents, query)
        else:
            after = jax.lax.map(
                lambda row: one(params, opt_state, row[0], row[1], query),
                (proponents['tokens'], proponents['loss_mask']),
                batch_size=proponent_batch,
            )
        return after - before

    return fn


def scaled_step(train_config: train.TrainConfig, scale: float) -> train.TrainConfig:
    """``train_config`` with its learning rate (the whole schedule) times ``scale``.

    Adafactor clips the preconditioned gradient before the learning rate multiplies it,
    so the update u scales by exactly ``scale``: the same direction, a smaller step.
    """
    return dataclasses.replace(train_config, learning_rate=train_config.learning_rate * scale)


def _target_probs(model: nn.Module) -> Callable[[Any, dict], jax.Array]:
    """``fn(params, queries [Q, T']) -> [Q]`` p(target | prompt) of every query."""

    def target_probs(params, queries):
        logits = model.apply({'params': params}, queries['tokens'])
        return jnp.exp(-losses.example_losses(logits, queries['tokens'], queries['loss_mask']))

    return target_probs


def _target_prob(model: nn.Module) -> Callable[[Any, dict], jax.Array]:
    """``fn(params, query [T']) -> p(target | prompt)`` of one query."""
    target_probs = _target_probs(model)
    return lambda params, query: target_probs(params, {k: v[None] for k, v in query.items()})[0]


def _each_proponent(one: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``one(params, opt_state, tokens, mask, query)`` vmapped over the proponents' rows."""

    def each(params, opt_state, proponents, query):
        return jax.vmap(one, in_axes=(None, None, 0, 0, None))(
            params, opt_state, proponents['tokens'], proponents['loss_mask'], query
        )

    return each


def _update(model, tx, params, opt_state, tokens, mask):
    # The trainer's step on one proponent: its gradient through the saved optimizer state.
    batch = {'tokens': tokens[None], 'loss_mask': mask[None]}
    grads = jax.grad(lambda p: train.loss_fn(model, p, batch))(params)
    return tx.update(grads, opt_state, params)[0]


def make_first_order(model: nn.Module, train_config: train.TrainConfig) -> Callable[..., jax.Array]:
    """``fn(params, opt_state, proponents, query) -> [K, 2]``: per proponent, the
    first-order prediction of its tail-patch Δp, ⟨∇_θ p(target | prompt), u⟩ with u the
    optimizer update the step applies (Adafactor's preconditioning, clipping and scaling
    included), and the update's global norm ||u||.

    Beside :func:`make_tail_patch`'s measured Δp it separates what a score can predict
    (the direction of u against the query gradient) from what one step adds (curvature).
    """
    tx = train.make_optimizer(train_config)
    target_prob = _target_prob(model)

    def one(params, opt_state, tokens, mask, query):
        updates = _update(model, tx, params, opt_state, tokens, mask)
        return _linearised(target_prob, params, updates, query)

    return jax.jit(_each_proponent(one))


def _linearised(target_prob, params, updates, query) -> jax.Array:
    # [⟨∇_θ p(target | prompt), u⟩, ||u||]: one forward-mode derivative along the step.
    _, predicted = jax.jvp(lambda p: target_prob(p, query), (params,), (updates,))
    return jnp.stack([predicted, optax.tree.norm(updates)])


def make_first_order_matrix(
    model: nn.Module, train_config: train.TrainConfig
) -> Callable[..., jax.Array]:
    """``fn(params, opt_state, proponents, queries) -> [K, Q]``: the first-order
    prediction of every (proponent, query) tail-patch Δp at once, ⟨∇_θ p_q, u_k⟩.

    One step per proponent (its update u_k, as :func:`make_first_order`) and one
    forward-mode derivative along u_k of all Q queries' target probabilities, so a whole
    candidate set can be ranked by the quantity tail-patch measures to first order.

    Args of ``fn``: as :func:`make_first_order`'s, with ``queries`` batched: {'tokens',
    'loss_mask'} of shape [Q, T'].
    """
    tx = train.make_optimizer(train_config)
    target_probs = _target_probs(model)

    def one(params, opt_state, tokens, mask, queries):
        updates = _update(model, tx, params, opt_state, tokens, mask)
        return jax.jvp(lambda p: target_probs(p, queries), (params,), (updates,))[1]

    return jax.jit(_each_proponent(one))


def first_order_matrix(
    fn: Callable[..., jax.Array],
    params: Any,
    opt_state: Any,
    queries: Sequence[dict],
    examples: Sequence[dict],
    k: int,
    seq_len: int,
    query_len: int,
) -> np.ndarray:
    """[Q, N] first-order tail-patch Δp of every query against every example, with
    :func:`make_first_order_matrix`'s ``fn`` over groups of k examples of similar length
    (each group padded to a power-of-two length; padding rows computed and dropped)."""
    q_batch = examples_lib.pad_batch(list(queries), len(queries), query_len)
    out = np.zeros((len(queries), len(examples)), np.float64)
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i]['tokens']), i))
    t0 = time.time()
    for n, (group, batch) in enumerate(examples_lib.length_groups(order, examples, k, seq_len)):
        values = np.asarray(fn(params, opt_state, batch, q_batch))
        out[:, group] = values[: len(group)].T
        if n % 20 == 0:
            logging.info('First-order matrix: %d/%d examples, %.0fs', n * k + len(group),
                         len(examples), time.time() - t0)  # fmt: skip
    return out


def tail_patch_scores(
    fn: Callable[..., jax.Array],
    params: Any,
    opt_state: Any,
    pairs: Sequence[tuple[str, str]],
    queries: dict[str, dict],
    examples: dict[str, dict],
    k: int,
    seq_len: int,
    query_len: int,
) -> dict[tuple[str, str], float]:
    """Δp for every (query id, proponent id) pair, k proponents per batched call (with
    :func:`make_first_order`'s ``fn``: a (predicted Δp, ||u||) tuple per pair).

    Pairs are grouped by query; each group is padded to k rows (padding rows are
    computed and dropped) so one compiled shape serves every call.
    """
    by_query: dict[str, list[str]] = {}
    for q, p in pairs:
        by_query.setdefault(q, [])
        if p not in by_query[q]:
            by_query[q].append(p)
    out = {}
    t0, total = time.time(), sum(len(v) for v in by_query.values())
    for i, (q, props) in enumerate(sorted(by_query.items())):
        query = {k: v[0] for k, v in examples_lib.pad_batch([queries[q]], 1, query_len).items()}
        props = sorted(props, key=lambda p: (len(examples[p]['tokens']), p))
        for group, batch in examples_lib.length_groups(props, examples, k, seq_len):
            deltas = np.asarray(fn(params, opt_state, batch, query))
            for p, d in zip(group, deltas, strict=False):
                out[(q, p)] = float(d) if np.ndim(d) == 0 else tuple(float(x) for x in d)
        if i % 20 == 0 or i == len(by_query) - 1:
            rate = len(out) / max(time.time() - t0, 1e-9)
            logging.info(
                'Tail-patch: %d/%d queries, %d/%d steps, %.1f steps/s, ETA %.0fs',
                i + 1,
                len(by_query),
                len(out),
                total,
                rate,
                (total - len(out)) / max(rate, 1e-9),
            )
    return out
