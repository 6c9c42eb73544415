r"""What the integrity checks cost, as shares of the operations they guard (one run).

    python benchmarks/integrity.py                    # -> results/integrity.json
    python benchmarks/integrity.py --rows 4096 --repeats 2   # a quick look

Every committed index chunk carries sha256 checksums of its vectors, norms and target
counts, verified when a handle first reads the chunk; a writer also checks for NaN/Inf
and re-reads the manifest (one small key) before each commit. Measured here on a
synthetic float32 index in a local directory (page cache warm):

* **write**: seconds of the checks (isfinite, the three sha256, the manifest re-read)
  over the seconds of ``write_chunk`` that includes them;
* **read**: a full verified pass with a fresh handle (hashing every chunk) over a pass
  with a handle whose chunks are already verified (no hashing), interleaved;
* **score**: ``pipeline.score`` of Q queries with a fresh train handle over the same score
  with an already-verified handle, interleaved (the compiled scorer is warm for both).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402

from trackstar_jax import index, pipeline  # noqa: E402


def build(url: str, rows: int, dim: int, chunk_rows: int, seed: int) -> dict[str, float]:
    """Writes a random index; returns seconds of write_chunk and of its checks."""
    rng = np.random.default_rng(seed)
    writer = index.create(
        url,
        {'what': 'integrity benchmark'},
        [f'r{i}' for i in range(rows)],
        dim=dim,
        chunk_rows=chunk_rows,
    )
    write_s = checks_s = 0.0
    for chunk in range(writer.num_chunks):
        start, stop = writer.rows(chunk)
        vectors = rng.standard_normal((stop - start, dim), dtype=np.float32)
        targets = np.ones(stop - start, np.float32)
        t0 = time.perf_counter()
        writer.write_chunk(chunk, vectors, targets)
        write_s += time.perf_counter() - t0
        # The same checks alone, on the same arrays (what write_chunk does besides I/O
        # and the norms, which the index stores anyway).
        norms = np.linalg.norm(vectors, axis=1).astype(np.float32)
        t0 = time.perf_counter()
        np.isfinite(vectors).all(axis=1)
        for a in (vectors, norms, targets):
            hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
        index.manifest_digest(index.Store(url).read_json('manifest.json'))
        checks_s += time.perf_counter() - t0
    writer.finish()
    return {'write_s': write_s, 'checks_s': checks_s}


def full_pass(handle: index.Index, chunk_rows: int) -> float:
    total = 0.0
    for start in range(0, len(handle), chunk_rows):
        total += float(handle.read(slice(start, start + chunk_rows))[0, 0])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rows', type=int, default=32768)
    parser.add_argument('--dim', type=int, default=4096)
    parser.add_argument('--chunk_rows', type=int, default=256, help='index chunk (commit unit)')
    parser.add_argument('--read_rows', type=int, default=4096, help='rows per read / score chunk')
    parser.add_argument('--queries', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--output', default=os.path.join(harness.RESULTS_DIR, 'integrity.json'))
    args = parser.parse_args(argv)

    root = tempfile.mkdtemp(prefix='integrity_bench_')
    try:
        train_url, query_url = os.path.join(root, 'train'), os.path.join(root, 'queries')
        write = build(train_url, args.rows, args.dim, args.chunk_rows, seed=0)
        build(query_url, args.queries, args.dim, args.chunk_rows, seed=1)
        warm = index.open(train_url)
        full_pass(warm, args.read_rows)  # every chunk of this handle now verified
        queries = index.open(query_url)
        config = pipeline.ScoreConfig(k=10, chunk_rows=args.read_rows)
        pipeline.score(queries, warm, None, config)  # compile once
        read = harness.interleaved(
            {
                'fresh': lambda: full_pass(index.open(train_url), args.read_rows),
                'verified': lambda: full_pass(warm, args.read_rows),
            },
            args.repeats,
        )
        score = harness.interleaved(
            {
                'fresh': lambda: pipeline.score(queries, index.open(train_url), None, config),
                'verified': lambda: pipeline.score(queries, warm, None, config),
            },
            args.repeats,
        )
        nbytes = args.rows * args.dim * 4
        med = {
            k: {n: harness.median(v) for n, v in d.items()}
            for k, d in (('read', read), ('score', score))
        }
        summary = {
            'write_checks_share': write['checks_s'] / write['write_s'],
            'read_fresh_over_verified': med['read']['fresh'] / med['read']['verified'],
            'score_fresh_over_verified': med['score']['fresh'] / med['score']['verified'],
            'read_verified_MBps': nbytes / med['read']['fresh'] / 1e6,
            'read_unverified_MBps': nbytes / med['read']['verified'] / 1e6,
            'score_rows_per_s_verified': args.rows / med['score']['fresh'],
            'score_rows_per_s_unverified': args.rows / med['score']['verified'],
        }
        result = {
            'settings': vars(args) | {'dtype': 'float32', 'storage': 'local directory'},
            'host': harness.host_info(),
            'device': harness.device_info(),
            'library': harness.library_fingerprint(['.']),
            'write_s': write,
            'read_s': read,
            'score_s': score,
            'summary': summary,
        }
        harness.write_result(args.output, result)
        print(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
