"""Support samples: the head, α, the by-token index and contributions against brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from tests import llama_fixtures as lf
from tests import pipeline_fixtures as fx
from trackstar_jax import index, support, train
from trackstar_jax import sharding as shd
from trackstar_jax.models.llama import LlamaLM

FLOOR = 0.02
TC = train.TrainConfig(batch_size=8, seq_len=16, learning_rate=1e-2, min_dim_size_to_factor=16)


def _peaked_model():
    """The shared tiny LM with its embedding scaled up: peaked next-token distributions,
    so rows carry several alternatives above the floor and real Type-2 samples."""
    model, params, _ = fx.model_and_state()
    params = jax.tree_util.tree_map(lambda a: a, params)
    params['embedding']['embedding'] = params['embedding']['embedding'] * 3.0
    return model, params


def _config(**kw):
    return support.SupportConfig(
        seq_len=fx.SEQ_LEN, chunk_rows=40, batch_size=8, alpha_floor=FLOOR, **kw
    )


def multiprocess_examples():
    """Passages and queries for the multi-process build (tests/workers/support_worker.py)."""
    return fx.train_examples(21) + fx.query_examples(4)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    model, params = _peaked_model()
    # Passages (every token a target) and queries (only the completion): masks decide.
    examples = fx.train_examples(21) + fx.query_examples(4)
    url = str(tmp_path_factory.mktemp('support') / 'tokens')
    idx = support.featurize_tokens(model, params, examples, url, _config())
    return model, params, examples, idx


def _dense_alpha(model, params, examples):
    """Brute force, float64 numpy from the model's own logits: for every target token
    (example, position) -> (y, α over the whole vocabulary [V], logits input order)."""
    out = []
    for ex in examples:
        toks = np.asarray(ex['tokens'])
        logits = np.asarray(model.apply({'params': params}, jnp.asarray(toks[None])), np.float64)[0]
        for t in range(1, len(toks)):
            if ex['loss_mask'][t] > 0:
                z = logits[t - 1] - logits[t - 1].max()
                p = np.exp(z) / np.exp(z).sum()
                alpha = -p
                alpha[toks[t]] += 1.0
                out.append((f'{ex["id"]}#{t}', int(toks[t]), alpha))
    return out


@pytest.mark.parametrize('which', ['decoder', 'llama_tied', 'llama_untied'])
def test_head_inputs_times_head_are_the_logits(which):
    if which == 'decoder':
        model, params = _peaked_model()
    else:
        cfg = lf.TIED if which == 'llama_tied' else lf.UNTIED
        model = LlamaLM(cfg)
        params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))['params']
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 9)))
    w, scale = support.head_of(model, params)
    x, logits = support.head_inputs(model, params, tokens)
    np.testing.assert_allclose(
        np.asarray(x) * scale @ w.T, np.asarray(logits), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(logits, model.apply({'params': params}, tokens), rtol=1e-6)


def test_rows_equal_brute_force_alpha(built):
    model, params, examples, idx = built
    target, alpha = idx.extra('target'), idx.extra('alpha')
    dense = _dense_alpha(model, params, examples)
    rows = {rid: r for r, rid in enumerate(idx.ids)}
    assert len(idx) == len(dense)
    many = 0
    for rid, y, a in dense:
        r = rows[rid]
        assert target[r, 0] == y
        assert alpha[r, 0] == pytest.approx(a[y], abs=2e-6)
        keep = [v for v in range(len(a)) if v != y and -a[v] >= FLOOR]
        got = target[r, 1:][target[r, 1:] >= 0]
        assert sorted(got.tolist()) == sorted(keep), rid
        np.testing.assert_allclose(alpha[r, 1 : 1 + len(got)], a[got], atol=2e-6)
        assert (alpha[r, 1 + len(got) :] == 0).all()
        many += len(got) > 1
    assert many > 10  # the test exercises rows with several alternatives
    # φ is the head's input at the position before each target.
    w, scale = support.head_of(model, params)
    ex = examples[3]  # a passage: rows #1 .. #len-1 are consecutive
    x, _ = support.head_inputs(model, params, jnp.asarray(np.asarray(ex['tokens'])[None]))
    r0 = rows[f'{ex["id"]}#1']
    np.testing.assert_allclose(
        idx.read(slice(r0, r0 + len(ex['tokens']) - 1)), np.asarray(x[0, :-1]) * scale,
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_support_sets_and_contributions_equal_brute_force(built):
    model, params, examples, idx = built
    tok = support.TokenIndex(idx)
    dense = _dense_alpha(model, params, examples)
    rows = {rid: r for r, rid in enumerate(idx.ids)}
    phis = idx.read(slice(0, len(idx))).astype(np.float64)
    query = support.prompt_features(model, params, [[1, 5, 9, 2], [7, 7, 3]])
    by_id = {rid: (y, a) for rid, y, a in dense}
    checked_type2 = 0
    for v in range(fx.CFG.vocab_size):
        for tau in (FLOOR, 0.1, 0.5, 0.9):
            s = tok.support(v, tau)
            t1 = [(rid, a[v]) for rid, y, a in dense if y == v and a[v] >= tau]
            t2 = [(rid, a[v]) for rid, y, a in dense if y != v and a[v] <= -tau]
            assert sorted(s.type1_ids) == sorted(r for r, _ in t1), (v, tau)
            assert sorted(s.type2_ids) == sorted(r for r, _ in t2), (v, tau)
            assert (np.diff(np.abs(s.type1_alpha)) <= 0).all()
            assert (np.diff(np.abs(s.type2_alpha)) <= 0).all()
            checked_type2 += len(t2)
        for q in query:
            c = tok.contributions(v, q, k=5)
            # Brute force over every target token, the full dense α of v.
            all_scores = {rid: a[v] * float(phis[rows[rid]] @ q) for rid, _, a in dense}
            kept = {
                rid: sc
                for rid, sc in all_scores.items()
                if by_id[rid][0] == v or -by_id[rid][1][v] >= FLOOR
            }
            # Same scores in the same order; each returned id has its score by brute force
            # (tokens after one shared first token tie exactly: any of them may come).
            for ids, scores, sign in ((c.promote_ids, c.promote_scores, -1),
                                      (c.deter_ids, c.deter_scores, 1)):  # fmt: skip
                signed = [x for x in kept.values() if -sign * x > 0]
                best = sorted(signed, key=lambda x, sign=sign: sign * x)[:5]
                np.testing.assert_allclose(scores, best, rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose([kept[r] for r in ids], scores, rtol=1e-4, atol=1e-6)
                assert len(set(ids)) == len(ids)
            dropped = [abs(sc) for r, sc in all_scores.items() if r not in kept]
            assert max(dropped, default=0.0) <= c.dropped_bound
            assert c.total == pytest.approx(sum(kept.values()), rel=1e-4, abs=1e-6)
    assert checked_type2 > 0


def test_head_at_a_stationary_point_is_the_support_decomposition(tmp_path):
    """Theorem 1: fit the untied head of a tiny Llama to a stationary point of the mean
    token loss + λ‖θ‖² (float64, body fixed); Σ_i α_{i,v} φ_i / (2Nλ) over the token
    index is that head."""
    cfg = lf.UNTIED
    model = LlamaLM(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    rng = np.random.default_rng(0)
    examples = []
    for i in range(12):
        toks = rng.integers(0, cfg.vocab_size, 10)
        mask = np.ones(10, np.float32)
        mask[0] = 0
        examples.append({'id': f'e{i}', 'tokens': toks, 'loss_mask': mask})
    # φ of every target token, then the head fitted in float64 with the body fixed.
    x = []
    ys = []
    for ex in examples:
        h, _ = support.head_inputs(model, params, jnp.asarray(ex['tokens'][None]))
        x.append(np.asarray(h[0, :-1], np.float64))
        ys.append(ex['tokens'][1:])
    x, ys = np.concatenate(x), np.concatenate(ys)
    n, d, v_size, lam = len(x), x.shape[1], cfg.vocab_size, 1e-2

    def loss_grad(flat):
        w = flat.reshape(v_size, d)
        z = x @ w.T
        z -= z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        loss = -np.log(p[np.arange(n), ys]).mean() + lam * (w**2).sum()
        a = -p
        a[np.arange(n), ys] += 1
        return loss, (-(a.T @ x) / n + 2 * lam * w).ravel()

    res = scipy.optimize.minimize(
        loss_grad, np.zeros(v_size * d), jac=True, method='L-BFGS-B',
        options={'gtol': 1e-12, 'ftol': 1e-15, 'maxiter': 5000},
    )  # fmt: skip
    w = res.x.reshape(v_size, d)
    assert np.abs(loss_grad(res.x)[1]).max() < 1e-7  # stationary
    params = jax.tree_util.tree_map(lambda a: a, params)
    params['lm_head']['kernel'] = jnp.asarray(w.T, jnp.float32)
    cfg_s = support.SupportConfig(seq_len=10, chunk_rows=25, batch_size=8, alpha_floor=1e-9)
    idx = support.featurize_tokens(model, params, examples, str(tmp_path / 't'), cfg_s)
    assert idx.manifest['slots'] == v_size - 1  # every alternative kept
    theta = support.TokenIndex(idx).head_from_support(lam)
    # float32 storage of φ and α: agreement to float32 precision of the terms.
    assert lf.rel_err(theta, w) < 1e-4


@pytest.mark.fault(
    'A token-index build (support samples) crashes after committing a chunk',
    'The re-run writes the missing chunks only; rows equal a one-device build; examples '
    'changed under a resume: ValueError',
)
def test_eight_devices_equal_one_and_resume_rewrites_identically(tmp_path):
    model, params = _peaked_model()
    examples = fx.train_examples(13)
    one = shd.make_mesh(((shd.DATA, 1), (shd.MODEL, 1)), devices=jax.devices()[:1])
    eight = shd.make_mesh(((shd.DATA, 8), (shd.MODEL, 1)))
    a = support.featurize_tokens(model, params, examples, str(tmp_path / 'a'), _config(), mesh=one)

    class Crash(Exception):
        pass

    def hook(event, chunk):
        if event == 'committed' and chunk == 1:
            raise Crash

    url = str(tmp_path / 'b')
    with pytest.raises(Crash):
        support.featurize_tokens(model, params, examples, url, _config(), mesh=eight,
                                 fault_hook=hook)  # fmt: skip
    b = support.featurize_tokens(model, params, examples, url, _config(), mesh=eight)
    assert a.ids == b.ids
    np.testing.assert_allclose(b.read(slice(0, len(b))), a.read(slice(0, len(a))), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(b.extra('target'), a.extra('target'))
    np.testing.assert_allclose(b.extra('alpha'), a.extra('alpha'), atol=1e-6)
    with pytest.raises(ValueError, match='changed since it was written'):
        changed = [dict(e) for e in examples]
        changed[0]['tokens'] = (np.asarray(changed[0]['tokens']) + 1) % fx.CFG.vocab_size
        support.featurize_tokens(model, params, changed, url, _config(), mesh=eight)
    assert index.open(url).manifest['kind'] == support.KIND
    # Other parameters (another checkpoint) are another index, never a resume.
    other = jax.tree_util.tree_map(lambda a: a * 1.01, params)
    with pytest.raises(ValueError, match='other settings'):
        support.featurize_tokens(model, other, examples, url, _config(), mesh=eight)


def test_support_job_end_to_end(tmp_path):
    """Train a tiny model, run the job: the counts are the index's, each query's lists
    are the index's contributions, and the page shows both sides."""
    import dataclasses
    import json

    import gin

    from trackstar_jax.jobs import support_samples, train_lm

    cfg = dataclasses.replace(fx.CFG, vocab_size=4096)
    tc = dataclasses.replace(TC, num_steps=4, checkpoint_every=4, log_every=2)
    with gin.unlock_config():
        train_lm.train_lm(workdir=str(tmp_path), model_config=cfg, train_config=tc,
                          max_documents=40)  # fmt: skip
        url = support_samples.support_samples(
            workdir=str(tmp_path),
            max_examples=30,
            max_queries=3,
            config=support.SupportConfig(seq_len=16, chunk_rows=64, batch_size=8),
            k=4,
        )
    out = json.load(open(url))
    tok = support.TokenIndex(str(tmp_path / 'support_index'))
    counts = support.summary(tok, 0.5)
    assert out['counts']['support_samples'] == counts['support_samples']
    assert out['counts']['target_tokens'] == len(tok.index) > 0
    assert len(out['queries']) == 3
    # Each query's lists are the index's contributions after its prompt.
    from trackstar_jax.data import corpus as corpus_lib
    from trackstar_jax.jobs.common import load_model

    loaded = load_model(str(tmp_path / 'checkpoints'), shd.make_mesh())
    tokenizer = corpus_lib.Tokenizer()
    for q in out['queries']:
        prompt = [tokenizer.eos_id, *tokenizer.encode(q['prompt'])]
        phi = support.prompt_features(loaded.model, loaded.params, [prompt])[0]
        c = tok.contributions(q['token'], phi, 4)
        assert [r['row'] for r in q['promote']] == c.promote_ids
        assert [r['row'] for r in q['deter']] == c.deter_ids
        assert all(r['score'] > 0 for r in q['promote'])
        assert all(r['score'] < 0 for r in q['deter'])
    q = out['queries'][0]
    page = open(str(tmp_path / 'support_index.html')).read()
    assert 'promoting' in page and 'deterring' in page and q['prompt'][:10] in page


