r"""Every attribution method on one small model, ranked by how well it predicts retraining.

    python benchmarks/lds.py           # -> results/methods.json and the README table
    python benchmarks/lds.py --quick   # a smoke run (tiny sets, few subsets), ~3 min

1. Data: ``--queries`` facts of the embedded fact set ("Hegira is a" -> " flight") and a
   training set of ``--train`` WordNet glosses: each fact's entailing gloss plus glosses
   drawn at random (seed 0).
2. A small decoder LM (2 layers, width 64, the embedded 4,096-piece vocabulary) is trained
   on the whole set (``--steps`` Adafactor steps; states kept at three checkpoints for
   TracIn-CP), then retrained from the same initialisation on each of ``--subsets``
   random halves of the training set (``eval.lds.subset_masks``, fixed seeds, the same
   number of steps) and, for leave-one-out, without each of ``--loo`` facts' entailing
   glosses. A retraining is a job: its outcome (each query's completion log-probability)
   is written to the workdir and a rerun skips it; ``--shard i/n`` runs every n-th one,
   so several processes can share the work.
3. Every method scores every (query, training example) pair at the fully trained model:
   the paper's Exp 1-5 and TrackStar, TRAK-style and TRAK (its full (ΦᵀΦ)⁻¹ and Q on our
   projection), TRAK as its paper defines it (one-sided JL projection of the whole
   gradient, Q, (ΦᵀΦ)⁻¹ per model; one model, and ``--trak_models`` models trained
   from different initialisations averaged), TracIn-CP over the three checkpoints,
   representer points, K-FAC and EK-FAC twice (dense-layer kernels in the full
   parameter space; and on the projected index, Kronecker factors of its blocks) and
   BM25, each through the library's own path
   (``pipeline.run_method``, ``pipeline.score_checkpoints``,
   ``support.representer_scores``, ``kfac.influence``, ``baselines.bm25_top_k``) with
   k = N.
4. Per method: LDS (``eval.lds``: Spearman between the predicted subset sums and the
   retrained log-probabilities, mean over queries with a 95% bootstrap interval),
   leave-one-out agreement (Spearman, over (query, removed gloss) pairs, between the
   score of the removed gloss and the drop in the query's log-probability), fact-tracing
   MRR / Recall@10 of the entailing gloss among the N training examples, tail-patch
   (one trainer step on each of the top 3 proponents, ``eval.tail_patch``) with its
   first-order prediction and the step's norm, and the seconds to build its indices and
   to score.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SEQ_LEN = 48
QUERY_LEN = 24
# Bergson's README (v0.26.1, GPT-2 fine-tune) and the TrackStar paper, for the comparison.
PEERS = {
    'bergson_lds': {
        'MAGIC': 0.983,
        'EK-FAC (Muon)': 0.474,
        'EK-FAC (Adam)': 0.257,
        'TrackStar': 0.184,
    },  # fmt: skip
    'bergson_note': 'Bergson v0.26.1 README: LDS on a GPT-2 fine-tune (not this setup)',
    'trackstar_paper_note': 'TrackStar paper Table 1 (fact tracing, 8B model): TrackStar > '
    'Exp 5 > Exp 4 > ... > Exp 1 on MRR and tail-patch',
}


def select_data(args) -> tuple[list[dict], list[dict], dict[str, str]]:
    """(facts, training records, entailing gloss id of each fact)."""
    from trackstar_jax.data import corpus as corpus_lib

    tokenizer = corpus_lib.Tokenizer()
    glosses = corpus_lib.load_corpus(sources=('wordnet',))
    by_id = {r['id']: r for r in glosses}
    facts, entailing = [], {}
    for f in corpus_lib.load_facts():
        ent = [e for e in f['entailing_ids'] if e in by_id]
        n_tokens = 1 + len(tokenizer.encode(f['prompt'])) + len(tokenizer.encode(f['target']))
        if len(ent) == 1 and ent[0] not in entailing.values() and n_tokens <= QUERY_LEN:
            facts.append(f)
            entailing[f['id']] = ent[0]
        if len(facts) == args.queries:
            break
    chosen = set(entailing.values())
    rng = np.random.default_rng(0)
    others = [r for r in glosses if r['id'] not in chosen]
    extra = rng.choice(len(others), args.train - len(chosen), replace=False)
    records = [by_id[i] for i in sorted(chosen)] + [others[i] for i in sorted(extra)]
    return facts, records, entailing


@dataclasses.dataclass(frozen=True)
class Setup:
    """The benchmark's data, model and retraining subsets, shared by the studies that
    reuse its workdir (lambda_rule.py, step_agreement.py)."""

    facts: list[dict]
    records: list[dict]
    train_ex: list[dict]
    query_ex: list[dict]
    gold: np.ndarray  # [Q] row of each fact's entailing gloss
    model: Any
    tc: Any  # train.TrainConfig
    masks: np.ndarray  # [M, N] the retraining subsets
    loo_rows: list[int]


def default_args(workdir: str, quick: bool) -> argparse.Namespace:
    """This script's default sizes (or ``--quick``'s) over ``workdir``, for the studies
    that read its retrainings."""
    ns = argparse.Namespace(train=512, queries=32, subsets=48, loo=8, steps=300,
                            shard='0/1', workdir=workdir, quick=quick)  # fmt: skip
    if quick:
        ns.train, ns.queries, ns.subsets, ns.loo, ns.steps = 64, 8, 8, 2, 30
    return ns


def setup(args) -> Setup:
    """Selects the data, tokenizes it, builds the model and draws the subsets."""
    from trackstar_jax.data import corpus as corpus_lib
    from trackstar_jax.data import examples as examples_lib
    from trackstar_jax.eval import lds

    tokenizer = corpus_lib.Tokenizer()
    facts, records, entailing = select_data(args)
    train_ex = examples_lib.corpus_examples(records, tokenizer, SEQ_LEN)
    query_ex = [examples_lib.query_example(f['id'], f['prompt'], f['target'], tokenizer,
                                           QUERY_LEN) for f in facts]  # fmt: skip
    row_of = {r['id']: i for i, r in enumerate(records)}
    gold = np.array([row_of[entailing[f['id']]] for f in facts])
    model, tc = model_and_config(args, tokenizer.vocab_size)
    masks = lds.subset_masks(len(train_ex), args.subsets, 0.5, seed=0)
    loo_rows = [int(g) for g in gold[: args.loo]]
    return Setup(facts, records, train_ex, query_ex, gold, model, tc, masks, loo_rows)


def model_and_config(args, vocab: int):
    from trackstar_jax import train
    from trackstar_jax.models import DecoderConfig, DecoderLM

    cfg = DecoderConfig(vocab_size=vocab, num_layers=2, d_model=64, num_heads=4,
                        num_kv_heads=1, mlp_dim=256, max_len=SEQ_LEN)  # fmt: skip
    tc = train.TrainConfig(batch_size=32, seq_len=SEQ_LEN, num_steps=args.steps,
                           warmup_steps=max(args.steps // 20, 1), learning_rate=1e-2,
                           min_dim_size_to_factor=32, seed=0)  # fmt: skip
    return DecoderLM(cfg), tc


def train_on(model, tc, examples, keep: np.ndarray, snapshots=()):
    """Trains from the fixed initialisation on ``examples[keep]``; returns the final
    state and {step: state} at ``snapshots``.

    Every run draws the same batches of the *whole* set (seed 0) and zeroes the loss
    masks of the examples it leaves out, so two runs differ in their data only: a
    leave-one-out run differs from the full one by one example, not by its data order.
    """
    import jax

    from trackstar_jax import sharding as shd
    from trackstar_jax import train
    from trackstar_jax.data import examples as examples_lib

    mesh = shd.make_mesh()
    state, shardings = train.create_train_state(model, tc, mesh)
    step = _train_step(model, tc, mesh, shardings)
    data = [ex if k else dict(ex, loss_mask=np.zeros_like(ex['loss_mask']))
            for ex, k in zip(examples, keep, strict=True)]  # fmt: skip
    rng = np.random.default_rng(0)
    kept = {}
    for s in range(tc.num_steps):
        if s in snapshots:  # host copies: the step donates the state's buffers
            kept[s] = jax.device_get(state)
        group = [data[i] for i in rng.choice(len(data), tc.batch_size, replace=False)]
        state, _ = step(state, examples_lib.pad_batch(group, tc.batch_size, SEQ_LEN))
    if tc.num_steps in snapshots:
        kept[tc.num_steps] = jax.device_get(state)
    return state, kept


_STEPS: dict[Any, Any] = {}


def _train_step(model, tc, mesh, shardings):
    from trackstar_jax import train

    key = (id(model), tc)
    if key not in _STEPS:
        _STEPS[key] = train.make_train_step(model, train.make_optimizer(tc), mesh, shardings)
    return _STEPS[key]


def query_log_probs(model, params, queries) -> np.ndarray:
    """[Q] mean log p of each query's completion tokens."""
    import jax

    from trackstar_jax import losses
    from trackstar_jax.data import examples as examples_lib

    batch = examples_lib.pad_batch(queries, len(queries), QUERY_LEN)
    logits = model.apply({'params': params}, batch['tokens'])
    lp = np.asarray(jax.device_get(losses.target_log_probs(logits, batch['tokens'])))
    m = batch['loss_mask']
    return (lp * m).sum(1) / m.sum(1)


