"""Results a person can read: a Markdown table, PNG plots and a static HTML page."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import os
from typing import Any

from absl import logging

from trackstar_jax.index import write_bytes, write_checked, write_text

# Δp(target) and its first-order prediction are shown in percentage points (signed).
_SCALE = {'tail_patch': 100.0, 'first_order': 100.0, 'first_order_per_norm': 100.0}


def _fmt(row: dict | None, key: str, interval: bool = True) -> str:
    """'0.412 [0.330, 0.494]' (tail-patch in pp, signed); '–' when there is none."""
    if not row or row.get(key) is None or (isinstance(row[key], float) and math.isnan(row[key])):
        return '–'
    scale = _SCALE.get(key, 1.0)
    sign = '+' if key in _SCALE else ''
    text = f'{scale * row[key]:{sign}.3f}'
    ci = row.get(f'{key}_ci')
    if interval and ci:
        text += f' [{scale * ci[0]:{sign}.3f}, {scale * ci[1]:{sign}.3f}]'
    return text


def _split(row: dict, key: str) -> str:
    """'right / wrong': the metric on the queries the model answers correctly, and not."""
    return f'{_fmt(row.get("correct"), key, False)} / {_fmt(row.get("incorrect"), key, False)}'


def markdown_table(results: dict[str, Any]) -> str:
    """The methods table (with 95% intervals), then right / wrong splits, then paired
    comparisons against the reference method."""
    at = results.get('recall_at', 10)
    lines = [
        f'Queries: {results["num_queries"]} facts ({results["num_correct"]} predicted '
        f'correctly), candidates: {results["num_candidates"]}, k = {results["k"]}. '
        'Tail-patch: mean change in p(target) after one Adafactor step on a proponent, '
        'in percentage points (pp). [a, b]: 95% bootstrap interval over queries.',
        '',
        f'| Method | MRR | Recall@{at} | Tail-patch (pp) | MRR (right / wrong) | '
        f'Recall@{at} (right / wrong) | Tail-patch pp (right / wrong) |',
        '|---|---|---|---|---|---|---|',
    ]
    for name, r in results['table'].items():
        lam = f' (λ={r["lam"]:.3f})' if r.get('lam') else ''
        lines.append(
            f'| {name}{lam} | {_fmt(r["all"], "mrr")} | {_fmt(r["all"], f"recall@{at}")} | '
            f'{_fmt(r["all"], "tail_patch")} | {_split(r, "mrr")} | '
            f'{_split(r, f"recall@{at}")} | {_split(r, "tail_patch")} |'
        )
    lines += step_table(results)
    lines += comparison_table(results)
    return '\n'.join(lines) + '\n'


def step_table(results: dict[str, Any]) -> list[str]:
    """Markdown lines: per method, the measured tail-patch beside its first-order
    prediction ⟨∇p, u⟩, the step's norm ‖u‖ and ⟨∇p, u⟩ / ‖u‖ (the direction alone),
    and how linear the steps were; nothing when the prediction was not measured."""
    agreement = results.get('first_order')
    if not agreement:
        return []
    lines = [
        '',
        'Tail-patch against its first-order prediction from the same step u: ⟨∇p, u⟩ '
        '(pp), ‖u‖, and ⟨∇p, u⟩ / ‖u‖ (pp per unit step: the direction alone). Over '
        f'all {agreement["pairs"]} steps, measured vs predicted: Spearman '
        f'{_num(agreement["spearman"])}, Pearson {_num(agreement["pearson"])}, slope '
        f'{_num(agreement["slope"])}, same sign {_num(agreement["same_sign"])}.',
        '',
        '| Method | Tail-patch (pp) | First-order (pp) | ‖u‖ | First-order / ‖u‖ (pp) |',
        '|---|---|---|---|---|',
    ]
    for name, r in results['table'].items():
        keys = ('tail_patch', 'first_order', 'update_norm', 'first_order_per_norm')
        lines.append(f'| {name} | ' + ' | '.join(_fmt(r['all'], key) for key in keys) + ' |')
    return lines


def _num(x: float | None) -> str:
    return '–' if x is None else f'{x:.3f}'


def comparison_table(results: dict[str, Any], reference: str | None = None) -> list[str]:
    """Markdown lines: each method minus ``reference`` (default: the swept method, else
    the first gradient row), per metric, with the paired interval and sign-flip p."""
    found = results.get('comparisons') or []
    names = list(results['table'])
    reference = reference or (results.get('config') or {}).get('sweep_method')
    if reference not in names:
        return []
    by = {(c['a'], c['b'], c['metric']): c for c in found}
    at = results.get('recall_at', 10)
    lines = [
        '',
        f'Paired differences, method − {reference} over the same queries: mean [95% paired '
        'bootstrap interval] (sign-flip test p). * marks an interval that excludes 0.',
        '',
        f'| Method | ΔMRR | ΔRecall@{at} | ΔTail-patch (pp) |',
        '|---|---|---|---|',
    ]
    for name in names:
        if name == reference or '@D=' in name:
            continue
        cells = []
        for metric in ('rr', 'hit', 'tail_patch'):
            c, sign = by.get((name, reference, metric)), 1.0
            if c is None:
                c, sign = by.get((reference, name, metric)), -1.0
            if c is None:
                cells.append('–')
                continue
            scale = _SCALE.get(metric, 1.0) * sign
            low, high = sorted((scale * c['low'], scale * c['high']))
            star = '*' if low > 0 or high < 0 else ''
            cells.append(
                f'{scale * c["diff"]:+.3f} [{low:+.3f}, {high:+.3f}]{star} '
                f'(p={c["p_sign_flip"]:.3g})'
            )
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return lines


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    write_bytes(path, buf.getvalue())


def plots(results: dict[str, Any], directory: str) -> list[str]:
    """metrics_by_method.png and dimension_sweep.png (needs matplotlib, the eval extra)."""
    at = results.get('recall_at', 10)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logging.warning('matplotlib missing (pip install trackstar_jax[eval]): no plots.')
        return []
    out = []
    names = [n for n in results['table'] if '@D=' not in n]
    # Figure + the Agg canvas directly: no pyplot state, no global backend switch.
    fig = Figure(figsize=(15, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (key, label, scale) in zip(
        axes,
        [
            ('mrr', 'MRR', 1),
            (f'recall@{at}', f'Recall@{at}', 1),
            ('tail_patch', 'Tail-patch (pp)', 100),
        ],
        strict=True,
    ):
        rows = [results['table'][n]['all'] or {} for n in names]
        vals, err = [], [[], []]
        for r in rows:
            v, ci = r.get(key), r.get(f'{key}_ci')
            v = 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v * scale
            vals.append(v)
            err[0].append(v - ci[0] * scale if ci else 0.0)
            err[1].append(ci[1] * scale - v if ci else 0.0)
        ax.barh(
            names[::-1],
            vals[::-1],
            xerr=[err[0][::-1], err[1][::-1]],
            color='tab:blue',
            ecolor='k',
            capsize=2,
        )
        ax.set_title(f'{label}, 95% CI')
        ax.axvline(0, color='k', lw=0.6)
    fig.tight_layout()
    path = os.path.join(directory, 'metrics_by_method.png')
    _save(fig, path)
    out.append(path)
    sweep = results.get('dimension_sweep') or []
    if sweep:
        fig = Figure(figsize=(10, 4))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 2)
        dims = [r['dim'] for r in sweep]
        axes[0].semilogx(dims, [r['mrr'] for r in sweep], 'o-', base=2)
        axes[0].set_title('MRR vs projection dimension D')
        axes[1].semilogx(dims, [100 * r['tail_patch'] for r in sweep], 'o-', base=2)
        axes[1].set_title('Tail-patch (pp) vs projection dimension D')
        for ax in axes:
            ax.set_xlabel('D')
        fig.tight_layout()
        path = os.path.join(directory, 'dimension_sweep.png')
        _save(fig, path)
        out.append(path)
    return out


_STYLE = (
    'body{font:14px sans-serif;max-width:1400px;margin:auto;padding:0 12px}'
    'table{border-collapse:collapse;margin:6px 0}'
    'td,th{vertical-align:top;padding:3px 7px;border:1px solid #ddd;text-align:left}'
    'th{background:#f3f3f3}.ent{background:#d9f2d9}.num{text-align:right;white-space:nowrap}'
    '.q{border-top:2px solid #888;margin-top:22px}.opp{background:#fbe3e3}'
    'code{font-size:12px}details{margin:4px 0}img{max-width:100%}'
)


def _summary_html(results: dict[str, Any]) -> str:
    """The methods table as HTML, with the 95% intervals."""
    e = html.escape
    at = results.get('recall_at', 10)
    head = (
        '<table><tr><th>Method</th><th>MRR [95% CI]</th>'
        f'<th>Recall@{at} [95% CI]</th><th>Tail-patch, pp [95% CI]</th>'
        f'<th>MRR right / wrong</th><th>Recall@{at} right / wrong</th>'
        '<th>Tail-patch pp right / wrong</th></tr>'
    )
    rows = []
    for name, r in results['table'].items():
        lam = f' (λ={r["lam"]:.3f})' if r.get('lam') else ''
        cells = [
            _fmt(r['all'], 'mrr'),
            _fmt(r['all'], f'recall@{at}'),
            _fmt(r['all'], 'tail_patch'),
            _split(r, 'mrr'),
            _split(r, f'recall@{at}'),
            _split(r, 'tail_patch'),
        ]
        rows.append(
            f'<tr><td>{e(name + lam)}</td>'
            + ''.join(f'<td class="num">{e(c)}</td>' for c in cells)
            + '</tr>'
        )
    return head + ''.join(rows) + '</table>'


def _comparison_html(results: dict[str, Any]) -> str:
    return _lines_html(step_table(results)) + _lines_html(comparison_table(results))


def _lines_html(lines: list[str]) -> str:
    """A caption + markdown table (as :func:`comparison_table` writes it) as HTML."""
    if not lines:
        return ''
    e = html.escape
    caption, table = lines[1], [ln for ln in lines[3:] if ln.startswith('|')]
    header = [c.strip() for c in table[0].strip('|').split('|')]
    body = [[c.strip() for c in ln.strip('|').split('|')] for ln in table[2:]]
    out = [f'<p>{e(caption)}</p><table><tr>' + ''.join(f'<th>{e(h)}</th>' for h in header)]
    for cells in body:
        out.append(
            '<tr>'
            + ''.join(f'<td{" class=num" if i else ""}>{e(c)}</td>' for i, c in enumerate(cells))
            + '</tr>'
        )
    return ''.join(out) + '</table>'


def _img(path: str) -> str:
    with open(path, 'rb') as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}">'


@dataclasses.dataclass
class QueryDetails:
    """What report.html shows for each query, besides the tables.

    Attributes:
      facts: the queries' facts, in display order.
      rankings: method -> query id -> proponent ids, best first.
      deltas: (query id, proponent id) -> tail-patch Δp(target).
      entailing: query id -> the candidate ids that entail it.
      predicted: query id -> the model's greedy completion.
      correct: query id -> whether it is the target.
      p_target: query id -> p(target) before any step.
      texts: candidate id -> its text.
      opponents: method -> query id -> opponent ids, most negative first.
      support: query id -> {'token', 'promote', 'deter'}: the training tokens whose
        representer contributions most raise / lower the logit of the query's first
        completion token (each {'passage', 'context', 'token', 'score'}).
    """

    facts: list[dict]
    rankings: dict[str, dict[str, list[str]]]
    deltas: dict[tuple[str, str], float]
    entailing: dict[str, set[str]]
    predicted: dict[str, str]
    correct: dict[str, bool]
    p_target: dict[str, float]
    texts: dict[str, str]
    opponents: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)
    support: dict[str, dict] = dataclasses.field(default_factory=dict)


def support_table_html(sup: dict, texts: dict[str, str]) -> str:
    """Rows of promoting and deterring training tokens (``support.describe``), side by
    side; hovering a cell shows its passage (``texts``)."""
    e = html.escape
    rows = []
    for i in range(max(len(sup['promote']), len(sup['deter']))):
        cells = []
        for side, cls in (('promote', 'ent'), ('deter', 'opp')):
            if i >= len(sup[side]):
                cells.append('<td></td>')
                continue
            r = sup[side][i]
            cells.append(
                f'<td class="{cls}" title="{e(texts.get(r["passage"], "")[:400])}">'
                f'…{e(r["context"])}<u>{e(r["token"])}</u> <small>(<code>{e(r["passage"])}'
                f'</code>, {r["score"]:+.3g}, α {r["alpha"]:+.3f})</small></td>'
            )
        rows.append(f'<tr><td>{i + 1}</td>{"".join(cells)}</tr>')
    head = '<table><tr><th>#</th><th>promoting</th><th>deterring</th></tr>'
    return head + ''.join(rows) + '</table>'


def _support_html(sup: dict, texts: dict[str, str]) -> str:
    """One query's support-samples section of report.html."""
    return (
        '<details><summary>Support samples: training tokens that most promote / deter '
        f'the first answer token "{html.escape(sup["token"])}" (α⟨φ, φ′⟩)</summary>'
        + support_table_html(sup, texts)
        + '</details>'
    )


