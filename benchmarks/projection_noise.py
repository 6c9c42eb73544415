r"""Why the optimizer correction helps a gradient score unprojected and not projected.

    python benchmarks/projection_noise.py --workdir=W   # -> results/projection_noise.json
    python benchmarks/projection_noise.py --quick --workdir=/tmp/pn_quick   # a smoke run

On lds.py's model and data (the same seeds: the same model; no retrainings needed),
step_agreement.json finds that correcting both sides (Exp 4 vs Exp 2) raises the exact,
unprojected cosine's agreement with one training step, while the projected Exp 4 at
D = 1,024 does no better than Exp 2 (methods.json). A random projection replaces each
exact score s with ŝ = s + e; whether a ranking survives depends on the noise e against
the spread of s within a query. This measures, per form (Exp 2: cosine of the raw
gradients, Exp 4: cosine of the corrected ones, both over the index's parameters) and
per D:

* signal: the per-query standard deviation of the exact scores over examples;
* noise: the per-query standard deviation of ŝ - s over examples (so centred: an error
  common to a query's examples does not count), for the library's two-sided
  projection (P0 W P1ᵀ per matrix) and for a dense one-sided JL projection of each
  block (``GradientSpec(projection='one_sided')``) at the same D;
* the noise a dense Gaussian projection of each block predicts from the exact per-block
  products alone: Var(⟨Px, Py⟩) = Σ_b (‖x_b‖² ‖y_b‖² + ⟨x_b, y_b⟩²) / d_b for unit x, y
  (to first order in the cosine, the noise on the projected cosine; its per-query root
  mean square over examples, not centred). It is smallest when
  the gradient's energy is spread over the blocks (each block's d_b only sees its own
  share) and it tells a concentration of energy (the correction can move it) apart from
  the two-sided projection's own structure (its noise over the prediction);
* fidelity (per-query Spearman of ŝ with s), and ρ one-step and MRR of s and ŝ.

Intervals are 95% bootstraps over queries; the differences are paired.
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

OUT = os.path.join(harness.RESULTS_DIR, 'projection_noise.json')
FORMS = {'Exp 2 (cosine)': ('none', 'cosine'), 'Exp 4 (corrected)': ('adafactor', 'corrected')}
NUM_LAYER_BLOCKS = 2  # lds.py's GradientSpec: 2 layer groups x attention/MLP = 4 blocks
BLOCK_DIMS = (256, 1024, 4096)
ONE_SIDED_MAX_BLOCK_DIM = 1024  # dense d_b x values matrices: 4,096 would take ~2 GB
METRICS = ('signal', 'noise', 'predicted_noise', 'snr', 'fidelity_rho', 'one_step_rho', 'rr')


def _sides(products, form: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([T, Q, N] products, [T, Q] query and [T, N] example squared norms) of ``form``."""
    if form == 'corrected':
        p = products
        return p.corrected, p.query_sq_corrected, p.example_sq_corrected
    return products.raw, products.query_sq, products.example_sq


def predicted_noise(products, form: str, blocks: np.ndarray, block_dim: int) -> np.ndarray:
    """[Q, N] the standard deviation of ⟨Px, Py⟩ for unit x, y under independent dense
    N(0, 1/d_b) projections of each block, from the exact per-tensor products."""
    prod, qsq, esq = _sides(products, form)
    kept = blocks >= 0
    q_norm = qsq[kept].sum(0)  # [Q]
    e_norm = esq[kept].sum(0)  # [N]
    var = np.zeros(prod.shape[1:])
    for b in np.unique(blocks[kept]):
        t = blocks == b
        xb = qsq[t].sum(0) / q_norm  # [Q] the query's energy share in block b
        yb = esq[t].sum(0) / e_norm  # [N]
        pb = prod[t].sum(0) / np.sqrt(np.outer(q_norm, e_norm))  # [Q, N]
        var += (np.outer(xb, yb) + pb**2) / block_dim
    return np.sqrt(var)


def block_shares(products, form: str, blocks: np.ndarray, names) -> dict[str, dict]:
    """{block name: mean energy share of the training examples' and the queries'
    gradients in that block}."""
    _, qsq, esq = _sides(products, form)
    kept = blocks >= 0
    out = {}
    for b in np.unique(blocks[kept]):
        t = blocks == b
        out[names[b]] = {
            'train': float((esq[t].sum(0) / esq[kept].sum(0)).mean()),
            'queries': float((qsq[t].sum(0) / qsq[kept].sum(0)).mean()),
        }
    return out


