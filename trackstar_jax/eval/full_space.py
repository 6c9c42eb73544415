"""Exact gradient scores in the full parameter space, for models small enough to hold
every example's whole gradient: the quantities the projected index approximates.

:func:`gradient_products` takes every query's and every training example's per-example
loss gradient, unprojected, and keeps, per parameter tensor t, the inner products a
score is assembled from (float64):

* ⟨g_q, g_m⟩_t (raw), ⟨C g_q, C g_m⟩_t (the optimizer correction C = V^{-1/2} on both
  sides, as TrackStar's index) and ⟨g_q, C g_m⟩_t (on the training side only, as one
  optimizer step applies it),
* each gradient's squared norm per tensor, raw and corrected, and each example's number
  of target tokens.

:func:`score` assembles a [Q, N] score from them for one *form* over any subset of the
tensors, so the parts that separate a projected TrackStar score from what one training
step does (the projection, the parameters left out, correcting the query too, unit norm
over the whole gradient vs Adafactor's per-tensor update clipping) can be taken away one
at a time. The forms:

* 'dot': Σ_t ⟨g_q, g_m⟩_t.
* 'cosine': the same over ‖g_q‖ ‖g_m‖.
* 'corrected': Σ_t ⟨C g_q, C g_m⟩_t over ‖C g_q‖ ‖C g_m‖ (the paper's Exp 4, unprojected).
* 'train_corrected': Σ_t ⟨g_q, C g_m⟩_t over ‖g_q‖ ‖C g_m‖.
* 'step': Σ_t ⟨g_q, u_m⟩_t / ‖g_q‖ with u_m = C g̃_m clipped per tensor as optax's
  Adafactor clips an update (u_t / max(1, RMS(u_t) / threshold)) and g̃_m the gradient
  of the example's mean token loss (the trainer's objective on a batch of one): the
  first-order effect on the query's loss of one step on m with the second moments held
  at V, up to the learning rate. With ``parameter_scale`` each tensor's update is also
  multiplied by max(RMS(θ_t), 1e-3), as Adafactor's ``multiply_by_parameter_scale``
  does (``TrainConfig.multiply_by_parameter_scale``): the step of a model trained so.

Sign: every form is positive when a step on m lowers the query's loss (a proponent).

:func:`preconditioned_score` adds R: TrackStar's block-diagonal R^{-1/2} (R_train, or
mixed with R_eval) and TRAK's one-block (ΦᵀΦ)⁻¹, exactly in the full space, from the
training examples' and queries' Gram matrices (``gradient_products(grams=True)``). With
N training examples and d_b ≫ N parameters in a block, R_b = Φ_bᵀ Φ_b / N has rank ≤ N
and, by the push-through identity (ΦᵀΦ + δI)⁻¹ Φᵀ = Φᵀ (ΦΦᵀ + δI)⁻¹, a training
example's score q_bᵀ (R_b + δI)⁻¹ g_m is N [(K_b + NδI)⁻¹ Φ_b q_b]_m with K_b = Φ_b Φ_bᵀ:
the example's coefficient in a ridge regression of the query's gradient on the training
gradients. No d_b x d_b matrix is formed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from trackstar_jax import losses
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.grads import correction as correction_lib
from trackstar_jax.grads import layout as layout_lib

FORMS = ('dot', 'cosine', 'corrected', 'train_corrected', 'step')


@dataclasses.dataclass(frozen=True)
class GradientProducts:
    """Per-tensor inner products of every (query, training example) pair's gradients.

    Attributes:
      paths: the parameter tensors, '/'-joined paths.
      sizes: [T] number of values of each tensor.
      raw: [T, Q, N] ⟨g_q, g_m⟩ per tensor.
      corrected: [T, Q, N] ⟨C g_q, C g_m⟩.
      train_corrected: [T, Q, N] ⟨g_q, C g_m⟩.
      query_sq: [T, Q] ‖g_q‖² per tensor; ``query_sq_corrected`` the same of C g_q.
      example_sq: [T, N] ‖g_m‖²; ``example_sq_corrected`` the same of C g_m.
      example_tokens: [N] target tokens of each training example.
      param_rms: [T] RMS of each tensor's parameter values (what Adafactor's parameter
        scaling multiplies a tensor's update by, floored at 1e-3); None where unknown.
      raw_example_gram, corrected_example_gram: [T, N, N] ⟨g_m, g_m'⟩ and
        ⟨C g_m, C g_m'⟩ per tensor (only with ``gradient_products(grams=True)``).
      raw_query_gram, corrected_query_gram: [T, Q, Q] the same of the queries.
    """

    paths: tuple[str, ...]
    sizes: np.ndarray
    raw: np.ndarray
    corrected: np.ndarray
    train_corrected: np.ndarray
    query_sq: np.ndarray
    query_sq_corrected: np.ndarray
    example_sq: np.ndarray
    example_sq_corrected: np.ndarray
    example_tokens: np.ndarray
    raw_example_gram: np.ndarray | None = None
    corrected_example_gram: np.ndarray | None = None
    raw_query_gram: np.ndarray | None = None
    corrected_query_gram: np.ndarray | None = None
    param_rms: np.ndarray | None = None


def dense_corrections(params: Any, correction: str, opt_state: Any | None) -> dict[str, np.ndarray]:
    """C = V^{-1/2} of every parameter as a float64 array of its shape, keyed by path
    (``grads.correction``'s factors multiplied out; ones for correction 'none')."""
    layout = layout_lib.build_layout(
        params, block_dim=1, num_layer_blocks=1, split_attention_mlp=False, exclude=()
    )
    out = {}
    corrections = correction_lib.param_corrections(layout, correction, opt_state)
    for entry in layout.entries:
        corr = corrections[entry.path]
        if corr.kind == 'rank_one':
            c = np.outer(np.asarray(corr.row, np.float64), np.asarray(corr.col, np.float64))
        elif corr.kind == 'elementwise':
            c = np.asarray(corr.full, np.float64)
        else:
            c = np.ones(entry.shape, np.float64)
        out[entry.path] = c.reshape(entry.shape)
    return out


def _per_example_grads(model: nn.Module):
    def example_loss(params, tokens, mask):
        logits = model.apply({'params': params}, tokens[None])
        return losses.example_losses(logits, tokens[None], mask[None])[0]

    return jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0)))


