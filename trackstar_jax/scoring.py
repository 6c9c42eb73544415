"""Exact top-k scoring of every query against the whole train index (paper Eq. 1-2).

    I(z_m, z_q) = Ḡ(z_m) · Ḡ(z_q),   Ḡ = G / ||G||,   G = M φ   (M: a preconditioner)

The train index is streamed once for all queries, chunk by chunk, never loaded whole
and never turned into a dense N x Q matrix. Each chunk is split along the mesh's
``data`` axis; every device scores its rows against all queries and keeps its local
top-k (``shard_map``), the local lists are all-gathered and merged, and the merged list
is merged with the running one. Order is (score descending, example id ascending), so
ties are broken by id and results do not depend on chunking or device count.

The compiled steps are cached per (mesh, k, preconditioner kind, unit_norm): every
method and chunk of the same shape reuses one executable.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import zlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from trackstar_jax import index as index_lib
from trackstar_jax import preconditioners as precond_lib
from trackstar_jax import sharding as shd
from trackstar_jax import streaming
from trackstar_jax.index import Index
from trackstar_jax.preconditioners import Preconditioner


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """How queries are scored.

    Attributes:
      k: proponents per query (the highest scores).
      unit_norm: normalise both sides after preconditioning (TrackStar) or not.
      chunk_rows: train rows per streamed chunk.
      opponents: opponents per query (the most negative scores, from the same pass;
        0: none).
    """

    k: int = 10
    unit_norm: bool = True
    chunk_rows: int = 4096
    opponents: int = 0


NEG_INF = -jnp.inf


@dataclasses.dataclass
class ScoreResult:
    """Top-k proponents per query.

    Attributes:
      query_ids: [Q] query example ids.
      ids: [Q][k] train example ids, best first.
      rows: int [Q, k] train index rows.
      scores: float32 [Q, k].
      opponent_ids: [Q][o] train example ids of the most negative scores, most negative
        first (empty lists when no opponents were asked for).
      opponent_rows: int [Q, o].
      opponent_scores: float32 [Q, o].
    """

    query_ids: list[str]
    ids: list[list[str]]
    rows: np.ndarray
    scores: np.ndarray
    opponent_ids: list[list[str]] = dataclasses.field(default_factory=list)
    opponent_rows: np.ndarray | None = None
    opponent_scores: np.ndarray | None = None

    def records(self):
        """Yields {'query_id', 'rank', 'example_id', 'row', 'score'} (rank from 1), and
        for opponents the same with rank -1, -2, ... (most negative first)."""
        sides = [(self.ids, self.rows, self.scores, 1)]
        if self.opponent_rows is not None:
            sides.append((self.opponent_ids, self.opponent_rows, self.opponent_scores, -1))
        for q, qid in enumerate(self.query_ids):
            for ids, rows, scores, sign in sides:
                for r in range(rows.shape[1]):
                    if rows[q, r] >= 0:
                        yield {
                            'query_id': qid,
                            'rank': sign * (r + 1),
                            'example_id': ids[q][r],
                            'row': int(rows[q, r]),
                            'score': float(scores[q, r]),
                        }

    def to_jsonl(self, path: str) -> str:
        """Writes :meth:`records` as JSONL (atomically), with its checksum beside it."""
        text = ''.join(json.dumps(r) + '\n' for r in self.records())
        return index_lib.write_checked(path, text.encode())

    @classmethod
    def from_jsonl(cls, path: str) -> ScoreResult:
        """Reads :meth:`to_jsonl`'s file back, verified against its checksum.

        A query with fewer entries than the others is padded with row -1 and score -inf.
        """
        records = [json.loads(line) for line in index_lib.read_checked(path).splitlines()]
        query_ids = list(dict.fromkeys(r['query_id'] for r in records))
        where = {q: i for i, q in enumerate(query_ids)}

        def side(sign):
            mine = [r for r in records if r['rank'] * sign > 0]
            k = max((abs(r['rank']) for r in mine), default=0)
            ids = [[''] * k for _ in query_ids]
            rows = np.full((len(query_ids), k), -1, np.int32)
            scores = np.full((len(query_ids), k), -np.inf, np.float32)
            for r in mine:
                q, j = where[r['query_id']], abs(r['rank']) - 1
                ids[q][j], rows[q, j], scores[q, j] = r['example_id'], r['row'], r['score']
            return ids, rows, scores, bool(mine)

        ids, rows, scores, _ = side(1)
        o_ids, o_rows, o_scores, any_opponents = side(-1)
        if not any_opponents:
            return cls(query_ids, ids, rows, scores)
        return cls(query_ids, ids, rows, scores, o_ids, o_rows, o_scores)


def transform(
    vectors: jax.Array, apply: precond_lib.ApplyFn, arrays: Any, unit_norm: bool
) -> jax.Array:
    """G = M φ (``apply(arrays, ·)``), then Ḡ = G / ||G|| (zero vectors stay zero)."""
    v = apply(arrays, vectors.astype(jnp.float32))
    if unit_norm:
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        v = v / jnp.where(norm > 0, norm, 1.0)
    return v


def _top_k_sorted(scores, ranks, rows, k):
    """Best k along the last axis by (score desc, rank asc)."""
    neg, rk, rw = jax.lax.sort((-scores, ranks, rows), dimension=scores.ndim - 1, num_keys=2)
    return -neg[..., :k], rk[..., :k], rw[..., :k]


@functools.cache
def query_transform(mesh: Mesh, kind: str, unit_norm: bool):
    """The jit-compiled query-side transform (replicated), one per (mesh, kind, unit_norm)."""
    apply = precond_lib.get(kind).apply
    return jax.jit(
        lambda v, arrays: transform(v, apply, arrays, unit_norm),
        out_shardings=shd.replicated(mesh),
    )


@functools.cache
def fold_queries(mesh: Mesh, kind: str, unit_norm: bool):
    """The jit-compiled query side of a folded score: M (M q / ||M q||) (replicated).

    For a symmetric M, (M q / ||M q||)·(M v) = [M (M q / ||M q||)]·v: the train rows are
    then scored as they are stored, divided by their cached ||M v|| (:func:`row_norms`).
    """
    apply = precond_lib.get(kind).apply
    return jax.jit(
        lambda v, arrays: apply(arrays, transform(v, apply, arrays, unit_norm)),
        out_shardings=shd.replicated(mesh),
    )


@functools.cache
def make_chunk_scorer(
    mesh: Mesh, k: int, kind: str, unit_norm: bool, opponents: int = 0, row_scaled: bool = False
):
    """The jit-compiled step folding one train chunk into the running top-k (cached).

    ``step(state, queries, vecs, valid, ranks, rows, arrays) -> state``, where state is
    ((scores, ranks, rows) of the k best,) and, with ``opponents`` > 0, also those of the
    ``opponents`` most negative scores (kept as the top of -score: the same exact merge,
    ties again by id). :func:`initial_state` makes the empty state. With ``row_scaled``
    the rows are not transformed: ``arrays`` is {'inv_norms': [N]} and row r's scores are
    multiplied by inv_norms[r] (the folded path, see :func:`fold_queries`).
    """
    apply = precond_lib.get(kind).apply
    sizes = (k, opponents) if opponents else (k,)

    def local(queries, vecs, valid, ranks, rows, arrays):
        if row_scaled:
            t = vecs.astype(jnp.float32)
        else:
            t = transform(vecs, apply, arrays, unit_norm)
        s = jnp.matmul(queries, t.T, precision=jax.lax.Precision.HIGHEST)  # [Q, C_local]
        if row_scaled:
            s = s * arrays['inv_norms'][jnp.maximum(rows, 0)][None, :]
        # Columns in id-rank order (the [Q, C] scores move, not the [C, D] rows).
        order = jnp.argsort(ranks)
        s, valid, ranks, rows = s[:, order], valid[order], ranks[order], rows[order]
        out = []
        for sign, size in zip((1.0, -1.0), sizes, strict=False):
            signed = jnp.where(valid[None, :], sign * s, NEG_INF)
            # lax.top_k puts the lower index first among equal scores, and the columns
            # are in id-rank order: so this is (score desc, id asc) too, without sorting
            # the whole [Q, C] block.
            vals, idx = jax.lax.top_k(signed, min(size, vecs.shape[0]))
            top = (vals, ranks[idx], rows[idx])
            # Gather every device's local top-k and merge them (same result on all).
            gathered = [jax.lax.all_gather(a, shd.DATA, axis=1, tiled=True) for a in top]
            out.append(_top_k_sorted(*gathered, min(size, gathered[0].shape[1])))
        return tuple(out)

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(shd.DATA, None), P(shd.DATA), P(shd.DATA), P(shd.DATA), P()),
        out_specs=tuple((P(), P(), P()) for _ in sizes),
        check_vma=False,
    )

    @partial(jax.jit, donate_argnums=(0,))
    def step(state, queries, vecs, valid, ranks, rows, arrays):
        new = sharded(queries, vecs, valid, ranks, rows, arrays)
        return tuple(
            _top_k_sorted(
                *(jnp.concatenate(pair, axis=1) for pair in zip(old, got, strict=True)), size
            )
            for old, got, size in zip(state, new, sizes, strict=True)
        )

    return step


def initial_state(mesh: Mesh, num_queries: int, k: int, opponents: int = 0) -> tuple:
    """The empty running state of :func:`make_chunk_scorer`'s step, replicated on ``mesh``."""
    rep = shd.replicated(mesh)

    def empty(size):
        return (
            jax.device_put(np.full((num_queries, size), -np.inf, np.float32), rep),
            jax.device_put(np.full((num_queries, size), np.iinfo(np.int32).max, np.int32), rep),
            jax.device_put(np.full((num_queries, size), -1, np.int32), rep),
        )

    return tuple(empty(size) for size in ((k, opponents) if opponents else (k,)))


