r"""Train an LM on a corpus with sharded Adafactor (the embedded demo by default).

    python launch/train.py --gin_file=train_demo.gin --workdir=runs/demo

Any gin binding overrides the files, e.g. --gin_bindings='TrainConfig.num_steps = 50'.
"""

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trackstar_jax import gin_utils  # noqa: E402
from trackstar_jax.jobs import train_lm  # noqa: E402

FLAGS = flags.DEFINE_multi_string('gin_file', ['train_demo.gin'], 'gin files.')
BINDINGS = flags.DEFINE_multi_string('gin_bindings', [], 'gin bindings.')
WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Output directory.')
RESULTS = flags.DEFINE_string(
    'results', None, 'Also write the summary JSON here (e.g. benchmarks/results/).'
)
COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'host:port for jax.distributed (multi-process runs).'
)
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'jax.distributed processes.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (jax.distributed).')


def main(argv):
    del argv
    if COORDINATOR.value:
        import jax

        jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    gin_utils.parse(FLAGS.value, BINDINGS.value)
    os.makedirs(WORKDIR.value, exist_ok=True)
    gin_utils.write_operative_config(WORKDIR.value)
    summary = train_lm.train_lm(workdir=WORKDIR.value)
    if RESULTS.value:
        os.makedirs(os.path.dirname(RESULTS.value) or '.', exist_ok=True)
        summary = {'command': 'python ' + ' '.join(sys.argv), **summary}
        with open(RESULTS.value, 'w') as f:
            json.dump(summary, f, indent=1)
    logging.info(
        'Done: eval loss %.3f, unigram entropy %.3f nats/token.',
        summary['final_eval_loss'],
        summary['unigram_entropy'],
    )


if __name__ == '__main__':
    app.run(main)
