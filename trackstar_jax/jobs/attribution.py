"""The attribution jobs: index, query, fit, score. Keyword-only, gin-configurable.

Each is also run by a thin absl main in ``launch/`` (index.py, query.py,
fit_hessian.py, score.py). Outputs go under one ``workdir``::

    workdir/train_index   workdir/query_index   workdir/hessian   workdir/scores.jsonl
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import gin
from absl import logging

from trackstar_jax import grads, hessian, index, scoring
from trackstar_jax import sharding as shd
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.jobs.common import load_model

GradientSpec = gin.external_configurable(grads.GradientSpec, module='trackstar_jax')


def _featurizer(
    checkpoint_dir: str, spec: grads.GradientSpec, mesh_axes: Sequence[tuple[str, int]]
) -> tuple[grads.Featurizer, dict]:
    mesh = shd.make_mesh(mesh_axes)
    loaded = load_model(checkpoint_dir, mesh)
    feat = grads.Featurizer(
        loaded.model, loaded.params, spec, opt_state=loaded.opt_state, mesh=mesh
    )
    extra = {'checkpoint_dir': os.path.abspath(checkpoint_dir), 'checkpoint_step': loaded.step}
    return feat, extra


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
    feat, extra = _featurizer(checkpoint_dir, spec, mesh_axes)
    records = corpus_lib.load_corpus(corpus_path, sources=sources, limit=max_examples)
    examples = examples_lib.corpus_examples(records, corpus_lib.Tokenizer(tokenizer_path), seq_len)
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
    feat, extra = _featurizer(checkpoint_dir, spec, mesh_axes)
    facts = corpus_lib.load_facts(facts_path)[:max_queries]
    queries = examples_lib.fact_queries(facts, corpus_lib.Tokenizer(tokenizer_path), seq_len)
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
