"""Fact tracing end to end: the paper's closed-set evaluation (§4-5) at small scale.

For a set of facts (prompt, target, entailing example ids) and a candidate corpus:

1. featurise candidates and queries once per distinct (correction, output fn) — the
   indices are cached under ``workdir/indices`` and resume if interrupted;
2. for every method (a gin-configured :class:`Method`: gradient variants of Table 1 and
   A.3, BM25, the dense retriever, the entailing "gold" set) retrieve the top-k;
3. score MRR / Recall@10 against the entailing ids and the tail-patch influence of the
   top-k, overall and split by whether the model predicts the fact (Table A.7);
4. sweep the projection dimension for TrackStar (Figure 2). Smaller projections are the
   top-left k' x k' sub-blocks of each k x k block, rescaled by k/k': the first k' rows
   of P0 and P1 are themselves a k'-row Gaussian projection (entries N(0, 1/k) scaled
   to N(0, 1/k')), so no re-featurisation is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
from absl import logging

from trackstar_jax import grads, hessian, index, losses, scoring
from trackstar_jax import sharding as shd
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.eval import metrics, report
from trackstar_jax.eval import tail_patch as tail_patch_lib
from trackstar_jax.jobs.common import LoadedModel, checkpoint_tokenizer, load_model

KINDS = ('gradient', 'bm25', 'dense', 'gold')


@gin.configurable(module='trackstar_jax')
@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the evaluation table.

    Attributes:
      name: row label.
      kind: 'gradient', 'bm25', 'dense' or 'gold' (tail-patch the entailing examples).
      correction: optimizer correction ('adafactor' or 'none') of gradient methods.
      output_fn: 'loss', 'margin', 'logit' or 'trak'.
      hessian: 'none', 'train' (R_train) or 'mixed' (λ R_eval + (1 − λ) R_train).
      unit_norm: normalise both sides.
    """

    name: str = gin.REQUIRED
    kind: str = 'gradient'
    correction: str = 'adafactor'
    output_fn: str = 'loss'
    hessian: str = 'mixed'
    unit_norm: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f'Method {self.name}: kind must be one of {KINDS}.')
        if self.hessian not in ('none', 'train', 'mixed'):
            raise ValueError(f"Method {self.name}: hessian must be 'none', 'train' or 'mixed'.")


def select_facts(
    facts: Sequence[dict], corpus_ids: set[str], num: int | None, seed: int
) -> list[dict]:
    """Facts with an entailing example in the corpus, sampled round-robin over relations."""
    usable = [f for f in facts if any(i in corpus_ids for i in f['entailing_ids'])]
    if num is None or num >= len(usable):
        return usable
    rng = np.random.default_rng(seed)
    by_rel: dict[str, list[dict]] = {}
    for i in rng.permutation(len(usable)):
        by_rel.setdefault(usable[i].get('relation', ''), []).append(usable[i])
    out, rels = [], sorted(by_rel)
    while len(out) < num:
        for r in rels:
            if by_rel[r] and len(out) < num:
                out.append(by_rel[r].pop())
    return sorted(out, key=lambda f: f['id'])


def candidate_pool(
    records: Sequence[dict], facts: Sequence[dict], num_distractors: int | None, seed: int
) -> list[dict]:
    """The entailing examples of ``facts`` plus random distractors, sorted by id."""
    entailing = {i for f in facts for i in f['entailing_ids']}
    chosen = [r for r in records if r['id'] in entailing]
    rest = [r for r in records if r['id'] not in entailing]
    if num_distractors is None or num_distractors >= len(rest):
        chosen += rest
    else:
        idx = np.random.default_rng(seed + 1).choice(len(rest), num_distractors, replace=False)
        chosen += [rest[i] for i in idx]
    return sorted(chosen, key=lambda r: r['id'])


