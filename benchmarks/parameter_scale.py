r"""Does Adafactor's parameter scaling change which scores agree with one training step?

    python benchmarks/parameter_scale.py           # -> results/parameter_scale.json
    python benchmarks/parameter_scale.py --quick --workdir=/tmp/ps_quick   # a smoke run

A model trained with Adafactor's ``multiply_by_parameter_scale`` (Adafactor's paper and
T5X do; ``TrainConfig.multiply_by_parameter_scale``) steps each tensor by
max(RMS(θ_t), 1e-3) times its clipped, preconditioned update, so one step on example m
moves a query to first order by Σ_t RMS(θ_t) ⟨∇p_q, u_m⟩_t: a per-tensor weight that no
gradient score carries. Tail-patch steps with the optimizer of training (the paper's
protocol, and ours: the step reads the checkpoint's TrainConfig), so on such a model the
step weighs tensors differently from the scores it judges. Our other models train with
absolute steps, so their tail-patch never had this weight.

This trains lds.py's model on its data twice from the same initialisation and data order
(absolute steps, lds.py's learning rate; relative steps, --scaled_lr) and on each scores
every (query, example) pair exactly in the full parameter space (``eval.full_space``,
the index's parameters: embedding left out): Exp 2 (cosine), Exp 4 (corrected on both
sides), corrected on the training side, the step form, and the step form times each
tensor's parameter RMS (also over all parameters); beside the library's projected Exp 4
at D = 1,024. Per row: ρ one-step (per query, Spearman with the model's own first-order
one-step matrix) and ρ frozen V (the same step with V held at the saved state), MRR of
the entailing gloss and tail-patch (one step of the model's own optimizer on each of the
top 3), at the step's learning rate and at SMALL_STEP of it (nearer first order), with
the first-order predictions of both and, per model, how well measured and predicted Δp
agree over every stepped pair. Then paired differences (95% bootstrap over queries) on
each model.
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

OUT = os.path.join(harness.RESULTS_DIR, 'parameter_scale.json')
SCALED_LR = 0.3  # of 0.03, 0.1, 0.3: the one whose queries fit as the absolute model's
EXCLUDE = ('embedding',)  # the index's parameters
FULL_ROWS = {  # row name: (full_space form, parameter_scale, tensors left out)
    'Exp 2 (cosine)': ('cosine', False, EXCLUDE),
    'Exp 4 (corrected, both sides)': ('corrected', False, EXCLUDE),
    'corrected, training side': ('train_corrected', False, EXCLUDE),
    'step form': ('step', False, EXCLUDE),
    'step form × parameter RMS': ('step', True, EXCLUDE),
    'step form × parameter RMS, all params': ('step', True, ()),
}
PROJECTED = 'Exp 4, D = 1,024'
SMALL_STEP = 0.1  # tail-patch again at this fraction of the step's learning rate
METRICS = ('one_step_rho', 'frozen_v_rho', 'rr', 'tail_patch', 'tail_patch_small')
PARTS = {  # (with, without), paired over queries on the same model
    'parameter RMS in the step form': ('step form × parameter RMS', 'step form'),
    'Exp 4 against the step form': ('Exp 4 (corrected, both sides)', 'step form'),
    'Exp 4 against the scaled step form': (
        'Exp 4 (corrected, both sides)',
        'step form × parameter RMS',
    ),
    'embedding left out (scaled step form)': (
        'step form × parameter RMS',
        'step form × parameter RMS, all params',
    ),
}


def projected_exp4(model, last, train_ex, query_ex, workdir: str) -> np.ndarray:
    """[Q, N] the library's Exp 4 at D = 1,024 (lds.py's spec, 4 blocks of 256)."""
    from trackstar_jax import grads, pipeline

    work = os.path.join(workdir, 'parameter_scale_index')
    shutil.rmtree(work, ignore_errors=True)
    cfg = pipeline.IndexConfig(seq_len=lds_bench.SEQ_LEN, batch_size=16, chunk_rows=128)
    spec = grads.GradientSpec(block_dim=256, num_layer_blocks=2, correction='adafactor')
    feat = grads.Featurizer(model, last.params, spec, opt_state=last.opt_state)
    tr = pipeline.featurize(feat, train_ex, os.path.join(work, 'train'), cfg)
    qcfg = dataclasses.replace(cfg, seq_len=lds_bench.QUERY_LEN)
    qu = pipeline.featurize(feat, query_ex, os.path.join(work, 'queries'), qcfg)
    method = pipeline.Method(name='Exp 4', correction='adafactor', output_fn='loss',
                             preconditioner='none', unit_norm=True)  # fmt: skip
    res, _ = pipeline.run_method(method, tr, qu, pipeline.FitConfig(),
                                 pipeline.ScoreConfig(k=len(train_ex)))  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return lds_bench.dense(res, len(train_ex))


def study_model(data, tc, workdir: str) -> dict[str, Any]:
    """Trains one model and measures every row on it."""
    from trackstar_jax.eval import full_space, lds

    model, train_ex, query_ex = data.model, data.train_ex, data.query_ex
    t0 = time.time()
    last, _ = lds_bench.train_on(model, tc, train_ex, np.ones(len(train_ex), bool))
    train_seconds = time.time() - t0
    # The step, and the same with V held at the saved state (the step form's V).
    step = lds_bench.one_step_scores(model, tc, last, train_ex, query_ex, ('frozen_v',))
    products = full_space.gradient_products(
        model, last.params, last.opt_state, query_ex, train_ex,
        seq_len=lds_bench.SEQ_LEN, query_len=lds_bench.QUERY_LEN,
    )  # fmt: skip
    scores = {
        name: full_space.score(products, form, exclude, tc.clipping_threshold, scale)
        for name, (form, scale, exclude) in FULL_ROWS.items()
    }
    scores[PROJECTED] = projected_exp4(model, last, train_ex, query_ex, workdir)
    methods = {k: {'scores': v} for k, v in scores.items()}
    tails = lds_bench.tail_patch_metrics(model, tc, last, train_ex, query_ex, methods)
    # The same steps at a tenth of the rate: nearer the first order that ρ one-step ranks by.
    small_tc = dataclasses.replace(tc, learning_rate=tc.learning_rate * SMALL_STEP)
    small = lds_bench.tail_patch_metrics(model, small_tc, last, train_ex, query_ex, methods)
    per_query, rows = {}, {}
    for name, s in scores.items():
        q = {
            **{
                key: np.array([lds.spearman(s[i], step[target][i]) for i in range(len(s))])
                for key, target in (('one_step_rho', 'scores'), ('frozen_v_rho', 'frozen_v'))
            },  # fmt: skip
            'rr': 1.0 / lds_bench.gold_ranks(s, data.gold),
            'tail_patch': np.asarray(tails['methods'][name]['tail_patch_per_query']),
            'tail_patch_small': np.asarray(small['methods'][name]['tail_patch_per_query']),
        }
        per_query[name] = q
        row = harness.query_intervals(q)
        row['first_order_pp'] = tails['methods'][name]['first_order_pp']
        row['first_order_small_pp'] = small['methods'][name]['first_order_pp']
        rows[name] = row
        print(f'[parameter_scale] lr {tc.learning_rate}, scaled '
              f'{tc.multiply_by_parameter_scale}, {name}: '
              + ', '.join(f'{k} {row[k]:.3f}' for k in METRICS), flush=True)  # fmt: skip
    parts = {}
    for part, (a, b) in PARTS.items():
        entry: dict[str, Any] = {'with': a, 'without': b}
        for metric in METRICS:
            entry[metric] = harness.paired_difference(per_query[a][metric], per_query[b][metric])
        parts[part] = entry
    keep = full_space.tensor_mask(products, EXCLUDE)
    rms = np.maximum(products.param_rms[keep], 1e-3)
    return {
        'learning_rate': tc.learning_rate,
        'multiply_by_parameter_scale': tc.multiply_by_parameter_scale,
        'train_seconds': train_seconds,
        'query_log_prob': float(
            np.mean(lds_bench.query_log_probs(model, last.params, query_ex))
        ),  # fmt: skip
        'param_rms_range': [float(rms.min()), float(rms.max())],
        'param_rms_by_tensor': dict(
            zip(np.array(products.paths)[keep].tolist(), rms.tolist(), strict=True)
        ),  # fmt: skip
        'tail_patch_steps': tails['steps'],
        # Spearman of measured Δp with its first-order prediction over every stepped pair.
        'first_order_spearman': tails['first_order_spearman'],
        'first_order_spearman_small': small['first_order_spearman'],
        'rows': rows,
        'parts': parts,
    }


def run(args) -> dict[str, Any]:
    t_start = time.time()
    ns = lds_bench.default_args(args.workdir, args.quick)
    data = lds_bench.setup(ns)
    configs = {
        'absolute steps': data.tc,
        'parameter-scaled steps': dataclasses.replace(
            data.tc, multiply_by_parameter_scale=True, learning_rate=args.scaled_lr
        ),
    }
    models = {name: study_model(data, tc, args.workdir) for name, tc in configs.items()}
    return {
        'benchmark': 'parameter_scale',
        'quick': args.quick,
        'setup': 'benchmarks/lds.py (same seeds, data, model; no retrained subsets)',
        'train_examples': len(data.train_ex),
        'queries': len(data.query_ex),
        'tail_patch_top': lds_bench.TAIL_K,
        'models': models,
        'wall_seconds': time.time() - t_start,
    }


def readme_table(res: dict[str, Any]) -> str:
    """The README's tables from the JSON."""
    names = list(res['models'])
    small = f'at {SMALL_STEP:g}x lr (pp)'
    heads = ['ρ one-step', 'ρ frozen V', 'MRR', 'tail-patch (pp)', 'first-order (pp)',
             f'tail-patch {small}', f'first-order {small}']  # fmt: skip
    trained = ' and '.join(
        f'{n} (lr {m["learning_rate"]:g}, mean query log p {m["query_log_prob"]:.2f}, '
        f'parameter RMS per tensor {m["param_rms_range"][0]:.2f}–{m["param_rms_range"][1]:.2f})'
        for n, m in res['models'].items()
    )
    linear = '; '.join(
        f"{n} {m['first_order_spearman']:.3f} at the step's rate and "
        f'{m["first_order_spearman_small"]:.3f} at {SMALL_STEP:g}x'
        for n, m in res['models'].items()
    )
    lines = [
        f"From `{res['command']}` ({res['timestamp'][:10]}): lds.py's model, "
        f'{res["train_examples"]} training glosses and {res["queries"]} fact queries, '
        f"trained with {trained}. Full-space rows are exact over the index's parameters "
        "(embedding left out) unless 'all params'; each model's rows are measured against "
        'its own step (ρ frozen V: the same step with V held at the saved state; tail-patch '
        'of the top '
        f'{res["tail_patch_top"]}, and its first-order prediction). Spearman of measured '
        f'Δp with its first-order prediction over every stepped pair: {linear}. Mean over '
        'queries, 95% bootstrap interval.',
        '',
        '| model | scores | ' + ' | '.join(heads) + ' |',
        '|---|---|' + '---|' * len(heads),
    ]
    for n in names:
        for row, r in res['models'][n]['rows'].items():
            cells = [harness.row_cell(r, 'one_step_rho'), harness.row_cell(r, 'frozen_v_rho'),
                     harness.row_cell(r, 'rr'),
                     harness.row_cell(r, 'tail_patch', signed=True),
                     f'{r["first_order_pp"]:+.2f}',
                     harness.row_cell(r, 'tail_patch_small', signed=True),
                     f'{r["first_order_small_pp"]:+.3f}']  # fmt: skip
            lines.append(f'| {n} | {row} | ' + ' | '.join(cells) + ' |')
    diff_heads = ['ρ one-step', 'ρ frozen V', 'MRR', 'tail-patch (pp)',
                  f'tail-patch at {SMALL_STEP:g}x lr']  # fmt: skip
    lines += [
        '',
        'Paired differences, with minus without, on each model:',
        '',
        '| difference | model | ' + ' | '.join(diff_heads) + ' |',
        '|---|---|' + '---|' * len(diff_heads),
    ]
    for part in res['models'][names[0]]['parts']:
        for n in names:
            p = res['models'][n]['parts'][part]
            cells = [harness.paired_cell(p, m) for m in METRICS]
            lines.append(f'| {p["with"]} − {p["without"]} | {n} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_readme(res: dict[str, Any], check: bool = False) -> bool:
    """Puts :func:`readme_table` in the README (with ``check``: only compares)."""
    return harness.readme_section('parameter_scale', readme_table(res), check=check)


def _arguments(parser) -> None:
    parser.add_argument('--scaled_lr', type=float, default=SCALED_LR,
                        help='relative learning rate of the parameter-scaled model')  # fmt: skip


def main(argv=None) -> None:
    harness.study_main(argv, __doc__, OUT, run, write_readme, workdir='/tmp/parameter_scale',
                       add_arguments=_arguments)  # fmt: skip


if __name__ == '__main__':
    main()
