r"""TracIn-CP over the index a training run wrote (train.py with a TrainIndexConfig).

python launch/train.py --gin_file=train_index_demo.gin --workdir=runs/traced
python launch/score_training.py --gin_file=train_index_demo.gin --workdir=runs/traced
"""

import launch_common

from trackstar_jax.jobs import attribution

if __name__ == '__main__':
    launch_common.run(attribution.score_training, 'train_index_demo.gin', 'score_training.gin')
