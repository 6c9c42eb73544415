"""Preconditioners: what is applied to both sides of a score, fit from indices.

    score(z_m, z_q) = ⟨M φ(z_m), M φ(z_q)⟩   (then optionally unit-normalised)

A preconditioner *kind* is registered once here, by name, with two functions:

* ``fit(train, queries, config, mesh) -> (arrays, info, diagnostics)`` reads indices
  (streamed, sharded) and returns the arrays ``apply`` needs, JSON-able facts about the
  fit (λ, damping, ...) and arrays that are only for people (eigenvalue curves);
* ``apply(arrays, vectors) -> vectors`` is a pure, jit-traceable function of the arrays
  and a [n, D] float32 batch. The scorer compiles it into its chunk step, once per kind
  and shape, and reuses that step across methods and chunks.

Registered kinds (the paper's variants, §3 and Table 1):

    none      identity (the ablations without R)
    diagonal  per-coordinate 1/sqrt(mean φ² + δ), from the train index
    train     block-diagonal R_train^-1/2
    mixed     block-diagonal (λ R_eval + (1 − λ) R_train)^-1/2, λ given or 'auto' (TrackStar)
    mixed_shrunk
              mixed, with R_eval first shrunk toward R_train by its sampling noise
              (Ledoit-Wolf, :mod:`trackstar_jax.shrinkage`), for small query sets
    full      (R_train + δI)^-1/2 over all D dims as one block (TRAK's (ΦᵀΦ)⁻¹)
    kfac_projected, ekfac_projected
              (F + λI)^-1/2 with F a Kronecker-factored second moment of each block
              (K-FAC; EK-FAC with the eigenvalue correction), :mod:`projected_kfac`

A kind registered with :func:`register` is usable by name in the fit and score jobs and
in the evaluation's Method table with no other change.

Saved layout under a URL: ``preconditioner.json`` (kind, info, the index manifest keys
it was fit on, and which array set is current) and ``arrays_<tag>/<name>`` zarr3 arrays.
A save writes a new array set first and switches ``preconditioner.json`` to it last, so
a crash leaves the old preconditioner readable.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from trackstar_jax import hessian, projected_kfac, shrinkage
from trackstar_jax import index as index_lib
from trackstar_jax import sharding as shd
from trackstar_jax.index import Index

FORMAT_VERSION = 2  # 2: per-array checksums
MAX_SHRINKAGE_QUERIES = 16384  # Ledoit-Wolf shrinkage holds every query vector on the host
Arrays = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How a preconditioner is fit.

    Attributes:
      preconditioner: the registered kind ('none', 'diagonal', 'train', 'mixed', ...).
      lam: λ of R_eval in the mixed kind, in [0, 1] or 'auto'.
      top_k_components: λ auto's crossing component, relative to D = 65536.
      damping: relative damping (times each block's mean eigenvalue; for 'diagonal',
        times the mean second moment).
      chunk_rows: index rows streamed per step.
    """

    preconditioner: str = 'mixed'
    lam: float | str = 'auto'
    top_k_components: int = 1000
    damping: float = 0.01
    chunk_rows: int = 1024


