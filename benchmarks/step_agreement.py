r"""Which part of a gradient score sets how well it agrees with one training step.

    python benchmarks/lds.py --workdir=W              # the retrainings (else run here)
    python benchmarks/step_agreement.py --workdir=W   # -> results/step_agreement.json
    python benchmarks/step_agreement.py --quick --workdir=/tmp/lds_quick   # a smoke run

Tail-patch measures one trainer step on a proponent; to first order that is
⟨∇p_q, u_m⟩ with u_m Adafactor's update on the example alone (lds.py's "One step" row).
TrackStar's score differs from it in five ways: it projects (D = 1,024 here), leaves the
token embedding out (tied to the output layer in this model, so the step's largest
tensor), corrects the query's gradient as well as the example's (⟨C g_q, C g_m⟩ where the
step has ⟨g_q, C g_m⟩, C = V^{-1/2}), normalises the whole gradient where Adafactor clips
each tensor's update, and (with R) preconditions. On lds.py's model, data and retrained
subsets (the same seeds: the same model), this scores every (query, example) pair
exactly in the full parameter space (``eval.full_space``) in five forms (dot, cosine,
corrected on both sides = Exp 4 unprojected, corrected on the training side, and the
step's own form: training side, per-tensor clipping), each over the index's parameters
(embedding left out) and over all of them, beside the library's projected Exp 1, Exp 2
and Exp 4 at D = 1,024, 4,096 and 16,384. Per row: ρ one-step (per-query Spearman with
⟨∇p_q, u_m⟩ over all examples) and ρ frozen V (the same step with V held at the saved
state: the quantity the step form computes, so its ρ there is a check), LDS on lds.py's
48 retrained halves, MRR of the entailing gloss and tail-patch (one step on each of the
top 3, lds.py's protocol); then paired differences (95% bootstrap intervals over
queries) that take the parts away one at a time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import lds as lds_bench  # noqa: E402

OUT = os.path.join(harness.RESULTS_DIR, 'step_agreement.json')
FORMS = {
    'dot': 'dot',
    'cosine': 'cosine',
    'corrected, both sides': 'corrected',
    'corrected, training side': 'train_corrected',
    'step form': 'step',
}
PARAMS = {'index params': ('embedding',), 'all params': ()}
# Projected rows: lds.py's GradientSpec at these block sizes (4 blocks: D = 4 x block).
BLOCK_DIMS = (256, 1024, 4096)
PROJECTED = {'Exp 1 (dot)': ('none', False), 'Exp 2 (+unit)': ('none', True),
             'Exp 4 (+optim)': ('adafactor', True)}  # fmt: skip
METRICS = ('one_step_rho', 'frozen_v_rho', 'lds', 'rr', 'tail_patch')


def full_name(form: str, params: str) -> str:
    return f'{form} ({params})'


def projected_name(method: str, block_dim: int) -> str:
    return f'{method}, D = {4 * block_dim:,}'


# (with, without): each takes one difference between TrackStar's form and the step's away.
PARTS = {
    'unit norm': (full_name('cosine', 'index params'), full_name('dot', 'index params')),
    'correction on both sides (Exp 4 vs Exp 2)': (
        full_name('corrected, both sides', 'index params'),
        full_name('cosine', 'index params'),
    ),
    'correcting the query too': (
        full_name('corrected, both sides', 'index params'),
        full_name('corrected, training side', 'index params'),
    ),
    'whole-gradient unit norm instead of per-tensor clipping': (
        full_name('corrected, training side', 'index params'),
        full_name('step form', 'index params'),
    ),
    'embedding left out (step form)': (
        full_name('step form', 'index params'),
        full_name('step form', 'all params'),
    ),
    'embedding left out (Exp 4 form)': (
        full_name('corrected, both sides', 'index params'),
        full_name('corrected, both sides', 'all params'),
    ),
    **{
        f'projection to D = {4 * b:,} (Exp 4)': (
            projected_name('Exp 4 (+optim)', b),
            full_name('corrected, both sides', 'index params'),
        )
        for b in BLOCK_DIMS
    },
    **{
        f'projection to D = {4 * b:,} (Exp 2)': (
            projected_name('Exp 2 (+unit)', b),
            full_name('cosine', 'index params'),
        )
        for b in BLOCK_DIMS
    },
}


def projected_scores(model, last, train_ex, query_ex, workdir: str) -> dict[str, dict]:
    """The library's Exp 1 / 2 / 4 at every BLOCK_DIMS, through ``pipeline.run_method``."""
    from trackstar_jax import grads, pipeline

    work = os.path.join(workdir, 'step_agreement_indices')
    shutil.rmtree(work, ignore_errors=True)
    cfg = pipeline.IndexConfig(seq_len=lds_bench.SEQ_LEN, batch_size=16, chunk_rows=128)
    qcfg = dataclasses.replace(cfg, seq_len=lds_bench.QUERY_LEN)
    n, out = len(train_ex), {}
    for block_dim in BLOCK_DIMS:
        for correction in ('none', 'adafactor'):
            spec = grads.GradientSpec(block_dim=block_dim, num_layer_blocks=2,
                                      correction=correction)  # fmt: skip
            feat = grads.Featurizer(model, last.params, spec, opt_state=last.opt_state)
            base = os.path.join(work, f'{block_dim}_{correction}')
            t0 = time.time()
            tr = pipeline.featurize(feat, train_ex, os.path.join(base, 'train'), cfg)
            qu = pipeline.featurize(feat, query_ex, os.path.join(base, 'queries'), qcfg)
            secs = time.time() - t0
            for name, (corr, unit) in PROJECTED.items():
                if corr != correction:
                    continue
                method = pipeline.Method(name=name, correction=corr, output_fn='loss',
                                         preconditioner='none', unit_norm=unit)  # fmt: skip
                res, _ = pipeline.run_method(method, tr, qu, pipeline.FitConfig(),
                                             pipeline.ScoreConfig(k=n))  # fmt: skip
                scores = lds_bench.dense(res, n)
                out[projected_name(name, block_dim)] = {
                    'scores': scores,
                    'dim': feat.dim,
                    'index_seconds': secs,
                }
        print(f'[step_agreement] projected rows at D = {feat.dim}', flush=True)
    return out


