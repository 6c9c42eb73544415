r"""The README's cost table, generated from the committed benchmark JSONs.

    python benchmarks/cost_table.py           # rewrite the README section
    python benchmarks/cost_table.py --check   # exit 1 if the README's table is stale

Sources: ``results/train_index.json`` (benchmarks/train_index.py), ``results/
vs_bergson.json`` (benchmarks/vs_bergson.py) and ``results/pipeline.json``
(benchmarks/pipeline.py). Each row states the target and whether the measurement meets
it; the README says why where it does not.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def _load(name: str) -> dict:
    with open(os.path.join(harness.RESULTS_DIR, name)) as f:
        return json.load(f)


def _verdict(value: float, target: float, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    return 'met' if met else 'not met'


def rows() -> list[tuple[str, str, str, str, str, str]]:
    """(what, ours, reference, ratio, target, verdict) per line of the table."""
    out = []
    ti = _load('train_index.json')
    names = {'demo': 'demo model', 'smollm2_135m': 'SmolLM2-135M'}
    for key, r in ti['by_model'].items():
        b, t = r['batch']
        out.append(
            (
                f'Training step + index vs plain step, {names.get(key, key)}, {b} x {t}',
                f'{r["median_s"]["indexed"]:.3f} s',
                f'{r["median_s"]["plain"]:.3f} s',
                f'{r["overhead"]:.3f}x (XLA flops {r["flops_ratio"]:.3f}x)',
                '≤ 1.05x',
                _verdict(r['overhead'], 1.05, False),
            )
        )
    vs = _load('vs_bergson.json')['summary']
    ratios = vs['ratios']

    def pair(key: str, fmt: str) -> tuple[str, str]:
        return fmt.format(vs[key]['trackstar_jax']), fmt.format(vs[key]['bergson'])

    ours, theirs = pair('index_tokens_per_s', '{:.0f} tokens/s')
    ratio = ratios['index_tokens_per_s_ours_over_bergson']
    out.append(
        ('Index pass vs Bergson, SmolLM2-135M', ours, theirs, f'{ratio:.2f}x', '≥ 1.2x',
         _verdict(ratio, 1.2, True))
    )  # fmt: skip
    ours, theirs = pair('peak_rss_mb', '{:,.0f} MiB')
    ratio = ratios['peak_rss_ours_over_bergson']
    out.append(
        ('Peak RSS of the pipeline vs Bergson', ours, theirs, f'{ratio:.2f}x', '≤ 0.5x',
         _verdict(ratio, 0.5, False))
    )  # fmt: skip
    v = vs['normalizer_estimate_s']
    ratio = ratios['normalizer_estimate_s_ours_over_bergson']
    out.append(
        (
            'V estimate (128 passages) vs Bergson',
            f'{v["trackstar_jax"]:.0f} s (per-example gradients: '
            f'{v["trackstar_jax_per_example_gradients"]:.0f} s)',
            f'{v["bergson"]:.0f} s',
            f'{ratio:.2f}x',
            '≤ 1x',
            _verdict(ratio, 1.0, False),
        )
    )
    ours, theirs = pair('pipeline_wall_s', '{:.0f} s')
    ratio = ratios['pipeline_wall_ours_over_bergson']
    out.append(('Pipeline wall (index, queries, R, scores) vs Bergson', ours, theirs,
                f'{ratio:.2f}x', '—', '—'))  # fmt: skip
    full = _load('pipeline.json')
    pipe = full['summary']
    entries = [
        (s_['dim'], s_['queries'], label, s_[label])
        for s_ in full['scoring']
        for label in ('no_hessian', 'hessian')
    ]
    limit = [e['score_over_limit'] for *_, e in entries]
    matmul = [e['score_over_matmul'] for *_, e in entries]
    out.append(
        (
            'Score rows/s vs min(in-memory matmul + top-k, raw read): range over D, Q, ± R',
            f'worst at {pipe["score_over_limit_min_at"].replace("no_hessian", "no R")}'.replace(
                'hessian', 'with R'
            ),
            '',
            f'{min(limit):.2f}–{max(limit):.2f}x',
            '≥ 0.8x',
            _verdict(pipe['score_over_limit_min'], 0.8, True),
        )
    )
    if matmul != limit:  # the limit was the read somewhere: show the compute ratio too
        out.append(
            ('Score rows/s vs in-memory matmul + top-k alone: range', '', '',
             f'{min(matmul):.2f}–{max(matmul):.2f}x', '—', '—')
        )  # fmt: skip
    fits = '; '.join(
        f'{f["ratio_fit_total_vs_xtx"]:.2f}x at D = {f["dim"]:,} (passes alone '
        f'{f["ratio_autocorrelation_train_vs_xtx"]:.2f}x)'
        for f in full['fit']
    )
    out.append(
        (
            'Fit (mixed R, λ auto) vs one in-memory XᵀX of the same rows',
            '',
            '',
            fits,
            '≤ 1.2x',
            _verdict(pipe['fit_over_xtx_max'], 1.2, False),
        )
    )
    return out


def table() -> str:
    """The markdown table."""
    lines = [
        '| Measured | Ours | Reference | Ratio | Target | |',
        '|---|---|---|---|---|---|',
    ]
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows()]
    return '\n'.join(lines)


def main(argv: list[str]) -> int:
    """Rewrites (or checks) the README section."""
    current = harness.readme_section('costs', table(), check='--check' in argv)
    if '--check' in argv and not current:
        print('README.md cost table is stale: run python benchmarks/cost_table.py')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
