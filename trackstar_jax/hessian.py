"""Block-diagonal Gauss-Newton R, task-specific mixing, and R^-1/2 (paper §3, §A.2.3).

    R_b = mean_i φ_{i,b} φ_{i,b}ᵀ                 (d_b x d_b per block b)
    R   = λ R_eval + (1 − λ) R_train
    R^-1/2 per block from eigh, with damping δ_b = damping · mean eigenvalue of R_b

R_train comes from the train index, R_eval from the query index, each in one
streaming pass sharded over the mesh: every device keeps its own float32 partial sum
(no collective per chunk), the partials are summed once at the end of the pass, and
the eigendecompositions run in float64 on the host.

λ = 'auto': the sorted (descending, all blocks pooled) eigenvalue curves of λR_eval and
(1 − λ)R_train cross at component k, k = top_k_components · D / 65536 (the paper's
1000 of 2^16), i.e. λ = e_train[k] / (e_eval[k] + e_train[k]): the top ~k task-specific
directions are down-weighted, the rest are left to R_train.

This module is the math; :mod:`trackstar_jax.preconditioners` makes it a preconditioner.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trackstar_jax import sharding as shd
from trackstar_jax import streaming
from trackstar_jax.index import Index

PAPER_DIM = 65536


def apply_blocks(mats: jax.Array, vectors: jax.Array) -> jax.Array:
    """Block-diagonal product: vectors [n, B*d] times symmetric mats [B, d, d]."""
    nb, d, _ = mats.shape
    v = vectors.reshape(vectors.shape[0], nb, d)
    out = jnp.einsum('nbi,bij->nbj', v, mats, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(vectors.shape)


@functools.cache
def local_accumulator(mesh: Mesh, nb: int, db: int):
    """The jit step adding a chunk into per-device partial sums [data, B, d_b, d_b].

    Each device adds its own rows into its own partial sum (``shard_map``, no collective
    per chunk; the running sums are donated, so updated in place); the partials are
    combined once, at the end of the pass (:func:`autocorrelation`).
    """

    def local(acc, vecs):
        v = vecs.astype(jnp.float32).reshape(vecs.shape[0], nb, db)  # bf16 upcast here
        outer = jnp.einsum('nbi,nbj->bij', v, v, precision=jax.lax.Precision.HIGHEST)
        return acc + outer[None]

    step = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(shd.DATA), P(shd.DATA, None)),
        out_specs=P(shd.DATA),
        check_vma=False,
    )
    return jax.jit(step, donate_argnums=0)


@functools.cache
def combine_partials(mesh: Mesh):
    """The jit summing per-device partial sums [data, ...] into one replicated array."""
    return jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=shd.replicated(mesh))


MAX_FULL_DIM = 16384  # a float32 D x D R is 1 GiB at this size, per device


def autocorrelation(
    idx: Index, *, mesh: Mesh | None = None, chunk_rows: int = 1024, full: bool = False
) -> tuple[np.ndarray, int]:
    """(sum_i φ_{i,b} φ_{i,b}ᵀ per block [B, d_b, d_b] float64, N) in one streaming pass.

    ``full``: the whole D x D matrix as one block ([1, D, D]).

    Raises:
      ValueError: ``full`` with D > MAX_FULL_DIM.
    """
    mesh = mesh or streaming.default_mesh()
    nb = len(idx.manifest['layout']['block_names'])
    db = idx.manifest['layout']['block_dim']
    if full:
        if nb * db > MAX_FULL_DIM:
            raise ValueError(
                f'A full R of D = {nb * db} has {nb * db}^2 entries (> {MAX_FULL_DIM}^2): use '
                "the block-diagonal 'train' preconditioner or a smaller projection."
            )
        nb, db = 1, nb * db
    n_data = mesh.shape[shd.DATA]
    acc = jax.jit(
        lambda: jnp.zeros((n_data, nb, db, db), jnp.float32),
        out_shardings=NamedSharding(mesh, P(shd.DATA)),
    )()
    step = local_accumulator(mesh, nb, db)
    t0 = time.time()
    for i, (vecs, *_) in enumerate(streaming.stream_rows(idx, mesh, chunk_rows)):
        jax.block_until_ready(acc)  # at most two chunks in flight: flat memory
        acc = step(acc, vecs)  # padding rows are zero: they add nothing
        if i % 16 == 0:
            done = min((i + 1) * vecs.shape[0], len(idx))
            logging.info(
                'R from %s: %d/%d rows, %.0f rows/s',
                idx.path,
                done,
                len(idx),
                done / max(time.time() - t0, 1e-9),
            )
    # One reduction over the data axis for the whole pass, then float64 on the host.
    return np.asarray(jax.device_get(combine_partials(mesh)(acc)), np.float64), len(idx)


def auto_lambda(eig_eval: np.ndarray, eig_train: np.ndarray, k: int) -> float:
    """λ at which λ·eig_eval and (1 − λ)·eig_train (both descending) meet at index k."""
    k = int(np.clip(k, 1, min(len(eig_eval), len(eig_train)))) - 1
    e, t = float(eig_eval[k]), float(eig_train[k])
    if e + t <= 0:
        raise ValueError(f'Both spectra vanish at component {k + 1}; cannot choose λ.')
    return t / (e + t)


def inverse_sqrt(r_blocks: np.ndarray, damping: float) -> np.ndarray:
    """(R_b + δ_b I)^-1/2 per block, δ_b = damping · mean eigenvalue of R_b (float64)."""
    out = np.empty_like(r_blocks)
    for b, r in enumerate(r_blocks):
        evals, evecs = np.linalg.eigh((r + r.T) / 2)
        evals = np.maximum(evals, 0.0)
        delta = max(damping * float(evals.mean()), np.finfo(np.float64).tiny)
        out[b] = (evecs / np.sqrt(evals + delta)) @ evecs.T
    return out


def sorted_eigs(r_blocks: np.ndarray) -> np.ndarray:
    """Eigenvalues of every block, pooled and sorted descending."""
    return np.sort(np.concatenate([np.linalg.eigvalsh(r) for r in r_blocks]))[::-1]


def low_rank_sorted_eigs(vectors: np.ndarray, num_blocks: int) -> np.ndarray:
    """:func:`sorted_eigs` of R_b = Φ_bᵀ Φ_b / n, from the n x n Gram matrices Φ_b Φ_bᵀ / n.

    Both have the same non-zero eigenvalues and R_b's other d_b − n are 0, so for n < d_b
    (a query set smaller than a block, the usual case for R_eval) this replaces each
    d_b x d_b decomposition by an n x n one (float64 throughout).
    """
    n, d = vectors.shape
    db = d // num_blocks
    v = np.asarray(vectors, np.float64).reshape(n, num_blocks, db)
    eigs = [np.linalg.eigvalsh(v[:, b] @ v[:, b].T / n) for b in range(num_blocks)]
    pad = np.zeros(max(db - n, 0))
    return np.sort(np.concatenate([np.concatenate([e[-db:], pad]) for e in eigs]))[::-1]


def crossing_component(top_k_components: int, dim: int) -> int:
    """The component k at which λ auto matches the curves: top_k_components of 2^16, scaled."""
    return max(1, round(top_k_components * dim / PAPER_DIM))


def mix(
    r_train: np.ndarray,
    r_eval: np.ndarray | None,
    lam: float | str,
    top_k_components: int,
    n_train: int,
    n_eval: int,
    eig_eval: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
    """λ R_eval + (1 − λ) R_train, with λ given or 'auto'.

    ``eig_eval``: R_eval's pooled spectrum if the caller has it already (e.g. from
    :func:`low_rank_sorted_eigs`); otherwise it is computed from ``r_eval``.

    Returns:
      (R [B, d_b, d_b], {'lam', 'k_component'}, {'eig_train', 'eig_eval'} curves).

    Raises:
      ValueError: on a bad λ, or a non-zero λ without R_eval.
    """
    eig_train = sorted_eigs(r_train)
    if r_eval is None:
        if lam not in ('auto', 0, 0.0):
            raise ValueError(f'λ = {lam!r} needs a query index (R_eval comes from queries).')
        return r_train, {'lam': 0.0, 'k_component': None}, {'eig_train': eig_train}
    if eig_eval is None:
        eig_eval = sorted_eigs(r_eval)
    k_component = None
    if lam == 'auto':
        dim = r_train.shape[0] * r_train.shape[1]
        k_component = crossing_component(top_k_components, dim)
        rank = r_train.shape[0] * min(n_train, n_eval, r_train.shape[1])
        if k_component > rank:
            # Each block's R has rank <= min(n, d_b): past blocks x that, both pooled
            # curves are ~0 and the crossing, hence λ, is noise. Say so rather than fail.
            logging.warning(
                'λ auto: component k = %d exceeds the pooled rank of R (at most %d blocks x '
                'min(%d train / %d query examples, d_b %d) = %d); λ is ill-determined. Pass '
                'a fixed lam or more queries.',
                k_component,
                r_train.shape[0],
                n_train,
                n_eval,
                r_train.shape[1],
                rank,
            )
        lam_value = auto_lambda(eig_eval, eig_train, k_component)
    elif isinstance(lam, str) or not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1] or 'auto', got {lam!r}.")
    else:
        lam_value = float(lam)
    r = lam_value * r_eval + (1.0 - lam_value) * r_train
    info = {'lam': lam_value, 'k_component': k_component}
    return r, info, {'eig_train': eig_train, 'eig_eval': eig_eval}