def retrain_jobs(args, model, tc, examples, queries, masks, loo_rows) -> tuple:
    """Outcome [Q, M] of the subsets and [Q, L] of the leave-one-out retrainings; each
    retraining a resumable job in the workdir."""
    shard, shards = (int(x) for x in args.shard.split('/'))
    jobs = [('subset', j, masks[j]) for j in range(len(masks))]
    jobs += [('loo', r, np.arange(len(examples)) != r) for r in loo_rows]
    out_dir = os.path.join(args.workdir, 'retrain')
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    t0 = time.time()
    for i, (kind, j, keep) in enumerate(jobs):
        path = os.path.join(out_dir, f'{kind}_{j}.json')
        stamp = {'steps': tc.num_steps, 'train': len(examples), 'kept': int(keep.sum()),
                 'digest': harness_digest(keep), 'queries': [q['id'] for q in queries]}  # fmt: skip
        if os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            if done['stamp'] == stamp:
                results[(kind, j)] = np.asarray(done['outcome'])
                continue
        if i % shards != shard:
            continue
        state, _ = train_on(model, tc, examples, keep)
        outcome = query_log_probs(model, state.params, queries)
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump({'stamp': stamp, 'outcome': outcome.tolist()}, f)
        os.replace(tmp, path)  # a crash leaves no half-written result
        results[(kind, j)] = outcome
        print(f'[lds] retrain {kind} {j}: {i + 1}/{len(jobs)}, {time.time() - t0:.0f}s',
              flush=True)  # fmt: skip
    missing = [f'{k}_{j}' for k, j, _ in jobs if (k, j) not in results]
    if missing:
        raise SystemExit(f'{len(missing)} retrainings not done yet (other shards?): '
                         f'{missing[:5]}...')  # fmt: skip
    subsets = np.stack([results[('subset', j)] for j in range(len(masks))], axis=1)
    loo = np.stack([results[('loo', r)] for r in loo_rows], axis=1)
    return subsets, loo


