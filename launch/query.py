r"""Featurize fact queries (completion-only loss masks) into a query index.

python launch/query.py --gin_file=pipeline_demo.gin --workdir=runs/demo
"""

import launch_common

from trackstar_jax.jobs import attribution

if __name__ == '__main__':
    launch_common.run(attribution.index_queries, 'pipeline_demo.gin', 'query.gin')
