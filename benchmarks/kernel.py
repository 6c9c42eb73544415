"""Benchmarks of the fused per-example gradient kernel (``Featurizer.__call__``).

Measures, in one run (so every ratio compares numbers taken side by side), for decoder
LMs of several widths and sequence lengths:

1. Throughput (examples/s) of (a) the fused kernel ``feat(batch)``, (b) the reference
   ``feat.reference(batch)`` (vmap(grad), then project) and (c) one Adafactor training
   step (``train.make_train_step`` on a 1-device mesh) on the same batch. Each is
   compiled first (``jit(...).lower(...).compile()``, timed and reported apart), then
   timed as the median of several repetitions with ``jax.block_until_ready`` (at most 3
   at T = 512); the repetitions of the three methods are interleaved so that drift on a
   noisy machine hits them alike. Each config runs in its own process.
2. Memory, two ways: the compiled executable's ``memory_analysis()`` (temp, argument,
   output and alias bytes; ``total`` = temp + argument + output), and the peak resident
   set size of a fresh subprocess per (config, method), which loads the saved params and
   Adafactor state, builds the method, loads its executable from a persistent
   compilation cache filled by the timing process (so compiler memory is left out) and
   runs it once. It reports ``ru_maxrss`` (getrusage: the whole process), its RSS before
   the run, and ``VmHWM`` over the run alone (the high-water mark is reset through
   ``/proc/self/clear_refs`` just before). Baseline: an idle process that only imported
   JAX and the library. The orchestrating process never imports JAX, so its children's
   ``ru_maxrss`` (which Linux carries over fork + exec) starts from a ~20 MiB parent.
3. Where the fused kernel's time goes, for one representative config: the forward pass
   alone, the forward pass plus the input-gradient backward pass (no weight gradients),
   generating the projection matrices alone, and the rest (projections, outer products,
   per-example norm-scale gradients) as fused minus forward+input-grad; with the training
   step split into value_and_grad and the Adafactor update.

The models are the paper's architecture (``DecoderLM``: multi-query attention, SwiGLU,
parallel block) with vocab 4096 and 4 layers; params and the Adafactor state come from
two real training steps (``min_dim_size_to_factor`` = 16, so every matrix is factored).
The GradientSpec is the paper's: block_dim 4096 (64 x 64), attention and MLP split,
``num_layer_blocks`` = num_layers, correction 'adafactor', output_fn 'loss'.

Usage (from the repository root)::

    python benchmarks/kernel.py            # full sweep, ~9 min on 2 cores
    python benchmarks/kernel.py --quick    # smaller sweep, ~2-3 min

Results go to ``benchmarks/results/kernel.json`` (``kernel_quick.json`` with
``--quick``; ``--out`` elsewhere) with the command line, JAX version, devices, the
library fingerprint and a timestamp.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import harness

VOCAB = 4096
NUM_LAYERS = 4
BLOCK_DIM = 4096
MIN_DIM_TO_FACTOR = 16
WIDTHS: dict[int, dict[str, int]] = {
    128: {'num_heads': 4, 'mlp_dim': 512},
    512: {'num_heads': 8, 'mlp_dim': 2048},
}
METHODS = ('fused', 'reference', 'train_step')
LIBRARY_PATHS = (
    'grads',
    'models',
    'train.py',
    'losses.py',
    'sharding.py',
    '__init__.py',
)


# ----------------------------------------------------------------------------- configs


def config_name(cfg: dict[str, int]) -> str:
    """A short name such as 'd512_t128_b8'."""
    return f'd{cfg["d_model"]}_t{cfg["seq_len"]}_b{cfg["batch"]}'


def make_configs(quick: bool) -> list[dict[str, int]]:
    """The sweep: widths x T in {16, 128, 512} (batch 8, 4 at T = 512), batch 32 at T = 16."""
    if quick:
        grid = [(128, 16, 8), (128, 128, 8), (512, 16, 8)]
    else:
        grid = [(d, t, 8 if t < 512 else 4) for d in WIDTHS for t in (16, 128, 512)]
        grid += [(d, 16, 32) for d in WIDTHS]
    return [{'d_model': d, 'seq_len': t, 'batch': b} for d, t, b in grid]


# ----------------------------------------------------------------------------- JAX side
# Everything below imports JAX lazily: only the child processes run it.


def _build(cfg: dict[str, int]) -> dict[str, Any]:
    """Model, 1-device mesh, train config, optimizer and the spec for one config."""
    import jax

    from trackstar_jax import grads, train
    from trackstar_jax import sharding as shd
    from trackstar_jax.models.decoder import DecoderConfig, DecoderLM

    d, t = cfg['d_model'], cfg['seq_len']
    model_cfg = DecoderConfig(
        vocab_size=VOCAB,
        num_layers=NUM_LAYERS,
        d_model=d,
        num_heads=WIDTHS[d]['num_heads'],
        mlp_dim=WIDTHS[d]['mlp_dim'],
        max_len=max(t, 8),
        num_kv_heads=1,
    )
    model = DecoderLM(model_cfg)
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    train_cfg = train.TrainConfig(
        min_dim_size_to_factor=MIN_DIM_TO_FACTOR,
        seq_len=t,
        batch_size=cfg['batch'],
        warmup_steps=2,
        learning_rate=1e-3,
    )
    spec = grads.GradientSpec(
        block_dim=BLOCK_DIM,
        num_layer_blocks=NUM_LAYERS,
        split_attention_mlp=True,
        correction='adafactor',
        output_fn='loss',
    )
    return {
        'model_cfg': model_cfg,
        'model': model,
        'mesh': mesh,
        'train_cfg': train_cfg,
        'tx': train.make_optimizer(train_cfg),
        'spec': spec,
    }


def _batch(cfg: dict[str, int], seed: int) -> dict[str, Any]:
    """A random batch: every token after the first is a target."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (cfg['batch'], cfg['seq_len'])).astype(np.int32)
    mask = np.ones(tokens.shape, np.float32)
    mask[:, 0] = 0.0
    return {'tokens': tokens, 'loss_mask': mask}