def id_ranks(ids: list[str]) -> np.ndarray:
    """Each id's position in sorted order (int32): the tie-break key."""
    rank = np.empty(len(ids), np.int32)
    rank[np.argsort(np.asarray(ids, dtype=object), kind='stable')] = np.arange(
        len(ids), dtype=np.int32
    )
    return rank


_NORM_CACHE = 'cache/row_norms_'


@functools.cache
def _norm_step(mesh: Mesh, kind: str):
    apply = precond_lib.get(kind).apply
    return jax.jit(
        lambda vecs, arrays: jnp.linalg.norm(apply(arrays, vecs.astype(jnp.float32)), axis=-1)
    )


def row_norms(
    train: Index, preconditioner: Preconditioner, *, mesh: Mesh | None = None, chunk_rows=4096
) -> np.ndarray:
    """||M v|| of every train row (float32 [N]): read from the index's cache, or computed
    in one streaming pass and cached there (keyed by the preconditioner's digest and the
    index manifest; verified by CRC-32 on read, recomputed if it does not match). With
    no preconditioner over float32 rows: the norms the index stored with them."""
    if preconditioner.kind == 'none' and train.manifest['dtype'] == 'float32':
        return train.norms()  # stored beside the vectors at write time, verified
    mesh = mesh or streaming.default_mesh()
    store = index_lib.Store(train.path)
    key = _NORM_CACHE + preconditioner.digest()
    manifest = index_lib.manifest_digest(train.manifest)
    if store.exists(key + '.json'):
        meta = store.read_json(key + '.json')
        data = store.read_bytes(key + '.bin') if store.exists(key + '.bin') else b''
        if (
            meta.get('manifest') == manifest
            and meta.get('rows') == len(train)
            and meta.get('crc32') == f'{zlib.crc32(data):08x}'
        ):
            return np.frombuffer(data, np.float32).copy()
        logging.warning('%s: cached row norms do not match; recomputing them.', train.path)
    arrays = preconditioner.device_arrays(mesh)
    step = _norm_step(mesh, preconditioner.kind)
    out = np.zeros(len(train), np.float32)
    for vecs, valid, rows, _ in streaming.stream_rows(train, mesh, chunk_rows):
        norms, valid, rows = (
            multihost_utils.process_allgather(a, tiled=True)
            for a in (step(vecs, arrays), valid, rows)
        )
        out[rows[valid]] = norms[valid]
    if jax.process_index() == 0:
        data = out.tobytes()
        meta = {'manifest': manifest, 'rows': len(train), 'crc32': f'{zlib.crc32(data):08x}'}
        try:  # the bytes first, the entry naming them last
            store.write_bytes(key + '.bin', data)
            store.write_json(key + '.json', {**meta, 'kind': preconditioner.kind})
        except Exception as e:  # noqa: BLE001 - a read-only index still scores
            logging.warning('%s: cannot cache row norms (%s); they are recomputed next time.',
                            train.path, e)  # fmt: skip
    return out


