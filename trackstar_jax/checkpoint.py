"""Orbax checkpoints holding params, optimizer state and configs together.

Layout (one Orbax CheckpointManager directory)::

    <dir>/<step>/state    params, opt_state, step  (StandardSave; sharded arrays)
    <dir>/<step>/config   {'model': DecoderConfig dict, 'train': TrainConfig dict, ...}

Orbax commits a step atomically (it writes to a temporary directory and renames), so a
preempted save never looks complete. Restoring takes target shardings, so a checkpoint
written on one mesh restores onto any other.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from trackstar_jax import sharding as shd


def _path(directory: str) -> epath.Path:
    """A local path (made absolute) or a ``gs://`` URL, as Orbax takes it."""
    return epath.Path(directory if '://' in str(directory) else os.path.abspath(directory))


def manager(directory: str, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    """A CheckpointManager for ``directory`` (a path or ``gs://`` URL; created if missing)."""
    return ocp.CheckpointManager(
        _path(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=('state', 'config'),
    )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: dict[str, Any]) -> None:
    """Saves ``state`` (any pytree of arrays) and a JSON ``config`` at ``step``; blocks."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)
        ),
    )
    mngr.wait_until_finished()


def restore_config(directory: str, step: int | None = None) -> dict[str, Any]:
    """The JSON config stored with a checkpoint (latest step by default)."""
    mngr = manager(directory)
    step = _resolve_step(mngr, step)
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


def restore(
    directory: str, abstract_state: Any, step: int | None = None
) -> tuple[Any, dict[str, Any], int]:
    """Restores (state, config, step) onto the shardings given by ``abstract_state``.

    Args:
      directory: the checkpoint manager directory.
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set (e.g.
        from :func:`abstract_like`), with the structure of the saved state.
      step: which step; the latest if None.
    """
    mngr = manager(directory)
    step = _resolve_step(mngr, step)
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()
        ),
    )
    return out['state'], out['config'], step


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or shape structs) placed on ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def latest_step(directory: str) -> int | None:
    """The newest committed step in ``directory``, or None if there is none."""
    if not _path(directory).is_dir():
        return None
    return manager(directory).latest_step()


def _bits(x: jax.Array) -> jax.Array:
    """The leaf's bit pattern as a flat uint32 vector (8-byte values as two words)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def param_digest(params: Any) -> Any:
    """Two uint32 words per leaf, computed where the params live (no host copy).

    The words are wrapping integer sums of each value's bits, unweighted and weighted by
    an odd multiplier of its position: integer addition is exact and associative, so
    the digest is the same whatever the sharding, mesh or device count, and a change of
    one bit in one value changes it.
    """

    def leaf(x):
        bits = _bits(x)
        pos = jnp.arange(bits.shape[0], dtype=jnp.uint32)
        return jnp.stack([jnp.sum(bits), jnp.sum(bits * (pos * jnp.uint32(2654435761) + 1))])

    return jax.tree.map(leaf, params)


def fingerprint(params: Any) -> str:
    """A stable hash of a param tree's names, shapes, dtypes and values (index manifests).

    Only :func:`param_digest`'s few words per leaf leave the devices, so fingerprinting
    an 8B model costs one pass over its (sharded) params, not a copy of them to the host.
    """
    digest = jax.device_get(param_digest(params))
    h = hashlib.sha256()
    for (path, leaf), words in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(digest), strict=True
    ):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(tuple(leaf.shape)).encode() + str(leaf.dtype).encode())
        h.update(np.asarray(words, np.uint32).tobytes())
    return h.hexdigest()[:16]


def replicated_like(tree: Any, mesh: Mesh) -> Any:
    """Replicated shardings for every leaf of ``tree``."""
    return jax.tree.map(lambda _: shd.replicated(mesh), tree)


def _resolve_step(mngr: ocp.CheckpointManager, step: int | None) -> int:
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f'No checkpoint in {mngr.directory}.')
    return step
