"""Small-model references for influence functions: damped GGN / Hessian inverses and solvers.

The objective is the training loss of :mod:`trackstar_jax.losses` on one batch, the mean
of -log p over its N target tokens (``losses.mean_token_loss``)::

    J(θ) = (1/N) Σ_b Σ_t loss_mask[b, t] · -log p(tokens[b, t] | tokens[b, :t])

M is its Gauss-Newton matrix G = Jᵀ H_out J (J the Jacobian of the logits, H_out the
softmax cross-entropy Hessian diag(p) - ppᵀ per target position, weighted as in J(θ)) or
its exact Hessian H, and A = M + λI. Per-example gradients are of each example's *summed*
Loss(z) (the house convention of :mod:`trackstar_jax.losses` and the featurizer), so the
tutorial influence function (Koh & Liang 2017, negated so that higher = more helpful) is

    influence(q, m) = ∇Loss(q)ᵀ A⁻¹ ∇Loss(z_m)  ≈  -N · ΔLoss(q)

where ΔLoss(q) is the first-order change in the query loss when one more copy of z_m is
trained on: positive scores are proponents (training on z_m lowers the query loss).

Everything here is exact and dense or matrix-free on one host: it is the reference that
scalable approximations (EK-FAC, TrackStar's block-diagonal R) are checked against, not a
tool for real models. Run it under ``jax.enable_x64(True)`` for float64 references.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.flatten_util import ravel_pytree

from trackstar_jax import losses

MAX_DENSE_DIM = 20_000  # a float64 P x P matrix is 3.2 GB at this size
Mvp = Callable[[jax.Array], jax.Array]


class SolverDivergedError(RuntimeError):
    """An iterative solver's residual blew up or became non-finite (or A is not PD)."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (a jit key)
class Objective:
    """J(θ) on one batch, as a function of the flattened parameter vector θ.

    Attributes:
      logits_fn: (params pytree, tokens [B, T]) -> logits [B, T, V].
      theta: θ, the flattened parameters [P].
      unravel: [P] -> params pytree (from ``ravel_pytree``).
      tokens: int [B, T].
      loss_mask: [B, T], the convention of :mod:`trackstar_jax.losses`.
    """

    logits_fn: Callable[[Any, jax.Array], jax.Array]
    theta: jax.Array
    unravel: Callable[[jax.Array], Any]
    tokens: jax.Array
    loss_mask: jax.Array

    @property
    def dim(self) -> int:
        """P, the number of parameters."""
        return int(self.theta.size)

    def _logits(self, theta: jax.Array, tokens: jax.Array | None = None) -> jax.Array:
        # Only positions 0..T-2 predict a token (position t predicts token t+1).
        tokens = self.tokens if tokens is None else tokens
        return self.logits_fn(self.unravel(theta), tokens)[..., :-1, :]

    def _weights(self, dtype: Any) -> jax.Array:
        # Each target's weight in J(θ): its mask / N, aligned with _logits' positions.
        mask = self.loss_mask.astype(dtype)
        return mask[:, 1:] / jnp.maximum(jnp.sum(mask), 1.0)

    def loss(self, theta: jax.Array) -> jax.Array:
        """J(θ), the mean of -log p over the batch's target tokens."""
        logits = self._logits(theta)
        return jnp.sum(self._weights(logits.dtype) * _target_nll(logits, self.tokens[:, 1:]))

    def grad(self, theta: jax.Array) -> jax.Array:
        """∇J(θ) [P]."""
        return jax.grad(self.loss)(theta)

    def example_grads(self, theta: jax.Array) -> jax.Array:
        """∇Loss(z) [B, P] of every example's loss *summed* over its target tokens.

        Rows are the house per-example gradients; they sum to N · ∇J(θ).
        """

        def summed_loss(th, tokens, mask):
            logits = self._logits(th, tokens[None])[0]
            return jnp.sum(mask[1:].astype(logits.dtype) * _target_nll(logits, tokens[1:]))

        grad_one = jax.vmap(jax.grad(summed_loss), in_axes=(None, 0, 0))
        return grad_one(theta, self.tokens, self.loss_mask)

    def gnvp(self, v: jax.Array) -> jax.Array:
        """G v = Jᵀ H_out J v at θ, by one jvp and one vjp (J is never formed)."""
        logits, jv = jax.jvp(self._logits, (self.theta,), (v.astype(self.theta.dtype),))
        p = jax.nn.softmax(logits, axis=-1)
        # (diag(p) - ppᵀ) u per position, without forming the V x V matrix.
        h_jv = p * (jv - jnp.sum(p * jv, axis=-1, keepdims=True))
        h_jv = self._weights(logits.dtype)[..., None] * h_jv
        _, pullback = jax.vjp(self._logits, self.theta)
        return pullback(h_jv)[0]

    def hvp(self, v: jax.Array) -> jax.Array:
        """H v at θ, forward-over-reverse (a jvp of the gradient)."""
        return jax.jvp(self.grad, (self.theta,), (v.astype(self.theta.dtype),))[1]


