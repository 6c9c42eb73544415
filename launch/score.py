r"""Exact top-k proponents of every query over the whole train index (JSONL).

python launch/score.py --gin_file=pipeline_demo.gin --workdir=runs/demo
"""

import launch_common

from trackstar_jax.jobs import attribution

if __name__ == '__main__':
    launch_common.run(attribution.score, 'pipeline_demo.gin', 'score.gin')
