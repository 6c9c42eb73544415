"""The one attribution pipeline: featurize → precondition → normalise → score.

Every method is a configuration of this path (the paper's Table 1 rows, TRAK-style,
TrackStar): a :class:`grads.GradientSpec` (output fn, optimizer correction, projection)
picks the features, a registered preconditioner kind (:mod:`preconditioners`) picks M,
and ``unit_norm`` picks normalisation. The jobs (``jobs/attribution.py``), the
evaluation (``eval/fact_tracing.py``), the benchmarks and the Python API all call the
three functions here; nothing else featurizes, fits or scores::

    train = pipeline.featurize(featurizer, corpus_examples, 'runs/x/train_index')
    queries = pipeline.featurize(featurizer, query_examples, 'runs/x/query_index',
                                 IndexConfig(seq_len=64))
    m = pipeline.fit(train, queries, FitConfig(preconditioner='mixed'))
    result = pipeline.score(queries, train, m, ScoreConfig(k=10))

Indices are addressed by URL (a path, ``gs://``, ``memory://``; see :mod:`index`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from trackstar_jax import checkpoint, scoring, streaming
from trackstar_jax import index as index_lib
from trackstar_jax import preconditioners as precond_lib
from trackstar_jax import train_index as train_index_lib
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.grads import Featurizer
from trackstar_jax.index import Index
from trackstar_jax.preconditioners import FitConfig, Preconditioner
from trackstar_jax.scoring import ScoreConfig, ScoreResult

__all__ = [
    'FitConfig',
    'IndexConfig',
    'Method',
    'Preconditioner',
    'ScoreConfig',
    'ScoreResult',
    'featurize',
    'fit',
    'open_index',
    'run_method',
    'score',
    'score_tracin',
]


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How examples are featurized into an index.

    Attributes:
      seq_len: padded length (examples longer than this are refused).
      batch_size: examples per kernel call per process (divides chunk_rows).
      chunk_rows: rows per storage chunk and commit unit.
      dtype: storage dtype, 'float32' or 'bfloat16'.
    """

    seq_len: int = 128
    batch_size: int = 32
    chunk_rows: int = 256
    dtype: str = 'float32'

    def __post_init__(self):
        if self.chunk_rows % self.batch_size:
            raise ValueError(
                f'batch_size {self.batch_size} must divide chunk_rows {self.chunk_rows}.'
            )
        if self.dtype not in index_lib.DTYPES:
            raise ValueError(f'dtype must be one of {sorted(index_lib.DTYPES)}.')


METHOD_KINDS = ('gradient', 'bm25', 'dense', 'gold', 'representer')


@dataclasses.dataclass(frozen=True)
class Method:
    """One attribution method: a row of the evaluation table.

    Attributes:
      name: row label.
      kind: 'gradient' (this pipeline), 'representer' (representer points over a
        token index, :mod:`trackstar_jax.support`), or the evaluation's 'bm25',
        'dense' and 'gold' (tail-patch the entailing examples).
      correction: optimizer correction of gradient methods ('adafactor', 'adam', 'none').
      output_fn: 'loss', 'margin', 'logit' or 'trak'.
      preconditioner: a registered preconditioner kind ('none', 'diagonal', 'train',
        'mixed', ...).
      unit_norm: normalise both sides.
    """

    name: str
    kind: str = 'gradient'
    correction: str = 'adafactor'
    output_fn: str = 'loss'
    preconditioner: str = 'mixed'
    unit_norm: bool = True

    def __post_init__(self):
        if self.kind not in METHOD_KINDS:
            raise ValueError(f'Method {self.name}: kind must be one of {METHOD_KINDS}.')
        if self.kind == 'gradient':
            precond_lib.get(self.preconditioner)  # raises, naming the registered kinds


def corrections_fingerprint(corrections: Mapping[str, Any]) -> str:
    """Hash of correction arrays (V) by path: a different V gives different vectors."""
    h = hashlib.sha256()
    for path in sorted(corrections):
        c = corrections[path]
        h.update(f'{path}:{c.kind}'.encode())
        for a in (c.row, c.col, c.full):
            if a is not None:
                h.update(np.ascontiguousarray(np.asarray(a, np.float32)).tobytes())
    return h.hexdigest()[:16]


