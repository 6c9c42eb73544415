"""What the attribution jobs share: loading a model from its checkpoint.

Two kinds of checkpoint load the same way: one written by our trainer (``train_lm``:
DecoderLM, params + Adafactor state + train config), and one imported from another
framework (``launch/import_checkpoint.py``: ``model_type`` 'llama', params + tokenizer,
no optimizer state). An imported checkpoint gets its V from
``launch/estimate_second_moments.py`` (saved beside it in ``second_moments/``): it is put
into a fresh Adafactor state of the tail-patch optimizer recorded there, so the
'adafactor' correction and the tail-patch step read it exactly as they would a real one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
from absl import logging
from jax.sharding import Mesh

from trackstar_jax import checkpoint, train
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.grads import second_moments
from trackstar_jax.models import DecoderConfig, DecoderLM


@dataclasses.dataclass
class LoadedModel:
    """A model restored from a checkpoint.

    Attributes:
      model: the linen module.
      params: its params, sharded on the mesh.
      opt_state: the Adafactor state (None for an imported model without estimated V).
      train_config: the optimizer settings the tail-patch step uses.
      step: the checkpoint step.
      checkpoint_dir: where it came from.
      tokenizer: the checkpoint's own tokenizer (imported models); None means the
        SentencePiece model the jobs are given.
    """

    model: nn.Module
    params: Any
    opt_state: Any
    train_config: train.TrainConfig
    step: int
    checkpoint_dir: str
    tokenizer: Any = None


def load_model(checkpoint_dir: str, mesh: Mesh, step: int | None = None) -> LoadedModel:
    """Restores params + optimizer state of a ``train_lm`` checkpoint onto ``mesh``.

    An imported checkpoint (``model_type`` 'llama') is restored by :func:`load_imported`.
    """
    config = checkpoint.restore_config(checkpoint_dir, step)
    if config.get('model_type') == 'llama':
        return load_imported(checkpoint_dir, mesh, step)
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


def load_imported(checkpoint_dir: str, mesh: Mesh, step: int | None = None) -> LoadedModel:
    """An imported Llama-family checkpoint, with its estimated V if there is one."""
    from trackstar_jax.models import gguf_import

    model, params, _ = gguf_import.load_imported(checkpoint_dir, mesh, step)
    tokenizer = gguf_import.imported_tokenizer(checkpoint_dir, step)
    found = second_moments.load_moments(checkpoint_dir)
    if found is None:
        return LoadedModel(
            model, params, None, train.TrainConfig(), step or 0, checkpoint_dir, tokenizer
        )
    moments, meta = found
    train_config = train.TrainConfig(**meta['train_config'])
    fresh = jax.jit(train.make_optimizer(train_config).init)(params)
    opt_state = second_moments.with_moments(fresh, moments)
    return LoadedModel(model, params, opt_state, train_config, step or 0, checkpoint_dir, tokenizer)


def checkpoint_tokenizer(loaded: LoadedModel, tokenizer_path: str) -> Any:
    """The checkpoint's own tokenizer if it carries one, else the SentencePiece model."""
    if loaded.tokenizer is not None:
        if tokenizer_path != corpus_lib.TOKENIZER_PATH:
            logging.warning(
                'Ignoring tokenizer_path=%s: %s carries its own tokenizer.',
                tokenizer_path,
                loaded.checkpoint_dir,
            )
        return loaded.tokenizer
    return corpus_lib.Tokenizer(tokenizer_path)