def _save_state(path: str, params: Any, opt_state: Any) -> None:
    """Saves params and optimizer state leaves (numpy) for the RSS subprocesses."""
    import jax
    import numpy as np

    arrays = {f'p{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
    arrays.update({f'o{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(opt_state))})
    np.savez(path, **arrays)


def _load_state(path: str, built: dict[str, Any]) -> tuple[Any, Any]:
    """Params and optimizer state (numpy leaves) saved by ``_save_state``."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    model, tx = built['model'], built['tx']
    shapes = jax.eval_shape(
        lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))['params']
    )
    opt_shapes = jax.eval_shape(tx.init, shapes)
    with np.load(path) as z:
        p = [z[f'p{i}'] for i in range(len(jax.tree.leaves(shapes)))]
        o = [z[f'o{i}'] for i in range(len(jax.tree.leaves(opt_shapes)))]
    return (
        jax.tree.unflatten(jax.tree.structure(shapes), p),
        jax.tree.unflatten(jax.tree.structure(opt_shapes), o),
    )


def _featurizer(built: dict[str, Any], params: Any, opt_state: Any):
    """A Featurizer (mesh=None) over device copies of params and state."""
    import jax

    from trackstar_jax import grads

    params = jax.device_put(jax.tree.map(lambda x: x.copy(), jax.device_get(params)))
    opt_state = jax.device_put(jax.device_get(opt_state))
    return grads.Featurizer(built['model'], params, built['spec'], opt_state=opt_state)


def _train_state(built: dict[str, Any], params: Any, opt_state: Any, step: int):
    """A TrainState placed with the train step's shardings, and those shardings."""
    import jax
    import jax.numpy as jnp

    from trackstar_jax import train

    model, mesh, seq_len = built['model'], built['mesh'], built['train_cfg'].seq_len
    opt_shapes = jax.eval_shape(built['tx'].init, params)
    shardings = train.state_shardings(train.param_shardings(model, seq_len, mesh), opt_shapes, mesh)
    state = train.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state)
    return jax.device_put(jax.device_get(state), shardings), shardings


def _side_matrices_fn(feat) -> Callable[[Any], Any]:
    """jit'd (constants) -> {path: (D_r P0ᵀ, D_c P1ᵀ)} as the fused kernel computes them.

    ``feat.constants`` is (corrections, projections), what ``Featurizer`` passes its
    jitted kernels; the projections are drawn once per Featurizer.
    """
    import jax

    from trackstar_jax.grads import kernel

    paths = sorted(feat.fused_paths)
    return jax.jit(lambda c: {p: kernel._side_matrices(*c[1][p], c[0][p]) for p in paths})


def _breakdown(built, feat, state, train_step, batch, repeats: int) -> dict[str, Any]:
    """Where the fused kernel's time goes, against a training step (same batch).

    Parts, each jit-compiled and timed interleaved with the others:

    * forward: per-example (vmap) model.apply + the 'loss' output function.
    * forward_input_grad: per-example grad w.r.t. a zero perturbation added to the token
      embeddings' output, params held constant: the whole backward pass through every
      layer for input gradients, without any weight gradient (what the fused kernel
      needs, minus its taps).
    * side_matrices: what the fused kernel computes per call before touching the model,
      D_r P0ᵀ and D_c P1ᵀ of every fused kernel, alone (the projections are drawn once
      per Featurizer, so this is the correction scaling).
    * fused: ``feat(batch)``.
    * train_grad: ``train.make_loss_and_grads`` (value_and_grad of the mean loss).
    * train_step: the full Adafactor step.

    Derived: input_grad_backward = forward_input_grad - forward; fused_overhead = fused -
    forward_input_grad (side matrices, x and g projections, k x k outer products,
    per-example grads of the unfused norm scales); adafactor_update =
    train_step - train_grad; weight_grad = train_grad - forward_input_grad (roughly: the
    training loss differs from the summed loss only by a scalar).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from trackstar_jax import train
    from trackstar_jax.grads import kernel

    model, spec = built['model'], built['spec']
    params, constants = feat.params, feat.constants
    tokens, mask = batch['tokens'], batch['loss_mask']

    def objective(p, toks, m, delta=None):
        def add_delta(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if delta is not None and isinstance(context.module, nn.Embed):
                if context.method_name == '__call__':
                    return y + delta
            return y

        with nn.intercept_methods(add_delta):
            logits = model.apply({'params': p}, toks[None])
        return kernel.output_objective(logits, toks[None], m[None], spec.output_fn)

    forward = jax.jit(jax.vmap(objective, in_axes=(None, 0, 0)))
    d = built['model_cfg'].d_model

    def input_grad(p, toks, m):
        delta = jnp.zeros((1, toks.shape[0], d), jnp.float32)
        return jax.grad(lambda dl: objective(p, toks, m, dl))(delta)

    fwd_in = jax.jit(jax.vmap(input_grad, in_axes=(None, 0, 0)))
    mats = _side_matrices_fn(feat)
    grad_fn = train.make_loss_and_grads(
        model, built['mesh'], jax.tree.map(lambda x: x.sharding, state.params)
    )
    grad_params = jax.tree.map(lambda x: x.copy(), state.params)

    out: dict[str, Any] = {'parts': {}}
    compiled = {
        'forward': harness.compile_timed(forward, params, tokens, mask),
        'forward_input_grad': harness.compile_timed(fwd_in, params, tokens, mask),
        'side_matrices': harness.compile_timed(mats, constants),
        'fused': harness.compile_timed(feat._fused, params, constants, tokens, mask),
        'train_grad': harness.compile_timed(grad_fn, grad_params, batch),
        'train_step': harness.compile_timed(train_step, state, batch),
    }
    holder = {'state': state}

    def step():
        holder['state'], metrics = train_step(holder['state'], batch)
        return holder['state'], metrics

    fns = {
        'forward': lambda: forward(params, tokens, mask),
        'forward_input_grad': lambda: fwd_in(params, tokens, mask),
        'side_matrices': lambda: mats(constants),
        'fused': lambda: feat(batch),
        'train_grad': lambda: grad_fn(grad_params, batch),
        'train_step': step,
    }
    for fn in fns.values():  # warm-up call of each
        jax.block_until_ready(fn())
    times = harness.interleaved(fns, repeats)
    for name, ts in times.items():
        c, compile_s = compiled[name]
        out['parts'][name] = {
            'seconds': harness.median(ts),
            'all_seconds': ts,
            'compile_s': compile_s,
            'flops': harness.xla_flops(c),
        }
    s = {k: v['seconds'] for k, v in out['parts'].items()}
    fused = s['fused']
    derived = {
        'forward': s['forward'],
        'input_grad_backward': s['forward_input_grad'] - s['forward'],
        'fused_overhead': fused - s['forward_input_grad'],
        'of_which_side_matrices': s['side_matrices'],
        'adafactor_update': s['train_step'] - s['train_grad'],
        'weight_grad': s['train_grad'] - s['forward_input_grad'],
    }
    out['derived_seconds'] = derived
    best = {k: min(v['all_seconds']) for k, v in out['parts'].items()}
    out['derived_seconds_of_min'] = {  # the same from each part's fastest repetition
        'forward': best['forward'],
        'input_grad_backward': best['forward_input_grad'] - best['forward'],
        'fused_overhead': best['fused'] - best['forward_input_grad'],
        'of_which_side_matrices': best['side_matrices'],
        'adafactor_update': best['train_step'] - best['train_grad'],
        'weight_grad': best['train_grad'] - best['forward_input_grad'],
    }
    out['fraction_of_fused'] = {
        'forward': s['forward'] / fused,
        'input_grad_backward': derived['input_grad_backward'] / fused,
        'fused_overhead': derived['fused_overhead'] / fused,
        'of_which_side_matrices': s['side_matrices'] / fused,
    }
    return out


def child_time(cfg: dict[str, int], state_path: str, repeats: int, breakdown: bool) -> dict:
    """Compile, memory_analysis and timing of the three methods for one config."""
    import jax
    import numpy as np

    from trackstar_jax import train

    built = _build(cfg)
    model, mesh, tx = built['model'], built['mesh'], built['tx']
    batch = _batch(cfg, 0)
    b = cfg['batch']
    state, shardings = train.create_train_state(model, built['train_cfg'], mesh)
    train_step = train.make_train_step(model, tx, mesh, shardings)
    res: dict[str, Any] = {'config': cfg, 'methods': {m: {} for m in METHODS}}

    compiled, compile_s = harness.compile_timed(train_step, state, batch)
    res['methods']['train_step'].update(
        compile_s=compile_s, memory=harness.xla_memory(compiled), flops=harness.xla_flops(compiled)
    )
    # Two real steps on other batches: a genuine Adafactor state for the correction.
    for i, seed in enumerate((1, 2)):
        t0 = time.perf_counter()
        state, _ = train_step(state, _batch(cfg, seed))
        jax.block_until_ready(state)
        if i == 0:
            res['methods']['train_step']['first_call_s'] = time.perf_counter() - t0
    _save_state(state_path, state.params, state.opt_state)
    t0 = time.perf_counter()
    feat = _featurizer(built, state.params, state.opt_state)
    res['featurizer_init_s'] = time.perf_counter() - t0  # layout, corrections, constants
    res['dim'] = feat.dim
    res['num_fused_kernels'] = len(feat.fused_paths)
    res['num_params'] = int(sum(x.size for x in jax.tree.leaves(state.params)))
    args = (feat.params, feat.constants, batch['tokens'], batch['loss_mask'])
    calls = {'fused': (feat._fused, feat), 'reference': (feat._reference, feat.reference)}
    outs = {}
    for name, (jitted, call) in calls.items():
        compiled, compile_s = harness.compile_timed(jitted, *args)
        t0 = time.perf_counter()
        outs[name] = np.asarray(jax.block_until_ready(call(batch)))
        res['methods'][name].update(
            compile_s=compile_s,
            first_call_s=time.perf_counter() - t0,
            memory=harness.xla_memory(compiled),
            flops=harness.xla_flops(compiled),
        )
    f, r = outs['fused'], outs['reference']
    res['fused_vs_reference_max_rel_err'] = float(
        np.max(np.abs(f - r)) / max(float(np.max(np.abs(r))), 1e-30)
    )
    holder = {'state': state}

    def step():
        holder['state'], metrics = train_step(holder['state'], batch)
        return holder['state'], metrics

    fns = {
        'fused': lambda: feat(batch),
        'reference': lambda: feat.reference(batch),
        'train_step': step,
    }
    times = harness.interleaved(fns, repeats)
    harness.record_throughput(res['methods'], times, b, cfg['seq_len'])
    m = res['methods']
    res['ratios'] = {
        'fused_over_reference': m['fused']['examples_s'] / m['reference']['examples_s'],
        'fused_over_train_step': m['fused']['examples_s'] / m['train_step']['examples_s'],
    }
    # The same from the fastest repetition of each (less sensitive to a busy machine).
    best = {name: min(ts) for name, ts in times.items()}
    res['ratios_of_min'] = {
        'fused_over_reference': best['reference'] / best['fused'],
        'fused_over_train_step': best['train_step'] / best['fused'],
    }
    if breakdown:
        res['breakdown'] = _breakdown(built, feat, holder['state'], train_step, batch, repeats)
    return res


def child_rss(cfg: dict[str, int] | None, state_path: str | None, method: str) -> dict:
    """Peak RSS of one method (or 'idle') in this fresh process.

    The executable comes from the persistent compilation cache the timing child filled
    (``--cache_dir``), so compiler memory is not part of these figures.
    """
    import jax
    import jax.numpy as jnp

    from trackstar_jax import grads, train  # noqa: F401 (the imports are the baseline)
    from trackstar_jax.models import decoder  # noqa: F401

    jax.block_until_ready(jnp.ones(4) + 1)  # initialise the backend
    out: dict[str, Any] = {'method': method}
    if method == 'idle':
        out['peak'] = harness.proc_status()
        return out
    assert cfg is not None and state_path is not None
    built = _build(cfg)
    params, opt_state = _load_state(state_path, built)
    batch = _batch(cfg, 0)
    if method == 'train_step':
        state, shardings = _train_state(built, params, opt_state, 2)
        del params, opt_state
        jitted = train.make_train_step(built['model'], built['tx'], built['mesh'], shardings)
        args = (state, batch)
        holder = {'state': state}

        def run():
            holder['state'], metrics = jitted(holder['state'], batch)
            return holder['state'], metrics
    else:
        feat = _featurizer(built, params, opt_state)
        del params, opt_state
        jitted = feat._fused if method == 'fused' else feat._reference
        args = (feat.params, feat.constants, batch['tokens'], batch['loss_mask'])
        call = feat if method == 'fused' else feat.reference

        def run():
            return call(batch)

    out['setup'] = harness.proc_status()
    _, out['compile_s'] = harness.compile_timed(jitted, *args)
    out['after_compile'] = harness.proc_status()
    out['peak_reset'] = harness.reset_peak_rss()
    jax.block_until_ready(run())
    out['after_run'] = harness.proc_status()
    return out


# ----------------------------------------------------------------------------- parent


def _run_child(args: list[str], out_path: str, timeout: float) -> dict[str, Any]:
    """Runs this script as a child process and reads the JSON it writes."""
    cmd = [sys.executable, os.path.abspath(__file__), *args, '--child_out', out_path]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f'{shlex.join(cmd)} failed:\n{proc.stderr[-4000:]}')
    with open(out_path) as f:
        out = json.load(f)
    out['child_wall_s'] = time.perf_counter() - t0
    return out


def _rss_summary(rss: dict[str, Any], idle: dict[str, Any] | None) -> dict[str, float]:
    """MiB figures of one method's RSS child.

    process_peak_mb: ru_maxrss of the whole process (imports, params, executable, run).
    setup_rss_mb: RSS once params, optimizer state (and Featurizer) were in place.
    rss_before_run_mb: RSS after loading the executable, when the peak was reset.
    run_peak_mb: VmHWM over the execution alone (None if the reset was not possible).
    """
    run = rss['after_run']
    out = {
        'process_peak_mb': max(rss['after_compile']['ru_maxrss_mb'], run['ru_maxrss_mb']),
        'setup_rss_mb': rss['setup'].get('vmrss_mb'),
        'rss_before_run_mb': rss['after_compile'].get('vmrss_mb'),
        'run_peak_mb': run.get('vmhwm_mb') if rss['peak_reset'] else None,
        'executable_load_s': rss['compile_s'],
    }
    if out['run_peak_mb'] is not None and out['rss_before_run_mb'] is not None:
        out['run_peak_over_rss_before_run_mb'] = out['run_peak_mb'] - out['rss_before_run_mb']
    if idle is not None:
        out['process_peak_over_idle_mb'] = out['process_peak_mb'] - idle['peak']['ru_maxrss_mb']
    return out


def _print_table(results: list[dict[str, Any]]) -> None:
    mb = 2.0**20
    head = (
        f'{"config":>14} {"method":>10} {"ex/s":>9} {"compile s":>9} '
        f'{"XLA total MB":>12} {"XLA temp MB":>11} {"RSS run MB":>10} {"RSS proc MB":>11}'
    )
    print(head)
    print('-' * len(head))
    for r in results:
        for m in METHODS:
            x = r['methods'][m]
            rss = x.get('rss', {})
            run_peak = rss.get('run_peak_mb')
            print(
                f'{config_name(r["config"]):>14} {m:>10} {x["examples_s"]:9.2f} '
                f'{x["compile_s"]:9.1f} {x["memory"]["total_bytes"] / mb:12.1f} '
                f'{x["memory"]["temp_bytes"] / mb:11.1f} '
                f'{run_peak if run_peak is not None else float("nan"):10.0f} '
                f'{rss.get("process_peak_mb", float("nan")):11.0f}'
            )
        q, qm = r['ratios'], r['ratios_of_min']
        print(
            f'{"":>14} ratios (median; fastest rep): fused/reference '
            f'{q["fused_over_reference"]:.2f}x; {qm["fused_over_reference"]:.2f}x, '
            f'fused/train_step {q["fused_over_train_step"]:.2f}x; '
            f'{qm["fused_over_train_step"]:.2f}x'
        )


def _print_breakdown(bd: dict[str, Any], name: str) -> None:
    print(f'\nWhere the time goes ({name}), median seconds per batch:')
    for k, v in bd['parts'].items():
        flops = v['flops']
        gf = f'{flops / 1e9:8.1f} GFLOP' if flops else ''
        print(f'  {k:>22}: {v["seconds"]:8.3f} s {gf}')
    for k, v in bd['derived_seconds'].items():
        frac = bd['fraction_of_fused'].get(k)
        extra = f'  ({100 * frac:.0f}% of fused)' if frac is not None else ''
        print(f'  {"= " + k:>22}: {v:8.3f} s{extra}')


def main(argv: list[str] | None = None) -> None:
    """Parses flags; runs a child role, or the whole benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='smaller sweep (~3 min)')
    parser.add_argument(
        '--repeats', type=int, default=None, help='timed repetitions (default 5, quick 3)'
    )
    parser.add_argument('--no_rss', action='store_true', help='skip the RSS subprocesses')
    parser.add_argument('--out', default=None, help='JSON output path')
    parser.add_argument(
        '--breakdown_config', default=None, help="config of the time breakdown, e.g. 'd512_t128_b8'"
    )
    parser.add_argument('--child', choices=('time', 'rss'), help=argparse.SUPPRESS)
    parser.add_argument('--config', help=argparse.SUPPRESS)
    parser.add_argument('--method', help=argparse.SUPPRESS)
    parser.add_argument('--state', help=argparse.SUPPRESS)
    parser.add_argument('--breakdown', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--child_out', help=argparse.SUPPRESS)
    parser.add_argument('--cache_dir', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)

    if args.child:
        cfg = json.loads(args.config) if args.config else None
        if args.cache_dir:
            import jax

            jax.config.update('jax_compilation_cache_dir', args.cache_dir)
        if args.child == 'time':
            fingerprint = harness.library_fingerprint(LIBRARY_PATHS)
            out = child_time(cfg, args.state, repeats, args.breakdown)
            out['library'] = fingerprint
            device = harness.device_info()
            for key in ('jax_version', 'devices', 'device_kind'):
                out[key] = device[key]
        else:
            out = child_rss(cfg, args.state, args.method)
        with open(args.child_out, 'w') as f:
            json.dump(out, f)
        return

    t_start = time.perf_counter()
    library_at_start = harness.library_fingerprint(LIBRARY_PATHS)
    configs = make_configs(args.quick)
    bd_name = args.breakdown_config or ('d128_t128_b8' if args.quick else 'd512_t128_b8')
    out_path = args.out or os.path.join(
        harness.RESULTS_DIR, 'kernel_quick.json' if args.quick else 'kernel.json'
    )
    results: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix='kernel_bench_') as tmp:
        cache = os.path.join(tmp, 'compilation_cache')
        idle = None
        if not args.no_rss:
            idle = _run_child(['--child', 'rss', '--method', 'idle'], f'{tmp}/idle.json', 600)
            print(f'idle process (jax + library imported): {idle["peak"]}', flush=True)
        for cfg in configs:
            name = config_name(cfg)
            state = os.path.join(tmp, f'{name}.npz')
            common = ['--config', json.dumps(cfg), '--state', state, '--cache_dir', cache]
            reps = min(repeats, 3) if cfg['seq_len'] >= 512 else repeats
            child_args = ['--child', 'time', *common, '--repeats', str(reps)]
            if name == bd_name:
                child_args.append('--breakdown')
            res = _run_child(child_args, f'{tmp}/{name}_time.json', 1800)
            for key in ('jax_version', 'devices', 'device_kind'):
                meta[key] = res.pop(key)
            if not args.no_rss:
                for m in METHODS:
                    rss = _run_child(
                        ['--child', 'rss', *common, '--method', m], f'{tmp}/{name}_{m}.json', 1200
                    )
                    res['methods'][m]['rss'] = _rss_summary(rss, idle)
                    res['methods'][m]['rss_raw'] = rss
            results.append(res)
            x = res['methods']
            print(
                f'{name}: fused {x["fused"]["examples_s"]:.2f} ex/s, reference '
                f'{x["reference"]["examples_s"]:.2f}, '
                f'train_step {x["train_step"]["examples_s"]:.2f}'
                f' ({time.perf_counter() - t_start:.0f} s elapsed)',
                flush=True,
            )

    targets = {}
    wide = [r for r in results if r['config']['d_model'] >= 512]
    if wide:
        targets = {
            'fused_over_reference_ge_5x_at_width_ge_512': {
                'min': min(r['ratios']['fused_over_reference'] for r in wide),
                'max': max(r['ratios']['fused_over_reference'] for r in wide),
                'reached_in': [
                    config_name(r['config'])
                    for r in wide
                    if r['ratios']['fused_over_reference'] >= 5.0
                ],
            },
        }
    targets['fused_over_train_step_ge_0.5x'] = {
        'min': min(r['ratios']['fused_over_train_step'] for r in results),
        'reached_in': [
            config_name(r['config']) for r in results if r['ratios']['fused_over_train_step'] >= 0.5
        ],
        'stretch_1.4x_reached_in': [
            config_name(r['config']) for r in results if r['ratios']['fused_over_train_step'] >= 1.4
        ],
    }
    library_at_end = harness.library_fingerprint(LIBRARY_PATHS)
    changed = harness.changed_during_run(
        library_at_start, library_at_end, *(r['library'] for r in results)
    )
    if changed:
        print('WARNING: trackstar_jax changed during this run; results mix versions.')
    report = {
        'benchmark': 'kernel',
        'command': harness.command_line(),
        'timestamp': harness.timestamp(),
        **meta,
        'host': harness.host_info(),
        'library': {**library_at_start, 'changed_during_run': changed},
        'settings': {
            'vocab_size': VOCAB,
            'num_layers': NUM_LAYERS,
            'widths': WIDTHS,
            'num_kv_heads': 1,
            'block_dim': BLOCK_DIM,
            'num_layer_blocks': NUM_LAYERS,
            'split_attention_mlp': True,
            'correction': 'adafactor',
            'output_fn': 'loss',
            'min_dim_size_to_factor': MIN_DIM_TO_FACTOR,
            'repeats': repeats,
            'quick': args.quick,
            'breakdown_config': bd_name,
        },
        'idle_process_rss': idle['peak'] if idle else None,
        'configs': results,
        'targets': targets,
        'wall_s': time.perf_counter() - t_start,
    }
    harness.write_result(out_path, report)
    print()
    _print_table(results)
    for r in results:
        if 'breakdown' in r:
            _print_breakdown(r['breakdown'], config_name(r['config']))
    print(f'\nidle process RSS: {report["idle_process_rss"]}')
    print(f'targets: {json.dumps(targets, indent=1)}')
    print(f'wrote {out_path} ({report["wall_s"]:.0f} s)')


if __name__ == '__main__':
    main()
