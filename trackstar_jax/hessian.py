"""Block-diagonal Gauss-Newton R, task-specific mixing, and R^-1/2 (paper §3, §A.2.3).

    R_b = mean_i φ_{i,b} φ_{i,b}ᵀ                 (d_b x d_b per block b)
    R   = λ R_eval + (1 − λ) R_train
    R^-1/2 per block from eigh, with damping δ_b = damping · mean eigenvalue of R_b

R_train comes from the train index, R_eval from the query index, each in one
streaming pass sharded over the mesh (per-device partial sums, all-reduced by XLA).

λ = 'auto': the sorted (descending, all blocks pooled) eigenvalue curves of λR_eval and
(1 − λ)R_train cross at component k, k = top_k_components · D / 65536 (the paper's
1000 of 2^16), i.e. λ = e_train[k] / (e_eval[k] + e_train[k]): the top ~k task-specific
directions are down-weighted, the rest are left to R_train.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from absl import logging
from jax.sharding import Mesh

from trackstar_jax import index as index_lib
from trackstar_jax import sharding as shd
from trackstar_jax import streaming

PAPER_DIM = 65536


@dataclasses.dataclass
class Hessian:
    """R^-1/2 per block, with how it was chosen.

    Attributes:
      r_inv_sqrt: float32 [num_blocks, d_b, d_b], symmetric.
      lam: the mixing weight λ of R_eval.
      k_component: the component at which λ was matched (None if λ was given).
      damping: relative damping (times each block's mean eigenvalue).
      eig_train: descending eigenvalues of R_train, all blocks pooled [D].
      eig_eval: the same for R_eval, or None without queries.
      manifest: the vector-defining entries of the train index's manifest.
    """

    r_inv_sqrt: np.ndarray
    lam: float
    k_component: int | None
    damping: float
    eig_train: np.ndarray
    eig_eval: np.ndarray | None
    manifest: dict[str, Any]

    @property
    def num_blocks(self) -> int:
        """Number of blocks."""
        return self.r_inv_sqrt.shape[0]

    def apply(self, vectors: np.ndarray | jax.Array) -> jax.Array:
        """R^-1/2 · v for each row of ``vectors`` [n, D] -> float32 [n, D]."""
        return apply_blocks(jnp.asarray(self.r_inv_sqrt), jnp.asarray(vectors, jnp.float32))

    def save(self, path: str) -> None:
        """Writes R^-1/2 (zarr3), eigenvalue curves (npz), metadata (json) and a plot."""
        os.makedirs(path, exist_ok=True)
        store = ts.open(
            index_lib._array_spec(
                os.path.join(path, 'r_inv_sqrt'),
                self.r_inv_sqrt.shape,
                (1, *self.r_inv_sqrt.shape[1:]),
                'float32',
            ),
            create=True,
            delete_existing=True,
        ).result()
        store.write(self.r_inv_sqrt.astype(np.float32)).result()
        curves = {'eig_train': self.eig_train}
        if self.eig_eval is not None:
            curves['eig_eval'] = self.eig_eval
        np.savez(os.path.join(path, 'eigenvalues.npz'), **curves)
        meta = {
            'lam': self.lam,
            'k_component': self.k_component,
            'damping': self.damping,
            'manifest': self.manifest,
            'shape': list(self.r_inv_sqrt.shape),
        }
        index_lib._atomic_write(os.path.join(path, 'hessian.json'), json.dumps(meta, indent=1))
        plot_eigenvalues(self, os.path.join(path, 'eigenvalues.png'))


def load(path: str) -> Hessian:
    """Reads a Hessian written by :meth:`Hessian.save`."""
    with open(os.path.join(path, 'hessian.json')) as f:
        meta = json.load(f)
    store = ts.open(
        {
            'driver': 'zarr3',
            'kvstore': {'driver': 'file', 'path': os.path.join(path, 'r_inv_sqrt')},
        },
        open=True,
    ).result()
    curves = np.load(os.path.join(path, 'eigenvalues.npz'))
    return Hessian(
        np.asarray(store.read().result()),
        meta['lam'],
        meta['k_component'],
        meta['damping'],
        curves['eig_train'],
        curves['eig_eval'] if 'eig_eval' in curves else None,
        meta['manifest'],
    )


def apply_blocks(mats: jax.Array, vectors: jax.Array) -> jax.Array:
    """Block-diagonal product: vectors [n, B*d] times symmetric mats [B, d, d]."""
    nb, d, _ = mats.shape
    v = vectors.reshape(vectors.shape[0], nb, d)
    out = jnp.einsum('nbi,bij->nbj', v, mats, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(vectors.shape)


def autocorrelation(
    path: str, *, mesh: Mesh | None = None, chunk_rows: int = 1024
) -> tuple[np.ndarray, int]:
    """(sum_i φ_{i,b} φ_{i,b}ᵀ per block [B, d_b, d_b] float64, N) in one streaming pass."""
    idx = index_lib.open(path)
    mesh = mesh or streaming.default_mesh()
    nb = len(idx.manifest['layout']['block_names'])
    db = idx.manifest['layout']['block_dim']

    @jax.jit
    def add(acc, vecs):
        v = vecs.reshape(vecs.shape[0], nb, db)
        return acc + jnp.einsum('nbi,nbj->bij', v, v, precision=jax.lax.Precision.HIGHEST)

    acc = jax.device_put(jnp.zeros((nb, db, db), jnp.float32), shd.replicated(mesh))
    t0 = time.time()
    for i, (vecs, *_) in enumerate(streaming.stream_rows(idx, mesh, chunk_rows)):
        jax.block_until_ready(acc)  # at most two chunks in flight: flat memory
        acc = add(acc, vecs)  # padding rows are zero: they add nothing
        if i % 16 == 0:
            done = min((i + 1) * chunk_rows, len(idx))
            logging.info(
                'R from %s: %d/%d rows, %.0f rows/s',
                path,
                done,
                len(idx),
                done / max(time.time() - t0, 1e-9),
            )
    return np.asarray(jax.device_get(acc), np.float64), len(idx)


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


def _sorted_eigs(r_blocks: np.ndarray) -> np.ndarray:
    return np.sort(np.concatenate([np.linalg.eigvalsh(r) for r in r_blocks]))[::-1]


def fit(
    train_path: str,
    query_path: str | None = None,
    *,
    lam: float | str = 'auto',
    top_k_components: int = 1000,
    damping: float = 0.01,
    mesh: Mesh | None = None,
    chunk_rows: int = 1024,
) -> Hessian:
    """Fits R_train (and R_eval from the queries), mixes them and inverts.

    Args:
      train_path: the train index.
      query_path: the query index (for the task-specific R_eval); None uses R_train only.
      lam: λ in [0, 1] or 'auto' (needs query_path).
      top_k_components: the crossing component for λ='auto', relative to D = 65536.
      damping: relative damping of each block's spectrum.
      mesh: the mesh to shard the pass over (default: all devices along data).
      chunk_rows: rows streamed per step.

    Raises:
      ManifestMismatchError: if the two indices are not comparable.
      ValueError: on a bad λ.
    """
    train = index_lib.open(train_path)
    r_train_sum, n_train = autocorrelation(train_path, mesh=mesh, chunk_rows=chunk_rows)
    r_train = r_train_sum / n_train
    eig_train = _sorted_eigs(r_train)
    eig_eval, k_component = None, None
    if query_path is None:
        if lam != 'auto' and lam != 0.0:
            raise ValueError('A non-zero λ needs query_path (R_eval comes from queries).')
        lam_value, r = 0.0, r_train
    else:
        queries = index_lib.open(query_path)
        index_lib.check_compatible(train.manifest, queries.manifest, '(train vs query)')
        r_eval_sum, n_eval = autocorrelation(query_path, mesh=mesh, chunk_rows=chunk_rows)
        r_eval = r_eval_sum / n_eval
        eig_eval = _sorted_eigs(r_eval)
        if lam == 'auto':
            k_component = max(1, round(top_k_components * train.dim / PAPER_DIM))
            if k_component > min(n_train, n_eval):
                # Beyond the rank of R_train or R_eval both curves are ~0 there and the
                # crossing, hence λ, is noise: say so rather than fail.
                logging.warning(
                    'λ auto: component k = %d exceeds the %d train / %d query '
                    'examples (the rank of R); λ is ill-determined. Pass a '
                    'fixed lam or more queries.',
                    k_component,
                    n_train,
                    n_eval,
                )
            lam_value = auto_lambda(eig_eval, eig_train, k_component)
        elif isinstance(lam, str) or not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must be in [0, 1] or 'auto', got {lam!r}.")
        else:
            lam_value = float(lam)
        r = lam_value * r_eval + (1.0 - lam_value) * r_train
    logging.info(
        'Hessian: λ = %.6f (k = %s), damping %.3g, %d blocks of %d.',
        lam_value,
        k_component,
        damping,
        r.shape[0],
        r.shape[1],
    )
    manifest = {k: train.manifest[k] for k in index_lib.VECTOR_KEYS}
    return Hessian(
        inverse_sqrt(r, damping).astype(np.float32),
        lam_value,
        k_component,
        damping,
        eig_train,
        eig_eval,
        manifest,
    )


def plot_eigenvalues(h: Hessian, path: str) -> str | None:
    """PNG of the eigenvalue curves λR_eval, (1 − λ)R_train and the crossing."""
    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning(
            'matplotlib is not installed (pip install trackstar_jax[eval]); no eigenvalue plot.'
        )
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(1, len(h.eig_train) + 1)
    ax.loglog(x, np.maximum((1 - h.lam) * h.eig_train, 1e-30), label='(1-λ) R_train')
    if h.eig_eval is not None:
        ax.loglog(x, np.maximum(h.lam * h.eig_eval, 1e-30), label='λ R_eval')
        ax.loglog(x, np.maximum(h.eig_eval, 1e-30), ':', alpha=0.5, label='R_eval')
    ax.loglog(x, np.maximum(h.eig_train, 1e-30), ':', alpha=0.5, label='R_train')
    if h.k_component:
        ax.axvline(h.k_component, color='k', lw=0.8, ls='--', label=f'k = {h.k_component}')
    ax.set_xlabel('component (descending)')
    ax.set_ylabel('eigenvalue')
    ax.set_title(f'λ = {h.lam:.4g}')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
