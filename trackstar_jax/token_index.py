"""The token index of support samples: one row per target token, keyed by token v too.

A *token index* stores one row per target token (row id ``<example>#<position>``, in
example order; chunks of fixed size, resumable and checksummed as any index): φ as the
row's vector and two side columns,

    target [1 + m] int32    y_i, then every other v with p(v | x_i) ≥ the floor, most
                            probable first (−1: an empty slot)
    alpha  [1 + m] float32  1 − p(y_i | x_i), then −p(v | x_i) for those tokens

α is dense over the vocabulary but tiny almost everywhere: the index keeps every v with
p(v | x_i) ≥ ``alpha_floor`` in m = min(⌊1 / floor⌋, V − 1) slots, enough for all of
them (at most 1 / floor tokens can each have p ≥ floor). What is dropped is
α_{i,v} ∈ (−floor, 0) for y_i ≠ v, so support sets at any τ ≥ floor are exact, and a
dropped token's contribution to a score is below floor · ‖φ_i‖ · ‖φ′‖ in magnitude
(:attr:`Contributions.dropped_bound` states it for each query).

``by_token/`` beside the rows is the index keyed by v: every stored (row, α) with that
target, in CSR form (``offsets`` [V + 1], ``rows``, ``alpha``), checksummed files.

This module is storage and arithmetic over it (no model code): :mod:`trackstar_jax.support`
writes the index from a model and gives the query-side φ(x′).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trackstar_jax import index as index_lib
from trackstar_jax.index import Index

KIND = 'support_tokens'


def target_positions(example: Mapping[str, Any]) -> np.ndarray:
    """Positions of an example's target tokens (its loss mask)."""
    return np.flatnonzero(np.asarray(example['loss_mask']) > 0)


def split_row_id(row_id: str) -> tuple[str, int]:
    """(example id, position) of a token row id ``<example>#<position>``."""
    example, _, pos = row_id.rpartition('#')
    return example, int(pos)


# ----------------------------------------------------------------------------- by token

_CSR = ('offsets', 'rows', 'alpha')


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def build_by_token(idx: Index) -> dict[str, np.ndarray]:
    """Writes (and returns) the CSR over v of every stored (row, α_{row,v}) of ``idx``.

    Entries of one v are ordered by α descending, then row: Type-1 (α > 0) first, the
    most negative Type-2 last.
    """
    vocab = int(idx.manifest['vocab_size'])
    toks, rows, alphas = [], [], []
    step = int(idx.manifest['chunk_rows'])
    for start in range(0, len(idx), step):
        sl = slice(start, min(start + step, len(idx)))
        tg, al = idx.extra('target', sl), idx.extra('alpha', sl)
        keep = tg >= 0
        r = np.broadcast_to(np.arange(sl.start, sl.stop, dtype=np.int32)[:, None], tg.shape)
        toks.append(tg[keep])
        rows.append(r[keep])
        alphas.append(al[keep])
    tok, row, alpha = (np.concatenate(a) for a in (toks, rows, alphas))
    order = np.lexsort((row, -alpha, tok))
    tok, row, alpha = tok[order], row[order].astype(np.int32), alpha[order].astype(np.float32)
    offsets = np.zeros(vocab + 1, np.int64)
    np.add.at(offsets, tok + 1, 1)
    csr = {'offsets': np.cumsum(offsets), 'rows': row, 'alpha': alpha}
    for name in _CSR:
        index_lib.write_checked(index_lib.join(idx.path, f'by_token/{name}.npy'), _npy(csr[name]))
    return csr


def load_by_token(idx: Index) -> dict[str, np.ndarray]:
    """The by-token CSR of ``idx`` (checksums verified), built first if it is missing."""
    store = index_lib.Store(idx.path)
    if not all(store.exists(f'by_token/{n}.npy') for n in _CSR):
        return build_by_token(idx)
    return {
        n: np.load(
            io.BytesIO(index_lib.read_checked(index_lib.join(idx.path, f'by_token/{n}.npy')))
        )
        for n in _CSR
    }


# ----------------------------------------------------------------------------- queries


@dataclasses.dataclass
class SupportSet:
    """S_v = {i : |α_{i,v}| ≥ τ} of one token v, split by type, each by |α| descending.

    Attributes:
      token: v.
      tau: τ.
      type1_ids, type1_alpha: y_i = v (α = 1 − p(v | x_i) ≥ τ): they promote v.
      type2_ids, type2_alpha: y_i ≠ v (α = −p(v | x_i) ≤ −τ): they deter it.
      type1_rows, type2_rows: their row numbers in the token index.
    """

    token: int
    tau: float
    type1_ids: list[str]
    type1_alpha: np.ndarray
    type1_rows: np.ndarray
    type2_ids: list[str]
    type2_alpha: np.ndarray
    type2_rows: np.ndarray


