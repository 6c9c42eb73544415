"""Index storage: rows of vectors with ids, in a TensorStore store named by a URL.

This module knows no model: the caller hands in the manifest (what the vectors are)
and the rows; :mod:`trackstar_jax.pipeline` is what computes them. Layout under the
index URL (a local path, ``file://``, ``gs://bucket/...`` or ``memory://name``)::

    manifest.json        what the vectors are (the caller's keys, plus dim, dtype,
                         num_examples, chunk_rows, a hash of the ids, format_version);
                         written last on create
    ids.json             example ids, row order
    vectors/             zarr3 [N, D] (float32 or bfloat16), one chunk = chunk_rows rows
    num_targets/         zarr3 [N] float32: target tokens per example
    norms/               zarr3 [N] float32: ||v|| of each stored row (taken in float32,
                         before any bfloat16 cast)
    extras/NAME/         optional side columns, zarr3 [N, width] float32 or int32, as the
                         manifest's ``extras`` lists (e.g. a token index's target ids and
                         coefficients), checksummed like the vectors
    progress/chunk_K     chunk K's commit marker, written after its rows: the hash of the
                         manifest it was written under, checksums of its stored vectors,
                         norms and counts, and a digest of the examples it came from
    outliers.json        examples with extreme feature norms (``pipeline.report_outliers``)

Chunk K holds rows [K * chunk_rows, (K + 1) * chunk_rows). A chunk is written whole and
then committed; an unfinished index is one with uncommitted chunks, and :func:`open`
refuses it. Markers of another manifest do not count, and every read is checked against
the checksums (:class:`IntegrityError`). Rewriting a chunk gives the same bytes, so a
writer killed at any point and restarted finishes the same index with no duplicate or
missing rows.

``memory://`` URLs live in one in-process store (shared by every handle in the
process, gone when it exits): for tests and throw-away runs.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts
from absl import logging

DTYPES = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16}
FORMAT_VERSION = 2  # 2: model_fingerprint from the on-device param digest
# Manifest keys that change the vectors: query and train indices must agree on them.
VECTOR_KEYS = ('model_fingerprint', 'correction_fingerprint', 'spec', 'layout', 'dim')
# Keys the storage itself sets; a resumed writer compares everything else.
_VOLATILE_KEYS = ('created',)
# memory:// is an in-process file system: one context, so every handle sees the same data.
_MEMORY_CONTEXT = ts.Context()


class ManifestMismatchError(ValueError):
    """Two indices whose vectors are not comparable."""


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


def kvstore_spec(url: str) -> dict[str, Any]:
    """The TensorStore kvstore spec of a URL: a path, file://, gs:// or memory://."""
    url = str(url)
    if url.startswith('gs://'):
        bucket, _, path = url[len('gs://') :].partition('/')
        if not bucket:
            raise ValueError(f'No bucket in {url!r}.')
        return {'driver': 'gcs', 'bucket': bucket, 'path': path.strip('/') + '/'}
    if url.startswith('memory://'):
        return {'driver': 'memory', 'path': url[len('memory://') :].strip('/') + '/'}
    if url.startswith('file://'):
        url = url[len('file://') :]
    elif '://' in url:
        raise ValueError(f'Unsupported store URL {url!r}: use a path, file://, gs:// or memory://.')
    return {'driver': 'file', 'path': os.path.abspath(url) + '/'}


def join(url: str, *names: str) -> str:
    """``url`` with path components appended (URLs keep their scheme)."""
    return '/'.join([str(url).rstrip('/'), *names])


def is_local(url: str) -> bool:
    """Whether ``url`` names a local directory (a path or file://)."""
    return kvstore_spec(url)['driver'] == 'file'


