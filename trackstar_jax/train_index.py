"""The attribution index as a by-product of training.

A training step computes every Dense layer's inputs and output-gradients anyway; the
fused kernel's taps project them per example on the way (``kernel.
fused_features_and_grads``), so the same forward/backward that gives the batch gradient
also gives each example's TrackStar feature φ(z) at the step's own (pre-update) params,
corrected with the step's own Adafactor second moments::

    plan = train_index.plan_for(model, params, opt_state, spec)
    loss, grads, feats = train_index.features_and_grads(model, plan, params, opt_state,
                                                        batch, plan.projections)
    # ... tx.update(grads, opt_state, params) as usual; feats: float32 [B, D]

``features_and_grads`` is a pure function any optax/Flax loop can call inside its own
jitted step; :func:`make_indexed_train_step` is our trainer's step built on it. The
rows stream to an ordinary index (:mod:`trackstar_jax.index`) through
:class:`AsyncRowWriter`, a background thread: the step never waits on storage (only a
checkpoint does, so that every step a checkpoint covers is committed). Row ids are
``<example id>@<step>``; the manifest's ``train_time`` entry lists the recorded steps
and their learning rates.

Scoring (:mod:`trackstar_jax.pipeline`): ``pipeline.score_tracin`` sums
lr_s · φ_s(q) · φ_s(z) over the recorded steps of each example (TracIn-CP, with the
query featurized at the latest checkpoint at or before each step), and
:func:`step_view` turns one recorded step's rows into an index that the usual
``pipeline.fit`` / ``pipeline.score`` take: TrackStar at that checkpoint.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trackstar_jax import checkpoint, losses
from trackstar_jax import index as index_lib
from trackstar_jax import sharding as shd
from trackstar_jax.grads import GradientSpec, kernel, projection
from trackstar_jax.grads import correction as correction_lib
from trackstar_jax.grads.layout import Layout

TRAIN_TIME_KEY = 'train_time'
FINGERPRINTS = 'checkpoints.json'  # beside the manifest: {step: fingerprints} of saves


@dataclasses.dataclass(frozen=True)
class TrainIndexConfig:
    """Which training steps write their examples' features, and where.

    Attributes:
      url: the index (relative paths are under the training workdir).
      spec: the gradient spec (output_fn must be 'loss': the training objective).
      first_step: first recorded step (0-based: the step whose pre-update state the rows
        are taken at); negative counts from the end (-100: the last 100 steps).
      every: record every this many steps from ``first_step``.
      dtype: storage dtype, 'float32' or 'bfloat16'.
      max_pending: steps whose rows may wait for storage before a step blocks (bounds
        host memory when storage is slower than training).
    """

    url: str = 'train_time_index'
    spec: GradientSpec = GradientSpec()
    first_step: int = 0
    every: int = 1
    dtype: str = 'float32'
    max_pending: int = 4

    def __post_init__(self):
        if self.spec.output_fn != 'loss':
            raise ValueError(
                "A training-time index records the training loss's gradient: "
                f"spec.output_fn must be 'loss', got {self.spec.output_fn!r}."
            )
        if self.every < 1 or self.max_pending < 1:
            raise ValueError('every and max_pending must be >= 1.')

    def steps(self, num_steps: int) -> list[int]:
        """The recorded steps of a run of ``num_steps`` steps."""
        first = self.first_step if self.first_step >= 0 else max(num_steps + self.first_step, 0)
        return list(range(first, num_steps, self.every))


@dataclasses.dataclass(frozen=True)
class AttributionPlan:
    """What a tapped training step needs besides the state: the static layout, which
    kernels are fused, and the projections (device arrays, drawn once).

    Attributes:
      spec: the gradient spec.
      layout: the block layout.
      fused_paths: Dense kernels taken by the taps.
      projections: (P0, P1) per included path.
    """

    spec: GradientSpec
    layout: Layout
    fused_paths: frozenset[str]
    projections: Mapping[str, tuple[jax.Array, jax.Array]]

    @property
    def dim(self) -> int:
        """D, the feature length."""
        return self.layout.dim


def plan_for(
    model: nn.Module,
    params: Any,
    opt_state: Any,
    spec: GradientSpec,
    *,
    mesh: Mesh | None = None,
    trace_len: int = 8,
) -> AttributionPlan:
    """The plan for ``model``'s params and optimizer state (arrays or shape structs).

    Which kernels the taps take depends only on the state's structure (a factored
    Adafactor moment is rank-one), so one plan serves every step of a run.
    """
    if spec.output_fn != 'loss':
        raise ValueError(f"output_fn must be 'loss' in a training step, got {spec.output_fn!r}.")
    params = nn.unbox(params)
    layout = spec.layout(params)
    kinds = jax.eval_shape(
        lambda s: correction_lib.param_corrections(layout, spec.correction, s), opt_state
    )
    dense = kernel.discover_dense_kernels(model, params, trace_len)
    fused = kernel.fusable_paths(layout, dense, kinds)
    entries = [e for e in layout.entries if not e.excluded]
    rep = None if mesh is None else shd.replicated(mesh)
    projections = jax.jit(
        lambda: projection.projection_pairs(spec.seed, entries, layout.side), out_shardings=rep
    )()
    return AttributionPlan(spec, layout, fused, projections)


def features_and_grads(
    model: nn.Module,
    plan: AttributionPlan,
    params: Any,
    opt_state: Any,
    batch: losses.Batch,
    projections: Mapping[str, tuple[jax.Array, jax.Array]],
) -> tuple[jax.Array, Any, jax.Array]:
    """The training loss, its gradient and every example's feature, in one backward.

    Pure and jittable: call it inside your own step in place of
    ``jax.value_and_grad(loss)`` and hand ``grads`` to your optimizer as usual.

    Args:
      model: the Flax LM (``apply({'params': p}, tokens)`` -> logits).
      plan: from :func:`plan_for`.
      params: the step's (pre-update) params.
      opt_state: the step's (pre-update) optax state: the features are corrected with
        its second moments, exactly as ``Featurizer(model, params, spec,
        opt_state=opt_state)`` would.
      batch: {'tokens', 'loss_mask'} [B, T].
      projections: ``plan.projections`` (passed as an argument so a jitted step takes
        them as inputs instead of baking them in as constants).

    Returns:
      (mean loss per target token — ``losses.mean_token_loss`` —, its gradient shaped
      like params, float32 [B, D] features of the per-example summed loss).
    """
    corrections = correction_lib.param_corrections(plan.layout, plan.spec.correction, opt_state)
    total, grads, feats = kernel.fused_features_and_grads(
        model,
        params,
        batch['tokens'],
        batch['loss_mask'],
        plan.layout,
        corrections,
        projections,
        plan.fused_paths,
        kernel.PRECISIONS[plan.spec.precision],
    )
    count = jnp.maximum(jnp.sum(batch['loss_mask'].astype(jnp.float32)), 1.0)
    return total / count, jax.tree.map(lambda g: g / count, grads), feats


def make_indexed_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    shardings: Any,
    plan: AttributionPlan,
) -> Callable[..., tuple[Any, dict, jax.Array]]:
    """Our trainer's step with features: ``(state, batch, projections) -> (state,
    metrics, features [B, D])``, sharded like ``train.make_train_step`` (features along
    ``data``), state donated."""
    from trackstar_jax import train  # a function-level import: train imports nothing of ours

    def step_fn(state, batch, projections):
        loss, grads, feats = features_and_grads(
            model, plan, state.params, state.opt_state, batch, projections
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            'loss': loss,
            'grad_norm': optax.tree.norm(grads),
            'target_tokens': jnp.sum(batch['loss_mask']),
        }
        return train.TrainState(state.step + 1, params, opt_state), metrics, feats

    batch_sharding = {'tokens': shd.batch_sharding(mesh), 'loss_mask': shd.batch_sharding(mesh)}
    rep = shd.replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(shardings, batch_sharding, jax.tree.map(lambda _: rep, plan.projections)),
        out_shardings=(shardings, rep, NamedSharding(mesh, PartitionSpec(shd.DATA, None))),
        donate_argnums=(0,),
    )


def manifest_for(
    plan: AttributionPlan,
    seq_len: int,
    steps: Sequence[int],
    learning_rates: Sequence[float],
    rows_per_chunk: int,
    processes: int,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a training-time index.

    The vectors of each step come from that step's params and moments, so the index has
    no single model fingerprint; ``train_time`` says which rows belong to which step
    (``processes`` chunks of ``rows_per_chunk`` rows per step, in step order).
    """
    spec = plan.spec
    return {
        'model_fingerprint': 'per-step',
        'correction_fingerprint': 'per-step',
        'spec': spec.to_dict(),
        'layout': plan.layout.to_dict(),
        'correction': spec.correction,
        'output_fn': spec.output_fn,
        'projection_seed': spec.seed,
        'seq_len': int(seq_len),
        TRAIN_TIME_KEY: {
            'steps': [int(s) for s in steps],
            'learning_rates': [float(r) for r in learning_rates],
            'rows_per_chunk': int(rows_per_chunk),
            'chunks_per_step': int(processes),
        },
        **(dict(extra) if extra else {}),
    }


