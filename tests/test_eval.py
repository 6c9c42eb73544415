"""Fact-tracing evaluation: metrics by hand, tail-patch vs the trainer, user facts path."""

import dataclasses
import gzip
import json
import os

import jax
import numpy as np
import pytest

from trackstar_jax import checkpoint, grads, index, losses, pipeline, preconditioners, train
from trackstar_jax import sharding as shd
from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.eval import fact_tracing, metrics
from trackstar_jax.eval import tail_patch as tail_patch_lib
from trackstar_jax.jobs import attribution
from trackstar_jax.models import DecoderConfig, DecoderLM


def test_mrr_and_recall_hand_computed():
    retrieved = [['a', 'b', 'c'], ['x', 'y', 'z'], ['p', 'q', 'r'], ['m', 'n', 'o']]
    entailing = [{'b'}, {'x', 'z'}, {'nothing'}, {'o', 'n'}]
    # Reciprocal ranks: 1/2, 1/1, 0, 1/2 -> MRR = 2/4.
    assert metrics.mrr(retrieved, entailing) == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    assert metrics.recall_at_k(retrieved, entailing, k=10) == pytest.approx(3 / 4)
    assert metrics.recall_at_k(retrieved, entailing, k=1) == pytest.approx(1 / 4)
    assert metrics.reciprocal_rank(['a'] * 9 + ['hit'], {'hit'}) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        metrics.mrr(retrieved, entailing[:2])


CFG = DecoderConfig(vocab_size=4096, num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=32)
TC = train.TrainConfig(
    seq_len=32,
    batch_size=8,
    min_dim_size_to_factor=16,
    warmup_steps=2,
    num_steps=3,
    learning_rate=0.01,
)


def _trained_checkpoint(directory, tc=TC):
    """A tiny model trained 3 steps on embedded-corpus text, checkpointed with its state."""
    mesh = shd.make_mesh((('data', 1), ('model', 1)), devices=jax.devices()[:1])
    model = DecoderLM(CFG)
    state, shardings = train.create_train_state(model, tc, mesh)
    step = train.make_train_step(model, train.make_optimizer(tc), mesh, shardings)
    rng = np.random.default_rng(0)
    for _ in range(tc.num_steps):
        toks = rng.integers(3, 4096, (8, 32)).astype(np.int32)
        mask = np.ones((8, 32), np.float32)
        mask[:, 0] = 0
        state, _ = step(state, train.global_batch(mesh, {'tokens': toks, 'loss_mask': mask}))
    mngr = checkpoint.manager(directory)
    checkpoint.save(
        mngr, tc.num_steps, state, {'model': CFG.to_dict(), 'train': tc.to_dict(), 'tokenizer': ''}
    )
    return model, state, mesh, shardings


def test_first_order_columns_and_agreement_hand_computed():
    ranking = {'q1': ['a', 'b', 'c'], 'q2': ['c', 'a', 'b']}
    entailing = {'q1': {'b'}, 'q2': {'x'}}
    deltas = {('q1', 'a'): 0.2, ('q1', 'b'): -0.1, ('q2', 'c'): 0.4, ('q2', 'a'): 0.1}
    steps = {('q1', 'a'): (0.3, 2.0), ('q1', 'b'): (0.1, 4.0), ('q2', 'c'): (0.5, 1.0),
             ('q2', 'a'): (-0.2, 2.0)}  # fmt: skip
    v = fact_tracing.per_query_values(ranking, entailing, deltas, ['q1', 'q2'], 2, steps)
    np.testing.assert_allclose(v['rr'], [0.5, 0.0])
    np.testing.assert_allclose(v['tail_patch'], [0.05, 0.25])
    np.testing.assert_allclose(v['first_order'], [0.2, 0.15])
    np.testing.assert_allclose(v['update_norm'], [3.0, 1.5])
    np.testing.assert_allclose(v['first_order_per_norm'], [(0.15 + 0.025) / 2, (0.5 - 0.1) / 2])
    assert 'first_order' not in fact_tracing.per_query_values(ranking, entailing, deltas,
                                                              ['q1'], 2)  # fmt: skip
    agree = fact_tracing.first_order_agreement(deltas, steps)
    # Sorted pairs: (q1,a) (q1,b) (q2,a) (q2,c); measured .2 -.1 .1 .4, predicted .3 .1 -.2 .5.
    assert agree['pairs'] == 4
    # Ranks 3 1 2 4 against 3 2 1 4: 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15).
    assert agree['spearman'] == pytest.approx(0.8)
    assert agree['slope'] == pytest.approx((0.06 - 0.01 - 0.02 + 0.2) / (0.09 + 0.01 + 0.04 + 0.25))
    assert agree['same_sign'] == pytest.approx(0.5)
    m, p = np.array([0.2, -0.1, 0.1, 0.4]), np.array([0.3, 0.1, -0.2, 0.5])
    assert agree['pearson'] == pytest.approx(np.corrcoef(m, p)[0, 1])


