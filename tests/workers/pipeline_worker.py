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
from trackstar_jax import hessian, index, scoring  # noqa: E402
from trackstar_jax import sharding as shd  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8
mesh = shd.make_mesh((('data', 4), ('model', 2)))
feat = fx.featurizer(mesh)
train = index.build(
    feat,
    fx.train_examples(45),
    os.path.join(root, 'train'),
    chunk_rows=8,
    batch_size=4,
    seq_len=fx.SEQ_LEN,
)
queries = index.build(
    feat, fx.query_examples(6), os.path.join(root, 'queries'), chunk_rows=4, seq_len=fx.SEQ_LEN
)
h = hessian.fit(train.path, queries.path, lam='auto', mesh=mesh, chunk_rows=16)
res = scoring.score(
    queries.path,
    train.path,
    hessian=h,
    k=5,
    mesh=mesh,
    chunk_rows=16,
    out_path=os.path.join(root, 'scores.jsonl'),
)
if jax.process_index() == 0:
    np.savez(
        os.path.join(root, 'result.npz'),
        rows=res.rows,
        scores=res.scores,
        r_inv_sqrt=h.r_inv_sqrt,
        lam=h.lam,
    )
jax.distributed.shutdown()
