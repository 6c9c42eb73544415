"""Fact tracing end to end: the paper's closed-set evaluation (§4-5) at small scale.

For a set of facts (prompt, target, entailing example ids) and a candidate corpus, the
evaluation is a loop over :class:`pipeline.Method` rows:

1. gradient methods run the one pipeline — featurize candidates and queries once per
   distinct (correction, output fn) (indices cached under ``workdir/indices``, keyed by
   what they depend on, resumable), fit the method's preconditioner (cached per index
   pair and kind), score; BM25, the dense retriever and the entailing "gold" set
   retrieve directly;
2. MRR / Recall@10 against the entailing ids and the tail-patch influence of the top-k,
   overall and split by whether the model predicts the fact (Table A.7);
3. the projection dimension is swept for one method (Figure 2). Smaller projections
   are the top-left k' x k' sub-blocks of each k x k block, rescaled by k/k': the first
   k' rows of P0 and P1 are themselves a k'-row Gaussian projection (entries N(0, 1/k)
   scaled to N(0, 1/k')), so no re-featurisation is needed.

Everything is written under ``workdir``: results.json / .md, PNG plots, report.html.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
from absl import logging

from trackstar_jax import checkpoint, grads, losses, pipeline, support
from trackstar_jax import index as index_lib
from trackstar_jax import sharding as shd
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.data import mixture as mixture_lib
from trackstar_jax.eval import lds as lds_lib
from trackstar_jax.eval import metrics, report, stats
from trackstar_jax.eval import tail_patch as tail_patch_lib
from trackstar_jax.jobs.common import LoadedModel, checkpoint_tokenizer, load_model
from trackstar_jax.pipeline import FitConfig, Method, ScoreConfig

__all__ = ['EvalConfig', 'Method', 'evaluate']


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What the evaluation samples and measures.

    Attributes:
      num_queries: facts to evaluate (None: all with an entailing example in the corpus).
      num_distractors: non-entailing candidates added (None: the whole corpus).
      seed: sampling seed of facts and distractors.
      seq_len: candidate length (tokens, truncated).
      query_len: query length.
      k: proponents per query (MRR over them, Recall@k, tail-patch averaged over them).
      batch_size: kernel batch size.
      dimension_sweep: block_dims for the Figure 2 sweep (squares < spec.block_dim).
      sweep_method: the method swept over dimension.
      html_queries: queries shown in report.html.
      tail_patch_batch: proponents stepped at once in tail-patch (None: all k).
      first_order: beside each tail-patch Δp, its first-order prediction ⟨∇p, u⟩ from
        the same update u, and ||u|| (one forward-mode derivative of the query per step):
        whether a method's proponents move p by the direction or the size of their step,
        and how far one step is from linear.
      tail_patch_lr_scale: the tail-patch step's learning rate times this (1: the step
        as trained, the paper's protocol; smaller: a step nearer its first order, the
        same direction, so it separates what a ranking picks from how large one step is).
    """

    num_queries: int | None = 120
    num_distractors: int | None = 2500
    seed: int = 0
    seq_len: int = 128
    query_len: int = 48
    k: int = 10
    batch_size: int = 32
    dimension_sweep: Sequence[int] = (16, 64, 256)
    sweep_method: str = 'TrackStar'
    html_queries: int = 40
    tail_patch_batch: int | None = None
    first_order: bool = True
    tail_patch_lr_scale: float = 1.0


def select_facts(
    facts: Sequence[dict], corpus_ids: set[str], num: int | None, seed: int
) -> list[dict]:
    """Facts with an entailing example in the corpus, sampled round-robin over relations."""
    usable = [f for f in facts if any(i in corpus_ids for i in f['entailing_ids'])]
    if num is None or num >= len(usable):
        return usable
    picked = mixture_lib.round_robin(usable, num, np.random.default_rng(seed))
    return sorted(picked, key=lambda f: f['id'])


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
    batch = examples_lib.pad_batch(queries, len(queries), query_len)
    toks, mask = batch['tokens'], batch['loss_mask']
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


@dataclasses.dataclass
class EvalData:
    """The evaluation's facts, candidates and queries."""

    facts: list[dict]
    pool: list[dict]
    entailing: dict[str, set[str]]
    candidates: list[dict]
    queries: list[dict]


