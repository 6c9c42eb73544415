"""Model-agnostic retrieval baselines of the TrackStar evaluation: BM25 and a dense retriever.

Both rank a candidate corpus for each query text and return the top-k corpus ids ("proponents"),
best first. Ties are broken by corpus id ascending so rankings (and the metrics computed from
them) are reproducible. The paper's dense baseline is Gecko, which is not openly available;
all-MiniLM-L6-v2 (trackstar_jax.eval.minilm) stands in for it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np


class Encoder(Protocol):
    """What dense_top_k needs from an embedding model."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), d] unit-norm embeddings."""


# Query rows scored per matrix product in dense_top_k: bounds the [rows, N] score block.
_DENSE_QUERY_CHUNK = 256


def _id_ranks(corpus_ids: Sequence[str], corpus_texts: Sequence[str]) -> np.ndarray:
    """Rank of each corpus id in ascending string order (the tie-break key)."""
    if len(corpus_ids) != len(corpus_texts):
        raise ValueError(f'{len(corpus_ids)} corpus ids but {len(corpus_texts)} texts.')
    if len(set(corpus_ids)) != len(corpus_ids):
        raise ValueError('corpus ids must be unique.')
    order = sorted(range(len(corpus_ids)), key=corpus_ids.__getitem__)
    ranks = np.empty(len(corpus_ids), np.int64)
    ranks[order] = np.arange(len(corpus_ids))
    return ranks


def _top_k(scores: np.ndarray, id_rank: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, best first, ties by ascending id rank."""
    n = scores.shape[0]
    cand = np.arange(n)
    if k < n:
        # Partition first so sorting is O(k log k); `>=` keeps every candidate tied at the k-th
        # score, so the id tie-break is applied over all of them, not an arbitrary subset.
        kth = np.partition(scores, n - k)[n - k]
        cand = np.flatnonzero(scores >= kth)
    return cand[np.lexsort((id_rank[cand], -scores[cand]))[:k]]


def _rank_all(
    score_rows: Iterable[np.ndarray],
    corpus_ids: Sequence[str],
    id_rank: np.ndarray,
    k: int,
    n_queries: int,
) -> tuple[list[list[str]], np.ndarray]:
    """Top-k ids and float32 scores for each row yielded by `score_rows`."""
    k = min(k, len(corpus_ids))
    ids, out = [], np.zeros((n_queries, k), np.float32)
    for q, row in enumerate(score_rows):
        top = _top_k(row, id_rank, k)
        ids.append([corpus_ids[i] for i in top])
        out[q] = row[top]
    return ids, out


def bm25_top_k(
    corpus_ids: Sequence[str],
    corpus_texts: Sequence[str],
    queries: Sequence[str],
    k: int,
    *,
    k1: float = 1.5,
    b: float = 0.75,
    stopwords: str | None = 'en',
) -> tuple[list[list[str]], np.ndarray]:
    """Ranks the corpus for each query with BM25 (bm25s, Lucene variant).

    Score of document d for query tokens t (repeats counted):
    sum_t log(1 + (N - df_t + 0.5) / (df_t + 0.5)) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)).
    Tokens are bm25s's: lowercased scikit-learn-style words of >= 2 word characters, English
    stopwords removed and no stemming. Stopwords are dropped because queries are full fact
    statements ("The capital of France is"): function words there only add near-zero-IDF
    noise that favours long documents sharing them; no stemmer, so no extra dependency
    (PyStemmer) and the entity names that facts hinge on are matched verbatim.

    Args:
        corpus_ids: unique id of each candidate.
        corpus_texts: candidate texts, aligned with `corpus_ids`.
        queries: query texts.
        k: number of results per query (at most the corpus size).
        k1: BM25 term-frequency saturation (bm25s default).
        b: BM25 length normalisation (bm25s default).
        stopwords: bm25s stopword list name, or None to keep every token.

    Returns:
        (ids, scores): ids[q] lists min(k, N) corpus ids best first; scores is float32
        [len(queries), min(k, N)]. Ties are ordered by corpus id ascending.
    """
    # Imported here: bm25s imports jax and runs a computation on import, which would
    # initialise the JAX backend as a side effect of merely importing this module.
    import bm25s

    id_rank = _id_ranks(corpus_ids, corpus_texts)
    n = len(corpus_ids)
    corpus_tok = bm25s.tokenize(list(corpus_texts), stopwords=stopwords, show_progress=False)
    query_tok = bm25s.tokenize(
        list(queries), stopwords=stopwords, return_ids=False, show_progress=False
    )
    retriever = None
    if corpus_tok.vocab:  # bm25s cannot index a corpus without a single token
        retriever = bm25s.BM25(k1=k1, b=b, method='lucene')
        retriever.index(corpus_tok, show_progress=False)

    def rows():
        for tokens in query_tok:
            if retriever is None or not tokens:  # bm25s rejects empty queries; all score 0
                yield np.zeros(n, np.float32)
            else:  # unknown tokens are dropped by bm25s and contribute 0
                yield np.asarray(retriever.get_scores(tokens), np.float32)

    return _rank_all(rows(), corpus_ids, id_rank, k, len(queries))


@functools.cache
def default_encoder() -> Encoder:
    """The shared all-MiniLM-L6-v2 encoder (loaded once: weights and jit caches are reused)."""
    from trackstar_jax.eval.minilm import MiniLMEncoder

    return MiniLMEncoder()


def dense_top_k(
    corpus_ids: Sequence[str],
    corpus_texts: Sequence[str],
    queries: Sequence[str],
    k: int,
    encoder: Encoder | None = None,
) -> tuple[list[list[str]], np.ndarray]:
    """Ranks the corpus for each query by exact cosine similarity of sentence embeddings.

    Args:
        corpus_ids: unique id of each candidate.
        corpus_texts: candidate texts, aligned with `corpus_ids`.
        queries: query texts.
        k: number of results per query (at most the corpus size).
        encoder: object with `encode(texts) -> float32 [n, d]` unit-norm rows; defaults to
            all-MiniLM-L6-v2 (`default_encoder()`).

    Returns:
        (ids, scores): as `bm25_top_k`, with cosine similarities as scores.
    """
    encoder = encoder or default_encoder()
    id_rank = _id_ranks(corpus_ids, corpus_texts)
    # Embed each distinct text once: saves work on duplicated candidates and guarantees that
    # identical texts get bit-identical scores, so the id tie-break really decides their order.
    uniq, inverse = np.unique(np.asarray(list(corpus_texts), dtype=object), return_inverse=True)
    corpus_emb = np.asarray(encoder.encode(list(uniq)), np.float32)
    query_emb = np.asarray(encoder.encode(list(queries)), np.float32)

    def rows():
        for s in range(0, len(queries), _DENSE_QUERY_CHUNK):
            block = query_emb[s : s + _DENSE_QUERY_CHUNK] @ corpus_emb.T
            yield from block[:, inverse.reshape(-1)]

    return _rank_all(rows(), corpus_ids, id_rank, k, len(queries))