def projected(model, last, train_ex, query_ex, workdir, correction, projection, block_dim):
    """[Q, N] the library's projected, unit-normalised scores and their index's D."""
    from trackstar_jax import grads, pipeline

    base = os.path.join(
        workdir, 'projection_noise_indices', f'{projection}_{block_dim}_{correction}'
    )
    shutil.rmtree(base, ignore_errors=True)
    cfg = pipeline.IndexConfig(seq_len=lds_bench.SEQ_LEN, batch_size=16, chunk_rows=128)
    spec = grads.GradientSpec(block_dim=block_dim, num_layer_blocks=NUM_LAYER_BLOCKS,
                              correction=correction, projection=projection)  # fmt: skip
    feat = grads.Featurizer(model, last.params, spec, opt_state=last.opt_state)
    tr = pipeline.featurize(feat, train_ex, os.path.join(base, 'train'), cfg)
    qu = pipeline.featurize(feat, query_ex, os.path.join(base, 'queries'),
                            dataclasses.replace(cfg, seq_len=lds_bench.QUERY_LEN))  # fmt: skip
    method = pipeline.Method(name=f'{projection} {correction}', correction=correction,
                             output_fn='loss', preconditioner='none', unit_norm=True)  # fmt: skip
    res, _ = pipeline.run_method(method, tr, qu, pipeline.FitConfig(),
                                 pipeline.ScoreConfig(k=len(train_ex)))  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    return lds_bench.dense(res, len(train_ex)), feat.dim, spec


def per_query(exact, scores, step, gold, pred=None) -> dict[str, np.ndarray]:
    """Per-query signal, noise, SNR, fidelity, ρ one-step and reciprocal rank."""
    from trackstar_jax.eval import lds

    q = range(len(exact))
    out = {
        'signal': exact.std(1),
        'one_step_rho': np.array([lds.spearman(scores[i], step[i]) for i in q]),
        'rr': 1.0 / lds_bench.gold_ranks(scores, gold),
    }
    if scores is not exact:
        out['noise'] = (scores - exact).std(1)
        out['snr'] = out['signal'] / out['noise']
        out['fidelity_rho'] = np.array([lds.spearman(scores[i], exact[i]) for i in q])
    if pred is not None:
        out['predicted_noise'] = np.sqrt((pred**2).mean(1))
    return out


def run(args) -> dict[str, Any]:
    from trackstar_jax.eval import full_space

    t_start = time.time()
    ns = lds_bench.default_args(args.workdir, args.quick)
    data = lds_bench.setup(ns)
    train_ex, query_ex, gold, model, tc = (data.train_ex, data.query_ex, data.gold,
                                           data.model, data.tc)  # fmt: skip
    last, _ = lds_bench.train_on(model, tc, train_ex, np.ones(len(train_ex), bool))
    step = lds_bench.one_step_scores(model, tc, last, train_ex, query_ex, variants=())['scores']
    products = full_space.gradient_products(
        model, last.params, last.opt_state, query_ex, train_ex,
        seq_len=lds_bench.SEQ_LEN, query_len=lds_bench.QUERY_LEN,
    )  # fmt: skip
    print(f'[projection_noise] full-space products: {time.time() - t_start:.0f}s', flush=True)
    block_dims = BLOCK_DIMS[:2] if args.quick else BLOCK_DIMS
    per_q, rows, shares = {}, {}, {}
    for form_name, (correction, form) in FORMS.items():
        exact = full_space.score(products, form, ('embedding',))
        per_q[(form_name, 'exact', 0)] = per_query(exact, exact, step, gold)
        for block_dim in block_dims:
            for projection in ('two_sided', 'one_sided'):
                if projection == 'one_sided' and block_dim > ONE_SIDED_MAX_BLOCK_DIM:
                    continue
                t0 = time.time()
                scores, dim, spec = projected(model, last, train_ex, query_ex, args.workdir,
                                              correction, projection, block_dim)  # fmt: skip
                blocks = full_space.tensor_blocks(products, spec, last.params)
                pred = predicted_noise(products, form, blocks, block_dim)
                per_q[(form_name, projection, dim)] = per_query(exact, scores, step, gold, pred)
                if form_name not in shares:  # the layout's blocks do not depend on D
                    names = spec.layout(last.params).block_names
                    shares[form_name] = block_shares(products, form, blocks, names)
                print(f'[projection_noise] {form_name} {projection} D={dim}: '
                      f'{time.time() - t0:.0f}s', flush=True)  # fmt: skip
    for key, q in per_q.items():
        row: dict[str, Any] = {'form': key[0], 'projection': key[1], 'dim': key[2],
                               **harness.query_intervals(q)}  # fmt: skip
        if 'noise' in row:
            # D_eff: the D at which an ideal JL projection of unit vectors (noise 1/√D)
            # would be as noisy as this one; mean noise over queries.
            row['effective_dim'] = float(1.0 / row['noise'] ** 2)
            row['noise_over_predicted'] = row['noise'] / row['predicted_noise']
        rows[row_name(*key)] = row
        print(f'[projection_noise] {row_name(*key)}: ' +
              ', '.join(f'{m} {row[m]:.4f}' for m in METRICS if m in row), flush=True)  # fmt: skip
    # Paired over queries: the correction at each projection and D, and the dense
    # one-sided projection against the two-sided one at each form and D.
    exp2, exp4 = FORMS

    def where(k):
        return 'exact' if k[1] == 'exact' else f'{k[1]}, D = {k[2]:,}'

    pairs = {f'Exp 4 − Exp 2, {where(k)}': ((exp4, *k[1:]), (exp2, *k[1:]))
             for k in per_q if k[0] == exp4}  # fmt: skip
    for k in per_q:
        dense = (k[0], 'one_sided', k[2])
        if k[1] == 'two_sided' and dense in per_q:
            pairs[f'one-sided − two-sided, {k[0].split(" (")[0]}, D = {k[2]:,}'] = (dense, k)
    diffs = {}
    for label, (a, b) in pairs.items():
        qa, qb = per_q[a], per_q[b]
        diffs[label] = {
            'with': row_name(*a),
            'without': row_name(*b),
            **{m: harness.paired_difference(qa[m], qb[m]) for m in qa if m in qb},
        }
    return {
        'benchmark': 'projection_noise',
        'quick': args.quick,
        'setup': 'benchmarks/lds.py (same seeds, data and model)',
        'train_examples': len(train_ex),
        'queries': len(query_ex),
        'num_blocks': 2 * NUM_LAYER_BLOCKS,
        'block_shares': shares,
        'rows': rows,
        'differences': diffs,
        'wall_seconds': time.time() - t_start,
    }


