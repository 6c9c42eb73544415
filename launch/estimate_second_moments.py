r"""Estimate V (Adafactor-style second moments) for a checkpoint that has none.

python launch/estimate_second_moments.py --gin_file=open_set_smollm2.gin \
    --workdir=runs/smollm2_open_set
"""

import launch_common

from trackstar_jax.jobs import attribution

if __name__ == '__main__':
    launch_common.run(attribution.estimate_moments, 'open_set_smollm2.gin', 'estimate.gin')
