"""Estimating V when a checkpoint has no optimizer state (most public checkpoints).

V is estimated as the mean over examples of the squared per-example loss gradient,
E_z[(∇θ Loss(z))²], in one pass over data. With ``factored=True`` it is stored the way
optax's Adafactor stores its state (v_row, v_col for matrices whose two largest dims
are >= ``min_dim_size_to_factor``, full v otherwise), so ``correction='adafactor'``
applies it through the fused kernel's rank-one scalings exactly as it would a real
Adafactor state. With ``factored=False`` every parameter keeps a full v (elementwise
correction: exact, but non-Dense-fusable, so the kernel falls back to per-example
gradients for those parameters).

Cost: one forward + backward per example. The factored Dense kernels' statistics come
from taps (``kernel.squared_gradient_sums``: for G = xᵀ g, the row sums of G² are
Σ_t x_ti (g gᵀ x)_ti and the column sums Σ_t g_tj (x xᵀ g)_tj, from T x T Gram matrices);
the other parameters' per-example gradients are formed for ``chunk_size`` examples at
a time (memory chunk_size x their size).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from trackstar_jax import losses
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.grads import kernel
from trackstar_jax.grads.correction import factored_axes
from trackstar_jax.grads.layout import path_str


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
    method: str = 'taps',
) -> optax.FactoredState:
    """Mean squared per-example loss gradient, in optax Adafactor's state format.

    Args:
      model: the LM.
      params: its parameters.
      batches: iterable of {'tokens', 'loss_mask'} batches (the loss convention).
      factored: store matrices factored (v_row, v_col) as Adafactor does.
      min_dim_size_to_factor: as optax's argument of the same name.
      chunk_size: examples per compiled call.
      method: 'taps' — the factored Dense kernels' row and column sums of squares come
        from taps on their inputs and output-gradients (``kernel.
        squared_gradient_sums``: T x T Gram matrices, never a per-example m x n
        gradient), every other parameter's from its per-example gradient; or
        'per_example' — every parameter's per-example gradient squared (the reference).

    Returns:
      An ``optax.FactoredState`` usable as ``opt_state`` with correction='adafactor'.

    Raises:
      ValueError: if ``batches`` is empty or ``method`` unknown.
    """
    if method not in ('taps', 'per_example'):
        raise ValueError(f"method must be 'taps' or 'per_example', got {method!r}.")
    params = nn.unbox(params)
    flat = kernel.tree_by_path(params)
    dense = frozenset()
    if method == 'taps':
        dense = frozenset(
            p
            for p in kernel.discover_dense_kernels(model, params, 8)
            if flat[p].ndim == 2
            and _factored(tuple(flat[p].shape), factored, min_dim_size_to_factor)
        )

    def example_loss(p, toks, mask):
        logits = model.apply({'params': p}, toks[None])
        return losses.example_losses(logits, toks[None], mask[None])[0]

    @jax.jit
    def sum_sq(p, toks, mask):
        if method == 'taps':
            return kernel.squared_gradient_sums_batch(model, p, toks, mask, dense)
        g = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(p, toks, mask)
        sq = jax.tree.map(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)), axis=0), g)
        return {path: (v,) for path, v in kernel.tree_by_path(sq).items()}

    total, count, start = None, 0, time.time()
    for batch in batches:
        toks = np.asarray(batch['tokens'], np.int32)
        mask = np.asarray(batch['loss_mask'], np.float32)
        # Causal model: positions after an example's last target cannot change its loss,
        # so each chunk is cut to its longest example (rounded up to a power of two, so
        # few shapes compile) after sorting by length: short passages cost their length.
        lengths = np.array([np.flatnonzero(m).max() + 1 if m.any() else 1 for m in mask])
        order = np.argsort(lengths, kind='stable')
        for s in range(0, len(toks), chunk_size):
            rows = order[s : s + chunk_size]
            cut = examples_lib.bucket_length(int(lengths[rows].max()), toks.shape[1])
            part = sum_sq(params, toks[rows, :cut], mask[rows, :cut])
            total = part if total is None else jax.tree.map(jnp.add, total, part)
            count += len(rows)
            if (s // chunk_size) % 8 == 7:
                logging.info(
                    'estimate_second_moments: %d examples, %.1f examples/s',
                    count,
                    count / (time.time() - start),
                )
    if not count:
        raise ValueError('estimate_second_moments needs at least one example.')
    one = jnp.zeros((1,), jnp.float32)

    def split(path, leaf):
        shape, sums = tuple(leaf.shape), [x / count for x in total[path_str(path)]]
        if len(sums) == 2:  # (Σ over axis 1 [m], Σ over axis 0 [n]) of a tapped kernel
            d1, d0 = factored_axes(shape)
            mean_over = {1: sums[0] / shape[1], 0: sums[1] / shape[0]}
            return mean_over[d0], mean_over[d1], one
        if _factored(shape, factored, min_dim_size_to_factor):
            d1, d0 = factored_axes(shape)
            return jnp.mean(sums[0], axis=d0), jnp.mean(sums[0], axis=d1), one
        return one, one, sums[0]

    parts = jax.tree_util.tree_map_with_path(split, params)
    is_triple = lambda x: isinstance(x, tuple) and len(x) == 3  # noqa: E731
    pick = lambda i: jax.tree.map(lambda t: t[i], parts, is_leaf=is_triple)  # noqa: E731
    return optax.FactoredState(
        count=jnp.asarray(count, jnp.int32), v_row=pick(0), v_col=pick(1), v=pick(2)
    )


MOMENTS_DIR = 'second_moments'
_FIELDS = ('v_row', 'v_col', 'v')


def save_moments(directory: str, moments: optax.FactoredState, meta: Mapping[str, Any]) -> str:
    """Writes ``moments`` beside a checkpoint as ``<directory>/second_moments/``.

    The directory holds ``moments.npz`` (one array per field and parameter path) and
    ``meta.json`` (how they were estimated); it is written to a temporary name and renamed,
    so a crash never leaves a half-written estimate that loads. Only process 0 writes.

    Returns:
      The directory written.
    """
    from flax import traverse_util

    out = os.path.join(directory, MOMENTS_DIR)
    count = moments.count
    if isinstance(count, jax.Array) and not count.is_fully_addressable:
        count = count.addressable_data(0)  # a replicated scalar: any local copy
    arrays = {'count': np.asarray(count)}
    for field in _FIELDS:
        tree = multihost_utils.process_allgather(getattr(moments, field), tiled=True)
        for path, x in traverse_util.flatten_dict(tree, sep='/').items():
            arrays[f'{field}/{path}'] = np.asarray(x)
    if jax.process_index() == 0:
        tmp = f'{out}.tmp{os.getpid()}'
        os.makedirs(tmp, exist_ok=True)
        np.savez(os.path.join(tmp, 'moments.npz'), **arrays)
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump(
                {**meta, 'moments_sha256': _file_sha(os.path.join(tmp, 'moments.npz'))}, f, indent=1
            )
        # The old estimate is moved aside, not deleted, until the new one is in place:
        # a crash leaves one of them readable (load_moments also looks for the aside).
        old = f'{out}.old'
        if os.path.exists(out):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    return out


def _file_sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def load_moments(directory: str) -> tuple[optax.FactoredState, dict[str, Any]] | None:
    """(moments, meta) saved by :func:`save_moments` in ``directory``, or None if absent."""
    from flax import traverse_util

    root = os.path.join(directory, MOMENTS_DIR)
    if not os.path.exists(os.path.join(root, 'meta.json')) and os.path.exists(
        os.path.join(root + '.old', 'meta.json')
    ):
        root += '.old'  # a save was interrupted between its two renames
    if not os.path.exists(os.path.join(root, 'meta.json')):
        return None
    try:
        with open(os.path.join(root, 'meta.json')) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise RuntimeError(f'{root}/meta.json is cut short or changed ({e}).') from e
    npz = os.path.join(root, 'moments.npz')
    if 'moments_sha256' not in meta:
        raise RuntimeError(
            f'{root} was written without a checksum (by an older version): re-run '
            'launch/estimate_second_moments.py.'
        )
    if not os.path.exists(npz) or _file_sha(npz) != meta.get('moments_sha256'):
        raise RuntimeError(
            f'{npz} is missing or does not match the checksum in meta.json (deleted, cut '
            'short or changed): re-run launch/estimate_second_moments.py.'
        )
    fields: dict[str, dict[str, np.ndarray]] = {k: {} for k in _FIELDS}
    with np.load(os.path.join(root, 'moments.npz')) as z:
        count = z['count']
        for key in z.files:
            if key != 'count':
                field, path = key.split('/', 1)
                fields[field][path] = z[key]
    trees = {k: traverse_util.unflatten_dict(v, sep='/') for k, v in fields.items()}
    state = optax.FactoredState(count=jnp.asarray(count, jnp.int32), **trees)
    return state, meta


def with_moments(opt_state: Any, moments: optax.FactoredState) -> Any:
    """``opt_state`` with its Adafactor ``FactoredState`` replaced by ``moments``.

    Raises:
      ValueError: if ``opt_state`` has no FactoredState, or its structure differs (the
        moments were estimated with another ``min_dim_size_to_factor``).
    """
    found = []

    def swap(node):
        if isinstance(node, optax.FactoredState):
            if jax.tree.structure(node) != jax.tree.structure(moments) or any(
                a.shape != b.shape
                for a, b in zip(jax.tree.leaves(node), jax.tree.leaves(moments), strict=True)
            ):
                raise ValueError(
                    'The estimated second moments do not match the optimizer state '
                    '(estimated with another min_dim_size_to_factor?).'
                )
            found.append(True)
            return jax.tree.map(lambda old, new: jnp.asarray(new, old.dtype), node, moments)
        return node

    out = jax.tree.map(swap, opt_state, is_leaf=lambda n: isinstance(n, optax.FactoredState))
    if not found:
        raise ValueError('opt_state has no Adafactor FactoredState to replace.')
    return out
