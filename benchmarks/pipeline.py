"""Benchmarks of the featurize -> fit -> score pipeline on synthetic indices.

Measures, in one run (so every ratio compares numbers taken side by side):

1. Scoring throughput (train rows/s) of ``pipeline.score`` with and without a mixed
   preconditioner (block R^-1/2), against plain in-memory jit'd baselines of the same
   sizes: ``queries @ chunk.T`` alone, and the same plus a running ``lax.top_k`` (with
   R^-1/2, also the same math as the library done in memory: R^-1/2 per block, unit
   norm, matmul, top-k). The library compiles its chunk step once per (mesh, k, kind,
   unit_norm) and reuses it, so each configuration's first ``score`` call (compile
   included) is timed apart and the repeats are steady-state calls. Without R it also
   splits the library's time into its parts: TensorStore read through
   ``streaming.stream_rows``, the jit'd chunk step of ``scoring.make_chunk_scorer`` on
   staged chunks, and the ``scoring._top_k_sorted`` sort inside it.
2. Index write and read MB/s (TensorStore zarr3, float32 and bfloat16).
3. ``pipeline.fit`` ('mixed', λ auto) time against one in-memory block-diagonal XᵀX of
   the same rows, with fit's parts (``hessian.autocorrelation`` passes,
   ``hessian.sorted_eigs``, ``hessian.inverse_sqrt``) timed inside the real call.
4. Peak RSS (VmHWM) of ``score`` and ``fit`` over an index of N and 4N rows, each in a
   fresh subprocess, next to an idle process that has imported the same modules.

The synthetic indices are written through the library's own storage API
(``index.create`` and ``IndexWriter.write_chunk``: manifest, ids, zarr3
vectors/norms/num_targets and a commit marker per chunk). Their manifest is
``pipeline.manifest_for`` of the test fixtures' featurizer with a ``GradientSpec`` whose D
is the one wanted, so the vectors are random but everything the library checks is
genuine. Fit and score are the library's real code paths.

Usage (from the repository root)::

    python benchmarks/pipeline.py            # full run, ~15 min on 2 cores
    python benchmarks/pipeline.py --quick    # ~2 min smoke run

Results go to ``benchmarks/results/pipeline.json`` (``pipeline_quick.json`` with
``--quick``; ``--out`` elsewhere), with the command line, JAX version, devices, the
library fingerprint and a timestamp.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import harness
import numpy as np

K = 10
SCORE_CHUNK = 4096  # ScoreConfig's default chunk_rows; the baselines use the same chunks
STORE_CHUNK = 256  # IndexConfig's default chunk_rows (storage chunk and commit unit)
NUM_BLOCKS = 4  # the fixture model: 2 layers x (attention, MLP)
LIBRARY_FILES = (
    'index.py',
    'streaming.py',
    'scoring.py',
    'hessian.py',
    'preconditioners.py',
    'pipeline.py',
    'sharding.py',
    'data',
)


# ----------------------------------------------------------------------------- indices


def template_manifest(block_dim: int) -> dict[str, Any]:
    """``pipeline.manifest_for`` of the test fixtures' featurizer at this block size, with D.

    D = NUM_BLOCKS * block_dim (the fixture model has 2 layers, attention and MLP split).
    """
    from tests import pipeline_fixtures as fx
    from trackstar_jax import grads, pipeline

    spec = grads.GradientSpec(block_dim=block_dim, num_layer_blocks=2, seed=3)
    feat = fx.featurizer(spec=spec)
    assert feat.dim == NUM_BLOCKS * block_dim, feat.dim
    return {**pipeline.manifest_for(feat, fx.SEQ_LEN, {'synthetic': True}), 'dim': feat.dim}


def write_synthetic(
    path: str,
    template: dict[str, Any],
    n: int,
    *,
    dtype: str = 'float32',
    chunk_rows: int = STORE_CHUNK,
    seed: int = 0,
) -> dict[str, float]:
    """Writes an n-row index of random vectors with ``index.create`` / ``write_chunk``.

    Rows are a fixed random block of ``chunk_rows`` rows, column-rolled differently per
    chunk and scaled per row (cheap to make, all scores distinct). 'seconds' times the
    vector writes alone (from the call of ``write_chunk`` to its 'vectors_written'
    hook: the cast to the storage dtype and the TensorStore write); 'chunk_seconds' the
    whole ``write_chunk`` calls (plus norms, num_targets and the commit marker).

    Returns:
      {'seconds', 'chunk_seconds', 'stored_mb', 'rows'}.
    """
    from trackstar_jax import index

    d = int(template['dim'])
    ids = [f'ex-{i:08d}' for i in range(n)]
    writer = index.create(path, template, ids, dim=d, dtype=dtype, chunk_rows=chunk_rows)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((chunk_rows, d), dtype=np.float32)
    scales = rng.uniform(0.5, 2.0, n).astype(np.float32)
    seconds = chunk_seconds = 0.0
    for c in range(writer.num_chunks):
        start, stop = writer.rows(c)
        vecs = np.roll(base, 7 * c + 1, axis=1)[: stop - start] * scales[start:stop, None]
        marks: dict[str, float] = {}

        def hook(event: str, chunk: int, marks=marks) -> None:
            marks[event] = time.perf_counter()

        t0 = time.perf_counter()
        writer.write_chunk(c, vecs, np.full(stop - start, 8.0, np.float32), fault_hook=hook)
        chunk_seconds += time.perf_counter() - t0
        seconds += marks['vectors_written'] - t0
    writer.finish()  # checks every chunk is committed
    stored = n * d * np.dtype(index.DTYPES[dtype]).itemsize / 2**20
    return {'seconds': seconds, 'chunk_seconds': chunk_seconds, 'stored_mb': stored, 'rows': n}


def read_throughput(path: str, repeats: int) -> dict[str, float]:
    """MB/s (stored bytes) of reading a whole index with ``Index.chunks`` (float32 out)."""
    from trackstar_jax import index

    idx = index.open(path)
    itemsize = np.dtype(index.DTYPES[idx.manifest['dtype']]).itemsize
    stored = len(idx) * idx.dim * itemsize / 2**20

    def run() -> int:
        return sum(v.shape[0] for _, v in idx.chunks(SCORE_CHUNK))

    med, times, _ = harness.timed(run, repeats)
    return {'stored_mb': stored, 'seconds': med, 'all_seconds': times, 'mb_s': stored / med}


# ----------------------------------------------------------------------------- scoring


def _in_memory(path: str):
    """The whole index as a device array [N, D] float32."""
    import jax.numpy as jnp

    from trackstar_jax import index

    idx = index.open(path)
    return jnp.asarray(idx.read(slice(0, len(idx))))


def baselines(queries, train, r_inv_sqrt) -> dict[str, Callable[[], None]]:
    """Plain in-memory, jit'd baselines over ``train`` split in SCORE_CHUNK-row chunks.

    Without r_inv_sqrt: 'matmul' (queries @ chunk.T only) and 'matmul_topk' (plus a
    running lax.top_k merge). With r_inv_sqrt: 'same_math', what the library computes
    but in memory: R^-1/2 per block and unit norm on the chunk, matmul, running top-k.
    The queries are already transformed (as the library does once per call).

    Returns:
      name -> a function running that baseline once (already compiled), to completion.
    """
    import jax
    import jax.numpy as jnp

    n = train.shape[0]
    chunks = [train[s : s + SCORE_CHUNK] for s in range(0, n, SCORE_CHUNK)]
    q = queries.shape[0]

    mm = jax.jit(lambda a, b: a @ b.T)

    def merge(best_v, best_i, s, offset):
        v, i = jax.lax.top_k(s, K)
        v, j = jax.lax.top_k(jnp.concatenate([best_v, v], 1), K)
        return v, jnp.take_along_axis(jnp.concatenate([best_i, i + offset], 1), j, 1)

    @jax.jit
    def mm_topk(best_v, best_i, a, b, offset):
        return merge(best_v, best_i, a @ b.T, offset)

    @jax.jit
    def same_math(best_v, best_i, a, b, offset, r):
        nb, db, _ = r.shape
        t = jnp.einsum('nbi,bij->nbj', b.reshape(b.shape[0], nb, db), r).reshape(b.shape)
        t = t / jnp.linalg.norm(t, axis=1, keepdims=True)
        return merge(best_v, best_i, a @ t.T, offset)

    def run_mm(cs):
        jax.block_until_ready([mm(queries, c) for c in cs])

    def run_topk(cs, fn, *extra):
        best = (jnp.full((q, K), -jnp.inf, jnp.float32), jnp.zeros((q, K), jnp.int32))
        for i, c in enumerate(cs):
            best = fn(*best, queries, c, i * SCORE_CHUNK, *extra)
        jax.block_until_ready(best)

    if r_inv_sqrt is None:
        runs = {'matmul': run_mm, 'matmul_topk': lambda cs: run_topk(cs, mm_topk)}
    else:
        runs = {'same_math': lambda cs: run_topk(cs, same_math, r_inv_sqrt)}
    out = {}
    for name, fn in runs.items():
        fn(chunks[:1])  # compile (all chunks have the same shape)
        out[name] = lambda fn=fn: fn(chunks)
    return out


def raw_read(path: str) -> Callable[[], int]:
    """Reading every byte of the index's vector files in order, plain ``open().read()``:
    the storage's own speed, nothing decoded, checked or moved to a device."""
    files = sorted(
        os.path.join(d, f)
        for d, _, names in os.walk(os.path.join(path, 'vectors'))
        for f in names
        if f != 'zarr.json'
    )

    def run() -> int:
        total = 0
        for f in files:
            with open(f, 'rb') as fh:
                total += len(fh.read())
        return total

    return run


