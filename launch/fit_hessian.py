r"""Fit the block-diagonal task-specific Hessian R^-1/2.

python launch/fit_hessian.py --gin_file=pipeline_demo.gin --workdir=runs/demo
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar_jax import launch_utils  # noqa: E402
from trackstar_jax.jobs import attribution  # noqa: E402

if __name__ == '__main__':
    launch_utils.run(attribution.fit_hessian, 'pipeline_demo.gin', 'fit_hessian.gin')