class Store:
    """Keys and zarr3 arrays under one URL; every key write is atomic.

    The file driver writes a key under a temporary name and renames it, GCS writes
    objects whole: a reader sees the old value or the new, never a partial one.
    """

    def __init__(self, url: str):
        self.url = str(url)
        self._spec = kvstore_spec(self.url)
        self._context = _MEMORY_CONTEXT if self._spec['driver'] == 'memory' else ts.Context()
        self._kv = ts.KvStore.open(self._spec, context=self._context).result()

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds a value."""
        return self._kv.read(key).result().state == 'value'

    def read_bytes(self, key: str) -> bytes:
        """The bytes under ``key``; FileNotFoundError if there are none."""
        res = self._kv.read(key).result()
        if res.state != 'value':
            raise FileNotFoundError(f'{join(self.url, key)} does not exist.')
        return bytes(res.value)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Writes ``data`` under ``key`` atomically."""
        self._kv.write(key, data).result()

    def read_json(self, key: str) -> Any:
        """The JSON value under ``key``; IntegrityError naming it if it is not JSON."""
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IntegrityError(
                f'{join(self.url, key)} is not readable JSON ({e}): it was cut short or '
                'changed after it was written.'
            ) from e

    def write_json(self, key: str, value: Any, indent: int | None = None) -> None:
        """Writes ``value`` as JSON under ``key`` atomically."""
        self.write_bytes(key, json.dumps(value, indent=indent).encode())

    def delete(self, key: str) -> None:
        """Removes ``key`` (no error if absent)."""
        self._kv.delete_range(ts.KvStore.KeyRange(key, key + '\x00')).result()

    def delete_prefix(self, prefix: str) -> None:
        """Removes every key under ``prefix``."""
        self._kv.delete_range(
            ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))
        ).result()
        if self._spec['driver'] == 'file':  # the file driver leaves empty directories
            shutil.rmtree(os.path.join(self._spec['path'], prefix), ignore_errors=True)

    def list(self, prefix: str = '') -> list[str]:
        """Keys under ``prefix``, sorted."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ''
        keys = self._kv.list(ts.KvStore.KeyRange(prefix, end)).result()
        return sorted(k.decode() for k in keys)

    def create_array(
        self, name: str, shape: Sequence[int], chunk: Sequence[int], dtype: str
    ) -> ts.TensorStore:
        """Creates (or opens, if it exists with the same metadata) a zarr3 array."""
        spec = {
            'driver': 'zarr3',
            'kvstore': {**self._spec, 'path': self._spec['path'] + name.strip('/') + '/'},
            'metadata': {
                'shape': list(shape),
                'chunk_grid': {'name': 'regular', 'configuration': {'chunk_shape': list(chunk)}},
                'data_type': dtype,
            },
        }
        return ts.open(spec, create=True, open=True, context=self._context).result()

    def open_array(self, name: str) -> ts.TensorStore:
        """Opens an existing zarr3 array."""
        spec = {
            'driver': 'zarr3',
            'kvstore': {**self._spec, 'path': self._spec['path'] + name.strip('/') + '/'},
        }
        return ts.open(spec, open=True, context=self._context).result()


def write_bytes(url: str, data: bytes) -> str:
    """Writes a file at ``url`` (any store URL) atomically; returns ``url``."""
    parent, _, name = str(url).rstrip('/').rpartition('/')
    Store(parent or '.').write_bytes(name, data)
    return url


def write_text(url: str, text: str) -> str:
    """Writes a text file at ``url`` (any store URL) atomically; returns ``url``."""
    return write_bytes(url, text.encode())


def _checksum_url(url: str) -> str:
    return str(url) + '.sha256'


def write_checked(url: str, data: bytes) -> str:
    """Writes ``data`` at ``url`` atomically, then its sha256 beside it (``<url>.sha256``).

    The checksum file is in ``sha256sum`` format (``sha256sum -c`` verifies it) and is
    written second: a crash in between leaves a file whose checksum is missing or stale,
    which :func:`read_checked` refuses, never a file that passes unverified.
    """
    write_bytes(url, data)
    name = str(url).rstrip('/').rpartition('/')[2]
    write_text(_checksum_url(url), f'{hashlib.sha256(data).hexdigest()}  {name}\n')
    return url


def read_checked(url: str) -> bytes:
    """The bytes at ``url``, verified against the checksum :func:`write_checked` wrote.

    Raises:
      FileNotFoundError: no file at ``url``.
      IntegrityError: the checksum is missing or does not match.
    """
    parent, _, name = str(url).rstrip('/').rpartition('/')
    store = Store(parent or '.')
    data = store.read_bytes(name)
    if not store.exists(name + '.sha256'):
        raise IntegrityError(
            f'{url} has no checksum ({name}.sha256): its write was interrupted, or it was '
            'not written by trackstar_jax. Re-run the job that writes it.'
        )
    want = store.read_bytes(name + '.sha256').decode(errors='replace').split()[:1]
    if want != [hashlib.sha256(data).hexdigest()]:
        raise IntegrityError(
            f'{url} does not match its checksum: changed or cut short after it was written.'
        )
    return data


def _raw_chunk_dir(store: Store, array: ts.TensorStore) -> str | None:
    """The local directory of ``array``'s chunk files when they hold raw rows (a file
    store, zarr3 ``bytes`` codec only, default chunk keys, one chunk across the columns),
    else None (TensorStore reads it)."""
    if store._spec.get('driver') != 'file':
        return None
    meta = array.spec().to_json().get('metadata', {})
    codecs = [c.get('name') for c in meta.get('codecs', [])]
    keys = meta.get('chunk_key_encoding', {})
    chunk_cols = meta.get('chunk_grid', {}).get('configuration', {}).get('chunk_shape', [0, 0])
    if (
        codecs != ['bytes']
        or keys.get('name') != 'default'
        or keys.get('configuration', {}).get('separator', '/') != '/'
        or chunk_cols[1] != meta.get('shape', [0, -1])[1]
    ):
        return None
    return os.path.join(store._spec['path'], 'vectors')


def _marker(chunk: int) -> str:
    return f'progress/chunk_{chunk:08d}'


def _comparable(manifest: Mapping[str, Any]) -> dict[str, Any]:
    # Through JSON, so a manifest in memory compares equal to one read back from disk.
    return {
        k: v for k, v in json.loads(json.dumps(dict(manifest))).items() if k not in _VOLATILE_KEYS
    }


_PARTS = ('vectors', 'norms', 'num_targets')
EXTRA_DTYPES = ('float32', 'int32')


def _extra_key(name: str) -> str:
    return f'extras/{name}'


def extras_of(manifest: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """The side columns an index was created with: {name: (width, dtype)}."""
    return {name: (int(w), str(dt)) for name, (w, dt) in manifest.get('extras', {}).items()}


class IntegrityError(RuntimeError):
    """Stored bytes that are not what was committed (missing, truncated or changed)."""


def _bytes(a: np.ndarray) -> np.ndarray:
    # A uint8 view, hashed in place: a tobytes() copy cost as much as the hash.
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(_bytes(a)).hexdigest()[:24]


def _crc(a: np.ndarray) -> str:
    return f'{zlib.crc32(_bytes(a)):08x}'


# Chunk checksums guard against accidental damage (deleted, cut or changed files), so
# CRC-32 (zlib, ~4x sha256's speed here, releases the GIL) is what markers record now;
# markers written with sha256 are still verified with it.
_CHUNK_DIGESTS = {'crc32': _crc, 'sha256': _sha}


def _marker_digest(marker: Mapping[str, Any]) -> tuple[str, Callable[[np.ndarray], str]]:
    algorithm = next(a for a in _CHUNK_DIGESTS if a in marker)
    return algorithm, _CHUNK_DIGESTS[algorithm]


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """A hash of the manifest (volatile keys aside): progress markers carry it."""
    text = json.dumps(_comparable(manifest), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Index:
    """A read handle on a complete index (see :func:`open`).

    Every read is checked against the checksums each chunk's commit marker recorded
    (vectors as stored, norms, target counts): a deleted chunk file (which TensorStore
    would read as zeros), truncated or changed bytes raise :class:`IntegrityError`
    instead of flowing into a fit or a score. A chunk is checked once per handle.
    """

    def __init__(self, store: Store, manifest: dict[str, Any], ids: list[str], markers: dict):
        self._store = store
        self.path = store.url
        self.manifest = manifest
        self.ids = ids
        self._markers = markers
        self._chunk_rows = int(manifest['chunk_rows'])
        self._dtype = DTYPES[manifest['dtype']]
        self._vectors = store.open_array('vectors')
        self._norms = store.open_array('norms')
        self._num_targets = store.open_array('num_targets')
        self._extras = {name: store.open_array(_extra_key(name)) for name in extras_of(manifest)}
        self._verified: set[tuple[int, str]] = set()
        self._chunk_files = _raw_chunk_dir(store, self._vectors)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """D."""
        return int(self.manifest['dim'])

    def _check(self, chunk: int, part: str, data: np.ndarray | str) -> None:
        """Checks ``data`` (chunk's ``part`` as stored, or its digest) against its commit
        checksum."""
        algorithm, digest = _marker_digest(self._markers[chunk])
        got = data if isinstance(data, str) else digest(data)
        if self._markers[chunk][algorithm][part] != got:
            start = chunk * self._chunk_rows
            stop = min(start + self._chunk_rows, len(self.ids))
            raise IntegrityError(
                f'Index {self.path}: chunk {chunk} (rows [{start}, {stop})) does not match '
                f'its commit checksum ({part}): its files were deleted, truncated or changed. '
                f"Delete that chunk's marker (progress/chunk_{chunk:08d}) and re-run the "
                'index job to rewrite it.'
            )
        self._verified.add((chunk, part))

    def _verify(self, first: int, last: int, parts: Sequence[str] = _PARTS) -> None:
        """Checks ``parts`` of chunks first..last (inclusive) against their commit checksums."""
        arrays = {
            'vectors': self._vectors,
            'norms': self._norms,
            'num_targets': self._num_targets,
            **{_extra_key(name): a for name, a in self._extras.items()},
        }
        for chunk in range(first, last + 1):
            start = chunk * self._chunk_rows
            stop = min(start + self._chunk_rows, len(self.ids))
            for part in parts:
                if (chunk, part) not in self._verified:
                    self._check(chunk, part, arrays[part][start:stop].read().result())

    def _verify_rows(self, rows: np.ndarray) -> None:
        if len(rows):
            chunks = np.unique(rows // self._chunk_rows)
            for c in chunks:
                self._verify(int(c), int(c), ('vectors',))

    def read(self, rows: slice | Sequence[int] | np.ndarray, upcast: bool = True) -> np.ndarray:
        """Vectors of ``rows`` (a slice or row indices) as float32 [n, D], verified.

        A slice touching chunks not yet verified by this handle is read whole-chunk
        aligned, once: the checksum is taken over the bytes being returned, so verifying
        costs hashing, not a second read. With ``upcast=False`` the stored dtype is
        returned (bfloat16 rows go to the device at half the bytes and are upcast there).
        """
        out_dtype = np.float32 if upcast else None
        if not isinstance(rows, slice):
            rows = np.asarray(rows, np.int64)
            self._verify_rows(rows)
            return np.asarray(self._vectors[ts.d[0].oindex[rows]].read().result(), out_dtype)
        n, cr = len(self.ids), self._chunk_rows
        start, stop, _ = rows.indices(n)
        if stop <= start:
            return np.zeros((0, self.dim), out_dtype or self._vectors.dtype.numpy_dtype)
        first, last = start // cr, (stop - 1) // cr
        todo = [c for c in range(first, last + 1) if (c, 'vectors') not in self._verified]
        if not todo and self._chunk_files is None:
            return np.asarray(self._vectors[start:stop].read().result(), out_dtype)
        lo, hi = first * cr, min((last + 1) * cr, n)
        if self._chunk_files is not None:
            block = self._read_chunk_files(first, last)[: hi - lo]
        else:
            block = np.asarray(self._vectors[lo:hi].read().result())
        if todo:
            parts = [block[c * cr - lo : min((c + 1) * cr, n) - lo] for c in todo]
            # zlib.crc32 and sha256 release the GIL: chunks are hashed on all cores at once.
            workers = min(len(todo), os.cpu_count() or 1)
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                digests = list(
                    pool.map(lambda c, a: _marker_digest(self._markers[c])[1](a), todo, parts)
                )
            for c, digest in zip(todo, digests, strict=True):
                self._check(c, 'vectors', digest)
        return np.asarray(block[start - lo : stop - lo], out_dtype)  # no copy for float32

    def _read_chunk_files(self, first: int, last: int) -> np.ndarray:
        """Chunks [first, last] read straight from their files into one array.

        Only for a local index whose vectors are stored uncompressed (zarr3's ``bytes``
        codec): a chunk file is then the raw little-endian rows (edge chunks padded to
        full size), so one ``readinto`` per file replaces TensorStore's decode and copy.
        A missing file reads as the fill value (TensorStore does not write an all-zero
        chunk; the chunk checksum tells a deleted one), a short one is an IntegrityError.
        """
        cr, dim = self._chunk_rows, self.dim
        dtype = np.dtype(self._vectors.dtype.numpy_dtype).newbyteorder('<')
        out = np.empty(((last - first + 1) * cr, dim), dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        size = cr * dim * dtype.itemsize
        for i, c in enumerate(range(first, last + 1)):
            path = os.path.join(self._chunk_files, 'c', str(c), '0')
            try:
                with builtins.open(path, 'rb') as f:
                    got = f.readinto(view[i * size : (i + 1) * size])
            except FileNotFoundError:
                out[i * cr : (i + 1) * cr] = 0
                continue
            if got != size:
                raise IntegrityError(
                    f'Index {self.path}: chunk {c} of vectors is cut short ({path}: {got} '
                    f'of {size} bytes).'
                )
        return out if dtype.isnative else out.astype(dtype.newbyteorder('='))

    def norms(self) -> np.ndarray:
        """||v|| per example (float32 [N]), verified."""
        self._verify(0, len(self._markers) - 1, ('norms',))
        return np.asarray(self._norms.read().result())

    def num_targets(self) -> np.ndarray:
        """Target tokens per example (float32 [N]), verified."""
        self._verify(0, len(self._markers) - 1, ('num_targets',))
        return np.asarray(self._num_targets.read().result())

    def extra(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Side column ``name`` ([n, width], its own dtype) of ``rows`` (default all), verified.

        Raises:
          KeyError: if the index has no such column (its manifest lists the ones it has).
        """
        if name not in self._extras:
            raise KeyError(
                f'Index {self.path} has no side column {name!r}; it has '
                f'{sorted(self._extras) or "none"}.'
            )
        start, stop, _ = (rows or slice(None)).indices(len(self.ids))
        if stop > start:
            cr = self._chunk_rows
            self._verify(start // cr, (stop - 1) // cr, (_extra_key(name),))
        return np.asarray(self._extras[name][start:stop].read().result())

    def chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (start, vectors[n, D]) over the index, one chunk in memory at a time."""
        step = chunk_rows or self._chunk_rows
        for start in range(0, len(self), step):
            yield start, self.read(slice(start, min(start + step, len(self))))


class IndexWriter:
    """Writes the chunks of an index created by :func:`create`; resumable.

    A chunk's commit marker records the manifest it was written under (so markers left
    by an index built with other settings never count), checksums of what was stored,
    and, if the caller gives one, a digest of the chunk's inputs (so a resume can check
    that the examples have not changed since).

    Attributes:
      path: the index URL.
      manifest: the manifest as stored.
      num_chunks: chunks in the index.
    """

    def __init__(self, store: Store, manifest: dict[str, Any]):
        self._store = store
        self.path = store.url
        self.manifest = manifest
        self._manifest_digest = manifest_digest(manifest)
        self.num_examples = int(manifest['num_examples'])
        self.chunk_rows = int(manifest['chunk_rows'])
        self.num_chunks = math.ceil(self.num_examples / self.chunk_rows)
        self._dtype = DTYPES[manifest['dtype']]
        self._vectors = store.open_array('vectors')
        self._norms = store.open_array('norms')
        self._num_targets = store.open_array('num_targets')
        self._extras = {name: store.open_array(_extra_key(name)) for name in extras_of(manifest)}

    def rows(self, chunk: int) -> tuple[int, int]:
        """[start, stop) of ``chunk``."""
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.num_examples)

    def markers(self) -> dict[int, dict[str, Any]]:
        """The valid commit markers by chunk: written under this manifest."""
        out = {}
        for key in self._store.list('progress/'):
            try:
                chunk = int(key.rsplit('_', 1)[1])
                marker = self._store.read_json(key)
            except (ValueError, IntegrityError):
                continue  # not a marker, or one cut short: the chunk is not committed
            if marker.get('manifest') == self._manifest_digest and chunk < self.num_chunks:
                out[chunk] = marker
        return out

    def committed(self) -> list[bool]:
        """For each chunk, whether it is committed (under this manifest)."""
        done = self.markers()
        return [c in done for c in range(self.num_chunks)]

    def write_chunk(
        self,
        chunk: int,
        vectors: np.ndarray,
        num_targets: np.ndarray,
        fault_hook: Callable[[str, int], None] | None = None,
        input_digest: str | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Writes a chunk's rows (vectors [n, D] float32, num_targets [n]) and commits it.

        Args:
          chunk: the chunk number.
          vectors: exactly the chunk's rows.
          num_targets: target tokens per row.
          extras: the chunk's rows of every side column the index was created with
            ({name: [n, width]}), cast to the column's dtype.
          fault_hook: test hook called as hook(event, chunk) at 'vectors_written',
            'meta_written' and 'committed'.
          input_digest: a digest of the examples the rows came from (kept in the marker).

        Raises:
          ValueError: on a wrong shape or non-finite vectors (the rows are named).
        """
        start, stop = self.rows(chunk)
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (stop - start, int(self.manifest['dim'])):
            raise ValueError(
                f'Chunk {chunk} of {self.path} holds rows [{start}, {stop}) of dim '
                f'{self.manifest["dim"]}; got vectors of shape {vectors.shape}.'
            )
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            bad = (start + np.flatnonzero(~finite)).tolist()
            raise ValueError(
                f'Non-finite vectors for rows {bad[:10]} of {self.path}: refusing to store them.'
            )
        stored = vectors.astype(self._dtype)
        norms = np.linalg.norm(vectors, axis=1).astype(np.float32)
        targets = np.asarray(num_targets, np.float32)
        self._vectors[start:stop].write(stored).result()
        if fault_hook:
            fault_hook('vectors_written', chunk)
        self._norms[start:stop].write(norms).result()
        self._num_targets[start:stop].write(targets).result()
        side = self._side_columns(chunk, extras or {})
        for name, values in side.items():
            self._extras[name][start:stop].write(values).result()
        if fault_hook:
            fault_hook('meta_written', chunk)
        self._check_still_mine()
        crc = {'vectors': _crc(stored), 'norms': _crc(norms), 'num_targets': _crc(targets)}
        crc.update({_extra_key(name): _crc(values) for name, values in side.items()})
        marker = {
            'rows': [start, stop],
            'manifest': self._manifest_digest,
            'crc32': crc,
            'input': input_digest,
        }
        self._store.write_json(_marker(chunk), marker)
        if fault_hook:
            fault_hook('committed', chunk)

    def _side_columns(self, chunk: int, extras: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``extras`` checked against the index's side columns, cast to their dtypes."""
        start, stop = self.rows(chunk)
        declared = extras_of(self.manifest)
        if set(extras) != set(declared):
            raise ValueError(
                f'{self.path} has side columns {sorted(declared)}; chunk {chunk} gave '
                f'{sorted(extras)}.'
            )
        out = {}
        for name, (width, dtype) in declared.items():
            values = np.asarray(extras[name]).astype(dtype)
            if values.shape != (stop - start, width):
                raise ValueError(
                    f'Side column {name!r} of chunk {chunk} of {self.path}: expected shape '
                    f'{(stop - start, width)}, got {values.shape}.'
                )
            out[name] = values
        return out

    def _check_still_mine(self) -> None:
        # Another writer that created this URL with other settings at the same time
        # replaces manifest.json: stop before committing rows under a manifest that is
        # no longer the index's (its markers would never count, its rows would be lost).
        current = manifest_digest(self._store.read_json('manifest.json'))
        if current != self._manifest_digest:
            raise RuntimeError(
                f'{self.path}: another writer replaced the manifest with other settings '
                'while this one was writing. Two jobs with different settings are writing '
                'the same index: give each its own path.'
            )

    def finish(self) -> Index:
        """The complete index (raises if chunks are still uncommitted)."""
        return open(self.path)


def create(
    url: str,
    manifest: Mapping[str, Any],
    ids: Sequence[str],
    *,
    dim: int,
    dtype: str = 'float32',
    chunk_rows: int = 256,
    extras: Mapping[str, tuple[int, str]] | None = None,
) -> IndexWriter:
    """Creates an index at ``url``, or re-opens one with the same manifest to resume.

    Args:
      url: the index URL.
      manifest: what the vectors are (JSON-serialisable); the storage adds ``dim``,
        ``dtype``, ``chunk_rows``, ``num_examples`` and ``format_version``.
      ids: example ids in row order (unique).
      dim: D.
      dtype: storage dtype, 'float32' or 'bfloat16'.
      chunk_rows: rows per chunk (storage chunk and commit unit).
      extras: side columns stored per row beside the vectors, {name: (width, dtype)}
        with dtype one of :data:`EXTRA_DTYPES` (e.g. a token index's target ids and
        coefficients); written by every ``write_chunk``, checksummed like the vectors,
        read with :meth:`Index.extra`.

    Returns:
      A writer for the chunks.

    Raises:
      ValueError: on bad arguments, or an existing index at ``url`` built differently.
    """
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {sorted(DTYPES)}, got {dtype!r}.')
    ids = [str(i) for i in ids]
    if not ids:
        raise ValueError('No examples to index.')
    if len(set(ids)) != len(ids):
        seen, dup = set(), []
        for i in ids:
            if i in seen and i not in dup:
                dup.append(i)
            seen.add(i)
        raise ValueError(f'Example ids must be unique (as strings); repeated: {dup[:10]}.')
    if chunk_rows < 1 or dim < 1:
        raise ValueError(f'chunk_rows ({chunk_rows}) and dim ({dim}) must be >= 1.')
    side = {}
    for name, (width, col_dtype) in (extras or {}).items():
        if not str(name).isidentifier() or col_dtype not in EXTRA_DTYPES or int(width) < 1:
            raise ValueError(
                f'Side column {name!r}: need an identifier name, width >= 1 and a dtype in '
                f'{EXTRA_DTYPES}; got width {width!r}, dtype {col_dtype!r}.'
            )
        side[str(name)] = [int(width), col_dtype]
    full = {
        'format_version': FORMAT_VERSION,
        **dict(manifest),
        # The ids are part of what the index is: another corpus of the same size is
        # another index, not a resume.
        'ids_sha256': hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:24],
        'dim': int(dim),
        'dtype': dtype,
        'chunk_rows': int(chunk_rows),
        'num_examples': len(ids),
    }
    if side:
        full['extras'] = side
    store = Store(url)
    if store.exists('manifest.json'):
        old = store.read_json('manifest.json')
        if _comparable(old) == _comparable(full):
            return IndexWriter(store, old)
        changed = sorted(
            k
            for k in set(old) | set(full)
            if k not in _VOLATILE_KEYS and _comparable(old).get(k) != _comparable(full).get(k)
        )
        if IndexWriter(store, old).markers():
            raise ValueError(
                f'{url} holds an index built with other settings ({", ".join(changed)}); '
                'use a new path or delete it.'
            )
        # Nothing was committed under the old settings (a run that failed before its
        # first chunk): there is nothing to keep, so a corrected run starts afresh.
        logging.warning(
            '%s: replacing an index with no committed rows built with other settings (%s).',
            url,
            ', '.join(changed),
        )
        store.delete('manifest.json')
        for prefix in ('vectors/', 'norms/', 'num_targets/', 'extras/', 'progress/'):
            store.delete_prefix(prefix)
    n = len(ids)
    store.write_json('ids.json', ids)
    store.create_array('vectors', (n, dim), (chunk_rows, dim), dtype)
    store.create_array('norms', (n,), (chunk_rows,), 'float32')
    store.create_array('num_targets', (n,), (chunk_rows,), 'float32')
    for name, (width, col_dtype) in side.items():
        store.create_array(_extra_key(name), (n, width), (chunk_rows, width), col_dtype)
    full['created'] = time.time()
    store.write_json('manifest.json', full, indent=1)  # last: the index now exists
    return IndexWriter(store, full)