def score(
    queries_idx: Index,
    train: Index,
    preconditioner: Preconditioner | None = None,
    config: ScoreConfig = ScoreConfig(),
    *,
    mesh: Mesh | None = None,
    out_path: str | None = None,
) -> ScoreResult:
    """Exact top-k train examples for every query.

    Args:
      queries_idx: the query index.
      train: the train index (streamed).
      preconditioner: M, applied to both sides (None: identity).
      config: k, unit norm, chunk size.
      mesh: the mesh (default: all devices along data).
      out_path: if given, process 0 writes the results there as JSONL.

    Raises:
      ManifestMismatchError: if the indices (or the preconditioner) are not comparable.
    """
    index_lib.check_compatible(train.manifest, queries_idx.manifest, '(train vs query)')
    if preconditioner is None:
        preconditioner = precond_lib.identity(train.manifest)
    index_lib.check_compatible(train.manifest, preconditioner.manifest, '(index vs preconditioner)')
    k = config.k
    if k < 1:
        raise ValueError(f'k must be >= 1, got {k}.')
    if k > len(train):
        logging.warning(
            'k = %d > the %d rows of %s: returning all of them.', k, len(train), train.path
        )
        k = len(train)
    mesh = mesh or streaming.default_mesh()
    rep = shd.replicated(mesh)
    arrays = preconditioner.device_arrays(mesh)
    raw_queries = jax.device_put(queries_idx.read(slice(0, len(queries_idx))), rep)
    nq = len(queries_idx)
    opponents = min(max(config.opponents, 0), len(train))
    state = initial_state(mesh, nq, k, opponents)
    if precond_lib.get(preconditioner.kind).symmetric:
        # M is applied to the Q queries (twice), not to the N train rows: the rows are
        # scored as stored, divided by ||M v|| (cached beside the index after one pass).
        queries = fold_queries(mesh, preconditioner.kind, config.unit_norm)(raw_queries, arrays)
        if config.unit_norm:
            norms = row_norms(train, preconditioner, mesh=mesh, chunk_rows=config.chunk_rows)
            inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
            arrays = {'inv_norms': jax.device_put(inv.astype(np.float32), rep)}
        step = make_chunk_scorer(mesh, k, 'none', False, opponents, config.unit_norm)
    else:
        queries = query_transform(mesh, preconditioner.kind, config.unit_norm)(raw_queries, arrays)
        step = make_chunk_scorer(mesh, k, preconditioner.kind, config.unit_norm, opponents)
    t0 = time.time()
    chunks = streaming.stream_rows(train, mesh, config.chunk_rows, rank=id_ranks(train.ids))
    for i, (vecs, valid, rows, ranks) in enumerate(chunks):
        # At most two chunks in flight: memory stays flat however long the index is.
        jax.block_until_ready(state)
        state = step(state, queries, vecs, valid, ranks, rows, arrays)
        if i % 16 == 0:
            done = min((i + 1) * vecs.shape[0], len(train))
            rate = done / max(time.time() - t0, 1e-9)
            logging.info(
                'Scoring %d queries: %d/%d train rows, %.0f rows/s, ETA %.0fs',
                nq,
                done,
                len(train),
                rate,
                (len(train) - done) / rate,
            )

    def host(triple, sign):
        scores, _, rows = (np.asarray(jax.device_get(a)) for a in triple)
        return [[train.ids[r] if r >= 0 else '' for r in row] for row in rows], rows, sign * scores

    ids, rows, scores = host(state[0], 1.0)
    result = ScoreResult(list(queries_idx.ids), ids, rows, scores)
    if opponents:
        result.opponent_ids, result.opponent_rows, result.opponent_scores = host(state[1], -1.0)
    if out_path and jax.process_index() == 0:
        if index_lib.is_local(out_path):
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        result.to_jsonl(out_path)
    return result


