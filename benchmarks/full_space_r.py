r"""Does TrackStar's R lower agreement with a training step exactly, or only once projected?

    python benchmarks/full_space_r.py --workdir=W    # -> results/full_space_r.json
    python benchmarks/full_space_r.py --quick --workdir=/tmp/fsr_quick   # a smoke run

On lds.py's model and data (the same seeds: the same model; no retrainings needed),
lds.py's table has R_train lowering ρ one-step (the per-query Spearman of a score with
the first-order effect of one Adafactor step on the example) at D = 1,024, with and
without the optimizer correction. This scores the same methods exactly in the full
parameter space (``eval.full_space.preconditioned_score``: per index block,
(R_b + δI)^-1/2 on both sides over the whole gradient, R_b from every training example's
and query's gradient; with N examples and d_b ≫ N parameters per block, R_b has rank
≤ N and a score is the example's coefficient in a ridge regression of the query's
gradient on the training gradients), beside the library's projected rows at
D = 1,024 and 4,096, and Exp 5 at damping 0.01 (the library's default) to 10,000 (R
fades out: δ = damping x the mean eigenvalue, most of which are 0 in the full space).
Per row: ρ one-step, fidelity (per-query Spearman of a projected row with its exact
form), MRR of the entailing gloss and tail-patch (one step on each of the top 3,
lds.py's protocol); then paired differences (95% bootstrap intervals over queries).
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

OUT = os.path.join(harness.RESULTS_DIR, 'full_space_r.json')
NUM_LAYER_BLOCKS = 2  # lds.py's GradientSpec: 2 layer groups x attention/MLP = 4 blocks
BLOCK_DIMS = (256, 1024)  # D = 4 x block: 1,024 (lds.py's index) and 4,096
DAMPINGS = (1.0, 100.0, 10_000.0)  # Exp 5's damping sweep beside FitConfig's 0.01
# name: (correction, preconditioner, unit_norm), as lds.py's rows of the same names;
# 'TRAK (R over all dims)' is TRAK's (ΦᵀΦ)⁻¹ on the loss gradient (lds.py's TRAK adds
# its Q = 1 − p̄ output, which the full-space products do not have).
METHODS = {
    'Exp 2 (+unit)': ('none', 'none', True),
    'Exp 3 (+R)': ('none', 'train', True),
    'Exp 4 (+optim)': ('adafactor', 'none', True),
    'Exp 5 (optim+R)': ('adafactor', 'train', True),
    'TrackStar': ('adafactor', 'mixed', True),
    'TRAK (R over all dims)': ('none', 'full', False),
}
METRICS = ('one_step_rho', 'fidelity_rho', 'rr', 'tail_patch')


def row_name(method: str, dim: int | None) -> str:
    """'Exp 5 (optim+R), exact' or 'Exp 5 (optim+R), D = 1,024'."""
    return f'{method}, exact' if dim is None else f'{method}, D = {dim:,}'


def damped_name(damping: float) -> str:
    return f'Exp 5 (optim+R), exact, damping {damping:,g}'


def projected(model, last, train_ex, query_ex, workdir: str, block_dim: int):
    """{method: ([Q, N] scores, fit info)} of every METHODS row at one D, and that D."""
    from trackstar_jax import grads, pipeline

    base = os.path.join(workdir, 'full_space_r_indices', str(block_dim))
    shutil.rmtree(base, ignore_errors=True)
    cfg = pipeline.IndexConfig(seq_len=lds_bench.SEQ_LEN, batch_size=16, chunk_rows=128)
    out, fitted = {}, {}
    for correction in ('none', 'adafactor'):
        spec = grads.GradientSpec(block_dim=block_dim, num_layer_blocks=NUM_LAYER_BLOCKS,
                                  correction=correction)  # fmt: skip
        feat = grads.Featurizer(model, last.params, spec, opt_state=last.opt_state)
        tr = pipeline.featurize(feat, train_ex, os.path.join(base, correction, 'train'), cfg)
        qu = pipeline.featurize(feat, query_ex, os.path.join(base, correction, 'queries'),
                                dataclasses.replace(cfg, seq_len=lds_bench.QUERY_LEN))  # fmt: skip
        for name, (corr, precond, unit) in METHODS.items():
            if corr != correction:
                continue
            method = pipeline.Method(name=name, correction=corr, output_fn='loss',
                                     preconditioner=precond, unit_norm=unit)  # fmt: skip
            res, fit = pipeline.run_method(method, tr, qu, pipeline.FitConfig(),
                                           pipeline.ScoreConfig(k=len(train_ex)),
                                           fitted=fitted)  # fmt: skip
            out[name] = (lds_bench.dense(res, len(train_ex)), dict(fit.info))
    shutil.rmtree(base, ignore_errors=True)
    return out, feat.dim


def trackstar_at(lam: float) -> str:
    """The exact TrackStar row at another D's λ auto."""
    return f'TrackStar, exact, λ = {lam:.2f}'