def open(url: str) -> Index:  # noqa: A001 - the API name the jobs use
    """Opens a complete index; raises if it is missing, unfinished or unreadable."""
    store = Store(url)
    if not store.exists('manifest.json'):
        raise FileNotFoundError(f'No index at {url} (no manifest.json).')
    manifest = store.read_json('manifest.json')  # IntegrityError naming the file if cut
    ids = store.read_json('ids.json')
    writer = IndexWriter(store, manifest)
    markers = writer.markers()
    missing = [c for c in range(writer.num_chunks) if c not in markers]
    if missing:
        raise RuntimeError(
            f'Index {url} is incomplete: {len(missing)} chunks not committed '
            f'(first {missing[:5]}). Re-run the index job to finish it.'
        )
    if len(ids) != writer.num_examples:
        raise IntegrityError(
            f'Index {url}: ids.json has {len(ids)} ids, the manifest {writer.num_examples}.'
        )
    return Index(store, manifest, ids, markers)


def derive(
    src: Index,
    url: str,
    transform: Callable[[np.ndarray], np.ndarray],
    manifest_updates: Mapping[str, Any],
    chunk_rows: int | None = None,
) -> Index:
    """Writes a new index whose vectors are ``transform(chunk)`` of ``src``'s, chunk by chunk.

    Used for derived views of an index (e.g. a smaller projection taken as a sub-block);
    resumable like any index.
    """
    chunk_rows = chunk_rows or int(src.manifest['chunk_rows'])
    dim = int(transform(src.read(slice(0, 1))).shape[1])
    storage = ('dim', 'dtype', 'chunk_rows', 'num_examples', 'format_version', 'created')
    manifest = {
        **{k: v for k, v in src.manifest.items() if k not in storage},
        **manifest_updates,
        'derived_from': src.path if '://' in src.path else os.path.abspath(src.path),
    }
    writer = create(
        url, manifest, src.ids, dim=dim, dtype=src.manifest['dtype'], chunk_rows=chunk_rows
    )
    src_targets = src.num_targets()
    for chunk, done in enumerate(writer.committed()):
        if not done:
            start, stop = writer.rows(chunk)
            vecs = transform(src.read(slice(start, stop)))
            writer.write_chunk(chunk, vecs, src_targets[start:stop])
    return writer.finish()


