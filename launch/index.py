r"""Featurise corpus passages into a sharded gradient index.

python launch/index.py --gin_file=pipeline_demo.gin --workdir=runs/demo
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar_jax import launch_utils  # noqa: E402
from trackstar_jax.jobs import attribution  # noqa: E402

if __name__ == '__main__':
    launch_utils.run(attribution.index_corpus, 'pipeline_demo.gin', 'index.gin')