def _flat(grads: Any, paths: Sequence[str]) -> list[np.ndarray]:
    by_path = {
        layout_lib.path_str(p): leaf
        for p, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(grads))
    }
    return [np.asarray(by_path[p], np.float64).reshape(len(by_path[p]), -1) for p in paths]


def gradient_products(
    model: nn.Module,
    params: Any,
    opt_state: Any | None,
    queries: Sequence[dict],
    examples: Sequence[dict],
    *,
    seq_len: int,
    query_len: int,
    correction: str = 'adafactor',
    batch_size: int = 16,
    grams: bool = False,
) -> GradientProducts:
    """The per-tensor products of every query's and example's whole loss gradient.

    Args:
      model, params: the LM and its (unboxed or boxed) parameters.
      opt_state: the optimizer state C is read from (None with correction 'none').
      queries, examples: {'tokens', 'loss_mask'} records (loss on the masked tokens).
      seq_len, query_len: padded lengths of the examples and of the queries.
      correction: as ``GradientSpec.correction``.
      batch_size: examples per vmapped gradient call.
      grams: also keep the examples' and queries' Gram matrices (what
        :func:`preconditioned_score` needs).

    Memory: every query's whole gradient is held (Q x parameters, float64) and
    ``batch_size`` examples' at a time (with ``grams``, every example's, float32), so
    this is for models of up to a few million parameters.
    """
    params = nn.unbox(params)
    dense = dense_corrections(params, correction, opt_state)
    paths = tuple(sorted(dense))
    values = {layout_lib.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    param_rms = np.array([np.sqrt(np.mean(np.square(np.asarray(values[p], np.float64))))
                          for p in paths])  # fmt: skip
    c = [dense[p].reshape(1, -1) for p in paths]
    grad_fn = _per_example_grads(model)

    def batches(records, length):
        """(indices of records, [per-tensor gradients of its rows]) per batch."""
        keys = range(len(records))
        for group, batch in examples_lib.length_groups(
            keys, records, batch_size, length, bucket=False
        ):
            g = _flat(grad_fn(params, batch['tokens'], batch['loss_mask']), paths)
            yield list(group), [x[: len(group)] for x in g]

    q_parts = [g for _, g in batches(list(queries), query_len)]
    q_grads = [np.concatenate(parts) for parts in zip(*q_parts, strict=True)]
    qc = [g * ct for g, ct in zip(q_grads, c, strict=True)]
    nt, nq, nn_ = len(paths), len(queries), len(examples)
    raw, both, side = (np.zeros((nt, nq, nn_)) for _ in range(3))
    e_sq, e_sq_c = np.zeros((nt, nn_)), np.zeros((nt, nn_))
    # The gradients are float32 (float64 under jax_enable_x64): held in their own precision.
    held_dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    held = [np.zeros((nn_, int(x.size)), held_dtype) for x in c] if grams else None
    t0 = time.time()
    for i, (cols, g) in enumerate(batches(list(examples), seq_len)):
        for t in range(nt):
            gmc = g[t] * c[t]
            raw[t][:, cols] = q_grads[t] @ g[t].T
            both[t][:, cols] = qc[t] @ gmc.T
            side[t][:, cols] = q_grads[t] @ gmc.T
            e_sq[t, cols] = (g[t] * g[t]).sum(1)
            e_sq_c[t, cols] = (gmc * gmc).sum(1)
            if held is not None:
                held[t][cols] = g[t]  # exact: g[t] holds the gradient's own values
        if i % 8 == 0:
            logging.info('Full-space gradients: %d/%d examples, %.0fs', cols[-1] + 1, nn_,
                         time.time() - t0)  # fmt: skip
    gram_fields = {}
    if held is not None:
        gram_fields = {
            'raw_example_gram': np.stack([_gram(h) for h in held]),
            'corrected_example_gram': np.stack(
                [_gram(h, ct) for h, ct in zip(held, c, strict=True)]
            ),
            'raw_query_gram': np.stack([g @ g.T for g in q_grads]),
            'corrected_query_gram': np.stack([g @ g.T for g in qc]),
        }
    return GradientProducts(
        **gram_fields,
        paths=paths,
        sizes=np.array([dense[p].size for p in paths]),
        raw=raw,
        corrected=both,
        train_corrected=side,
        query_sq=np.stack([(g * g).sum(1) for g in q_grads]),
        query_sq_corrected=np.stack([(g * g).sum(1) for g in qc]),
        example_sq=e_sq,
        example_sq_corrected=e_sq_c,
        example_tokens=np.array([float(np.sum(ex['loss_mask'])) for ex in examples]),
        param_rms=param_rms,
    )


def _gram(held: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    """[N, N] float64 Gram matrix of the rows of ``held`` (times ``c``), in row chunks."""
    n, out = len(held), np.zeros((len(held), len(held)))
    x = held.astype(np.float64) if c is None else held * c  # float32 x float64 -> float64
    for lo in range(0, n, 256):
        out[lo : lo + 256] = x[lo : lo + 256] @ x.T
    return out


def tensor_mask(products: GradientProducts, exclude: Sequence[str] = ()) -> np.ndarray:
    """bool [T]: the tensors whose path contains none of ``exclude`` (as
    ``GradientSpec.exclude`` leaves parameters out)."""
    return np.array([not any(x in p for x in exclude) for p in products.paths])


def score(
    products: GradientProducts,
    form: str,
    exclude: Sequence[str] = (),
    clipping_threshold: float | None = 1.0,
    parameter_scale: bool = False,
) -> np.ndarray:
    """[Q, N] scores of one form (see the module docstring) over the tensors whose path
    contains none of ``exclude``.

    Args:
      products: from :func:`gradient_products`.
      form: one of ``FORMS``.
      exclude: tensors whose path contains any of these are left out.
      clipping_threshold: the step form's per-tensor update clipping (None: none).
      parameter_scale: the step form's updates scaled by each tensor's parameter RMS.

    Raises:
      ValueError: for an unknown form, an ``exclude`` that leaves no tensor, or
        ``parameter_scale`` with another form or without ``products.param_rms``.
    """
    if form not in FORMS:
        raise ValueError(f'form must be one of {FORMS}, got {form!r}.')
    if parameter_scale and (form != 'step' or products.param_rms is None):
        raise ValueError("parameter_scale needs form 'step' and products with param_rms.")
    keep = tensor_mask(products, exclude)
    if not keep.any():
        raise ValueError(f'exclude={tuple(exclude)} leaves no parameter tensor.')

    def norm(sq):
        return np.sqrt(np.maximum(sq[keep].sum(0), 1e-300))

    if form == 'dot':
        return products.raw[keep].sum(0)
    if form == 'cosine':
        return products.raw[keep].sum(0) / np.outer(norm(products.query_sq),
                                                     norm(products.example_sq))  # fmt: skip
    if form == 'corrected':
        den = np.outer(norm(products.query_sq_corrected), norm(products.example_sq_corrected))
        return products.corrected[keep].sum(0) / den
    if form == 'train_corrected':
        den = np.outer(norm(products.query_sq), norm(products.example_sq_corrected))
        return products.train_corrected[keep].sum(0) / den
    # 'step': u_t = C g̃_t / max(1, RMS(C g̃_t) / threshold), g̃ = g / tokens.
    tokens = np.maximum(products.example_tokens, 1.0)
    per_tensor = products.train_corrected[keep] / tokens  # ⟨g_q, C g̃_m⟩_t
    if clipping_threshold is not None:
        rms = np.sqrt(products.example_sq_corrected[keep]) / tokens
        rms = rms / np.sqrt(products.sizes[keep])[:, None]
        per_tensor = per_tensor / np.maximum(1.0, rms / clipping_threshold)[:, None, :]
    if parameter_scale:  # optax's scale_by_param_block_rms: max(RMS(θ_t), 1e-3)
        per_tensor = per_tensor * np.maximum(products.param_rms[keep], 1e-3)[:, None, None]
    return per_tensor.sum(0) / norm(products.query_sq)[:, None]


def tensor_blocks(products: GradientProducts, spec: Any, params: Any) -> np.ndarray:
    """int [T]: the index block of each tensor of ``products`` under the GradientSpec
    ``spec`` (its layer groups, attention/MLP split and exclusions; -1 = left out)."""
    blocks = {e.path: e.block for e in spec.layout(nn.unbox(params)).entries}
    return np.array([blocks[p] for p in products.paths])


_TINY = np.finfo(np.float64).tiny


def preconditioned_score(
    products: GradientProducts,
    blocks: Sequence[int] | np.ndarray,
    *,
    corrected: bool,
    lam: float = 0.0,
    damping: float = 0.01,
    unit_norm: bool = True,
) -> np.ndarray:
    """[Q, N] exact scores with a block-diagonal R, as the index's preconditioners define
    it but over the whole gradient: per block b, R_b = λ Φ_qᵀ Φ_q / Q + (1 − λ) Φᵀ Φ / N
    (Φ the training examples' gradients in b, Φ_q the queries'), δ_b = ``damping`` x the
    mean eigenvalue of R_b (over all d_b of them, as ``hessian.inverse_sqrt``), and the
    score ⟨(R + δI)^{-1/2} x_q, (R + δI)^{-1/2} x_m⟩, over both vectors' norms with
    ``unit_norm``.

    Args:
      products: from ``gradient_products(grams=True)``.
      blocks: [T] each tensor's block (e.g. :func:`tensor_blocks`; one block for every
        kept tensor is TRAK's (ΦᵀΦ)⁻¹); -1 leaves a tensor out.
      corrected: the vectors are C g (TrackStar's index) or the raw gradients.
      lam: λ of R_eval, in [0, 1].
      damping: relative damping (the library's ``FitConfig.damping``).
      unit_norm: normalise both preconditioned vectors (TrackStar) or not (TRAK).

    Raises:
      ValueError: without Gram matrices, for λ outside [0, 1], for blocks that keep no
        tensor, or for a block whose gradients are all zero (R_b = 0).
    """
    if products.raw_example_gram is None:
        raise ValueError('preconditioned_score needs gradient_products(..., grams=True).')
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f'lam must be in [0, 1], got {lam!r}.')
    blocks = np.asarray(blocks)
    if blocks.shape != (len(products.paths),) or not (blocks >= 0).any():
        raise ValueError(
            f'blocks must give each of the {len(products.paths)} tensors a block (-1: left '
            f'out), with at least one kept; got {blocks}.'
        )
    if corrected:
        qm, mm, qq = (
            products.corrected,
            products.corrected_example_gram,
            products.corrected_query_gram,
        )
    else:
        qm, mm, qq = products.raw, products.raw_example_gram, products.raw_query_gram
    nq, n = qm.shape[1:]
    a2, c2 = (1.0 - lam) / n, lam / nq  # R = Hᵀ H with H = [√a2 Φ; √c2 Φ_q]
    scores, q_sq, m_sq = np.zeros((nq, n)), np.zeros(nq), np.zeros(n)
    for b in np.unique(blocks[blocks >= 0]):
        t = blocks == b
        k_qm, k_mm, k_qq = qm[t].sum(0), mm[t].sum(0), qq[t].sum(0)
        weight_m, weight_q = a2 * np.trace(k_mm), c2 * np.trace(k_qq)  # their traces in R_b
        if weight_m + weight_q <= 0:
            raise ValueError(f'Block {b}: every gradient in it is zero, so R_b = 0.')
        delta = max(damping * (weight_m + weight_q) / products.sizes[t].sum(), _TINY)
        ac = np.sqrt(a2 * c2)
        hh = np.block([[a2 * k_mm, ac * k_qm.T], [ac * k_qm, c2 * k_qq]])  # H Hᵀ
        s, u = np.linalg.eigh((hh + hh.T) / 2)
        s = np.maximum(s, 0.0)
        hq = np.concatenate([np.sqrt(a2) * k_qm.T, np.sqrt(c2) * k_qq])  # columns H x_q
        hm = np.concatenate([np.sqrt(a2) * k_mm, np.sqrt(c2) * k_qm])  # columns H x_m
        wq, wm, inv = u.T @ hq, u.T @ hm, 1.0 / (s + delta)
        # Each side by the formula that is exact for it. A side whose weight in R_b is
        # above δ is a row of H (x = Hᵀ e / √w): x_aᵀ (R + δ)⁻¹ x = [(H Hᵀ + δ)⁻¹ H x_a]_e / √w
        # and xᵀ (R + δ)⁻¹ x = [(H Hᵀ + δ)⁻¹ H Hᵀ]_ee / w, no cancellation. A side of weight
        # 0 or near it (λ = 0 or 1, or close) would divide by that weight; for it the
        # complement x_aᵀ (R + δ)⁻¹ x = (⟨x_a, x⟩ − (H x_a)ᵀ (H Hᵀ + δ)⁻¹ H x) / δ, which
        # holds for any x, has no cancellation either.
        rows_m, rows_q = weight_m > delta, weight_q > delta
        if rows_m:
            scores += (u[:n] @ (wq * inv[:, None])).T / np.sqrt(a2)
        elif rows_q:
            scores += (u[n:] @ (wm * inv[:, None])) / np.sqrt(c2)
        else:
            scores += (k_qm - wq.T @ (wm * inv[:, None])) / delta
        if rows_m:
            m_sq += (u[:n] ** 2) @ (s * inv) / a2
        else:
            m_sq += np.maximum(np.diag(k_mm) - (wm**2 * inv[:, None]).sum(0), 0) / delta
        if rows_q:
            q_sq += (u[n:] ** 2) @ (s * inv) / c2
        else:
            q_sq += np.maximum(np.diag(k_qq) - (wq**2 * inv[:, None]).sum(0), 0) / delta
    if not unit_norm:
        return scores
    return scores / np.sqrt(np.maximum(np.outer(q_sq, m_sq), 1e-300))
