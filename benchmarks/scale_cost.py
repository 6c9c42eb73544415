r"""The paper-scale cost table from compiled programs, and its calibration on measured runs.

    python benchmarks/scale_cost.py                     # -> results/scale_cost.json + tables

Reads ``results/compile/*.json`` (written by ``launch/compile.py`` for each
``gin_configs/scale/`` file), prices index / fit / score for the paper's workload
(``trackstar_jax.cost``: 160B tokens, T = 2048, 5,400 queries) at a stated MFU, and
checks the FLOP model against what was measured on this machine: the fused kernel's
speed relative to a training step, predicted from the two compiled programs' FLOPs,
against the measured examples/s of both (``results/kernel.json``,
``results/kernel_smollm2.json``, same executables, same run).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from trackstar_jax import cost  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
# Bergson's README (v0.26.1): TrackStar index on a GH200, Pythia-12B, 16-dim projections.
BERGSON_GH200 = {'model_params': 12e9, 'tokens_per_s_per_gpu': 8000.0, 'peak_flops': 989e12}


def calibration() -> list[dict]:
    """Predicted (FLOPs) vs measured kernel / train-step throughput ratios."""
    rows = []
    k = json.load(open(os.path.join(RESULTS, 'kernel.json')))
    for c in k['configs']:
        m = c['methods']
        rows.append(
            {
                'model': f'demo-style d{c["config"]["d_model"]}',
                'seq_len': c['config']['seq_len'],
                'batch': c['config']['batch'],
                'predicted': m['train_step']['flops'] / m['fused']['flops'],
                'measured': m['fused']['examples_s'] / m['train_step']['examples_s'],
                'source': 'results/kernel.json',
            }
        )
    s = json.load(open(os.path.join(RESULTS, 'kernel_smollm2.json')))
    for run in s['runs']:
        m = run['methods']
        rows.append(
            {
                'model': 'SmolLM2-135M (32x32 blocks)',
                'seq_len': run['seq_len'],
                'batch': run['batch'],
                'predicted': m['train_step']['flops'] / m['fused_32x32']['flops'],
                'measured': m['fused_32x32']['examples_s'] / m['train_step']['examples_s'],
                'source': 'results/kernel_smollm2.json',
            }
        )
    for r in rows:
        r['measured_over_predicted'] = r['measured'] / r['predicted']
    return rows


def table(priced: dict[str, dict]) -> str:
    """Markdown: model, topology, job, memory, FLOPs per token, chip-hours, index size."""
    lines = [
        '| config | chips | index: GiB per chip / HBM | FLOPs per token | index / train-step '
        'FLOPs | index chip-hours (wall h) | index size | fit wall min (bound) | score wall '
        'min (bound) |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for name, p in priced.items():
        res = {r['job']: r for r in p['results']}
        ix, fit, sc = p['price']['index'], p['price']['fit'], p['price']['score']
        r = res['index']
        lines.append(
            f'| {name} | {r["num_chips"]} ({r["device_kind"]}) | '
            f'{r["per_chip_bytes"] / 2**30:.1f} / {r["hbm_bytes"] / 2**30:.0f} | '
            f'{ix["flops_per_token"]:.2e} | {ix.get("flops_vs_train_step", float("nan")):.2f} | '
            f'{ix["chip_hours"]:,.0f} ({ix["wall_hours"]:,.0f}) | '
            f'{ix["index_bytes"] / 1e12:.1f} TB | {60 * fit["wall_hours"]:.1f} ({fit["bound"]}) | '
            f'{60 * sc["wall_hours"]:.1f} ({sc["bound"]}) |'
        )
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--mfu', type=float, default=0.4, help='assumed model-FLOP utilisation')
    parser.add_argument(
        '--host_read_gbps', type=float, default=1.0, help='index read GB/s per host (assumed)'
    )
    parser.add_argument('--out', default=os.path.join(RESULTS, 'scale_cost.json'))
    args = parser.parse_args(argv)
    work = cost.Workload(mfu=args.mfu, host_read_bytes_per_s=args.host_read_gbps * 1e9)
    priced = {}
    for path in sorted(glob.glob(os.path.join(RESULTS, 'compile', '*.json'))):
        rec = json.load(open(path))
        name = os.path.splitext(os.path.basename(path))[0]
        priced[name] = {
            'source': os.path.relpath(path, os.path.dirname(RESULTS)),
            'results': rec['results'],
            'price': cost.price(rec['results'], work),
        }
    # What Bergson's published figure implies, priced with our FLOP model: the kernel's
    # FLOPs per token scale with the parameter count.
    ours = priced.get('paper_8b_v5p128')
    implied = None
    if ours:
        ix = ours['price']['index']
        params_8b = 8.1e9
        per_param = ix['flops_per_token'] / params_8b
        b = BERGSON_GH200
        implied = {
            'our_index_flops_per_token_per_param': per_param,
            'bergson_implied_flops_per_s': b['tokens_per_s_per_gpu']
            * per_param
            * b['model_params'],
        }
        implied['bergson_implied_mfu'] = implied['bergson_implied_flops_per_s'] / b['peak_flops']
        implied['our_8b_tokens_per_s_on_h100_at_mfu'] = (
            args.mfu * b['peak_flops'] / ix['flops_per_token']
        )
    result = {
        'workload': work.__dict__,
        'configs': priced,
        'calibration': calibration(),
        'bergson_gh200': {**BERGSON_GH200, **(implied or {})},
        'table_markdown': table(priced),
    }
    harness.write_result(args.out, result)
    print(result['table_markdown'])
    print()
    for r in result['calibration']:
        print(
            f'{r["model"]} T={r["seq_len"]} B={r["batch"]}: predicted {r["predicted"]:.2f}x, '
            f'measured {r["measured"]:.2f}x ({r["measured_over_predicted"]:.2f})'
        )
    print(json.dumps(result['bergson_gh200'], indent=1))


if __name__ == '__main__':
    main()