def test_length_groups_batch_every_key_once_padded_to_its_bucket():
    """Against a loop over the keys: each key once, in order, in a batch of exactly
    ``rows`` rows padded to its longest example's bucket (or max_len), short groups
    filled with their first example."""
    rng = np.random.default_rng(0)
    examples = {
        f'e{i}': {'tokens': rng.integers(1, 50, n), 'loss_mask': np.ones(n, np.float32)}
        for i, n in enumerate([3, 17, 5, 40, 33, 2, 64])
    }
    keys = sorted(examples)[::-1]
    for bucket in (True, False):
        seen = []
        for group, batch in examples_lib.length_groups(keys, examples, 3, 64, bucket=bucket):
            assert batch['tokens'].shape[0] == 3 and 1 <= len(group) <= 3
            longest = max(len(examples[k]['tokens']) for k in group)
            want = 1 << (longest - 1).bit_length() if bucket else 64
            assert batch['tokens'].shape[1] == max(16, want)
            rows = list(group) + [group[0]] * (3 - len(group))
            for r, key in enumerate(rows):
                t = examples[key]['tokens']
                np.testing.assert_array_equal(batch['tokens'][r, : len(t)], t)
                assert not batch['tokens'][r, len(t) :].any()
                assert batch['loss_mask'][r].sum() == len(t)
            seen += list(group)
        assert seen == keys
    with pytest.raises(ValueError, match='rows'):
        list(examples_lib.length_groups(keys, examples, 0, 64))


