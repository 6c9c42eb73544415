"""Builds a small index, SIGKILLing itself at the Nth build event (-1: never).

Usage: python index_kill_worker.py PATH KILL_AT
"""

import os
import signal
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'

from tests import pipeline_fixtures as fx  # noqa: E402

path, kill_at = sys.argv[1], int(sys.argv[2])
events = []


def hook(event, chunk):
    events.append((event, chunk))
    if len(events) - 1 == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


fx.build_index(
    fx.featurizer(),
    fx.train_examples(23),
    path,
    chunk_rows=4,
    batch_size=2,
    fault_hook=hook,
)
