"""The fit and score jobs on a small workdir, SIGKILLing at the Nth storage write.

Usage: python fit_score_kill_worker.py WORKDIR KIND KILL_AT

Builds (or resumes) the train and query indices, then runs the fit job for preconditioner
KIND and the score job, as ``launch/fit.py`` and ``launch/score.py`` do. Counting starts
after the indices are built: every key write (JSON, markers, results, checksums) and
every preconditioner array write is an event, and the process kills itself just before
event KILL_AT (-1: never). Prints the events, in order, at the end.
"""

import os
import signal
import sys

os.environ['JAX_PLATFORMS'] = 'cpu'

from tests import pipeline_fixtures as fx  # noqa: E402
from trackstar_jax import index, pipeline  # noqa: E402
from trackstar_jax.jobs import attribution  # noqa: E402

workdir, kind, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
feat = fx.featurizer()
fx.build_index(feat, fx.train_examples(20), os.path.join(workdir, 'train_index'), chunk_rows=8)
fx.build_index(feat, fx.query_examples(4), os.path.join(workdir, 'query_index'), chunk_rows=8)

events = []


def event(name):
    if len(events) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    events.append(name)


write_bytes = index.Store.write_bytes
create_array = index.Store.create_array


def write_counted(self, key, data):
    event(key)
    return write_bytes(self, key, data)


def create_counted(self, name, *args, **kwargs):
    arr = create_array(self, name, *args, **kwargs)

    class Counted:
        @staticmethod
        def write(value):
            event('array ' + name)
            return arr.write(value)

    return Counted


index.Store.write_bytes = write_counted

index.Store.create_array = create_counted
attribution.fit(workdir=workdir, config=pipeline.FitConfig(preconditioner=kind))
attribution.score(workdir=workdir, config=pipeline.ScoreConfig(k=5))
print('EVENTS', '|'.join(events))
