r"""The embedded default end to end, twice (two seeds), with the README's table from it.

    python benchmarks/fact_tracing.py            # -> results/fact_tracing.json / .md,
                                                 #    results/fact_tracing_report.png, README
    python benchmarks/fact_tracing.py --readme_only   # verdicts + README from the stored runs

Each seed runs the Quick Start command, ``launch/evaluate.py`` with its default gin file,
in a fresh workdir: the demo model is trained on the fact-dense mixture, then every
method of the ablation table is evaluated. Seed s sets the mixture's sample (held-in
facts, distractors: a different training set), the training data order, and the
projection seed; the evaluated facts are the same (they are drawn first, from their own
stream). Recorded: the wall time of each run, both tables with their 95% bootstrap
intervals, whether the second run's value of every metric lies inside the first run's
interval, and the paper's claims each tested by a paired comparison on the same queries
(supported only where the interval excludes 0, in both runs). The first run's report.html
is screenshotted in headless Chromium (Debian's ``chromium``) if it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

OUT = os.path.join(harness.RESULTS_DIR, 'fact_tracing.json')
METRICS = (
    ('rr', 'mrr', 'MRR'),
    ('hit', None, 'Recall'),
    ('tail_patch', 'tail_patch', 'Tail-patch'),
    ('first_order', 'first_order', 'First-order'),
)
PP = ('Tail-patch', 'First-order')  # shown in percentage points

# The paper's findings this table can test: (claim, a, b, metrics), each "a > b" on
# those metrics (keys as in results['comparisons']: rr = MRR, hit = Recall@k,
# tail_patch, first_order: its first-order prediction from the same step). Ablations are
# claimed on both attribution and influence.
INFLUENCE = ('tail_patch', 'first_order')
BOTH = ('rr', *INFLUENCE)
CLAIMS = (
    ('Unit norm beats the plain dot product (Exp 2 > Exp 1)', 'Exp 2 (+unit)', 'Exp 1 (dot)', BOTH),
    ('R_train helps (Exp 3 > Exp 2)', 'Exp 3 (+R)', 'Exp 2 (+unit)', BOTH),
    ('The optimizer correction helps (Exp 4 > Exp 2)', 'Exp 4 (+optim)', 'Exp 2 (+unit)', BOTH),
    ('Mixed R beats R_train (TrackStar > Exp 5)', 'TrackStar', 'Exp 5 (optim+R)', BOTH),
    ('TrackStar beats TRAK-style', 'TrackStar', 'TRAK-style', BOTH),
    ('BM25 beats TrackStar at finding entailing passages', 'BM25', 'TrackStar', ('rr', 'hit')),
    (
        "TrackStar's proponents beat the entailing passages at tail-patch",
        'TrackStar',
        'Gold (entailing)',
        INFLUENCE,
    ),
    ("TrackStar's proponents beat BM25's at tail-patch", 'TrackStar', 'BM25', INFLUENCE),
)


def run_seed(
    seed: int, root: str, name: str | None = None, extra: Sequence[str] = (), reuse: str = ''
) -> dict:
    """The Quick Start command for ``seed`` in a fresh workdir (``root/seed<seed>``, or
    ``root/<name>`` with ``extra`` gin bindings; ``reuse``: a workdir whose checkpoint
    is evaluated again and whose indices are copied in first, so neither the model nor
    its indices are built again); its results and time."""
    workdir = os.path.join(root, name or f'seed{seed}')
    shutil.rmtree(workdir, ignore_errors=True)
    if reuse:  # same model, same content-tagged indices: only fits, scores, tail-patch run
        # (Sub-block indices of the sweep record their source's path: derived again.)
        shutil.copytree(
            os.path.join(reuse, 'indices'),
            os.path.join(workdir, 'indices'),
            ignore=shutil.ignore_patterns('sub_*'),
        )
        # The indices record the checkpoint they were built from: name the same one.
        extra = [f"evaluate.checkpoint_dir = '{os.path.join(reuse, 'checkpoints')}'", *extra]
    bindings = [
        f'trackstar_jax.FactMixture.seed = {seed}',
        f'trackstar_jax.TrainConfig.seed = {seed}',
        f'trackstar_jax.GradientSpec.seed = {seed}',
        *extra,
    ]
    cmd = [
        sys.executable,
        os.path.join(harness.ROOT, 'launch', 'evaluate.py'),
        f'--workdir={workdir}',
    ] + [f'--gin_bindings={b}' for b in bindings]
    t0 = time.time()
    done = subprocess.run(cmd, cwd=harness.ROOT, capture_output=True, text=True)
    seconds = time.time() - t0
    if done.returncode:
        raise SystemExit(f'seed {seed} failed:\n{done.stderr[-4000:]}')
    with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
    training = None
    if not reuse:
        with open(os.path.join(workdir, 'train_metrics.json')) as f:
            training = json.load(f)
    return {
        'seed': seed,
        'workdir': workdir,
        'command': ' '.join(cmd[1:]),
        'seconds': seconds,
        'results': results,
        'training': training,
    }


def _pair(results: dict, a: str, b: str, metric: str) -> dict | None:
    for c in results.get('comparisons', []):
        if c['metric'] == metric and (c['a'], c['b']) == (a, b):
            return c
        if c['metric'] == metric and (c['a'], c['b']) == (b, a):
            return {**c, 'diff': -c['diff'], 'low': -c['high'], 'high': -c['low']}
    return None


def verdicts(runs: list[dict]) -> list[dict]:
    """Each claim on each metric: the paired difference per run and what it supports."""
    out = []
    for claim, a, b, metrics in CLAIMS:
        for metric, _, label in METRICS:
            if metric not in metrics:
                continue
            pairs = [_pair(r['results'], a, b, metric) for r in runs]
            if any(p is None for p in pairs):
                continue
            above = [p['low'] > 0 for p in pairs]
            below = [p['high'] < 0 for p in pairs]
            verdict = (
                'supported' if all(above) else 'contradicted' if all(below) else 'not resolved'
            )
            out.append(
                {
                    'claim': claim,
                    'a': a,
                    'b': b,
                    'metric': label,
                    'verdict': verdict,
                    'runs': [
                        {k: p[k] for k in ('diff', 'low', 'high', 'p_sign_flip')} for p in pairs
                    ],
                }
            )
    return out


def agreement(first: dict, second: dict) -> dict:
    """Whether each metric of the second run lies inside the first run's 95% interval."""
    at = first['results']['recall_at']
    rows, inside, total, worst = [], 0, 0, 0.0
    for name, row in first['results']['table'].items():
        other = second['results']['table'].get(name)
        if not other or '@D=' in name:
            continue
        for key in ('mrr', f'recall@{at}', 'tail_patch'):
            a, b = row['all'], other['all']
            if a.get(f'{key}_ci') is None or b.get(key) is None:
                continue
            ok = a[f'{key}_ci'][0] <= b[key] <= a[f'{key}_ci'][1]
            inside += ok
            total += 1
            worst = max(worst, abs(a[key] - b[key]) * (100 if key == 'tail_patch' else 1))
            rows.append(
                {
                    'method': name,
                    'metric': key,
                    'first': a[key],
                    'second': b[key],
                    'first_ci': a[f'{key}_ci'],
                    'inside': ok,
                }
            )
    return {'inside': inside, 'total': total, 'max_abs_diff': worst, 'rows': rows}


