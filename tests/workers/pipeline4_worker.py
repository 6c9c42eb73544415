"""One of 4 processes (2 CPU devices each) of an index -> fit -> score run.

Usage: python pipeline4_worker.py PROCESS_ID PORT ROOT KILL_AT

Process 1 SIGKILLs itself right after its KILL_AT-th chunk commit (-1: never). Each
process writes how many corpus rows it built to ROOT/rows_<id>.json.
"""

import json
import os
import signal
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

process_id, port, root, kill_at = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=4, process_id=process_id)

import numpy as np  # noqa: E402

from tests import pipeline_fixtures as fx  # noqa: E402
from trackstar_jax import pipeline  # noqa: E402
from trackstar_jax import sharding as shd  # noqa: E402
from trackstar_jax.data import examples as examples_lib  # noqa: E402

assert jax.process_count() == 4 and jax.device_count() == 8
mesh = shd.make_mesh((('data', 4), ('model', 2)))
feat = fx.featurizer(mesh)
corpus = fx.train_examples(45)
source = examples_lib.ExampleSource([e['id'] for e in corpus], lambda a, b: corpus[a:b])
commits = []


def hook(event, chunk):
    if event == 'committed':
        commits.append(chunk)
        if process_id == 1 and len(commits) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


config = pipeline.IndexConfig(seq_len=fx.SEQ_LEN, batch_size=2, chunk_rows=4)
train = pipeline.featurize(feat, source, os.path.join(root, 'train'), config, fault_hook=hook)
with open(os.path.join(root, f'rows_{process_id}.json'), 'w') as f:
    json.dump({'rows_made': source.rows_made}, f)
queries = pipeline.featurize(feat, fx.query_examples(6), os.path.join(root, 'queries'), config)
m = pipeline.fit(train, queries, pipeline.FitConfig(chunk_rows=16), mesh=mesh)
res = pipeline.score(queries, train, m, pipeline.ScoreConfig(k=5, chunk_rows=16), mesh=mesh)
if jax.process_index() == 0:
    np.savez(os.path.join(root, 'result.npz'), rows=res.rows, scores=res.scores)
jax.distributed.shutdown()
