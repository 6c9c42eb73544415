"""A lean, real trainer: sharded Adafactor steps on a mesh, Orbax checkpoints.

It exists to produce the models we attribute (the embedded demo, tests, the tail-patch
step of the evaluation), so it keeps exactly what those need: params created already
sharded, a jit-compiled step with its shardings stated at the boundary, a deterministic
data order that a resumed run continues exactly, and checkpoints holding params,
optimizer state and configs together (``trackstar_jax.checkpoint``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from trackstar_jax import losses
from trackstar_jax import sharding as shd


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop settings (the paper's Table A.4 recipe, scaled down).

    Attributes:
      learning_rate: peak learning rate (the paper: 0.01).
      warmup_steps: linear warm-up steps; then inverse-square-root decay.
      min_dim_size_to_factor: Adafactor factors a matrix's second moment when its two
        largest dims are at least this (optax's default 128; lower it on tiny models).
      decay_rate: Adafactor's second-moment decay exponent.
      clipping_threshold: Adafactor update clipping.
      multiply_by_parameter_scale: scale each tensor's update by its parameters' RMS
        (at least 1e-3), so ``learning_rate`` is relative (Adafactor's paper and T5X do;
        optax's default). Off by default: our models train with absolute steps. Saved
        with the checkpoint, so tail-patch steps as the model was trained.
      batch_size: global batch size (examples per step).
      seq_len: tokens per example.
      num_steps: total training steps.
      seed: seeds parameter init and data order.
      log_every: steps between progress lines.
      checkpoint_every: steps between checkpoints (the last step is always saved).
    """

    learning_rate: float = 0.01
    warmup_steps: int = 100
    min_dim_size_to_factor: int = 128
    decay_rate: float = 0.8
    clipping_threshold: float | None = 1.0
    multiply_by_parameter_scale: bool = False
    batch_size: int = 16
    seq_len: int = 128
    num_steps: int = 1000
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (stored beside checkpoints)."""
        return dataclasses.asdict(self)


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes."""

    step: jax.Array
    params: Any
    opt_state: optax.OptState


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to ``learning_rate``, then inverse-square-root decay."""
    warmup = max(config.warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32) + 1.0
        return config.learning_rate * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

    return schedule


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """optax Adafactor with factored second moments, as the paper's models use."""
    return optax.adafactor(
        learning_rate=learning_rate_schedule(config),
        min_dim_size_to_factor=config.min_dim_size_to_factor,
        decay_rate=config.decay_rate,
        clipping_threshold=config.clipping_threshold,
        multiply_by_parameter_scale=config.multiply_by_parameter_scale,
    )


def init_params(model: nn.Module, seq_len: int, mesh: Mesh, seed: int) -> Any:
    """Creates the model's params already sharded by the logical axis rules."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    rng = jax.random.PRNGKey(seed)
    boxed = jax.eval_shape(model.init, rng, tokens)
    shardings = shd.tree_shardings(mesh, boxed)['params']
    init = jax.jit(lambda r: nn.unbox(model.init(r, tokens))['params'], out_shardings=shardings)
    return init(rng)


def param_shardings(model: nn.Module, seq_len: int, mesh: Mesh) -> Any:
    """The sharding of every param leaf, from the model's logical annotations."""
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    return shd.tree_shardings(mesh, boxed)['params']


def state_shardings(params_shardings: Any, opt_state_shapes: Any, mesh: Mesh) -> TrainState:
    """Shardings of a TrainState. The (factored, tiny) optimizer state is replicated."""
    return TrainState(
        step=shd.replicated(mesh),
        params=params_shardings,
        opt_state=jax.tree.map(lambda _: shd.replicated(mesh), opt_state_shapes),
    )


def create_train_state(
    model: nn.Module, config: TrainConfig, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """A fresh sharded TrainState and its shardings."""
    tx = make_optimizer(config)
    params = init_params(model, config.seq_len, mesh, config.seed)
    opt_shapes = jax.eval_shape(tx.init, params)
    shardings = state_shardings(param_shardings(model, config.seq_len, mesh), opt_shapes, mesh)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state), shardings


def loss_fn(model: nn.Module, params: Any, batch: losses.Batch) -> jax.Array:
    """The training objective on one batch (mean loss per target token)."""
    logits = model.apply({'params': params}, batch['tokens'])
    return losses.mean_token_loss(logits, batch['tokens'], batch['loss_mask'])


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, shardings: TrainState
) -> Callable[[TrainState, losses.Batch], tuple[TrainState, dict]]:
    """A jit-compiled, sharded training step ``(state, batch) -> (state, metrics)``.

    Examples are split along ``data``, params as the model's logical axes say; the
    state buffers are donated.
    """

    def step_fn(state: TrainState, batch: losses.Batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch))(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            'loss': loss,
            'grad_norm': optax.tree.norm(grads),
            'target_tokens': jnp.sum(batch['loss_mask']),
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    batch_sharding = {'tokens': shd.batch_sharding(mesh), 'loss_mask': shd.batch_sharding(mesh)}
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_loss_and_grads(
    model: nn.Module, mesh: Mesh, params_shardings: Any
) -> Callable[[Any, losses.Batch], tuple[jax.Array, Any]]:
    """Sharded ``(params, batch) -> (loss, grads)``; used by tests and benchmarks."""
    batch_sharding = {'tokens': shd.batch_sharding(mesh), 'loss_mask': shd.batch_sharding(mesh)}
    return jax.jit(
        jax.value_and_grad(lambda p, b: loss_fn(model, p, b)),
        in_shardings=(params_shardings, batch_sharding),
        out_shardings=(shd.replicated(mesh), params_shardings),
    )


def global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles a global batch from this process's rows (its slice of the data axis).

    Process p holds rows [p * B / P, (p + 1) * B / P) of the global batch (see
    :func:`trackstar_jax.data.batching.DataLayout`).
    """
    sharding = shd.batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