def score_breakdown(query_path: str, train_path: str, repeats: int) -> dict[str, float]:
    """Where ``score`` (no preconditioner, unit norm) spends its time, from its own pieces.

    read: iterating ``streaming.stream_rows`` as ``score`` does (its chunk size, rows
      with their id ranks, staged as jax arrays) over a held handle, each chunk dropped
      once staged.
    step: the jit'd chunk step ``score`` runs (``make_chunk_scorer(..., row_scaled=True)``:
      rows as stored, scores scaled by the stored 1/||v||) over chunks already staged.
    step_no_norm: the same step without the row scaling.
    compile: lowering + compiling the step, JAX's caches cleared first. ``score`` pays
      this on its first call only (its steps are cached per mesh, k, kind and
      unit_norm); ``score_first_call_seconds`` is that first call.
    """
    import jax

    from trackstar_jax import index, scoring, streaming
    from trackstar_jax import sharding as shd

    train, queries_idx = index.open(train_path), index.open(query_path)
    mesh = streaming.default_mesh()
    rep = shd.replicated(mesh)
    rank = scoring.id_ranks(train.ids)
    q = len(queries_idx)
    chunk = streaming.chunk_rows_for(train, mesh, SCORE_CHUNK)

    def chunks():
        return streaming.stream_rows(train, mesh, chunk, rank=rank)

    def read_all() -> None:
        for c in chunks():
            jax.block_until_ready(c)

    read_s, read_all_s, _ = harness.timed(read_all, repeats)
    staged = list(chunks())
    queries = scoring.fold_queries(mesh, 'none', True)(
        jax.device_put(queries_idx.read(slice(0, q)), rep), {}
    )
    inv = (1.0 / np.maximum(train.norms(), 1e-30)).astype(np.float32)
    scaled = {'inv_norms': jax.device_put(inv, rep)}

    def fresh_best():
        return scoring.initial_state(mesh, q, K)

    out = {'read_s': read_s, 'read_all_s': read_all_s, 'chunk_rows': chunk}
    for name, row_scaled in (('step', True), ('step_no_norm', False)):
        step = scoring.make_chunk_scorer(mesh, K, 'none', False, 0, row_scaled)
        arrays = scaled if row_scaled else {}
        vecs, valid, rows, ranks = staged[0]
        if row_scaled:
            # score has compiled this step already: drop JAX's in-process caches so
            # this is a real lowering + compile (the step recompiles below, untimed).
            jax.clear_caches()
            _, out['compile_s'] = harness.compile_timed(
                step, fresh_best(), queries, vecs, valid, ranks, rows, arrays
            )

        def run_steps(step=step, arrays=arrays):
            best = fresh_best()
            for vecs, valid, rows, ranks in staged:
                best = step(best, queries, vecs, valid, ranks, rows, arrays)
            jax.block_until_ready(best)

        run_steps()
        out[f'{name}_s'], out[f'{name}_all_s'], _ = harness.timed(run_steps, repeats)
    return out