def row_ids(example_ids_by_step: Sequence[Sequence[str]], steps: Sequence[int]) -> list[str]:
    """``<example id>@<step>`` for every recorded row, in index order."""
    return [f'{e}@{s}' for s, ids in zip(steps, example_ids_by_step, strict=True) for e in ids]


def split_row_id(row_id: str) -> tuple[str, int]:
    """(example id, step) of a training-time row id."""
    example, _, step = row_id.rpartition('@')
    return example, int(step)


class AsyncRowWriter:
    """Streams each recorded step's feature rows to an index from a background thread.

    :meth:`put` hands over the step's (still computing) device array and returns at
    once; the thread copies it to the host when it is ready and commits it as chunk
    ``step_index * processes + process`` (this process's rows). At most ``max_pending``
    steps wait; :meth:`flush` waits for all of them (before a checkpoint), :meth:`close`
    also stops the thread. A storage error is raised by the next call.
    """

    def __init__(self, writer: index_lib.IndexWriter, steps: Sequence[int], max_pending: int = 4):
        """Args: the index writer, the recorded steps (in order), the queue bound."""
        self._writer = writer
        self._chunk_base = {int(s): i for i, s in enumerate(steps)}
        self._per_step = int(writer.manifest[TRAIN_TIME_KEY]['chunks_per_step'])
        self._done = set(c for c, ok in enumerate(writer.committed()) if ok)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.write_seconds = 0.0  # in write_chunk (storage), not waiting for the device
        self.rows_written = 0
        self._thread = threading.Thread(target=self._run, name='train-index-writer', daemon=True)
        self._thread.start()

    def chunk(self, step: int) -> int:
        """This process's chunk of ``step``."""
        return self._chunk_base[step] * self._per_step + jax.process_index()

    def is_committed(self, step: int) -> bool:
        """Whether this process's rows of ``step`` are already stored (a resumed run)."""
        return self.chunk(step) in self._done

    def put(self, step: int, features: jax.Array, num_targets: np.ndarray) -> None:
        """Queues ``step``'s rows (blocks only while ``max_pending`` steps are waiting)."""
        self._raise()
        if self.is_committed(step):
            return
        self._queue.put((step, features, np.asarray(num_targets, np.float32)))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    step, features, targets = item
                    rows = local_rows(features)  # waits for the step's device work
                    t0 = time.perf_counter()
                    self._writer.write_chunk(self.chunk(step), rows, targets)
                    self._done.add(self.chunk(step))
                    self.write_seconds += time.perf_counter() - t0
                    self.rows_written += len(rows)
            except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
                self._error = e
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(
                f'Writing the training-time index {self._writer.path} failed: {self._error}'
            ) from self._error

    def flush(self) -> None:
        """Waits until every queued step is committed."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        """Flushes and stops the thread."""
        self._queue.put(None)
        self._thread.join()
        self._raise()


def local_rows(features: jax.Array) -> np.ndarray:
    """This process's rows of a [B, D] array sharded along ``data``, in row order."""
    if features.is_fully_addressable:
        return np.asarray(features)
    shards = {}
    for s in features.addressable_shards:
        shards.setdefault(s.index[0].start or 0, np.asarray(s.data))
    return np.concatenate([shards[k] for k in sorted(shards)])