def predictions(
    loaded: LoadedModel, queries: Sequence[dict], tokenizer, query_len: int
) -> tuple[dict[str, bool], dict[str, str], dict[str, float]]:
    """Per query: is every target token the model's argmax, its predicted text, p(target)."""
    rows = [tail_patch_lib._pad(q, query_len) for q in queries]
    toks = np.stack([r['tokens'] for r in rows])
    mask = np.stack([r['loss_mask'] for r in rows])
    logits = jax.jit(lambda p, t: loaded.model.apply({'params': p}, t))(loaded.params, toks)
    logits = np.asarray(logits)
    argmax = logits[:, :-1].argmax(-1)
    probs = np.exp(-np.asarray(losses.example_losses(logits, toks, mask)))
    correct, predicted, p_target = {}, {}, {}
    for i, q in enumerate(queries):
        pos = np.nonzero(mask[i])[0]
        pred = argmax[i, pos - 1]
        correct[q['id']] = bool(np.all(pred == toks[i, pos]))
        predicted[q['id']] = tokenizer.decode(pred.tolist())
        p_target[q['id']] = float(probs[i])
    return correct, predicted, p_target


def sub_block(src_side: int, side: int, num_blocks: int):
    """Vectors of side x side sub-blocks, rescaled to a side-row projection."""
    scale = src_side / side

    def fn(v: np.ndarray) -> np.ndarray:
        b = v.reshape(len(v), num_blocks, src_side, src_side)[:, :, :side, :side]
        return (b * scale).reshape(len(v), -1)

    return fn


