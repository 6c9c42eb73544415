"""The mesh, its axis names and the one table mapping logical axes to mesh axes.

Every job builds its mesh with :func:`make_mesh` and states shardings at the ``jit``
boundary with :func:`logical_sharding`. Model code only names *logical* axes
(``'embed'``, ``'mlp'``, ...); :data:`LOGICAL_AXIS_RULES` is the single place that says
which mesh axis each one is split over.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Mesh axis names, stated once.
DATA = 'data'
MODEL = 'model'
MESH_AXES = (DATA, MODEL)

# Logical axis names used by models and jobs.
BATCH = 'batch'
LENGTH = 'length'
EMBED = 'embed'
MLP = 'mlp'
HEADS = 'heads'
KV = 'kv'
VOCAB = 'vocab'
FEATURE = 'feature'

# The one table: logical axis -> mesh axis (None = replicated).
# Parameters are split along `model` on their wide dimension (MLP hidden, attention
# heads); `embed` stays replicated so every Dense needs at most one collective.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    (BATCH, DATA),
    (LENGTH, None),
    (EMBED, None),
    (MLP, MODEL),
    (HEADS, MODEL),
    (KV, None),
    (VOCAB, MODEL),
    (FEATURE, None),
)


def make_mesh(
    axes: Sequence[tuple[str, int]] = ((DATA, -1), (MODEL, 1)),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a mesh from (name, size) pairs; one size may be -1, meaning "the rest".

    Args:
      axes: mesh axes in order, e.g. ``(('data', 4), ('model', 2))``.
      devices: devices to use; all of ``jax.devices()`` by default.

    Returns:
      A mesh whose axes are ``Auto`` (GSPMD propagation), so the sharding of
      intermediates is left to XLA and only the jit boundary is stated.

    Raises:
      ValueError: if the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ValueError(f'At most one mesh axis may be -1, got {axes}.')
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f'{len(devices)} devices do not divide into mesh {axes}.')
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f'Mesh {dict(zip(names, sizes, strict=True))} needs {np.prod(sizes)} devices, '
            f'have {len(devices)}.'
        )
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    try:
        return jax.make_mesh(tuple(sizes), names, axis_types=axis_types, devices=devices)
    except (NotImplementedError, AssertionError, ValueError):
        # jax.make_mesh maps axes onto the physical torus; a shape it cannot map (an axis
        # that splits a physical one, or TPU v4 cores listed one device each) is laid out
        # in device order instead, which is correct but may cost collective bandwidth.
        grid = np.array(devices, dtype=object).reshape(sizes)
        return Mesh(grid, names, axis_types=axis_types)


def logical_sharding(mesh: Mesh, *logical_axes: str | None) -> NamedSharding:
    """The NamedSharding of an array whose dimensions carry these logical axis names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_AXIS_RULES)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(mesh: Mesh, boxed_tree) -> object:
    """Shardings for a tree whose leaves are ``nn.LogicallyPartitioned`` boxes.

    Leaves without a logical annotation are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split along ``data``; all other dimensions replicated."""
    return logical_sharding(mesh, BATCH)
