r"""Fact tracing end to end on the embedded default (or your own facts and corpus).

    python launch/evaluate.py --workdir=runs/demo

With the embedded default, trains the demo model first if its checkpoint is missing,
then indexes candidates and queries, fits each method's preconditioner, scores every
method of the ablation table, tail-patches their proponents and writes results.md /
results.json / PNG plots / report.html under --workdir, and nowhere else.
Quick version: --gin_file=fact_tracing_small.gin. To refresh a committed benchmark
result on purpose, add --results=benchmarks/results/fact_tracing.json.
"""

import json
import os
import sys

import launch_common
from absl import flags

from trackstar_jax import index
from trackstar_jax.eval import fact_tracing, report

_RESULTS = flags.DEFINE_string(
    'results', None, 'Also write results JSON (and .md beside it) here; off by default.'
)


def evaluate_and_report(*, workdir: str) -> dict:
    """Runs the evaluation, prints its table, and copies it to --results if asked."""
    results = fact_tracing.evaluate(workdir=workdir)
    results['command'] = 'python ' + ' '.join(sys.argv)
    if _RESULTS.value:
        os.makedirs(os.path.dirname(os.path.abspath(_RESULTS.value)), exist_ok=True)
        index.write_text(_RESULTS.value, json.dumps(results, indent=1))
        index.write_text(
            os.path.splitext(_RESULTS.value)[0] + '.md',
            f'Command: `{results["command"]}`\n\n' + report.markdown_table(results),
        )
    print(report.markdown_table(results))
    return results


if __name__ == '__main__':
    launch_common.run(
        evaluate_and_report, 'fact_tracing_demo.gin', 'evaluate.gin', fact_tracing.evaluate
    )
