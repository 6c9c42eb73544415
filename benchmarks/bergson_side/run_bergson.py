"""PyTorch side of the trackstar_jax vs Bergson comparison: run EleutherAI Bergson's
TrackStar over pre-tokenised passages and queries, time every phase, and write top-10
proponents per query as JSON.

Run it INSIDE the Bergson virtualenv (bergson 2.5.1, torch 2.13.0+cpu, transformers
5.23.0; pins in /work/bergson_venv/FREEZE.txt). That venv was made with:

    python3.11 -m venv /work/bergson_venv && echo torch==2.13.0 > /work/bergson_venv/constraints.txt
    /work/bergson_venv/bin/pip install torch==2.13.0
    /work/bergson_venv/bin/pip install bergson gguf -c /work/bergson_venv/constraints.txt
    /work/bergson_venv/bin/pip uninstall -y torchaudio torchvision   # bergson pulls them; unused

and the model folder by export_hf.py (same directory). Then:

    /work/bergson_venv/bin/python benchmarks/bergson_side/run_bergson.py \
        --model /work/smollm2_hf --passages passages.jsonl --queries queries.jsonl \
        --projection_dim 16 --batch_size 8 --workdir /tmp/bergson_run --out bergson.json

Inputs (JSONL, one object per line):
  passages: {"id": int, "input_ids": [int, ...]}; every row the same length T. The
            loss of a passage is summed over all of its next-token predictions.
  queries:  {"id": int, "input_ids": [...]} plus, optionally, ONE of
              "prompt_len": P   -> loss only on tokens P..T-1 (the completion), or
              "labels_mask": [0/1 per token] -> loss on tokens t with mask[t] = 1
            (token t is a target predicted from tokens[:t], the trackstar_jax
            `loss_mask` convention; mask[0] is ignored). Neither: loss on all tokens.
            Queries may have a different length from passages, but all the same.

What runs (Bergson in this one process, nproc_per_node=1; our two helpers, the
normalizer estimate and the train step, each in a spawned child process):
  normalizer   (ours, optional) Adafactor-factored second moments for a checkpoint
               without optimizer state: mean over passages of the squared per-example
               loss gradient of every Linear weight, stored as exp_avg_sq_row/col in an
               `optimizer.pt` that Bergson's `--optimizer_state` reads (same estimator
               as trackstar_jax.grads.estimate_second_moments).
  trackstar    `bergson trackstar` exactly (bergson.cli.commands.Trackstar.execute),
               its five steps timed separately by wrapping the functions it calls:
      value_hessian   gradient pass over the passages -> per-module k^2 x k^2 Gram R_train
      query_hessian   gradient pass over the queries  -> R_eval
      mix             λ (TrackStar §A.1.3) and R = λ R_eval + (1-λ) R_train
      query_index     gradient pass over the queries, stored as unit(R^-1/2 q)
      stream_score    gradient pass over the passages, scored on the fly against the
                      query index: <R^-1/2 g, q'> / |R^-1/2 g|  (skip: --stream_score false)
  index_build  (--index_build true) `bergson build` of the passages with the same
               settings and the mixed R: a stored index of unit(R^-1/2 g); this is the
               phase index tokens/s is taken from when it runs.
  index_query  scores the query index against that stored index with Bergson's
               Attributor (dot products of unit vectors = TrackStar's score) -> top-10.
  train_step   a plain float32 forward+backward+optimizer step of the same model on
               a [batch_size, T] batch, timed after warm-up.

Peak RSS: per phase, the process's VmHWM after resetting it (/proc/self/clear_refs)
at the phase's start, and the process tree's RSS polled with psutil every 0.1 s.
(getrusage is not used: clear_refs resets ru_maxrss too, and RUSAGE_CHILDREN picks up
the parent's pages through the `git rev-parse` Bergson forks when saving configs.)

Settings that differ from Bergson's defaults (all recorded in the output JSON):
  --unit_normalize true      (Bergson's trackstar defaults to false: plain R^-1 q · g)
  --damping_factor 0.01      (Bergson 0.1; trackstar_jax's hessian.fit uses 0.01)
  --target_downweight_components round(1000 D / 65536)   (Bergson 1000 for any D)
  --stats_sample_size None   (Bergson 10000 rows per Hessian; here all rows)
  --optimizer_state <estimated optimizer.pt>             (Bergson: no normaliser)
The equivalent CLI call for the trackstar part is
    bergson trackstar RUN --model M --precision fp32 --projection_dim K \
      --data.dataset PASSAGES_DIR --query.dataset QUERIES_DIR \
      --token_batch_size B*T --max_batch_size B --loss_reduction sum \
      --optimizer_state optimizer.pt --unit_normalize true --damping_factor 0.01 \
      --target_downweight_components N --stats_sample_size ... --overwrite true
with PASSAGES_DIR / QUERIES_DIR the `save_to_disk` datasets this script writes under
WORKDIR/data (columns input_ids, and labels with -100 off-target for queries).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

PAPER_DIM = 65536  # the TrackStar paper's D; trackstar_jax scales λ's k by D / 2^16


# --------------------------------------------------------------------------- memory


def _read_status_kb(field: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _maxrss_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


class TreePoller:
    """Polls RSS of this process plus all its descendants (psutil) every `interval`
    seconds; Bergson runs single-process here (nproc_per_node=1), this checks it."""

    def __init__(self, interval: float = 0.1):
        import threading

        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self.interval = interval
        self.peak_kb = 0
        self.children_seen: dict[int, dict] = {}
        self.open: list[dict] = []  # per open phase: {'tree_peak_kb': ...}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)

    def sample(self) -> int:
        ps = self._psutil
        try:
            total = self._proc.memory_info().rss
            for c in self._proc.children(recursive=True):
                try:
                    rss = c.memory_info().rss
                    total += rss
                    rec = self.children_seen.setdefault(
                        c.pid, {'cmd': ' '.join(c.cmdline())[:200], 'peak_rss_mb': 0.0}
                    )
                    rec['peak_rss_mb'] = max(rec['peak_rss_mb'], round(rss / 2**20, 1))
                except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                    pass
        except ps.Error:
            return 0
        kb = total // 1024
        self.peak_kb = max(self.peak_kb, kb)
        for ph in self.open:
            ph['tree_peak_kb'] = max(ph['tree_peak_kb'], kb)
        return kb

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sample()


class PhaseTimer:
    """Wall time and peak RSS of named phases. Each phase resets the kernel's
    high-water mark (VmHWM) at its start and reads it at its end; a phase that
    encloses others reports the max of its own and theirs. With a TreePoller,
    also the polled peak RSS of the whole process tree during the phase."""

    def __init__(self, poller: TreePoller | None = None):
        self.phases: dict[str, dict] = {}
        self.poller = poller
        self._stack: list[list[float]] = []  # per open phase: peaks (KiB) seen so far

    @contextmanager
    def phase(self, name: str):
        _reset_hwm()
        rss0 = _read_status_kb('VmRSS')
        self._stack.append([])
        tree = {'tree_peak_kb': 0}
        if self.poller:
            tree['tree_peak_kb'] = self.poller.sample()
            self.poller.open.append(tree)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            if self.poller:
                self.poller.sample()
                self.poller.open = [t for t in self.poller.open if t is not tree]
            inner = self._stack.pop()
            hwm = _read_status_kb('VmHWM')
            peak = max([hwm or 0] + inner)
            if self._stack:
                self._stack[-1].append(peak)
            rec = {'wall_s': round(wall, 4)}
            if peak:
                rec['peak_rss_mb'] = round(peak / 1024.0, 1)
            if self.poller:
                rec['tree_peak_rss_mb_polled'] = round(tree['tree_peak_kb'] / 1024.0, 1)
            if rss0 is not None:
                rec['rss_at_start_mb'] = round(rss0 / 1024.0, 1)
            self.phases[name] = rec
            print(f'[run_bergson] phase {name}: {wall:.2f}s', flush=True)


# --------------------------------------------------------------------------- data


def read_jsonl(path: str, kind: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if 'id' not in row or 'input_ids' not in row:
                sys.exit(f'{path}:{n}: a {kind} row needs "id" and "input_ids"')
            rows.append(row)
    if not rows:
        sys.exit(f'{path}: no {kind}')
    lengths = {len(r['input_ids']) for r in rows}
    if len(lengths) != 1:
        sys.exit(f'{path}: all {kind} must have the same length, got {sorted(lengths)[:5]}...')
    ids = [r['id'] for r in rows]
    if len(set(ids)) != len(ids):
        sys.exit(f'{path}: duplicate ids')
    return rows


def query_labels(row: dict) -> list[int]:
    """Bergson `labels`: the token where it is a loss target, -100 where it is not
    (Bergson shifts: labels[t] is predicted from input_ids[:t])."""
    ids = [int(x) for x in row['input_ids']]
    if 'prompt_len' in row and 'labels_mask' in row:
        sys.exit(f'query {row["id"]}: give prompt_len or labels_mask, not both')
    if 'prompt_len' in row:
        p = int(row['prompt_len'])
        return [-100 if t < p else tok for t, tok in enumerate(ids)]
    if 'labels_mask' in row:
        m = row['labels_mask']
        if len(m) != len(ids):
            sys.exit(f'query {row["id"]}: labels_mask length differs from input_ids')
        return [tok if m[t] else -100 for t, tok in enumerate(ids)]
    return ids


def save_dataset(rows: list[dict], path: Path, with_labels: bool) -> None:
    from datasets import Dataset

    cols = {'input_ids': [[int(x) for x in r['input_ids']] for r in rows]}
    if with_labels:
        cols['labels'] = [query_labels(r) for r in rows]
    if path.exists():
        shutil.rmtree(path)
    Dataset.from_dict(cols).save_to_disk(str(path))


# --------------------------------------------------------------------------- normalizer


def estimate_adafactor_state(
    model_dir: str, rows: list[dict], batch_size: int, out_path: Path
) -> dict:
    """Mean squared per-example loss gradient of every nn.Linear weight under
    `model.base_model` (the modules Bergson hooks), factored the Adafactor way
    (row = mean over inputs [O], col = mean over outputs [I]), saved as an
    optimizer.pt Bergson's load_from_optimizer reads (FACTORED format).

    Per-example weight gradients are g_bᵀ a_b from hooks, with the loss of each
    example summed over its tokens (Bergson's loss_reduction='sum')."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map='cpu')
    model.eval()
    model.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(True)  # so the backward pass runs
    base = model.base_model
    base_prefix = next(n for n, m in model.named_modules() if m is base) + '.'
    sums: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in base.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue

        def fwd(m, inp, out, name=name):
            cache[name] = inp[0].detach()

        def bwd(m, gin, gout, name=name):
            g = gout[0].detach()  # [B, S, O]
            a = cache.pop(name)  # [B, S, I]
            per_ex = torch.bmm(g.transpose(1, 2), a)  # [B, O, I]
            sq = per_ex.square_().sum(0)
            sums[name] = sq if name not in sums else sums[name].add_(sq)

        handles.append(mod.register_forward_hook(fwd))
        handles.append(mod.register_full_backward_hook(bwd))

    count = 0
    for s in range(0, len(rows), batch_size):
        ids = torch.tensor([r['input_ids'] for r in rows[s : s + batch_size]], dtype=torch.long)
        logits = model(ids).logits[:, :-1].float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction='sum'
        )
        loss.backward()
        count += len(ids)
    for h in handles:
        h.remove()

    names = [n for n, _ in model.named_parameters()]
    state, params = {}, []
    for mod_name, tot in sums.items():
        v = tot / count
        pname = base_prefix + mod_name + '.weight'
        idx = names.index(pname)
        state[idx] = {
            'exp_avg_sq_row': v.mean(dim=1).contiguous(),
            'exp_avg_sq_col': v.mean(dim=0).contiguous(),
            'param_name': pname,
        }
        params.append(idx)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state': state, 'param_groups': [{'params': sorted(params)}]}, out_path)
    del model
    return {'examples': count, 'modules': len(state), 'path': str(out_path)}