def test_representer_scores_equal_brute_force(built):
    """Σ over a completion's tokens and an example's tokens of α_{i,v_t}⟨φ_i, φ′_t⟩, against
    a loop over the dense α (restricted to what the index keeps), and the dropped terms
    under the bound."""
    model, params, examples, idx = built
    tok = support.TokenIndex(idx)
    dense = _dense_alpha(model, params, examples)
    by_id = {rid: (y, a) for rid, y, a in dense}
    phis = idx.read(slice(0, len(idx))).astype(np.float64)
    rows = {rid: r for r, rid in enumerate(idx.ids)}
    query = fx.query_examples(3, seed=7)[2]
    q_phi, q_tok = support.completion_features(model, params, query)
    assert len(q_tok) == int(np.sum(query['loss_mask'])) > 1
    ids, got = support.representer_scores(tok, q_phi, q_tok)
    assert ids == [ex['id'] for ex in examples]
    want = {e: 0.0 for e in ids}
    dropped = 0.0
    for rid, (y, a) in by_id.items():
        e = support.split_row_id(rid)[0]
        for phi_q, v in zip(q_phi.astype(np.float64), q_tok, strict=True):
            term = a[v] * float(phis[rows[rid]] @ phi_q)
            if y == v or -a[v] >= FLOOR:
                want[e] += term
            else:
                dropped = max(dropped, abs(term))
    np.testing.assert_allclose(got, [want[e] for e in ids], rtol=1e-4, atol=1e-6)
    bound = tok.contributions(int(q_tok[0]), q_phi[0]).dropped_bound
    assert dropped <= bound * np.linalg.norm(q_phi, axis=1).max() / np.linalg.norm(q_phi[0])