def exact_scores(
    products, blocks: np.ndarray, lam: float, other_lams: list[float]
) -> dict[str, np.ndarray]:
    """{row name: [Q, N]} of every METHODS row (TrackStar at ``lam``, and at each of
    ``other_lams``) and the damping sweep, exactly in the full space."""
    from trackstar_jax.eval import full_space

    fit = 0.01  # FitConfig's default damping, as the projected rows
    one_block = np.where(blocks >= 0, 0, -1)

    def r(corrected, lam_=0.0, damping=fit, blocks_=blocks, unit=True):
        return full_space.preconditioned_score(
            products, blocks_, corrected=corrected, lam=lam_, damping=damping, unit_norm=unit
        )

    out = {
        'Exp 2 (+unit)': full_space.score(products, 'cosine', ('embedding',)),
        'Exp 3 (+R)': r(False),
        'Exp 4 (+optim)': full_space.score(products, 'corrected', ('embedding',)),
        'Exp 5 (optim+R)': r(True),
        'TrackStar': r(True, lam_=lam),
        'TRAK (R over all dims)': r(False, blocks_=one_block, unit=False),
    }
    out = {row_name(k, None): v for k, v in out.items()}
    out.update({trackstar_at(x): r(True, lam_=x) for x in other_lams})
    out.update({damped_name(d): r(True, damping=d) for d in DAMPINGS})
    return out


def run(args) -> dict[str, Any]:
    from trackstar_jax import grads
    from trackstar_jax.eval import full_space, lds

    t_start = time.time()
    ns = lds_bench.default_args(args.workdir, args.quick)
    data = lds_bench.setup(ns)
    train_ex, query_ex, gold, model, tc = (data.train_ex, data.query_ex, data.gold,
                                           data.model, data.tc)  # fmt: skip
    last, _ = lds_bench.train_on(model, tc, train_ex, np.ones(len(train_ex), bool))
    step = lds_bench.one_step_scores(model, tc, last, train_ex, query_ex, variants=())['scores']
    t0 = time.time()
    products = full_space.gradient_products(
        model, last.params, last.opt_state, query_ex, train_ex,
        seq_len=lds_bench.SEQ_LEN, query_len=lds_bench.QUERY_LEN, grams=True,
    )  # fmt: skip
    full_seconds = time.time() - t0
    print(f'[full_space_r] full-space products and Gram matrices: {full_seconds:.0f}s', flush=True)
    spec = grads.GradientSpec(block_dim=BLOCK_DIMS[0], num_layer_blocks=NUM_LAYER_BLOCKS)
    blocks = full_space.tensor_blocks(products, spec, last.params)
    proj, dims, lams = {}, [], {}
    for block_dim in BLOCK_DIMS:
        t0 = time.time()
        rows, dim = projected(model, last, train_ex, query_ex, args.workdir, block_dim)
        dims.append(dim)
        lams[dim] = rows['TrackStar'][1]['lam']
        proj.update({row_name(name, dim): (name, s) for name, (s, _) in rows.items()})
        print(f'[full_space_r] projected rows at D = {dim:,}: {time.time() - t0:.0f}s', flush=True)
    # The exact TrackStar row takes the λ that λ auto chose for the largest projected D.
    lam = lams[max(lams)]
    other_lams = [v for d, v in lams.items() if d != max(lams)]
    t0 = time.time()
    scores = exact_scores(products, blocks, lam, other_lams)
    exact_seconds = time.time() - t0
    scores.update({name: s for name, (_, s) in proj.items()})
    tails = lds_bench.tail_patch_metrics(
        model, tc, last, train_ex, query_ex, {k: {'scores': v} for k, v in scores.items()}
    )
    per_query, rows = {}, {}
    q_range = range(len(query_ex))
    for name, s in scores.items():
        q = {'one_step_rho': np.array([lds.spearman(s[i], step[i]) for i in q_range])}
        if name in proj:
            exact = scores[row_name(proj[name][0], None)]
            q['fidelity_rho'] = np.array([lds.spearman(s[i], exact[i]) for i in q_range])
        q['rr'] = 1.0 / lds_bench.gold_ranks(s, gold)
        q['tail_patch'] = np.asarray(tails['methods'][name]['tail_patch_per_query'])
        per_query[name] = q
        row = harness.query_intervals(q)
        rows[name] = row
        print(f'[full_space_r] {name}: ' +
              ', '.join(f'{k} {row[k]:.3f}' for k in METRICS if k in row), flush=True)  # fmt: skip
    diffs = {}
    for label, (a, b) in differences(dims, other_lams).items():
        entry: dict[str, Any] = {'with': a, 'without': b}
        for metric in METRICS:
            if metric in per_query[a] and metric in per_query[b]:
                entry[metric] = harness.paired_difference(per_query[a][metric],
                                                          per_query[b][metric])  # fmt: skip
        diffs[label] = entry
    # How much of R the full space keeps: δ_b over the mean non-zero eigenvalue of Exp 5's
    # R_b (its rank from the examples' Gram matrix), for damping 1 (linear in the damping).
    kept = np.unique(blocks[blocks >= 0])
    sizes = [int(products.sizes[blocks == b].sum()) for b in kept]
    ranks = [int(np.linalg.matrix_rank(products.corrected_example_gram[blocks == b].sum(0),
                                       hermitian=True)) for b in kept]  # fmt: skip
    return {
        'benchmark': 'full_space_r',
        'quick': args.quick,
        'setup': 'benchmarks/lds.py (same seeds, data and model)',
        'train_examples': len(train_ex),
        'queries': len(query_ex),
        'block_parameters': sizes,
        'r_train_ranks': ranks,
        'delta_over_mean_nonzero_eigenvalue_per_unit_damping': [
            r / d for r, d in zip(ranks, sizes, strict=True)
        ],
        'lam_auto': {str(d): v for d, v in lams.items()},
        'exact_trackstar_lam': lam,
        'full_space_seconds': full_seconds,
        'exact_score_seconds': exact_seconds,
        'rows': rows,
        'differences': diffs,
        'wall_seconds': time.time() - t_start,
    }