# --------------------------------------------------------------------------- train step


def time_train_step(
    model_dir: str, rows: list[dict], batch_size: int, optimizer: str, warmup: int, steps: int
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map='cpu')
    model.train()
    batch_rows = [rows[i % len(rows)] for i in range(batch_size)]
    ids = torch.tensor([r['input_ids'] for r in batch_rows], dtype=torch.long)
    if optimizer == 'adafactor':
        opt = torch.optim.Adafactor(model.parameters(), lr=1e-5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    med = statistics.median(times)
    tokens = ids.numel()
    del model, opt
    return {
        'optimizer': optimizer,
        'batch_shape': list(ids.shape),
        'dtype': 'float32',
        'warmup_steps': warmup,
        'step_s': [round(t, 4) for t in times],
        'median_step_s': round(med, 4),
        'min_step_s': round(min(times), 4),
        'tokens_per_s': round(tokens / med, 2),
        'tokens_per_s_of_min': round(tokens / min(times), 2),
        'examples_per_s': round(ids.shape[0] / med, 3),
    }


# --------------------------------------------------------------------------- children


def _child_entry(fn_name: str, kwargs: dict, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    res = globals()[fn_name](**kwargs)
    res['process_peak_rss_mb'] = round(_maxrss_mb(resource.RUSAGE_SELF), 1)
    res['process_torch_threads'] = torch.get_num_threads()
    return res


def in_child(fn_name: str, kwargs: dict, threads: int) -> dict:
    """Run one of our own (non-Bergson) helpers in a fresh spawned process, so its
    memory neither counts towards nor lingers in the Bergson process."""
    import multiprocessing as mp

    with mp.get_context('spawn').Pool(1) as pool:
        return pool.apply(_child_entry, (fn_name, kwargs, threads))


# --------------------------------------------------------------------------- main


def str2bool(v: str) -> bool:
    if v.lower() in ('1', 'true', 'yes', 'y'):
        return True
    if v.lower() in ('0', 'false', 'no', 'n'):
        return False
    raise argparse.ArgumentTypeError(f'not a boolean: {v}')


def topk(scores, ids: list, k: int) -> list[dict]:
    import numpy as np

    order = np.argsort(-scores, kind='stable')[:k]
    return [{'id': ids[int(i)], 'score': float(scores[int(i)])} for i in order]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument('--model', required=True, help='HF model folder (export_hf.py output)')
    ap.add_argument('--passages', required=True, help='JSONL {"id", "input_ids"}')
    ap.add_argument(
        '--queries', required=True, help='JSONL {"id", "input_ids"[, "prompt_len" | "labels_mask"]}'
    )
    ap.add_argument(
        '--projection_dim',
        type=int,
        default=16,
        help='k per side: each Linear module gives a k x k block (D = modules * k^2)',
    )
    ap.add_argument(
        '--batch_size',
        type=int,
        default=8,
        help='examples per forward/backward (token_batch_size = batch_size * T)',
    )
    ap.add_argument('--workdir', required=True)
    ap.add_argument('--out', required=True, help='output JSON')
    ap.add_argument('--k', type=int, default=10, help='proponents per query')
    ap.add_argument(
        '--normalizer',
        default='estimate',
        help="'estimate' (ours, see docstring), 'none', or an optimizer.pt / checkpoint dir",
    )
    ap.add_argument(
        '--normalizer_examples',
        type=int,
        default=0,
        help='passages used by --normalizer estimate (0 = all)',
    )
    ap.add_argument(
        '--damping_factor',
        type=float,
        default=0.01,
        help='damped_inverse: (λ_i + c·mean λ)^-1/2; trackstar_jax uses 0.01, Bergson 0.1',
    )
    ap.add_argument(
        '--target_downweight_components',
        default='auto',
        help="λ's component k; 'auto' = round(1000 * D / 65536) as in trackstar_jax "
        '(Bergson: 1000 whatever D)',
    )
    ap.add_argument(
        '--stats_sample_size',
        type=int,
        default=0,
        help="rows used for each Hessian; 0 = all (Bergson's default is 10000)",
    )
    ap.add_argument('--mix_hessians', type=str2bool, default=True)
    ap.add_argument(
        '--stream_score',
        type=str2bool,
        default=True,
        help='run trackstar step 5 (on-the-fly scoring of the passages)',
    )
    ap.add_argument(
        '--index_build',
        type=str2bool,
        default=True,
        help='also build a stored passage index and score the queries against it',
    )
    ap.add_argument('--projection_seed', type=int, default=None)
    ap.add_argument('--train_step', type=str2bool, default=True)
    ap.add_argument('--train_optimizer', choices=('adafactor', 'adamw'), default='adafactor')
    ap.add_argument('--train_warmup', type=int, default=2)
    ap.add_argument('--train_steps', type=int, default=5)
    ap.add_argument(
        '--threads', type=int, default=0, help='torch.set_num_threads (0 = leave torch default)'
    )
    args = ap.parse_args()
    if not (args.stream_score or args.index_build):
        sys.exit('need --stream_score true or --index_build true to get scores')

    t_total = time.perf_counter()
    poller = TreePoller(interval=0.1)
    poller.start()
    timer = PhaseTimer(poller)

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import bergson
    import bergson.process_grads as pg_mod
    import transformers
    from bergson.cli import trackstar as ts_mod
    from bergson.cli.commands import Trackstar
    from bergson.config.config import (
        DataConfig,
        DistributedConfig,
        InversionConfig,
        PreprocessConfig,
        QuerySetConfig,
        ScoreConfig,
        TrackstarConfig,
        TrackstarIndexConfig,
    )

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_path = work / 'trackstar'
    for p in (run_path, work / 'passage_index'):
        for q in (p, Path(str(p) + '.part')):
            if q.exists():
                shutil.rmtree(q)

    # ---- data
    with timer.phase('prepare_data'):
        passages = read_jsonl(args.passages, 'passages')
        queries = read_jsonl(args.queries, 'queries')
        T = len(passages[0]['input_ids'])
        Tq = len(queries[0]['input_ids'])
        pass_dir, query_dir = work / 'data' / 'passages', work / 'data' / 'queries'
        save_dataset(passages, pass_dir, with_labels=False)
        save_dataset(queries, query_dir, with_labels=True)
    pass_ids = [r['id'] for r in passages]
    query_ids = [r['id'] for r in queries]
    N, Q = len(passages), len(queries)
    query_loss_tokens = [
        sum(1 for t, lab in enumerate(query_labels(r)) if t > 0 and lab != -100) for r in queries
    ]

    # ---- normalizer
    optimizer_state = ''
    normalizer_info: dict = {'kind': 'none'}
    if args.normalizer == 'estimate':
        sample = passages if not args.normalizer_examples else passages[: args.normalizer_examples]
        with timer.phase('normalizer_estimate'):
            info = in_child(
                'estimate_adafactor_state',
                dict(
                    model_dir=args.model,
                    rows=sample,
                    batch_size=args.batch_size,
                    out_path=work / 'normalizer' / 'optimizer.pt',
                ),
                args.threads,
            )
        optimizer_state = info['path']
        normalizer_info = {
            'kind': 'adafactor (estimated: mean squared per-example gradient, factored)',
            **info,
        }
    elif args.normalizer != 'none':
        optimizer_state = args.normalizer
        normalizer_info = {'kind': 'from optimizer state', 'path': optimizer_state}

    # ---- Bergson configuration
    token_batch = args.batch_size * max(T, Tq)
    index_cfg = TrackstarIndexConfig(
        run_path=str(run_path),
        overwrite=True,
        model=args.model,
        precision='fp32',
        data=DataConfig(dataset=str(pass_dir), split='train'),
        projection_dim=args.projection_dim,
        projection_seed=args.projection_seed,
        token_batch_size=token_batch,
        max_batch_size=args.batch_size,
        optimizer_state=optimizer_state,
        loss_reduction='sum',
        distributed=DistributedConfig(nnode=1, nproc_per_node=1),
    )
    inversion = InversionConfig(inversion='damped_inverse', damping_factor=args.damping_factor)
    trackstar_cfg = TrackstarConfig(
        query=QuerySetConfig(dataset=str(query_dir), split='train', aggregation='none'),
        preprocess_cfg=PreprocessConfig(unit_normalize=True, inversion_cfg=inversion),
        score_cfg=ScoreConfig(score='individual', precision='fp32'),
        mix_hessians=args.mix_hessians,
        stats_sample_size=args.stats_sample_size or None,
    )

    # ---- wrap the functions `bergson trackstar` calls, to time its steps
    lam_box: dict = {}
    orig = {
        'approximate_hessians': ts_mod.approximate_hessians,
        'mix_autocorrelation_matrices': ts_mod.mix_autocorrelation_matrices,
        'build_query': ts_mod.build_query,
        'score_dataset': ts_mod.score_dataset,
        'compute_lambda': pg_mod.compute_lambda,
    }

    def timed_hess(cfg, hess_cfg):
        name = 'value_hessian' if cfg.run_path.endswith('value_hessian') else 'query_hessian'
        with timer.phase(name):
            return orig['approximate_hessians'](cfg, hess_cfg)

    def timed_mix(**kw):
        with timer.phase('mix'):
            return orig['mix_autocorrelation_matrices'](**kw)

    def timed_build_query(*a, **kw):
        with timer.phase('query_index'):
            return orig['build_query'](*a, **kw)

    def timed_score(*a, **kw):
        if not args.stream_score:
            return None
        with timer.phase('stream_score'):
            return orig['score_dataset'](*a, **kw)

    def recording_lambda(*a, **kw):
        lam = orig['compute_lambda'](*a, **kw)
        lam_box['lambda'] = lam
        return lam

    ts_mod.approximate_hessians = timed_hess
    ts_mod.mix_autocorrelation_matrices = timed_mix
    ts_mod.build_query = timed_build_query
    ts_mod.score_dataset = timed_score
    pg_mod.compute_lambda = recording_lambda

    # λ's component: trackstar_jax scales the paper's 1000 of 2^16 by D / 2^16.
    # D needs the module count; every Linear under model.base_model is hooked.
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(args.model)
    n_modules_expected = 7 * mcfg.num_hidden_layers  # q,k,v,o,gate,up,down (Llama)
    D_expected = n_modules_expected * args.projection_dim**2
    if args.target_downweight_components == 'auto':
        tdc = max(1, round(1000 * D_expected / PAPER_DIM))
    else:
        tdc = int(args.target_downweight_components)
    trackstar_cfg.target_downweight_components = tdc

    cmd = Trackstar(index_cfg=index_cfg, trackstar_cfg=trackstar_cfg)
    with timer.phase('trackstar_total'):
        cmd.execute()

    # ---- results of the trackstar pipeline
    qinfo = json.loads((run_path / 'query' / 'info.json').read_text())
    grad_sizes = qinfo['grad_sizes']
    modules = list(grad_sizes)
    D = sum(grad_sizes.values())
    if D != D_expected:
        print(
            f'[run_bergson] note: D = {D}, expected {D_expected}; '
            f'target_downweight_components used {tdc}'
        )

    results: dict = {'queries': []}
    stream_scores = None
    if args.stream_score:
        from bergson.data import load_scores

        sc = load_scores(run_path / 'scores')
        stream_scores = np.asarray(sc[:], dtype=np.float32)  # [N, Q]
        assert stream_scores.shape == (N, Q), stream_scores.shape

    # ---- optional stored index over the passages, queried with the Attributor
    index_scores = None
    if args.index_build:
        from copy import deepcopy

        from bergson.cli.commands import Build
        from bergson.data import column_offsets, load_gradients
        from bergson.query.attributor import Attributor

        hess_path = str(run_path / ('mixed_hessian' if args.mix_hessians else 'value_hessian'))
        b_cfg = deepcopy(index_cfg)
        b_cfg.run_path = str(work / 'passage_index')
        b_pre = PreprocessConfig(
            unit_normalize=True, hessian_path=hess_path, inversion_cfg=inversion
        )
        with timer.phase('index_build'):
            b = Build(index_cfg=b_cfg, preprocess_cfg=b_pre)
            b.execute()
        with timer.phase('index_query'):
            # Passages stored as unit(R^-1/2 g), queries as unit(R^-1/2 q): TrackStar's
            # score is their dot product; no further preconditioning.
            attr = Attributor(
                work / 'passage_index', device='cpu', dtype=torch.float32, unit_norm=False
            )
            qmm = load_gradients(run_path / 'query')
            qg = {
                name: torch.from_numpy(np.asarray(qmm[:, lo:hi], dtype=np.float32))
                for name, (lo, hi) in column_offsets(grad_sizes).items()
            }
            vals, idxs = attr.search(qg, k=N)
            index_scores = np.zeros((N, Q), dtype=np.float32)
            for qi in range(Q):
                index_scores[idxs[qi].numpy(), qi] = vals[qi].numpy()
            del attr

    for qi, qid in enumerate(query_ids):
        entry: dict = {'id': qid, 'loss_tokens': query_loss_tokens[qi]}
        if stream_scores is not None:
            entry['top'] = topk(stream_scores[:, qi], pass_ids, args.k)
        if index_scores is not None:
            entry['top_index'] = topk(index_scores[:, qi], pass_ids, args.k)
            if stream_scores is None:
                entry['top'] = entry['top_index']
        if stream_scores is not None and index_scores is not None:
            a = {d['id'] for d in entry['top']}
            b_ = {d['id'] for d in entry['top_index']}
            entry['stream_vs_index_overlap'] = len(a & b_)
        results['queries'].append(entry)
    if stream_scores is not None and index_scores is not None:
        results['stream_vs_index_max_abs_score_diff'] = float(
            np.abs(stream_scores - index_scores).max()
        )

    # ---- training step of the same model for reference
    train = None
    if args.train_step:
        with timer.phase('train_step'):
            train = in_child(
                'time_train_step',
                dict(
                    model_dir=args.model,
                    rows=passages[: args.batch_size],
                    batch_size=args.batch_size,
                    optimizer=args.train_optimizer,
                    warmup=args.train_warmup,
                    steps=args.train_steps,
                ),
                args.threads,
            )

    # ---- report
    ph = timer.phases
    tokens = N * T
    pipeline_phases = [
        'value_hessian',
        'query_hessian',
        'mix',
        'query_index',
        'stream_score',
        'index_build',
        'index_query',
    ]
    bergson_phases = pipeline_phases + ['trackstar_total']
    pipeline_wall = sum(ph[p]['wall_s'] for p in pipeline_phases if p in ph)
    if 'normalizer_estimate' in ph:
        pipeline_wall_with_norm = pipeline_wall + ph['normalizer_estimate']['wall_s']
    else:
        pipeline_wall_with_norm = pipeline_wall

    def tps(phase):
        return (
            round(tokens / ph[phase]['wall_s'], 2)
            if phase in ph and ph[phase]['wall_s'] > 0
            else None
        )

    index_phase = 'index_build' if 'index_build' in ph else 'stream_score'
    out = {
        'tool': 'bergson',
        'command': ' '.join([sys.executable] + sys.argv),
        'timestamp': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
        'versions': {
            'python': platform.python_version(),
            'torch': torch.__version__,
            'transformers': transformers.__version__,
            'bergson': bergson.__version__,
        },
        'host': {'cpus': os.cpu_count(), 'torch_threads': torch.get_num_threads(), 'device': 'cpu'},
        'data': {'passages': N, 'passage_tokens': T, 'queries': Q, 'query_tokens': Tq},
        'bergson_config': {
            'pipeline': 'bergson trackstar (bergson.cli.commands.Trackstar.execute)'
            + (
                ' + bergson build of the passages with the mixed Hessian + Attributor'
                if args.index_build
                else ''
            ),
            'projection': 'per_module, double-sided rademacher (jl scale): each Linear '
            f'module -> {args.projection_dim} x {args.projection_dim}',
            'projection_dim_per_side': args.projection_dim,
            'num_modules': len(modules),
            'modules': modules,
            'total_dim_D': D,
            'normalizer': normalizer_info,
            'loss': 'cross-entropy summed over target tokens (loss_reduction=sum); '
            'passages: all tokens; queries: see loss_tokens',
            'hessian': 'autocorrelation (per-module k^2 x k^2 Gram of projected, '
            'normalised per-example gradients), '
            + ('mixed R = λ R_eval + (1-λ) R_train' if args.mix_hessians else 'R_train only'),
            'lambda': lam_box.get('lambda'),
            'target_downweight_components': tdc,
            'inversion': 'damped_inverse, (R + c·mean(eig) I)^-1/2 per module, '
            f'c = {args.damping_factor}',
            'unit_normalize': True,
            'score': 'cos(R^-1/2 g, R^-1/2 q) (two-sided R^-1/2, then unit norm)',
            'stats_sample_size': args.stats_sample_size or None,
            'token_batch_size': token_batch,
            'max_batch_size': args.batch_size,
            'precision': 'fp32 model, fp32 gradients, fp32 scores',
            'projection_seed': args.projection_seed,
        },
        'phases': ph,
        'index_tokens_per_s': tps(index_phase),
        'index_tokens_per_s_phase': index_phase,
        'tokens_per_s': {p: tps(p) for p in ('value_hessian', 'stream_score', 'index_build')},
        'pipeline_wall_s': round(pipeline_wall, 3),
        'pipeline_wall_with_normalizer_s': round(pipeline_wall_with_norm, 3),
        'trackstar_total_wall_s': ph['trackstar_total']['wall_s'],
        'peak_rss_mb': {
            # Per-phase peaks are VmHWM, reset at each phase start through
            # /proc/self/clear_refs (which also resets getrusage's ru_maxrss, so that
            # is not reported). The normalizer estimate and the train step run in
            # spawned children with their own peaks. RUSAGE_CHILDREN is not useful
            # either: Bergson's save_run_config forks `git rev-parse`, whose
            # ru_maxrss includes the parent's pages before exec.
            'bergson_process': max(
                (ph[p]['peak_rss_mb'] for p in bergson_phases if 'peak_rss_mb' in ph.get(p, {})),
                default=None,
            ),
            'bergson_process_tree_polled': max(
                (ph[p]['tree_peak_rss_mb_polled'] for p in bergson_phases if p in ph), default=None
            ),
            'normalizer_child': (
                normalizer_info.get('process_peak_rss_mb')
                if isinstance(normalizer_info, dict)
                else None
            ),
            'train_step_child': train.get('process_peak_rss_mb') if train else None,
            'whole_run_tree_polled': round(poller.peak_kb / 1024.0, 1),
        },
        'children_seen': list(poller.children_seen.values()),
        'train_step': train,
        'total_wall_s': round(time.perf_counter() - t_total, 3),
        **results,
    }
    poller.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(out, f, indent=1)
    print(
        f'[run_bergson] wrote {args.out}: index {out["index_tokens_per_s"]} tok/s ({index_phase}), '
        f'pipeline {out["pipeline_wall_s"]}s, '
        f'Bergson peak RSS {out["peak_rss_mb"]["bergson_process"]} MB'
    )


if __name__ == '__main__':
    main()
