"""The attribution jobs: index, query, fit, score. Keyword-only, gin-configurable.

Each is also run by a thin absl main in ``launch/`` (index.py, query.py,
fit_hessian.py, score.py). Outputs go under one ``workdir``::

    workdir/train_index   workdir/query_index   workdir/hessian   workdir/scores.jsonl
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

from trackstar_jax import grads, hessian, index, scoring, train
from trackstar_jax import sharding as shd
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.grads import second_moments
from trackstar_jax.jobs.common import checkpoint_tokenizer, load_model

GradientSpec = gin.external_configurable(grads.GradientSpec, module='trackstar_jax')


def _featurizer(
    checkpoint_dir: str,
    spec: grads.GradientSpec,
    mesh_axes: Sequence[tuple[str, int]],
    tokenizer_path: str,
) -> tuple[grads.Featurizer, dict, Any]:
    """(featurizer, manifest extras, tokenizer) of a checkpoint."""
    mesh = shd.make_mesh(mesh_axes)
    loaded = load_model(checkpoint_dir, mesh)
    feat = grads.Featurizer(
        loaded.model, loaded.params, spec, opt_state=loaded.opt_state, mesh=mesh
    )
    extra = {'checkpoint_dir': os.path.abspath(checkpoint_dir), 'checkpoint_step': loaded.step}
    return feat, extra, checkpoint_tokenizer(loaded, tokenizer_path)


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
    seq_len: int = 128,
    batch_size: int = 32,
    chunk_rows: int = 256,
    dtype: str = 'float32',
    mesh_axes: Sequence[tuple[str, int]] = ((shd.DATA, -1), (shd.MODEL, 1)),
    output_name: str = 'train_index',
) -> index.Index:
    """Featurises corpus passages into ``workdir/<output_name>`` (resumable)."""
    feat, extra, tokenizer = _featurizer(checkpoint_dir, spec, mesh_axes, tokenizer_path)
    records = corpus_lib.load_corpus(corpus_path, sources=sources, limit=max_examples)
    examples = examples_lib.corpus_examples(records, tokenizer, seq_len)
    logging.info('Indexing %d passages from %s.', len(examples), corpus_path)
    return index.build(
        feat,
        examples,
        os.path.join(workdir, output_name),
        dtype=dtype,
        chunk_rows=chunk_rows,
        batch_size=batch_size,
        seq_len=seq_len,
        manifest_extra={**extra, 'source': os.path.abspath(corpus_path)},
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
    seq_len: int = 64,
    batch_size: int = 32,
    chunk_rows: int = 256,
    dtype: str = 'float32',
    mesh_axes: Sequence[tuple[str, int]] = ((shd.DATA, -1), (shd.MODEL, 1)),
    output_name: str = 'query_index',
) -> index.Index:
    """Featurises fact queries (completion-only masks) into ``workdir/<output_name>``."""
    feat, extra, tokenizer = _featurizer(checkpoint_dir, spec, mesh_axes, tokenizer_path)
    facts = corpus_lib.load_facts(facts_path)[:max_queries]
    queries = examples_lib.fact_queries(facts, tokenizer, seq_len)
    logging.info('Indexing %d queries from %s.', len(queries), facts_path)
    return index.build(
        feat,
        queries,
        os.path.join(workdir, output_name),
        dtype=dtype,
        chunk_rows=chunk_rows,
        batch_size=batch_size,
        seq_len=seq_len,
        manifest_extra={**extra, 'source': os.path.abspath(facts_path)},
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
    mesh_axes: Sequence[tuple[str, int]] = ((shd.DATA, -1), (shd.MODEL, 1)),
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
    tokens = np.full((len(examples), seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(examples), seq_len), np.float32)
    for i, ex in enumerate(examples):
        tokens[i, : len(ex['tokens'])] = ex['tokens']
        mask[i, : len(ex['loss_mask'])] = ex['loss_mask']
    logging.info('Estimating V from %d passages (%d target tokens).', len(pick), int(mask.sum()))
    start = time.time()
    moments = grads.estimate_second_moments(
        loaded.model,
        loaded.params,
        [{'tokens': tokens, 'loss_mask': mask}],
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


@gin.configurable(denylist=['workdir'])
def fit_hessian(
    *,
    workdir: str,
    lam: float | str = 'auto',
    top_k_components: int = 1000,
    damping: float = 0.01,
    use_queries: bool = True,
    chunk_rows: int = 1024,
    mesh_axes: Sequence[tuple[str, int]] = ((shd.DATA, -1), (shd.MODEL, 1)),
    output_name: str = 'hessian',
) -> hessian.Hessian:
    """Fits R^-1/2 from ``workdir/train_index`` (and ``query_index``) into ``hessian/``."""
    h = hessian.fit(
        os.path.join(workdir, 'train_index'),
        os.path.join(workdir, 'query_index') if use_queries else None,
        lam=lam,
        top_k_components=top_k_components,
        damping=damping,
        mesh=shd.make_mesh(mesh_axes),
        chunk_rows=chunk_rows,
    )
    h.save(os.path.join(workdir, output_name))
    return h


@gin.configurable(denylist=['workdir'])
def score_queries(
    *,
    workdir: str,
    k: int = 10,
    use_hessian: bool = True,
    unit_norm: bool = True,
    chunk_rows: int = 4096,
    mesh_axes: Sequence[tuple[str, int]] = ((shd.DATA, -1), (shd.MODEL, 1)),
    hessian_name: str = 'hessian',
    output_name: str = 'scores.jsonl',
) -> scoring.ScoreResult:
    """Exact top-k proponents of every query into ``workdir/scores.jsonl``."""
    h = hessian.load(os.path.join(workdir, hessian_name)) if use_hessian else None
    return scoring.score(
        os.path.join(workdir, 'query_index'),
        os.path.join(workdir, 'train_index'),
        hessian=h,
        k=k,
        unit_norm=unit_norm,
        chunk_rows=chunk_rows,
        mesh=shd.make_mesh(mesh_axes),
        out_path=os.path.join(workdir, output_name),
    )
