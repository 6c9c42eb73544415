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
from absl import logging
from etils import epath
from jax.sharding import Mesh

from trackstar_jax import sharding as shd


def _path(directory: str) -> epath.Path:
    """A local path (made absolute) or a ``gs://`` URL, as Orbax takes it."""
    return epath.Path(directory if '://' in str(directory) else os.path.abspath(directory))


STATE_FINGERPRINT = 'state_fingerprint'


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be read back (files missing, cut or changed)."""


def manager(
    directory: str, max_to_keep: int | None = 3, create: bool = True
) -> ocp.CheckpointManager:
    """A CheckpointManager for ``directory`` (a path or ``gs://`` URL).

    With ``create`` the directory is made if missing (writers); readers pass False and
    get a FileNotFoundError that says how to make a checkpoint.
    """
    if not create and not _path(directory).is_dir():
        raise FileNotFoundError(_no_checkpoint(directory))
    return ocp.CheckpointManager(
        _path(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
        item_names=('state', 'config'),
    )


def _no_checkpoint(directory: str) -> str:
    return (
        f'No checkpoint in {directory}. Train one (launch/train.py --workdir=DIR writes '
        f'DIR/checkpoints), or import one (launch/import_checkpoint.py --output={directory}), '
        'or fix the checkpoint_dir setting.'
    )


def _detail(e: Exception) -> str:
    # TensorStore appends a repr of a bound method and a spec dump: keep what precedes.
    return str(e).split('See full TensorStore details')[0].strip()[:300]


def _restore(mngr: ocp.CheckpointManager, step: int, args: Any) -> Any:
    """``mngr.restore`` with Orbax's errors (often a repr of a bound method or a tree
    dump) turned into one that names the checkpoint, the step and what to do."""
    try:
        return mngr.restore(step, args=args)
    except Exception as e:
        others = [s for s in mngr.all_steps() if s != step]
        raise CheckpointError(
            f'Checkpoint {mngr.directory} step {step} cannot be read: files of it are '
            f'missing, cut short or changed, or it holds another model than expected '
            f'({type(e).__name__}: {_detail(e)}). '
            + (
                f'Other steps here: {sorted(others)} (pass one explicitly).'
                if others
                else 'No other step is here: re-create the checkpoint.'
            )
        ) from e


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: dict[str, Any]) -> None:
    """Saves ``state`` (any pytree of arrays) and a JSON ``config`` at ``step``; blocks.

    The config also records the state's :func:`fingerprint` (Orbax stores no checksum of
    array data: a changed byte would restore silently as another number), which
    :func:`restore` verifies.
    """
    config = {**config, STATE_FINGERPRINT: fingerprint(state)}
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)
        ),
    )
    mngr.wait_until_finished()


def restore_config(directory: str, step: int | None = None) -> dict[str, Any]:
    """The JSON config stored with a checkpoint (latest step by default)."""
    mngr = manager(directory, create=False)
    step = _resolve_step(mngr, step)
    config = _restore(mngr, step, ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    return {k: v for k, v in config.items() if k != STATE_FINGERPRINT}


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
    mngr = manager(directory, create=False)
    step = _resolve_step(mngr, step)
    out = _restore(
        mngr,
        step,
        ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()
        ),
    )
    config = dict(out['config'])
    want = config.pop(STATE_FINGERPRINT, None)  # handed back as it was saved
    if want is None:
        logging.warning(
            'Checkpoint %s step %d has no state fingerprint (saved by an older version): '
            'restored without verifying its arrays.',
            mngr.directory,
            step,
        )
    elif fingerprint(out['state']) != want:
        raise CheckpointError(
            f'Checkpoint {mngr.directory} step {step}: the restored arrays do not match the '
            'fingerprint written at save (a file was changed after it was written). '
            f'Steps here: {sorted(mngr.all_steps())}.'
        )
    return out['state'], config, step


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` (arrays or shape structs) placed on ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def latest_step(directory: str) -> int | None:
    """The newest committed step in ``directory``, or None if there is none."""
    if not _path(directory).is_dir():
        return None
    return manager(directory, create=False).latest_step()


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
        raise FileNotFoundError(_no_checkpoint(str(mngr.directory)))
    if step not in mngr.all_steps():
        raise FileNotFoundError(
            f'No step {step} in {mngr.directory}; its steps are {sorted(mngr.all_steps())}.'
        )
    return step