def run(args) -> dict[str, Any]:
    from trackstar_jax.eval import full_space, lds

    t_start = time.time()
    ns = lds_bench.default_args(args.workdir, args.quick)
    data = lds_bench.setup(ns)
    train_ex, query_ex, gold = data.train_ex, data.query_ex, data.gold
    model, tc, masks, loo_rows = data.model, data.tc, data.masks, data.loo_rows
    last, _ = lds_bench.train_on(model, tc, train_ex, np.ones(len(train_ex), bool))
    subsets, _ = lds_bench.retrain_jobs(ns, model, tc, train_ex, query_ex, masks, loo_rows)

    step = lds_bench.one_step_scores(model, tc, last, train_ex, query_ex, variants=('frozen_v',))
    targets = {'one_step_rho': step['scores'], 'frozen_v_rho': step['frozen_v']}
    t0 = time.time()
    products = full_space.gradient_products(
        model, last.params, last.opt_state, query_ex, train_ex,
        seq_len=lds_bench.SEQ_LEN, query_len=lds_bench.QUERY_LEN,
    )  # fmt: skip
    full_seconds = time.time() - t0
    print(f'[step_agreement] full-space products: {full_seconds:.0f}s', flush=True)
    rows_scores = {
        full_name(label, params): full_space.score(products, form, exclude,
                                                   clipping_threshold=tc.clipping_threshold)
        for params, exclude in PARAMS.items()
        for label, form in FORMS.items()
    }  # fmt: skip
    projected = projected_scores(model, last, train_ex, query_ex, args.workdir)
    rows_scores.update({name: p['scores'] for name, p in projected.items()})
    tails = lds_bench.tail_patch_metrics(
        model, tc, last, train_ex, query_ex, {k: {'scores': v} for k, v in rows_scores.items()}
    )
    per_query, rows = {}, {}
    for name, s in rows_scores.items():
        q = {key: np.array([lds.spearman(s[i], t[i]) for i in range(len(s))])
             for key, t in targets.items()}  # fmt: skip
        q['lds'] = np.asarray(lds.lds(s, masks, subsets).per_query, float)
        q['rr'] = 1.0 / lds_bench.gold_ranks(s, gold)
        q['tail_patch'] = np.asarray(tails['methods'][name]['tail_patch_per_query'])
        per_query[name] = q
        row = harness.query_intervals(q)
        row['first_order_pp'] = tails['methods'][name]['first_order_pp']
        if name in projected:
            row['dim'] = projected[name]['dim']
        rows[name] = row
        print(f'[step_agreement] {name}: ' + ', '.join(f'{k} {row[k]:.3f}' for k in METRICS),
              flush=True)  # fmt: skip
    parts = {}
    for part, (a, b) in PARTS.items():
        entry: dict[str, Any] = {'with': a, 'without': b}
        for metric in METRICS:
            entry[metric] = harness.paired_difference(per_query[a][metric], per_query[b][metric])
        parts[part] = entry
    embedding = [p for p in products.paths if 'embedding' in p]
    return {
        'benchmark': 'step_agreement',
        'quick': args.quick,
        'setup': 'benchmarks/lds.py (same seeds, data, model, retrained subsets)',
        'train_examples': len(train_ex),
        'queries': len(query_ex),
        'subsets': ns.subsets,
        'parameters': int(products.sizes.sum()),
        'embedding_parameters': int(products.sizes[[p in embedding for p in products.paths]].sum()),
        'clipping_threshold': tc.clipping_threshold,
        'full_space_seconds': full_seconds,
        'rows': rows,
        'parts': parts,
        'wall_seconds': time.time() - t_start,
    }