def _target_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    # losses.target_log_probs casts to float32; this keeps the logits' dtype so the
    # references stay float64 under x64.
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def make_objective(
    model: Any, params: Any, batch: Mapping[str, np.ndarray | jax.Array]
) -> Objective:
    """The :class:`Objective` of a Flax LM (``model.apply({'params': p}, tokens)``) on a batch.

    Raises:
      ValueError: if ``batch`` breaks the loss convention.
    """
    losses.validate_batch(batch)
    theta, unravel = ravel_pytree(params)
    return Objective(
        logits_fn=lambda p, tokens: model.apply({'params': p}, tokens),
        theta=theta,
        unravel=unravel,
        tokens=jnp.asarray(batch['tokens']),
        loss_mask=jnp.asarray(batch['loss_mask']),
    )


def _dense(mvp: Mvp, dim: int, dtype: Any, what: str, chunk: int) -> np.ndarray:
    # Column i is mvp(e_i); lax.map in chunks bounds memory by chunk mvps, not P.
    if dim > MAX_DENSE_DIM:
        raise ValueError(
            f'A dense {what} has {dim}^2 entries; P = {dim} > {MAX_DENSE_DIM} is not a tiny '
            'model. Use the matrix-free products with lissa / conjugate_gradient.'
        )
    column = lambda i: mvp(jax.nn.one_hot(i, dim, dtype=dtype))
    cols = jax.lax.map(column, jnp.arange(dim), batch_size=min(chunk, dim))
    return np.asarray(cols, np.float64).T


def gauss_newton_matrix(obj: Objective, chunk: int = 64) -> np.ndarray:
    """The dense GGN G [P, P] (float64 copy of the objective's precision).

    Raises:
      ValueError: if P > MAX_DENSE_DIM.
    """
    return _dense(obj.gnvp, obj.dim, obj.theta.dtype, 'Gauss-Newton matrix', chunk)


def hessian_matrix(obj: Objective, chunk: int = 64) -> np.ndarray:
    """The dense exact Hessian H [P, P] of J(θ) (indefinite in general).

    Raises:
      ValueError: if P > MAX_DENSE_DIM.
    """
    return _dense(obj.hvp, obj.dim, obj.theta.dtype, 'Hessian', chunk)


def damping_value(
    matrix_or_trace: np.ndarray | float, relative: float, dim: int | None = None
) -> float:
    """λ = relative · trace(M) / P: damping relative to M's mean eigenvalue.

    ``matrix_or_trace`` is M itself or its trace (then ``dim`` = P is required).

    Raises:
      ValueError: on a missing ``dim``, a negative ``relative`` or a non-positive λ.
    """
    if np.ndim(matrix_or_trace) == 2:
        trace, dim = float(np.trace(matrix_or_trace)), np.shape(matrix_or_trace)[0]
    elif dim is None:
        raise ValueError('damping_value from a trace needs dim (P).')
    else:
        trace = float(matrix_or_trace)
    if relative < 0:
        raise ValueError(f'relative damping must be >= 0, got {relative}.')
    lam = relative * trace / dim
    if relative > 0 and not lam > 0:
        raise ValueError(f'trace(M) = {trace} <= 0: relative damping is undefined.')
    return lam


def explicit_inverse_hvp(matrix: np.ndarray, v: np.ndarray, damping: float) -> np.ndarray:
    """(M + λI)⁻¹ v for v [P] or [P, k], by a float64 Cholesky factorisation.

    Raises:
      ValueError: if M + λI is not positive definite (the exact Hessian of a non-convex
        loss often is not: raise λ or use the Gauss-Newton matrix).
    """
    m = np.asarray(matrix, np.float64)
    a = (m + m.T) / 2 + damping * np.eye(m.shape[0])  # symmetrise float round-off
    try:
        factor = np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        smallest = float(np.linalg.eigvalsh(a)[0])
        raise ValueError(
            f'M + λI (λ = {damping:.3g}) is not positive definite: smallest eigenvalue '
            f'{smallest:.3g}. Increase the damping or use the Gauss-Newton matrix.'
        ) from None
    return scipy.linalg.cho_solve((factor, True), np.asarray(v, np.float64))


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """An iterative solve of (M + λI) x = v.

    Attributes:
      x: the solution [P].
      num_steps: matrix-vector products taken by the iteration.
      relative_residual: ||v - (M + λI) x|| / ||v|| of the returned x.
      converged: whether relative_residual <= tol.
    """

    x: jax.Array
    num_steps: int
    relative_residual: float
    converged: bool


def lissa(
    mvp: Mvp,
    v: jax.Array,
    damping: float,
    scale: float,
    num_steps: int,
    tol: float = 0.0,
    divergence_threshold: float = 1e4,
) -> SolveResult:
    """LiSSA (Agarwal et al. 2017, as in Koh & Liang 2017) for (M + λI) x = v.

    h_0 = v, h_j = v + (1 - λ/s) h_{j-1} - M h_{j-1} / s, x = h / s. It converges iff
    every eigenvalue of (M + λI) / s lies in (0, 2): s must exceed λ_max(M + λI) / 2
    (s > λ_max is the usual safe choice), and M + λI must be positive definite.

    Stops after ``num_steps`` updates or once the relative residual is <= ``tol``.

    Raises:
      SolverDivergedError: if the relative residual exceeds ``divergence_threshold`` or
        is not finite (s too small, or M + λI not positive definite).
    """
    x, steps, res = _lissa_loop(mvp, v, damping, scale, num_steps, tol, divergence_threshold)
    return _result('LiSSA', x, steps, res, tol, divergence_threshold)