def step_size_run(scale: float, run: dict, seed0: dict) -> dict:
    """One tail-patch learning-rate scale on seed 0's model: per method tail-patch and
    its first-order prediction (which is linear in the learning rate: clipping acts
    before it), the measured/predicted agreement, and the claims' paired differences."""
    res = run['results']
    table = {name: row['all'] for name, row in res['table'].items()}
    claims = []
    for claim, a, b, metrics in CLAIMS:
        if 'tail_patch' not in metrics:
            continue
        p = _pair(res, a, b, 'tail_patch')
        if p is not None:
            keep = {k: p[k] for k in ('diff', 'low', 'high', 'p_sign_flip')}
            claims.append({'claim': claim, 'a': a, 'b': b, **keep})
    return {
        'scale': scale,
        'command': run['command'],
        'seconds': run['seconds'],
        'first_order': res['first_order'],
        'table': table,
        'claims': claims,
        # The same model, rankings and steps' directions as seed 0's run: only the size
        # of the step differs (a check that the copied model and indices were used).
        'same_rankings': res['rankings'] == _stored_rankings(seed0),
    }


def _stored_rankings(run: dict) -> dict:
    # The JSON keeps no rankings (see main); the run's workdir does.
    with open(os.path.join(run['workdir'], 'results.json')) as f:
        return json.load(f)['rankings']


