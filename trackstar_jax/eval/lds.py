"""The linear datamodeling score (LDS): how well attribution scores predict retraining.

For M random subsets S_j of the training set (each a fraction of it), a model is
retrained on each; for a query z the method predicts g(z, S_j) = Σ_{m ∈ S_j} τ(z, m) and
the retrained model measures f(z, S_j). LDS(z) is the Spearman rank correlation of the
two over the M subsets, and a method's LDS is its mean over queries (Park et al. 2023,
TRAK; the data-attribution tutorial's "does it predict counterfactuals" test).

Sign convention: τ > 0 means "training on m helps z" (a proponent), so ``outcome`` is
a quantity that rises when the subset helps: the query's log-probability (minus its
loss), not its loss.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def subset_masks(num_examples: int, num_subsets: int, fraction: float, seed: int) -> np.ndarray:
    """bool [M, N]: subset j holds round(fraction · N) examples drawn without replacement
    by ``np.random.default_rng((seed, j))`` (subset j is the same whatever M is)."""
    if not 0 < fraction < 1:
        raise ValueError(f'fraction must be in (0, 1), got {fraction}.')
    size = int(round(fraction * num_examples))
    masks = np.zeros((num_subsets, num_examples), bool)
    for j in range(num_subsets):
        masks[j, np.random.default_rng((seed, j)).choice(num_examples, size, replace=False)] = True
    return masks


def predicted(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """[Q, M] Σ_{m ∈ S_j} scores[q, m] (float64)."""
    return np.asarray(scores, np.float64) @ np.asarray(masks, np.float64).T


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing their mean rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind='stable')
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation (Pearson on tie-averaged ranks); NaN if either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float('nan')


@dataclasses.dataclass(frozen=True)
class LDS:
    """A method's LDS.

    Attributes:
      mean: mean of the per-query correlations (constant queries left out).
      ci: 95% bootstrap interval of the mean over queries.
      per_query: [Q] Spearman correlations (NaN where undefined).
    """

    mean: float
    ci: tuple[float, float]
    per_query: np.ndarray


def lds(
    scores: np.ndarray,
    masks: np.ndarray,
    outcome: np.ndarray,
    *,
    bootstrap: int = 2000,
    seed: int = 0,
) -> LDS:
    """LDS of attribution ``scores`` [Q, N] against retraining ``outcome`` [Q, M] on the
    subsets ``masks`` [M, N] (see the module docstring for the sign)."""
    scores, outcome = np.asarray(scores), np.asarray(outcome)
    if scores.shape[1] != masks.shape[1] or outcome.shape != (scores.shape[0], masks.shape[0]):
        raise ValueError(
            f'Shapes disagree: scores {scores.shape}, masks {masks.shape}, outcome '
            f'{outcome.shape} (want [Q, N], [M, N], [Q, M]).'
        )
    pred = predicted(scores, masks)
    per = np.array([spearman(p, o) for p, o in zip(pred, outcome, strict=True)])
    live = per[np.isfinite(per)]
    if not len(live):
        return LDS(float('nan'), (float('nan'), float('nan')), per)
    rng = np.random.default_rng(seed)
    means = rng.choice(live, (bootstrap, len(live)), replace=True).mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return LDS(float(live.mean()), (float(lo), float(hi)), per)
