"""Results a person can read: a Markdown table, PNG plots and a static HTML page."""

from __future__ import annotations

import html
import io
import json
import math
import os
from typing import Any

from absl import logging

from trackstar_jax.index import write_bytes, write_text


def _fmt(row: dict | None, key: str, pct: bool = False) -> str:
    if not row or row.get(key) is None or (isinstance(row[key], float) and math.isnan(row[key])):
        return '–'
    return f'{100 * row[key]:+.3f}%' if pct else f'{row[key]:.3f}'


def markdown_table(results: dict[str, Any]) -> str:
    """The methods table: overall, then split by facts the model gets right / wrong."""
    at = results.get('recall_at', 10)
    lines = [
        f'Queries: {results["num_queries"]} facts ({results["num_correct"]} predicted '
        f'correctly), candidates: {results["num_candidates"]}, k = {results["k"]}. '
        'Tail-patch: mean change in p(target) after one Adafactor step on a proponent, '
        'in percentage points.',
        '',
        f'| Method | MRR | Recall@{at} | Tail-patch | MRR (right / wrong) | Tail-patch '
        '(right / wrong) |',
        '|---|---|---|---|---|---|',
    ]
    for name, r in results['table'].items():
        lam = f' (λ={r["lam"]:.3f})' if r.get('lam') else ''
        lines.append(
            f'| {name}{lam} | {_fmt(r["all"], "mrr")} | {_fmt(r["all"], f"recall@{at}")} | '
            f'{_fmt(r["all"], "tail_patch", True)} | {_fmt(r["correct"], "mrr")} / '
            f'{_fmt(r["incorrect"], "mrr")} | {_fmt(r["correct"], "tail_patch", True)} / '
            f'{_fmt(r["incorrect"], "tail_patch", True)} |'
        )
    return '\n'.join(lines) + '\n'


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
        vals = [(results['table'][n]['all'] or {}).get(key) for n in names]
        vals = [
            0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else v * scale
            for v in vals
        ]
        ax.barh(names[::-1], vals[::-1], color='tab:blue')
        ax.set_title(label)
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


def html_page(
    results,
    facts,
    rankings,
    deltas,
    entailing,
    predicted,
    correct,
    p_target,
    texts,
    num_queries: int,
    k: int,
    methods_shown=('TrackStar', 'BM25'),
) -> str:
    """A static page: each query, the model's prediction, top proponents per method."""
    e = html.escape
    parts = [
        '<!doctype html><meta charset="utf-8"><title>trackstar_jax fact tracing</title>',
        '<style>body{font:14px sans-serif;max-width:1100px;margin:auto}'
        'td{vertical-align:top;padding:2px 6px}.ent{background:#dfd}'
        '.q{border-top:2px solid #888;margin-top:18px}</style>',
        '<h1>Fact tracing: top proponents</h1>',
        f'<p>{results["num_queries"]} queries, {results["num_candidates"]} candidates. '
        'Rows marked green entail the fact. Δp: change in p(target) after one training '
        'step on that proponent.</p>',
        '<pre>' + e(markdown_table(results)) + '</pre>',
    ]
    shown = [m for m in methods_shown if m in rankings]
    for f in facts[:num_queries]:
        q = f['id']
        mark = '✓' if correct[q] else '✗'
        parts.append(
            f'<div class="q"><h3>{e(f["prompt"])}<u>{e(f["target"])}</u></h3>'
            f'<p>model predicts: <b>{e(predicted[q])}</b> {mark} '
            f'(p(target) = {p_target[q]:.4f})</p>'
        )
        for m in shown:
            parts.append(f'<p><b>{e(m)}</b></p><table>')
            for rank, pid in enumerate(rankings[m][q][:k], 1):
                cls = ' class="ent"' if pid in entailing[q] else ''
                d = deltas.get((q, pid))
                parts.append(
                    f'<tr{cls}><td>{rank}</td><td><code>{e(pid)}</code></td>'
                    f'<td>{"" if d is None else f"Δp {100 * d:+.3f}pp"}</td>'
                    f'<td>{e(texts.get(pid, "")[:300])}</td></tr>'
                )
            parts.append('</table>')
        parts.append('</div>')
    return '\n'.join(parts)


def write_all(
    directory,
    results,
    facts,
    rankings,
    deltas,
    entailing,
    predicted,
    correct,
    p_target,
    texts,
    html_queries,
    k,
) -> dict[str, str]:
    """Writes results.json, results.md, the plots and report.html into ``directory``."""
    paths = {
        'json': os.path.join(directory, 'results.json'),
        'markdown': os.path.join(directory, 'results.md'),
        'html': os.path.join(directory, 'report.html'),
    }
    # Each file is written under a temporary name and renamed: never half a report.
    write_text(paths['json'], json.dumps(results, indent=1))
    write_text(paths['markdown'], markdown_table(results))
    write_text(
        paths['html'],
        html_page(
            results,
            facts,
            rankings,
            deltas,
            entailing,
            predicted,
            correct,
            p_target,
            texts,
            html_queries,
            k,
        ),
    )
    for p in plots(results, directory):
        paths[os.path.basename(p)] = p
    return paths
