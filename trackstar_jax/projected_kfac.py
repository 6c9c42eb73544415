"""K-FAC and EK-FAC in the index's projected space: a Kronecker-factored second moment.

A block of an index row is a side x side matrix G (``P0 W P1ᵀ`` summed over the block's
matrices, see :mod:`trackstar_jax.grads.layout`; row-major, so ``vec(A G Bᵀ) = (A ⊗ B)
vec(G)``). Over the N rows of a train index, per block b:

    L_b = mean_n G_n G_nᵀ,   R_b = mean_n G_nᵀ G_n          (side x side, one pass)
    K-FAC:   F_b ≈ (L_b ⊗ R_b) / mean_n ‖G_n‖²,  eigenvalues l_i r_j / mean_n ‖G_n‖²
    EK-FAC:  F_b ≈ (U_L ⊗ U_R) diag(Λ*) (U_L ⊗ U_R)ᵀ,
             Λ*_ij = mean_n ((U_Lᵀ G_n U_R)_ij)²             (a second pass)

with L_b = U_L diag(l) U_Lᵀ and R_b = U_R diag(r) U_Rᵀ. The division by mean ‖G‖² gives
both forms the trace of the exact second moment E[vec G vec Gᵀ]; EK-FAC's Λ* is that
moment's exact diagonal in the Kronecker eigenbasis (George et al. 2018). The map applied
to both sides of a score is

    M_b v = U_L [(U_Lᵀ G U_R) / sqrt(Λ + λ_b)] U_Rᵀ = (F_b + λ_b I)^-1/2 v,

so an unnormalised score is q (F + λI)⁻¹ m, the influence-function form; damping is
relative, λ_b = ``damping`` · mean(Λ) per block (= damping · mean_n ‖G_n‖² / d_b for
both forms), so a global scale of the index changes no ranking.

Why these factors and not K-FAC's per-token ones (``A = E[a aᵀ]``, ``S = E[s sᵀ]``, in
:mod:`trackstar_jax.kfac`): the index holds one summed, projected gradient per example,
and a block sums several matrices' independent projections, so per-token activation and
output-gradient factors do not exist in this space. The one-sided moments are what
Shampoo-style methods use; for a block of one matrix and examples of one position
(G = ã s̃ᵀ) they are K-FAC's factors up to scale. EK-FAC's correction removes the
dependence on how good the Kronecker guess is along the basis' diagonal; the fit records
how far K-FAC's eigenvalues are from Λ* (``kfac_eigenvalue_error``), a measure of how
Kronecker-structured the blocks are.

Cost per block, against the block R^-1/2 of TrackStar (d_b = side²): 3 side² floats
stored instead of side⁴, 4 side³ multiply-adds per vector instead of 2 side⁴, and one
(K-FAC) or two (EK-FAC) streaming passes of N · 2 side³ each, sharded as
:func:`hessian.autocorrelation` is (per-device partial sums, one reduction per pass).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trackstar_jax import hessian, streaming
from trackstar_jax import sharding as shd
from trackstar_jax.index import Index

HIGHEST = jax.lax.Precision.HIGHEST


def block_shape(idx: Index) -> tuple[int, int]:
    """(number of blocks, side) of an index whose blocks are side x side matrices.

    Raises:
      ValueError: a block_dim that is not a square.
    """
    nb = len(idx.manifest['layout']['block_names'])
    db = int(idx.manifest['layout']['block_dim'])
    side = int(round(db**0.5))
    if side * side != db:
        raise ValueError(f'Block dim {db} is not a square: the Kronecker kinds need side² blocks.')
    return nb, side


def _as_matrices(vecs: jax.Array, nb: int, side: int) -> jax.Array:
    return vecs.astype(jnp.float32).reshape(vecs.shape[0], nb, side, side)


def _one_sided(vecs, nb, side):
    g = _as_matrices(vecs, nb, side)
    left = jnp.einsum('nbij,nbkj->bik', g, g, precision=HIGHEST)
    right = jnp.einsum('nbji,nbjk->bik', g, g, precision=HIGHEST)
    return jnp.stack([left, right])


def _rotated_squares(vecs, nb, side, u_left, u_right):
    g = _as_matrices(vecs, nb, side)
    rot = jnp.einsum('bia,nbij,bjc->nbac', u_left, g, u_right, precision=HIGHEST)
    return jnp.sum(rot * rot, axis=0)


@functools.cache
def _accumulator(mesh: Mesh, nb: int, side: int, which: str) -> Callable:
    """The jit step adding one chunk into per-device partial sums (no collective per chunk)."""
    fn = {'one_sided': _one_sided, 'rotated': _rotated_squares}[which]
    extra = 2 if which == 'rotated' else 0

    def local(acc, vecs, *bases):
        return acc + fn(vecs, nb, side, *bases)[None]

    step = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(shd.DATA), P(shd.DATA, None), *([P()] * extra)),
        out_specs=P(shd.DATA),
        check_vma=False,
    )
    return jax.jit(step, donate_argnums=0)


def _stream_sum(
    idx: Index, mesh: Mesh, chunk_rows: int, which: str, shape: tuple[int, ...], *bases
) -> np.ndarray:
    nb, side = block_shape(idx)
    acc = jax.jit(
        lambda: jnp.zeros((mesh.shape[shd.DATA], *shape), jnp.float32),
        out_shardings=NamedSharding(mesh, P(shd.DATA)),
    )()
    step = _accumulator(mesh, nb, side, which)
    placed = [jax.device_put(np.asarray(b, np.float32), shd.replicated(mesh)) for b in bases]
    t0 = time.time()
    for i, (vecs, *_) in enumerate(streaming.stream_rows(idx, mesh, chunk_rows)):
        jax.block_until_ready(acc)  # at most two chunks in flight
        acc = step(acc, vecs, *placed)  # padding rows are zero: they add nothing
        if i % 16 == 0:
            done = min((i + 1) * vecs.shape[0], len(idx))
            logging.info(
                'Kronecker %s pass over %s: %d/%d rows, %.0f rows/s',
                which,
                idx.path,
                done,
                len(idx),
                done / max(time.time() - t0, 1e-9),
            )
    return np.asarray(jax.device_get(hessian.combine_partials(mesh)(acc)), np.float64)


def _eigh(mats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    evals, evecs = np.linalg.eigh((mats + np.swapaxes(mats, -1, -2)) / 2)
    return np.maximum(evals, 0.0), evecs


def fit(
    train: Index,
    *,
    eigenvalue_correction: bool,
    damping: float,
    mesh: Mesh | None = None,
    chunk_rows: int = 1024,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The arrays of M = (F + λI)^-1/2 per block, and facts about the fit.

    Args:
      train: the index whose rows give the second moment.
      eigenvalue_correction: True for EK-FAC (a second pass), False for K-FAC.
      damping: relative damping (times each block's mean eigenvalue), > 0.
      mesh: the mesh (default: all devices along data).
      chunk_rows: rows streamed per step.

    Returns:
      ({'u_left', 'u_right': [B, side, side], 'scale': [B, side, side] 1/sqrt(Λ + λ_b)},
       {'damping', 'kfac_eigenvalue_error' (EK-FAC only)}), float32 arrays.

    Raises:
      ValueError: damping <= 0, an empty index, or blocks that are not square.
    """
    if not damping > 0:
        raise ValueError(f'damping must be > 0 (relative), got {damping}.')
    if len(train) == 0:
        raise ValueError(f'Index {train.path} has no rows to fit a second moment on.')
    mesh = mesh or streaming.default_mesh()
    nb, side = block_shape(train)
    n = len(train)
    sums = _stream_sum(train, mesh, chunk_rows, 'one_sided', (2, nb, side, side)) / n
    l_evals, u_left = _eigh(sums[0])
    r_evals, u_right = _eigh(sums[1])
    trace = np.maximum(np.trace(sums[0], axis1=-2, axis2=-1), np.finfo(np.float64).tiny)
    kfac = l_evals[:, :, None] * r_evals[:, None, :] / trace[:, None, None]
    info: dict[str, float] = {'damping': float(damping)}
    eigs = kfac
    if eigenvalue_correction:
        eigs = _stream_sum(train, mesh, chunk_rows, 'rotated', (nb, side, side), u_left, u_right)
        eigs = eigs / n
        info['kfac_eigenvalue_error'] = float(
            np.linalg.norm(kfac - eigs) / max(np.linalg.norm(eigs), np.finfo(np.float64).tiny)
        )
    lam = np.maximum(damping * eigs.mean(axis=(1, 2)), np.finfo(np.float64).tiny)
    scale = 1.0 / np.sqrt(eigs + lam[:, None, None])
    arrays = {
        'u_left': u_left.astype(np.float32),
        'u_right': u_right.astype(np.float32),
        'scale': scale.astype(np.float32),
    }
    return arrays, info


def apply(u_left: jax.Array, u_right: jax.Array, scale: jax.Array, vectors: jax.Array) -> jax.Array:
    """M v per row of ``vectors`` [n, B·side²]: U_L [(U_Lᵀ G U_R) · scale] U_Rᵀ per block."""
    nb, side, _ = u_left.shape
    g = vectors.reshape(vectors.shape[0], nb, side, side)
    rot = jnp.einsum('bia,nbij,bjc->nbac', u_left, g, u_right, precision=HIGHEST)
    out = jnp.einsum('bai,nbij,bcj->nbac', u_left, rot * scale[None], u_right, precision=HIGHEST)
    return out.reshape(vectors.shape)