def html_page(
    results: dict[str, Any],
    details: QueryDetails,
    num_queries: int,
    k: int,
    plot_paths: tuple[str, ...] = (),
) -> str:
    """A static, self-contained page: the summary with intervals, the plots, and for each
    shown query the model's prediction and every method's top proponents side by side
    (entailing ones green), each with p(target) after one training step on it."""
    e = html.escape
    d_ = details
    facts, rankings, deltas, entailing = d_.facts, d_.rankings, d_.deltas, d_.entailing
    predicted, correct, p_target, texts = d_.predicted, d_.correct, d_.p_target, d_.texts
    opponents = d_.opponents
    shown = facts[:num_queries]
    names = list(rankings)
    parts = [
        '<!doctype html><meta charset="utf-8"><title>trackstar_jax fact tracing</title>',
        f'<style>{_STYLE}</style>',
        '<h1>Fact tracing: which training passages taught each fact?</h1>',
        f'<p>{results["num_queries"]} queries ({results["num_correct"]} answered correctly '
        f'by the model), {results["num_candidates"]} candidate passages, k = {k}. Green: '
        'the passage entails the fact. Tail-patch Δp: change in p(target), in percentage '
        'points (pp), after one training step on that passage. Intervals: 95% bootstrap '
        f'over queries. Shown below: {len(shown)} of {len(facts)} queries.</p>',
        '<h2>Summary</h2>',
        _summary_html(results),
        _comparison_html(results),
    ]
    if plot_paths:
        parts.append('<h2>Plots</h2>' + ''.join(_img(p) for p in plot_paths))
    parts.append(f'<h2>Queries ({len(shown)} of {len(facts)})</h2>')
    for f in shown:
        q = f['id']
        before = p_target[q]
        mark = '✓ correct' if correct[q] else '✗ wrong'
        parts.append(
            f'<div class="q"><h3>{e(f["prompt"])}<u>{e(f["target"])}</u> '
            f'<small>({e(q)}, {e(f.get("relation", ""))})</small></h3>'
            f'<p>Model predicts <b>{e(predicted[q])}</b> ({mark}); p(target) = '
            f'{100 * before:.3f}%.</p><table><tr><th>#</th>'
            + ''.join(f'<th>{e(m)}</th>' for m in names)
            + '</tr>'
        )
        for rank in range(k):
            cells = []
            for m in names:
                ranked = rankings[m].get(q, [])
                if rank >= len(ranked):
                    cells.append('<td></td>')
                    continue
                pid = ranked[rank]
                d = deltas.get((q, pid))
                after = (
                    '' if d is None else (f'<br>Δp {100 * d:+.3f} pp → {100 * (before + d):.3f}%')
                )
                cls = ' class="ent"' if pid in entailing[q] else ''
                cells.append(
                    f'<td{cls} title="{e(texts.get(pid, "")[:400])}"><code>{e(pid)}</code>'
                    f'{after}</td>'
                )
            parts.append(f'<tr><td>{rank + 1}</td>' + ''.join(cells) + '</tr>')
        parts.append('</table>')
        for m in names[:1] + [
            n for n in names if n == results.get('config', {}).get('sweep_method')
        ]:
            opp = (opponents or {}).get(m, {}).get(q)
            if opp:
                parts.append(
                    f'<details><summary>{e(m)}: opponents (most negative scores)</summary>'
                    '<table>'
                    + ''.join(
                        f'<tr class="opp"><td>{i + 1}</td><td><code>{e(pid)}</code></td>'
                        f'<td>{e(texts.get(pid, "")[:300])}</td></tr>'
                        for i, pid in enumerate(opp)
                    )
                    + '</table></details>'
                )
        sup = d_.support.get(q)
        if sup:
            parts.append(_support_html(sup, texts))
        top = {pid for m in names for pid in rankings[m].get(q, [])[:k]}
        parts.append(
            '<details><summary>Passages retrieved for this query</summary><table>'
            + ''.join(
                f'<tr{" class=ent" if pid in entailing[q] else ""}><td><code>{e(pid)}</code>'
                f'</td><td>{e(texts.get(pid, "")[:400])}</td></tr>'
                for pid in sorted(top)
            )
            + '</table></details></div>'
        )
    return '\n'.join(parts)


def write_all(
    directory: str, results: dict[str, Any], details: QueryDetails, html_queries: int, k: int
) -> dict[str, str]:
    """Writes results.json, results.md, the plots and report.html into ``directory``."""
    paths = {
        'json': os.path.join(directory, 'results.json'),
        'markdown': os.path.join(directory, 'results.md'),
        'html': os.path.join(directory, 'report.html'),
    }
    # Each file is written under a temporary name and renamed: never half a report.
    # results.json, the one a program reads back, also gets a checksum (read_checked).
    write_checked(paths['json'], json.dumps(results, indent=1).encode())
    write_text(paths['markdown'], markdown_table(results))
    plot_paths = plots(results, directory)
    for p in plot_paths:
        paths[os.path.basename(p)] = p
    write_text(paths['html'], html_page(results, details, html_queries, k, tuple(plot_paths)))
    return paths