@pytest.mark.parametrize('proponent_batch', [None, 2])
def test_tail_patch_equals_one_real_trainer_step(tmp_path, proponent_batch):
    model, state, mesh, shardings = _trained_checkpoint(str(tmp_path / 'ckpt'))
    # None: all proponents vmapped; 2: lax.map over groups of 2 (3 rows: a ragged group).
    fn = tail_patch_lib.make_tail_patch(model, TC, proponent_batch)
    rng = np.random.default_rng(1)
    proponents = {
        'tokens': rng.integers(3, 4096, (3, 32)).astype(np.int32),
        'loss_mask': np.ones((3, 32), np.float32),
    }
    proponents['loss_mask'][:, 0] = 0
    proponents['loss_mask'][1, 20:] = 0
    query = {
        'tokens': rng.integers(3, 4096, 16).astype(np.int32),
        'loss_mask': np.zeros(16, np.float32),
    }
    query['loss_mask'][10:] = 1
    host_state = jax.device_get(state)
    deltas = np.asarray(fn(host_state.params, host_state.opt_state, proponents, query))

    def prob(params):
        logits = model.apply({'params': params}, query['tokens'][None])
        return float(
            np.exp(
                -losses.example_losses(logits, query['tokens'][None], query['loss_mask'][None])[0]
            )
        )

    step = train.make_train_step(model, train.make_optimizer(TC), mesh, shardings)
    before = prob(host_state.params)
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in proponents.items()}
        fresh = jax.device_put(host_state, shardings)
        new_state, _ = step(fresh, train.global_batch(mesh, one))
        expected = prob(jax.device_get(new_state.params)) - before
        assert deltas[i] == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert np.any(deltas != 0)
    # The first-order prediction is the directional derivative along the same step:
    # p(θ + εu) − p(θ) over ε for a small ε, and ||u|| is the update's norm.
    first = np.asarray(
        tail_patch_lib.make_first_order(model, TC)(
            host_state.params, host_state.opt_state, proponents, query
        )
    )
    fused = np.asarray(
        tail_patch_lib.make_tail_patch(model, TC, proponent_batch, first_order=True)(
            host_state.params, host_state.opt_state, proponents, query
        )
    )
    assert fused.shape == (3, 3)
    tx = train.make_optimizer(TC)
    for i in range(3):
        g = jax.grad(
            lambda p, i=i: train.loss_fn(model, p, {k: v[i : i + 1] for k, v in proponents.items()})
        )(host_state.params)
        u, _ = tx.update(g, host_state.opt_state, host_state.params)
        eps = 1e-2
        moved = lambda e, u=u: prob(jax.tree.map(lambda p, d: p + e * d, host_state.params, u))
        central = (moved(eps) - moved(-eps)) / (2 * eps)
        assert first[i, 0] == pytest.approx(central, rel=2e-2, abs=1e-9)
        norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(u)))
        assert first[i, 1] == pytest.approx(norm, rel=1e-5)
        assert fused[i, 1] == pytest.approx(central, rel=2e-2, abs=1e-9)
        assert fused[i, 2] == pytest.approx(norm, rel=1e-5)
    assert np.any(first[:, 0] != 0)
    # The fused form (one update per proponent for both) gives the same three numbers.
    np.testing.assert_allclose(fused[:, 0], deltas, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(fused[:, 1:], first, rtol=1e-6, atol=1e-12)
    # A scaled learning rate scales the update exactly (clipping acts before it): the
    # prediction and ||u|| by the factor, the measured change nearer its first order.
    half = np.asarray(
        tail_patch_lib.make_tail_patch(
            model, tail_patch_lib.scaled_step(TC, 0.25), proponent_batch, first_order=True
        )(host_state.params, host_state.opt_state, proponents, query)
    )
    np.testing.assert_allclose(half[:, 1:], 0.25 * fused[:, 1:], rtol=1e-5, atol=1e-12)
    for i in range(3):
        assert abs(half[i, 0] - half[i, 1]) <= abs(fused[i, 0] - fused[i, 1]) * 0.25


def test_parameter_scaling_reaches_the_trainer_and_the_tail_patch_step(tmp_path):
    """With ``multiply_by_parameter_scale`` every tensor's update is the unscaled one
    times max(RMS(θ_t), 1e-3) (numpy), in the trainer and in tail-patch's step on the
    restored checkpoint (whose recorded TrainConfig carries the setting)."""
    from trackstar_jax.jobs.common import load_model

    tc = dataclasses.replace(TC, multiply_by_parameter_scale=True, learning_rate=0.1)
    model, state, mesh, shardings = _trained_checkpoint(str(tmp_path / 'ckpt'), tc)
    host = jax.device_get(state)
    rng = np.random.default_rng(3)
    one = {'tokens': rng.integers(3, 4096, (1, 32)).astype(np.int32),
           'loss_mask': np.ones((1, 32), np.float32)}  # fmt: skip
    grads_ = jax.grad(lambda p: train.loss_fn(model, p, one))(host.params)
    # The same state without the parameter scaling's own (empty) entry in the chain.
    plain_tx = train.make_optimizer(dataclasses.replace(tc, multiply_by_parameter_scale=False))
    plain_state = tuple(x for i, x in enumerate(host.opt_state) if i != 3)
    assert jax.tree.structure(plain_state) == jax.tree.structure(plain_tx.init(host.params))
    plain, _ = plain_tx.update(grads_, plain_state, host.params)
    # The trained params, and the same with one tensor's RMS below the 1e-3 floor (the
    # scale reads only the params: V, the clipping and the rate come from the gradient).
    leaves, treedef = jax.tree.flatten(host.params)
    tiny = list(leaves)
    shrink = 1e-5 / np.sqrt(np.mean(np.square(np.float64(tiny[1]))))
    tiny[1] = (np.asarray(tiny[1], np.float64) * shrink).astype(leaves[1].dtype)
    for params in (host.params, jax.tree.unflatten(treedef, tiny)):
        scaled, _ = train.make_optimizer(tc).update(grads_, host.opt_state, params)
        rms = [max(float(np.sqrt(np.mean(np.square(np.float64(p))))), 1e-3)
               for p in jax.tree.leaves(params)]  # fmt: skip
        for s_, p_, r in zip(jax.tree.leaves(scaled), jax.tree.leaves(plain), rms, strict=True):
            np.testing.assert_allclose(np.asarray(s_), np.asarray(p_) * r, rtol=1e-6, atol=1e-12)
        assert len({round(r, 6) for r in rms}) > 1  # scales differ by tensor
    assert rms[1] == 1e-3  # the floor, on the tiny tensor
    # tail-patch on the restored checkpoint equals the real (scaled) trainer step.
    loaded = load_model(str(tmp_path / 'ckpt'), mesh)
    assert loaded.train_config.multiply_by_parameter_scale
    query = {'tokens': rng.integers(3, 4096, 16).astype(np.int32),
             'loss_mask': (np.arange(16) >= 10).astype(np.float32)}  # fmt: skip
    patch = tail_patch_lib.make_tail_patch(loaded.model, loaded.train_config)
    delta = float(np.asarray(patch(loaded.params, loaded.opt_state, one, query))[0])
    step = train.make_train_step(model, train.make_optimizer(tc), mesh, shardings)
    new_state, _ = step(jax.device_put(host, shardings), train.global_batch(mesh, one))

    def prob(params):
        logits = model.apply({'params': params}, query['tokens'][None])
        nll = losses.example_losses(logits, query['tokens'][None], query['loss_mask'][None])[0]
        return float(np.exp(-nll))

    assert delta == pytest.approx(prob(jax.device_get(new_state.params)) - prob(host.params),
                                  rel=1e-4, abs=1e-9)  # fmt: skip
    assert delta != 0


def test_first_order_matrix_equals_per_pair_predictions(tmp_path):
    """Every (example, query) cell of the batched first-order matrix equals the per-pair
    prediction (itself checked against finite differences above), across length groups."""
    model, state, _, _ = _trained_checkpoint(str(tmp_path / 'ckpt'))
    host = jax.device_get(state)
    rng = np.random.default_rng(2)
    examples = []
    for i, n in enumerate((7, 30, 12, 19, 5)):  # lengths in three power-of-two buckets
        mask = np.ones(n, np.float32)
        mask[0] = 0
        examples.append({'id': f'e{i}', 'tokens': rng.integers(3, 4096, n), 'loss_mask': mask})
    queries = []
    for j, n in enumerate((9, 14)):
        mask = np.zeros(n, np.float32)
        mask[n - 3 :] = 1
        queries.append({'id': f'q{j}', 'tokens': rng.integers(3, 4096, n), 'loss_mask': mask})
    fn = tail_patch_lib.make_first_order_matrix(model, TC)
    got = tail_patch_lib.first_order_matrix(
        fn, host.params, host.opt_state, queries, examples, k=2, seq_len=32, query_len=16
    )
    assert got.shape == (2, 5)
    per_pair = tail_patch_lib.make_first_order(model, TC)
    for j, q in enumerate(queries):
        query = {k: v[0] for k, v in examples_lib.pad_batch([q], 1, 16).items()}
        for i, ex in enumerate(examples):
            one = examples_lib.pad_batch([ex], 1, 32)
            want = float(np.asarray(per_pair(host.params, host.opt_state, one, query))[0, 0])
            assert got[j, i] == pytest.approx(want, rel=1e-4, abs=1e-10)
    assert np.all(got != 0)


def _fit_toy(train, queries, config, mesh):
    """A toy preconditioner: each coordinate scaled by 1 / (1 + its mean |φ|)."""
    del queries, config, mesh
    vectors = train.read(slice(0, len(train)))
    return {'scale': (1.0 / (1.0 + np.abs(vectors).mean(0))).astype(np.float32)}, {}, {}


# Registered once, here: it must reach the evaluation table and the fit/score jobs.
TOY = preconditioners.register(
    preconditioners.Kind('toy_test_scale', _fit_toy, lambda a, v: v * a['scale'][None])
)


@pytest.mark.fault(
    'Evaluate with k > the candidate passages',
    'Refused before any method runs, saying the largest k',
)
def test_user_supplied_facts_and_corpus(tmp_path):
    """A user's own JSONL facts and corpus run through the evaluation without code; a
    registered preconditioner appears in its table; the jobs give the same top-k."""
    _trained_checkpoint(str(tmp_path / 'ckpt'))
    corpus = [
        {'id': f'doc{i}', 'text': t}
        for i, t in enumerate(
            [
                'Paris is the capital of France.',
                'Berlin is the capital of Germany.',
                'Rome is the capital of Italy.',
                'The cat sat on the mat.',
                'Water boils at 100 C.',
                'Madrid is the capital of Spain.',
                'Lisbon is the capital of Portugal.',
                'The sun is a star.',
            ]
        )
    ]
    facts = [
        {
            'id': 'f1',
            'prompt': 'The capital of France is',
            'target': ' Paris',
            'entailing_ids': ['doc0'],
        },
        {
            'id': 'f2',
            'prompt': 'The capital of Italy is',
            'target': ' Rome',
            'entailing_ids': ['doc2', 'missing-doc'],
        },
        {
            'id': 'f3',
            'prompt': 'The capital of Spain is',
            'target': ' Madrid',
            'entailing_ids': ['doc5'],
        },
    ]
    with gzip.open(tmp_path / 'corpus.jsonl.gz', 'wt') as f:
        f.writelines(json.dumps(r) + '\n' for r in corpus)
    with open(tmp_path / 'facts.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in facts)
    methods = [
        fact_tracing.Method(name='Gold (entailing)', kind='gold'),
        fact_tracing.Method(name='Exp 2 (+unit)', correction='none', preconditioner='none'),
        fact_tracing.Method(name='TrackStar', preconditioner='mixed'),
        fact_tracing.Method(name='Toy', preconditioner=TOY.name),
        fact_tracing.Method(name='Representer points', kind='representer'),
    ]
    spec = grads.GradientSpec(block_dim=16, num_layer_blocks=2)
    out = fact_tracing.evaluate(
        workdir=str(tmp_path / 'eval'),
        checkpoint_dir=str(tmp_path / 'ckpt'),
        methods=methods,
        spec=spec,
        facts_path=str(tmp_path / 'facts.jsonl'),
        corpus_path=str(tmp_path / 'corpus.jsonl.gz'),
        tokenizer_path=corpus_lib.TOKENIZER_PATH,
        config=fact_tracing.EvalConfig(
            num_queries=None,
            num_distractors=None,
            seq_len=16,
            query_len=16,
            k=3,
            batch_size=8,
            dimension_sweep=(4,),
        ),
    )
    table = out['table']
    assert out['num_queries'] == 3 and out['num_candidates'] == 8
    assert table['Gold (entailing)']['all']['mrr'] == 1.0
    for name in ('Exp 2 (+unit)', 'TrackStar', 'TrackStar@D=16', 'Toy', 'Representer points'):
        row = table[name]['all']
        assert 0.0 <= row['mrr'] <= 1.0 and 0.0 <= row['recall@3'] <= 1.0
        assert np.isfinite(row['tail_patch'])
    assert 0.0 < table['TrackStar']['lam'] < 1.0
    # Every stepped pair also has its first-order prediction and step norm.
    stepped = {(q, p) for r in out['rankings'].values() for q, ps in r.items() for p in ps[:3]}
    assert out['first_order']['pairs'] == len(stepped)
    for name in ('Exp 2 (+unit)', 'TrackStar', 'Gold (entailing)'):
        row = table[name]['all']
        assert np.isfinite(row['first_order']) and row['update_norm'] > 0
    for name in ('results.json', 'results.md', 'report.html'):
        assert os.path.getsize(tmp_path / 'eval' / name) > 0
    with open(tmp_path / 'eval' / 'results.md') as f:
        assert 'First-order / ‖u‖' in f.read()
    html = open(tmp_path / 'eval' / 'report.html').read()
    assert 'The capital of France is' in html and '<code>doc' in html
    assert '<th>MRR [95% CI]</th>' in html and 'data:image/png;base64,' in html
    assert 'Shown below: 3 of 3 queries' in html
    # Intervals and paired comparisons agree with the per-query values they summarise.
    row = table['TrackStar']['all']
    rr = np.array(out['per_query']['TrackStar']['rr'])
    assert row['mrr'] == pytest.approx(rr.mean())
    assert row['mrr_ci'][0] <= row['mrr'] <= row['mrr_ci'][1]
    pair = next(
        c
        for c in out['comparisons']
        if {c['a'], c['b']} == {'TrackStar', 'Toy'} and c['metric'] == 'rr'
    )
    other = np.array(out['per_query'][pair['b']]['rr'])
    mine = np.array(out['per_query'][pair['a']]['rr'])
    assert pair['diff'] == pytest.approx((mine - other).mean())
    # The authors' JSONL format: proponents = the ranking, opponents from the same pass.
    facts_by_id = {f['id']: f for f in facts}
    tda = out['outputs']['tda']['TrackStar']
    lines = [json.loads(x) for x in index.read_checked(tda).splitlines()]
    assert [x['example_id'] for x in lines] == sorted(facts_by_id)
    for x in lines:
        assert x['proponent_ids'] == out['rankings']['TrackStar'][x['example_id']]
        assert x['inputs_plaintext'] == facts_by_id[x['example_id']]['prompt']
        assert len(x['opponent_ids']) == 3 and not set(x['opponent_ids']) & set(x['proponent_ids'])
        assert x['proponent_scores'] == sorted(x['proponent_scores'], reverse=True)
        assert max(x['opponent_scores']) <= min(x['proponent_scores'])
        entails = set(facts_by_id[x['example_id']]['entailing_ids'])
        assert x['proponent_correct'] == [i in entails for i in x['proponent_ids']]
    # Representer points: the token index of the candidates, each completion's scores
    # summed per passage (support.representer_scores), exact top-k by (score, id).
    from trackstar_jax import support
    from trackstar_jax.jobs.common import load_model

    loaded = load_model(str(tmp_path / 'ckpt'), shd.make_mesh())
    tokenizer = corpus_lib.Tokenizer()
    passages = examples_lib.corpus_examples(corpus, tokenizer, 16)
    tok = support.TokenIndex(support.featurize_tokens(
        loaded.model, loaded.params, passages, str(tmp_path / 'tokens'),
        support.SupportConfig(seq_len=16, batch_size=8)))  # fmt: skip
    for q in examples_lib.fact_queries(facts, tokenizer, 16):
        ids, sc = support.representer_scores(tok, *support.completion_features(
            loaded.model, loaded.params, q))  # fmt: skip
        top = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-sc[i], ids[i]))[:3]]
        assert out['rankings']['Representer points'][q['id']] == top
    assert 'Support samples: training tokens that most promote / deter' in html
    md = open(tmp_path / 'eval' / 'results.md').read()
    assert '| Toy |' in md and 'Recall@3' in md and 'Recall@10' not in md  # the k used

    # The jobs (index, query, fit, score) on the same data give the TrackStar row's top-k:
    # one code path.
    jobs = str(tmp_path / 'jobs')
    common = dict(workdir=jobs, checkpoint_dir=str(tmp_path / 'ckpt'), spec=spec)
    attribution.index_corpus(
        corpus_path=str(tmp_path / 'corpus.jsonl.gz'),
        config=pipeline.IndexConfig(seq_len=16, batch_size=8, chunk_rows=64),
        **common,
    )
    attribution.index_queries(
        facts_path=str(tmp_path / 'facts.jsonl'),
        config=pipeline.IndexConfig(seq_len=16, batch_size=8, chunk_rows=64),
        **common,
    )
    for name, kind in (('TrackStar', 'mixed'), ('Toy', TOY.name)):
        pre = attribution.fit(workdir=jobs, config=pipeline.FitConfig(preconditioner=kind))
        scores = attribution.score(
            workdir=jobs, config=pipeline.ScoreConfig(k=3), preconditioner=pre
        )
        back = pipeline.ScoreResult.from_jsonl(scores)  # verified against its checksum
        assert dict(zip(back.query_ids, back.ids, strict=True)) == out['rankings'][name], name
    lam = preconditioners.load(os.path.join(jobs, 'preconditioner')).info.get('lam')
    assert lam is None  # the last fit was the toy's

    # k beyond the candidates is refused before any method runs.
    with pytest.raises(ValueError, match='k = 9 exceeds the 8 candidate passages'):
        fact_tracing.evaluate(
            workdir=str(tmp_path / 'eval_k'),
            checkpoint_dir=str(tmp_path / 'ckpt'),
            methods=methods,
            spec=spec,
            facts_path=str(tmp_path / 'facts.jsonl'),
            corpus_path=str(tmp_path / 'corpus.jsonl.gz'),
            config=fact_tracing.EvalConfig(
                num_queries=None,
                num_distractors=None,
                seq_len=16,
                query_len=16,
                k=9,
                dimension_sweep=(),
            ),
        )
    assert not os.path.exists(tmp_path / 'eval_k' / 'indices')