def bench_scoring(
    query_path: str,
    train_path: str,
    precond,
    repeats: int,
    precond_repeats: int,
    breakdown: bool,
) -> dict[str, Any]:
    """Library score vs in-memory baselines for one (Q, D, N), without and with ``precond``.

    A first ``score`` call per configuration compiles the library's cached steps (its
    seconds are kept apart as ``score_first_call_seconds``); then score and its
    baselines run interleaved (``harness.interleaved``), and ratios are medians of the
    per-repeat ratios (a busy machine skews both sides alike). ``score`` is given index
    handles held across calls (as a job scoring several query sets holds them): each
    chunk was checked against its commit checksum on the handle's first read.
    ``score_fresh`` (``score_fresh_handle_seconds``) opens the indices from their URLs
    each call, so it also re-reads the ids and markers and hashes every stored byte.
    With R^-1/2 the plain matmul baselines are those of the no-preconditioner repeats
    (same sizes, same cost).
    """
    import jax.numpy as jnp

    from trackstar_jax import index, pipeline, scoring
    from trackstar_jax import preconditioners as precond_lib

    n = len(index.open(train_path))
    train = _in_memory(train_path)
    q_raw = _in_memory(query_path)
    r = jnp.asarray(precond.arrays['r_inv_sqrt'])
    config = pipeline.ScoreConfig(k=K, unit_norm=True, chunk_rows=SCORE_CHUNK)
    out: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    for label, m, reps in (('no_hessian', None, repeats), ('hessian', precond, precond_repeats)):
        kind = 'none' if m is None else m.kind
        arrays = {} if m is None else {'r_inv_sqrt': r}
        q = scoring.transform(q_raw, precond_lib.get(kind).apply, arrays, True)
        base_fns = baselines(q, train, None if m is None else r)
        if m is None:
            base_fns['raw_read'] = raw_read(train_path)

        held = (index.open(query_path), index.open(train_path))

        def score(m=m, held=held):
            return pipeline.score(*held, m, config)

        def score_fresh(m=m):
            return pipeline.score(query_path, train_path, m, config)

        t0 = time.perf_counter()
        score()
        first_s = time.perf_counter() - t0
        times = harness.interleaved({'score': score, 'score_fresh': score_fresh, **base_fns}, reps)
        fresh_all = times.pop('score_fresh')
        fresh_s = harness.median(fresh_all)
        runs = [{name: ts[i] for name, ts in times.items()} for i in range(reps)]
        if m is None:
            plain = {name: times[name] for name in base_fns}
        score_s = harness.median(times['score'])
        base = {name: harness.median(ts) for name, ts in plain.items()}
        base.update({name: harness.median(times[name]) for name in base_fns})
        entry = {
            'preconditioner': kind,
            'score_seconds': score_s,
            'score_all_seconds': times['score'],
            'score_first_call_seconds': first_s,
            'score_fresh_handle_seconds': fresh_s,
            'score_fresh_handle_rows_s': n / fresh_s,
            'score_fresh_handle_all_seconds': fresh_all,
            'score_rows_s': n / score_s,
            'baselines': {name: {'seconds': sec, 'rows_s': n / sec} for name, sec in base.items()},
            'runs': runs,
        }
        for name in base:
            if name in base_fns:  # same repeats: median of per-repeat ratios
                ratio = harness.median(r_[name] / r_['score'] for r_ in runs)
            else:
                ratio = base[name] / score_s
            entry[f'ratio_vs_{name}'] = ratio
        # The physical limit: the slower of computing (matmul + top-k in memory) and
        # reading the bytes (raw sequential read); score / limit in rows/s.
        limit_s = max(base['matmul_topk'], base['raw_read'])
        entry['limit'] = 'matmul_topk' if base['matmul_topk'] >= base['raw_read'] else 'raw_read'
        entry['score_over_limit'] = limit_s / score_s
        entry['score_over_matmul'] = base['matmul_topk'] / score_s
        out[label] = entry
    if breakdown:
        out['no_hessian']['breakdown'] = score_breakdown(query_path, train_path, repeats)
    del train
    return out