def step_size_table(result: dict) -> list[str]:
    """README lines: tail-patch at each step size beside its first-order prediction."""
    scales = result.get('step_sizes')
    if not scales:
        return []
    base = result['runs'][0]['results']
    cols = [(1.0, base['table'], base['first_order'])] + [
        (r['scale'], {n: {'all': v} for n, v in r['table'].items()}, r['first_order'])
        for r in scales
    ]
    # The first-order prediction is linear in the rate (clipping acts before it): a check.
    linear = max(
        abs(v['first_order'] / r['scale'] - base['table'][n]['all']['first_order'])
        / max(abs(base['table'][n]['all']['first_order']), 1e-30)
        for r in scales
        for n, v in r['table'].items()
    )
    same = all(r['same_rankings'] for r in scales)
    lines = [
        '',
        "Tail-patch with the step's learning rate scaled (seed 0's model, "
        + ('the same rankings' if same else 'NOT the same rankings')
        + ', only the step size differs). First-order: ⟨∇p, u⟩ at 1x (at every scale the '
        f'prediction is scale × it, to {linear:.0e} relative); other cells: measured Δp '
        '/ scale; all in pp. Measured vs first-order over all stepped pairs, Spearman: '
        + ', '.join(f'{s:g}x {f["spearman"]:.3f}' for s, _, f in cols)
        + '; least-squares slope measured / predicted: '
        + ', '.join(f'{s:g}x {f["slope"]:.3f}' for s, _, f in cols)
        + '.',
        '',
        '| Method | first-order (pp) | '
        + ' | '.join(f'tail-patch {s:g}x / {s:g}' for s, _, _ in cols)
        + ' |',
        '|---|---|' + '---|' * len(cols),
    ]
    for name, row in base['table'].items():
        if '@D=' in name:
            continue
        cells = []
        for s, table, _ in cols:
            r = table[name]['all']
            ci = r['tail_patch_ci']
            cells.append(
                f'{100 * r["tail_patch"] / s:+.2f} [{100 * ci[0] / s:+.2f}, {100 * ci[1] / s:+.2f}]'
            )
        lines.append(
            f'| {name} | {100 * row["all"]["first_order"]:+.2f} | ' + ' | '.join(cells) + ' |'
        )
    lines += [
        '',
        'Tail-patch findings at each step size (a − b, pp / scale, 95% paired interval):',
        '',
        '| Finding | ' + ' | '.join(f'{s:g}x' for s, _, _ in cols) + ' |',
        '|---|' + '---|' * len(cols),
    ]
    first = [v for v in result['claims'] if v['metric'] == 'Tail-patch']
    for v in first:
        cells = [v['runs'][0]] + [
            next(c for c in r['claims'] if c['claim'] == v['claim']) for r in scales
        ]
        scale = [1.0] + [r['scale'] for r in scales]
        diffs = [
            f'{100 * c["diff"] / k:+.2f} [{100 * c["low"] / k:+.2f}, {100 * c["high"] / k:+.2f}]'
            for c, k in zip(cells, scale, strict=True)
        ]
        lines.append(f'| {v["claim"]} | ' + ' | '.join(diffs) + ' |')
    return lines


def determinism(first: dict, again: dict) -> dict:
    """Whether a rerun of the same seed gives the same table (every value, bit for bit)."""

    def values(run):
        out = {}
        for name, row in run['results']['table'].items():
            for split in ('all', 'correct', 'incorrect'):
                for key, v in (row.get(split) or {}).items():
                    out[f'{name}/{split}/{key}'] = v
            for key in ('lam', 'k_component'):
                if key in row:
                    out[f'{name}/{key}'] = row[key]
        out['num_correct'] = run['results']['num_correct']
        return out

    a, b = values(first), values(again)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return {
        'identical': not differ,
        'values_compared': len(set(a) | set(b)),
        'differing': [{'key': k, 'first': a.get(k), 'rerun': b.get(k)} for k in differ[:50]],
        'seconds': again['seconds'],
    }