def harness_digest(keep: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.packbits(keep).tobytes()).hexdigest()[:16]


def dense(result, n: int) -> np.ndarray:
    """[Q, N] scores from a k = N ScoreResult."""
    out = np.full((len(result.query_ids), n), np.nan)
    for q in range(len(result.query_ids)):
        ok = result.rows[q] >= 0
        out[q, result.rows[q][ok]] = result.scores[q][ok]
    if np.isnan(out).any():
        raise ValueError('A k = N result did not score every training example.')
    return out


def dense_by_id(result, ids: list[str]) -> np.ndarray:
    """[Q, N] scores from a k = N ScoreResult, columns in the order of ``ids``."""
    column = {e: i for i, e in enumerate(ids)}
    out = np.full((len(result.query_ids), len(ids)), np.nan)
    for q in range(len(result.query_ids)):
        for e, score in zip(result.ids[q], result.scores[q], strict=True):
            out[q, column[e]] = score
    if np.isnan(out).any():
        raise ValueError('A k = N result did not score every training example.')
    return out


# Short names for the JSON's readers (the table uses the display names).
SLUGS = {
    'Exp 1 (dot)': 'grad_dot', 'Exp 2 (+unit)': 'grad_cosine', 'Exp 3 (+R)': 'exp3',
    'Exp 4 (+optim)': 'exp4', 'Exp 5 (optim+R)': 'exp5', 'TrackStar': 'trackstar',
    'TRAK-style': 'trak_style', 'TRAK': 'trak', 'TracIn-CP': 'tracin_cp',
    'Representer points': 'representer', 'K-FAC': 'kfac', 'EK-FAC': 'ekfac', 'BM25': 'bm25',
    'K-FAC (projected)': 'kfac_projected', 'EK-FAC (projected)': 'ekfac_projected',
    'TRAK (paper, 1 model)': 'trak_paper', 'TRAK (paper, ensemble)': 'trak_paper_ensemble',
    'One step (first-order)': 'one_step_first_order',
}  # fmt: skip
KFAC_DAMPING = 0.1  # relative: λ = 0.1 x each layer's (or block's) mean eigenvalue
FIT_DAMPING = 0.01  # the library default, for R and TRAK's (ΦᵀΦ)⁻¹

GRADIENT_METHODS = {
    # name: (correction, output_fn, preconditioner, unit_norm): the rows of
    # gin_configs/methods/table1.gin.
    'Exp 1 (dot)': ('none', 'loss', 'none', False),
    'Exp 2 (+unit)': ('none', 'loss', 'none', True),
    'Exp 3 (+R)': ('none', 'loss', 'train', True),
    'Exp 4 (+optim)': ('adafactor', 'loss', 'none', True),
    'Exp 5 (optim+R)': ('adafactor', 'loss', 'train', True),
    'TrackStar': ('adafactor', 'loss', 'mixed', True),
    'TRAK-style': ('none', 'trak', 'train', False),
    # TRAK's (ΦᵀΦ)⁻¹ over all D projected dims and its Q = 1 − p̄ (in the 'trak' output)
    # on our two-sided projection, one model; the paper's own TRAK rows (one-sided
    # projection, ensemble) are scored in score_methods.
    'TRAK': ('none', 'trak', 'full', False),
    # Influence functions on the projected index: (F + λI)⁻¹ with F Kronecker-factored
    # per block (projected_kfac), damping KFAC_DAMPING as the full-space rows.
    'K-FAC (projected)': ('none', 'loss', 'kfac_projected', False),
    'EK-FAC (projected)': ('none', 'loss', 'ekfac_projected', False),
}