def correction_fingerprint(corrections: Mapping[str, correction_lib.ParamCorrection]) -> str:
    """The ``correction_fingerprint`` a Featurizer with these corrections records."""
    from trackstar_jax import pipeline  # pipeline imports this module's users, not this

    return pipeline.corrections_fingerprint(corrections)


def record_checkpoint(
    url: str, step: int, params: Any, opt_state: Any, plan: AttributionPlan
) -> None:
    """Records the fingerprints a query index featurized at checkpoint ``step`` will carry,
    so :func:`step_view` and TracIn scoring can check the queries match the rows."""
    corrections = correction_lib.param_corrections(plan.layout, plan.spec.correction, opt_state)
    entry = {  # computed on every process (the digest is an SPMD computation)
        'model_fingerprint': checkpoint.fingerprint(params),
        'correction_fingerprint': correction_fingerprint(corrections),
    }
    if jax.process_index() == 0:
        store = index_lib.Store(url)
        saved = store.read_json(FINGERPRINTS) if store.exists(FINGERPRINTS) else {}
        saved[str(int(step))] = entry
        store.write_json(FINGERPRINTS, saved, indent=1)


def checkpoint_fingerprints(idx: index_lib.Index) -> dict[int, dict[str, str]]:
    """{checkpoint step: fingerprints} recorded while the index was written."""
    store = index_lib.Store(idx.path)
    if not store.exists(FINGERPRINTS):
        return {}
    return {int(k): v for k, v in store.read_json(FINGERPRINTS).items()}