def correction_fingerprint(featurizer: Featurizer) -> str:
    """Hash of the featurizer's correction arrays (see :func:`corrections_fingerprint`)."""
    return corrections_fingerprint(featurizer.corrections)


def manifest_for(
    featurizer: Featurizer, seq_len: int, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What the vectors of ``featurizer`` are: the manifest handed to the storage."""
    return {
        'model_fingerprint': checkpoint.fingerprint(featurizer.params),
        'correction_fingerprint': correction_fingerprint(featurizer),
        'spec': featurizer.spec.to_dict(),
        'layout': featurizer.layout.to_dict(),
        'correction': featurizer.spec.correction,
        'output_fn': featurizer.spec.output_fn,
        'projection_seed': featurizer.spec.seed,
        'seq_len': seq_len,
        **(dict(extra) if extra else {}),
    }


def input_digest(examples: Sequence[Mapping[str, Any]]) -> str:
    """A hash of examples' ids, tokens and masks (what a chunk's rows are made from)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(str(ex['id']).encode() + b'\0')
        h.update(np.asarray(ex['tokens'], np.int32).tobytes())
        h.update(np.asarray(ex['loss_mask'], np.float32).tobytes())
    return h.hexdigest()[:24]


def open_index(index: Index | str) -> Index:
    """An index handle from a handle or a URL."""
    return index if isinstance(index, Index) else index_lib.open(index)