@pytest.mark.fault(
    'evaluate with a mistyped checkpoint_dir',
    'FileNotFoundError; no model is trained in its place',
)
def test_a_named_checkpoint_that_is_missing_is_an_error_not_a_new_model(tmp_path):
    with pytest.raises(FileNotFoundError, match='No checkpoint in'):
        fact_tracing.evaluate(
            workdir=str(tmp_path / 'eval'),
            checkpoint_dir=str(tmp_path / 'typo'),
            methods=[fact_tracing.Method(name='Gold', kind='gold')],
            spec=grads.GradientSpec(block_dim=16, num_layer_blocks=2),
            config=fact_tracing.EvalConfig(dimension_sweep=()),
            train_if_missing=True,
        )
    assert not os.path.exists(tmp_path / 'typo')


@pytest.mark.fault(
    'evaluate with k = 0, an unknown sweep_method, or a string entailing_ids',
    'Refused before any work, naming the setting',
)
def test_settings_are_checked_before_any_work(tmp_path):
    gold = fact_tracing.Method(name='Gold', kind='gold')
    common = dict(
        workdir=str(tmp_path / 'eval'),
        checkpoint_dir=str(tmp_path / 'nothing-here'),
        spec=grads.GradientSpec(block_dim=16, num_layer_blocks=2),
    )
    with pytest.raises(ValueError, match='sweep_method'):
        fact_tracing.evaluate(methods=[gold], config=fact_tracing.EvalConfig(), **common)
    with pytest.raises(ValueError, match='k must be'):
        fact_tracing.evaluate(
            methods=[gold], config=fact_tracing.EvalConfig(k=0, dimension_sweep=()), **common
        )
    with pytest.raises(ValueError, match='tail_patch_lr_scale'):
        fact_tracing.evaluate(
            methods=[gold],
            config=fact_tracing.EvalConfig(tail_patch_lr_scale=0.0, dimension_sweep=()),
            **common,
        )
    assert not os.path.exists(tmp_path / 'eval')  # refused before anything was written
    bad = tmp_path / 'facts.jsonl'
    bad.write_text(json.dumps({'id': 'f', 'prompt': 'p', 'target': ' t', 'entailing_ids': 'd1'}))
    with pytest.raises(ValueError, match='must be a list'):
        corpus_lib.load_facts(str(bad))


@pytest.mark.fault(
    'evaluate on a mixture with a model trained on other data (e.g. an older run in the workdir)',
    'Refused after loading the model, before any method runs: never evaluated on unseen facts',
)
def test_a_model_not_trained_on_the_mixture_is_refused(tmp_path):
    from trackstar_jax.data import mixture as mixture_lib

    _trained_checkpoint(str(tmp_path / 'ckpt'))  # trained without a mixture
    with pytest.raises(ValueError, match='not trained on this mixture'):
        fact_tracing.evaluate(
            workdir=str(tmp_path / 'eval'),
            checkpoint_dir=str(tmp_path / 'ckpt'),
            methods=[fact_tracing.Method(name='Gold', kind='gold')],
            spec=grads.GradientSpec(block_dim=16, num_layer_blocks=2),
            config=fact_tracing.EvalConfig(seq_len=16, query_len=16, dimension_sweep=()),
            mixture=mixture_lib.FactMixture(
                num_eval_facts=6, num_heldin_facts=5, num_distractors=5
            ),
        )
    assert not os.path.exists(tmp_path / 'eval' / 'indices')
