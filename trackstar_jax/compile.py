"""Ahead-of-time compilation of the jobs' programs for a target topology, before renting it.

Every program is built from abstract inputs (``jax.eval_shape``: no weights, no data),
sharded over a mesh of the target's devices exactly as the jobs shard it, lowered and
compiled; XLA then says what one step needs per chip (``memory_analysis``) and costs
(``cost_analysis``). A TPU topology (``'v5p:4x4x8'``) compiles on a CPU-only machine
through ``jax.experimental.topologies`` with the ``libtpu`` wheel (``pip install
"jax[tpu]"``); ``topology=None`` compiles for the local devices (CPU or GPU).

Jobs and the step each compiles:

    index / query   the fused kernel on [batch, seq_len] examples  (per step: batch examples)
    train           one Adafactor training step on the same batch
    fit             one R accumulation step over [chunk_rows, D] index rows
    score           one top-k step of num_queries queries over [chunk_rows, D] rows
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trackstar_jax import hessian, scoring, train
from trackstar_jax import sharding as shd
from trackstar_jax.grads import correction as correction_lib
from trackstar_jax.grads import featurizer as featurizer_lib
from trackstar_jax.grads import kernel, projection
from trackstar_jax.grads.featurizer import GradientSpec
from trackstar_jax.grads.layout import Layout

JOBS = ('index', 'query', 'train', 'fit', 'score')

# Published per-chip figures: (peak bf16 FLOP/s, HBM bytes, HBM bytes/s).
# TPU: cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e ("System architecture" tables).
# GPU: nvidia.com/en-us/data-center/h100/ and /h200/ (SXM, dense bf16, no sparsity).
CHIPS: dict[str, tuple[float, float, float]] = {
    # v4: 275 TFLOP/s, 32 GiB, 1.2 TB/s per chip; its topology lists the chip's two
    # TensorCores as two devices, so per device it is half of each.
    'TPU v4': (137.5e12, 16 * 2**30, 0.6e12),
    'TPU v5 lite': (197e12, 16e9, 8.19e11),  # v5e: 16 GB HBM2
    'TPU v5': (459e12, 95e9, 2.765e12),  # v5p: 95 GB HBM2e
    'TPU v6 lite': (918e12, 32e9, 1.64e12),  # v6e (Trillium): 32 GB HBM
    'NVIDIA H100 80GB HBM3': (989e12, 80e9, 3.35e12),
    'NVIDIA H200': (989e12, 141e9, 4.8e12),
}


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    """What to compile, and for which machine.

    Attributes:
      topology: a TPU topology name ('v5p:4x4x8', 'v5e:16x16', 'v6e:16x16', 'v4:4x4x4')
        or None for the local devices.
      mesh_axes: the job's mesh over those devices ((name, size) pairs, one may be -1).
      batch_size: global examples per step (index, query, train).
      seq_len: tokens per example.
      chunk_rows: index rows per step (fit, score).
      num_queries: queries scored at once (score; the paper's T-REx set is 5,400).
      k: proponents per query (score).
      preconditioner: the kind the score step applies.
      hbm_bytes: memory per chip to fit in (None: the chip's, from :data:`CHIPS`, or the
        device's own ``memory_stats``).
    """

    topology: str | None = None
    mesh_axes: Sequence[tuple[str, int]] = ((shd.DATA, -1), (shd.MODEL, 1))
    batch_size: int = 16
    seq_len: int = 2048
    chunk_rows: int = 4096
    num_queries: int = 5400
    k: int = 10
    preconditioner: str = 'mixed'
    hbm_bytes: int | None = None


class DoesNotFitError(ValueError):
    """A compiled program needs more memory per chip than the chip has."""


def target_devices(topology: str | None) -> list[Any]:
    """The devices of a TPU topology (compile-only), or the local devices."""
    if topology is None:
        return list(jax.devices())
    import os

    from jax.experimental import topologies

    # Compiling for a topology touches no TPU; let it run beside another such process
    # (libtpu otherwise refuses a second process through its lockfile).
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform='tpu').devices)
    except Exception as e:  # noqa: BLE001 - libtpu's errors are plain RuntimeErrors
        raise ValueError(
            f'Cannot describe TPU topology {topology!r} ({e}). Install the TPU compiler '
            '(pip install "jax[tpu]" at the project\'s jax version) and use a name such '
            "as 'v5p:4x4x8', 'v5e:16x16', 'v6e:16x16' or 'v4:4x4x4'."
        ) from e


def chip_memory(device: Any, override: int | None = None) -> int | None:
    """Bytes of memory of one chip: the override, the device's own stats, or :data:`CHIPS`."""
    if override:
        return int(override)
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - compile-only devices have none
        stats = None
    if stats and stats.get('bytes_limit'):
        return int(stats['bytes_limit'])
    if device.device_kind in CHIPS:
        return int(CHIPS[device.device_kind][1])
    if device.platform == 'cpu':
        import os

        return int(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))
    return None


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_params(model: nn.Module, seq_len: int, mesh: Mesh) -> Any:
    """The model's params as sharded ShapeDtypeStructs (from its logical annotations)."""
    tokens = jax.ShapeDtypeStruct((1, min(seq_len, 8)), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    shardings = shd.tree_shardings(mesh, boxed)['params']
    return _abstract(nn.unbox(boxed)['params'], shardings)


def _batch(mesh: Mesh, batch_size: int, seq_len: int) -> tuple[Any, Any]:
    rows = NamedSharding(mesh, PartitionSpec(shd.DATA))
    return (
        jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32, sharding=rows),
    )


def index_program(
    model: nn.Module,
    spec: GradientSpec,
    train_config: train.TrainConfig,
    mesh: Mesh,
    config: CompileConfig,
) -> tuple[Any, tuple[Any, ...], Layout]:
    """The fused kernel as the index job runs it, with abstract arguments."""
    if spec.projection != 'two_sided':
        raise ValueError(
            f'Ahead-of-time compilation covers the fused two-sided kernel; projection='
            f'{spec.projection!r} runs the per-example reference path (small models only).'
        )
    params = abstract_params(model, config.seq_len, mesh)
    layout = spec.layout(params)
    opt_state = jax.eval_shape(train.make_optimizer(train_config).init, params)
    corrections = jax.eval_shape(
        lambda s: correction_lib.param_corrections(layout, spec.correction, s), opt_state
    )
    dense = kernel.discover_dense_kernels(model, params, 8)
    fused = kernel.fusable_paths(layout, dense, corrections)
    entries = [e for e in layout.entries if not e.excluded]
    projections = jax.eval_shape(
        lambda: projection.projection_pairs(spec.seed, entries, layout.side)
    )
    rep = shd.replicated(mesh)
    corr_shardings = featurizer_lib.correction_shardings(
        corrections, kernel.tree_by_path(params), mesh
    )
    constants = (
        _abstract(corrections, corr_shardings),
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), projections),
    )
    program = featurizer_lib.fused_program(
        model,
        layout,
        spec.output_fn,
        fused,
        mesh,
        jax.tree.map(lambda x: x.sharding, params),
        jax.tree.map(lambda x: x.sharding, constants),
        spec.precision,
    )
    return program, (params, constants, *_batch(mesh, config.batch_size, config.seq_len)), layout


