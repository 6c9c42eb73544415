"""The attribution jobs: index, query, fit, score (and estimating V). Gin-configurable.

Each is a keyword-only function over typed configs, run by a thin absl main in
``launch/`` (index.py, query.py, fit.py, score.py) and callable from Python. Each
returns the URL of what it wrote. Relative names are taken under ``workdir``::

    workdir/train_index   workdir/query_index   workdir/preconditioner   workdir/scores.jsonl

All of them run the one pipeline (:mod:`trackstar_jax.pipeline`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
from absl import logging

from trackstar_jax import grads, pipeline, preconditioners, train
from trackstar_jax import index as index_lib
from trackstar_jax import sharding as shd
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.grads import second_moments
from trackstar_jax.jobs.common import checkpoint_tokenizer, load_model

MeshAxes = Sequence[tuple[str, int]]
DEFAULT_MESH: MeshAxes = ((shd.DATA, -1), (shd.MODEL, 1))


def resolve(workdir: str, name: str) -> str:
    """``name`` if it is a URL or an absolute path, else ``workdir/name``."""
    if '://' in name or os.path.isabs(name):
        return name
    return index_lib.join(workdir, name)


def _index_examples(
    workdir: str,
    checkpoint_dir: str,
    spec: grads.GradientSpec,
    make_examples: Any,
    config: pipeline.IndexConfig,
    mesh_axes: MeshAxes,
    tokenizer_path: str,
    output: str,
    source: str,
) -> str:
    """Loads the checkpoint, builds its examples, featurizes them into ``output``."""
    mesh = shd.make_mesh(mesh_axes)
    loaded = load_model(checkpoint_dir, mesh)
    featurizer = grads.Featurizer(
        loaded.model, loaded.params, spec, opt_state=loaded.opt_state, mesh=mesh
    )
    examples = make_examples(checkpoint_tokenizer(loaded, tokenizer_path))
    url = resolve(workdir, output)
    logging.info('Indexing %d examples from %s into %s.', len(examples), source, url)
    extra = {
        'checkpoint_dir': os.path.abspath(checkpoint_dir),
        'checkpoint_step': loaded.step,
        'source': source if source.startswith('seqio:') else os.path.abspath(source),
    }
    return pipeline.featurize(featurizer, examples, url, config, manifest_extra=extra).path


@gin.configurable(denylist=['workdir'])
def index_corpus(
    *,
    workdir: str,
    checkpoint_dir: str = gin.REQUIRED,
    spec: grads.GradientSpec = gin.REQUIRED,
    corpus_path: str = corpus_lib.CORPUS_PATH,
    tokenizer_path: str = corpus_lib.TOKENIZER_PATH,
    sources: Sequence[str] | None = None,
    max_examples: int | None = None,
    config: pipeline.IndexConfig = pipeline.IndexConfig(),
    mesh_axes: MeshAxes = DEFAULT_MESH,
    output: str = 'train_index',
) -> str:
    """Featurizes corpus passages (every token a target) into ``output`` (resumable).

    ``corpus_path`` is JSONL(.gz) of {"id", "text"} records, or ArrayRecord files of JSON
    records (``*.array_record``, comma-separated, read through grain; ids are the file
    name and position), or ``seqio:TASK[:SPLIT]`` for a registered seqio Task/Mixture.
    """

    def make(tokenizer):
        # Tokenised lazily: each process makes (and, from ArrayRecord, reads) only the
        # rows it featurizes.
        if corpus_path.startswith('seqio:'):  # seqio:TASK or seqio:TASK:SPLIT
            from trackstar_jax.data import sources as sources_lib

            task, _, split = corpus_path[len('seqio:') :].partition(':')
            return sources_lib.seqio_source(task, tokenizer, config.seq_len, split=split or 'train')
        if corpus_path.split(',')[0].endswith('.array_record'):
            from trackstar_jax.data import sources as sources_lib

            if sources or max_examples:
                raise ValueError('sources / max_examples apply to JSONL corpora only.')
            return sources_lib.array_record_source(corpus_path, tokenizer, config.seq_len)
        records = corpus_lib.load_corpus(corpus_path, sources=sources, limit=max_examples)
        return examples_lib.corpus_source(records, tokenizer, config.seq_len)

    return _index_examples(
        workdir, checkpoint_dir, spec, make, config, mesh_axes, tokenizer_path, output, corpus_path
    )


@gin.configurable(denylist=['workdir'])
def index_queries(
    *,
    workdir: str,
    checkpoint_dir: str = gin.REQUIRED,
    spec: grads.GradientSpec = gin.REQUIRED,
    facts_path: str = corpus_lib.FACTS_PATH,
    tokenizer_path: str = corpus_lib.TOKENIZER_PATH,
    max_queries: int | None = None,
    config: pipeline.IndexConfig = pipeline.IndexConfig(seq_len=64),
    mesh_axes: MeshAxes = DEFAULT_MESH,
    output: str = 'query_index',
) -> str:
    """Featurizes fact queries (completion-only masks) into ``output`` (resumable)."""

    def make(tokenizer):
        facts = corpus_lib.load_facts(facts_path)[:max_queries]
        return examples_lib.fact_queries(facts, tokenizer, config.seq_len)

    return _index_examples(
        workdir, checkpoint_dir, spec, make, config, mesh_axes, tokenizer_path, output, facts_path
    )


@gin.configurable(denylist=['workdir'])
def estimate_moments(
    *,
    workdir: str,
    checkpoint_dir: str = gin.REQUIRED,
    corpus_path: str = corpus_lib.CORPUS_PATH,
    tokenizer_path: str = corpus_lib.TOKENIZER_PATH,
    num_examples: int = 128,
    seq_len: int = 128,
    seed: int = 0,
    chunk_size: int = 4,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    tail_patch_learning_rate: float = 1e-4,
    mesh_axes: MeshAxes = DEFAULT_MESH,
) -> dict[str, Any]:
    """Estimates V for a checkpoint without optimizer state; saves it beside the checkpoint.

    V = mean over a uniform random sample of corpus passages of the squared per-example
    loss gradient, factored as Adafactor factors it (see
    ``grads.estimate_second_moments``). It is written to
    ``<checkpoint_dir>/second_moments/`` with its provenance, and from then on
    ``load_model`` returns it as the Adafactor state of a tail-patch optimizer with
    ``tail_patch_learning_rate`` (no warm-up), so index/query/evaluate jobs run unchanged.

    Cost: one forward + backward per sampled example, ``chunk_size`` per-example
    gradients in memory at once (chunk_size x params x 4 bytes).

    Args:
      workdir: where the operative gin config goes (the estimate lives with the model).
      checkpoint_dir: an imported checkpoint (``launch/import_checkpoint.py``).
      corpus_path: JSONL passages to sample.
      tokenizer_path: used only if the checkpoint has no tokenizer of its own.
      num_examples: sample size.
      seq_len: passages are cut to this many tokens.
      seed: sampling seed.
      chunk_size: per-example gradients formed at once.
      factored: store matrices as (v_row, v_col) like Adafactor (else elementwise v).
      min_dim_size_to_factor: as optax's Adafactor; also the tail-patch optimizer's.
      tail_patch_learning_rate: the learning rate of the tail-patch step.
      mesh_axes: the mesh.

    Returns:
      The provenance written to ``second_moments/meta.json``.
    """
    del workdir
    mesh = shd.make_mesh(mesh_axes)
    loaded = load_model(checkpoint_dir, mesh)
    tokenizer = checkpoint_tokenizer(loaded, tokenizer_path)
    records = corpus_lib.load_corpus(corpus_path)
    pick = np.sort(np.random.default_rng(seed).permutation(len(records))[:num_examples])
    examples = examples_lib.corpus_examples([records[i] for i in pick], tokenizer, seq_len)
    batch = examples_lib.pad_batch(examples, len(examples), seq_len)
    mask = batch['loss_mask']
    logging.info('Estimating V from %d passages (%d target tokens).', len(pick), int(mask.sum()))
    start = time.time()
    moments = grads.estimate_second_moments(
        loaded.model,
        loaded.params,
        [batch],
        factored=factored,
        min_dim_size_to_factor=min_dim_size_to_factor,
        chunk_size=chunk_size,
    )
    jax.block_until_ready(moments)
    seconds = time.time() - start
    train_config = train.TrainConfig(
        learning_rate=tail_patch_learning_rate,
        warmup_steps=0,
        min_dim_size_to_factor=min_dim_size_to_factor,
        seq_len=seq_len,
    )
    meta = {
        'estimator': 'mean squared per-example loss gradient',
        'factored': factored,
        'num_examples': len(pick),
        'target_tokens': int(mask.sum()),
        'seq_len': seq_len,
        'seed': seed,
        'corpus_path': os.path.abspath(corpus_path),
        'example_ids': [examples[i]['id'] for i in range(len(examples))],
        'seconds': round(seconds, 1),
        'train_config': train_config.to_dict(),
    }
    second_moments.save_moments(checkpoint_dir, moments, meta)
    logging.info('V estimated in %.1f s; saved under %s.', seconds, checkpoint_dir)
    return meta


@gin.configurable('fit_preconditioner', denylist=['workdir'])
def fit(
    *,
    workdir: str,
    config: preconditioners.FitConfig = preconditioners.FitConfig(),
    train_index: str = 'train_index',
    query_index: str | None = 'query_index',
    mesh_axes: MeshAxes = DEFAULT_MESH,
    output: str = 'preconditioner',
) -> str:
    """Fits ``config.preconditioner`` from the indices into ``output`` (+ a plot)."""
    kind = preconditioners.get(config.preconditioner)
    queries = resolve(workdir, query_index) if query_index and kind.uses_queries else None
    m = pipeline.fit(resolve(workdir, train_index), queries, config, mesh=shd.make_mesh(mesh_axes))
    url = resolve(workdir, output)
    if jax.process_index() == 0:
        m.save(url)
        preconditioners.plot_eigenvalues(m, index_lib.join(url, 'eigenvalues.png'))
    return url


@gin.configurable('score_queries', denylist=['workdir'])
def score(
    *,
    workdir: str,
    config: pipeline.ScoreConfig = pipeline.ScoreConfig(opponents=10),
    query_index: str = 'query_index',
    train_index: str = 'train_index',
    preconditioner: str | None = 'preconditioner',
    mesh_axes: MeshAxes = DEFAULT_MESH,
    output: str = 'scores.jsonl',
) -> str:
    """Exact top-k proponents (and opponents, the most negative scores) of every query
    into ``output`` (JSONL, rank 1.. for proponents and -1.. for opponents).

    ``preconditioner`` names a saved one (from the fit job), or None for the identity.
    """
    url = resolve(workdir, output)
    pipeline.score(
        resolve(workdir, query_index),
        resolve(workdir, train_index),
        resolve(workdir, preconditioner) if preconditioner else None,
        config,
        mesh=shd.make_mesh(mesh_axes),
        out_path=url,
    )
    return url


@gin.configurable('score_training', denylist=['workdir'])
def score_training(
    *,
    workdir: str,
    training_index: str = 'train_time_index',
    checkpoint_dir: str = 'checkpoints',
    checkpoint_steps: Sequence[int] | None = None,
    facts_path: str = corpus_lib.FACTS_PATH,
    tokenizer_path: str = corpus_lib.TOKENIZER_PATH,
    max_queries: int | None = None,
    query_config: pipeline.IndexConfig = pipeline.IndexConfig(seq_len=64),
    config: pipeline.ScoreConfig = pipeline.ScoreConfig(unit_norm=False, opponents=10),
    weighting: str = 'lr',
    mesh_axes: MeshAxes = DEFAULT_MESH,
    output: str = 'tracin_scores.jsonl',
) -> str:
    """TracIn-CP over an index written during training (``train_lm.train_index``).

    The queries are featurized at each checkpoint the training run saved inside its
    recorded steps (``checkpoint_steps``: others it saved; default those; a relative
    ``checkpoint_dir`` is under ``workdir``), with the spec the
    index was written with, into ``<output>_queries_step<S>``; then
    ``pipeline.score_tracin`` sums lr_s · φ_{c(s)}(q)·φ_s(z) over each training row's
    recorded steps and writes the exact top-k (JSONL, ranks as the score job's).
    """
    from trackstar_jax import train_index as train_index_lib

    checkpoint_dir = resolve(workdir, checkpoint_dir)
    idx = index_lib.open(resolve(workdir, training_index))
    recorded = sorted(train_index_lib.checkpoint_fingerprints(idx))
    row_steps, _ = train_index_lib.recorded_steps(idx)
    first, last = int(row_steps.min()), int(row_steps.max())
    if checkpoint_steps is None:  # the checkpoints inside the recorded window
        steps = [c for c in recorded if first <= c <= last]
    else:
        steps = sorted(checkpoint_steps)
    missing = [s for s in steps if s not in recorded]
    if not steps or missing:
        raise ValueError(
            f'{idx.path} recorded steps {first}..{last} and checkpoints {recorded}; asked '
            f'for {steps}. Score checkpoints the run saved (TrainConfig.checkpoint_every '
            'inside the recorded steps, or checkpoint_steps).'
        )
    spec = grads.GradientSpec(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in idx.manifest['spec'].items()}
    )
    mesh = shd.make_mesh(mesh_axes)
    queries = {}
    for step in steps:
        loaded = load_model(checkpoint_dir, mesh, step)
        featurizer = grads.Featurizer(
            loaded.model, loaded.params, spec, opt_state=loaded.opt_state, mesh=mesh
        )
        tokenizer = checkpoint_tokenizer(loaded, tokenizer_path)
        facts = corpus_lib.load_facts(facts_path)[:max_queries]
        examples = examples_lib.fact_queries(facts, tokenizer, query_config.seq_len)
        url = resolve(workdir, f'{output}_queries_step{step}')
        extra = {'checkpoint_dir': os.path.abspath(checkpoint_dir), 'checkpoint_step': step}
        queries[step] = pipeline.featurize(featurizer, examples, url, query_config,
                                           manifest_extra=extra)  # fmt: skip
    url = resolve(workdir, output)
    pipeline.score_tracin(queries, idx, config, weighting=weighting, mesh=mesh, out_path=url)
    return url
