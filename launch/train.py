r"""Train an LM on a corpus with sharded Adafactor (the embedded demo by default).

    python launch/train.py --gin_file=train_demo.gin --workdir=runs/demo

Any gin binding overrides the files, e.g. --gin_bindings='TrainConfig.num_steps = 50'.
"""

import json
import os
import sys

import launch_common
from absl import flags

from trackstar_jax import index
from trackstar_jax.jobs import train_lm

_RESULTS = flags.DEFINE_string(
    'results', None, 'Also write the summary JSON here (e.g. benchmarks/results/).'
)


def train_and_report(*, workdir: str) -> dict:
    """Runs the train_lm job and writes its summary where --results says."""
    summary = train_lm.train_lm(workdir=workdir)
    if _RESULTS.value:
        os.makedirs(os.path.dirname(_RESULTS.value) or '.', exist_ok=True)
        record = {'command': 'python ' + ' '.join(sys.argv), **summary}
        index.write_text(_RESULTS.value, json.dumps(record, indent=1))
    return summary


if __name__ == '__main__':
    launch_common.run(train_and_report, 'train_demo.gin', 'train.gin')
