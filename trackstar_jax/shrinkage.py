"""R_eval shrunk toward R_train before mixing (the ``mixed_shrunk`` preconditioner).

TrackStar mixes R = λ R_eval + (1 − λ) R_train so that directions common to the queries
(a task template) are down-weighted. R_eval is a sample second moment of n query
vectors; with a few dozen queries most of it is each query's own gradient, and
down-weighting a query's own direction is what retrieval must not do. Per block b, the
sample moment S_b is replaced by

    S̃_b = α_b S_b + (1 − α_b) c R_train,b,     c = Σ_b tr S_b / Σ_b tr R_train,b

with the Ledoit-Wolf (2004) intensity toward the target T_b = c R_train,b (treated as
known: it comes from many more examples):

    α_b = 1 − min(β_b, δ_b) / δ_b,   δ_b = ‖S_b − T_b‖²_F,
    β_b = (1/n²) Σ_i ‖x_i x_iᵀ − S_b‖²_F

(x_i the query's block), i.e. the share of S_b's distance from the target that its
sampling noise does not explain. Directions many queries share survive (α near 1);
directions of single queries are noise to this estimate (α near 0). With α_b = 0 in
every block the mixture is a multiple of R_train, so its scores rank as R_train's do
(unit norm, relative damping): a small query set falls back to R_train, not below it.
λ 'auto' then reads its crossing off the shrunk curve.

Cost: O(n · d_b²) per block on the host (``xᵀ S x`` per query), float64.
"""

from __future__ import annotations

import numpy as np


def ledoit_wolf_intensity(
    r_eval: np.ndarray, r_train: np.ndarray, queries: np.ndarray
) -> tuple[np.ndarray, float]:
    """(α per block [B], the target scale c) for shrinking R_eval toward c R_train.

    Args:
      r_eval: the queries' mean second moment per block [B, d_b, d_b].
      r_train: R_train per block [B, d_b, d_b] (a mean).
      queries: the n query vectors [n, B·d_b] r_eval was computed from.

    Raises:
      ValueError: shapes that disagree, or no queries.
    """
    nb, db, _ = r_eval.shape
    x = np.asarray(queries, np.float64)
    n = len(x)
    if n == 0 or x.shape[1] != nb * db or r_train.shape != r_eval.shape:
        raise ValueError(
            f'Shrinkage needs queries [n >= 1, {nb * db}] and R_train of shape {r_eval.shape}; '
            f'got {x.shape} and {r_train.shape}.'
        )
    tr_train = float(np.trace(r_train, axis1=1, axis2=2).sum())
    scale = float(np.trace(r_eval, axis1=1, axis2=2).sum()) / max(tr_train, np.finfo(float).tiny)
    x = x.reshape(n, nb, db)
    alphas = np.zeros(nb)
    for b in range(nb):
        s, xb = r_eval[b], x[:, b]
        delta = float(np.sum((s - scale * r_train[b]) ** 2))
        sq = np.sum(xb * xb, axis=1)
        quad = np.einsum('ni,ij,nj->n', xb, s, xb)
        beta = float(np.sum(sq * sq - 2.0 * quad + np.sum(s * s))) / n**2
        alphas[b] = 0.0 if delta <= 0 else 1.0 - min(max(beta, 0.0), delta) / delta
    return alphas, scale


def shrink(r_eval: np.ndarray, r_train: np.ndarray, alphas: np.ndarray, scale: float) -> np.ndarray:
    """α_b R_eval,b + (1 − α_b) · scale · R_train,b per block."""
    a = np.asarray(alphas, np.float64)[:, None, None]
    return a * r_eval + (1.0 - a) * scale * r_train
