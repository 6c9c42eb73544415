r"""Support samples: a token index of the corpus at a checkpoint, the paper's counts, and
for each fact query the training tokens that most promote and most deter its answer.

python launch/train.py --gin_file=train_demo.gin --workdir=runs/demo   # if not trained yet
python launch/support.py --workdir=runs/demo
"""

import launch_common

from trackstar_jax.jobs import support_samples

if __name__ == '__main__':
    launch_common.run(support_samples.support_samples, 'support_demo.gin', 'support.gin')
