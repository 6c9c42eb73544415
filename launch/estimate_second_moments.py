r"""Estimate V (Adafactor-style second moments) for a checkpoint that has none.

python launch/estimate_second_moments.py --gin_file=open_set_smollm2.gin \
    --workdir=runs/smollm2_open_set
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar_jax import launch_utils  # noqa: E402
from trackstar_jax.jobs import attribution  # noqa: E402

if __name__ == '__main__':
    launch_utils.run(attribution.estimate_moments, 'open_set_smollm2.gin', 'estimate.gin')
