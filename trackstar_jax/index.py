"""The gradient index: per-example feature vectors in a sharded TensorStore store.

Layout of an index directory::

    manifest.json        what the vectors are (model fingerprint, GradientSpec, block
                         layout, correction fingerprint, output fn, dtype, D, N, chunk_rows)
    ids.json             example ids, row order
    vectors/             zarr3 [N, D] (float32 or bfloat16), one chunk = chunk_rows rows
    num_targets/         zarr3 [N] float32: target tokens per example
    norms/               zarr3 [N] float32: ||φ(z)|| of the stored vector
    progress/chunk_K     a chunk's commit marker, written (atomically) after its rows

Chunk K holds rows [K * chunk_rows, (K + 1) * chunk_rows). In a job of P processes,
step s featurises chunks s*P .. s*P + P - 1, process p computing and writing only chunk
s*P + p (its rows are its slice of the global batch). A chunk is written whole and then
marked; a restarted job recomputes every unmarked chunk — rewriting a chunk gives the
same bytes — so a job killed at any point and restarted yields the same index with no
duplicate or missing rows.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts
from absl import logging
from jax.experimental import multihost_utils

from trackstar_jax import checkpoint
from trackstar_jax.grads import Featurizer

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}
FORMAT_VERSION = 1
# Manifest keys that change the vectors: query and train indices must agree on them.
VECTOR_KEYS = ('model_fingerprint', 'correction_fingerprint', 'spec', 'layout', 'dim')


class ManifestMismatchError(ValueError):
    """Two indices whose vectors are not comparable."""


def _atomic_write(path: str, text: str) -> None:
    tmp = f'{path}.tmp{os.getpid()}'
    with builtins.open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _array_spec(path: str, shape: Sequence[int], chunk: Sequence[int], dtype: str) -> dict:
    return {
        'driver': 'zarr3',
        'kvstore': {'driver': 'file', 'path': path},
        'metadata': {
            'shape': list(shape),
            'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': list(chunk)}},
            'data_type': dtype,
        },
    }


def _open_array(path: str, create: bool = False, **meta) -> ts.TensorStore:
    if create:
        return ts.open(_array_spec(path, **meta), create=True, open=True).result()
    return ts.open(
        {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': path}}, open=True
    ).result()


def correction_fingerprint(featurizer: Featurizer) -> str:
    """Hash of the correction arrays (V): a different V gives different vectors."""
    h = hashlib.sha256()
    for path in sorted(featurizer.corrections):
        c = featurizer.corrections[path]
        h.update(f'{path}:{c.kind}'.encode())
        for a in (c.row, c.col, c.full):
            if a is not None:
                h.update(np.ascontiguousarray(np.asarray(a, np.float32)).tobytes())
    return h.hexdigest()[:16]


def make_manifest(
    featurizer: Featurizer,
    num_examples: int,
    dtype: str,
    chunk_rows: int,
    seq_len: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of an index built by ``featurizer``."""
    return {
        'format_version': FORMAT_VERSION,
        'model_fingerprint': checkpoint.fingerprint(featurizer.params),
        'correction_fingerprint': correction_fingerprint(featurizer),
        'spec': featurizer.spec.to_dict(),
        'layout': featurizer.layout.to_dict(),
        'correction': featurizer.spec.correction,
        'output_fn': featurizer.spec.output_fn,
        'projection_seed': featurizer.spec.seed,
        'dim': featurizer.dim,
        'num_examples': num_examples,
        'dtype': dtype,
        'chunk_rows': chunk_rows,
        'seq_len': seq_len,
        **(dict(extra) if extra else {}),
    }


def check_compatible(a: Mapping[str, Any], b: Mapping[str, Any], what: str = '') -> None:
    """Raises ManifestMismatchError if two manifests' vectors are not comparable."""
    diffs = [k for k in VECTOR_KEYS if a.get(k) != b.get(k)]
    if diffs:
        detail = '; '.join(f'{k}: {str(a.get(k))[:80]} != {str(b.get(k))[:80]}' for k in diffs)
        raise ManifestMismatchError(
            f'Incompatible indices{" " + what if what else ""}: '
            f'{detail}. Build both with the same model, checkpoint, '
            'optimizer state and GradientSpec.'
        )


