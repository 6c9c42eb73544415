"""The fused kernel on an imported pretrained model (SmolLM2-135M), next to its train step.

For each sequence length, in one process and interleaved (so drift hits all alike):

* ``train_step``: one Adafactor step (``train.make_train_step``; value_and_grad + update)
  of the imported model with its estimated V as optimizer state;
* ``fused``: ``Featurizer.__call__`` with the open-set run's spec (12 blocks of 32 x 32)
  and with the paper's block size (12 blocks of 64 x 64);
* ``reference``: ``Featurizer.reference`` (vmap(grad), then project), whose memory grows
  with batch x params.

Each is compiled first (compile seconds reported apart), then timed as the median of
``--repeats`` calls. Peak memory is the compiled executable's ``memory_analysis()``
(temp + arguments + outputs), plus this process's peak RSS (VmHWM) at the end. Batches are
Wikipedia passages of the embedded corpus tokenised with the model's tokenizer and packed
into rows of T tokens (every token after the first is a target).

Usage (after ``launch/import_checkpoint.py`` and ``launch/estimate_second_moments.py``)::

    python benchmarks/kernel_imported.py --checkpoint=runs/smollm2_135m

Writes ``benchmarks/results/kernel_smollm2.json`` (``--out`` elsewhere) with the command
line, devices and the library fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import harness  # first: puts the repository root on sys.path
import jax
import numpy as np

from trackstar_jax import grads, train
from trackstar_jax import sharding as shd
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.jobs import common

LIBRARY_PATHS = ('grads', 'models', 'train.py', 'losses.py', 'sharding.py', 'jobs/common.py')


def passages_batch(tokenizer: Any, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """``batch`` rows of ``seq_len`` tokens of Wikipedia text, packed as in pretraining.

    Passages (each led by the document token) are concatenated and cut into rows, so a
    row may span passages; every token after a row's first is a target.
    """
    stream: list[int] = []
    for rec in corpus_lib.load_corpus(sources=['wikipedia']):
        stream += [tokenizer.eos_id, *tokenizer.encode(rec['text'])]
        if len(stream) >= batch * seq_len:
            break
    tokens = np.asarray(stream[: batch * seq_len], np.int32).reshape(batch, seq_len)
    mask = np.ones((batch, seq_len), np.float32)
    mask[:, 0] = 0.0
    return {'tokens': tokens, 'loss_mask': mask}


def run_length(loaded: common.LoadedModel, mesh, seq_len: int, batch_size: int, repeats: int):
    """Compile, memory and interleaved timing of every method at one sequence length."""
    batch = passages_batch(loaded.tokenizer, batch_size, seq_len)
    model, params = loaded.model, loaded.params
    specs = {
        'fused_32x32': grads.GradientSpec(block_dim=1024, num_layer_blocks=6),
        'fused_64x64': grads.GradientSpec(block_dim=4096, num_layer_blocks=6),
    }
    feats = {
        name: grads.Featurizer(model, params, s, opt_state=loaded.opt_state, mesh=mesh)
        for name, s in specs.items()
    }
    tx = train.make_optimizer(loaded.train_config)
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    shardings = train.state_shardings(p_shard, jax.eval_shape(tx.init, params), mesh)
    state = train.TrainState(
        step=jax.numpy.asarray(0, jax.numpy.int32), params=params, opt_state=loaded.opt_state
    )
    # The train step donates its state: give it copies, not the featurizers' buffers.
    state = jax.device_put(jax.tree.map(jax.numpy.copy, state), shardings)
    train_step = train.make_train_step(model, tx, mesh, shardings)
    gbatch = train.global_batch(mesh, batch)
    res: dict[str, Any] = {'seq_len': seq_len, 'batch': batch_size, 'methods': {}}

    compiled, compile_s = harness.compile_timed(train_step, state, gbatch)
    res['methods']['train_step'] = {
        'compile_s': compile_s,
        'memory': harness.xla_memory(compiled),
        'flops': harness.xla_flops(compiled),
    }
    ref_feat = feats['fused_32x32']
    for name, feat in feats.items():
        args = (feat.params, feat.constants, batch['tokens'], batch['loss_mask'])
        compiled, compile_s = harness.compile_timed(feat._fused, *args)
        res['methods'][name] = {
            'compile_s': compile_s,
            'memory': harness.xla_memory(compiled),
            'flops': harness.xla_flops(compiled),
            'dim': feat.dim,
        }
    args = (ref_feat.params, ref_feat.constants, batch['tokens'], batch['loss_mask'])
    compiled, compile_s = harness.compile_timed(ref_feat._reference, *args)
    res['methods']['reference'] = {
        'compile_s': compile_s,
        'memory': harness.xla_memory(compiled),
        'flops': harness.xla_flops(compiled),
    }
    fused = np.asarray(ref_feat(batch))
    reference = np.asarray(ref_feat.reference(batch))
    res['fused_vs_reference_max_rel_err'] = float(
        np.max(np.abs(fused - reference)) / np.max(np.abs(reference))
    )
    holder = {'state': state}

    def step():
        holder['state'], metrics = train_step(holder['state'], gbatch)
        return metrics

    fns = {name: (lambda f=feat: f(batch)) for name, feat in feats.items()}
    fns['reference'] = lambda: ref_feat.reference(batch)
    fns['train_step'] = step
    harness.interleaved(fns, 1)  # warm-up: first calls allocate
    times = harness.interleaved(fns, repeats)
    harness.record_throughput(res['methods'], times, batch_size, seq_len)
    m = res['methods']
    res['ratios'] = {
        f'{name}_over_train_step': m[name]['examples_s'] / m['train_step']['examples_s']
        for name in feats
    }
    res['ratios'].update(
        {
            f'{name}_over_reference': m[name]['examples_s'] / m['reference']['examples_s']
            for name in feats
        }
    )
    return res


def main(argv: list[str] | None = None) -> None:
    """Runs the sweep and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', default='runs/smollm2_135m')
    parser.add_argument('--seq_lens', default='128,512')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--out', default=os.path.join(harness.RESULTS_DIR, 'kernel_smollm2.json'))
    args = parser.parse_args(argv)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    t0 = time.perf_counter()
    loaded = common.load_model(args.checkpoint, mesh)
    if loaded.opt_state is None:
        raise SystemExit(f'{args.checkpoint} has no V: run launch/estimate_second_moments.py.')
    device = harness.device_info()
    out: dict[str, Any] = {
        'benchmark': 'kernel_imported',
        'command': harness.command_line(argv),
        'timestamp': harness.timestamp(),
        'jax': device['jax_version'],
        'devices': device['devices'][:1],
        'host': device['host'],
        'library': harness.library_fingerprint(LIBRARY_PATHS),
        'checkpoint': os.path.abspath(args.checkpoint),
        'model': loaded.model.config.to_dict(),
        'num_params': int(sum(x.size for x in jax.tree.leaves(loaded.params))),
        'load_s': time.perf_counter() - t0,
        'runs': [],
    }
    for t in (int(x) for x in args.seq_lens.split(',')):
        r = run_length(loaded, mesh, t, args.batch, args.repeats)
        out['runs'].append(r)
        mb = 2.0**20
        for name, m in r['methods'].items():
            print(
                f'T={t:4d} {name:>12}: {m["examples_s"]:7.3f} ex/s {m["tokens_s"]:8.1f} tok/s '
                f'compile {m["compile_s"]:5.1f}s peak {m["memory"]["total_bytes"] / mb:7.0f} MiB',
                flush=True,
            )
        print(f'T={t:4d} ratios: {json.dumps(r["ratios"])}', flush=True)
    out['peak_rss_mb'] = harness.peak_rss_mb()
    out['library']['changed_during_run'] = harness.changed_during_run(
        out['library'], harness.library_fingerprint(LIBRARY_PATHS)
    )
    harness.write_result(args.out, out, argv)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
