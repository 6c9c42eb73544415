"""Attribution metrics of the paper (§4.3): MRR and Recall@k of entailing proponents."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np


def reciprocal_rank(retrieved: Sequence[str], entailing: Collection[str]) -> float:
    """1 / rank of the first entailing id in ``retrieved`` (best first); 0 if none."""
    for rank, example_id in enumerate(retrieved, 1):
        if example_id in entailing:
            return 1.0 / rank
    return 0.0


def mrr(retrieved: Sequence[Sequence[str]], entailing: Sequence[Collection[str]]) -> float:
    """Mean over queries of the reciprocal rank of the top-ranked entailing proponent."""
    _check(retrieved, entailing)
    return float(
        np.mean([reciprocal_rank(r, e) for r, e in zip(retrieved, entailing, strict=True)])
    )


def recall_at_k(
    retrieved: Sequence[Sequence[str]], entailing: Sequence[Collection[str]], k: int = 10
) -> float:
    """Fraction of queries with an entailing proponent among the top k."""
    _check(retrieved, entailing)
    return float(
        np.mean([any(x in e for x in r[:k]) for r, e in zip(retrieved, entailing, strict=True)])
    )


def _check(retrieved, entailing) -> None:
    if len(retrieved) != len(entailing):
        raise ValueError(f'{len(retrieved)} retrieval lists for {len(entailing)} queries.')
    if not retrieved:
        raise ValueError('No queries.')