def score_methods(args, model, tc, train_ex, query_ex, records, facts, snapshots):
    """{method: {'scores': [Q, N], 'index_seconds', 'score_seconds'}}."""
    from trackstar_jax import grads, pipeline, support
    from trackstar_jax.eval import baselines

    # Indices are rebuilt every run (only retrainings are resumed), so that the index
    # seconds measure building them, not re-opening a finished one.
    work = os.path.join(args.workdir, 'indices')
    shutil.rmtree(work, ignore_errors=True)
    last = snapshots[max(snapshots)]
    spec = grads.GradientSpec(block_dim=256, num_layer_blocks=2)
    n = len(train_ex)
    cfg = pipeline.IndexConfig(seq_len=SEQ_LEN, batch_size=16, chunk_rows=128)
    qcfg = pipeline.IndexConfig(seq_len=QUERY_LEN, batch_size=16, chunk_rows=128)
    built: dict[tuple, tuple] = {}

    def indices(state, correction, output_fn, tag):
        key = (tag, correction, output_fn)
        if key not in built:
            s = dataclasses.replace(spec, correction=correction, output_fn=output_fn)
            feat = grads.Featurizer(model, state.params, s, opt_state=state.opt_state)
            t0 = time.time()
            base = os.path.join(work, f'idx_{tag}_{correction}_{output_fn}')
            tr = pipeline.featurize(feat, train_ex, os.path.join(base, 'train'), cfg)
            qu = pipeline.featurize(feat, query_ex, os.path.join(base, 'queries'), qcfg)
            built[key] = (tr, qu, time.time() - t0)
        return built[key]

    out = {}
    fitted: dict = {}
    for name, (correction, output_fn, pre, unit) in GRADIENT_METHODS.items():
        tr, qu, secs = indices(last, correction, output_fn, 'last')
        t0 = time.time()
        method = pipeline.Method(name=name, correction=correction, output_fn=output_fn,
                                 preconditioner=pre, unit_norm=unit)  # fmt: skip
        damping = KFAC_DAMPING if pre.endswith('kfac_projected') else FIT_DAMPING
        res, _ = pipeline.run_method(method, tr, qu, pipeline.FitConfig(damping=damping),
                                     pipeline.ScoreConfig(k=n), fitted=fitted)  # fmt: skip
        out[name] = {'scores': dense(res, n), 'index_seconds': secs,
                     'score_seconds': time.time() - t0}  # fmt: skip
        print(f'[lds] scored {name}', flush=True)

    # TracIn-CP: Σ_c η_c ⟨g_c(q), g_c(m)⟩ over the saved checkpoints, each with its own
    # Adafactor correction, unnormalised.
    from trackstar_jax import train as train_lib

    lr = train_lib.learning_rate_schedule(tc)
    checkpoints, secs_i = [], 0.0
    for step, state in sorted(snapshots.items()):
        tr, qu, secs = indices(state, 'adafactor', 'loss', f'step{step}')
        checkpoints.append(pipeline.Checkpoint(tr, qu, float(lr(max(step - 1, 0)))))
        secs_i += secs
    t0 = time.time()
    res = pipeline.score_checkpoints(checkpoints, pipeline.ScoreConfig(k=n, unit_norm=False))
    # Its rows number the examples in sorted id order, not the index's row order.
    total, secs_s = dense_by_id(res, [ex['id'] for ex in train_ex]), time.time() - t0
    out['TracIn-CP'] = {'scores': total, 'index_seconds': secs_i, 'score_seconds': secs_s,
                        'checkpoints': sorted(snapshots)}  # fmt: skip

    # TRAK as its paper defines it: the one-sided JL projection of the whole gradient
    # (one block of D dims), its Q (the 'trak' output), (ΦᵀΦ + δI)⁻¹ per model, averaged
    # over models trained from different initialisations (the first is the main model;
    # the others' training counts in the ensemble's index seconds).
    jl = grads.GradientSpec(block_dim=spec.block_dim * 4, num_layer_blocks=1,
                            split_attention_mlp=False, correction='none', output_fn='trak',
                            projection='one_sided')  # fmt: skip
    fit_full = pipeline.FitConfig(preconditioner='full', damping=FIT_DAMPING)
    members, secs_i = [], 0.0
    for i in range(args.trak_models):
        t0 = time.time()
        state = (
            last
            if i == 0
            else train_on(
                model, dataclasses.replace(tc, seed=tc.seed + i), train_ex, np.ones(n, bool)
            )[0]
        )
        feat = grads.Featurizer(model, state.params, jl)
        base = os.path.join(work, f'idx_trak_jl_{i}')
        tr = pipeline.featurize(feat, train_ex, os.path.join(base, 'train'), cfg)
        qu = pipeline.featurize(feat, query_ex, os.path.join(base, 'queries'), qcfg)
        members.append(pipeline.Checkpoint(tr, qu, 1.0, pipeline.fit(tr, None, fit_full)))
        secs_i += time.time() - t0
        if i == 0:
            secs_one = secs_i
    ids = [ex['id'] for ex in train_ex]
    for name, group, secs in (
        ('TRAK (paper, 1 model)', members[:1], secs_one),
        ('TRAK (paper, ensemble)', members, secs_i),
    ):
        t0 = time.time()
        weighted = [dataclasses.replace(c, weight=1.0 / len(group)) for c in group]
        res = pipeline.score_checkpoints(weighted, pipeline.ScoreConfig(k=n, unit_norm=False))
        out[name] = {'scores': dense_by_id(res, ids), 'index_seconds': secs,
                     'score_seconds': time.time() - t0, 'models': len(group)}  # fmt: skip
        print(f'[lds] scored {name}', flush=True)

    # Representer points: token index of the training glosses, scores summed per gloss.
    t0 = time.time()
    tok = support.TokenIndex(support.featurize_tokens(
        model, last.params, train_ex, os.path.join(work, 'tokens_last'),
        support.SupportConfig(seq_len=SEQ_LEN, batch_size=16)))  # fmt: skip
    t1 = time.time()
    number = {ex['id']: i for i, ex in enumerate(train_ex)}
    rep = np.zeros((len(query_ex), n))
    for q, ex in enumerate(query_ex):
        phis, tokens = support.completion_features(model, last.params, ex)
        ids, scores = support.representer_scores(tok, phis, tokens)
        for i, s in zip(ids, scores, strict=True):
            rep[q, number[i]] = s
    out['Representer points'] = {'scores': rep, 'index_seconds': t1 - t0,
                                 'score_seconds': time.time() - t1}  # fmt: skip

    # K-FAC / EK-FAC: the full parameter space of the dense-layer kernels (embedding and
    # norms left out), preconditioning the query gradients only.
    from trackstar_jax import kfac

    for name, corrected in (('K-FAC', False), ('EK-FAC', True)):
        t0 = time.time()
        kcfg = kfac.KfacConfig(seq_len=SEQ_LEN, batch_size=16, damping=KFAC_DAMPING,
                               eigenvalue_correction=corrected)  # fmt: skip
        fitted = kfac.fit(model, last.params, train_ex, kcfg)
        t1 = time.time()
        qcfg_k = dataclasses.replace(kcfg, seq_len=QUERY_LEN)
        scores = kfac.influence(fitted, model, last.params, query_ex, train_ex,
                                query_config=qcfg_k)  # fmt: skip
        out[name] = {'scores': scores, 'index_seconds': t1 - t0,
                     'score_seconds': time.time() - t1, 'damping': KFAC_DAMPING}  # fmt: skip
        print(f'[lds] scored {name}', flush=True)

    t0 = time.time()
    ids, scores = baselines.bm25_top_k([r['id'] for r in records], [r['text'] for r in records],
                                       [f['prompt'] + f['target'] for f in facts], k=n)  # fmt: skip
    bm = np.zeros((len(facts), n))
    for q in range(len(facts)):
        for i, s in zip(ids[q], scores[q], strict=True):
            bm[q, number[i]] = s
    out['BM25'] = {'scores': bm, 'index_seconds': 0.0, 'score_seconds': time.time() - t0}
    return out


