"""BM25 and dense (all-MiniLM-L6-v2) retrieval baselines of the fact-tracing evaluation."""

import json
import math
import os
import re
from collections import Counter

import numpy as np
import pytest

from trackstar_jax.eval import baselines

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'minilm_reference.json')

CORPUS = {
    'd05': 'The capital of France is Paris. Paris is large.',
    'd01': 'Paris Hilton visited the capital of Italy, Rome.',
    'd02': 'Bananas are yellow; bananas are rich in potassium.',
    'd03': 'The Eiffel Tower is in Paris, the French capital city on the Seine river.',
    'd04': 'It is what it is.',  # only stopwords / 1-char tokens with the English list
    'd00': 'Rome is the capital of Italy.',
    'd06': 'The capital of France is Paris. Paris is large.',  # duplicate of d05: exact tie
    'd07': 'Potassium and sodium are alkali metals.',
}
QUERIES = ['The capital of France is Paris', 'bananas potassium', 'capital capital Rome', 'zzz']


def brute_force_bm25(texts, queries, stopwords, k1=1.5, b=0.75):
    """BM25 as bm25s's default 'lucene' method, written out from the formula (float64)."""
    tok = lambda t: [w for w in re.findall(r'(?u)\b\w\w+\b', t.lower()) if w not in stopwords]
    docs = [Counter(tok(t)) for t in texts]
    lens = np.array([sum(d.values()) for d in docs], np.float64)
    n, avgdl = len(docs), lens.mean()
    scores = np.zeros((len(queries), n))
    for q, query in enumerate(queries):
        for term in tok(query):  # a repeated query term counts once per occurrence
            df = sum(term in d for d in docs)
            if df == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            for j, d in enumerate(docs):
                tf = d[term]
                scores[q, j] += idf * tf / (tf + k1 * (1 - b + b * lens[j] / avgdl))
    return scores


@pytest.mark.parametrize('stopwords', ['en', None])
def test_bm25_matches_brute_force(stopwords):
    import bm25s.stopwords

    ids, texts = list(CORPUS), list(CORPUS.values())
    stop = set(bm25s.stopwords.STOPWORDS_EN) if stopwords else set()
    want = brute_force_bm25(texts, QUERIES, stop)
    got_ids, got = baselines.bm25_top_k(ids, texts, QUERIES, k=5, stopwords=stopwords)
    assert got.dtype == np.float32 and got.shape == (len(QUERIES), 5)
    for q in range(len(QUERIES)):
        # Rounding turns float32-vs-float64 noise into exact ties, broken by id as the API does.
        order = sorted(range(len(ids)), key=lambda j: (-round(want[q, j], 5), ids[j]))[:5]
        assert got_ids[q] == [ids[j] for j in order], QUERIES[q]
        np.testing.assert_allclose(got[q], want[q, order], rtol=1e-5, atol=1e-6)
    assert got[0, 0] > 0 and np.all(got[3] == 0)  # 'zzz' matches nothing: all ties at 0


def test_bm25_ties_break_by_id():
    ids = ['c', 'a', 'x', 'b', 'd']
    texts = ['paris france', 'paris france', 'bananas', 'paris france', 'paris france']
    got_ids, got = baselines.bm25_top_k(ids, texts, ['paris', 'unknownword', ''], k=3)
    assert got_ids[0] == ['a', 'b', 'c'] and len(set(got[0].tolist())) == 1
    assert got_ids[1] == got_ids[2] == ['a', 'b', 'c']  # no match / empty query: all tie at 0
    all_ids, _ = baselines.bm25_top_k(ids, texts, ['bananas'], k=10)  # k > N: all N, ranked
    assert all_ids == [['x', 'a', 'b', 'c', 'd']]
    with pytest.raises(ValueError, match='unique'):
        baselines.bm25_top_k(['a', 'a'], ['x', 'y'], ['x'], k=1)


class FakeEncoder:
    """Deterministic unit vectors per text, to test the dense ranking without the model."""

    def encode(self, texts):
        rows = [np.random.default_rng(sum(map(ord, t))).normal(size=16) for t in texts]
        rows = np.array(rows, np.float32).reshape(len(texts), 16)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_dense_top_k_exact_and_ties():
    ids = ['e', 'b', 'a', 'c', 'd', 'f']
    texts = ['alpha', 'beta', 'gamma', 'beta', 'delta', 'beta']
    queries = ['beta', 'alpha', 'zeta']
    enc = FakeEncoder()
    got_ids, got = baselines.dense_top_k(ids, texts, queries, k=4, encoder=enc)
    sims = enc.encode(queries).astype(np.float64) @ enc.encode(texts).T.astype(np.float64)
    for q in range(len(queries)):
        order = sorted(range(len(ids)), key=lambda j: (-round(sims[q, j], 5), ids[j]))[:4]
        assert got_ids[q] == [ids[j] for j in order]
        np.testing.assert_allclose(got[q], sims[q, order], atol=1e-6)
    # The three 'beta' candidates score bit-identically and come out in id order.
    assert got_ids[0][:3] == ['b', 'c', 'f'] and got[0, 0] == got[0, 1] == got[0, 2]
    assert got_ids[1][0] == 'e' and got[1, 0] == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope='module')
def encoder():
    from trackstar_jax.eval import minilm

    try:
        minilm.default_model_dir()
    except ImportError as e:  # CI installs the weights: a missing package is a failure
        pytest.fail(f'{e} (required by the dense baseline tests)')
    return baselines.default_encoder()


def test_minilm_matches_pytorch_reference(encoder):
    with open(FIXTURE) as f:
        ref = json.load(f)
    assert encoder.max_len == ref['max_len']
    sents = ref['sentences']
    toks = encoder.tokenize(sents)
    assert [len(t) for t in toks] == ref['num_tokens']  # includes the truncated long text
    assert [t[:12] for t in toks] == ref['first_ids']
    emb = encoder.encode(sents)
    assert emb.dtype == np.float32 and emb.shape == (len(sents), 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[:, :8], ref['first8'], atol=1e-5)
    fingerprint = emb @ np.sin(np.arange(1, 385, dtype=np.float64))  # see the fixture script
    np.testing.assert_allclose(fingerprint, ref['fingerprint'], atol=1e-5)
    np.testing.assert_allclose(emb @ emb.T, ref['cosine'], atol=1e-5)
    raw = encoder.encode(sents, normalize=False)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), ref['pooled_norm'], rtol=1e-5)


def test_minilm_batching_invariant(encoder):
    from trackstar_jax.eval.minilm import MiniLMEncoder

    with open(FIXTURE) as f:
        sents = json.load(f)['sentences'][:4] + ['x', 'A much longer one. ' * 8]
    small = MiniLMEncoder(batch_size=2)
    np.testing.assert_allclose(small.encode(sents), encoder.encode(sents), atol=2e-6)


def test_dense_semantic_sanity(encoder):
    ids = ['unrelated', 'paraphrase', 'partial']
    texts = [
        'I like eating bananas for breakfast.',
        'Paris is the capital city of France.',
        'France is a country in Europe.',
    ]
    got_ids, got = baselines.dense_top_k(
        ids, texts, ['The capital of France is Paris.'], k=3, encoder=encoder
    )
    assert got_ids[0] == ['paraphrase', 'partial', 'unrelated']
    assert got[0, 0] > 0.9 > 0.2 > got[0, 2]
