"""One process of a 2-process jax.distributed training step (see test_multiprocess.py).

Usage: python train_step_worker.py PROCESS_ID PORT OUT.npz
"""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_multiprocess import CFG, TC, batch_for_test  # noqa: E402

from trackstar_jax import sharding as shd  # noqa: E402
from trackstar_jax import train  # noqa: E402
from trackstar_jax.data.batching import DataLayout  # noqa: E402
from trackstar_jax.models import DecoderLM  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
mesh = shd.make_mesh((('data', 4), ('model', 2)))
model = DecoderLM(CFG)
state, shardings = train.create_train_state(model, TC, mesh)
step = train.make_train_step(model, train.make_optimizer(TC), mesh, shardings)
layout = DataLayout.for_mesh(mesh, TC.batch_size)
full = batch_for_test()
local = {k: v[layout.local_rows] for k, v in full.items()}
state, metrics = step(state, train.global_batch(mesh, local))
params = multihost_utils.process_allgather(state.params, tiled=True)
if jax.process_index() == 0:
    flat = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
    }
    np.savez(out, loss=np.asarray(metrics['loss']), **flat)
jax.distributed.shutdown()