TAIL_K = 3  # proponents per query in tail-patch


ONE_STEP = 'One step (first-order)'
# Changes to the trainer's step whose one-step ranking each method is also compared with.
STEP_VARIANTS = {'unclipped': {'clipping_threshold': 1e9}, 'frozen_v': {'decay_rate': 100.0}}


def one_step_scores(
    model, tc, last, train_ex, query_ex, variants: tuple[str, ...] = tuple(STEP_VARIANTS)
) -> dict[str, Any]:
    """The quantity tail-patch measures, to first order, for every pair: [Q, N]
    ⟨∇_θ p_q, u_m⟩ with u_m the trainer's one-step update on example m alone.

    Not an attribution method (it takes one optimizer step per candidate): the ceiling a
    score can reach on tail-patch, and the ranking each method's scores are compared
    with (``one_step_rho``: per-query Spearman over all candidates). Two variants of the
    step, with the same saved state, say which part of it sets that ranking:
    ``unclipped`` lifts Adafactor's update clipping (threshold 1e9) and ``frozen_v``
    keeps its second moments at the saved V (decay exponent 100: the step's own g²
    gets weight 0, so u = lr·clip(g/√V), the correction TrackStar applies);
    ``variants`` names those computed (each costs as much as the step itself).
    """
    from trackstar_jax.eval import tail_patch as tp

    t0 = time.time()
    out = {}
    configs = {'scores': tc, **{name: dataclasses.replace(tc, **change)
                                for name, change in STEP_VARIANTS.items()
                                if name in variants}}  # fmt: skip
    for name, config in configs.items():
        fn = tp.make_first_order_matrix(model, config)
        out[name] = tp.first_order_matrix(fn, last.params, last.opt_state, query_ex, train_ex,
                                          k=16, seq_len=SEQ_LEN, query_len=QUERY_LEN)  # fmt: skip
    print(f'[lds] scored {ONE_STEP}: {time.time() - t0:.0f}s', flush=True)
    return {**out, 'index_seconds': 0.0, 'score_seconds': time.time() - t0}