# ----------------------------------------------------------------------------- fit


@contextlib.contextmanager
def _timing(module, names: tuple[str, ...]) -> Iterator[dict[str, list[float]]]:
    """Wraps ``module.<name>`` functions with timers for the duration of the block."""
    log: dict[str, list[float]] = {name: [] for name in names}
    originals = {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                log[name].append(time.perf_counter() - t0)

        return timed

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def make_xtx(train, nb: int) -> Callable[[], float]:
    """A compiled in-memory block-diagonal XᵀX (einsum 'nbi,nbj->bij') of all rows.

    Returns:
      A function running it once and returning its seconds.
    """
    import jax
    import jax.numpy as jnp

    @jax.jit
    def f(x):
        v = x.reshape(x.shape[0], nb, -1)
        return jnp.einsum('nbi,nbj->bij', v, v, precision=jax.lax.Precision.HIGHEST)

    jax.block_until_ready(f(train))  # compile

    def run() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(f(train))
        return time.perf_counter() - t0

    return run


def bench_fit(train_path: str, query_path: str, repeats: int, full: bool):
    """``pipeline.fit`` ('mixed', λ auto) against one in-memory XᵀX of the same rows.

    Each repeat times the fit (or its passes) and then the XᵀX, and the ratios are the
    medians of the per-repeat ratios, so a busy machine skews both sides alike.

    full: time ``pipeline.fit(train, queries, FitConfig('mixed', lam='auto'))`` end to
      end, its parts timed inside the real call (``hessian.autocorrelation`` passes,
      ``hessian.sorted_eigs`` = eigvalsh, ``hessian.inverse_sqrt`` = eigh).
    not full (for big blocks, where the float64 eigen-decompositions take minutes): time
      the real ``hessian.autocorrelation`` passes each repeat, and once
      ``hessian.sorted_eigs`` / ``hessian.inverse_sqrt`` on one block of the real R and
      R_eval's spectrum as fit takes it (``hessian.low_rank_sorted_eigs`` from the
      queries when they are fewer than d_b); the fit estimate is the passes plus
      num_blocks x (eigvalsh of R_train + eigh of R) plus that, which is what the mixed
      fit runs. The preconditioner returned (for the scoring timings only)
      repeats block 0's R^-1/2 for every block.

    Returns:
      (results dict, a 'mixed' Preconditioner for the scoring benchmark).
    """
    from trackstar_jax import hessian, index, pipeline, preconditioners

    train_idx, query_idx = index.open(train_path), index.open(query_path)
    n, nb = len(train_idx), len(train_idx.manifest['layout']['block_names'])
    train = _in_memory(train_path)
    xtx_run = make_xtx(train, nb)
    config = pipeline.FitConfig(preconditioner='mixed', lam='auto')
    runs, precond, eig = [], None, None
    for _ in range(repeats):
        if full:
            names = ('autocorrelation', 'sorted_eigs', 'low_rank_sorted_eigs', 'inverse_sqrt')
            with _timing(hessian, names) as log:
                t0 = time.perf_counter()
                precond = pipeline.fit(train_path, query_path, config)
                total = time.perf_counter() - t0
            run = {
                'total': total,
                'autocorrelation_train': log['autocorrelation'][0],
                'autocorrelation_query': log['autocorrelation'][1],
                'eigvalsh': sum(log['sorted_eigs']) + sum(log['low_rank_sorted_eigs']),
                'eigh_inverse_sqrt': sum(log['inverse_sqrt']),
            }
        else:
            t0 = time.perf_counter()
            r_sum, _ = hessian.autocorrelation(train_idx, chunk_rows=config.chunk_rows)
            ac_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            hessian.autocorrelation(query_idx, chunk_rows=config.chunk_rows)
            ac_query = time.perf_counter() - t0
            if eig is None:
                r = r_sum[:1] / n
                t0 = time.perf_counter()
                hessian.sorted_eigs(r)
                eigvalsh_one = time.perf_counter() - t0
                t0 = time.perf_counter()
                block = hessian.inverse_sqrt(r, config.damping).astype(np.float32)
                eigh_one = time.perf_counter() - t0
                # R_eval's spectrum as fit takes it with fewer queries than d_b: from
                # the queries' Gram matrices, all blocks (otherwise one more eigvalsh).
                q_rows = len(query_idx)
                eval_s = nb * eigvalsh_one
                if q_rows < r.shape[1]:
                    t0 = time.perf_counter()
                    hessian.low_rank_sorted_eigs(query_idx.read(slice(0, q_rows)), nb)
                    eval_s = time.perf_counter() - t0
                eig = {
                    'eigvalsh_one_block': eigvalsh_one,
                    'eigh_one_block': eigh_one,
                    'eigvalsh_eval_all_blocks': eval_s,
                }
                precond = preconditioners.Preconditioner(
                    'mixed',
                    {'r_inv_sqrt': np.repeat(block, nb, axis=0)},
                    {'lam': 0.0, 'k_component': None, 'damping': config.damping},
                    {k: train_idx.manifest.get(k) for k in index.VECTOR_KEYS},
                )
            run = {
                'total': ac_train
                + ac_query
                + nb * (eig['eigvalsh_one_block'] + eig['eigh_one_block'])
                + eig['eigvalsh_eval_all_blocks'],
                'autocorrelation_train': ac_train,
                'autocorrelation_query': ac_query,
                'eigvalsh': nb * eig['eigvalsh_one_block'] + eig['eigvalsh_eval_all_blocks'],
                'eigh_inverse_sqrt': nb * eig['eigh_one_block'],
                **eig,
            }
        run['eig_total'] = run['eigvalsh'] + run['eigh_inverse_sqrt']
        run['fit_minus_eig'] = run['total'] - run['eig_total']
        run['xtx'] = xtx_run()
        runs.append(run)
    del train

    def med(key: str, over: str | None = None) -> float:
        return harness.median(r[key] / (r[over] if over else 1.0) for r in runs)

    fit = {key: med(key) for key in runs[0] if key != 'xtx'}
    return {
        'rows': n,
        'fit_mode': 'full fit() call' if full else 'measured parts (estimate, see docstring)',
        'fit': fit,
        'fit_runs': runs,
        'xtx': {'seconds': med('xtx'), 'all_seconds': [r['xtx'] for r in runs]},
        'ratio_autocorrelation_train_vs_xtx': med('autocorrelation_train', 'xtx'),
        'ratio_fit_minus_eig_vs_xtx': med('fit_minus_eig', 'xtx'),
        'ratio_fit_total_vs_xtx': med('total', 'xtx'),
        'preconditioner_info': precond.info,
    }, precond


# ----------------------------------------------------------------------------- memory


def child_main(args: argparse.Namespace) -> None:
    """Runs one job in this (fresh) process and prints its peak RSS as JSON."""
    import jax
    import jax.numpy as jnp

    from trackstar_jax import pipeline

    jax.block_until_ready(jax.jit(lambda x: x @ x.T)(jnp.ones((8, 8))))
    t0 = time.perf_counter()
    if args.child == 'score':
        pipeline.score(args.query, args.train, None, pipeline.ScoreConfig(k=K, unit_norm=True))
    elif args.child == 'fit':
        pipeline.fit(args.train, args.query, pipeline.FitConfig(preconditioner='mixed', lam='auto'))
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                'job': args.child,
                'seconds': seconds,
                'maxrss_mb': harness.peak_rss_mb(),
                **harness.proc_status(),
            }
        )
    )


