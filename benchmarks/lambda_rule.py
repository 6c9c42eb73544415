r"""When does the task-specific R help? λ and the number of queries behind R_eval.

    python benchmarks/lds.py --workdir=/work/lds_full            # first: the retrainings
    python benchmarks/lambda_rule.py --workdir=/work/lds_full    # -> results/lambda_rule.json
    python benchmarks/lambda_rule.py --quick --workdir=/tmp/lds_quick   # after lds.py --quick

On the LDS benchmark's model, training set, 32 fact queries and retrained subsets
(``benchmarks/lds.py``; its retraining outcomes are read from the workdir, or computed
if absent), TrackStar's index (Adafactor correction, unit norm) is scored with

* R_train alone (the ``train`` preconditioner, Exp 5),
* the paper's mixed R (``mixed``) and the same with R_eval first shrunk toward R_train
  by its sampling noise (``mixed_shrunk``, Ledoit-Wolf), each at λ 'auto' (the paper's
  eigenvalue crossing) and at fixed λ in ``--lams``,

with R_eval estimated from ``--sizes`` queries (random subsets of the 32, ``--draws``
draws each but one for all 32). Every setting scores all 32 queries; per setting: LDS and
MRR (mean over queries, averaged over draws), their paired differences from R_train
alone with 95% bootstrap intervals over queries, MRR split into the queries inside and
outside R_eval's subset, the λ the rule chose and the mean shrinkage intensity α; for the
'auto' rules at the largest and the smallest size, tail-patch (the LDS benchmark's
protocol: one trainer step per top-3 proponent).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import lds as lds_bench  # noqa: E402

OUT = os.path.join(harness.RESULTS_DIR, 'lambda_rule.json')
KINDS = {'mixed': 'paper mix', 'mixed_shrunk': 'shrunk R_eval'}


def per_query(scores: np.ndarray, masks, subsets, gold) -> dict[str, np.ndarray]:
    """Per-query LDS and reciprocal rank of the entailing example (ties against it)."""
    from trackstar_jax.eval import lds

    rr = 1.0 / lds_bench.gold_ranks(scores, gold)
    return {'lds': lds.lds(scores, masks, subsets).per_query, 'rr': rr}


def compare(values: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """Mean, and the paired difference from ``base`` with its bootstrap interval."""
    from trackstar_jax.eval import stats

    ok = np.isfinite(values) & np.isfinite(base)
    d = stats.paired_bootstrap(values[ok], base[ok])
    return {'mean': float(np.mean(values[ok])), 'diff': d['diff'], 'diff_ci': [d['low'], d['high']]}


def run(args) -> dict[str, Any]:
    from trackstar_jax import grads, pipeline

    t_start = time.time()
    ns = lds_bench.default_args(args.workdir, args.quick)  # its retrainings, if in the workdir
    data = lds_bench.setup(ns)
    train_ex, query_ex, gold = data.train_ex, data.query_ex, data.gold
    model, tc, masks, loo_rows = data.model, data.tc, data.masks, data.loo_rows
    last, _ = lds_bench.train_on(model, tc, train_ex, np.ones(len(train_ex), bool))
    subsets, _ = lds_bench.retrain_jobs(ns, model, tc, train_ex, query_ex, masks, loo_rows)

    spec = grads.GradientSpec(block_dim=256, num_layer_blocks=2)  # the LDS benchmark's
    feat = grads.Featurizer(model, last.params, spec, opt_state=last.opt_state)
    base = os.path.join(args.workdir, 'lambda_rule')
    cfg = pipeline.IndexConfig(seq_len=lds_bench.SEQ_LEN, batch_size=16, chunk_rows=128)
    qcfg = dataclasses.replace(cfg, seq_len=lds_bench.QUERY_LEN)
    train = pipeline.featurize(feat, train_ex, os.path.join(base, 'train'), cfg)
    queries = pipeline.featurize(feat, query_ex, os.path.join(base, 'queries'), qcfg)
    n, nq = len(train_ex), len(query_ex)
    score_cfg = pipeline.ScoreConfig(k=n)

    def scored(h):
        return lds_bench.dense(pipeline.score(queries, train, h, score_cfg), n)

    r_train = pipeline.fit(train, None, pipeline.FitConfig(preconditioner='train'))
    base_scores = scored(r_train)
    base_q = per_query(base_scores, masks, subsets, gold)
    no_r = per_query(scored(None), masks, subsets, gold)  # Exp 4: no R at all
    settings: list[dict[str, Any]] = []
    tail_candidates = {'R_train alone': base_scores}
    sizes = sorted(args.sizes)
    for size in sizes:
        draws = 1 if size >= nq else args.draws
        acc: dict[tuple, list] = {}
        for draw in range(draws):
            chosen = np.sort(np.random.default_rng(1000 * size + draw).choice(nq, size, False))
            inside = np.isin(np.arange(nq), chosen)
            sub = pipeline.featurize(feat, [query_ex[i] for i in chosen],
                                     os.path.join(base, f'q{size}_{draw}'), qcfg)  # fmt: skip
            for kind in KINDS:
                for lam in ('auto', *args.lams):
                    h = pipeline.fit(train, sub, pipeline.FitConfig(preconditioner=kind, lam=lam))
                    s = scored(h)
                    if lam == 'auto' and draw == 0 and size in (sizes[0], sizes[-1]):
                        tail_candidates[f'{KINDS[kind]}, {size} queries'] = s
                    m = per_query(s, masks, subsets, gold)
                    alpha = h.info.get('shrinkage_alpha')
                    acc.setdefault((kind, lam), []).append({
                        **m, 'inside': inside, 'lam': h.info['lam'],
                        'alpha': float(np.mean(alpha)) if alpha else None,
                    })  # fmt: skip
            print(f'[lambda] {size} queries, draw {draw}: {time.time() - t_start:.0f}s', flush=True)
        for (kind, lam), runs in acc.items():
            lds_q = np.mean([r['lds'] for r in runs], axis=0)
            rr_q = np.mean([r['rr'] for r in runs], axis=0)
            rr_in = [r['rr'][r['inside']].mean() for r in runs]
            rr_out = [r['rr'][~r['inside']].mean() for r in runs if (~r['inside']).any()]
            alphas = [r['alpha'] for r in runs if r['alpha'] is not None]
            settings.append({
                'kind': kind, 'lam_rule': lam, 'queries_in_r_eval': size, 'draws': len(runs),
                'lam': [r['lam'] for r in runs],
                'alpha_mean': float(np.mean(alphas)) if alphas else None,
                'lds': compare(lds_q, base_q['lds']), 'mrr': compare(rr_q, base_q['rr']),
                'mrr_inside': float(np.mean(rr_in)),
                'mrr_outside': float(np.mean(rr_out)) if rr_out else None,
            })  # fmt: skip
    tails = {}
    if not args.no_tail_patch:
        methods = {k: {'scores': v} for k, v in tail_candidates.items()}
        tails = lds_bench.tail_patch_metrics(model, tc, last, train_ex, query_ex, methods)
    return {
        'benchmark': 'lambda_rule',
        'quick': args.quick,
        'setup': 'benchmarks/lds.py model, training set, queries and retrainings',
        'train_examples': n,
        'queries': nq,
        'subsets': ns.subsets,
        'spec': {'block_dim': 256, 'num_layer_blocks': 2, 'correction': 'adafactor'},
        'r_train_alone': {
            'lds': float(np.nanmean(base_q['lds'])), 'mrr': float(base_q['rr'].mean())},
        'no_r': {'lds': compare(no_r['lds'], base_q['lds']),
                 'mrr': compare(no_r['rr'], base_q['rr'])},
        'settings': settings,
        'tail_patch': tails,
        'wall_seconds': time.time() - t_start,
    }  # fmt: skip


def _ci(x: dict[str, Any]) -> str:
    lo, hi = x['diff_ci']
    return f'{x["mean"]:.3f} ({x["diff"]:+.3f} [{lo:+.3f}, {hi:+.3f}])'


def readme_table(res: dict[str, Any]) -> str:
    """The README's λ-rule tables from the JSON."""
    base = res['r_train_alone']
    tp = res.get('tail_patch', {}).get('methods', {})
    lines = [
        f'From `{res["command"]}` ({res["timestamp"][:10]}), on the LDS setup above: '
        f'R_train alone (Exp 5) has LDS {base["lds"]:.3f} and MRR {base["mrr"]:.3f}; no R at '
        f'all (Exp 4) has LDS {_ci(res["no_r"]["lds"])} and MRR {_ci(res["no_r"]["mrr"])}. '
        'Each cell: the mean over all '
        f"{res['queries']} queries (averaged over the draws of R_eval's queries) and, in "
        'brackets, the paired difference from R_train alone with its 95% bootstrap interval '
        'over queries. "inside / outside": MRR of the queries in / not in R_eval\'s subset.',
        '',
        '| R_eval from | rule | λ chosen | α | LDS (Δ vs R_train) | MRR (Δ vs R_train) | '
        'MRR inside / outside |',
        '|---|---|---|---|---|---|---|',
    ]
    autos = [s for s in res['settings'] if s['lam_rule'] == 'auto']
    for s in sorted(autos, key=lambda s: (s['queries_in_r_eval'], s['kind'])):
        lam = np.asarray(s['lam'])
        same = np.ptp(lam) < 5e-4
        lam_txt = f'{lam.mean():.3f}' if same else f'{lam.min():.3f}–{lam.max():.3f}'
        alpha = '—' if s['alpha_mean'] is None else f'{s["alpha_mean"]:.2f}'
        out = '—' if s['mrr_outside'] is None else f'{s["mrr_outside"]:.3f}'
        lines.append(
            f'| {s["queries_in_r_eval"]} queries ({s["draws"]} draw{"s" * (s["draws"] > 1)}) | '
            f'{KINDS[s["kind"]]}, λ auto | {lam_txt} | {alpha} | {_ci(s["lds"])} | '
            f'{_ci(s["mrr"])} | {s["mrr_inside"]:.3f} / {out} |'
        )
    lines += [
        '',
        'MRR against a fixed λ (same cells; Δ vs R_train alone):',
        '',
    ]
    lams = sorted({s['lam_rule'] for s in res['settings'] if s['lam_rule'] != 'auto'}, key=float)
    sizes = sorted({s['queries_in_r_eval'] for s in res['settings']})
    lines.append('| R_eval from | rule | ' + ' | '.join(f'λ = {x}' for x in lams) + ' |')
    lines.append('|---|---|' + '---|' * len(lams))
    by = {(s['kind'], s['queries_in_r_eval'], s['lam_rule']): s for s in res['settings']}
    for size in sizes:
        for kind in KINDS:
            cells = [_ci(by[(kind, size, x)]['mrr']) for x in lams]
            lines.append(f'| {size} queries | {KINDS[kind]} | ' + ' | '.join(cells) + ' |')
    if tp:
        lines += ['', '| tail-patch (top 3, pp) | mean [95% interval] |', '|---|---|']
        for name, t in tp.items():
            lo, hi = t['tail_patch_ci']
            lines.append(f'| {name} | {t["tail_patch_pp"]:+.3f} [{lo:+.3f}, {hi:+.3f}] |')
    return '\n'.join(lines) + '\n'


def write_readme(res: dict[str, Any], check: bool = False) -> bool:
    """Puts :func:`readme_table` in the README (with ``check``: only compares)."""
    return harness.readme_section('lambda_rule', readme_table(res), check=check)


def _arguments(parser) -> None:
    parser.add_argument('--sizes', type=int, nargs='+', default=[4, 8, 16, 32])
    parser.add_argument('--draws', type=int, default=3)
    parser.add_argument('--lams', nargs='+', default=['0.5', '0.9', '0.99'])
    parser.add_argument('--no_tail_patch', action='store_true')


def _prepare(args, parser) -> None:
    del parser
    args.lams = [float(x) for x in args.lams]
    if args.quick:
        args.sizes = [2, 4, 8]


def main(argv=None) -> None:
    harness.study_main(argv, __doc__, OUT, run, write_readme,
                       quick_help='lds.py --quick sizes, 2/4/8 queries',
                       add_arguments=_arguments, prepare=_prepare)  # fmt: skip


if __name__ == '__main__':
    main()