def tail_patch_metrics(model, tc, last, train_ex, query_ex, methods) -> dict[str, dict]:
    """Per method: tail-patch Δp (pp) of its top TAIL_K proponents per query, the
    first-order prediction of the same steps and the mean update norm ||u||.

    One step of the trainer's own Adafactor (the saved state, the schedule's rate at the
    last step) on each proponent alone (``eval.tail_patch``); every distinct (query,
    proponent) pair is stepped once and shared by the methods that chose it.
    """
    from trackstar_jax.eval import stats
    from trackstar_jax.eval import tail_patch as tp

    top = {name: np.argsort(-m['scores'], axis=1, kind='stable')[:, :TAIL_K]
           for name, m in methods.items()}  # fmt: skip
    pairs = sorted({(query_ex[q]['id'], train_ex[int(r)]['id'])
                    for t in top.values() for q in range(len(query_ex)) for r in t[q]})  # fmt: skip
    queries = {ex['id']: ex for ex in query_ex}
    examples = {ex['id']: ex for ex in train_ex}
    args = (last.params, last.opt_state, pairs, queries, examples)
    kw = dict(k=12, seq_len=SEQ_LEN, query_len=QUERY_LEN)
    t0 = time.time()
    measured = tp.tail_patch_scores(tp.make_tail_patch(model, tc), *args, **kw)
    first = tp.tail_patch_scores(tp.make_first_order(model, tc), *args, **kw)
    print(f'[lds] tail-patch: {len(pairs)} steps, {time.time() - t0:.0f}s', flush=True)
    out = {}
    for name, t in top.items():
        keys = [[(query_ex[q]['id'], train_ex[int(r)]['id']) for r in t[q]]
                for q in range(len(query_ex))]  # fmt: skip
        per_q = np.array([np.mean([measured[k] for k in ks]) for ks in keys]) * 100
        pred_q = np.array([np.mean([first[k][0] for k in ks]) for ks in keys]) * 100
        mean, lo, hi = stats.bootstrap_ci(per_q)
        out[name] = {
            'tail_patch_pp': mean,
            'tail_patch_ci': [lo, hi],
            'first_order_pp': float(pred_q.mean()),
            'update_norm': float(np.mean([first[k][1] for ks in keys for k in ks])),
            'tail_patch_per_query': per_q.tolist(),
            'first_order_per_query': pred_q.tolist(),
        }
    every = sorted(measured)
    agreement = lds_spearman([first[k][0] for k in every], [measured[k] for k in every])
    return {'methods': out, 'steps': len(pairs), 'first_order_spearman': agreement}


# What each part of TrackStar changes: (with, without) pairs of the paper's ablations.
ABLATION_PAIRS = {
    'unit norm': ('Exp 2 (+unit)', 'Exp 1 (dot)'),
    'R_train, no correction': ('Exp 3 (+R)', 'Exp 2 (+unit)'),
    'optimizer correction': ('Exp 4 (+optim)', 'Exp 2 (+unit)'),
    'R_train, with correction': ('Exp 5 (optim+R)', 'Exp 4 (+optim)'),
    'R_eval mixed in': ('TrackStar', 'Exp 5 (optim+R)'),
    'all of TrackStar vs cosine': ('TrackStar', 'Exp 2 (+unit)'),
}