def featurize(
    featurizer: Featurizer,
    examples: Sequence[Mapping[str, Any]] | examples_lib.ExampleSource,
    url: str,
    config: IndexConfig = IndexConfig(),
    *,
    manifest_extra: Mapping[str, Any] | None = None,
    fault_hook: Callable[[str, int], None] | None = None,
) -> Index:
    """Featurizes ``examples`` into an index at ``url``; resumes an unfinished one.

    In a job of P processes, step s featurizes chunks s*P .. s*P + P - 1, process p
    computing and writing only chunk s*P + p (its rows are its slice of the global
    batch); every process calls this with the same arguments.

    Args:
      featurizer: the kernel (its mesh decides the sharding).
      examples: {'id', 'tokens', 'loss_mask'} (equal lengths <= config.seq_len), or an
        ``ExampleSource`` that makes them on demand: each process then builds only the
        rows it featurizes.
      url: the index URL.
      config: sequence length, batch, chunk and storage dtype.
      manifest_extra: more manifest entries (checkpoint path, step, source, ...).
      fault_hook: test hook, see :meth:`index.IndexWriter.write_chunk`.

    Returns:
      The finished index.
    """
    max_len = getattr(getattr(featurizer.model, 'config', None), 'max_len', None)
    if max_len is not None and config.seq_len > max_len:
        # Checked before anything is written, so a corrected re-run finds no index.
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_len {max_len}: set "
            f'IndexConfig.seq_len <= {max_len}.'
        )
    source = examples_lib.as_source(examples)
    ids = source.ids
    manifest = manifest_for(featurizer, config.seq_len, manifest_extra)
    create = dict(dim=featurizer.dim, dtype=config.dtype, chunk_rows=config.chunk_rows)
    procs, me = jax.process_count(), jax.process_index()
    # Process 0 creates the index (or re-opens it to resume); the others open it after.
    writer = index_lib.create(url, manifest, ids, **create) if me == 0 else None
    if procs > 1:
        multihost_utils.sync_global_devices('index_created')
    if writer is None:
        writer = index_lib.create(url, manifest, ids, **create)

    chunk_rows, n = config.chunk_rows, len(ids)
    num_steps = math.ceil(writer.num_chunks / procs)
    markers = writer.markers()
    done = np.ones(num_steps * procs, bool)
    done[: writer.num_chunks] = [c in markers for c in range(writer.num_chunks)]
    # Resume trusts content, not markers: this process's committed chunks must have been
    # made from the same examples (ids, tokens, masks) it is given now.
    for chunk in range(me, writer.num_chunks, procs):
        if chunk in markers and markers[chunk].get('input') is not None:
            start, stop = writer.rows(chunk)
            if input_digest(source.rows(start, stop)) != markers[chunk]['input']:
                raise ValueError(
                    f'Index {url}: the examples of chunk {chunk} (rows [{start}, {stop}), '
                    f'first id {ids[start]!r}) changed since it was written. The corpus, '
                    'tokenizer or seq_len changed under a resume: use a new path, or delete '
                    'the index to rebuild it.'
                )
    if procs > 1:  # every process must run the same steps (the kernel is SPMD)
        done = multihost_utils.broadcast_one_to_all(done)
    todo = [s for s in range(num_steps) if not done[s * procs : (s + 1) * procs].all()]
    logging.info(
        'Index %s: %d examples, D=%d, %d chunks of %d; %d chunks already done.',
        url,
        n,
        featurizer.dim,
        writer.num_chunks,
        chunk_rows,
        int(done[: writer.num_chunks].sum()),
    )
    t0, rows_done = time.time(), 0
    # Chunk i is written by a background thread while chunk i + 1 is computed; at most
    # one write is in flight, and its error (or a fault hook's) surfaces at the next
    # chunk. A crash loses at most the uncommitted chunk, which a resume recomputes.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for i, step in enumerate(todo):
            chunk = step * procs + me
            start, stop = writer.rows(chunk) if chunk < writer.num_chunks else (n, n)
            mine = source.rows(start, stop)
            length = config.seq_len
            if procs == 1:
                # Only to the chunk's longest example: short examples cost their length.
                longest = max([len(ex['tokens']) for ex in mine] or [1])
                length = examples_lib.bucket_length(longest, config.seq_len)
            batch = examples_lib.pad_batch(mine, chunk_rows, length)
            out = np.concatenate(
                [
                    featurizer.local({k: v[b : b + config.batch_size] for k, v in batch.items()})
                    for b in range(0, chunk_rows, config.batch_size)
                ]
            )
            if pending is not None:
                pending.result()
                pending = None
            if chunk < writer.num_chunks and not done[chunk]:
                valid = stop - start
                finite = np.isfinite(out[:valid]).all(axis=1)
                if not finite.all():
                    bad = [ids[start + i] for i in np.flatnonzero(~finite)]
                    raise ValueError(
                        f'Non-finite features for examples {bad[:10]} ({len(bad)} in chunk '
                        f'{chunk} of {url}); nothing of the chunk was stored. Check those '
                        'examples and the model and optimizer state they were featurized with.'
                    )
                pending = pool.submit(
                    writer.write_chunk,
                    chunk,
                    out[:valid],
                    batch['loss_mask'][:valid].sum(1),
                    fault_hook=fault_hook,
                    input_digest=input_digest(mine),
                )
                rows_done += valid
            rate = rows_done / max(time.time() - t0, 1e-9)
            left = sum(
                min(chunk_rows, max(n - (s * procs + me) * chunk_rows, 0)) for s in todo[i + 1 :]
            )
            logging.info(
                'Index %s: step %d/%d, %d rows this run, %.1f rows/s, ETA %.0fs',
                url,
                i + 1,
                len(todo),
                rows_done,
                rate,
                left / max(rate, 1e-9),
            )
        if pending is not None:
            pending.result()
    if procs > 1:
        multihost_utils.sync_global_devices('index_done')
    idx = writer.finish()
    if me == 0:
        report_outliers(idx)
    return idx


OUTLIER_THRESHOLD = 6.0


def norm_outliers(
    norms: np.ndarray, ids: Sequence[str], threshold: float = OUTLIER_THRESHOLD
) -> list[dict[str, Any]]:
    """Examples whose feature norm is extreme, by a robust z-score of log ||φ||.

    z = (log ||φ|| − median) / (1.4826 · MAD), the median absolute deviation scaled to a
    standard deviation under normality; |z| > ``threshold`` (default 6) is an outlier.
    Zero norms (examples without targets) are left out. Such examples can dominate R and
    unnormalised scores: the guard makes them visible, it does not drop them.
    """
    norms = np.asarray(norms, np.float64)
    live = norms > 0
    if live.sum() < 8:
        return []
    logs = np.log(norms[live])
    med = np.median(logs)
    mad = 1.4826 * np.median(np.abs(logs - med))
    if mad == 0:
        return []
    z = np.zeros_like(norms)
    z[live] = (logs - med) / mad
    rows = np.flatnonzero(live & (np.abs(z) > threshold))
    return sorted(
        ({'id': ids[r], 'row': int(r), 'norm': float(norms[r]), 'z': float(z[r])} for r in rows),
        key=lambda o: -abs(o['z']),
    )