def screenshot(html_path: str, png_path: str) -> str | None:
    """report.html rendered by headless Chromium, or None if Chromium is not installed."""
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    if chromium is None:
        return None
    profile = os.path.join(os.path.dirname(png_path), '.chromium_profile')
    subprocess.run(
        [
            chromium,
            '--headless',
            '--no-sandbox',
            '--disable-gpu',
            '--disable-quic',
            '--no-first-run',
            '--disable-background-networking',
            '--disable-component-update',
            '--disable-sync',
            f'--user-data-dir={profile}',
            '--hide-scrollbars',
            '--window-size=1400,2200',
            f'--screenshot={png_path}',
            'file://' + html_path,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    shutil.rmtree(profile, ignore_errors=True)
    return png_path


def _cell(row: dict, key: str, scale: float = 1.0, sign: str = '') -> str:
    if row is None or row.get(key) is None:
        return '–'
    ci = row.get(f'{key}_ci')
    text = f'{scale * row[key]:{sign}.3f}'
    return text + (f' [{scale * ci[0]:{sign}.3f}, {scale * ci[1]:{sign}.3f}]' if ci else '')


def readme_section(result: dict) -> str:
    """The README's table and its reading, generated from the benchmark JSON."""
    first, second = result['runs']
    res = first['results']
    at = res['recall_at']
    mix = res.get('mixture') or {}
    training = first['training']
    lines = [
        f'Two runs of the Quick Start command (seeds 0 and 1: another training sample, data '
        f'order and projection), on {result["host"]["cpu_count"]} CPU cores: '
        f'{first["seconds"] / 60:.1f} and {second["seconds"] / 60:.1f} minutes end to end '
        '(training included). The model saw each training passage '
        f'{training["epochs"] * mix.get("config", {}).get("repeats", 1):.0f} times '
        f'({mix.get("eval_facts")} evaluated facts, each stated at the head of its '
        'entailing gloss; '
        f'{mix.get("heldin_facts")} held-in facts as gloss + statement; '
        f'{mix.get("distractors")} distractors) and answers '
        f'{res["num_correct"]} of {res["num_queries"]} queries correctly '
        f'({second["results"]["num_correct"]} in the second run). Candidates: '
        f'{res["num_candidates"]} passages (everything it was trained on), k = {res["k"]}.',
        '',
    ]
    steps = res.get('first_order')
    if steps:
        lines += [
            'Beside each tail-patch step u: its first-order prediction ⟨∇p, u⟩ (pp), the '
            "step's size ‖u‖ and ⟨∇p, u⟩ / ‖u‖ (pp per unit step: the direction alone), "
            'means over the same proponents. Over all stepped pairs, measured vs predicted '
            'Δp: '
            + '; '.join(
                f'seed {r["seed"]} Spearman {f["spearman"]:.3f}, slope {f["slope"]:.2f}, '
                f'same sign {f["same_sign"]:.2f} ({f["pairs"]} steps)'
                for r in result['runs']
                for f in [r['results']['first_order']]
            )
            + '.',
            '',
        ]
    step_heads = ' First-order (pp) | ‖u‖ | ⟨∇p, u⟩ / ‖u‖ |' if steps else ''
    lines += [
        'Seed 0, with 95% bootstrap intervals over queries (tail-patch in pp):',
        '',
        f'| Method | MRR | Recall@{at} | Tail-patch (pp) |{step_heads} MRR right / wrong '
        '| seed 1 MRR |',
        '|---|---|---|---|' + ('---|---|---|' if steps else '') + '---|---|',
    ]
    for name, row in res['table'].items():
        other = second['results']['table'].get(name, {})
        lam = f' (λ={row["lam"]:.2f})' if row.get('lam') else ''
        right, wrong = row.get('correct'), row.get('incorrect')
        step_cells = (
            f' {row["all"]["first_order"] * 100:+.3f} | {row["all"]["update_norm"]:.3f} | '
            f'{row["all"]["first_order_per_norm"] * 100:+.3f} |'
            if steps
            else ''
        )
        lines.append(
            f'| {name}{lam} | {_cell(row["all"], "mrr")} | {_cell(row["all"], f"recall@{at}")} '
            f'| {_cell(row["all"], "tail_patch", 100, "+")} |{step_cells} '
            f'{_cell(right, "mrr").split(" [")[0]} / {_cell(wrong, "mrr").split(" [")[0]} | '
            f'{_cell(other.get("all"), "mrr").split(" [")[0]} |'
        )
    ag = result['agreement']
    rerun = result.get('rerun')
    if rerun:
        lines += [
            '',
            'Same seed again, same machine, fresh workdir: '
            + (
                f'all {rerun["values_compared"]} values of the table are identical.'
                if rerun['identical']
                else f'{len(rerun["differing"])} of {rerun["values_compared"]} values differ '
                '(see `rerun` in the JSON).'
            ),
        ]
    lines += [
        '',
        f'Second seed: {ag["inside"]} of {ag["total"]} metrics of the seed-1 run fall inside the '
        f"seed-0 run's 95% interval; the largest change is {ag['max_abs_diff']:.3f} "
        '(MRR / Recall, or pp of tail-patch).',
        '',
        "The paper's findings, each a paired comparison on the same queries (a − b, 95% "
        'paired bootstrap interval, seed 0 then seed 1). "Supported" / "contradicted": both '
        'intervals above / below 0; otherwise "not resolved":',
        '',
        '| Finding | Metric | Seed 0 | Seed 1 | Verdict |',
        '|---|---|---|---|---|',
    ]
    for v in result['claims']:
        scale = 100 if v['metric'] in PP else 1
        cells = [
            f'{r["diff"] * scale:+.3f} [{r["low"] * scale:+.3f}, {r["high"] * scale:+.3f}]'
            for r in v['runs']
        ]
        lines.append(f'| {v["claim"]} | {v["metric"]} | {cells[0]} | {cells[1]} | {v["verdict"]} |')
    lines += step_size_table(result)
    return '\n'.join(lines)


def write_readme(result: dict, check: bool = False) -> bool:
    """Writes (or, with ``check``, compares) the README section; True if it is current."""
    return harness.readme_section('fact_tracing', readme_section(result), check) or not check


def markdown(result: dict) -> str:
    return f'Command: `{result["command"]}`\n\n' + readme_section(result) + '\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--root', default=os.path.join(harness.ROOT, 'runs', 'bench_fact_tracing'))
    parser.add_argument('--readme_only', action='store_true')
    parser.add_argument(
        '--rerun',
        action='store_true',
        help='run seed 0 again; record whether its table is identical',
    )
    parser.add_argument(
        '--step_sizes',
        type=float,
        nargs='+',
        help="tail-patch seed 0's model again with the step's learning rate times each",
    )
    args = parser.parse_args(argv)
    if args.step_sizes:  # the same model and rankings, smaller tail-patch steps
        with open(OUT) as f:
            result = json.load(f)
        seed0 = result['runs'][0]
        rows = []
        for scale in args.step_sizes:
            binding = f'trackstar_jax.EvalConfig.tail_patch_lr_scale = {scale}'
            run = run_seed(0, args.root, f'step{scale:g}', [binding], seed0['workdir'])
            rows.append(step_size_run(scale, run, seed0))
            rows[-1]['command'] = harness.command_line() + ' -> ' + rows[-1]['command']
        result['step_sizes'] = rows
        harness.write_result(OUT, {k: v for k, v in result.items() if k != 'timestamp'})
        with open(os.path.splitext(OUT)[0] + '.md', 'w') as f:
            f.write(markdown(result))
        write_readme(result)
        print('\n'.join(step_size_table(result)))
        return 0
    if args.rerun:  # determinism on this machine: the same command, a fresh workdir
        with open(OUT) as f:
            result = json.load(f)
        again = run_seed(0, os.path.join(args.root, 'rerun'))
        result['rerun'] = determinism(result['runs'][0], again)
        result['rerun']['command'] = harness.command_line()
        harness.write_result(OUT, {k: v for k, v in result.items() if k != 'timestamp'})
        with open(os.path.splitext(OUT)[0] + '.md', 'w') as f:
            f.write(markdown(result))
        write_readme(result)
        print(json.dumps(result['rerun'], indent=1))
        return 0
    if args.readme_only:  # verdicts and agreement recomputed from the stored runs
        with open(OUT) as f:
            result = json.load(f)
        result['agreement'] = agreement(*result['runs'])
        result['claims'] = verdicts(result['runs'])
        result['verdicts_recomputed_by'] = harness.command_line()
        harness.write_result(OUT, {k: v for k, v in result.items() if k != 'timestamp'})
        with open(os.path.splitext(OUT)[0] + '.md', 'w') as f:
            f.write(markdown(result))
        write_readme(result)
        return 0
    runs = [run_seed(s, args.root) for s in (0, 1)]
    png = screenshot(
        os.path.join(runs[0]['workdir'], 'report.html'),
        os.path.join(harness.RESULTS_DIR, 'fact_tracing_report.png'),
    )
    for r in runs:  # keep the JSON readable: per-query values and rankings stay in workdirs
        for key in ('per_query', 'rankings'):
            r['results'].pop(key, None)
        r['training'].pop('history', None)
    result = {
        'host': harness.host_info(),
        'library': harness.library_fingerprint(['.']),
        'runs': runs,
        'agreement': agreement(*runs),
        'claims': verdicts(runs),
        'screenshot': os.path.relpath(png, harness.ROOT) if png else None,
    }
    harness.write_result(OUT, result)
    with open(OUT) as f:
        result = json.load(f)
    with open(os.path.splitext(OUT)[0] + '.md', 'w') as f:
        f.write(markdown(result))
    write_readme(result)
    print(readme_section(result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
