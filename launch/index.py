r"""Featurize corpus passages into a sharded gradient index (prints its URL).

python launch/index.py --gin_file=pipeline_demo.gin --workdir=runs/demo
"""

import launch_common

from trackstar_jax.jobs import attribution

if __name__ == '__main__':
    launch_common.run(attribution.index_corpus, 'pipeline_demo.gin', 'index.gin')