@dataclasses.dataclass
class Index:
    """A read handle on an index directory (see :func:`open`)."""

    path: str
    manifest: dict[str, Any]
    ids: list[str]
    _vectors: ts.TensorStore
    _norms: ts.TensorStore
    _num_targets: ts.TensorStore

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """D."""
        return int(self.manifest['dim'])

    def read(self, rows: slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Vectors of ``rows`` (a slice or row indices) as float32 [n, D]."""
        if isinstance(rows, slice):
            return np.asarray(self._vectors[rows].read().result(), np.float32)
        rows = np.asarray(rows, np.int64)
        return np.asarray(self._vectors[ts.d[0].oindex[rows]].read().result(), np.float32)

    def norms(self) -> np.ndarray:
        """||φ(z)|| per example (float32 [N])."""
        return np.asarray(self._norms.read().result())

    def num_targets(self) -> np.ndarray:
        """Target tokens per example (float32 [N])."""
        return np.asarray(self._num_targets.read().result())

    def chunks(self, chunk_rows: int | None = None):
        """Yields (start, vectors[n, D]) over the index, one chunk in memory at a time."""
        step = chunk_rows or int(self.manifest['chunk_rows'])
        for start in range(0, len(self), step):
            yield start, self.read(slice(start, min(start + step, len(self))))


def open(path: str) -> Index:  # noqa: A001 - the API name the jobs use
    """Opens a complete index; raises if it is missing or unfinished."""
    mpath = os.path.join(path, 'manifest.json')
    if not os.path.exists(mpath):
        raise FileNotFoundError(f'No index at {path} (no manifest.json).')
    with builtins.open(mpath) as f:
        manifest = json.load(f)
    missing = _missing_chunks(path, manifest)
    if missing:
        raise RuntimeError(
            f'Index {path} is incomplete: {len(missing)} chunks not committed '
            f'(first {missing[:5]}). Re-run the index job to finish it.'
        )
    with builtins.open(os.path.join(path, 'ids.json')) as f:
        ids = json.load(f)
    return Index(
        path,
        manifest,
        ids,
        _open_array(os.path.join(path, 'vectors')),
        _open_array(os.path.join(path, 'norms')),
        _open_array(os.path.join(path, 'num_targets')),
    )


def _num_chunks(manifest: Mapping[str, Any]) -> int:
    return math.ceil(manifest['num_examples'] / manifest['chunk_rows'])


def _marker(path: str, chunk: int) -> str:
    return os.path.join(path, 'progress', f'chunk_{chunk:08d}')


def _missing_chunks(path: str, manifest: Mapping[str, Any]) -> list[int]:
    return [c for c in range(_num_chunks(manifest)) if not os.path.exists(_marker(path, c))]


def _pad_rows(
    examples: Sequence[Mapping[str, Any]], n_rows: int, seq_len: int
) -> dict[str, np.ndarray]:
    tokens = np.zeros((n_rows, seq_len), np.int32)
    mask = np.zeros((n_rows, seq_len), np.float32)
    for i, ex in enumerate(examples):
        t = np.asarray(ex['tokens'], np.int32)
        m = np.asarray(ex['loss_mask'], np.float32)
        if len(t) > seq_len or len(m) != len(t):
            raise ValueError(
                f'Example {ex.get("id")!r}: {len(t)} tokens / {len(m)} mask '
                f'entries; need equal lengths <= seq_len={seq_len}.'
            )
        tokens[i, : len(t)] = t
        mask[i, : len(m)] = m
    return {'tokens': tokens, 'loss_mask': mask}


def build(
    featurizer: Featurizer,
    examples: Sequence[Mapping[str, Any]],
    path: str,
    *,
    dtype: str = 'float32',
    chunk_rows: int = 256,
    batch_size: int | None = None,
    seq_len: int | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    fault_hook: Callable[[str, int], None] | None = None,
) -> Index:
    """Featurises ``examples`` into an index at ``path``; resumes an unfinished one.

    Args:
      featurizer: the kernel (its mesh decides the sharding; in a multi-process job
        every process calls this with the same arguments).
      examples: a sequence of {'id', 'tokens', 'loss_mask'} (tokens/mask of equal
        length <= seq_len; a process only indexes the rows it featurises).
      path: the index directory.
      dtype: storage dtype, 'float32' or 'bfloat16'.
      chunk_rows: rows per chunk (storage chunk and commit unit).
      batch_size: examples per kernel call per process (divides chunk_rows; default
        chunk_rows).
      seq_len: padded length (default: the longest example).
      manifest_extra: more manifest entries (checkpoint path, step, ...).
      fault_hook: test hook called as hook(event, chunk) at 'vectors_written',
        'meta_written' and 'committed'.

    Returns:
      The finished index.

    Raises:
      ValueError: on bad arguments or an existing index built differently.
    """
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {dtype!r}.')
    batch_size = batch_size or chunk_rows
    if chunk_rows % batch_size:
        raise ValueError(f'batch_size {batch_size} must divide chunk_rows {chunk_rows}.')
    ids = [str(ex['id']) for ex in examples]
    if len(set(ids)) != len(ids):
        raise ValueError('Example ids must be unique.')
    if not ids:
        raise ValueError('No examples to index.')
    seq_len = seq_len or max(len(ex['tokens']) for ex in examples)
    # Through JSON once, so it compares equal to a manifest read back from disk.
    manifest = json.loads(
        json.dumps(make_manifest(featurizer, len(ids), dtype, chunk_rows, seq_len, manifest_extra))
    )
    vec_path = os.path.join(path, 'vectors')
    n, d = len(ids), featurizer.dim
    if jax.process_index() == 0:
        os.makedirs(os.path.join(path, 'progress'), exist_ok=True)
        mpath = os.path.join(path, 'manifest.json')
        if os.path.exists(mpath):
            with builtins.open(mpath) as f:
                old = json.load(f)
            same = {k: v for k, v in old.items() if k != 'created'}
            if same != {k: v for k, v in manifest.items() if k != 'created'}:
                raise ValueError(
                    f'{path} holds an index built with other settings; use a new path or delete it.'
                )
        else:
            _atomic_write(os.path.join(path, 'ids.json'), json.dumps(ids))
            for name, shape, chunk, dt in (
                ('vectors', (n, d), (chunk_rows, d), dtype),
                ('norms', (n,), (chunk_rows,), 'float32'),
                ('num_targets', (n,), (chunk_rows,), 'float32'),
            ):
                _open_array(
                    os.path.join(path, name), create=True, shape=shape, chunk=chunk, dtype=dt
                )
            _atomic_write(mpath, json.dumps({**manifest, 'created': time.time()}, indent=1))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('index_created')
    vectors = _open_array(vec_path)
    norms = _open_array(os.path.join(path, 'norms'))
    num_targets = _open_array(os.path.join(path, 'num_targets'))

    procs, me = jax.process_count(), jax.process_index()
    num_chunks = _num_chunks(manifest)
    num_steps = math.ceil(num_chunks / procs)
    done = np.array([os.path.exists(_marker(path, c)) for c in range(num_steps * procs)])
    done[num_chunks:] = True
    if procs > 1:  # every process must run the same steps (the kernel is SPMD)
        done = multihost_utils.broadcast_one_to_all(done)
    todo = [s for s in range(num_steps) if not done[s * procs : (s + 1) * procs].all()]
    logging.info(
        'Index %s: %d examples, D=%d, %d chunks of %d; %d chunks already done.',
        path,
        n,
        d,
        num_chunks,
        chunk_rows,
        int(done[:num_chunks].sum()),
    )
    t0, rows_done = time.time(), 0
    for i, step in enumerate(todo):
        chunk = step * procs + me
        start, stop = chunk * chunk_rows, min((chunk + 1) * chunk_rows, n)
        mine = [examples[r] for r in range(start, stop)] if chunk < num_chunks else []
        batch = _pad_rows(mine, chunk_rows, seq_len)
        if procs == 1:
            # Pad only to the chunk's longest example (rounded up to a power of two, so
            # few shapes compile): short examples (glosses, queries) cost their length.
            longest = max([len(ex['tokens']) for ex in mine] or [1])
            bucket = min(seq_len, max(16, 1 << (longest - 1).bit_length()))
            batch = {k: v[:, :bucket] for k, v in batch.items()}
        out = np.concatenate(
            [
                featurizer.local({k: v[b : b + batch_size] for k, v in batch.items()})
                for b in range(0, chunk_rows, batch_size)
            ]
        )
        if chunk < num_chunks and not os.path.exists(_marker(path, chunk)):
            valid = stop - start
            vecs = out[:valid]
            vectors[start:stop].write(vecs.astype(DTYPES[dtype])).result()
            if fault_hook:
                fault_hook('vectors_written', chunk)
            norms[start:stop].write(np.linalg.norm(vecs, axis=1).astype(np.float32)).result()
            num_targets[start:stop].write(batch['loss_mask'][:valid].sum(1)).result()
            if fault_hook:
                fault_hook('meta_written', chunk)
            _atomic_write(_marker(path, chunk), json.dumps({'rows': [start, stop]}))
            if fault_hook:
                fault_hook('committed', chunk)
            rows_done += valid
        elapsed = time.time() - t0
        rate = rows_done / max(elapsed, 1e-9)
        left = sum(
            min(chunk_rows, max(n - (s * procs + me) * chunk_rows, 0)) for s in todo[i + 1 :]
        )
        logging.info(
            'Index %s: step %d/%d, %d rows this run, %.1f rows/s, ETA %.0fs',
            path,
            i + 1,
            len(todo),
            rows_done,
            rate,
            left / max(rate, 1e-9),
        )
    if procs > 1:
        multihost_utils.sync_global_devices('index_done')
    return open(path)


def derive(
    src: Index,
    path: str,
    transform: Callable[[np.ndarray], np.ndarray],
    manifest_updates: Mapping[str, Any],
    chunk_rows: int | None = None,
) -> Index:
    """Writes a new index whose vectors are ``transform(chunk)`` of ``src``'s, chunk by chunk.

    Used for derived views of an index (e.g. a smaller projection taken as a sub-block,
    see ``trackstar_jax.eval.fact_tracing``); resumable like :func:`build`.
    """
    chunk_rows = chunk_rows or int(src.manifest['chunk_rows'])
    probe = transform(src.read(slice(0, 1)))
    manifest = json.loads(
        json.dumps(
            {
                **src.manifest,
                **manifest_updates,
                'dim': int(probe.shape[1]),
                'chunk_rows': chunk_rows,
                'derived_from': os.path.abspath(src.path),
            }
        )
    )
    manifest.pop('created', None)
    n, d, dtype = len(src), int(probe.shape[1]), manifest['dtype']
    mpath = os.path.join(path, 'manifest.json')
    if not os.path.exists(mpath):
        os.makedirs(os.path.join(path, 'progress'), exist_ok=True)
        _atomic_write(os.path.join(path, 'ids.json'), json.dumps(src.ids))
        for name, shape, chunk, dt in (
            ('vectors', (n, d), (chunk_rows, d), dtype),
            ('norms', (n,), (chunk_rows,), 'float32'),
            ('num_targets', (n,), (chunk_rows,), 'float32'),
        ):
            _open_array(os.path.join(path, name), create=True, shape=shape, chunk=chunk, dtype=dt)
        _atomic_write(mpath, json.dumps(manifest, indent=1))
    vectors = _open_array(os.path.join(path, 'vectors'))
    norms = _open_array(os.path.join(path, 'norms'))
    targets = _open_array(os.path.join(path, 'num_targets'))
    src_targets = src.num_targets()
    for chunk in range(_num_chunks(manifest)):
        if os.path.exists(_marker(path, chunk)):
            continue
        start, stop = chunk * chunk_rows, min((chunk + 1) * chunk_rows, n)
        vecs = np.asarray(transform(src.read(slice(start, stop))), np.float32)
        vectors[start:stop].write(vecs.astype(DTYPES[dtype])).result()
        norms[start:stop].write(np.linalg.norm(vecs, axis=1).astype(np.float32)).result()
        targets[start:stop].write(src_targets[start:stop]).result()
        _atomic_write(_marker(path, chunk), json.dumps({'rows': [start, stop]}))
    return open(path)