def prepare_data(
    records: Sequence[dict], all_facts: Sequence[dict], tokenizer: Any, config: EvalConfig
) -> EvalData:
    """The facts, candidate pool and examples ``evaluate`` uses for ``config``."""
    facts = select_facts(all_facts, {r['id'] for r in records}, config.num_queries, config.seed)
    if not facts:
        raise ValueError(
            f'No fact has an entailing passage in the corpus ({len(all_facts)} facts, '
            f'{len(records)} passages): check that entailing_ids name corpus ids.'
        )
    pool = candidate_pool(records, facts, config.num_distractors, config.seed)
    pool_ids = {r['id'] for r in pool}
    entailing = {f['id']: {i for i in f['entailing_ids'] if i in pool_ids} for f in facts}
    return EvalData(
        facts,
        pool,
        entailing,
        examples_lib.corpus_examples(pool, tokenizer, config.seq_len),
        examples_lib.fact_queries(facts, tokenizer, config.query_len),
    )


def _content_tag(loaded, spec: grads.GradientSpec, config: EvalConfig, data: EvalData) -> str:
    """A hash of everything the gradient indices depend on: a changed model, spec or
    example (ids, tokens, masks) never meets a stale index."""
    h = hashlib.sha256(
        json.dumps(
            [
                checkpoint.fingerprint(loaded.params),
                spec.to_dict(),
                config.seq_len,
                config.query_len,
            ]
        ).encode()
    )
    for ex in (*data.candidates, *data.queries):
        h.update(ex['id'].encode())
        h.update(np.asarray(ex['tokens'], np.int32).tobytes())
        h.update(np.asarray(ex['loss_mask'], np.float32).tobytes())
    return h.hexdigest()[:8]


def gradient_indices(
    loaded: LoadedModel,
    spec: grads.GradientSpec,
    data: EvalData,
    config: EvalConfig,
    mesh: Any,
    root: str,
) -> Callable[[str, str], tuple[index_lib.Index, index_lib.Index]]:
    """get(correction, output_fn) -> (train, queries) indices, built once each under
    ``root`` (resumable; a study over the same setup reuses the evaluation's indices)."""
    cache: dict[tuple[str, str], tuple[index_lib.Index, index_lib.Index]] = {}
    tag = _content_tag(loaded, spec, config, data)
    extra = {'checkpoint_dir': os.path.abspath(loaded.checkpoint_dir)}

    def get(correction: str, output_fn: str):
        if (correction, output_fn) not in cache:
            s = dataclasses.replace(spec, correction=correction, output_fn=output_fn)
            feat = grads.Featurizer(
                loaded.model, loaded.params, s, opt_state=loaded.opt_state, mesh=mesh
            )
            base = os.path.join(root, f'{correction}_{output_fn}_{tag}')
            built = []
            for name, examples, length in (
                ('train', data.candidates, config.seq_len),
                ('queries', data.queries, config.query_len),
            ):
                cfg = pipeline.IndexConfig(
                    seq_len=length, batch_size=config.batch_size, chunk_rows=config.batch_size * 8
                )
                built.append(
                    pipeline.featurize(
                        feat, examples, os.path.join(base, name), cfg, manifest_extra=extra
                    )
                )
            cache[(correction, output_fn)] = tuple(built)
        return cache[(correction, output_fn)]

    return get