def readme_table(res: dict[str, Any]) -> str:
    """The README's tables from the JSON."""
    heads = ['ρ one-step', 'ρ frozen V', 'LDS', 'MRR', 'tail-patch (pp)']
    lines = [
        f'From `{res["command"]}` ({res["timestamp"][:10]}): the LDS model '
        f'({res["parameters"]:,} parameters, {res["embedding_parameters"]:,} of them the '
        f'tied token embedding), {res["train_examples"]} training glosses, '
        f'{res["queries"]} fact queries, {res["subsets"]} retrained halves. Full-space rows '
        "are exact (float64, unprojected); D rows are the library's projected index. "
        'Mean over queries, 95% bootstrap interval.',
        '',
        '| scores | ' + ' | '.join(heads) + ' |',
        '|---|' + '---|' * len(heads),
    ]
    for name, r in res['rows'].items():
        cells = [harness.row_cell(r, m) for m in METRICS[:4]]
        cells.append(harness.row_cell(r, 'tail_patch', signed=True))
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines += [
        '',
        'Each difference between the two forms, with minus without (paired over queries):',
        '',
        '| part | with − without | ' + ' | '.join(heads) + ' |',
        '|---|---|' + '---|' * len(heads),
    ]
    for part, p in res['parts'].items():
        cells = [harness.paired_cell(p, m) for m in METRICS]
        lines.append(f'| {part} | {p["with"]} − {p["without"]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_readme(res: dict[str, Any], check: bool = False) -> bool:
    """Puts :func:`readme_table` in the README (with ``check``: only compares)."""
    return harness.readme_section('step_agreement', readme_table(res), check=check)


def main(argv=None) -> None:
    harness.study_main(argv, __doc__, OUT, run, write_readme)


if __name__ == '__main__':
    main()