@gin.configurable(denylist=['workdir'])
def evaluate(
    *,
    workdir: str,
    checkpoint_dir: str = gin.REQUIRED,
    methods: Sequence[Method] = gin.REQUIRED,
    spec: grads.GradientSpec = gin.REQUIRED,
    facts_path: str = corpus_lib.FACTS_PATH,
    corpus_path: str = corpus_lib.CORPUS_PATH,
    tokenizer_path: str = corpus_lib.TOKENIZER_PATH,
    num_queries: int | None = 120,
    num_distractors: int | None = 2500,
    seed: int = 0,
    seq_len: int = 128,
    query_len: int = 48,
    k: int = 10,
    lam: float | str = 'auto',
    damping: float = 0.01,
    batch_size: int = 32,
    dimension_sweep: Sequence[int] = (16, 64, 256),
    sweep_method: str = 'TrackStar',
    html_queries: int = 40,
    tail_patch_batch: int | None = None,
    results_path: str | None = None,
    mesh_axes: Sequence[tuple[str, int]] = ((shd.DATA, -1), (shd.MODEL, 1)),
) -> dict[str, Any]:
    """Runs the fact-tracing evaluation; returns (and writes) the results.

    Args:
      workdir: outputs: indices/, results JSON/Markdown/PNG, report.html.
      checkpoint_dir: the model: a ``train_lm`` checkpoint with optimizer state, or an
        imported one with estimated second moments (``launch/estimate_second_moments.py``).
      methods: the table's rows.
      spec: the gradient spec of the full-dimension TrackStar (its correction and
        output_fn are overridden per method).
      facts_path: JSONL facts {"id", "prompt", "target", "entailing_ids"}.
      corpus_path: JSONL corpus {"id", "text"}.
      tokenizer_path: SentencePiece model of the checkpoint (ignored when the checkpoint
        carries its own tokenizer, as an imported one does).
      num_queries: facts to evaluate (None: all usable).
      num_distractors: non-entailing candidates added (None: the whole corpus).
      seed: sampling seed.
      seq_len: candidate length (tokens, truncated).
      query_len: query length.
      k: proponents per query (MRR over them, Recall@k, tail-patch averaged over them).
      lam: λ of the mixed Hessian.
      damping: relative damping of R.
      batch_size: kernel batch size.
      dimension_sweep: block_dims for the Figure 2 sweep (each < spec.block_dim).
      sweep_method: the method swept over dimension.
      html_queries: queries shown in report.html.
      tail_patch_batch: proponents stepped at once in tail-patch (None: all k).
      results_path: also write the results JSON here (e.g. benchmarks/results/...).
      mesh_axes: the mesh.
    """
    t_start = time.time()
    os.makedirs(workdir, exist_ok=True)
    mesh = shd.make_mesh(mesh_axes)
    loaded = load_model(checkpoint_dir, mesh)
    if loaded.opt_state is None:
        raise ValueError(
            f'{checkpoint_dir} has no optimizer state: run launch/estimate_second_moments.py '
            'first (tail-patch and the adafactor correction need V).'
        )
    tokenizer = checkpoint_tokenizer(loaded, tokenizer_path)
    records = corpus_lib.load_corpus(corpus_path)
    all_facts = corpus_lib.load_facts(facts_path)
    facts = select_facts(all_facts, {r['id'] for r in records}, num_queries, seed)
    pool = candidate_pool(records, facts, num_distractors, seed)
    pool_ids = {r['id'] for r in pool}
    entailing = {f['id']: {i for i in f['entailing_ids'] if i in pool_ids} for f in facts}
    candidates = examples_lib.corpus_examples(pool, tokenizer, seq_len)
    queries = examples_lib.fact_queries(facts, tokenizer, query_len)
    logging.info(
        'Evaluation: %d queries, %d candidates (%d entailing).',
        len(queries),
        len(candidates),
        len(set().union(*entailing.values())),
    )
    correct, predicted, p_target = predictions(loaded, queries, tokenizer, query_len)

    def featurizer(correction, output_fn):
        s = dataclasses.replace(spec, correction=correction, output_fn=output_fn)
        return grads.Featurizer(
            loaded.model, loaded.params, s, opt_state=loaded.opt_state, mesh=mesh
        )

    indices: dict[tuple, tuple[index.Index, index.Index]] = {}

    def get_indices(correction, output_fn):
        key = (correction, output_fn)
        if key not in indices:
            feat = featurizer(correction, output_fn)
            # The directory names what the vectors depend on, so a changed candidate set
            # or spec never meets a stale index.
            tag = hashlib.sha256(
                json.dumps(
                    [
                        spec.to_dict(),
                        seq_len,
                        query_len,
                        [c['id'] for c in candidates],
                        [q['id'] for q in queries],
                    ]
                ).encode()
            ).hexdigest()[:8]
            root = os.path.join(workdir, 'indices', f'{correction}_{output_fn}_{tag}')
            extra = {'checkpoint_dir': os.path.abspath(checkpoint_dir)}
            train = index.build(
                feat,
                candidates,
                os.path.join(root, 'train'),
                batch_size=batch_size,
                chunk_rows=batch_size * 8,
                seq_len=seq_len,
                manifest_extra=extra,
            )
            qi = index.build(
                feat,
                queries,
                os.path.join(root, 'queries'),
                batch_size=batch_size,
                chunk_rows=batch_size * 8,
                seq_len=query_len,
                manifest_extra=extra,
            )
            indices[key] = (train, qi)
        return indices[key]

    def gradient_ranking(train, qi, method):
        h = None
        if method.hessian != 'none':
            h = hessian.fit(
                train.path,
                qi.path if method.hessian == 'mixed' else None,
                lam=lam if method.hessian == 'mixed' else 0.0,
                damping=damping,
                mesh=mesh,
            )
        res = scoring.score(
            qi.path, train.path, hessian=h, k=k, unit_norm=method.unit_norm, mesh=mesh
        )
        ranked = dict(zip(res.query_ids, res.ids, strict=True))
        return ranked, ({'lam': h.lam, 'k_component': h.k_component} if h else {}), h

    rankings: dict[str, dict[str, list[str]]] = {}
    info: dict[str, dict] = {}
    texts = {r['id']: r['text'] for r in pool}
    query_texts = [f['prompt'] + f['target'] for f in facts]
    for m in methods:
        t0 = time.time()
        if m.kind == 'gradient':
            train, qi = get_indices(m.correction, m.output_fn)
            rankings[m.name], info[m.name], h = gradient_ranking(train, qi, m)
            if h is not None and m.hessian == 'mixed':
                h.save(os.path.join(workdir, f'hessian_{m.name}'))
        elif m.kind in ('bm25', 'dense'):
            from trackstar_jax.eval import baselines

            fn = baselines.bm25_top_k if m.kind == 'bm25' else baselines.dense_top_k
            ids, _ = fn([r['id'] for r in pool], [r['text'] for r in pool], query_texts, k)
            rankings[m.name] = dict(zip([f['id'] for f in facts], ids, strict=True))
        else:
            rankings[m.name] = {f['id']: sorted(entailing[f['id']])[:k] for f in facts}
        info.setdefault(m.name, {})['seconds'] = time.time() - t0
        logging.info('Method %s ranked in %.1fs.', m.name, time.time() - t0)

    # Dimension sweep of one method (Figure 2), from sub-blocks of its full index.
    sweep_rows = []
    base = next((m for m in methods if m.name == sweep_method), None)
    if base is not None and base.kind == 'gradient':
        train, qi = get_indices(base.correction, base.output_fn)
        nb, side = len(spec_blocks(train)), int(round(spec.block_dim**0.5))
        for block_dim in dimension_sweep:
            s = int(round(block_dim**0.5))
            if s * s != block_dim or s >= side:
                raise ValueError(
                    f'dimension_sweep entry {block_dim} must be a square < {spec.block_dim}.'
                )
            upd = {
                'spec': {**train.manifest['spec'], 'block_dim': block_dim},
                'layout': {**train.manifest['layout'], 'block_dim': block_dim},
            }
            root = os.path.join(os.path.dirname(train.path), f'sub_{block_dim}')
            fn = sub_block(side, s, nb)
            t_sub = index.derive(train, os.path.join(root, 'train'), fn, upd)
            q_sub = index.derive(qi, os.path.join(root, 'queries'), fn, upd)
            name = f'{sweep_method}@D={nb * block_dim}'
            rankings[name], info[name], _ = gradient_ranking(t_sub, q_sub, base)
            sweep_rows.append((name, nb * block_dim))
        sweep_rows.append((sweep_method, nb * spec.block_dim))

    # Tail-patch every (query, proponent) pair any method retrieved, once.
    t0 = time.time()
    pairs = sorted(
        {(q, p) for ranked in rankings.values() for q, ps in ranked.items() for p in ps[:k]}
    )
    fn = tail_patch_lib.make_tail_patch(loaded.model, loaded.train_config, tail_patch_batch)
    deltas = tail_patch_lib.tail_patch_scores(
        fn,
        loaded.params,
        loaded.opt_state,
        pairs,
        {q['id']: q for q in queries},
        {c['id']: c for c in candidates},
        k,
        seq_len,
        query_len,
    )
    logging.info('Tail-patch: %d steps in %.1fs.', len(pairs), time.time() - t0)

    def row(name, subset):
        qids = [f['id'] for f in facts if f['id'] in subset]
        if not qids:
            return None
        ranked = [rankings[name][q] for q in qids]
        ent = [entailing[q] for q in qids]
        tp = [
            np.mean([deltas[(q, p)] for p in rankings[name][q][:k]])
            for q in qids
            if rankings[name][q]
        ]
        return {
            'mrr': metrics.mrr(ranked, ent),
            'recall@10': metrics.recall_at_k(ranked, ent, 10),
            'tail_patch': float(np.mean(tp)) if tp else float('nan'),
            'queries': len(qids),
        }

    all_q = {f['id'] for f in facts}
    right = {q for q in all_q if correct[q]}
    table = {
        name: {
            'all': row(name, all_q),
            'correct': row(name, right),
            'incorrect': row(name, all_q - right),
            **info.get(name, {}),
        }
        for name in rankings
    }
    results = {
        'command': None,
        'checkpoint_dir': os.path.abspath(checkpoint_dir),
        'checkpoint_step': loaded.step,
        'num_queries': len(facts),
        'num_candidates': len(pool),
        'num_correct': len(right),
        'k': k,
        'spec': spec.to_dict(),
        'damping': damping,
        'methods': {m.name: dataclasses.asdict(m) for m in methods},
        'table': table,
        'dimension_sweep': [{'method': n, 'dim': d, **table[n]['all']} for n, d in sweep_rows],
        'seconds': time.time() - t_start,
    }
    report.write_all(
        workdir,
        results,
        facts,
        rankings,
        deltas,
        entailing,
        predicted,
        correct,
        p_target,
        texts,
        html_queries,
        k,
    )
    if results_path and jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
        with open(results_path, 'w') as f:
            json.dump(results, f, indent=1)
    return results


def spec_blocks(idx: index.Index) -> list[str]:
    """Block names of an index."""
    return list(idx.manifest['layout']['block_names'])