def measure_child(job: str, train: str = '', query: str = '') -> dict[str, float]:
    """Peak RSS of ``job`` run in a fresh Python process."""
    cmd = [sys.executable, os.path.abspath(__file__), '--child', job, '--train', train]
    cmd += ['--query', query]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def _config(quick: bool, full_fit: bool = False) -> dict[str, Any]:
    if quick:
        return {
            'score': [{'block_dim': 1024, 'n': 8192, 'queries': [64]}],
            'repeats': 1,
            'hessian_repeats': 1,
            'fit_repeats': {1024: 1},
            'full_fit': {1024: True},
            'io': {'block_dim': 1024, 'n': 8192},
            'memory': {'block_dim': 1024, 'n': 4096, 'queries': 64},
        }
    return {
        'score': [
            {'block_dim': 1024, 'n': 49152, 'queries': [64, 512]},
            {'block_dim': 4096, 'n': 20480, 'queries': [64, 512]},
        ],
        'repeats': 3,
        'hessian_repeats': 1,
        'fit_repeats': {1024: 3, 4096: 2},
        'full_fit': {1024: True, 4096: full_fit},
        'io': {'block_dim': 4096, 'n': 20480},
        'memory': {'block_dim': 1024, 'n': 16384, 'queries': 64},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the results dict (also written to ``args.out``)."""
    device = harness.device_info()
    cfg = _config(args.quick, args.full_fit)
    root = tempfile.mkdtemp(prefix='pipeline_bench_', dir=args.workdir)
    results: dict[str, Any] = {
        'benchmark': 'pipeline',
        'command': harness.command_line(),
        'timestamp': harness.timestamp(),
        'jax_version': device['jax_version'],
        'device': device,
        'quick': args.quick,
        'library': harness.library_fingerprint(LIBRARY_FILES),
        'config': {**cfg, 'k': K, 'score_chunk_rows': SCORE_CHUNK, 'store_chunk_rows': STORE_CHUNK},
    }
    t_start = time.perf_counter()
    try:
        templates: dict[int, dict[str, Any]] = {}

        def template(block_dim: int) -> dict[str, Any]:
            if block_dim not in templates:
                templates[block_dim] = template_manifest(block_dim)
            return templates[block_dim]

        # 1 + 3: scoring and fit, per D.
        results['scoring'], results['fit'], results['io'] = [], [], {'write': [], 'read': []}
        for sc in cfg['score']:
            tm = template(sc['block_dim'])
            d, n = tm['dim'], sc['n']
            train_path = os.path.join(root, f'train_d{d}_f32')
            w = write_synthetic(train_path, tm, n, seed=1)
            results['io']['write'].append(
                {
                    'what': 'scoring train index',
                    'dim': d,
                    'dtype': 'float32',
                    **w,
                    'mb_s': w['stored_mb'] / w['seconds'],
                }
            )
            _log(f'wrote {train_path}: {w["stored_mb"]:.0f} MB in {w["seconds"]:.1f}s')
            qpaths = {}
            for q in sc['queries']:
                qpaths[q] = os.path.join(root, f'queries_d{d}_q{q}')
                write_synthetic(qpaths[q], tm, q, seed=100 + q)
            bd = sc['block_dim']
            fit, precond = bench_fit(
                train_path, qpaths[max(qpaths)], cfg['fit_repeats'][bd], cfg['full_fit'][bd]
            )
            results['fit'].append(
                {'dim': d, 'block_dim': sc['block_dim'], 'queries': max(qpaths), **fit}
            )
            _log(f'fit D={d}: {fit["fit"]["total"]:.1f}s (XᵀX {fit["xtx"]["seconds"]:.1f}s)')
            for q in sc['queries']:
                s = bench_scoring(
                    qpaths[q],
                    train_path,
                    precond,
                    cfg['repeats'],
                    cfg['hessian_repeats'],
                    breakdown=True,
                )
                results['scoring'].append({'dim': d, 'n': n, 'queries': q, **s})
                _log(
                    f'score D={d} Q={q}: {s["no_hessian"]["score_rows_s"]:.0f} rows/s '
                    f'(x{s["no_hessian"]["ratio_vs_matmul"]:.2f} of matmul), with R^-1/2 '
                    f'{s["hessian"]["score_rows_s"]:.0f} rows/s'
                )
            shutil.rmtree(train_path)

        # 2: write / read MB/s, float32 and bfloat16, same shape.
        io = cfg['io']
        tm = template(io['block_dim'])
        for dtype in ('float32', 'bfloat16'):
            path = os.path.join(root, f'io_{dtype}')
            w = write_synthetic(path, tm, io['n'], dtype=dtype, seed=2)
            results['io']['write'].append(
                {
                    'what': 'io index',
                    'dim': tm['dim'],
                    'dtype': dtype,
                    **w,
                    'mb_s': w['stored_mb'] / w['seconds'],
                }
            )
            r = read_throughput(path, cfg['repeats'])
            results['io']['read'].append({'dim': tm['dim'], 'dtype': dtype, 'rows': io['n'], **r})
            _log(
                f'io {dtype}: write {w["stored_mb"] / w["seconds"]:.0f} MB/s, '
                f'read {r["mb_s"]:.0f} MB/s'
            )
            shutil.rmtree(path)

        # 4: memory in fresh processes, N and 4N.
        mem = cfg['memory']
        tm = template(mem['block_dim'])
        qpath = os.path.join(root, 'mem_queries')
        write_synthetic(qpath, tm, mem['queries'], seed=3)
        results['memory'] = {'idle': measure_child('idle'), 'runs': []}
        for n in (mem['n'], 4 * mem['n']):
            path = os.path.join(root, f'mem_train_{n}')
            w = write_synthetic(path, tm, n, seed=4)
            for job in ('score', 'fit'):
                m = measure_child(job, path, qpath)
                results['memory']['runs'].append(
                    {'job': job, 'rows': n, 'dim': tm['dim'], 'index_mb': w['stored_mb'], **m}
                )
                _log(f'memory {job} N={n}: {m["maxrss_mb"]:.0f} MiB')
            shutil.rmtree(path)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results['summary'] = summarize(results)
    results['wall_seconds'] = time.perf_counter() - t_start
    end = harness.library_fingerprint(LIBRARY_FILES)
    results['library']['changed_during_run'] = harness.changed_during_run(results['library'], end)
    return results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios over every configuration measured (worst case of each).

    score_over_limit_min: score rows/s over min(in-memory matmul + top-k, raw read), the
    lowest over D, Q and with / without R (steady state: R's row norms cached);
    score_over_matmul_min: the same against the matmul + top-k alone;
    fit_over_xtx_max: the highest fit time over one in-memory XᵀX of the same rows.
    """
    entries = [
        (f'D={s["dim"]} Q={s["queries"]} {label}', s[label])
        for s in results['scoring']
        for label in ('no_hessian', 'hessian')
    ]
    worst = min(entries, key=lambda e: e[1]['score_over_limit'])
    fits = [(f'D={f["dim"]}', f['ratio_fit_total_vs_xtx']) for f in results['fit']]
    worst_fit = max(fits, key=lambda f: f[1])
    return {
        'score_over_limit_min': worst[1]['score_over_limit'],
        'score_over_limit_min_at': worst[0],
        'score_over_matmul_min': min(e['score_over_matmul'] for _, e in entries),
        'fit_over_xtx_max': worst_fit[1],
        'fit_over_xtx_max_at': worst_fit[0],
        'targets': {'score_over_limit_min': 0.8, 'fit_over_xtx_max': 1.2},
    }


def _log(msg: str) -> None:
    print(f'[pipeline] {msg}', file=sys.stderr, flush=True)


def report(res: dict[str, Any]) -> str:
    """A readable table of the results."""
    lines = [
        f'pipeline benchmark  ({res["device"]["summary"]}, jax {res["jax_version"]}, '
        f'{res["timestamp"]})',
        f'command: {res["command"]}',
        f'library: {res["library"].get("git_commit", "?")[:10]} '
        f'sha256 {res["library"].get("source_sha256")}'
        f'{" (uncommitted changes)" if res["library"].get("library_dirty") else ""}'
        f'{"  CHANGED DURING RUN" if res["library"].get("changed_during_run") else ""}',
        '',
        '1. score (k=10, unit_norm) train rows/s; R: mixed R^-1/2 preconditioner; '
        'ratio = baseline time / score time',
        '(score: index handles held across calls; fresh: opened from their URLs each call)',
        f'{"D":>6} {"N":>6} {"Q":>4} {"R":>3} {"score":>9} {"fresh":>9} {"matmul":>9} '
        f'{"mm+topk":>9} {"same":>9} {"vs mm":>6} {"vs mm+k":>7} {"vs same":>7}',
    ]
    for s in res['scoring']:
        for label in ('no_hessian', 'hessian'):
            e = s[label]
            b = e['baselines']
            same = b.get('same_math', {}).get('rows_s')
            lines.append(
                f'{s["dim"]:>6} {s["n"]:>6} {s["queries"]:>4} '
                f'{"yes" if label == "hessian" else "no":>3} '
                f'{e["score_rows_s"]:>9.0f} '
                f'{e.get("score_fresh_handle_rows_s", float("nan")):>9.0f} '
                f'{b["matmul"]["rows_s"]:>9.0f} {b["matmul_topk"]["rows_s"]:>9.0f} '
                f'{same or float("nan"):>9.0f} '
                f'{e["ratio_vs_matmul"]:>6.2f} {e["ratio_vs_matmul_topk"]:>7.2f} '
                f'{e.get("ratio_vs_same_math", float("nan")):>7.2f}'
            )
    lines += ['', '   score time split (no preconditioner; seconds for all N rows):']
    lines.append(
        f'{"D":>6} {"Q":>4} {"score":>7} {"read":>7} {"step":>7} {"no_norm":>7} {"matmul":>7} '
        f'{"compile":>7} {"1st call":>8}'
    )
    for s in res['scoring']:
        e = s['no_hessian']
        b = e.get('breakdown')
        if b:
            lines.append(
                f'{s["dim"]:>6} {s["queries"]:>4} {e["score_seconds"]:>7.2f} {b["read_s"]:>7.2f} '
                f'{b["step_s"]:>7.2f} {b["step_no_norm_s"]:>7.2f} '
                f'{e["baselines"]["matmul"]["seconds"]:>7.2f} {b["compile_s"]:>7.2f} '
                f'{e["score_first_call_seconds"]:>8.2f}'
            )
    lines += ['', '2. index I/O (TensorStore zarr3, stored MB/s; reads hit the page cache)']
    for kind in ('write', 'read'):
        for e in res['io'][kind]:
            lines.append(
                f'   {kind:<5} D={e["dim"]:<6} {e["dtype"]:<9} {e["mb_s"]:>8.0f} MB/s  '
                f'({e["stored_mb"]:.0f} MB{", " + e["what"] if "what" in e else ""})'
            )
    lines += [
        '',
        '3. fit (lam=auto, with queries) vs one in-memory block-diagonal XᵀX of the train rows',
        f'{"D":>6} {"N":>6} {"fit":>7} {"AC(tr)":>7} {"AC(q)":>7} {"eigvalsh":>8} {"eigh":>7} '
        f'{"XᵀX":>7} {"AC/XᵀX":>7} {"(fit-eig)/XᵀX":>13}',
    ]
    for f in res['fit']:
        x = f['fit']
        lines.append(
            f'{f["dim"]:>6} {f["rows"]:>6} {x["total"]:>7.2f} {x["autocorrelation_train"]:>7.2f} '
            f'{x["autocorrelation_query"]:>7.2f} {x["eigvalsh"]:>8.2f} '
            f'{x["eigh_inverse_sqrt"]:>7.2f} '
            f'{f["xtx"]["seconds"]:>7.2f} {f["ratio_autocorrelation_train_vs_xtx"]:>7.2f} '
            f'{f["ratio_fit_minus_eig_vs_xtx"]:>13.2f}'
            + ('' if f['fit_mode'].startswith('full') else '  (*)')
        )
    if any(not f['fit_mode'].startswith('full') for f in res['fit']):
        lines.append(
            '   (*) fit = measured passes + blocks x (eigvalsh + eigh), each timed on one '
            "block of the real R, + R_eval's spectrum (from the queries' Gram matrices when "
            'they are fewer than d_b) (--full-fit runs the whole call)'
        )
    m = res['memory']
    lines += [
        '',
        f'4. peak RSS (fresh processes); idle jax process: {m["idle"]["maxrss_mb"]:.0f} MiB',
    ]
    for r in m['runs']:
        lines.append(
            f'   {r["job"]:<5} D={r["dim"]} N={r["rows"]:<6} index {r["index_mb"]:>6.0f} MB  '
            f'peak RSS {r["maxrss_mb"]:>6.0f} MiB  ({r["seconds"]:.1f}s)'
        )
    lines.append(f'\nwall time {res["wall_seconds"]:.0f}s')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parses flags and runs the benchmark (or, with --child, one memory job)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='small sizes, one repeat (~2 min)')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/)')
    parser.add_argument('--workdir', default=None, help='where the indices go (default: $TMPDIR)')
    parser.add_argument('--keep', action='store_true', help='keep the indices')
    parser.add_argument(
        '--full-fit',
        action='store_true',
        help='run the whole fit() at D=16384 too (12 float64 eigen-decompositions of '
        '4096 x 4096: ~5-10 more minutes on 2 cores)',
    )
    parser.add_argument('--child', choices=('idle', 'score', 'fit'), help=argparse.SUPPRESS)
    parser.add_argument('--train', default='', help=argparse.SUPPRESS)
    parser.add_argument('--query', default='', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return
    res = run(args)
    out = args.out or os.path.join(
        harness.RESULTS_DIR, 'pipeline_quick.json' if args.quick else 'pipeline.json'
    )
    harness.write_result(out, res)
    print(report(res))
    print(f'results: {out}')


if __name__ == '__main__':
    main()