def _representer_ranking(
    loaded, spec, data, config, mesh, root, k, tokenizer
) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Representer points (support-samples seed, the tutorial's representer row): the
    candidates' token index at the checkpoint, each query's completion scored against
    every candidate by Σ α_{i,v_t}⟨φ_i, φ′_t⟩ (:func:`support.representer_scores`);
    exact top-k, ties by id. Also, per query, the training tokens that most promote and
    most deter its first completion token (for report.html)."""
    tag = _content_tag(loaded, spec, config, data)
    cfg = support.SupportConfig(seq_len=config.seq_len, batch_size=config.batch_size)
    url = os.path.join(root, f'representer_{tag}')
    extra = {'checkpoint_dir': os.path.abspath(loaded.checkpoint_dir)}
    tok = support.TokenIndex(
        support.featurize_tokens(
            loaded.model, loaded.params, data.candidates, url, cfg, mesh=mesh, manifest_extra=extra
        )  # fmt: skip
    )
    out, tokens_of = {}, {}
    by_id = {ex['id']: ex for ex in data.candidates}
    for q in data.queries:
        phis, tokens = support.completion_features(loaded.model, loaded.params, q)
        ids, scores = support.representer_scores(tok, phis, tokens)
        order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))[:k]
        out[q['id']] = [ids[i] for i in order]
        c = tok.contributions(int(tokens[0]), phis[0], k)
        tokens_of[q['id']] = {
            'token': tokenizer.decode([int(tokens[0])]),
            **support.describe(c, by_id.__getitem__, tokenizer.decode),
        }
    return out, tokens_of


def sweep_indices(train, queries, block_dim: int, root: str):
    """The train/query indices of a smaller projection (side x side sub-blocks)."""
    nb = len(train.manifest['layout']['block_names'])
    src_side = int(round(train.manifest['layout']['block_dim'] ** 0.5))
    side = int(round(block_dim**0.5))
    if side * side != block_dim or side >= src_side:
        raise ValueError(
            f'dimension_sweep entry {block_dim} must be a square < {src_side * src_side}.'
        )
    upd = {
        'spec': {**train.manifest['spec'], 'block_dim': block_dim},
        'layout': {**train.manifest['layout'], 'block_dim': block_dim},
    }
    fn = sub_block(src_side, side, nb)
    return (
        index_lib.derive(train, os.path.join(root, 'train'), fn, upd),
        index_lib.derive(queries, os.path.join(root, 'queries'), fn, upd),
        nb * block_dim,
    )


def _baseline_ranking(m: Method, data: EvalData, k: int) -> dict[str, list[str]]:
    if m.kind == 'gold':
        return {f['id']: sorted(data.entailing[f['id']])[:k] for f in data.facts}
    from trackstar_jax.eval import baselines

    fn = baselines.bm25_top_k if m.kind == 'bm25' else baselines.dense_top_k
    query_texts = [f['prompt'] + f['target'] for f in data.facts]
    ids, _ = fn([r['id'] for r in data.pool], [r['text'] for r in data.pool], query_texts, k)
    return dict(zip([f['id'] for f in data.facts], ids, strict=True))


# Per-query values beside tail-patch when the first-order prediction is measured:
# ⟨∇p, u⟩, ||u|| and ⟨∇p, u⟩ / ||u|| (the step's direction alone), each over the top k.
STEP_KEYS = ('first_order', 'update_norm', 'first_order_per_norm')


def per_query_values(
    ranking: Mapping[str, Sequence[str]],
    entailing: Mapping[str, set[str]],
    deltas: Mapping[tuple[str, str], float],
    qids: Sequence[str],
    k: int,
    steps: Mapping[tuple[str, str], tuple[float, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Per query: reciprocal rank, hit@min(k, 10), mean tail-patch Δp over its top k and,
    given ``steps`` ((⟨∇p, u⟩, ||u||) per pair), the means of :data:`STEP_KEYS`."""
    at = min(k, 10)

    def over_top_k(value) -> np.ndarray:
        return np.array(
            [np.mean([value(q, p) for p in ranking[q][:k]]) if ranking[q] else np.nan for q in qids]
        )

    out = {
        'rr': np.array([metrics.reciprocal_rank(ranking[q], entailing[q]) for q in qids]),
        'hit': np.array([float(any(x in entailing[q] for x in ranking[q][:at])) for q in qids]),
        'tail_patch': over_top_k(lambda q, p: deltas[(q, p)]),
    }
    if steps is not None:
        out['first_order'] = over_top_k(lambda q, p: steps[(q, p)][0])
        out['update_norm'] = over_top_k(lambda q, p: steps[(q, p)][1])
        out['first_order_per_norm'] = over_top_k(
            lambda q, p: steps[(q, p)][0] / max(steps[(q, p)][1], 1e-30)
        )
    return out


def _metrics_row(ranking, entailing, deltas, qids, k, steps=None) -> dict[str, Any] | None:
    """Each metric's mean over ``qids`` and its 95% bootstrap interval over queries."""
    if not qids:
        return None
    values = per_query_values(ranking, entailing, deltas, qids, k, steps)
    row: dict[str, Any] = {'queries': len(qids)}
    named = [('rr', 'mrr'), ('hit', f'recall@{min(k, 10)}'), ('tail_patch', 'tail_patch')]
    for key, name in named + [(key, key) for key in STEP_KEYS if key in values]:
        v = values[key][np.isfinite(values[key])]
        if not len(v):
            row[name], row[f'{name}_ci'] = float('nan'), None
            continue
        mean, low, high = stats.bootstrap_ci(v)
        row[name], row[f'{name}_ci'] = mean, [low, high]
    return row


def first_order_agreement(
    deltas: Mapping[tuple[str, str], float], steps: Mapping[tuple[str, str], Sequence[float]]
) -> dict[str, Any]:
    """How close one tail-patch step is to its first-order prediction, over every
    stepped (query, proponent) pair: Spearman and Pearson correlation of measured Δp with
    ⟨∇p, u⟩, the least-squares slope through 0 (1: linear), and the share of pairs where
    both have the same sign."""
    keys = sorted(deltas)
    measured = np.array([deltas[k] for k in keys], np.float64)
    predicted = np.array([steps[k][0] for k in keys], np.float64)
    if len(keys) < 2 or np.ptp(measured) == 0 or np.ptp(predicted) == 0:
        return {'pairs': len(keys), 'spearman': None, 'pearson': None, 'slope': None,
                'same_sign': None}  # fmt: skip
    return {
        'pairs': len(keys),
        'spearman': float(lds_lib.spearman(measured, predicted)),
        'pearson': float(np.corrcoef(measured, predicted)[0, 1]),
        'slope': float(measured @ predicted / (predicted @ predicted)),
        'same_sign': float(np.mean(np.sign(measured) == np.sign(predicted))),
    }


def comparisons(
    per_query: Mapping[str, Mapping[str, np.ndarray]], names: Sequence[str]
) -> list[dict[str, Any]]:
    """Every pair of methods on every metric: paired bootstrap interval of the mean
    difference (a - b) over the same queries, and the sign-flip test's p."""
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for key in ('rr', 'hit', 'tail_patch', 'first_order'):
                if key not in per_query[a] or key not in per_query[b]:
                    continue
                va, vb = per_query[a][key], per_query[b][key]
                keep = np.isfinite(va) & np.isfinite(vb)
                if not keep.any():
                    continue
                pair = stats.paired_bootstrap(va[keep], vb[keep])
                pair['p_sign_flip'] = stats.sign_flip_test(va[keep], vb[keep])
                out.append({'a': a, 'b': b, 'metric': key, 'queries': int(keep.sum()), **pair})
    return out


def load_for_evaluation(
    checkpoint_dir: str, mesh: Any, train_if_missing: bool = False
) -> LoadedModel:
    """The checkpoint, refused without optimizer state (tail-patch and the correction
    need V); with ``train_if_missing`` the demo model is trained first."""
    if checkpoint.latest_step(checkpoint_dir) is None:
        if not train_if_missing:
            raise FileNotFoundError(
                f'No checkpoint in {checkpoint_dir}. Check evaluate.checkpoint_dir, or leave '
                'it unset to train the embedded demo model in <workdir>/checkpoints.'
            )
        from trackstar_jax.jobs import train_lm

        logging.info('No checkpoint in %s: training the model first.', checkpoint_dir)
        train_lm.train_lm(workdir=os.path.dirname(os.path.abspath(checkpoint_dir)))
    loaded = load_model(checkpoint_dir, mesh)
    if loaded.opt_state is None:
        raise ValueError(
            f'{checkpoint_dir} has no optimizer state: run launch/estimate_second_moments.py '
            'first (tail-patch and the adafactor correction need V).'
        )
    return loaded


@gin.configurable(denylist=['workdir'])
def evaluate(
    *,
    workdir: str,
    checkpoint_dir: str | None = None,
    methods: Sequence[Method] = gin.REQUIRED,
    spec: grads.GradientSpec = gin.REQUIRED,
    facts_path: str = corpus_lib.FACTS_PATH,
    corpus_path: str = corpus_lib.CORPUS_PATH,
    tokenizer_path: str = corpus_lib.TOKENIZER_PATH,
    config: EvalConfig = EvalConfig(),
    fit: FitConfig = FitConfig(),
    train_if_missing: bool = False,
    mesh_axes: Sequence[tuple[str, int]] = ((shd.DATA, -1), (shd.MODEL, 1)),
    mixture: mixture_lib.FactMixture | None = None,
) -> dict[str, Any]:
    """Runs the fact-tracing evaluation; writes its outputs under ``workdir`` and returns them.

    Args:
      workdir: outputs: indices/, preconditioners/, results.json / .md, PNGs, report.html.
      checkpoint_dir: the model: a ``train_lm`` checkpoint with optimizer state, or an
        imported one with estimated second moments (``launch/estimate_second_moments.py``);
        None: ``workdir/checkpoints``.
      methods: the table's rows.
      spec: the gradient spec of the full-dimension features (each method overrides its
        correction and output_fn).
      facts_path: JSONL facts {"id", "prompt", "target", "entailing_ids"}.
      corpus_path: JSONL corpus {"id", "text"}.
      tokenizer_path: SentencePiece model of the checkpoint (ignored when the checkpoint
        carries its own tokenizer, as an imported one does).
      config: sampling and measurement settings.
      fit: λ, damping and the rest of the preconditioner fit (each method sets its kind).
      train_if_missing: train the model with the gin-configured ``train_lm`` first when
        ``checkpoint_dir`` is None and ``workdir/checkpoints`` holds no checkpoint (the
        embedded default); a named ``checkpoint_dir`` without a checkpoint is an error.
      mesh_axes: the mesh.
      mixture: the model was trained on this fact-dense mixture (``train_lm.mixture``):
        its evaluated facts are the queries and every passage of it is a candidate
        (``config.num_queries`` and ``num_distractors`` are then not used).
    """
    t_start = time.time()
    _check_settings(methods, config)
    os.makedirs(workdir, exist_ok=True)
    mixture_summary = None
    if mixture is not None:
        paths = mixture_lib.write(workdir, mixture, corpus_path, facts_path)
        corpus_path, facts_path = paths['passages'], paths['facts']
        config = dataclasses.replace(config, num_queries=None, num_distractors=None)
        with open(paths['summary']) as f:
            mixture_summary = json.load(f)
    mesh = shd.make_mesh(mesh_axes)
    # Training stands in only for the workdir's own model: a checkpoint_dir the user
    # names (perhaps mistyped) is never silently replaced by a freshly trained model.
    train_if_missing = train_if_missing and checkpoint_dir is None
    checkpoint_dir = checkpoint_dir or os.path.join(workdir, 'checkpoints')
    loaded = load_for_evaluation(checkpoint_dir, mesh, train_if_missing)
    if mixture_summary is not None:
        from trackstar_jax.jobs.train_lm import MIXTURE_KEY

        trained_on = checkpoint.restore_config(checkpoint_dir, loaded.step).get(MIXTURE_KEY)
        if trained_on != mixture_summary['sha256']['corpus']:
            # A model trained on other data (an older run in the same workdir, or another
            # mixture) would be evaluated on facts it never saw: refuse, never substitute.
            raise ValueError(
                f'The model in {checkpoint_dir} was not trained on this mixture '
                f'({"no mixture" if trained_on is None else "another mixture"}). Use a new '
                'workdir, delete its checkpoints to retrain, or unset evaluate.mixture.'
            )
    tokenizer = checkpoint_tokenizer(loaded, tokenizer_path)
    data = prepare_data(
        corpus_lib.load_corpus(corpus_path), corpus_lib.load_facts(facts_path), tokenizer, config
    )
    k = config.k
    if k > len(data.candidates):
        raise ValueError(
            f'EvalConfig.k = {k} exceeds the {len(data.candidates)} candidate passages: '
            f'set k <= {len(data.candidates)} or raise num_distractors.'
        )
    logging.info(
        'Evaluation: %d queries, %d candidates (%d entailing).',
        len(data.queries),
        len(data.candidates),
        len(set().union(*data.entailing.values())),
    )
    correct, predicted, p_target = predictions(loaded, data.queries, tokenizer, config.query_len)
    indices = gradient_indices(loaded, spec, data, config, mesh, os.path.join(workdir, 'indices'))
    # Opponents (the most negative scores) come from the same streamed pass.
    score_config = ScoreConfig(k=k, opponents=k)
    fitted: dict = {}
    scored: dict[str, Any] = {}

    def gradient_ranking(m: Method, train, queries, name=None):
        res, pre = pipeline.run_method(
            m, train, queries, fit, score_config, mesh=mesh, fitted=fitted
        )
        scored[name or m.name] = res
        info = {key: pre.info[key] for key in ('lam', 'k_component') if key in pre.info}
        return dict(zip(res.query_ids, res.ids, strict=True)), info, pre

    rankings: dict[str, dict[str, list[str]]] = {}
    support_tokens: dict[str, dict] = {}
    info: dict[str, dict] = {}
    t_methods = time.time()
    for i, m in enumerate(methods, 1):
        t0 = time.time()
        if m.kind == 'gradient':
            rankings[m.name], info[m.name], pre = gradient_ranking(
                m, *indices(m.correction, m.output_fn)
            )
            if pre.kind != 'none' and jax.process_index() == 0:
                pre.save(os.path.join(workdir, 'preconditioners', _slug(m.name)))
        elif m.kind == 'representer':
            rankings[m.name], support_tokens = _representer_ranking(
                loaded, spec, data, config, mesh, os.path.join(workdir, 'indices'), k, tokenizer
            )
        else:
            rankings[m.name] = _baseline_ranking(m, data, k)
        info.setdefault(m.name, {})['seconds'] = time.time() - t0
        eta = (time.time() - t_methods) / i * (len(methods) - i)
        logging.info(
            'Method %d of %d (%s) ranked in %.1fs; ETA of the other methods %.0fs.',
            i,
            len(methods),
            m.name,
            time.time() - t0,
            eta,
        )

    # Dimension sweep of one method (Figure 2), from sub-blocks of its full index.
    sweep_rows = []
    base = next((m for m in methods if m.name == config.sweep_method), None)
    if base is not None and base.kind == 'gradient' and config.dimension_sweep:
        train, queries = indices(base.correction, base.output_fn)
        for block_dim in config.dimension_sweep:
            root = os.path.join(os.path.dirname(train.path), f'sub_{block_dim}')
            t_sub, q_sub, dim = sweep_indices(train, queries, block_dim, root)
            name = f'{base.name}@D={dim}'
            rankings[name], info[name], _ = gradient_ranking(base, t_sub, q_sub, name)
            sweep_rows.append((name, dim))
        sweep_rows.append((base.name, train.dim))

    # Tail-patch every (query, proponent) pair any method retrieved, once.
    t0 = time.time()
    pairs = sorted(
        {(q, p) for ranked in rankings.values() for q, ps in ranked.items() for p in ps[:k]}
    )
    step_config = tail_patch_lib.scaled_step(loaded.train_config, config.tail_patch_lr_scale)
    fn = tail_patch_lib.make_tail_patch(
        loaded.model, step_config, config.tail_patch_batch, config.first_order
    )
    measured = tail_patch_lib.tail_patch_scores(
        fn,
        loaded.params,
        loaded.opt_state,
        pairs,
        {q['id']: q for q in data.queries},
        {c['id']: c for c in data.candidates},
        k,
        config.seq_len,
        config.query_len,
    )
    logging.info('Tail-patch: %d steps in %.1fs.', len(pairs), time.time() - t0)
    steps, first_order = None, None
    if config.first_order:
        deltas = {pair: v[0] for pair, v in measured.items()}
        steps = {pair: v[1:] for pair, v in measured.items()}
        first_order = first_order_agreement(deltas, steps)
    else:
        deltas = measured

    all_q = [f['id'] for f in data.facts]
    right = [q for q in all_q if correct[q]]
    wrong = [q for q in all_q if not correct[q]]
    table = {
        name: {
            split: _metrics_row(rankings[name], data.entailing, deltas, qids, k, steps)
            for split, qids in (('all', all_q), ('correct', right), ('incorrect', wrong))
        }
        | info.get(name, {})
        for name in rankings
    }
    per_query = {
        name: per_query_values(rankings[name], data.entailing, deltas, all_q, k, steps)
        for name in rankings
    }
    results = {
        'command': None,
        'checkpoint_dir': os.path.abspath(checkpoint_dir),
        'checkpoint_step': loaded.step,
        'num_queries': len(data.facts),
        'num_candidates': len(data.pool),
        'num_correct': len(right),
        'k': k,
        'recall_at': min(k, 10),  # Recall@10 as in the paper, or @k when fewer are retrieved
        'spec': spec.to_dict(),
        'mixture': mixture_summary,
        'config': _jsonable(dataclasses.asdict(config)),
        'fit': _jsonable(dataclasses.asdict(fit)),
        'damping': fit.damping,
        'methods': {m.name: dataclasses.asdict(m) for m in methods},
        'table': table,
        'dimension_sweep': [{'method': n, 'dim': d, **table[n]['all']} for n, d in sweep_rows],
        'first_order': first_order,
        'confidence': 'bootstrap 95% intervals over queries (10,000 resamples, seed 0); '
        'comparisons: paired bootstrap of the per-query difference and a sign-flip test',
        'comparisons': comparisons(per_query, [m.name for m in methods]),
        'query_ids': all_q,
        'per_query': {
            n: {key: [x if np.isfinite(x) else None for x in v.tolist()] for key, v in d.items()}
            for n, d in per_query.items()
        },
        'rankings': rankings,
        'outputs': {
            name: os.path.join(workdir, name)
            for name in ('results.json', 'results.md', 'report.html', 'indices', 'preconditioners')
        },
        'seconds': time.time() - t_start,
    }
    if jax.process_index() == 0:
        texts = {r['id']: r['text'] for r in data.pool}
        results['outputs']['tda'] = {
            name: write_tda_jsonl(
                os.path.join(workdir, 'tda', f'{_slug(name)}.jsonl'), res, data, texts
            )
            for name, res in scored.items()
        }
        details = report.QueryDetails(
            data.facts,
            rankings,
            deltas,
            data.entailing,
            predicted,
            correct,
            p_target,
            texts,
            {n: dict(zip(r.query_ids, r.opponent_ids, strict=True)) for n, r in scored.items()},
            support_tokens,
        )
        report.write_all(workdir, results, details, config.html_queries, k)
    return results


def write_tda_jsonl(path: str, res: Any, data: EvalData, texts: Mapping[str, str]) -> str:
    """One method's proponents and opponents per query, in the JSONL format of the
    TrackStar authors' released results (PAIR-code/pretraining-tda's viewer reads it).

    Fields per query: example_id, inputs_plaintext, targets_plaintext, proponents,
    proponent_ids, proponent_scores, opponents, opponent_ids, opponent_scores, fact_id,
    relation, proponent_correct (whether each proponent entails the fact). Written with
    a checksum beside it.
    """
    facts = {f['id']: f for f in data.facts}
    lines = []
    for q, qid in enumerate(res.query_ids):
        f = facts[qid]
        keep = res.rows[q] >= 0
        pro = [i for i, ok in zip(res.ids[q], keep, strict=True) if ok]
        opp_keep = res.opponent_rows[q] >= 0 if res.opponent_rows is not None else []
        opp = (
            [i for i, ok in zip(res.opponent_ids[q], opp_keep, strict=True) if ok]
            if len(opp_keep)
            else []
        )
        lines.append(
            {
                'example_id': qid,
                'inputs_plaintext': f['prompt'],
                'targets_plaintext': f['target'],
                'proponents': [texts.get(i, '') for i in pro],
                'proponent_ids': pro,
                'proponent_scores': [float(x) for x in res.scores[q][keep]],
                'opponents': [texts.get(i, '') for i in opp],
                'opponent_ids': opp,
                'opponent_scores': (
                    [float(x) for x in res.opponent_scores[q][opp_keep]] if opp else []
                ),
                'fact_id': qid,
                'relation': f.get('relation', ''),
                'proponent_correct': [i in data.entailing[qid] for i in pro],
            }
        )
    text = ''.join(json.dumps(line) + '\n' for line in lines)
    return index_lib.write_checked(path, text.encode())


def _check_settings(methods: Sequence[Method], config: EvalConfig) -> None:
    """Settings errors, raised before any work is done."""
    if config.k < 1:
        raise ValueError(f'EvalConfig.k must be >= 1, got {config.k}.')
    if not config.tail_patch_lr_scale > 0:
        raise ValueError(
            f'EvalConfig.tail_patch_lr_scale must be > 0, got {config.tail_patch_lr_scale}.'
        )
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f'Method names must be unique: {names}.')
    if config.dimension_sweep:
        base = next((m for m in methods if m.name == config.sweep_method), None)
        if base is None or base.kind != 'gradient':
            raise ValueError(
                f'EvalConfig.sweep_method {config.sweep_method!r} is not a gradient method of '
                f'this table ({names}); name one, or set dimension_sweep = ().'
            )


def _slug(name: str) -> str:
    return ''.join(c if c.isalnum() else '_' for c in name).strip('_').lower()


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=list))