def report_outliers(idx: Index, threshold: float = OUTLIER_THRESHOLD) -> list[dict[str, Any]]:
    """Writes ``outliers.json`` beside the index and logs the worst few."""
    found = norm_outliers(idx.norms(), idx.ids, threshold)
    index_lib.write_text(
        index_lib.join(idx.path, 'outliers.json'),
        json.dumps(
            {'threshold': threshold, 'statistic': 'robust z of log norm', 'outliers': found}
        ),
    )
    if found:
        logging.warning(
            'Index %s: %d examples with extreme feature norms (|robust z| > %g), e.g. %s; '
            'see outliers.json.',
            idx.path,
            len(found),
            threshold,
            [(o['id'], round(o['z'], 1)) for o in found[:5]],
        )
    return found


def fit(
    train: Index | str,
    queries: Index | str | None = None,
    config: FitConfig = FitConfig(),
    *,
    mesh: Mesh | None = None,
) -> Preconditioner:
    """Fits the preconditioner ``config.preconditioner`` from the indices."""
    return precond_lib.fit(
        open_index(train), None if queries is None else open_index(queries), config, mesh
    )


def score(
    queries: Index | str,
    train: Index | str,
    preconditioner: Preconditioner | str | None = None,
    config: ScoreConfig = ScoreConfig(),
    *,
    mesh: Mesh | None = None,
    out_path: str | None = None,
) -> ScoreResult:
    """Exact top-k proponents of every query over the whole train index.

    Args:
      queries: the query index (handle or URL).
      train: the train index (handle or URL).
      preconditioner: a fit preconditioner, the URL of a saved one, or None (identity).
      config: k, unit norm, chunk size.
      mesh: the mesh (default: all devices along data).
      out_path: if given, process 0 writes the top-k there as JSONL.
    """
    if isinstance(preconditioner, str):
        preconditioner = precond_lib.load(preconditioner)
    return scoring.score(
        open_index(queries),
        open_index(train),
        preconditioner,
        config,
        mesh=mesh,
        out_path=out_path,
    )


SPEC_KEYS = ('spec', 'layout', 'dim')  # what makes vectors of two checkpoints comparable


def _check_same_spec(a: Index, b: Index, what: str) -> None:
    """ManifestMismatchError unless ``a`` and ``b`` share the GradientSpec, layout and D
    (their model and correction may differ: they are featurized at different steps)."""
    index_lib.check_compatible(
        {k: a.manifest.get(k) for k in SPEC_KEYS}, {k: b.manifest.get(k) for k in SPEC_KEYS}, what
    )


