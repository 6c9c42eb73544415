"""Turning token lists into batches that follow the loss convention, per host.

:class:`DataLayout` is the one object that says which rows of a global batch this
process reads; every job asks it rather than computing offsets itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from trackstar_jax import sharding as shd


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """Which rows of a global batch this process feeds.

    Attributes:
      global_batch_size: rows per global batch.
      process_index: this process.
      process_count: all processes.
      row_start: first global row this process feeds.
      row_stop: one past the last.
    """

    global_batch_size: int
    process_index: int
    process_count: int
    row_start: int
    row_stop: int

    @property
    def local_rows(self) -> slice:
        """The slice of a global batch this process holds."""
        return slice(self.row_start, self.row_stop)

    @property
    def local_batch_size(self) -> int:
        """Rows per step fed by this process."""
        return self.row_stop - self.row_start

    @classmethod
    def for_mesh(cls, mesh: Mesh, global_batch_size: int) -> DataLayout:
        """The layout implied by splitting the batch along the mesh's data axis.

        Raises:
          ValueError: if the batch does not divide over the data axis, or this process's
            devices hold a non-contiguous set of rows.
        """
        data_size = mesh.shape[shd.DATA]
        if global_batch_size % data_size:
            raise ValueError(
                f'Global batch {global_batch_size} does not divide over '
                f'data axis of size {data_size}.'
            )
        index_map = shd.batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
        rows = sorted(
            {(s[0].start or 0, s[0].stop or global_batch_size) for s in index_map.values()}
        )
        start, stop = rows[0][0], rows[-1][1]
        if sum(b - a for a, b in rows) != stop - start:
            raise ValueError(
                f'Process {jax.process_index()} holds non-contiguous rows {rows}; '
                'order the mesh so each host owns a contiguous data slice.'
            )
        return cls(global_batch_size, jax.process_index(), jax.process_count(), start, stop)


def pad_example(
    tokens: Sequence[int], seq_len: int, pad_id: int = 0, prompt_len: int = 0
) -> dict[str, np.ndarray]:
    """One example as {'tokens', 'loss_mask'}, right-padded or truncated to ``seq_len``.

    Args:
      tokens: the token ids.
      seq_len: output length.
      pad_id: padding id (mask 0).
      prompt_len: the first ``prompt_len`` tokens are context only; the rest are targets.
        0 makes every token after the first a target (a training example).
    """
    tokens = list(tokens)[:seq_len]
    out = np.full((seq_len,), pad_id, np.int32)
    out[: len(tokens)] = tokens
    mask = np.zeros((seq_len,), np.float32)
    mask[max(prompt_len, 1) : len(tokens)] = 1.0
    return {'tokens': out, 'loss_mask': mask}


def stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples into a batch (only 'tokens' and 'loss_mask')."""
    return {k: np.stack([e[k] for e in examples]) for k in ('tokens', 'loss_mask')}


def pack(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenates documents (each followed by EOS) and cuts them into [N, seq_len] rows.

    Packing is how LMs are pretrained (T5X, the paper's C4 runs); the unit of attribution
    stays the document, featurised on its own.
    """
    stream = np.fromiter((t for doc in token_lists for t in (*doc, eos_id)), np.int32)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f'Corpus has {len(stream)} tokens, fewer than one row of {seq_len}.')
    return stream[: n * seq_len].reshape(n, seq_len)


def training_batches(
    rows: np.ndarray,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    layout: DataLayout | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless deterministic batches of packed rows; step s is the same in any run.

    Each epoch is a fresh permutation of the rows seeded by (seed, epoch), so a run
    resumed at ``start_step`` continues with exactly the batches it would have seen.

    Args:
      rows: packed token rows [N, T].
      batch_size: global batch size.
      seed: data order seed.
      start_step: first step to produce.
      layout: if given, only this process's rows of each global batch are yielded.
    """
    n = len(rows)
    if n < batch_size:
        raise ValueError(f'{n} rows cannot fill a batch of {batch_size}.')
    mask = np.ones(rows.shape[1], np.float32)
    mask[0] = 0.0
    step = start_step
    while True:
        idx = batch_rows(n, batch_size, seed, step)
        if layout is not None:
            idx = idx[layout.local_rows]
        yield {'tokens': rows[idx], 'loss_mask': np.broadcast_to(mask, (len(idx), len(mask)))}
        step += 1


def batch_rows(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The row numbers :func:`training_batches` puts in the global batch of ``step``."""
    epoch, k = divmod(step, n // batch_size)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[k * batch_size : (k + 1) * batch_size]
