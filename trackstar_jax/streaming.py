"""Streaming an index through the mesh, chunk by chunk, each process reading its rows.

Jobs that reduce over the whole index (fit, score) never load it whole: they ask this
module for chunks as global arrays split along the mesh's ``data`` axis. Every process
reads from TensorStore only the rows its devices hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trackstar_jax import sharding as shd
from trackstar_jax.data.batching import DataLayout
from trackstar_jax.index import DTYPES, Index

# On the CPU backend a staged chunk is copied into a fresh XLA host allocation. glibc
# serves allocations above its mmap threshold (at most 32 MiB) with new pages each time,
# and the page faults made staging 64 MiB chunks run at ~1.8 GB/s against ~20 GB/s for
# 16 MiB ones, which malloc recycles (measured on the 2-core dev machine). So on CPU a
# chunk's per-device shard is kept at or under this many bytes.
CPU_STAGE_BYTES = 16 * 2**20


def default_mesh() -> Mesh:
    """All devices along ``data``."""
    return shd.make_mesh(((shd.DATA, -1), (shd.MODEL, 1)))


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= n."""
    return -(-n // multiple) * multiple


def chunk_rows_for(idx: Index, mesh: Mesh, chunk_rows: int) -> int:
    """The rows per streamed chunk: ``chunk_rows`` at most, never more than the index
    (a 256-row index streamed in 4,096-row chunks would stage and transform 16x its own
    size in zero rows), per-device shards under :data:`CPU_STAGE_BYTES` on CPU, and a
    multiple of the data axis."""
    n_data = mesh.shape[shd.DATA]
    c = max(min(chunk_rows, len(idx)), 1)
    if mesh.devices.flat[0].platform == 'cpu':
        row_bytes = idx.dim * np.dtype(DTYPES[idx.manifest['dtype']]).itemsize
        c = min(c, n_data * max(1, CPU_STAGE_BYTES // row_bytes))
    return round_up(c, n_data)


def stream_rows(
    idx: Index,
    mesh: Mesh,
    chunk_rows: int,
    rank: np.ndarray | None = None,
) -> Iterator[tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    """Yields (vectors [C, D], valid [C] bool, row [C] int32, rank [C] int32) along ``data``.

    C = :func:`chunk_rows_for` (``chunk_rows`` at most, bounded by the index's rows and,
    on CPU, the staging size); rows past the end are zero, invalid, row -1 and rank
    last. ``rank`` is a per-row int array carried along (default: the row itself).
    Vectors keep the stored dtype (bfloat16 crosses to the device at half the bytes;
    consumers upcast there) and are read straight into the array handed to the device:
    no host-side copy or reordering. The next chunk is read from TensorStore while the
    caller computes on this one.
    """
    n = len(idx)
    c = chunk_rows_for(idx, mesh, chunk_rows)
    layout = DataLayout.for_mesh(mesh, c)
    rows_sharding = NamedSharding(mesh, PartitionSpec(shd.DATA))
    mat_sharding = NamedSharding(mesh, PartitionSpec(shd.DATA, None))

    def load(start: int):
        lo = start + layout.row_start
        hi = min(start + layout.row_stop, n)
        size = layout.local_batch_size
        if hi - lo == size:
            local = idx.read(slice(lo, hi), upcast=False)
        else:  # the last chunk: zero rows after the end
            part = idx.read(slice(lo, max(hi, lo)), upcast=False)
            local = np.zeros((size, idx.dim), part.dtype)
            local[: len(part)] = part
        rows = np.arange(start + layout.row_start, start + layout.row_stop, dtype=np.int32)
        valid = rows < n
        ranks = rows if rank is None else rank[np.minimum(rows, n - 1)].astype(np.int32)
        ranks = np.where(valid, ranks, np.iinfo(np.int32).max).astype(np.int32)
        # Padding rows carry row -1: a consumer that keeps one by mistake (ties at -inf
        # under an unstable sort) gets "no row", never another example's row number.
        rows = np.where(valid, rows, -1).astype(np.int32)
        return local, valid, rows, ranks

    starts = list(range(0, n, c))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, starts[0]) if starts else None
        for i in range(len(starts)):
            local, valid, rows, ranks = pending.result()
            if i + 1 < len(starts):
                pending = pool.submit(load, starts[i + 1])
            yield (
                jax.make_array_from_process_local_data(mat_sharding, local),
                *(
                    jax.make_array_from_process_local_data(rows_sharding, a)
                    for a in (valid, rows, ranks)
                ),
            )
