"""Exact top-k scoring of every query against the whole train index (paper Eq. 1-2).

    I(z_m, z_q) = Ḡ(z_m) · Ḡ(z_q),   Ḡ = G / ||G||,   G = R^-1/2 φ

The train index is streamed once for all queries, chunk by chunk, never loaded whole
and never turned into a dense N x Q matrix. Each chunk is split along the mesh's
``data`` axis; every device scores its rows against all queries and keeps its local
top-k (``shard_map``), the local lists are all-gathered and merged, and the merged list
is merged with the running one. Order is (score descending, example id ascending), so
ties are broken by id and results do not depend on chunking or device count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from trackstar_jax import index as index_lib
from trackstar_jax import sharding as shd
from trackstar_jax import streaming
from trackstar_jax.hessian import Hessian, apply_blocks

NEG_INF = -jnp.inf


@dataclasses.dataclass
class ScoreResult:
    """Top-k proponents per query.

    Attributes:
      query_ids: [Q] query example ids.
      ids: [Q][k] train example ids, best first.
      rows: int [Q, k] train index rows.
      scores: float32 [Q, k].
    """

    query_ids: list[str]
    ids: list[list[str]]
    rows: np.ndarray
    scores: np.ndarray

    def records(self):
        """Yields {'query_id', 'rank', 'example_id', 'score'} rows (rank from 1)."""
        for q, qid in enumerate(self.query_ids):
            for r in range(self.rows.shape[1]):
                if self.rows[q, r] >= 0:
                    yield {
                        'query_id': qid,
                        'rank': r + 1,
                        'example_id': self.ids[q][r],
                        'score': float(self.scores[q, r]),
                    }

    def to_jsonl(self, path: str) -> str:
        """Writes :meth:`records` as JSONL (atomically)."""
        text = ''.join(json.dumps(r) + '\n' for r in self.records())
        index_lib._atomic_write(path, text)
        return path


def transform(vectors: jax.Array, r_inv_sqrt: jax.Array | None, unit_norm: bool) -> jax.Array:
    """G = R^-1/2 φ, then Ḡ = G / ||G|| (zero vectors stay zero)."""
    v = vectors.astype(jnp.float32)
    if r_inv_sqrt is not None:
        v = apply_blocks(r_inv_sqrt, v)
    if unit_norm:
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        v = v / jnp.where(norm > 0, norm, 1.0)
    return v


def _top_k_sorted(scores, ranks, rows, k):
    """Best k along the last axis by (score desc, rank asc)."""
    neg, rk, rw = jax.lax.sort((-scores, ranks, rows), dimension=scores.ndim - 1, num_keys=2)
    return -neg[..., :k], rk[..., :k], rw[..., :k]


def make_chunk_scorer(mesh: Mesh, k: int, use_hessian: bool, unit_norm: bool):
    """A jit-compiled step folding one train chunk into the running top-k."""

    def local(queries, vecs, valid, ranks, rows, r_inv_sqrt):
        t = transform(vecs, r_inv_sqrt if use_hessian else None, unit_norm)
        s = jnp.matmul(queries, t.T, precision=jax.lax.Precision.HIGHEST)  # [Q, C_local]
        s = jnp.where(valid[None, :], s, NEG_INF)
        # lax.top_k puts the lower index first among equal scores, and stream_rows
        # orders each device's rows by id rank: so this is (score desc, id asc) too,
        # without sorting the whole [Q, C] block.
        vals, idx = jax.lax.top_k(s, min(k, vecs.shape[0]))
        top = (vals, ranks[idx], rows[idx])
        # Gather every device's local top-k and merge them (same result on all).
        gathered = [jax.lax.all_gather(a, shd.DATA, axis=1, tiled=True) for a in top]
        return _top_k_sorted(*gathered, min(k, gathered[0].shape[1]))

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(shd.DATA, None), P(shd.DATA), P(shd.DATA), P(shd.DATA), P()),
        out_specs=(P(), P(), P()),
        check_vma=False,
    )

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(best_s, best_r, best_row, queries, vecs, valid, ranks, rows, r_inv_sqrt):
        s, r, row = sharded(queries, vecs, valid, ranks, rows, r_inv_sqrt)
        return _top_k_sorted(
            jnp.concatenate([best_s, s], axis=1),
            jnp.concatenate([best_r, r], axis=1),
            jnp.concatenate([best_row, row], axis=1),
            k,
        )

    return step


def score(
    query_path: str,
    train_path: str,
    *,
    hessian: Hessian | None = None,
    k: int = 10,
    unit_norm: bool = True,
    chunk_rows: int = 4096,
    mesh: Mesh | None = None,
    out_path: str | None = None,
) -> ScoreResult:
    """Exact top-k train examples for every query.

    Args:
      query_path: the query index.
      train_path: the train index (streamed).
      hessian: R^-1/2 to apply to both sides, or None.
      k: proponents per query.
      unit_norm: normalise both sides (TrackStar) or not (the ablations).
      chunk_rows: train rows per streamed chunk.
      mesh: the mesh (default: all devices along data).
      out_path: if given, process 0 writes the results there as JSONL.

    Raises:
      ManifestMismatchError: if the indices (or the Hessian) are not comparable.
    """
    queries_idx = index_lib.open(query_path)
    train = index_lib.open(train_path)
    index_lib.check_compatible(train.manifest, queries_idx.manifest, '(train vs query)')
    if hessian is not None:
        index_lib.check_compatible(train.manifest, hessian.manifest, '(index vs Hessian)')
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}.')
    mesh = mesh or streaming.default_mesh()
    rep = shd.replicated(mesh)
    r_mat = (
        jax.device_put(hessian.r_inv_sqrt, rep)
        if hessian is not None
        else jax.device_put(np.zeros((1, 1, 1), np.float32), rep)
    )
    queries = jax.jit(
        lambda v, r: transform(v, r if hessian is not None else None, unit_norm), out_shardings=rep
    )(jax.device_put(queries_idx.read(slice(0, len(queries_idx))), rep), r_mat)
    # Ties are broken by example id: rank = position of the id in sorted order.
    id_rank = np.empty(len(train), np.int32)
    id_rank[np.argsort(np.asarray(train.ids, dtype=object), kind='stable')] = np.arange(
        len(train), dtype=np.int32
    )
    nq = len(queries_idx)
    best = (
        jax.device_put(np.full((nq, k), -np.inf, np.float32), rep),
        jax.device_put(np.full((nq, k), np.iinfo(np.int32).max, np.int32), rep),
        jax.device_put(np.full((nq, k), -1, np.int32), rep),
    )
    step = make_chunk_scorer(mesh, k, hessian is not None, unit_norm)
    t0 = time.time()
    chunks = streaming.stream_rows(train, mesh, chunk_rows, rank=id_rank, sort_by_rank=True)
    for i, (vecs, valid, rows, ranks) in enumerate(chunks):
        # At most two chunks in flight: memory stays flat however long the index is.
        jax.block_until_ready(best)
        best = step(*best, queries, vecs, valid, ranks, rows, r_mat)
        if i % 16 == 0:
            done = min((i + 1) * chunk_rows, len(train))
            rate = done / max(time.time() - t0, 1e-9)
            logging.info(
                'Scoring %d queries: %d/%d train rows, %.0f rows/s, ETA %.0fs',
                nq,
                done,
                len(train),
                rate,
                (len(train) - done) / rate,
            )
    scores, _, rows = (np.asarray(jax.device_get(a)) for a in best)
    ids = [[train.ids[r] if r >= 0 else '' for r in row] for row in rows]
    result = ScoreResult(list(queries_idx.ids), ids, rows, scores)
    if out_path and jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        result.to_jsonl(out_path)
    return result