@dataclasses.dataclass
class Contributions:
    """The training tokens that most promote and most deter predicting v after a context.

    score_i = α_{i,v} ⟨φ(x_i), φ(x′)⟩ (the 1/(2Nλ) of the theorem is one positive constant
    and does not change the order). ``promote_*`` are the k largest positive scores,
    ``deter_*`` the k most negative, each over every stored (i, α_{i,v}) of v (exact),
    ties by row (fewer than k when fewer have that sign). ``dropped_bound`` bounds
    |score| of any token the index did not keep for v: alpha_floor · max_i ‖φ_i‖ · ‖φ(x′)‖.
    """

    token: int
    promote_ids: list[str]
    promote_scores: np.ndarray
    promote_alpha: np.ndarray
    promote_rows: np.ndarray
    deter_ids: list[str]
    deter_scores: np.ndarray
    deter_alpha: np.ndarray
    deter_rows: np.ndarray
    total: float
    dropped_bound: float


class TokenIndex:
    """A token index with its by-token CSR: support sets and contributions, one call each."""

    def __init__(self, idx: Index | str):
        self.index = index_lib.open(idx) if isinstance(idx, str) else idx
        if self.index.manifest.get('kind') != KIND:
            raise ValueError(f'{self.index.path} is not a token index (kind {KIND!r}).')
        self.by_token = load_by_token(self.index)
        self.vocab_size = int(self.index.manifest['vocab_size'])
        self._max_norm = float(self.index.norms().max()) if len(self.index) else 0.0
        self._row_examples: tuple[np.ndarray, list[str]] | None = None

    def row_examples(self) -> tuple[np.ndarray, list[str]]:
        """(example number of every row [N], example ids in row order)."""
        if self._row_examples is None:
            names = [split_row_id(r)[0] for r in self.index.ids]
            new = np.zeros(len(names), np.int64)
            new[1:] = [a != b for a, b in zip(names[1:], names[:-1], strict=True)]
            number = np.cumsum(new)
            self._row_examples = (number, [names[i] for i in np.flatnonzero(np.r_[1, new[1:]])])
        return self._row_examples

    def _entries(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= token < self.vocab_size:
            raise ValueError(f'token {token} is outside the vocabulary [0, {self.vocab_size}).')
        a, b = self.by_token['offsets'][token : token + 2]
        return self.by_token['rows'][a:b], self.by_token['alpha'][a:b]

    def head_from_support(self, lam: float) -> np.ndarray:
        """θ̂_v = 1/(2Nλ) Σ_i α_{i,v} φ(x_i) for every v ([V, d] float64; N = target rows).

        Equal to the head at a stationary point of the L2-regularised loss (paper's
        Theorem 1) up to the α's below the floor; for any other head its distance from
        this says how far the representer view is from describing it.
        """
        n = len(self.targets())
        out = np.zeros((self.vocab_size, self.index.dim))
        tokens = self.entry_tokens()
        rows, alpha = self.by_token['rows'], self.by_token['alpha'].astype(np.float64)
        step = 1 << 16
        for a in range(0, len(rows), step):
            r = rows[a : a + step]
            order = np.argsort(r, kind='stable')
            phis = np.empty((len(r), self.index.dim))
            phis[order] = self.index.read(r[order])
            np.add.at(out, tokens[a : a + step], alpha[a : a + step, None] * phis)
        return out / (2.0 * n * lam)

    def entry_tokens(self) -> np.ndarray:
        """v of every by-token entry (aligned with ``by_token['rows']`` / ``['alpha']``)."""
        return np.repeat(np.arange(self.vocab_size), np.diff(self.by_token['offsets']))

    def targets(self) -> np.ndarray:
        """Rows that are target tokens (all of them; int [N])."""
        return np.arange(len(self.index))

    def support(self, token: int, tau: float = 0.5) -> SupportSet:
        """S_v at threshold τ (≥ the index's alpha_floor, so the set is exact)."""
        floor = float(self.index.manifest['alpha_floor'])
        if tau < floor:
            raise ValueError(f'tau {tau} < alpha_floor {floor}: the index does not hold that set.')
        rows, alpha = self._entries(token)
        ids = self.index.ids
        t1 = alpha >= tau
        t2 = alpha <= -tau
        r2, a2 = rows[t2][::-1], alpha[t2][::-1]  # most negative first
        return SupportSet(token, tau, [ids[r] for r in rows[t1]], alpha[t1], rows[t1],
                          [ids[r] for r in r2], a2, r2)  # fmt: skip

    def contributions(self, token: int, phi_query: np.ndarray, k: int = 10) -> Contributions:
        """Top-k promoting and deterring training tokens for predicting ``token`` after a
        context whose head input is ``phi_query`` ([d], as :func:`prompt_features` gives)."""
        rows, alpha = self._entries(token)
        phi_query = np.asarray(phi_query, np.float32)
        if phi_query.shape != (self.index.dim,):
            raise ValueError(f'phi_query must be [{self.index.dim}], got {phi_query.shape}.')
        bound = float(self.index.manifest['alpha_floor']) * self._max_norm
        bound *= float(np.linalg.norm(phi_query))
        if not len(rows):
            empty = np.zeros(0, np.float32)
            none = np.zeros(0, np.int64)
            return Contributions(token, [], empty, empty, none, [], empty, empty, none, 0.0, bound)
        order = np.argsort(rows, kind='stable')
        rows, alpha = rows[order], alpha[order]
        phis = self.index.read(rows)
        dots = phis.astype(np.float64) @ phi_query.astype(np.float64)
        scores = alpha.astype(np.float64) * dots
        ids = self.index.ids
        # Stable sorts over rows in ascending order: ties go to the lower row. Only
        # positive scores promote, only negative ones deter.
        top = np.argsort(-scores, kind='stable')[: min(k, int((scores > 0).sum()))]
        low = np.argsort(scores, kind='stable')[: min(k, int((scores < 0).sum()))]
        return Contributions(
            token,
            [ids[r] for r in rows[top]], scores[top], alpha[top], rows[top],
            [ids[r] for r in rows[low]], scores[low], alpha[low], rows[low],
            float(scores.sum()), bound,
        )  # fmt: skip


def summary(tok: TokenIndex, tau: float = 0.5, top: int = 10) -> dict[str, Any]:
    """The paper's counts at τ: support samples S = ∪_v S_v among the target tokens, their
    share, Type-1 / Type-2 memberships, and how S_v sizes spread over tokens."""
    idx = tok.index
    targets = tok.targets()
    alpha = np.abs(idx.extra('alpha'))
    is_support = (alpha[targets] >= tau).any(axis=1)
    a = tok.by_token['alpha']
    sizes = np.zeros(tok.vocab_size, np.int64)
    tokens = tok.entry_tokens()
    member = np.abs(a) >= tau
    np.add.at(sizes, tokens[member], 1)
    seen = np.flatnonzero(
        np.bincount(idx.extra('target', None)[targets, 0], minlength=tok.vocab_size)
    )
    by_size = np.argsort(-sizes, kind='stable')[:top]
    return {
        'tau': tau,
        'target_tokens': int(len(targets)),
        'support_samples': int(is_support.sum()),
        'support_share': float(is_support.mean()) if len(targets) else 0.0,
        'type1_memberships': int((member & (a > 0)).sum()),
        'type2_memberships': int((member & (a < 0)).sum()),
        'tokens_with_support': int((sizes > 0).sum()),
        'target_vocabulary': int(len(seen)),
        'tokens_with_fewer_than_10': int(((sizes < 10) & (sizes > 0)).sum()),
        'support_set_sizes': sizes.tolist(),
        'largest_support_sets': [[int(v), int(sizes[v])] for v in by_size],
    }


def representer_scores(
    tok: TokenIndex, phis: np.ndarray, tokens: Sequence[int]
) -> tuple[list[str], np.ndarray]:
    """Representer-point attribution of a completion to each training example.

    score(e) = Σ_t Σ_{i ∈ e} α_{i,v_t} ⟨φ(x_i), φ(x′_t)⟩ over the completion's tokens v_t
    (contexts x′_t, head inputs ``phis`` [n, d]): the examples' share of the completion's
    logits under the representer decomposition (exact over the stored α; a dropped α
    changes a term by less than :attr:`Contributions.dropped_bound`).

    Returns:
      (example ids in index order, float64 scores [E]).
    """
    example_of_row, examples = tok.row_examples()
    out = np.zeros(len(examples))
    for phi, v in zip(np.asarray(phis, np.float64), tokens, strict=True):
        rows, alpha = tok._entries(int(v))
        if not len(rows):
            continue
        order = np.argsort(rows, kind='stable')
        rows, alpha = rows[order], alpha[order]
        terms = alpha.astype(np.float64) * (tok.index.read(rows).astype(np.float64) @ phi)
        np.add.at(out, example_of_row[rows], terms)
    return examples, out


def token_context(example: Mapping[str, Any], position: int, decode: Any, window: int = 12):
    """(the text of the ``window`` tokens before ``position``, the token there), decoded
    with ``decode`` (a tokenizer's ids -> str); the leading EOS is not shown."""
    toks = [int(t) for t in np.asarray(example['tokens'])]
    return decode(toks[max(1, position - window) : position]), decode(toks[position : position + 1])


def describe(c: Contributions, example_of: Any, decode: Any) -> dict[str, Any]:
    """Contributions as rows a person reads: {'promote', 'deter'}, each row {'row',
    'passage', 'score', 'alpha', 'context', 'token'} (``example_of(example id)`` gives
    the example a row came from, ``decode`` a tokenizer's ids -> str)."""

    def side(ids, scores, alphas):
        rows = []
        for rid, score, alpha in zip(ids, scores, alphas, strict=True):
            ex_id, pos = split_row_id(rid)
            context, token = token_context(example_of(ex_id), pos, decode)
            rows.append({'row': rid, 'passage': ex_id, 'score': float(score),
                         'alpha': float(alpha), 'context': context, 'token': token})  # fmt: skip
        return rows

    return {
        'promote': side(c.promote_ids, c.promote_scores, c.promote_alpha),
        'deter': side(c.deter_ids, c.deter_scores, c.deter_alpha),
    }
