"""One process of a 2-process index + fit + score run (see test_multiprocess.py).

Usage: python pipeline_worker.py PROCESS_ID PORT ROOT
"""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

process_id, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402

from tests import pipeline_fixtures as fx  # noqa: E402
from trackstar_jax import pipeline  # noqa: E402
from trackstar_jax import sharding as shd  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8
mesh = shd.make_mesh((('data', 4), ('model', 2)))
feat = fx.featurizer(mesh)
train = fx.build_index(
    feat,
    fx.train_examples(45),
    os.path.join(root, 'train'),
    chunk_rows=8,
    batch_size=4,
)
queries = fx.build_index(feat, fx.query_examples(6), os.path.join(root, 'queries'), chunk_rows=4)
h = pipeline.fit(train, queries, pipeline.FitConfig(chunk_rows=16), mesh=mesh)
res = pipeline.score(
    queries,
    train,
    h,
    pipeline.ScoreConfig(k=5, chunk_rows=16),
    mesh=mesh,
    out_path=os.path.join(root, 'scores.jsonl'),
)
if jax.process_index() == 0:
    np.savez(
        os.path.join(root, 'result.npz'),
        rows=res.rows,
        scores=res.scores,
        r_inv_sqrt=h.arrays['r_inv_sqrt'],
        lam=h.info['lam'],
    )
jax.distributed.shutdown()
