r"""Fit a preconditioner (default: TrackStar's mixed block R^-1/2) from the indices.

python launch/fit.py --gin_file=pipeline_demo.gin --workdir=runs/demo
"""

import launch_common

from trackstar_jax.jobs import attribution

if __name__ == '__main__':
    launch_common.run(attribution.fit, 'pipeline_demo.gin', 'fit.gin')