def score_tracin(
    queries: Mapping[int, Index | str] | Index | str,
    train: Index | str,
    config: ScoreConfig = ScoreConfig(unit_norm=False),
    *,
    steps: Sequence[int] | None = None,
    weighting: str = 'lr',
    mesh: Mesh | None = None,
    out_path: str | None = None,
) -> ScoreResult:
    """TracIn-CP over a training-time index: exact top-k examples by

        score(q, z) = Σ_{recorded steps s of z} lr_s · φ_{c(s)}(q) · φ_s(z)

    with φ_s(z) the row the training step s wrote for z (at its pre-update params and
    moments) and c(s) the latest query checkpoint at or before s (the earliest one
    for steps before it). A row at a checkpoint's own step is scored exactly against
    the query at those params.

    Args:
      queries: {checkpoint step: query index featurized at that checkpoint}, or one
        query index (used for every step).
      train: the training-time index (``train_index``).
      config: k, opponents, chunk size; ``unit_norm`` normalises both sides per row
        (TracIn is unnormalised: the default here is False).
      steps: only these recorded steps (None: all).
      weighting: 'lr' (each step's learning rate) or 'none' (every step weighs 1).
      mesh: the mesh (default: all devices along data).
      out_path: if given, process 0 writes the top-k there as JSONL.

    Returns:
      A ScoreResult over examples: ``ids`` are example ids (not row ids) and ``rows``
      their numbers in sorted id order.

    Raises:
      ManifestMismatchError: a query index built with another spec, or at a checkpoint
        whose recorded fingerprints differ from its own.
    """
    if weighting not in ('lr', 'none'):
        raise ValueError(f"weighting must be 'lr' or 'none', got {weighting!r}.")
    train = open_index(train)
    by_step = queries if isinstance(queries, Mapping) else {None: queries}
    by_step = {c: open_index(q) for c, q in by_step.items()}
    recorded = train_index_lib.checkpoint_fingerprints(train)
    query_ids = None
    for c, q in by_step.items():
        _check_same_spec(train, q, f'(training-time index vs queries at checkpoint {c})')
        expected = recorded.get(c) if c is not None else None
        if expected is not None and expected['model_fingerprint'] != q.manifest.get(
            'model_fingerprint'
        ):
            raise index_lib.ManifestMismatchError(
                f'Queries {q.path} were not featurized at checkpoint {c} of the run that '
                f'wrote {train.path} (model fingerprint {q.manifest.get("model_fingerprint")}'
                f", the checkpoint's {expected['model_fingerprint']})."
            )
        if query_ids is None:
            query_ids = list(q.ids)
        elif list(q.ids) != query_ids:
            raise ValueError(f'Query indices hold different queries ({q.path}).')
    row_steps, rates = train_index_lib.recorded_steps(train)
    checkpoints = sorted(by_step, key=lambda c: -1 if c is None else c)
    starts = np.asarray([-1 if c is None else c for c in checkpoints])
    group = np.maximum(np.searchsorted(starts, row_steps, side='right') - 1, 0)
    weight = np.asarray([rates[int(s)] if weighting == 'lr' else 1.0 for s in row_steps])
    if steps is not None:
        weight = np.where(np.isin(row_steps, np.asarray(list(steps))), weight, 0.0)
    examples = [train_index_lib.split_row_id(i)[0] for i in train.ids]
    example_ids = sorted(set(examples))
    number = {e: i for i, e in enumerate(example_ids)}
    mats = [by_step[c].read(slice(0, len(by_step[c]))) for c in checkpoints]
    result = scoring.score_summed(
        mats,
        query_ids,
        train,
        group,
        weight,
        np.asarray([number[e] for e in examples]),
        example_ids,
        config,
        mesh=mesh,
    )
    if out_path and jax.process_index() == 0:
        result.to_jsonl(out_path)
    return result


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One saved checkpoint of TracIn-CP: its train and query indices and its weight.

    Attributes:
      train: the train index featurized at the checkpoint (its params and optimizer
        state: each checkpoint has its own correction).
      queries: the query index featurized at the same checkpoint.
      weight: η_c, e.g. the learning rate in effect around the checkpoint.
      preconditioner: M_c, fitted on this checkpoint's train index (a symmetric kind,
        or the URL of a saved one), scoring q M_c M_c z at this checkpoint: TRAK's
        ensemble is one checkpoint per model with its ``full`` (ΦᵀΦ)⁻¹. None: identity.
    """

    train: Index | str
    queries: Index | str
    weight: float
    preconditioner: Preconditioner | str | None = None


def score_checkpoints(
    checkpoints: Sequence[Checkpoint],
    config: ScoreConfig = ScoreConfig(unit_norm=False),
    *,
    mesh: Mesh | None = None,
    out_path: str | None = None,
) -> ScoreResult:
    """TracIn-CP over saved checkpoints: exact top-k examples by

        score(q, z) = Σ_c η_c ⟨M_c φ_c(q), M_c φ_c(z)⟩   (M_c = I unless given)

    with φ_c the rows of checkpoint c's indices (each featurized at its own params and
    optimizer state). Every train index is streamed once into one [Q, E] sum; nothing is
    materialised per checkpoint. With ``unit_norm`` each checkpoint's term is a cosine
    (both sides normalised after M_c).

    Args:
      checkpoints: the checkpoints, any order.
      config: k, opponents, chunk size; ``unit_norm`` normalises both sides per row
        (TracIn is unnormalised: the default here is False).
      mesh: the mesh (default: all devices along data).
      out_path: if given, process 0 writes the top-k there as JSONL.

    Returns:
      A ScoreResult whose ``rows`` are example numbers in sorted id order.

    Raises:
      ValueError: no checkpoints, a non-finite weight, train indices over different
        examples, or query indices over different queries.
      ManifestMismatchError: a checkpoint whose train and query vectors are not
        comparable (another model, state or spec), or checkpoints of different specs.
    """
    if not checkpoints:
        raise ValueError('TracIn-CP needs at least one checkpoint.')
    opened = [(open_index(c.train), open_index(c.queries), float(c.weight)) for c in checkpoints]
    first_train, first_queries, _ = opened[0]
    mesh = mesh or streaming.default_mesh()
    example_ids = sorted(first_train.ids)
    if len(set(example_ids)) != len(example_ids):
        raise ValueError(f'Train index {first_train.path} repeats example ids.')
    number = {e: i for i, e in enumerate(example_ids)}
    query_ids = list(first_queries.ids)
    mats, sources = [], []
    for g, (train, queries, weight) in enumerate(opened):
        if not np.isfinite(weight):
            raise ValueError(f'Checkpoint weight {weight} for {train.path} is not finite.')
        index_lib.check_compatible(train.manifest, queries.manifest, f'(checkpoint {g})')
        _check_same_spec(first_train, train, f'(checkpoint 0 vs checkpoint {g})')
        if sorted(train.ids) != example_ids:
            raise ValueError(
                f'Train indices {first_train.path} and {train.path} hold different examples: '
                'TracIn-CP sums each example over every checkpoint.'
            )
        if list(queries.ids) != query_ids:
            raise ValueError(f'Query indices hold different queries ({queries.path}).')
        pre = checkpoints[g].preconditioner
        if isinstance(pre, str):
            pre = precond_lib.load(pre)
        q, scale = scoring.folded_side(
            queries.read(slice(0, len(queries))),
            train,
            pre if pre is not None else precond_lib.identity(train.manifest),
            config.unit_norm,
            mesh=mesh,
            chunk_rows=config.chunk_rows,
        )
        mats.append(q)
        sources.append(
            scoring.RowSource(
                train,
                np.full(len(train), g, np.int32),
                (weight * scale).astype(np.float32),
                np.asarray([number[e] for e in train.ids], np.int32),
            )
        )
    # M_c and both sides' norms are folded into the queries and the row weights above.
    summed = dataclasses.replace(config, unit_norm=False)
    result = scoring.score_summed_sources(mats, query_ids, sources, example_ids, summed, mesh=mesh)
    if out_path and jax.process_index() == 0:
        result.to_jsonl(out_path)
    return result


def run_method(
    method: Method,
    train: Index,
    queries: Index,
    fit_config: FitConfig = FitConfig(),
    score_config: ScoreConfig = ScoreConfig(),
    *,
    mesh: Mesh | None = None,
    fitted: dict[tuple[str, str, str], Preconditioner] | None = None,
) -> tuple[ScoreResult, Preconditioner]:
    """Fit (method's preconditioner) then score (method's unit norm): one gradient method.

    ``fitted`` caches preconditioners by (train URL, query URL, kind) across calls, so
    methods sharing indices and a kind fit once.
    """
    if method.kind != 'gradient':
        raise ValueError(f'Method {method.name} is not a gradient method.')
    key = (train.path, queries.path, method.preconditioner)
    m = fitted.get(key) if fitted is not None else None
    if m is None:
        cfg = dataclasses.replace(fit_config, preconditioner=method.preconditioner)
        m = fit(train, queries, cfg, mesh=mesh)
        if fitted is not None:
            fitted[key] = m
    result = score(
        queries, train, m, dataclasses.replace(score_config, unit_norm=method.unit_norm), mesh=mesh
    )
    return result, m