def select_rows(src: Index, rows: Sequence[int] | np.ndarray, url: str) -> Index:
    """Writes a new index holding rows ``rows`` of ``src`` (in that order), vectors and
    target counts unchanged: e.g. R_eval fitted from a subset of the queries.

    The manifest is ``src``'s (so the new index is comparable with everything ``src``
    is) plus the source path and the rows taken; resumable like any index.
    """
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or not len(rows):
        raise ValueError('select_rows needs a non-empty list of rows.')
    if rows.min() < 0 or rows.max() >= len(src) or len(np.unique(rows)) != len(rows):
        raise ValueError(f'Rows must be distinct and in [0, {len(src)}); got {rows.tolist()[:10]}.')
    # Side columns (extras) are not copied: the new index has vectors and counts only.
    storage = ('dim', 'dtype', 'chunk_rows', 'num_examples', 'format_version', 'created', 'extras')
    manifest = {
        **{k: v for k, v in src.manifest.items() if k not in storage},
        'selected_from': src.path if '://' in src.path else os.path.abspath(src.path),
        'selected_rows': rows.tolist(),
    }
    chunk_rows = int(src.manifest['chunk_rows'])
    ids = [src.ids[int(r)] for r in rows]
    writer = create(
        url, manifest, ids, dim=src.dim, dtype=src.manifest['dtype'], chunk_rows=chunk_rows
    )
    targets = src.num_targets()[rows]
    for chunk, done in enumerate(writer.committed()):
        if not done:
            start, stop = writer.rows(chunk)
            writer.write_chunk(chunk, src.read(rows[start:stop]), targets[start:stop])
    return writer.finish()