def folded_side(
    raw_queries: np.ndarray,
    train: Index,
    preconditioner: Preconditioner,
    unit_norm: bool,
    *,
    mesh: Mesh | None = None,
    chunk_rows: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """(queries, row_scale) with q·M·M·v (unit_norm: over ||M q|| ||M v||) equal to
    ``queries @ v * row_scale`` for the stored rows v of ``train``: a symmetric M folded
    into the queries and the train side's norms into a per-row scale (all ones without
    unit norm), so rows are scored as stored.
    """
    if not precond_lib.get(preconditioner.kind).symmetric:
        raise ValueError(
            f'Preconditioner kind {preconditioner.kind!r} is not symmetric: it cannot be '
            'folded into the queries.'
        )
    index_lib.check_compatible(train.manifest, preconditioner.manifest, '(index vs preconditioner)')
    mesh = mesh or streaming.default_mesh()
    rep = shd.replicated(mesh)
    arrays = preconditioner.device_arrays(mesh)
    q = fold_queries(mesh, preconditioner.kind, unit_norm)(jax.device_put(raw_queries, rep), arrays)
    scale = np.ones(len(train), np.float32)
    if unit_norm:
        norms = row_norms(train, preconditioner, mesh=mesh, chunk_rows=chunk_rows)
        scale = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
    return np.asarray(q), scale


@functools.cache
def make_sum_scorer(mesh: Mesh, unit_norm: bool):
    """The jit-compiled step adding one chunk's weighted scores into per-example sums.

    ``step(acc [Q, E], queries [G, Q, D], vecs [C, D], valid [C], group [C], weight [C],
    example [C]) -> acc``: row c adds ``weight[c] * queries[group[c]] · vecs[c]`` to
    column ``example[c]`` (rows of one example at several steps accumulate).
    """
    apply = precond_lib.get('none').apply

    @partial(jax.jit, donate_argnums=(0,), out_shardings=shd.replicated(mesh))
    def step(acc, queries, vecs, valid, group, weight, example):
        t = transform(vecs, apply, None, unit_norm)
        s = jnp.einsum('gqd,cd->gqc', queries, t, precision=jax.lax.Precision.HIGHEST)
        picked = s[group, :, jnp.arange(t.shape[0])]  # [C, Q]: each row's own queries
        contrib = jnp.where(valid, weight, 0.0)[:, None] * picked
        return acc.at[:, example].add(contrib.T)

    return step


@dataclasses.dataclass(frozen=True)
class RowSource:
    """An index whose rows add into per-example sums, and how each row adds.

    Attributes:
      index: the index of rows.
      group: [N] which query matrix scores each row.
      weight: [N] each row's weight (0: left out).
      example: [N] each row's example number, an index into the example ids.
    """

    index: Index
    group: np.ndarray
    weight: np.ndarray
    example: np.ndarray

    def __post_init__(self):
        n = len(self.index)
        if not len(self.group) == len(self.weight) == len(self.example) == n:
            raise ValueError(
                f'{self.index.path}: {n} rows but group/weight/example of lengths '
                f'{len(self.group)}/{len(self.weight)}/{len(self.example)}.'
            )


def score_summed(
    queries: list[np.ndarray],
    query_ids: list[str],
    train: Index,
    group: np.ndarray,
    weight: np.ndarray,
    example: np.ndarray,
    example_ids: list[str],
    config: ScoreConfig = ScoreConfig(),
    *,
    mesh: Mesh | None = None,
) -> ScoreResult:
    """Exact top-k examples by a weighted sum of scores over their rows of one index.

    score(q, e) = Σ_{rows r of e} weight[r] · q_{group[r]} · v_r: TracIn-CP over a
    training-time index, where an example has one row per recorded step. See
    :func:`score_summed_sources` (this is it with one source).
    """
    return score_summed_sources(
        queries,
        query_ids,
        [RowSource(train, group, weight, example)],
        example_ids,
        config,
        mesh=mesh,
    )


def score_summed_sources(
    queries: list[np.ndarray],
    query_ids: list[str],
    sources: Sequence[RowSource],
    example_ids: list[str],
    config: ScoreConfig = ScoreConfig(),
    *,
    mesh: Mesh | None = None,
) -> ScoreResult:
    """Exact top-k examples by a weighted sum of scores over their rows in several indices.

    score(q, e) = Σ_{sources s} Σ_{rows r of e in s} weight_s[r] · q_{group_s[r]} · v_r
    (both sides unit-normed first with ``config.unit_norm``): TracIn-CP over a
    training-time index (one source, a row per recorded step) or over one index per
    saved checkpoint (one source each). The per-example sums are a dense [Q, E] array on
    every device (E examples, not rows); each index is streamed once.

    Args:
      queries: G query matrices [Q, D] (the same queries featurized at G checkpoints).
      query_ids: the Q query ids.
      sources: the indices of rows and how their rows add.
      example_ids: the E example ids, sorted (their order breaks ties).
      config: k, opponents, unit norm, chunk size.
      mesh: the mesh (default: all devices along data).

    Returns:
      A ScoreResult whose ``rows`` are example numbers (indices into ``example_ids``).
    """
    mesh = mesh or streaming.default_mesh()
    rep = shd.replicated(mesh)
    num_q, num_e = len(query_ids), len(example_ids)
    k = min(config.k, num_e)
    if k < 1:
        raise ValueError(f'k must be >= 1, got {config.k}.')
    if num_q * num_e > 2**31:
        raise ValueError(
            f'{num_q} queries x {num_e} examples do not fit one dense sum array: score the '
            'queries in groups.'
        )
    stacked = np.stack([np.asarray(q, np.float32) for q in queries])
    if config.unit_norm:
        norms = np.linalg.norm(stacked, axis=-1, keepdims=True)
        stacked = stacked / np.where(norms > 0, norms, 1.0)
    qs = jax.device_put(stacked, rep)
    acc = jax.device_put(np.zeros((num_q, num_e), np.float32), rep)
    step = make_sum_scorer(mesh, config.unit_norm)
    for src in sources:
        if (
            len(src.example)
            and not 0 <= int(np.min(src.example)) <= int(np.max(src.example)) < num_e
        ):
            raise ValueError(f'{src.index.path}: example numbers outside [0, {num_e}).')
        if len(src.group) and not 0 <= int(np.min(src.group)) <= int(np.max(src.group)) < len(
            queries
        ):
            raise ValueError(f'{src.index.path}: groups outside [0, {len(queries)}).')
        per_row = [
            jax.device_put(np.asarray(a, dt), rep)
            for a, dt in ((src.group, np.int32), (src.weight, np.float32), (src.example, np.int32))
        ]
        n, t0 = len(src.index), time.time()
        if n == 0:
            continue
        for i, (vecs, valid, rows, _) in enumerate(
            streaming.stream_rows(src.index, mesh, config.chunk_rows)
        ):
            jax.block_until_ready(acc)
            safe = jnp.clip(rows, 0, n - 1)
            acc = step(acc, qs, vecs, valid, *(a[safe] for a in per_row))
            if i % 16 == 0:
                done = min((i + 1) * vecs.shape[0], n)
                logging.info(
                    'Summed scores over %s: %d/%d rows, %.0f rows/s',
                    src.index.path,
                    done,
                    n,
                    done / max(time.time() - t0, 1e-9),
                )
    totals = np.asarray(jax.device_get(acc))

    def top(sign, size):
        # Stable argsort of -score: ties keep example order, i.e. by id (ids are sorted).
        order = np.argsort(-sign * totals, axis=1, kind='stable')[:, :size]
        picked = np.take_along_axis(totals, order, axis=1)
        return [[example_ids[j] for j in row] for row in order], order.astype(np.int32), picked

    ids, rows, scores = top(1.0, k)
    result = ScoreResult(list(query_ids), ids, rows, scores.astype(np.float32))
    opponents = min(max(config.opponents, 0), num_e)
    if opponents:
        o_ids, o_rows, o_scores = top(-1.0, opponents)
        result.opponent_ids, result.opponent_rows = o_ids, o_rows
        result.opponent_scores = o_scores.astype(np.float32)
    return result
