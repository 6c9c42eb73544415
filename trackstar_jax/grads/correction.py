"""Optimizer second-moment correction: ∇θ Loss / sqrt(V), read from the optimizer state.

* ``'adafactor'``: optax's ``FactoredState``. For a factored parameter (both of its two
  largest dims >= optax's ``min_dim_size_to_factor``) optax keeps ``v_row`` (the
  mean of g² over the largest dim d0, so it lives on the second-largest dim d1) and
  ``v_col`` (mean over d1, living on d0), and scales updates by
  ``(v_row / mean(v_row))^-1/2`` on d1 and ``v_col^-1/2`` on d0. So
  V = v_row v_colᵀ / mean(v_row) and 1/sqrt(V) = D_r ∇W D_c: two diagonal scalings
  that commute into the projection (the fused kernel needs nothing else).
  Which params are factored is inferred from the state's shapes; which axis is "row"
  from optax's own rule (argsort of the shape), checked against those shapes.
  Unfactored params (vectors, small matrices) keep a full ``v``: elementwise.
* ``'adam'``: ``ScaleByAdamState.nu``, elementwise (no bias correction: it is one
  global scalar, which unit normalisation and rankings ignore).
* ``'none'``: identity.

V is floored at ``EPS`` before the inverse square root, as optax adds 1e-30 to g².
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from trackstar_jax.grads.layout import Layout, path_str

EPS = 1e-30
CORRECTIONS = ('adafactor', 'adam', 'none')


@flax.struct.dataclass
class ParamCorrection:
    """The correction of one parameter (arrays are float32 device arrays or None).

    kind 'rank_one': the gradient viewed as (m, n) is scaled by row[:, None] * col[None].
    kind 'elementwise': scaled by ``full`` (the parameter's shape).
    kind 'none': unscaled.
    """

    kind: str = flax.struct.field(pytree_node=False)
    row: jax.Array | None = None
    col: jax.Array | None = None
    full: jax.Array | None = None


def _find_state(opt_state: Any, cls: type) -> Any:
    found = []

    def visit(node):
        if isinstance(node, cls):
            found.append(node)
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)
        elif hasattr(node, 'inner_state'):
            visit(node.inner_state)

    visit(opt_state)
    if len(found) != 1:
        raise ValueError(
            f'Expected exactly one {cls.__name__} in the optimizer state, '
            f'found {len(found)}. Pass correction="none" or an estimate from '
            'grads.estimate_second_moments.'
        )
    return found[0]


def _by_path(tree: Any) -> dict[str, Any]:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def factored_axes(shape: tuple[int, ...]) -> tuple[int, int]:
    """optax's (d1, d0): the second-largest and largest dims of ``shape``."""
    sorted_dims = np.argsort(shape)
    return int(sorted_dims[-2]), int(sorted_dims[-1])


def _adafactor_param(shape: tuple[int, ...], v_row, v_col, v, path: str) -> ParamCorrection:
    shape = tuple(shape)
    if len(shape) >= 2:
        d1, d0 = factored_axes(shape)
        row_shape = tuple(s for i, s in enumerate(shape) if i != d0)
        col_shape = tuple(s for i, s in enumerate(shape) if i != d1)
        if tuple(v_row.shape) == row_shape and tuple(v_col.shape) == col_shape and v.size == 1:
            v_row = jnp.asarray(v_row, jnp.float32)
            v_col = jnp.asarray(v_col, jnp.float32)
            reduced_d1 = d1 - 1 if d1 > d0 else d1
            row_factor = jax.lax.rsqrt(
                jnp.maximum(v_row / jnp.mean(v_row, axis=reduced_d1, keepdims=True), EPS)
            )
            col_factor = jax.lax.rsqrt(jnp.maximum(v_col, EPS))
            if len(shape) == 2:
                # row_factor lives on d1, col_factor on d0.
                on_axis = {d1: row_factor, d0: col_factor}
                return ParamCorrection('rank_one', row=on_axis[0], col=on_axis[1])
            full = jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
            return ParamCorrection('elementwise', full=full)
    if tuple(v.shape) != shape:
        raise ValueError(
            f'Adafactor state for {path} has v {v.shape}, v_row {v_row.shape}, '
            f'v_col {v_col.shape}: neither factored nor full for a parameter '
            f'of shape {shape}. Is this the state of these params?'
        )
    return ParamCorrection(
        'elementwise', full=jax.lax.rsqrt(jnp.maximum(jnp.asarray(v, jnp.float32), EPS))
    )


def param_corrections(
    layout: Layout, correction: str, opt_state: Any | None
) -> dict[str, ParamCorrection]:
    """The correction of every non-excluded parameter, keyed by path.

    Args:
      layout: the parameter layout.
      correction: one of 'adafactor', 'adam', 'none'.
      opt_state: the optax state of these params (or an ``estimate_second_moments``
        result); required unless correction is 'none'. Boxed leaves (an optimizer
        initialised on ``nn.LogicallyPartitioned`` params) are unboxed, as the params are.

    Raises:
      ValueError: for an unknown correction, a missing state, or a state that does not
        match the params.
    """
    if correction not in CORRECTIONS:
        raise ValueError(f'correction must be one of {CORRECTIONS}, got {correction!r}.')
    entries = [e for e in layout.entries if not e.excluded]
    if correction == 'none':
        return {e.path: ParamCorrection('none') for e in entries}
    if opt_state is None:
        raise ValueError(
            f'correction={correction!r} needs opt_state (or use '
            'grads.estimate_second_moments for checkpoints without one).'
        )
    # optax maps over the arrays inside boxes, so a state initialised on boxed params
    # holds boxes too: unbox it exactly as the params are unboxed, so the paths agree.
    opt_state = nn.unbox(opt_state)
    out = {}
    if correction == 'adafactor':
        state = _find_state(opt_state, optax.FactoredState)
        rows, cols, vs = _by_path(state.v_row), _by_path(state.v_col), _by_path(state.v)
        for e in entries:
            if e.path not in vs:
                raise ValueError(f'No Adafactor state for parameter {e.path}.')
            out[e.path] = _adafactor_param(e.shape, rows[e.path], cols[e.path], vs[e.path], e.path)
        return out
    state = _find_state(opt_state, optax.ScaleByAdamState)
    nus = _by_path(state.nu)
    for e in entries:
        if e.path not in nus or tuple(nus[e.path].shape) != e.shape:
            raise ValueError(f'No Adam nu of shape {e.shape} for parameter {e.path}.')
        out[e.path] = ParamCorrection(
            'elementwise',
            full=jax.lax.rsqrt(jnp.maximum(jnp.asarray(nus[e.path], jnp.float32), EPS)),
        )
    return out