def train_program(
    model: nn.Module, train_config: train.TrainConfig, mesh: Mesh, config: CompileConfig
) -> tuple[Any, tuple[Any, ...]]:
    """One training step of the same model and batch (the cost the index is compared to)."""
    params = abstract_params(model, config.seq_len, mesh)
    tx = train.make_optimizer(train_config)
    opt_shape = jax.eval_shape(tx.init, params)
    shardings = train.state_shardings(jax.tree.map(lambda x: x.sharding, params), opt_shape, mesh)
    state = _abstract(
        train.TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_shape), shardings
    )
    step = train.make_train_step(model, tx, mesh, shardings)
    tokens, mask = _batch(mesh, config.batch_size, config.seq_len)
    return step, (state, {'tokens': tokens, 'loss_mask': mask})


def fit_program(layout: Layout, mesh: Mesh, config: CompileConfig) -> tuple[Any, tuple[Any, ...]]:
    """One R accumulation step: a [chunk_rows, D] chunk into the per-device partial sums."""
    nb, db = layout.num_blocks, layout.block_dim
    rows = NamedSharding(mesh, PartitionSpec(shd.DATA, None))
    acc = jax.ShapeDtypeStruct(
        (mesh.shape[shd.DATA], nb, db, db),
        jnp.float32,
        sharding=NamedSharding(mesh, PartitionSpec(shd.DATA)),
    )
    vecs = jax.ShapeDtypeStruct(
        (_rows(config.chunk_rows, mesh), layout.dim), jnp.float32, sharding=rows
    )
    return hessian.local_accumulator(mesh, nb, db), (acc, vecs)