def recorded_steps(idx: index_lib.Index) -> tuple[np.ndarray, dict[int, float]]:
    """(step of every row [N], {step: learning rate}) of a training-time index."""
    meta = idx.manifest.get(TRAIN_TIME_KEY)
    if meta is None:
        raise ValueError(f'{idx.path} is not a training-time index (no {TRAIN_TIME_KEY!r}).')
    steps = np.asarray(meta['steps'], np.int64)
    per_step = int(meta['rows_per_chunk']) * int(meta['chunks_per_step'])
    row_steps = steps[np.minimum(np.arange(len(idx)) // per_step, len(steps) - 1)]
    return row_steps, dict(zip(meta['steps'], meta['learning_rates'], strict=True))


def step_view(idx: index_lib.Index, step: int, url: str) -> index_lib.Index:
    """The rows of one recorded ``step`` as an ordinary index (ids: the example ids).

    Its manifest carries the fingerprints of the checkpoint at ``step`` when the trainer
    saved one there, so ``pipeline.score`` accepts queries featurized at that checkpoint
    (and refuses others): the usual TrackStar pipeline, over what the model saw then.
    """
    row_steps, _ = recorded_steps(idx)
    rows = np.flatnonzero(row_steps == step)
    if not len(rows):
        raise ValueError(f'{idx.path} recorded no rows at step {step}.')
    start, stop = int(rows[0]), int(rows[-1]) + 1
    fingerprints = checkpoint_fingerprints(idx).get(int(step))
    if fingerprints is None:
        logging.warning(
            '%s: no checkpoint was saved at step %d; its step view cannot be matched to '
            'query indices (score them with pipeline.score_tracin instead).',
            idx.path,
            step,
        )
        fingerprints = {'model_fingerprint': f'step-{step}', 'correction_fingerprint': 'per-step'}
    manifest = {
        **{k: v for k, v in idx.manifest.items() if k in ('spec', 'layout', 'correction')},
        'output_fn': idx.manifest['output_fn'],
        'projection_seed': idx.manifest['projection_seed'],
        'seq_len': idx.manifest['seq_len'],
        **fingerprints,
        'step_of': idx.path,
        'step': int(step),
    }
    ids = [split_row_id(i)[0] for i in idx.ids[start:stop]]
    writer = index_lib.create(
        url, manifest, ids, dim=idx.dim, dtype=idx.manifest['dtype'], chunk_rows=stop - start
    )
    if not writer.committed()[0]:
        writer.write_chunk(0, idx.read(slice(start, stop)), idx.num_targets()[start:stop])
    return writer.finish()


class Recorder:
    """Our trainer's side of a training-time index: the index, the tapped step, the writer.

    ``train_lm`` calls :meth:`step` instead of its plain step on recorded steps,
    :meth:`before_checkpoint` before each save and :meth:`close` at the end.
    """

    def __init__(
        self,
        config: TrainIndexConfig,
        url: str,
        model: nn.Module,
        tx: optax.GradientTransformation,
        mesh: Mesh,
        state: Any,
        shardings: Any,
        *,
        num_steps: int,
        start_step: int,
        seq_len: int,
        local_batch: int,
        example_ids: Callable[[int], Sequence[str]],
        learning_rate: Callable[[int], float],
        manifest_extra: Mapping[str, Any] | None = None,
    ):
        """Creates (or reopens, on a resumed run) the index at ``url``.

        Args:
          config: what to record.
          url: the index URL.
          model, tx, mesh, state, shardings: the trainer's.
          num_steps: steps of the whole run.
          start_step: the step this run starts at (after a resume).
          seq_len: tokens per example.
          local_batch: rows per step fed by this process.
          example_ids: the global batch's example ids at a step.
          learning_rate: the learning rate a step applies.
          manifest_extra: more manifest entries (the checkpoint directory, ...).

        Raises:
          RuntimeError: if a resumed run finds recorded steps before ``start_step``
            missing from the index (they cannot be recomputed from a later checkpoint).
        """
        from jax.experimental import multihost_utils

        self.url = url
        self.steps = config.steps(num_steps)
        self._recorded = set(self.steps)
        self.plan = plan_for(model, state.params, state.opt_state, config.spec, mesh=mesh)
        manifest = manifest_for(
            self.plan,
            seq_len,
            self.steps,
            [learning_rate(s) for s in self.steps],
            local_batch,
            jax.process_count(),
            manifest_extra,
        )
        ids = row_ids([list(example_ids(s)) for s in self.steps], self.steps)
        create = dict(dim=self.plan.dim, dtype=config.dtype, chunk_rows=local_batch)
        writer = (
            index_lib.create(url, manifest, ids, **create) if jax.process_index() == 0 else None
        )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices('train_index_created')
        writer = writer or index_lib.create(url, manifest, ids, **create)
        self.writer = AsyncRowWriter(writer, self.steps, config.max_pending)
        lost = [s for s in self.steps if s < start_step and not self.writer.is_committed(s)]
        if lost:
            self.writer.close()
            raise RuntimeError(
                f'{url} lacks the rows of {len(lost)} recorded steps before step {start_step} '
                f'(first {lost[:5]}), where training resumes: they cannot be recomputed from '
                'this checkpoint. Train from scratch into a new workdir, or record from a '
                'later step (TrainIndexConfig.first_step).'
            )
        self._step = make_indexed_train_step(model, tx, mesh, shardings, self.plan)
        logging.info(
            'Training-time index %s: %d recorded steps (%d to %d), D=%d, %d rows.',
            url,
            len(self.steps),
            self.steps[0] if self.steps else -1,
            self.steps[-1] if self.steps else -1,
            self.plan.dim,
            len(ids),
        )

    def wants(self, step: int) -> bool:
        """Whether ``step`` is recorded."""
        return step in self._recorded

    def step(self, state: Any, batch: Mapping[str, jax.Array], num_targets: np.ndarray, step: int):
        """The tapped step; its rows go to the writer. Returns (state, metrics)."""
        state, metrics, features = self._step(state, batch, self.plan.projections)
        self.writer.put(step, features, num_targets)
        return state, metrics

    def before_checkpoint(self, step: int, state: Any) -> None:
        """Commits every queued row and records the fingerprints of checkpoint ``step``."""
        self.writer.flush()
        record_checkpoint(self.url, step, state.params, state.opt_state, self.plan)

    def close(self) -> dict[str, Any]:
        """Flushes, stops the writer and returns a summary (the index must be complete)."""
        from jax.experimental import multihost_utils

        self.writer.close()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices('train_index_closed')
        idx = index_lib.open(self.url)
        return {
            'url': self.url,
            'rows': len(idx),
            'recorded_steps': len(self.steps),
            'dim': idx.dim,
            'rows_written_this_run': self.writer.rows_written,
            'write_seconds_in_background': self.writer.write_seconds,
        }
