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
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from trackstar_jax import sharding as shd


def manager(directory: str, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    """A CheckpointManager for ``directory`` (created if missing)."""
    return ocp.CheckpointManager(
        os.path.abspath(directory),
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
    if not os.path.isdir(directory):
        return None
    return manager(directory).latest_step()


def fingerprint(params: Any) -> str:
    """A stable hash of a param tree's names, shapes and values (for index manifests)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.shape).encode() + str(arr.dtype).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def replicated_like(tree: Any, mesh: Mesh) -> Any:
    """Replicated shardings for every leaf of ``tree``."""
    return jax.tree.map(lambda _: shd.replicated(mesh), tree)


def _resolve_step(mngr: ocp.CheckpointManager, step: int | None) -> int:
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f'No checkpoint in {mngr.directory}.')
    return step
