r"""Fact tracing end to end on the embedded default (or your own facts and corpus).

    python launch/evaluate.py --workdir=runs/demo

Trains the demo model first if ``runs/demo/checkpoints`` holds no checkpoint, then
indexes candidates and queries, fits R, scores every method of the ablation table,
tail-patches their proponents and writes results.md / results.json / PNG plots /
report.html under --workdir (and benchmarks/results/fact_tracing.json).
Quick version: --gin_file=fact_tracing_small.gin.
"""

import json
import os
import sys

import gin
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar_jax import checkpoint, launch_utils  # noqa: E402
from trackstar_jax.eval import fact_tracing, report  # noqa: E402
from trackstar_jax.jobs import train_lm  # noqa: E402


def train_if_needed_then_evaluate(*, workdir: str) -> dict:
    """Trains the model if its checkpoint is missing, then runs the evaluation."""
    ckpt = gin.query_parameter('evaluate.checkpoint_dir')
    if isinstance(ckpt, gin.config.ConfigurableReference):  # a macro such as %CHECKPOINT
        ckpt = ckpt.scoped_configurable_fn()
    if checkpoint.latest_step(ckpt) is None:
        logging.info('No checkpoint in %s: training the demo model first.', ckpt)
        train_lm.train_lm(workdir=os.path.dirname(os.path.abspath(ckpt)))
    results = fact_tracing.evaluate(workdir=workdir)
    results['command'] = 'python ' + ' '.join(sys.argv)
    path = gin.query_parameter('evaluate.results_path')
    if path:
        with open(path, 'w') as f:
            json.dump(results, f, indent=1)
        with open(os.path.splitext(path)[0] + '.md', 'w') as f:
            f.write(f'Command: `{results["command"]}`\n\n' + report.markdown_table(results))
    print(report.markdown_table(results))
    return results


if __name__ == '__main__':
    launch_utils.run(train_if_needed_then_evaluate, 'fact_tracing_demo.gin', 'evaluate.gin')
