"""What the attribution jobs share: loading a trained model from its checkpoint."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh

from trackstar_jax import checkpoint, train
from trackstar_jax.models import DecoderConfig, DecoderLM


@dataclasses.dataclass
class LoadedModel:
    """A model restored from a trainer checkpoint."""

    model: DecoderLM
    params: Any
    opt_state: Any
    train_config: train.TrainConfig
    step: int
    checkpoint_dir: str


def load_model(checkpoint_dir: str, mesh: Mesh, step: int | None = None) -> LoadedModel:
    """Restores params + optimizer state of a ``train_lm`` checkpoint onto ``mesh``."""
    config = checkpoint.restore_config(checkpoint_dir, step)
    model_config = DecoderConfig.from_dict(config['model'])
    train_config = train.TrainConfig(**config['train'])
    model = DecoderLM(model_config)
    tx = train.make_optimizer(train_config)
    p_shard = train.param_shardings(model, train_config.seq_len, mesh)
    params_shape = jax.eval_shape(lambda: train.init_params(model, train_config.seq_len, mesh, 0))
    opt_shape = jax.eval_shape(tx.init, params_shape)
    shardings = train.state_shardings(p_shard, opt_shape, mesh)
    abstract = checkpoint.abstract_like(
        train.TrainState(jax.ShapeDtypeStruct((), 'int32'), params_shape, opt_shape), shardings
    )
    state, _, step = checkpoint.restore(checkpoint_dir, abstract, step)
    return LoadedModel(model, state.params, state.opt_state, train_config, step, checkpoint_dir)