@functools.partial(jax.jit, static_argnames='mvp')
def _lissa_loop(mvp, v, damping, scale, num_steps, tol, threshold):
    v_norm = jnp.linalg.norm(v)
    # v - (M + λI) h / s is both x = h/s's residual and the LiSSA update h_{j} - h_{j-1}.
    residual = lambda h: v - (mvp(h) + damping * h) / scale
    rel = lambda r: jnp.linalg.norm(r) / jnp.where(v_norm > 0, v_norm, 1.0)

    def cond(state):
        _, r, j = state
        return (j < num_steps) & (rel(r) > tol) & (rel(r) <= threshold)  # NaN stops too

    def body(state):
        h, r, j = state
        h = h + r
        return h, residual(h), j + 1

    h, r, j = jax.lax.while_loop(cond, body, (v, residual(v), 0))
    return h / scale, j, rel(r)


def conjugate_gradient(
    mvp: Mvp, v: jax.Array, damping: float, tol: float = 1e-10, max_steps: int = 1000
) -> SolveResult:
    """Conjugate gradient on (M + λI) x = v from x = 0.

    Stops once the recurrence's relative residual is <= ``tol`` or after ``max_steps``;
    the reported residual is recomputed from x (one more product).

    Raises:
      SolverDivergedError: if a search direction has pᵀ(M + λI)p <= 0 (not positive
        definite) or the iteration becomes non-finite.
    """
    x, steps, bad = _cg_loop(mvp, v, damping, tol, max_steps)
    if bool(bad):
        raise SolverDivergedError(
            f'CG: M + λI (λ = {damping:.3g}) has non-positive curvature along a search '
            f'direction at step {int(steps) + 1}: it is not positive definite.'
        )
    v_norm = float(jnp.linalg.norm(v))
    res = float(jnp.linalg.norm(v - mvp(x) - damping * x)) / (v_norm or 1.0)
    return _result('CG', x, steps, res, tol, np.inf)


@functools.partial(jax.jit, static_argnames='mvp')
def _cg_loop(mvp, v, damping, tol, max_steps):
    apply = lambda p: mvp(p) + damping * p
    stop = (tol * jnp.linalg.norm(v)) ** 2

    def cond(state):
        _, _, _, rs, j, bad = state
        return (j < max_steps) & (rs > stop) & ~bad

    def body(state):
        x, r, p, rs, j, _ = state
        ap = apply(p)
        curvature = p @ ap
        bad = ~(curvature > 0) | ~jnp.isfinite(curvature)  # stop before using it
        alpha = jnp.where(bad, 0.0, rs / jnp.where(bad, 1.0, curvature))
        x, r = x + alpha * p, r - alpha * ap
        rs_new = r @ r
        p = r + (rs_new / jnp.where(rs > 0, rs, 1.0)) * p
        return x, r, p, rs_new, j + jnp.where(bad, 0, 1), bad

    zero = jnp.zeros_like(v)
    init = (zero, v, v, v @ v, 0, jnp.array(False))
    x, _, _, _, j, bad = jax.lax.while_loop(cond, body, init)
    return x, j, bad


def _result(name, x, steps, res, tol, threshold) -> SolveResult:
    res = float(res)
    if not np.isfinite(res) or res > threshold:
        raise SolverDivergedError(
            f'{name} diverged after {int(steps)} steps: relative residual {res:.3g}. For '
            'LiSSA raise the scale (s > λ_max(M + λI)); M + λI must be positive definite.'
        )
    return SolveResult(x, int(steps), res, res <= tol)


def influence(
    query_grads: jax.Array | np.ndarray,
    train_grads: jax.Array | np.ndarray,
    inverse_hvp: Callable[[np.ndarray], np.ndarray | jax.Array],
) -> np.ndarray:
    """Scores [n_query, n_train]: qᵀ (M + λI)⁻¹ g_m for every query q and example m.

    ``inverse_hvp`` maps v [P] to (M + λI)⁻¹ v, e.g.
    ``lambda v: explicit_inverse_hvp(G, v, lam)`` or
    ``lambda v: conjugate_gradient(obj.gnvp, v, lam).x``. A is symmetric, so it is applied
    once per query. Positive = proponent: training on m lowers the query loss (module
    docstring; the gradients are of summed per-example losses, see
    :meth:`Objective.example_grads`).
    """
    queries = np.asarray(query_grads, np.float64)
    solved = np.stack([np.asarray(inverse_hvp(q), np.float64) for q in queries])
    return solved @ np.asarray(train_grads, np.float64).T
