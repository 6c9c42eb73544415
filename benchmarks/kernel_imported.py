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
(temp + arguments + outputs), plus this process's peak RSS at the end. Batches are
Wikipedia passages of the embedded corpus tokenised with the model's tokenizer and packed
into rows of T tokens (every token after the first is a target).

Usage (after ``launch/import_checkpoint.py`` and ``launch/estimate_second_moments.py``)::

    PYTHONPATH=. python benchmarks/kernel_imported.py --checkpoint=runs/smollm2_135m

Writes ``benchmarks/results/kernel_smollm2.json`` with the command line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernel import (  # noqa: E402
    _compile,
    _device_info,
    _flops,
    _interleaved,
    _memory,
    _record_throughput,
)
from trackstar_jax import grads, train  # noqa: E402
from trackstar_jax import sharding as shd  # noqa: E402
from trackstar_jax.data import corpus as corpus_lib  # noqa: E402
from trackstar_jax.jobs import common  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


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

    compiled, compile_s = _compile(train_step, state, gbatch)
    res['methods']['train_step'] = {
        'compile_s': compile_s,
        'memory': _memory(compiled),
        'flops': _flops(compiled),
    }
    ref_feat = feats['fused_32x32']
    for name, feat in feats.items():
        args = (feat.params, feat.constants, batch['tokens'], batch['loss_mask'])
        compiled, compile_s = _compile(feat._fused, *args)
        res['methods'][name] = {
            'compile_s': compile_s,
            'memory': _memory(compiled),
            'flops': _flops(compiled),
            'dim': feat.dim,
        }
    args = (ref_feat.params, ref_feat.constants, batch['tokens'], batch['loss_mask'])
    compiled, compile_s = _compile(ref_feat._reference, *args)
    res['methods']['reference'] = {
        'compile_s': compile_s,
        'memory': _memory(compiled),
        'flops': _flops(compiled),
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
    _interleaved(fns, 1)  # warm-up: first calls allocate
    times = _interleaved(fns, repeats)
    _record_throughput(res['methods'], times, batch_size, seq_len)
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
    parser.add_argument('--out', default=os.path.join(RESULTS, 'kernel_smollm2.json'))
    args = parser.parse_args(argv)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    t0 = time.perf_counter()
    loaded = common.load_model(args.checkpoint, mesh)
    if loaded.opt_state is None:
        raise SystemExit(f'{args.checkpoint} has no V: run launch/estimate_second_moments.py.')
    out: dict[str, Any] = {
        'command': 'PYTHONPATH=. python ' + shlex.join(sys.argv),
        'timestamp': datetime.datetime.now(datetime.timezone.utc).isoformat(),
        'jax': jax.__version__,
        'devices': [str(d) for d in jax.devices()[:1]],
        'host': _device_info(),
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
    out['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(out, f, indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