def row_name(form: str, projection: str, dim: int) -> str:
    """'Exp 4 (corrected), two_sided, D = 1,024' ('exact' rows have no D)."""
    return f'{form}, exact' if projection == 'exact' else f'{form}, {projection}, D = {dim:,}'


DIGITS = {'signal': 4, 'noise': 4, 'predicted_noise': 4, 'snr': 2}


def readme_table(res: dict[str, Any]) -> str:
    """The README's tables from the JSON: every row, the blocks' energy shares and the
    paired differences."""
    cols = ('noise', 'predicted_noise', 'snr', 'fidelity_rho', 'one_step_rho', 'rr')
    heads = ('noise', 'predicted', 'SNR', 'fidelity ρ', 'ρ one-step', 'MRR')
    lines = [
        f'From `{res["command"]}` ({res["timestamp"][:10]}): the LDS model, '
        f'{res["train_examples"]} training glosses x {res["queries"]} fact queries, '
        f'{res["num_blocks"]} blocks of D / {res["num_blocks"]}. Signal and noise are '
        'per-query standard deviations over the glosses (of s, of ŝ - s); predicted: a '
        'dense Gaussian projection of each block, from the exact products; SNR = signal / '
        'noise; fidelity ρ: per-query Spearman of ŝ with s. Mean over queries, 95% '
        'bootstrap interval.',
        '',
        '| scores | D | signal | ' + ' | '.join(heads) + ' | noise / predicted |',
        '|---|---:|---|' + '---|' * len(heads) + '---:|',
    ]
    for row in res['rows'].values():
        dim = f'{row["dim"]:,}' if row['dim'] else 'exact'
        ratio = f'{row["noise_over_predicted"]:.2f}' if 'noise_over_predicted' in row else '—'
        name = row['form'] + ('' if row['projection'] == 'exact' else
                              f', {row["projection"].replace("_", "-")}')  # fmt: skip
        cells = [harness.row_cell(row, m, DIGITS.get(m, 3)) for m in ('signal', *cols)]
        lines.append(f'| {name} | {dim} | ' + ' | '.join(cells) + f' | {ratio} |')
    names = list(next(iter(res['block_shares'].values())))
    lines += ['', 'Mean share of each block in the squared norm of the gradients, training '
              'glosses (queries):', '', '| form | ' + ' | '.join(names) + ' |',
              '|---|' + '---:|' * len(names)]  # fmt: skip
    for form, shares in res['block_shares'].items():
        cells = [f'{shares[n]["train"]:.2f} ({shares[n]["queries"]:.2f})' for n in names]
        lines.append(f'| {form} | ' + ' | '.join(cells) + ' |')
    lines += ['', 'Paired differences over queries:', '',
              '| difference | signal | ' + ' | '.join(heads) + ' |',
              '|---|---|' + '---|' * len(heads)]  # fmt: skip
    for name, d in res['differences'].items():
        # Between projections of one form the signal and the prediction are the same.
        same_form = res['rows'][d['with']]['form'] == res['rows'][d['without']]['form']
        skip = ('signal', 'predicted_noise') if same_form else ()
        cells = [
            '—' if m in skip else harness.paired_cell(d, m, DIGITS.get(m, 3))
            for m in ('signal', *cols)
        ]
        lines.append(f'| {name.replace("_", "-")} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_readme(res: dict[str, Any], check: bool = False) -> bool:
    """Puts :func:`readme_table` in the README (with ``check``: only compares)."""
    return harness.readme_section('projection_noise', readme_table(res), check=check)


def main(argv=None) -> None:
    harness.study_main(argv, __doc__, OUT, run, write_readme)


if __name__ == '__main__':
    main()