def _rows(n: int, mesh: Mesh) -> int:
    return -(-n // mesh.shape[shd.DATA]) * mesh.shape[shd.DATA]


def score_program(layout: Layout, mesh: Mesh, config: CompileConfig) -> tuple[Any, tuple[Any, ...]]:
    """One scoring step: every query against a [chunk_rows, D] chunk, merged into the top-k."""
    step = scoring.make_chunk_scorer(mesh, config.k, config.preconditioner, True)
    rep, q, k = shd.replicated(mesh), config.num_queries, config.k
    c = _rows(config.chunk_rows, mesh)
    rows = NamedSharding(mesh, PartitionSpec(shd.DATA))
    mat = NamedSharding(mesh, PartitionSpec(shd.DATA, None))
    arrays = (
        {
            'r_inv_sqrt': jax.ShapeDtypeStruct(
                (layout.num_blocks, layout.block_dim, layout.block_dim), jnp.float32, sharding=rep
            )
        }
        if config.preconditioner in ('mixed', 'train')
        else {}
    )
    sds = jax.ShapeDtypeStruct
    args = (
        (
            (
                sds((q, k), jnp.float32, sharding=rep),
                sds((q, k), jnp.int32, sharding=rep),
                sds((q, k), jnp.int32, sharding=rep),
            ),
        ),
        sds((q, layout.dim), jnp.float32, sharding=rep),
        sds((c, layout.dim), jnp.float32, sharding=mat),
        sds((c,), jnp.bool_, sharding=rows),
        sds((c,), jnp.int32, sharding=rows),
        sds((c,), jnp.int32, sharding=rows),
        arrays,
    )
    return step, args


def analyse(compiled: Any, device: Any, hbm_override: int | None = None) -> dict[str, Any]:
    """Per-chip memory and cost of a compiled step."""
    mem = compiled.memory_analysis()
    per_chip = int(
        mem.argument_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hbm = chip_memory(device, hbm_override)
    return {
        'device_kind': device.device_kind,
        'argument_bytes': int(mem.argument_size_in_bytes),
        'temp_bytes': int(mem.temp_size_in_bytes),
        'output_bytes': int(mem.output_size_in_bytes),
        'alias_bytes': int(mem.alias_size_in_bytes),
        'per_chip_bytes': per_chip,
        'hbm_bytes': hbm,
        'fits': None if hbm is None else per_chip <= hbm,
        'flops': float(cost.get('flops', float('nan'))),
        'bytes_accessed': float(cost.get('bytes accessed', float('nan'))),
    }


def _refused(message: str, device: Any, hbm_override: int | None) -> dict[str, Any]:
    """The result of a step the compiler refused for memory (sizes read from its message)."""
    import re

    sizes = [float(x) * 2**30 for x in re.findall(r'\(([0-9.]+)G\)', message)]
    temp = int(sizes[0]) if sizes else None
    hbm = int(sizes[1]) if len(sizes) > 1 else chip_memory(device, hbm_override)
    return {
        'device_kind': device.device_kind,
        'argument_bytes': None,
        'temp_bytes': temp,
        'output_bytes': None,
        'alias_bytes': None,
        'per_chip_bytes': temp,  # at least: the temporaries alone
        'hbm_bytes': hbm,
        'fits': False,
        'flops': float('nan'),
        'bytes_accessed': float('nan'),
        'compiler_error': message,
    }


def compile_job(
    job: str,
    model: nn.Module,
    spec: GradientSpec,
    train_config: train.TrainConfig,
    config: CompileConfig,
) -> dict[str, Any]:
    """AOT-compiles ``job``'s step for ``config.topology``; returns what it needs and costs.

    ``flops`` and ``bytes_accessed`` are per chip per step (XLA's cost analysis of the
    partitioned program); ``per_chip_bytes`` = arguments + temporaries + outputs −
    aliased buffers.

    Raises:
      ValueError: an unknown job or topology, or a mesh that does not fit the devices.
    """
    if job not in JOBS:
        raise ValueError(f'job must be one of {JOBS}, got {job!r}.')
    devices = target_devices(config.topology)
    mesh = shd.make_mesh(config.mesh_axes, devices=devices)
    t0 = time.time()
    program, args, layout = index_program(model, spec, train_config, mesh, config)
    if job == 'train':
        program, args = train_program(model, train_config, mesh, config)
    elif job == 'fit':
        program, args = fit_program(layout, mesh, config)
    elif job == 'score':
        program, args = score_program(layout, mesh, config)
    lowered = program.lower(*args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler itself refuses a program whose temporaries exceed HBM.
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        compiled = None
        refusal = str(e).split('\n')[0]
    seconds = time.time() - t0
    if compiled is None:
        analysis = _refused(refusal, devices[0], config.hbm_bytes)
    else:
        analysis = analyse(compiled, devices[0], config.hbm_bytes)
    out = {
        'job': job,
        'topology': config.topology or f'local:{devices[0].platform}',
        'num_chips': len(devices),
        'mesh': dict(mesh.shape),
        'dim': layout.dim,
        'num_blocks': layout.num_blocks,
        'block_dim': layout.block_dim,
        'compile_seconds': round(seconds, 1),
        **analysis,
    }
    if job in ('index', 'query', 'train'):
        out['examples_per_step'] = config.batch_size
        out['tokens_per_step'] = config.batch_size * config.seq_len
    else:
        out['rows_per_step'] = _rows(config.chunk_rows, mesh)
        if job == 'score':
            out['queries'] = config.num_queries
    logging.info('Compiled %s for %s in %.1fs: %s', job, out['topology'], seconds, out)
    return out


def advice(result: dict[str, Any]) -> str:
    """Why a compiled step does not fit, by how much, and what to change."""
    need, have = result['per_chip_bytes'], result['hbm_bytes']
    gib = lambda b: 'unknown' if b is None else f'{b / 2**30:.2f} GiB'  # noqa: E731
    lines = [
        f'{result["job"]} on {result["topology"]} needs {gib(need)} per chip'
        + (' (temporaries alone, the compiler refused it)' if 'compiler_error' in result else '')
        + f', the chip has {gib(have)}'
    ]
    if need is not None and have:
        lines[0] += f': {gib(need - have)} ({need / have:.2f}x) too much.'
    else:
        lines[0] += ': too much.'
    if result.get('argument_bytes') is not None:
        lines.append(
            f'Arguments {gib(result["argument_bytes"])}, temporaries {gib(result["temp_bytes"])}.'
        )
    if result['job'] in ('index', 'query', 'train'):
        lines.append(
            "Lower the per-chip batch (CompileConfig.batch_size / the job's batch_size), "
            "raise the model axis (mesh_axes (('data', -1), ('model', N))) to shard the "
            'params over more chips, or shorten seq_len; temporaries scale with batch x '
            'seq_len, arguments with params / model axis.'
        )
    else:
        lines.append(
            'Lower chunk_rows (rows per step), num_queries (score in several passes), or '
            'block_dim (R is blocks x block_dim^2 floats on every chip).'
        )
    return ' '.join(lines)


def summary(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of compile results."""
    head = '| job | topology | chips | mesh | per chip / HBM (GiB) | fits | TFLOP per chip-step |'
    rows = [head, '|---|---|---|---|---|---|---|']
    for r in results:
        hbm = r['hbm_bytes'] / 2**30 if r['hbm_bytes'] else float('nan')
        need = r['per_chip_bytes'] / 2**30 if r['per_chip_bytes'] else float('nan')
        rows.append(
            f'| {r["job"]} | {r["topology"]} | {r["num_chips"]} | {r["mesh"]} | '
            f'{need:.2f} / {hbm:.1f} | {r["fits"]} | '
            f'{r["flops"] / 1e12:.3f} |'
        )
    return '\n'.join(rows)


def peak(device_kind: str) -> tuple[float, float, float] | None:
    """(bf16 FLOP/s, HBM bytes, HBM bytes/s) of a chip, if published figures are known."""
    return CHIPS.get(device_kind)


__all__ = [
    'CHIPS',
    'CompileConfig',
    'DoesNotFitError',
    'JOBS',
    'advice',
    'compile_job',
    'peak',
    'summary',
    'target_devices',
]