FitFn = Callable[
    [Index, Index | None, FitConfig, Mesh | None],
    tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]],
]
ApplyFn = Callable[[Arrays, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Kind:
    """A registered preconditioner kind.

    Attributes:
      name: the name jobs, gin files and Method rows use.
      fit: (train, queries, config, mesh) -> (arrays, info, diagnostics).
      apply: (arrays, vectors [n, D]) -> [n, D]; pure and jit-traceable.
      uses_queries: whether ``fit`` reads the query index (then it is required).
      description: one line for tables and errors.
      symmetric: ``apply`` is a symmetric linear map M, so (M q)·(M v) = (M² q)·v and
        scoring folds M into the queries instead of applying it to every train row.
    """

    name: str
    fit: FitFn
    apply: ApplyFn
    uses_queries: bool = False
    description: str = ''
    symmetric: bool = False


_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Makes ``kind`` available by name everywhere (fit/score jobs, evaluation)."""
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> Kind:
    """The registered kind ``name``; ValueError naming the known ones otherwise."""
    if name not in _KINDS:
        raise ValueError(f'Unknown preconditioner {name!r}; registered: {sorted(_KINDS)}.')
    return _KINDS[name]


def names() -> list[str]:
    """Registered kinds."""
    return sorted(_KINDS)


@dataclasses.dataclass
class Preconditioner:
    """A fit preconditioner.

    Attributes:
      kind: its registered kind.
      arrays: what ``apply`` reads (numpy).
      info: JSON-able facts about the fit (λ, damping, ...).
      manifest: the vector-defining keys of the index it was fit on.
      diagnostics: arrays for people (e.g. eigenvalue curves), not used to score.
    """

    kind: str
    arrays: dict[str, np.ndarray]
    info: dict[str, Any]
    manifest: dict[str, Any]
    diagnostics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    _digest: str | None = dataclasses.field(default=None, repr=False, compare=False)
    _on_device: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def apply(self, vectors: np.ndarray | jax.Array) -> jax.Array:
        """M · v for each row of ``vectors`` [n, D] -> float32 [n, D]."""
        arrays = {k: jnp.asarray(v) for k, v in self.arrays.items()}
        return get(self.kind).apply(arrays, jnp.asarray(vectors, jnp.float32))

    def digest(self) -> str:
        """A hash of the kind and the arrays: what keys per-index caches of ||M v||.

        Taken once per object (the arrays of a fit or loaded preconditioner are not
        changed in place): hashing a 16,384-dim block R^-1/2 costs about a second.
        """
        if self._digest is None:
            h = hashlib.sha256(self.kind.encode())
            for name in sorted(self.arrays):
                a = np.ascontiguousarray(np.asarray(self.arrays[name], np.float32))
                h.update(name.encode() + str(a.shape).encode() + a.tobytes())
            self._digest = h.hexdigest()[:20]
        return self._digest

    def device_arrays(self, mesh: Mesh) -> Any:
        """The arrays replicated on ``mesh``, staged once per (object, mesh) as the digest
        is taken once: a 4 x 4096² R^-1/2 is 268 MB, which every score call used to
        copy to the devices again."""
        if mesh not in self._on_device:
            self._on_device[mesh] = jax.device_put(self.arrays, shd.replicated(mesh))
        return self._on_device[mesh]

    def save(self, url: str) -> str:
        """Writes the preconditioner under ``url`` (atomically, see the module doc)."""
        store = index_lib.Store(url)
        everything = {**self.arrays, **{f'diag.{k}': v for k, v in self.diagnostics.items()}}
        h = hashlib.sha256(f'{self.kind}{time.time_ns()}'.encode())
        for name in sorted(everything):
            h.update(np.ascontiguousarray(everything[name]).tobytes())
        tag = f'arrays_{h.hexdigest()[:12]}'
        checksums = {}
        for name, value in everything.items():
            value = np.asarray(value)  # stored in its own dtype: a round trip is exact
            arr = store.create_array(f'{tag}/{name}', value.shape, value.shape, str(value.dtype))
            arr.write(value).result()
            checksums[name] = _checksum(value)
        old = (
            store.read_json('preconditioner.json') if store.exists('preconditioner.json') else None
        )
        meta = {
            'format_version': FORMAT_VERSION,
            'kind': self.kind,
            'info': self.info,
            'manifest': self.manifest,
            'arrays': tag,
            'names': sorted(self.arrays),
            'diagnostics': sorted(self.diagnostics),
            'sha256': checksums,
        }
        store.write_json('preconditioner.json', meta, indent=1)  # the switch
        if old and old.get('arrays') not in (None, tag):
            store.delete_prefix(old['arrays'] + '/')
        return url


def load(url: str) -> Preconditioner:
    """Reads a preconditioner written by :meth:`Preconditioner.save`."""
    store = index_lib.Store(url)
    if not store.exists('preconditioner.json'):
        raise FileNotFoundError(f'No preconditioner at {url} (no preconditioner.json).')
    meta = store.read_json('preconditioner.json')
    if meta.get('format_version') != FORMAT_VERSION:
        raise ValueError(
            f'Preconditioner {url} has format_version {meta.get("format_version")}; this '
            f'version reads {FORMAT_VERSION}. Re-run the fit job.'
        )
    get(meta['kind'])  # a kind this process knows

    def read(name: str) -> np.ndarray:
        # A deleted array file reads as TensorStore's fill value (zeros) and a changed
        # one as other numbers: both fail the checksum recorded at save.
        try:
            value = np.asarray(store.open_array(f'{meta["arrays"]}/{name}').read().result())
        except ValueError as e:  # missing or unparsable array metadata
            raise index_lib.IntegrityError(f'Preconditioner {url}: {name} unreadable ({e}).') from e
        if _checksum(value) != meta['sha256'][name]:
            raise index_lib.IntegrityError(
                f'Preconditioner {url}: {name} does not match the checksum written at save '
                '(a file was deleted, cut short or changed). Re-run the fit job.'
            )
        return value

    return Preconditioner(
        meta['kind'],
        {n: read(n) for n in meta['names']},
        meta['info'],
        meta['manifest'],
        {n: read(f'diag.{n}') for n in meta['diagnostics']},
    )


def _checksum(value: np.ndarray) -> str:
    value = np.ascontiguousarray(value)
    h = hashlib.sha256(f'{value.dtype}{value.shape}'.encode())
    h.update(value.tobytes())
    return h.hexdigest()[:24]


def identity(manifest: Mapping[str, Any]) -> Preconditioner:
    """The 'none' preconditioner for indices with ``manifest``."""
    return Preconditioner('none', {}, {}, _vector_keys(manifest))


def _vector_keys(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: manifest.get(k) for k in index_lib.VECTOR_KEYS}


def fit(
    train: Index,
    queries: Index | None = None,
    config: FitConfig = FitConfig(),
    mesh: Mesh | None = None,
) -> Preconditioner:
    """Fits ``config.preconditioner`` from a train index (and queries, if it uses them).

    Raises:
      ValueError: an unknown kind, or one that needs queries without them.
      ManifestMismatchError: train and query indices that are not comparable.
    """
    kind = get(config.preconditioner)
    if queries is not None:
        index_lib.check_compatible(train.manifest, queries.manifest, '(train vs query)')
    if kind.uses_queries and queries is None:
        raise ValueError(f'Preconditioner {kind.name!r} needs a query index.')
    arrays, info, diagnostics = kind.fit(
        train, queries if kind.uses_queries else None, config, mesh
    )
    if jax.process_count() > 1:
        # Every host ran the same float64 decompositions; take process 0's result rather
        # than assume they are bit-identical, so every host scores with the same M.
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        arrays = jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(arrays))
    logging.info('Preconditioner %s fit on %s: %s', kind.name, train.path, info)
    return Preconditioner(kind.name, arrays, info, _vector_keys(train.manifest), diagnostics)


# --- the registered kinds -------------------------------------------------------------


def _fit_none(train, queries, config, mesh):
    del train, queries, config, mesh
    return {}, {}, {}


def _apply_none(arrays, vectors):
    del arrays
    return vectors


def _fit_diagonal(train, queries, config, mesh):
    del queries
    r_sum, n = hessian.autocorrelation(train, mesh=mesh, chunk_rows=config.chunk_rows)
    second = np.concatenate([np.diag(b) for b in r_sum]) / n
    delta = max(config.damping * float(second.mean()), np.finfo(np.float64).tiny)
    inv = (1.0 / np.sqrt(second + delta)).astype(np.float32)
    return {'scale': inv}, {'damping': config.damping}, {}


def _apply_diagonal(arrays, vectors):
    return vectors * arrays['scale'][None, :]


def _fit_block(train, queries, config, mesh, shrink_eval=False):
    r_train, n_train = hessian.autocorrelation(train, mesh=mesh, chunk_rows=config.chunk_rows)
    r_train = r_train / n_train
    r_eval, n_eval, lam, eig_eval, shrunk = None, 0, 0.0, None, {}
    if queries is not None:
        r_eval, n_eval = hessian.autocorrelation(queries, mesh=mesh, chunk_rows=config.chunk_rows)
        r_eval, lam = r_eval / n_eval, config.lam
        nb, db = r_eval.shape[:2]
        if shrink_eval:
            r_eval, shrunk = _shrunk_eval(r_eval, r_train, queries)
        elif n_eval < db:  # R_eval's spectrum from the queries' Gram matrices: n^3, not d_b^3
            eig_eval = hessian.low_rank_sorted_eigs(queries.read(slice(0, n_eval)), nb)
    r, info, curves = hessian.mix(
        r_train, r_eval, lam, config.top_k_components, n_train, n_eval, eig_eval
    )
    info = {**info, 'damping': config.damping, **shrunk}
    return {'r_inv_sqrt': hessian.inverse_sqrt(r, config.damping).astype(np.float32)}, info, curves


def _shrunk_eval(r_eval, r_train, queries):
    if len(queries) > MAX_SHRINKAGE_QUERIES:
        raise ValueError(
            f"'mixed_shrunk' reads every query vector; {len(queries)} > "
            f"{MAX_SHRINKAGE_QUERIES}. With that many queries R_eval's sampling noise is "
            "small: use 'mixed'."
        )
    alphas, scale = shrinkage.ledoit_wolf_intensity(
        r_eval, r_train, queries.read(slice(0, len(queries)))
    )
    facts = {'shrinkage_alpha': [float(a) for a in alphas], 'shrinkage_target_scale': scale}
    return shrinkage.shrink(r_eval, r_train, alphas, scale), facts


def _apply_block(arrays, vectors):
    return hessian.apply_blocks(arrays['r_inv_sqrt'], vectors)


def _fit_full(train, queries, config, mesh):
    # TRAK's (ΦᵀΦ)⁻¹ (as R^-1/2 on both sides): one D x D block, no block-diagonal cut.
    del queries
    r, n = hessian.autocorrelation(train, mesh=mesh, chunk_rows=config.chunk_rows, full=True)
    inv = hessian.inverse_sqrt(r / n, config.damping).astype(np.float32)
    return {'r_inv_sqrt': inv}, {'damping': config.damping}, {}


register(Kind('none', _fit_none, _apply_none, description='identity', symmetric=True))
register(
    Kind(
        'diagonal',
        _fit_diagonal,
        _apply_diagonal,
        description='1/sqrt(mean φ² + δ) per dim',
        symmetric=True,
    )
)
register(Kind('train', _fit_block, _apply_block, description='block R_train^-1/2', symmetric=True))
register(
    Kind(
        'full',
        _fit_full,
        _apply_block,
        description='full (R_train + δI)^-1/2 over all D dims (TRAK)',
        symmetric=True,
    )
)


def _fit_kronecker(correction: bool) -> FitFn:
    def fit_fn(train, queries, config, mesh):
        del queries
        arrays, info = projected_kfac.fit(
            train,
            eigenvalue_correction=correction,
            damping=config.damping,
            mesh=mesh,
            chunk_rows=config.chunk_rows,
        )
        return arrays, info, {}

    return fit_fn


def _apply_kronecker(arrays, vectors):
    return projected_kfac.apply(arrays['u_left'], arrays['u_right'], arrays['scale'], vectors)


for _name, _correction in (('kfac_projected', False), ('ekfac_projected', True)):
    register(
        Kind(
            _name,
            _fit_kronecker(_correction),
            _apply_kronecker,
            description=f'(F + λI)^-1/2, F the {"EK" if _correction else "K"}-FAC Kronecker '
            'second moment of each block',
            symmetric=True,
        )
    )
register(
    Kind(
        'mixed',
        _fit_block,
        _apply_block,
        uses_queries=True,
        description='block (λ R_eval + (1 − λ) R_train)^-1/2',
        symmetric=True,
    )
)
register(
    Kind(
        'mixed_shrunk',
        functools.partial(_fit_block, shrink_eval=True),
        _apply_block,
        uses_queries=True,
        description='block (λ R̃_eval + (1 − λ) R_train)^-1/2, R̃_eval Ledoit-Wolf shrunk',
        symmetric=True,
    )
)


def plot_eigenvalues(p: Preconditioner, url: str) -> str | None:
    """PNG of the eigenvalue curves λR_eval, (1 − λ)R_train and the crossing (block kinds)."""
    if 'eig_train' not in p.diagnostics:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logging.warning('matplotlib is not installed (pip install trackstar_jax[eval]); no plot.')
        return None
    import io

    lam, k = float(p.info.get('lam', 0.0)), p.info.get('k_component')
    eig_train, eig_eval = p.diagnostics['eig_train'], p.diagnostics.get('eig_eval')
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(1, len(eig_train) + 1)
    ax.loglog(x, np.maximum((1 - lam) * eig_train, 1e-30), label='(1-λ) R_train')
    if eig_eval is not None:
        ax.loglog(x, np.maximum(lam * eig_eval, 1e-30), label='λ R_eval')
        ax.loglog(x, np.maximum(eig_eval, 1e-30), ':', alpha=0.5, label='R_eval')
    ax.loglog(x, np.maximum(eig_train, 1e-30), ':', alpha=0.5, label='R_train')
    if k:
        ax.axvline(k, color='k', lw=0.8, ls='--', label=f'k = {k}')
    ax.set_xlabel('component (descending)')
    ax.set_ylabel('eigenvalue')
    ax.set_title(f'λ = {lam:.4g}')
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    return index_lib.write_bytes(url, buf.getvalue())
