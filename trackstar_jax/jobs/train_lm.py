"""Job: train an LM on a corpus (the embedded demo by default) with sharded Adafactor.

Resumable: it continues from the newest checkpoint in ``workdir`` with exactly the data
order it would have had.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
from absl import logging

from trackstar_jax import checkpoint, train
from trackstar_jax import sharding as shd
from trackstar_jax import train_index as train_index_lib
from trackstar_jax.data import batching
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import mixture as mixture_lib
from trackstar_jax.index import write_text
from trackstar_jax.jobs import attribution
from trackstar_jax.models import DecoderConfig, DecoderLM


def unigram_entropy(rows: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of the best unigram model."""
    counts = np.bincount(rows.ravel(), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


MIXTURE_KEY = 'mixture_corpus_sha256'


def check_resumable(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuses to resume a checkpoint of another model (or optimizer-state layout).

    Raises:
      ValueError: naming each setting that differs, the saved and the asked value.
    """
    diffs = [
        f'model.{k}: {saved["model"].get(k)!r} saved, {v!r} now'
        for k, v in current['model'].items()
        if saved['model'].get(k) != v
    ]
    if saved.get(MIXTURE_KEY) != current.get(MIXTURE_KEY):
        diffs.append('the training mixture (another FactMixture, or none)')
    key = 'min_dim_size_to_factor'  # decides which second moments are factored
    if saved['train'].get(key) != current['train'][key]:
        diffs.append(
            f'train.{key}: {saved["train"].get(key)!r} saved, {current["train"][key]!r} now'
        )
    if diffs:
        raise ValueError(
            f'{where} holds a checkpoint of another model, so training cannot resume from '
            f'it ({"; ".join(diffs)}). Use another --workdir, or restore the settings.'
        )


@gin.configurable(denylist=['workdir'])
def train_lm(
    *,
    workdir: str,
    model_config: DecoderConfig = gin.REQUIRED,
    train_config: train.TrainConfig = gin.REQUIRED,
    mesh_axes: Sequence[tuple[str, int]] = ((shd.DATA, -1), (shd.MODEL, 1)),
    corpus_path: str = corpus_lib.CORPUS_PATH,
    tokenizer_path: str = corpus_lib.TOKENIZER_PATH,
    max_documents: int | None = None,
    eval_fraction: float = 0.02,
    eval_batches: int = 8,
    mixture: mixture_lib.FactMixture | None = None,
    facts_path: str = corpus_lib.FACTS_PATH,
    train_index: train_index_lib.TrainIndexConfig | None = None,
) -> dict[str, Any]:
    """Trains ``model_config`` on the corpus and checkpoints into ``workdir/checkpoints``.

    Args:
      workdir: output directory (checkpoints, metrics JSON, operative gin config).
      model_config: the model.
      train_config: optimiser and loop settings.
      mesh_axes: (name, size) pairs for :func:`trackstar_jax.sharding.make_mesh`.
      corpus_path: JSONL(.gz) corpus of {"id", "text"} records.
      tokenizer_path: SentencePiece model; its vocab must fit the model's.
      max_documents: use only the first this many documents (None: all).
      eval_fraction: fraction of packed rows held out for the eval loss.
      eval_batches: held-out batches averaged for the eval loss.
      mixture: train on this fact-dense mixture of ``corpus_path`` and ``facts_path``
        (built into ``workdir/mixture/``) instead of the corpus itself.
      facts_path: the facts the mixture is built from.
      train_index: also write a training-time attribution index (each recorded step's
        examples' features, from the same forward/backward; ``train_index.py``) at
        ``train_index.url`` under ``workdir``. Its example ids are ``row<N>``: packed
        training rows, numbered in ``train_rows`` order.

    Returns:
      A summary dict (also written to ``workdir/train_metrics.json``).
    """
    tokenizer = corpus_lib.Tokenizer(tokenizer_path)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f'Tokenizer has {tokenizer.vocab_size} ids but the model only '
            f'{model_config.vocab_size}.'
        )
    if train_config.seq_len > model_config.max_len:
        raise ValueError(f'seq_len {train_config.seq_len} > max_len {model_config.max_len}.')
    mixture_summary = None
    if mixture is not None:
        paths = mixture_lib.write(workdir, mixture, corpus_path, facts_path)
        corpus_path = paths['corpus']
        with open(paths['summary']) as f:
            mixture_summary = json.load(f)
    docs = corpus_lib.load_corpus(corpus_path, limit=max_documents)
    t0 = time.time()
    rows = batching.pack(
        tokenizer.encode([d['text'] for d in docs]), train_config.seq_len, tokenizer.eos_id
    )
    # A fixed held-out split (chosen by a seeded permutation, never trained on).
    perm = np.random.default_rng(1234).permutation(len(rows))
    n_eval = max(int(len(rows) * eval_fraction), train_config.batch_size)
    eval_rows, train_rows = rows[perm[:n_eval]], rows[perm[n_eval:]]
    logging.info(
        'Corpus: %d documents -> %d train / %d eval rows of %d tokens (%.1fs).',
        len(docs),
        len(train_rows),
        len(eval_rows),
        train_config.seq_len,
        time.time() - t0,
    )

    mesh = shd.make_mesh(mesh_axes)
    layout = batching.DataLayout.for_mesh(mesh, train_config.batch_size)
    model = DecoderLM(model_config)
    tx = train.make_optimizer(train_config)
    state, shardings = train.create_train_state(model, train_config, mesh)
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    # With a training-time index every checkpoint is kept: TracIn scores its queries at each.
    mngr = checkpoint.manager(ckpt_dir, max_to_keep=None if train_index is not None else 3)
    config_record = {
        'model': model_config.to_dict(),
        'train': train_config.to_dict(),
        'tokenizer': os.path.abspath(tokenizer_path),
        # What the model was trained on, so an evaluation on a mixture can check it.
        MIXTURE_KEY: mixture_summary['sha256']['corpus'] if mixture_summary else None,
    }
    start = 0
    if mngr.latest_step() is not None:
        check_resumable(checkpoint.restore_config(ckpt_dir), config_record, ckpt_dir)
        state, _, start = checkpoint.restore(ckpt_dir, checkpoint.abstract_like(state, shardings))
        logging.info('Resumed from step %d.', start)
    step_fn = train.make_train_step(model, tx, mesh, shardings)
    recorder = None
    if train_index is not None:
        schedule = train.learning_rate_schedule(train_config)
        recorder = train_index_lib.Recorder(
            train_index,
            attribution.resolve(workdir, train_index.url),
            model,
            tx,
            mesh,
            state,
            shardings,
            num_steps=train_config.num_steps,
            start_step=start,
            seq_len=train_config.seq_len,
            local_batch=layout.local_batch_size,
            example_ids=lambda s: [
                f'row{r}'
                for r in batching.batch_rows(
                    len(train_rows), train_config.batch_size, train_config.seed, s
                )
            ],
            learning_rate=lambda s: float(schedule(s)),
            manifest_extra={'checkpoint_dir': os.path.abspath(ckpt_dir)},
        )
    eval_fn = jax.jit(
        lambda p, b: train.loss_fn(model, p, b),
        in_shardings=(
            shardings.params,
            {k: shd.batch_sharding(mesh) for k in ('tokens', 'loss_mask')},
        ),
    )

    def eval_loss(params) -> float:
        it = batching.training_batches(eval_rows, train_config.batch_size, seed=0, layout=layout)
        return float(
            np.mean(
                [
                    float(eval_fn(params, train.global_batch(mesh, next(it))))
                    for _ in range(eval_batches)
                ]
            )
        )

    history = []
    if start == 0:
        history.append({'step': 0, 'eval_loss': eval_loss(state.params)})
        logging.info('step 0: eval loss %.4f', history[-1]['eval_loss'])
    batches = batching.training_batches(
        train_rows, train_config.batch_size, train_config.seed, start_step=start, layout=layout
    )
    t_start, window = time.time(), []
    for step in range(start, train_config.num_steps):
        local = next(batches)
        if recorder is not None and recorder.wants(step):
            state, metrics = recorder.step(
                state, train.global_batch(mesh, local), local['loss_mask'].sum(1), step
            )
        else:
            state, metrics = step_fn(state, train.global_batch(mesh, local))
        window.append(metrics)
        done = step + 1
        if done % train_config.log_every == 0 or done == train_config.num_steps:
            loss = float(np.mean([float(m['loss']) for m in window]))
            rate = (done - start) / (time.time() - t_start)
            eta = (train_config.num_steps - done) / max(rate, 1e-9)
            record = {'step': done, 'train_loss': loss, 'steps_per_s': rate}
            if done % (train_config.log_every * 4) == 0 or done == train_config.num_steps:
                record['eval_loss'] = eval_loss(state.params)
            history.append(record)
            logging.info(
                'step %d/%d: train loss %.4f%s, %.2f steps/s, %.0f tokens/s, ETA %.0fs',
                done,
                train_config.num_steps,
                loss,
                f', eval loss {record["eval_loss"]:.4f}' if 'eval_loss' in record else '',
                rate,
                rate * train_config.batch_size * train_config.seq_len,
                eta,
            )
            window = []
        if done % train_config.checkpoint_every == 0 or done == train_config.num_steps:
            if recorder is not None:
                recorder.before_checkpoint(done, state)
            checkpoint.save(mngr, done, state, config_record)

    index_summary = recorder.close() if recorder is not None else None
    entropy = unigram_entropy(train_rows, model_config.vocab_size)
    final_eval = eval_loss(state.params)
    summary = {
        'num_steps': train_config.num_steps,
        'tokens_seen': train_config.num_steps * train_config.batch_size * train_config.seq_len,
        'train_rows': len(train_rows),
        'final_train_loss': next(
            (h['train_loss'] for h in reversed(history) if 'train_loss' in h), math.nan
        ),
        'final_eval_loss': final_eval,
        'initial_eval_loss': history[0].get('eval_loss', math.nan) if start == 0 else None,
        'unigram_entropy': entropy,
        'eval_loss_minus_unigram_entropy': final_eval - entropy,
        'history': history,
        'model': model_config.to_dict(),
        'train': train_config.to_dict(),
        'mesh': dict(mesh.shape),
        'checkpoint_dir': os.path.abspath(ckpt_dir),
        # How often the model saw each training row (and so each passage of a mixture).
        'epochs': train_config.num_steps * train_config.batch_size / max(len(train_rows), 1),
    }
    if index_summary is not None:
        summary['train_index'] = index_summary
    if mixture_summary is not None:
        summary['mixture'] = mixture_summary
        logging.info(
            'Mixture: %d evaluated facts (glosses only), %d held-in facts (gloss + '
            'statement), %d distractors; each seen %.1f times.',
            mixture_summary['eval_facts'],
            mixture_summary['heldin_facts'],
            mixture_summary['distractors'],
            summary['epochs'] * mixture_summary['config']['repeats'],
        )
    if jax.process_index() == 0:
        write_text(os.path.join(workdir, 'train_metrics.json'), json.dumps(summary, indent=1))
    logging.info('Final eval loss %.4f vs unigram entropy %.4f nats/token.', final_eval, entropy)
    return summary
