"""Support samples of next-word prediction: the representer decomposition of the LM head.

At a stationary point of −(1/N) Σ_i log p(y_i | x_i) + λ‖θ‖², every row of the head is

    θ_v = 1/(2Nλ) Σ_i α_{i,v} φ(x_i),     α_{i,v} = 1(y_i = v) − p(v | x_i)

with φ the vector the head multiplies (``logits = φ Wᵀ``). A training token i promotes
predicting v after a context x′ by α_{i,v} ⟨φ(x_i), φ(x′)⟩ / (2Nλ); its support sets are
S_v = {i : |α_{i,v}| ≥ τ}, Type-1 (y_i = v, low confidence: promote v) and Type-2
(y_i ≠ v, confident in v: deter it). ("On Support Samples of Next Word Prediction",
Li, Du et al., §2.)

Featurization writes a *token index* (:mod:`trackstar_jax.token_index`: its layout, the
by-token CSR, support sets, contributions and representer scores; its names are
re-exported here, so ``support.TokenIndex`` and the rest work from one import).

For tied-embedding models the head is the token embedding: DecoderLM's logits are
E x / √d, so φ = x / √d and θ_v = E_v; LlamaLM ties E x (φ = x) or has its own ``lm_head``
(θ_v its column). :func:`head_of` gives (W, φ-scale) and the tests check φ Wᵀ = logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trackstar_jax import checkpoint, pipeline
from trackstar_jax import index as index_lib
from trackstar_jax import sharding as shd
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.index import Index
from trackstar_jax.token_index import (  # noqa: F401  (re-exported: the feature's one API)
    KIND,
    Contributions,
    SupportSet,
    TokenIndex,
    build_by_token,
    describe,
    load_by_token,
    representer_scores,
    split_row_id,
    summary,
    target_positions,
    token_context,
)


@dataclasses.dataclass(frozen=True)
class SupportConfig:
    """How a token index is built.

    Attributes:
      seq_len: the longest example (examples are padded per batch to their longest).
      chunk_rows: target tokens per storage chunk (the commit unit).
      batch_size: examples per forward pass (a multiple of the mesh's data axis).
      alpha_floor: keep α_{i,v} of every v with p(v | x_i) ≥ this; at most 1 / floor
        such v, so min(⌊1 / floor⌋, V − 1) slots per row hold them all.
      projection_dim: store φ projected to this many dimensions by a fixed Gaussian
        matrix (entries N(0, 1/k), seeded): inner products are preserved in
        expectation. None stores φ itself (exact).
      projection_seed: the projection's seed.
      dtype: storage dtype of φ ('float32' or 'bfloat16').
    """

    seq_len: int = 128
    chunk_rows: int = 4096
    batch_size: int = 16
    alpha_floor: float = 0.05
    projection_dim: int | None = None
    projection_seed: int = 0
    dtype: str = 'float32'

    def slots(self, vocab_size: int) -> int:
        """Alternatives kept per row: ⌊1 / alpha_floor⌋, at most V − 1."""
        return max(1, min(int(math.floor(1.0 / self.alpha_floor + 1e-9)), vocab_size - 1))

    def __post_init__(self):
        if not 0.0 < self.alpha_floor <= 0.5:
            # Above 0.5 a support set at the paper's τ = 0.5 would not be exact.
            raise ValueError(f'alpha_floor must be in (0, 0.5], got {self.alpha_floor}.')
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f'projection_dim must be >= 1 or None, got {self.projection_dim}.')


# ----------------------------------------------------------------------------- the head


def head_of(model: nn.Module, params: Any) -> tuple[np.ndarray, float]:
    """(W [V, d] float32, s): logits = (s · x) Wᵀ for x the head's input; φ = s · x.

    Raises:
      TypeError: for a model whose head this module does not know.
    """
    params = nn.unbox(params)
    name = type(model).__name__
    if name == 'DecoderLM':  # tied, logits = E x / sqrt(d)
        w = params['embedding']['embedding']
        return np.asarray(w, np.float32), 1.0 / math.sqrt(model.config.d_model)
    if name == 'LlamaLM':
        if model.config.tie_embeddings:
            return np.asarray(params['embedding']['embedding'], np.float32), 1.0
        return np.asarray(params['lm_head']['kernel'], np.float32).T, 1.0
    raise TypeError(
        f'No known LM head for {name}: support samples need logits = φ Wᵀ (DecoderLM, LlamaLM).'
    )


def head_inputs(model: nn.Module, params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x [B, T, d] float32, the head's input at every position; logits [B, T, V])."""
    captured: list[jax.Array] = []

    def grab(next_fun, args, kwargs, context):
        is_head = context.method_name == 'attend' or (
            isinstance(context.module, nn.Dense) and context.module.name == 'lm_head'
        )
        if is_head and context.method_name in ('attend', '__call__'):
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        logits = model.apply({'params': params}, tokens)
    if len(captured) != 1:
        raise TypeError(f'Expected one LM head call, saw {len(captured)}.')
    return captured[0].astype(jnp.float32), logits.astype(jnp.float32)


def projection_matrix(dim: int, config: SupportConfig) -> np.ndarray | None:
    """The fixed [d, k] Gaussian projection (entries N(0, 1/k)), or None."""
    if config.projection_dim is None:
        return None
    rng = np.random.default_rng(config.projection_seed)
    k = config.projection_dim
    return (rng.standard_normal((dim, k)) / math.sqrt(k)).astype(np.float32)


def token_rows(
    phi: jax.Array, logits: jax.Array, tokens: jax.Array, mask: jax.Array, slots: int, floor: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row contents of every position: (φ [B, T, k], target [B, T, 1+m], alpha [B, T, 1+m]).

    Position t is a target when mask[t] = 1; its context is tokens[:t], so its φ and p
    come from position t − 1 of the model's outputs. Other positions are zero / −1.
    """
    is_target = mask > 0
    shift = lambda a: jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, :-1]], axis=1)  # noqa: E731
    phi_t = shift(phi)
    probs = jax.nn.softmax(shift(logits), axis=-1)  # [B, T, V] float32
    y = tokens.astype(jnp.int32)
    p_y = jnp.take_along_axis(probs, y[..., None], axis=-1)[..., 0]
    others = jnp.where(jax.nn.one_hot(y, probs.shape[-1], dtype=bool), -1.0, probs)
    p_alt, v_alt = jax.lax.top_k(others, slots)
    kept = p_alt >= floor
    target = jnp.concatenate([y[..., None], jnp.where(kept, v_alt, -1)], axis=-1)
    alpha = jnp.concatenate([(1.0 - p_y)[..., None], jnp.where(kept, -p_alt, 0.0)], axis=-1)
    target = jnp.where(is_target[..., None], target, -1)
    alpha = jnp.where(is_target[..., None], alpha, 0.0)
    phi_t = jnp.where(is_target[..., None], phi_t, 0.0)
    return phi_t, target.astype(jnp.int32), alpha


@functools.cache
def _row_program(model: nn.Module, mesh: Mesh, scale: float, slots: int, floor: float):
    rows = NamedSharding(mesh, PartitionSpec(shd.DATA))
    rep = shd.replicated(mesh)

    def run(params, proj, tokens, mask):
        x, logits = head_inputs(model, params, tokens)
        phi = x * scale
        if proj is not None:
            phi = jnp.einsum('btd,dk->btk', phi, proj, precision=jax.lax.Precision.HIGHEST)
        return token_rows(phi, logits, tokens, mask, slots, floor)

    return jax.jit(run, in_shardings=(rep, rep, rows, rows), out_shardings=(rows, rows, rows))


# ----------------------------------------------------------------------------- writing


def manifest_for(
    model: nn.Module, params: Any, config: SupportConfig, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a token index's rows are (the storage adds its own keys). The parameters'
    fingerprint is part of it: a resume at another checkpoint is refused, never mixed."""
    w, scale = head_of(model, params)
    return {
        'kind': KIND,
        'model': type(model).__name__,
        'params_fingerprint': checkpoint.fingerprint(params),
        'model_config': getattr(model.config, 'to_dict', lambda: {})(),
        'seq_len': config.seq_len,
        'vocab_size': int(w.shape[0]),
        'phi_dim': int(w.shape[1]),
        'phi_scale': scale,
        'alpha_floor': config.alpha_floor,
        'slots': config.slots(int(w.shape[0])),
        'projection_dim': config.projection_dim,
        'projection_seed': config.projection_seed if config.projection_dim else None,
        **dict(extra or {}),
    }


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where each example's target tokens sit among the index rows.

    Attributes:
      ids: row ids, ``<example>#<position>`` for every target token, in example order.
      starts: [E + 1] first row of each example (and the total at the end).
    """

    ids: list[str]
    starts: np.ndarray

    @classmethod
    def of(cls, source: examples_lib.ExampleSource, block: int = 4096) -> TokenLayout:
        """Made by reading the examples' masks once (in blocks of ``block``)."""
        ids: list[str] = []
        counts = []
        for a in range(0, len(source), block):
            for ex in source.rows(a, a + block):
                pos = target_positions(ex)
                ids.extend(f'{ex["id"]}#{t}' for t in pos)
                counts.append(len(pos))
        return cls(ids, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))

    def examples_of(self, start: int, stop: int) -> tuple[int, int]:
        """[first, last) examples holding rows [start, stop)."""
        first = int(np.searchsorted(self.starts, start, side='right')) - 1
        last = int(np.searchsorted(self.starts, stop, side='left'))
        return first, max(last, first + 1)


def host_params(params: Any) -> Any:
    """Unboxed parameters every process can use on its own devices: leaves laid out over
    a multi-process mesh are gathered to host arrays (a collective, so every process calls
    it); local leaves are kept as they are."""
    params = nn.unbox(params)

    def local(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return multihost_utils.process_allgather(a, tiled=True)
        return a

    return jax.tree_util.tree_map(local, params)


def featurize_tokens(
    model: nn.Module,
    params: Any,
    examples: Sequence[Mapping[str, Any]] | examples_lib.ExampleSource,
    url: str,
    config: SupportConfig = SupportConfig(),
    *,
    mesh: Mesh | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    fault_hook: Any = None,
) -> Index:
    """Writes the token index of ``examples`` at ``url`` (resumes an unfinished one), then
    its by-token CSR. One row per target token; a chunk is ``chunk_rows`` consecutive
    rows, computed from the examples that hold them (an example cut by a chunk boundary
    is run for both chunks); the forward passes are sharded along ``data``.

    In a job of P processes, process p computes and writes chunks p, p + P, ... on its
    own devices (no collective: the chunks are independent), process 0 creates the
    index first and builds the CSR after every process has committed; every process
    calls this with the same arguments and gets the finished index.

    Args:
      model, params: the model and its parameters (boxed or not).
      examples: {'id', 'tokens', 'loss_mask'} or an ``ExampleSource``.
      url: the token index URL.
      config: sequence length, chunk and batch sizes, α floor, projection, dtype.
      mesh: where the forward passes run; by default all of this process's devices
        along ``data``. In a multi-process job it must hold only this process's devices.
      manifest_extra: more manifest entries (checkpoint path, step, ...).
      fault_hook: test hook, see :meth:`index.IndexWriter.write_chunk`.

    Returns:
      The finished token index.

    Raises:
      ValueError: on a bad batch size, no target tokens, or examples that changed
        under a resume.
    """
    procs, me = jax.process_count(), jax.process_index()
    if mesh is None:
        mesh = shd.make_mesh(((shd.DATA, -1), (shd.MODEL, 1)), devices=jax.local_devices())
    elif procs > 1 and any(d.process_index != me for d in mesh.devices.flat):
        raise ValueError(
            'In a multi-process job featurize_tokens runs each process on its own devices: '
            'pass a mesh of jax.local_devices() (or none).'
        )
    n_data = mesh.shape[shd.DATA]
    if config.batch_size % n_data:
        raise ValueError(
            f'batch_size {config.batch_size} is not a multiple of the data axis ({n_data}).'
        )
    params = host_params(params)
    source = examples_lib.as_source(examples)
    layout = TokenLayout.of(source)
    if not layout.ids:
        raise ValueError('The examples have no target tokens (every loss_mask is 0).')
    w, scale = head_of(model, params)
    proj = projection_matrix(w.shape[1], config)
    slots = config.slots(w.shape[0])
    create = functools.partial(
        index_lib.create,
        url,
        manifest_for(model, params, config, manifest_extra),
        layout.ids,
        dim=config.projection_dim or w.shape[1],
        dtype=config.dtype,
        chunk_rows=config.chunk_rows,
        extras={'target': (1 + slots, 'int32'), 'alpha': (1 + slots, 'float32')},
    )
    # Process 0 creates the index (or re-opens it to resume); the others open it after.
    writer = create() if me == 0 else None
    if procs > 1:
        multihost_utils.sync_global_devices('token_index_created')
    if writer is None:
        writer = create()
    program = _row_program(model, mesh, scale, slots, config.alpha_floor)
    rep = shd.replicated(mesh)
    row_sharding = NamedSharding(mesh, PartitionSpec(shd.DATA))
    params_d = jax.device_put(params, rep)
    proj_d = None if proj is None else jax.device_put(proj, rep)

    def chunk_examples(chunk):
        return source.rows(*layout.examples_of(*writer.rows(chunk)))

    markers = writer.markers()
    mine_all = range(me, writer.num_chunks, procs)
    for chunk, marker in markers.items():  # resume trusts content, not markers
        if chunk % procs != me:
            continue
        if marker.get('input') != pipeline.input_digest(chunk_examples(chunk)):
            raise ValueError(
                f'Token index {url}: the examples of chunk {chunk} changed since it was '
                'written (corpus, tokenizer or seq_len): use a new path or delete the index.'
            )
    todo = [c for c in mine_all if c not in markers]
    logging.info('Token index %s: %d target tokens of %d examples, %d chunks to write.',
                 url, len(layout.ids), len(source), len(todo))  # fmt: skip
    t0 = time.time()
    for i, chunk in enumerate(todo):
        start, stop = writer.rows(chunk)
        first, _ = layout.examples_of(start, stop)
        mine = chunk_examples(chunk)
        parts = [[], [], []]
        for b in range(0, len(mine), config.batch_size):
            group = mine[b : b + config.batch_size]
            longest = max(len(ex['tokens']) for ex in group)
            length = examples_lib.bucket_length(longest, config.seq_len)
            batch = examples_lib.pad_batch(group, config.batch_size, length)
            # Placed explicitly: in a multi-process job jit takes no sharded numpy input.
            tokens, mask = jax.device_put((batch['tokens'], batch['loss_mask']), row_sharding)
            outs = program(params_d, proj_d, tokens, mask)
            for part, out in zip(parts, outs, strict=True):
                out = np.asarray(out)
                part.extend(out[e, target_positions(ex)] for e, ex in enumerate(group))
        phi, target, alpha = (np.concatenate(p) for p in parts)
        lo = start - int(layout.starts[first])  # the chunk's rows within its examples
        phi, target, alpha = (a[lo : lo + stop - start] for a in (phi, target, alpha))
        writer.write_chunk(
            chunk,
            phi,
            np.ones(stop - start, np.float32),
            fault_hook=fault_hook,
            input_digest=pipeline.input_digest(mine),
            extras={'target': target, 'alpha': alpha},
        )
        if i % 16 == 0 or i + 1 == len(todo):
            rate = (i + 1) * config.chunk_rows / max(time.time() - t0, 1e-9)
            left = (len(todo) - i - 1) * config.chunk_rows / rate
            logging.info('Token index %s: chunk %d/%d, %.0f tokens/s, ETA %.0fs', url, i + 1,
                         len(todo), rate, left)  # fmt: skip
    if procs > 1:
        multihost_utils.sync_global_devices('token_index_written')
    idx = writer.finish()
    if me == 0:
        build_by_token(idx)
    if procs > 1:
        multihost_utils.sync_global_devices('token_index_by_token')
    return idx


def prompt_features(
    model: nn.Module,
    params: Any,
    prompts: Sequence[Sequence[int]],
    projection: np.ndarray | None = None,
) -> np.ndarray:
    """φ(x′) of each prompt (token ids, predicting the token after the last): [n, d]."""
    params = nn.unbox(params)
    _, scale = head_of(model, params)
    out = []
    for p in prompts:
        tokens = jnp.asarray(np.asarray(p, np.int32)[None])
        x, _ = head_inputs(model, params, tokens)
        phi = np.asarray(x[0, -1]) * scale
        out.append(phi if projection is None else phi @ projection)
    return np.stack(out).astype(np.float32)


def completion_features(
    model: nn.Module, params: Any, example: Mapping[str, Any], projection: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(φ(x′_t) [n, d], v_t [n]) of an example's target tokens: the head input before each."""
    params = nn.unbox(params)
    _, scale = head_of(model, params)
    toks = np.asarray(example['tokens'], np.int32)
    x, _ = head_inputs(model, params, jnp.asarray(toks[None]))
    pos = target_positions(example)
    phi = np.asarray(x[0])[pos - 1] * scale
    return (phi if projection is None else phi @ projection).astype(np.float32), toks[pos]