def differences(dims: list[int], other_lams: list[float]) -> dict[str, tuple[str, str]]:
    """{label: (with, without)}: R at each D and exactly (R_eval also at ``other_lams``),
    the projection of each R row, and the damping."""
    out = {}
    for dim in (None, *dims):
        where = 'exact' if dim is None else f'D = {dim:,}'
        out[f'R_train, no correction (Exp 3 − Exp 2), {where}'] = (
            row_name('Exp 3 (+R)', dim), row_name('Exp 2 (+unit)', dim))  # fmt: skip
        out[f'R_train, with correction (Exp 5 − Exp 4), {where}'] = (
            row_name('Exp 5 (optim+R)', dim), row_name('Exp 4 (+optim)', dim))  # fmt: skip
        out[f'R_eval mixed in (TrackStar − Exp 5), {where}'] = (
            row_name('TrackStar', dim), row_name('Exp 5 (optim+R)', dim))  # fmt: skip
    for lam in other_lams:
        out[f'R_eval mixed in (TrackStar − Exp 5), exact, λ = {lam:.2f}'] = (
            trackstar_at(lam), row_name('Exp 5 (optim+R)', None))  # fmt: skip
    for dim in dims:
        for method in ('Exp 5 (optim+R)', 'TrackStar'):
            out[f'projection to D = {dim:,} ({method})'] = (row_name(method, dim),
                                                            row_name(method, None))  # fmt: skip
    for d in DAMPINGS:
        label = f'damping {d:,g} − 0.01 (Exp 5, exact)'
        out[label] = (damped_name(d), row_name('Exp 5 (optim+R)', None))
    return out


def _span(values: list, fmt: str) -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f'{lo}–{hi}'


def readme_table(res: dict[str, Any]) -> str:
    """The README's tables from the JSON."""
    heads = ('ρ one-step', 'fidelity ρ', 'MRR', 'tail-patch (pp)')
    lams = ', '.join(f'{v:.2f} at D = {int(d):,}' for d, v in res['lam_auto'].items())
    ratio = res['delta_over_mean_nonzero_eigenvalue_per_unit_damping']
    lines = [
        f'From `{res["command"]}` ({res["timestamp"][:10]}): the LDS model, '
        f'{res["train_examples"]} training glosses x {res["queries"]} fact queries; index '
        f'blocks of {min(res["block_parameters"]):,}–{max(res["block_parameters"]):,} '
        "parameters. Exact rows are float64 over the index's parameters (embedding left "
        "out); D rows are the library's projected index. λ auto chose "
        f'{lams}; the exact TrackStar row uses {res["exact_trackstar_lam"]:.2f} (and the '
        "other D's λ where named). In the full space Exp 5's R_b has rank "
        f'{_span(res["r_train_ranks"], "d")}, so δ = damping x the mean '
        f'eigenvalue is damping x {_span(ratio, ".4f")} of the mean non-zero '
        'one. Fidelity: '
        'per-query Spearman of a projected row with its exact row. Mean over queries, 95% '
        'bootstrap interval.',
        '',
        '| scores | ' + ' | '.join(heads) + ' |',
        '|---|' + '---|' * len(heads),
    ]
    for name, r in res['rows'].items():
        cells = [harness.row_cell(r, m, signed=m == 'tail_patch') for m in METRICS]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines += [
        '',
        'Paired differences over queries (with − without):',
        '',
        '| difference | ' + ' | '.join(heads) + ' |',
        '|---|' + '---|' * len(heads),
    ]
    for label, d in res['differences'].items():
        cells = [harness.paired_cell(d, m) for m in METRICS]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_readme(res: dict[str, Any], check: bool = False) -> bool:
    """Puts :func:`readme_table` in the README (with ``check``: only compares)."""
    return harness.readme_section('full_space_r', readme_table(res), check=check)


def main(argv=None) -> None:
    harness.study_main(argv, __doc__, OUT, run, write_readme)


if __name__ == '__main__':
    main()
