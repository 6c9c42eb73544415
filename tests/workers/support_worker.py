"""One of 2 processes building a token index (see test_multiprocess.py).

Usage: python support_worker.py PROCESS_ID PORT ROOT KILL_AT

The parameters are laid out over the 2-process mesh (the token build gathers them to
each host). Process 1 SIGKILLs itself right after its KILL_AT-th chunk commit (-1:
never). Each process writes the chunks it committed to ROOT/chunks_<id>.json.
"""

import json
import os
import signal
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

process_id, port, root, kill_at = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)

from tests import test_support as ts  # noqa: E402
from trackstar_jax import sharding as shd  # noqa: E402
from trackstar_jax import support  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8
mesh = shd.make_mesh((('data', 8), ('model', 1)))
model, params = ts._peaked_model()
params = jax.device_put(params, shd.replicated(mesh))
commits = []


def hook(event, chunk):
    if event == 'committed':
        commits.append(chunk)
        with open(os.path.join(root, f'chunks_{process_id}.json'), 'w') as f:
            json.dump(commits, f)
        if process_id == 1 and len(commits) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


support.featurize_tokens(
    model, params, ts.multiprocess_examples(), os.path.join(root, 'tokens'), ts._config(),
    fault_hook=hook,
)  # fmt: skip
jax.distributed.shutdown()