def ablation_effects(per_query: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """Paired (same queries) differences with-minus-without for each ABLATION_PAIRS
    entry and metric, with 95% bootstrap intervals over queries."""
    from trackstar_jax.eval import stats

    out = {}
    for part, (a, b) in ABLATION_PAIRS.items():
        if a not in per_query or b not in per_query:
            continue
        row = {'with': a, 'without': b}
        for metric in ('lds', 'rr', 'tail_patch', 'first_order', 'one_step_rho',
                       *(f'{v}_rho' for v in STEP_VARIANTS)):  # fmt: skip
            x, y = per_query[a][metric], per_query[b][metric]
            ok = np.isfinite(x) & np.isfinite(y)
            row[metric] = stats.paired_bootstrap(x[ok], y[ok])
        out[part] = row
    return out


def lds_spearman(a, b) -> float:
    from trackstar_jax.eval import lds

    return float(lds.spearman(np.asarray(a), np.asarray(b)))


def gold_ranks(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """[Q] 1-based rank of each query's entailing example (ties count ahead of it)."""
    s_gold = scores[np.arange(len(gold)), gold]
    return (scores >= s_gold[:, None]).sum(1)


def fact_metrics(scores: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """MRR and Recall@10 of each query's entailing example (ties broken against it)."""
    rank = gold_ranks(scores, gold)
    return {'mrr': float((1.0 / rank).mean()), 'recall_at_10': float((rank <= 10).mean())}


def run(args) -> dict[str, Any]:
    import jax

    from trackstar_jax import train as train_lib
    from trackstar_jax.eval import lds, stats

    t0 = time.time()
    os.makedirs(args.workdir, exist_ok=True)
    data = setup(args)
    facts, records, train_ex, query_ex = data.facts, data.records, data.train_ex, data.query_ex
    gold, model, tc, masks, loo_rows = data.gold, data.model, data.tc, data.masks, data.loo_rows
    checkpoints = (tc.num_steps // 3, 2 * tc.num_steps // 3, tc.num_steps)
    t_train = time.time()
    last, snapshots = train_on(model, tc, train_ex, np.ones(len(train_ex), bool),
                               snapshots=checkpoints)  # fmt: skip
    train_seconds = time.time() - t_train
    full = query_log_probs(model, last.params, query_ex)
    subsets, loo = retrain_jobs(args, model, tc, train_ex, query_ex, masks, loo_rows)
    methods = score_methods(args, model, tc, train_ex, query_ex, records, facts, snapshots)
    methods[ONE_STEP] = one_step_scores(model, tc, last, train_ex, query_ex)
    one_step = methods[ONE_STEP]['scores']
    variant_scores = {v: methods[ONE_STEP].pop(v) for v in STEP_VARIANTS}
    tails = tail_patch_metrics(model, tc, last, train_ex, query_ex, methods)
    rows, per_query = {}, {}
    for name, m in methods.items():
        s = m['scores']
        r = lds.lds(s, masks, subsets)
        per_query[name] = {
            'lds': np.asarray(r.per_query, float),
            'rr': 1.0 / gold_ranks(s, gold),
            'tail_patch': np.asarray(tails['methods'][name]['tail_patch_per_query']),
            'first_order': np.asarray(tails['methods'][name]['first_order_per_query']),
            'one_step_rho': np.array([lds.spearman(s[q], one_step[q]) for q in range(len(s))]),
            **{f'{v}_rho': np.array([lds.spearman(s[q], t[q]) for q in range(len(s))])
               for v, t in variant_scores.items()},
        }  # fmt: skip
        rhos = {}
        for key in ('one_step_rho', *(f'{v}_rho' for v in STEP_VARIANTS)):
            rho = per_query[name][key]
            mean, lo, hi = stats.bootstrap_ci(rho[np.isfinite(rho)])
            rhos[key], rhos[key + '_ci'] = mean, [lo, hi]
        # LOO: the drop in query q's log-probability when gloss r is removed, against
        # the score of r for q, over every (query, removed gloss) pair.
        drop = full[:, None] - loo
        loo_rho = lds.spearman(s[:, loo_rows].ravel(), drop.ravel())
        rows[name] = {
            'slug': SLUGS[name],
            'lds': r.mean,
            'lds_ci': list(r.ci),
            'lds_queries': int(np.isfinite(r.per_query).sum()),
            'loo_spearman': loo_rho,
            **fact_metrics(s, gold),
            **tails['methods'][name],
            **rhos,
            'index_seconds': m['index_seconds'],
            'score_seconds': m['score_seconds'],
        }
        brief = {k: v for k, v in rows[name].items() if not k.endswith('per_query')}
        print(f'[lds] {name}: {brief}', flush=True)
    lr_last = float(train_lib.learning_rate_schedule(tc)(tc.num_steps))
    num_params = sum(int(np.size(x)) for x in jax.tree.leaves(last.params))
    return {
        'benchmark': 'lds',
        'quick': args.quick,
        'model': model.config.to_dict(),
        'train_examples': len(train_ex),
        'queries': len(query_ex),
        'subsets': args.subsets,
        'subset_fraction': 0.5,
        'loo_examples': len(loo_rows),
        'steps': tc.num_steps,
        'full_train_seconds': train_seconds,
        'outcome': 'mean log p of the completion tokens of the query after retraining',
        'full_model_query_log_prob': float(full.mean()),
        'subset_outcome_spread': float(subsets.std(axis=1).mean()),
        'tail_patch': {
            'proponents_per_query': TAIL_K,
            'steps': tails['steps'],
            'first_order_spearman': tails['first_order_spearman'],
            'learning_rate_at_last_step': lr_last,
            # ||u|| when update clipping binds on every parameter (each tensor's update
            # has RMS = lr): the ceiling every one-example step's norm is measured against.
            'update_norm_all_clipped': lr_last * float(np.sqrt(num_params)),
            'clipping_threshold': tc.clipping_threshold,
            'parameter_scaling': False,
        },  # fmt: skip
        'methods': rows,
        'ablations': ablation_effects(per_query),
        'peers': PEERS,
        'wall_seconds': time.time() - t0,
    }


def _one_step(row: dict[str, Any]) -> str:
    if 'one_step_rho' not in row:  # results from before the one-step column
        return '—'
    lo, hi = row['one_step_rho_ci']
    return f'{row["one_step_rho"]:.3f} [{lo:.3f}, {hi:.3f}]'


def readme_table(res: dict[str, Any]) -> str:
    """The README's method table from the JSON."""
    rows = res['methods']
    lines = [
        f'From `{res["command"]}` ({res["timestamp"][:10]}): a 2-layer width-64 model '
        f'trained on {res["train_examples"]} WordNet glosses; {res["queries"]} fact queries; '
        f'LDS over {res["subsets"]} retrainings on random halves (Spearman, mean over '
        'queries, 95% bootstrap interval); leave-one-out over '
        f'{res["loo_examples"]} removed entailing glosses; MRR / Recall@10 of the entailing '
        'gloss among all training examples; tail-patch: the change in p(answer) after one '
        f'trainer step on each of the top {res["tail_patch"]["proponents_per_query"]} '
        'proponents (mean, 95% interval over queries), beside its first-order prediction '
        '⟨∇p, u⟩ and the mean norm of the step u (Spearman of measured vs first-order over '
        f'all {res["tail_patch"]["steps"]} steps: '
        f'{res["tail_patch"]["first_order_spearman"]:.3f}). ρ one-step: per query, the '
        "Spearman correlation over all training examples between the method's scores and "
        'the first-order one-step change ⟨∇p, u_m⟩ of every example m (mean, 95% interval; '
        f'the row "{ONE_STEP}" ranks by that quantity itself: the first-order tail-patch '
        'ceiling of a score; in the second table ρ unclipped and ρ frozen V: the same '
        "against the step with Adafactor's update clipping lifted, and with its second "
        "moments kept at the saved V instead of taking in the step's own g²). Seconds were "
        'taken while other work shared the 2 cores.',
        '',
        '| method | LDS | LOO ρ | MRR | Recall@10 | tail-patch (pp) | first-order (pp) | '
        '‖u‖ | ρ one-step | index s | score s |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for name in sorted(rows, key=lambda n: -rows[n]['lds']):
        r = rows[name]
        lo, hi = r['lds_ci']
        lines.append(
            f'| {name} | {r["lds"]:.3f} [{lo:.3f}, {hi:.3f}] | {r["loo_spearman"]:.3f} | '
            f'{r["mrr"]:.3f} | {r["recall_at_10"]:.3f} | {r["tail_patch_pp"]:+.3f} '
            f'[{r["tail_patch_ci"][0]:+.3f}, {r["tail_patch_ci"][1]:+.3f}] | '
            f'{r["first_order_pp"]:+.3f} | {r["update_norm"]:.3f} | {_one_step(r)} | '
            f'{r["index_seconds"]:.1f} | {r["score_seconds"]:.1f} |'
        )
    if res.get('ablations'):
        metrics = ['lds', 'rr', 'tail_patch', 'first_order']
        heads = ['LDS', 'MRR', 'tail-patch', 'first-order']
        if all('one_step_rho' in a for a in res['ablations'].values()):
            metrics += ['one_step_rho', 'unclipped_rho', 'frozen_v_rho']
            heads += ['ρ one-step', 'ρ unclipped', 'ρ frozen V']
        lines += [
            '',
            'What each part of TrackStar changes (with minus without, paired over the same '
            'queries, 95% bootstrap interval; tail-patch and first-order in pp):',
            '',
            '| part | with − without | ' + ' | '.join(heads) + ' |',
            '|---|---|' + '---|' * len(heads),
        ]
        for part, a in res['ablations'].items():
            cells = [f'{a[m]["diff"]:+.3f} [{a[m]["low"]:+.3f}, {a[m]["high"]:+.3f}]'
                     for m in metrics]  # fmt: skip
            lines.append(f'| {part} | {a["with"]} − {a["without"]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def write_readme(res: dict[str, Any], check: bool = False) -> bool:
    """Puts :func:`readme_table` in the README (with ``check``: only compares)."""
    return harness.readme_section('methods', readme_table(res), check=check)


def _arguments(parser) -> None:
    parser.add_argument('--train', type=int, default=512)
    parser.add_argument('--queries', type=int, default=32)
    parser.add_argument('--subsets', type=int, default=48)
    parser.add_argument('--loo', type=int, default=8)
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--shard', default='0/1', help='i/n: run every n-th retraining')
    parser.add_argument('--trak_models', type=int, default=4, help="TRAK's ensemble size")


def _prepare(args, parser) -> None:
    if args.trak_models < 1:
        parser.error('--trak_models must be at least 1 (the first is the main model).')
    if args.quick:
        args.train, args.queries, args.subsets = 64, 8, 8
        args.loo, args.steps, args.trak_models = 2, 30, 2


def main(argv=None) -> None:
    out = os.path.join(harness.RESULTS_DIR, 'methods.json')
    harness.study_main(argv, __doc__, out, run, write_readme, quick_help='tiny sets, few subsets',
                       add_arguments=_arguments, prepare=_prepare)  # fmt: skip


if __name__ == '__main__':
    main()
