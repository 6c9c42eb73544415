r"""What writing the attribution index during training costs: step time with / without.

    python benchmarks/train_index.py                       # -> results/train_index.json
    python benchmarks/train_index.py --models=demo --repeats=6   # a quick look

For each model, in its own child process on one CPU device, three steps are called
round-robin on the same [batch, seq_len] batch (medians of ``--repeats``):

* ``plain``: the trainer's step (``train.make_train_step``);
* ``indexed``: the step that also emits every example's projected, Adafactor-corrected
  gradient (``train_index.make_indexed_train_step``), its rows handed to the
  background ``AsyncRowWriter`` of a real index in a temporary directory — what a
  training run with ``train_lm.train_index`` does;
* ``indexed_no_write``: the same step, rows dropped: the device-side cost alone.

``overhead`` (top level) is the largest indexed / plain ratio over the models;
``by_model`` has each model's medians, every repetition, XLA's flop estimates and
temporary-buffer sizes of both executables, and the writer thread's own seconds.

Models: ``demo`` (the embedded default, 4 layers, width 128, T = 128) and
``smollm2_135m`` (``launch/import_checkpoint.py --output=<--smollm2>``; skipped with a
note when that checkpoint is missing). SmolLM2 starts from a fresh Adafactor state
moved by ``--warm_steps`` plain steps, so its second moments are non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

DEMO_SPEC = {'block_dim': 1024, 'num_layer_blocks': 4}  # fact_tracing_demo.gin
SMOLLM2_SPEC = {'block_dim': 1024, 'num_layer_blocks': 6}  # open_set_smollm2.gin


def _model_and_state(name: str, args: argparse.Namespace):
    import jax
    import jax.numpy as jnp

    from trackstar_jax import sharding as shd
    from trackstar_jax import train
    from trackstar_jax.models import DecoderConfig, DecoderLM

    mesh = shd.make_mesh(devices=jax.devices()[:1])
    tc = train.TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=10)
    tx = train.make_optimizer(tc)
    if name == 'demo':
        cfg = DecoderConfig(
            vocab_size=4096, num_layers=4, d_model=128, num_heads=4, num_kv_heads=1,
            mlp_dim=512, max_len=128,
        )  # fmt: skip
        model = DecoderLM(cfg)
        state, shardings = train.create_train_state(model, tc, mesh)
        return model, tx, mesh, state, shardings, cfg.vocab_size, DEMO_SPEC
    from trackstar_jax.models import gguf_import

    model, params, _ = gguf_import.load_imported(args.smollm2, mesh)
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    shardings = train.state_shardings(p_shard, jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    state = train.TrainState(jnp.asarray(0, jnp.int32), params, opt_state)
    return (
        model,
        tx,
        mesh,
        jax.device_put(state, shardings),
        shardings,
        model.config.vocab_size,
        SMOLLM2_SPEC,
    )


def side(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One model's measurements (run in a child process)."""
    import jax
    import numpy as np

    from trackstar_jax import grads, train, train_index
    from trackstar_jax import index as index_lib

    model, tx, mesh, state, shardings, vocab, spec_kw = _model_and_state(name, args)
    rng = np.random.default_rng(0)
    batch = {
        'tokens': rng.integers(0, vocab, (args.batch_size, args.seq_len)).astype(np.int32),
        'loss_mask': np.ones((args.batch_size, args.seq_len), np.float32),
    }
    batch['loss_mask'][:, 0] = 0
    targets = batch['loss_mask'].sum(1)
    gbatch = train.global_batch(mesh, batch)
    spec = grads.GradientSpec(**spec_kw)
    plan = train_index.plan_for(model, state.params, state.opt_state, spec, mesh=mesh)
    plain = train.make_train_step(model, tx, mesh, shardings)
    indexed = train_index.make_indexed_train_step(model, tx, mesh, shardings, plan)
    compiled = {}
    t0 = time.perf_counter()
    for _ in range(args.warm_steps):  # non-zero second moments
        state, _ = plain(state, gbatch)
    jax.block_until_ready(state)
    compile_plain_s = time.perf_counter() - t0
    compiled['plain'] = plain.lower(state, gbatch).compile()
    compiled['indexed'] = indexed.lower(state, gbatch, plan.projections).compile()
    t0 = time.perf_counter()
    state, _, feats = indexed(state, gbatch, plan.projections)
    jax.block_until_ready(feats)
    compile_indexed_s = time.perf_counter() - t0
    if not np.isfinite(np.asarray(feats)).all():
        raise SystemExit(f'{name}: non-finite features')

    steps = list(range(args.repeats))
    manifest = train_index.manifest_for(
        plan, args.seq_len, steps, [0.01] * len(steps), args.batch_size, 1
    )
    ids = train_index.row_ids([[f'row{i}' for i in range(args.batch_size)]] * len(steps), steps)
    tmp = tempfile.mkdtemp(prefix='train_index_bench_')
    writer = index_lib.create(
        os.path.join(tmp, 'index'), manifest, ids, dim=plan.dim, chunk_rows=args.batch_size
    )
    rows = train_index.AsyncRowWriter(writer, steps, max_pending=4)
    box = {'state': state, 'step': 0}

    def run_plain():
        box['state'], metrics = plain(box['state'], gbatch)
        return metrics

    def run_indexed():
        box['state'], metrics, f = indexed(box['state'], gbatch, plan.projections)
        rows.put(box['step'], f, targets)
        box['step'] += 1
        return metrics

    def run_no_write():
        box['state'], metrics, f = indexed(box['state'], gbatch, plan.projections)
        return metrics, f

    times = harness.interleaved(
        {'plain': run_plain, 'indexed': run_indexed, 'indexed_no_write': run_no_write},
        args.repeats,
    )
    t0 = time.perf_counter()
    rows.close()
    final_flush_s = time.perf_counter() - t0
    written = index_lib.open(os.path.join(tmp, 'index'))
    med = {k: harness.median(v) for k, v in times.items()}
    flops = {k: harness.xla_flops(c) for k, c in compiled.items()}
    memory = {k: harness.xla_memory(c) for k, c in compiled.items()}
    return {
        'model': name,
        'batch': [args.batch_size, args.seq_len],
        'spec': spec.to_dict(),
        'dim': plan.dim,
        'fused_kernels': len(plan.fused_paths),
        'seconds': times,
        'median_s': med,
        'overhead': med['indexed'] / med['plain'],
        'compute_overhead': med['indexed_no_write'] / med['plain'],
        'tokens_per_s': {k: args.batch_size * args.seq_len / v for k, v in med.items()},
        'xla_flops': flops,
        'flops_ratio': (flops['indexed'] / flops['plain']) if all(flops.values()) else None,
        'xla_temp_bytes': {k: m['temp_bytes'] for k, m in memory.items()},
        'writer_thread_s': rows.write_seconds,
        'writer_rows': rows.rows_written,
        'final_flush_s': final_flush_s,
        'index_rows_committed': len(written),
        'first_call_s': {'plain_warm_steps': compile_plain_s, 'indexed': compile_indexed_s},
        'peak_rss_mb': harness.peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> None:
    """Runs each model in a child process and writes the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--models', default='demo,smollm2_135m')
    ap.add_argument('--batch_size', type=int, default=16)
    ap.add_argument('--seq_len', type=int, default=128)
    ap.add_argument('--repeats', type=int, default=0, help='0: 20 for demo, 5 for SmolLM2')
    ap.add_argument('--warm_steps', type=int, default=2)
    ap.add_argument('--smollm2', default='/work/smollm2_135m')
    ap.add_argument('--side', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--out', default=os.path.join(harness.RESULTS_DIR, 'train_index.json'))
    args = ap.parse_args(argv)
    if args.side:
        if not args.repeats:
            args.repeats = 20 if args.side == 'demo' else 5
        with open(args.out, 'w') as f:
            json.dump(side(args.side, args), f)
        return
    by_model, skipped = {}, {}
    for name in args.models.split(','):
        if name == 'smollm2_135m' and not os.path.isdir(args.smollm2):
            skipped[name] = f'no checkpoint at {args.smollm2} (launch/import_checkpoint.py)'
            continue
        out = tempfile.mktemp(suffix=f'_{name}.json')
        cmd = [sys.executable, os.path.abspath(__file__), f'--side={name}', f'--out={out}']
        cmd += [f'--{k}={v}' for k in ('batch_size', 'seq_len', 'repeats', 'warm_steps', 'smollm2')
                for v in [getattr(args, k)]]  # fmt: skip
        print('+', ' '.join(cmd), flush=True)
        env = {**os.environ, 'PYTHONPATH': harness.ROOT}
        env.pop('XLA_FLAGS', None)  # one real CPU device, no fake ones
        subprocess.run(cmd, check=True, env=env)
        with open(out) as f:
            by_model[name] = json.load(f)
        os.remove(out)
        r = by_model[name]
        print(
            f'{name}: plain {r["median_s"]["plain"]:.3f}s, indexed {r["median_s"]["indexed"]:.3f}s '
            f'({r["overhead"]:.3f}x; device only {r["compute_overhead"]:.3f}x)',
            flush=True,
        )
    result = {
        'overhead': max(r['overhead'] for r in by_model.values()),
        'overhead_by_model': {k: r['overhead'] for k, r in by_model.items()},
        'target': 1.05,
        'by_model': by_model,
        'skipped': skipped,
        'host': harness.host_info(),
        'library': harness.library_fingerprint(['.']),
    }
    print(json.dumps({k: result[k] for k in ('overhead', 'overhead_by_model')}, indent=1))
    harness.write_result(args.out, result, argv)


if __name__ == '__main__':
    main()
