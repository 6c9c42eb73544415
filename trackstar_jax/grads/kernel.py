"""The per-example gradient kernels: fused (LoGra-style) and the vmap reference.

Both compute, for every example z of a batch, the feature vector

    φ(z) = [ Σ_{W in block b} P0_W (D_r ∇W D_c) P1_Wᵀ ]_{b = 1..B}        (D floats)

with ∇W the per-example gradient of the output function (``output_objective``), D_r,
D_c the optimizer correction (``correction.py``) and P the projections
(``projection.py``).

**Fused path.** For a Dense layer y = x W over T tokens, ∇W = Σ_t x_tᵀ g_t with
g_t = ∂L/∂y_t, hence

    P0 D_r ∇W D_c P1ᵀ = (x D_r P0ᵀ)ᵀ (g D_c P1ᵀ).

Every ``nn.Dense`` call is intercepted (``nn.intercept_methods``, no model change): its
input is projected in the forward pass, and a custom-VJP *tap* on its output receives
g in the backward pass, projects it and returns the k x k product as the gradient of a
zero accumulator. We differentiate only with respect to those accumulators (and the
small non-Dense parameters), never the Dense kernels, so the backward pass computes
input gradients only: no weight-gradient products and no per-example gradient is ever
materialised. Parameters the kernel cannot fuse (norm scales, biases, N-d kernels,
parameters with an elementwise correction) are differentiated per example under vmap
and projected like the reference does: exact, with memory batch x their size.

**Reference path.** ``vmap(grad)`` over the full parameter tree, then
``project_gradients`` per example. Memory grows with batch x params; tests compare
the fused path to it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from trackstar_jax import losses
from trackstar_jax.grads.correction import ParamCorrection
from trackstar_jax.grads.layout import Layout, path_str
from trackstar_jax.models.decoder import RMSNorm

OUTPUT_FNS = ('loss', 'margin', 'logit', 'trak')
HIGHEST = jax.lax.Precision.HIGHEST
# GradientSpec.precision -> the precision of the kernel's projection matmuls. 'default'
# is float32 on CPU and bf16 inputs with float32 accumulation on TPU/GPU (3-6x faster
# there than 'highest', which tests and exactness checks on accelerators use).
PRECISIONS = {
    'default': jax.lax.Precision.DEFAULT,
    'high': jax.lax.Precision.HIGH,
    'highest': jax.lax.Precision.HIGHEST,
}


def output_objective(
    logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array, output_fn: str
) -> jax.Array:
    """The scalar whose parameter gradient is G(z), for one example or a batch (summed).

    * 'loss': Σ_t m_t · (−log p_t) — TrackStar's default.
    * 'margin': Σ_t Q_t m_t f_t with f = log(p/(1−p)) and Q = p − 1 per token (§A.2.1);
      since Loss = −log σ(f), this equals the loss gradient, computed through f.
    * 'logit': Σ_t Q_t m_t f_t with f the target logit and Q = p − 1.
    * 'trak': (1 − p̄) Σ_t m_t f_t with f the margin and p̄ the mean target
      probability of the example — TRAK's example-level Q (the paper's harmful ablation).
    Q is held constant (stop_gradient): it multiplies the gradient, it is not part of it.
    """
    mask = loss_mask.astype(jnp.float32)
    logp = losses.target_log_probs(logits, tokens)
    if output_fn == 'loss':
        return -jnp.sum(mask * logp)
    if output_fn not in OUTPUT_FNS:
        raise ValueError(f'output_fn must be one of {OUTPUT_FNS}, got {output_fn!r}.')
    picked, lse_others = losses.target_logits(logits, tokens)
    p = jax.lax.stop_gradient(jnp.exp(logp))
    if output_fn == 'margin':
        return jnp.sum(mask * (p - 1.0) * (picked - lse_others))
    if output_fn == 'logit':
        return jnp.sum(mask * (p - 1.0) * picked)
    p_bar = jnp.sum(mask * p, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return jnp.sum((1.0 - p_bar) * jnp.sum(mask * (picked - lse_others), axis=-1))


def _correct(grad_matrix: jax.Array, corr: ParamCorrection) -> jax.Array:
    if corr.kind == 'rank_one':
        return corr.row[:, None] * grad_matrix * corr.col[None, :]
    if corr.kind == 'elementwise':
        return grad_matrix * corr.full.reshape(grad_matrix.shape)
    return grad_matrix


def project_gradients(
    grads_by_path: Mapping[str, jax.Array],
    layout: Layout,
    corrections: Mapping[str, ParamCorrection],
    projections: Mapping[str, tuple[jax.Array, jax.Array]],
    precision: jax.lax.Precision = HIGHEST,
) -> jax.Array:
    """Correction + two-sided projection of one example's gradients -> float32 [D].

    Args:
      grads_by_path: gradient arrays keyed by parameter path; excluded and absent
        parameters contribute nothing.
      layout: the block layout.
      corrections: per-path corrections.
      projections: (P0, P1) per path, from ``projection.projection_pairs``.
      precision: of the projection matmuls.
    """
    k = layout.side
    present = [e for e in layout.entries if not e.excluded and e.path in grads_by_path]
    pairs = projections
    blocks = [jnp.zeros((k, k), jnp.float32) for _ in range(layout.num_blocks)]
    for entry in present:
        w = grads_by_path[entry.path].astype(jnp.float32).reshape(entry.matrix_shape)
        w = _correct(w, corrections[entry.path])
        p0, p1 = pairs[entry.path]
        proj = jnp.matmul(jnp.matmul(p0, w, precision=precision), p1.T, precision=precision)
        blocks[entry.block] = blocks[entry.block] + proj
    return jnp.stack(blocks).reshape(-1)


def project_gradients_one_sided(
    grads_by_path: Mapping[str, jax.Array],
    layout: Layout,
    corrections: Mapping[str, ParamCorrection],
    matrices: Mapping[str, jax.Array],
    precision: jax.lax.Precision = HIGHEST,
) -> jax.Array:
    """Correction + one-sided projection of one example's gradients -> float32 [D].

    Block b's vector is Σ_{params in b} vec(W / sqrt(V)) P_param, with P_param
    [m·n, d_b] from ``projection.one_sided_matrices``: TRAK's JL projection of the
    block's concatenated corrected gradient.
    """
    blocks = [jnp.zeros((layout.block_dim,), jnp.float32) for _ in range(layout.num_blocks)]
    for entry in layout.entries:
        if entry.excluded or entry.path not in grads_by_path:
            continue
        w = grads_by_path[entry.path].astype(jnp.float32).reshape(entry.matrix_shape)
        w = _correct(w, corrections[entry.path]).reshape(-1)
        blocks[entry.block] = blocks[entry.block] + jnp.matmul(
            w, matrices[entry.path], precision=precision
        )
    return jnp.concatenate(blocks)


PROJECTORS = {'two_sided': project_gradients, 'one_sided': project_gradients_one_sided}


def tree_by_path(tree: Any) -> dict[str, jax.Array]:
    """A param-shaped tree flattened to {path: leaf}."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _set_by_path(tree: Any, values: Mapping[str, jax.Array]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, leaf: values.get(path_str(p), leaf), tree)


def reference_features(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,
    loss_mask: jax.Array,
    layout: Layout,
    corrections: Mapping[str, ParamCorrection],
    projections: Mapping[str, tuple[jax.Array, jax.Array]],
    output_fn: str,
    precision: jax.lax.Precision = HIGHEST,
    projection: str = 'two_sided',
) -> jax.Array:
    """vmap(grad) per example, then project (``projection``: a key of PROJECTORS, with
    ``projections`` of that form): float32 [B, D]."""
    project = PROJECTORS[projection]

    def objective(p, toks, mask):
        logits = model.apply({'params': p}, toks[None])
        return output_objective(logits, toks[None], mask[None], output_fn)

    per_example = jax.vmap(jax.grad(objective), in_axes=(None, 0, 0))(params, tokens, loss_mask)
    return jax.vmap(
        lambda g: project(tree_by_path(g), layout, corrections, projections, precision)
    )(per_example)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tap(y: jax.Array, x_proj: jax.Array, b_mat: jax.Array, acc: jax.Array, precision) -> jax.Array:
    """Identity on y; its VJP sends (x D_r P0ᵀ)ᵀ (g D_c P1ᵀ) to ``acc``."""
    del x_proj, b_mat, acc, precision
    return y


def _tap_fwd(y, x_proj, b_mat, acc, precision):
    del acc, precision
    return y, (x_proj, b_mat)


def _tap_bwd(precision, res, g):
    x_proj, b_mat = res
    k = x_proj.shape[-1]
    g_proj = jnp.matmul(g.astype(jnp.float32), b_mat, precision=precision)
    d_acc = jnp.matmul(x_proj.reshape(-1, k).T, g_proj.reshape(-1, k), precision=precision)
    return g, None, None, d_acc  # None: symbolic zero cotangents


_tap.defvjp(_tap_fwd, _tap_bwd)


def squared_gradient_sums(x: jax.Array, g: jax.Array, precision=HIGHEST):
    """(Σ_j G_ij², Σ_i G_ij²) of one example's Dense gradient G = xᵀ g, x [T, m], g [T, n].

    With K = g gᵀ and A = x xᵀ (T x T): Σ_j G_ij² = Σ_t x_ti (K x)_ti and
    Σ_i G_ij² = Σ_t g_tj (A g)_tj, which never form the m x n matrix; that costs
    2T²(m + n) multiply-adds against T·m·n for forming G, so G is formed (one layer and
    one example at a time) where it is the cheaper of the two.
    """
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    g = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
    t, m, n = x.shape[0], x.shape[1], g.shape[1]
    mm = functools.partial(jnp.matmul, precision=precision)
    if 2 * t * (m + n) < m * n:
        k_x = mm(mm(g, g.T), x)  # (g gᵀ) x
        a_g = mm(mm(x, x.T), g)  # (x xᵀ) g
        return jnp.sum(x * k_x, axis=0), jnp.sum(g * a_g, axis=0)
    full = mm(x.T, g)
    sq = full * full
    return jnp.sum(sq, axis=1), jnp.sum(sq, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _square_tap(y: jax.Array, x: jax.Array, acc_in: jax.Array, acc_out: jax.Array, precision):
    """Identity on y; its VJP sends the squared-gradient row / column sums to the accs."""
    del x, acc_in, acc_out, precision
    return y


def _square_tap_fwd(y, x, acc_in, acc_out, precision):
    del acc_in, acc_out, precision
    return y, x


def _square_tap_bwd(precision, x, g):
    rows, cols = squared_gradient_sums(x, g, precision)
    return g, None, rows, cols


_square_tap.defvjp(_square_tap_fwd, _square_tap_bwd)


def squared_gradient_sums_batch(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,
    loss_mask: jax.Array,
    dense: frozenset[str],
    skip: frozenset[str] = frozenset(),
    precision: jax.lax.Precision = HIGHEST,
) -> dict[str, Any]:
    """Σ over the batch of each example's squared loss gradient, by parameter path.

    For the Dense kernels in ``dense`` only the (row sums [m], column sums [n]) of the
    squared gradient, from taps on their inputs and output-gradients
    (:func:`squared_gradient_sums`): no per-example gradient of theirs is formed. Every
    other parameter not in ``skip`` gets its full per-example gradient (vmap), squared
    and summed: (value shaped like the parameter,).
    """
    flat = tree_by_path(params)
    rest = {p: v for p, v in flat.items() if p not in dense and p not in skip}

    def objective(acc, small, toks, mask):
        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if not (isinstance(context.module, nn.Dense) and context.method_name == '__call__'):
                return y
            path = _module_path(context.module) + '/kernel'
            if path not in dense:
                return y
            x = jax.lax.stop_gradient(args[0])
            return _square_tap(y, x, acc[path][0], acc[path][1], precision)

        with nn.intercept_methods(interceptor):
            logits = model.apply({'params': _set_by_path(params, small)}, toks[None])
        return output_objective(logits, toks[None], mask[None], 'loss')

    b = tokens.shape[0]
    acc0 = {
        p: (
            jnp.zeros((b, flat[p].shape[0]), jnp.float32),
            jnp.zeros((b, flat[p].shape[1]), jnp.float32),
        )
        for p in sorted(dense)
    }
    d_acc, d_rest = jax.vmap(jax.grad(objective, argnums=(0, 1)), in_axes=(0, None, 0, 0))(
        acc0, rest, tokens, loss_mask
    )
    out = {p: (r.sum(0), c.sum(0)) for p, (r, c) in d_acc.items()}
    out.update(
        {p: (jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0),) for p, g in d_rest.items()}
    )
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _batched_tap(y: jax.Array, x_proj: jax.Array, b_mat: jax.Array, acc: jax.Array, precision):
    """``_tap`` for a whole batch: y [B, ..., n]; its VJP sends each example's k x k
    product to its row of ``acc`` [B, k, k]."""
    del x_proj, b_mat, acc, precision
    return y


def _batched_tap_fwd(y, x_proj, b_mat, acc, precision):
    del acc, precision
    return y, (x_proj, b_mat)


def _batched_tap_bwd(precision, res, g):
    x_proj, b_mat = res
    b, k = x_proj.shape[0], x_proj.shape[-1]
    g_proj = jnp.matmul(g.astype(jnp.float32), b_mat, precision=precision)
    d_acc = jnp.einsum(
        'btk,btl->bkl', x_proj.reshape(b, -1, k), g_proj.reshape(b, -1, k), precision=precision
    )
    return g, None, None, d_acc


_batched_tap.defvjp(_batched_tap_fwd, _batched_tap_bwd)


def _module_path(module: nn.Module) -> str:
    return '/'.join(str(p) for p in module.scope.path)


def discover_dense_kernels(model: nn.Module, params: Any, seq_len: int) -> tuple[str, ...]:
    """Paths of the kernels of every ``nn.Dense`` the model calls (abstract trace)."""
    seen: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == '__call__':
            seen.append(_module_path(context.module) + '/kernel')
        return next_fun(*args, **kwargs)

    def run(p):
        with nn.intercept_methods(interceptor):
            return model.apply({'params': p}, jnp.zeros((1, seq_len), jnp.int32))

    jax.eval_shape(run, params)
    return tuple(dict.fromkeys(seen))


def fusable_paths(
    layout: Layout, dense_kernels: tuple[str, ...], corrections: Mapping[str, ParamCorrection]
) -> frozenset[str]:
    """Dense kernels whose correction is rank-one (or none): the fused path takes these."""
    entries = layout.by_path()
    return frozenset(
        p
        for p in dense_kernels
        if p in entries
        and not entries[p].excluded
        and len(entries[p].shape) == 2
        and corrections[p].kind in ('rank_one', 'none')
    )


def _side_matrices(p0: jax.Array, p1: jax.Array, corr: ParamCorrection):
    """(D_r P0ᵀ [m, k], D_c P1ᵀ [n, k]) for one fused kernel."""
    a, b = p0.T, p1.T
    if corr.kind == 'rank_one':
        a, b = corr.row[:, None] * a, corr.col[:, None] * b
    return a, b


def _tapped_objective(model, layout, mats, output_fn, precision):
    """``objective(params, acc, small, tokens[T], mask[T])`` of one example: the model run
    with a tap on every fused Dense (its cotangent lands in ``acc[block]``) and the
    unfused parameters ``small`` substituted into ``params``."""
    entries = layout.by_path()

    def objective(params, acc, small, toks, mask):
        def interceptor(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if not (isinstance(context.module, nn.Dense) and context.method_name == '__call__'):
                return y
            path = _module_path(context.module) + '/kernel'
            if path not in mats:
                return y
            a_mat, b_mat = mats[path]
            x = jax.lax.stop_gradient(args[0]).astype(jnp.float32)
            x_proj = jnp.matmul(x, a_mat, precision=precision)
            return _tap(y, x_proj, b_mat, acc[entries[path].block], precision)

        with nn.intercept_methods(interceptor):
            logits = model.apply({'params': _set_by_path(params, small)}, toks[None])
        return output_objective(logits, toks[None], mask[None], output_fn)

    return objective


def _unfused(params: Any, layout: Layout, fused: frozenset[str]) -> dict[str, jax.Array]:
    """The included parameters the fused path does not take, keyed by path."""
    entries = layout.by_path()
    return {
        p: v
        for p, v in tree_by_path(params).items()
        if p in entries and not entries[p].excluded and p not in fused
    }


def fused_features(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,
    loss_mask: jax.Array,
    layout: Layout,
    corrections: Mapping[str, ParamCorrection],
    projections: Mapping[str, tuple[jax.Array, jax.Array]],
    output_fn: str,
    fused: frozenset[str],
    precision: jax.lax.Precision = HIGHEST,
) -> jax.Array:
    """The fused kernel: float32 [B, D] without per-example full gradients.

    ``projections`` holds (P0, P1) per path (``projection.projection_pairs``);
    ``precision`` is that of the projection matmuls (``PRECISIONS``).
    """
    mats = {p: _side_matrices(*projections[p], corrections[p]) for p in sorted(fused)}
    rest = _unfused(params, layout, fused)
    objective = _tapped_objective(model, layout, mats, output_fn, precision)
    # One accumulator leaf per block (not one stacked array indexed per tap): each tap's
    # cotangent then adds straight into its leaf instead of a scatter into a stack.
    acc0 = [jnp.zeros((tokens.shape[0], layout.side, layout.side), jnp.float32)] * layout.num_blocks
    d_acc, d_rest = jax.vmap(
        jax.grad(lambda acc, small, t, m: objective(params, acc, small, t, m), argnums=(0, 1)),
        in_axes=(0, None, 0, 0),
    )(acc0, rest, tokens, loss_mask)
    return _assemble(d_acc, d_rest, layout, corrections, projections, precision)


def discover_norm_scales(model: nn.Module, params: Any, seq_len: int) -> frozenset[str]:
    """Paths of the scales of every ``RMSNorm`` the model calls (abstract trace)."""
    seen: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, RMSNorm) and context.method_name == '__call__':
            seen.append(_module_path(context.module) + '/scale')
        return next_fun(*args, **kwargs)

    def run(p):
        with nn.intercept_methods(interceptor):
            return model.apply({'params': p}, jnp.zeros((1, seq_len), jnp.int32))

    jax.eval_shape(run, params)
    return frozenset(seen)


def batchable(
    layout: Layout, params: Any, fused: frozenset[str], norm_scales: frozenset[str]
) -> bool:
    """Whether :func:`fused_features_batched` can take these params: every included
    parameter the taps do not take is the scale of an ``RMSNorm``."""
    return set(_unfused(params, layout, fused)) <= set(norm_scales)


def fused_features_batched(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,
    loss_mask: jax.Array,
    layout: Layout,
    corrections: Mapping[str, ParamCorrection],
    projections: Mapping[str, tuple[jax.Array, jax.Array]],
    output_fn: str,
    fused: frozenset[str],
    precision: jax.lax.Precision = HIGHEST,
) -> jax.Array:
    """``fused_features`` with the model run once on the whole batch (no vmap).

    The taps keep examples apart by the batch axis of their inputs and output-gradients.
    The untapped parameters must be ``RMSNorm`` scales (:func:`batchable`): each norm
    call is replaced by the same math with one copy of its scale per example, [B, 1, d]
    against activations [B, T, d], so the scale's gradient is the per-example one.
    Exact when examples never interact (no batch statistics, no routing across the
    batch): true of this package's models; ``Featurizer(batched=...)`` chooses.
    """
    b = tokens.shape[0]
    entries = layout.by_path()
    mats = {p: _side_matrices(*projections[p], corrections[p]) for p in sorted(fused)}
    rest = _unfused(params, layout, fused)
    per_example = {p: jnp.broadcast_to(v, (b, 1, *v.shape)) for p, v in rest.items()}

    def objective(acc, small):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != '__call__':
                return next_fun(*args, **kwargs)
            if isinstance(module, RMSNorm):
                path = _module_path(module) + '/scale'
                if path in small:
                    return RMSNorm.normalize(args[0], small[path], module.eps, module.dtype)
            y = next_fun(*args, **kwargs)
            if not isinstance(module, nn.Dense):
                return y
            path = _module_path(module) + '/kernel'
            if path not in mats:
                return y
            a_mat, b_mat = mats[path]
            x = jax.lax.stop_gradient(args[0]).astype(jnp.float32)
            x_proj = jnp.matmul(x, a_mat, precision=precision)
            return _batched_tap(y, x_proj, b_mat, acc[entries[path].block], precision)

        with nn.intercept_methods(interceptor):
            logits = model.apply({'params': params}, tokens)
        return output_objective(logits, tokens, loss_mask, output_fn)

    acc0 = [jnp.zeros((b, layout.side, layout.side), jnp.float32)] * layout.num_blocks
    d_acc, d_rest = jax.grad(objective, argnums=(0, 1))(acc0, per_example)
    d_rest = {p: g.reshape(b, *rest[p].shape) for p, g in d_rest.items()}
    return _assemble(d_acc, d_rest, layout, corrections, projections, precision)


def _assemble(d_acc, d_rest, layout, corrections, projections, precision) -> jax.Array:
    """Per-example features from the tap accumulators and the unfused gradients."""
    feats = jnp.stack(d_acc, axis=1).reshape(d_acc[0].shape[0], -1)
    if d_rest:
        feats = feats + jax.vmap(
            lambda g: project_gradients(g, layout, corrections, projections, precision)
        )(d_rest)
    return feats


def fused_features_and_grads(
    model: nn.Module,
    params: Any,
    tokens: jax.Array,
    loss_mask: jax.Array,
    layout: Layout,
    corrections: Mapping[str, ParamCorrection],
    projections: Mapping[str, tuple[jax.Array, jax.Array]],
    fused: frozenset[str],
    precision: jax.lax.Precision = HIGHEST,
) -> tuple[jax.Array, Any, jax.Array]:
    """One forward/backward giving the batch's summed loss, its parameter gradient, and
    every example's loss features (``fused_features`` with output_fn 'loss').

    The model runs under vmap over examples with the Dense kernels *not* batched, so
    their gradient is the one batch contraction of a training step (never per example);
    the taps collect each example's projected gradient on the way. Unfused parameters
    (norm scales, ...) get one copy per example, so their per-example gradient is a
    by-product too and their batch gradient is its sum.

    Returns:
      (Σ_z Loss(z), ∇θ Σ_z Loss(z) shaped like params, float32 [B, D] features).
    """
    b = tokens.shape[0]
    mats = {p: _side_matrices(*projections[p], corrections[p]) for p in sorted(fused)}
    rest = _unfused(params, layout, fused)
    per_example = {p: jnp.broadcast_to(v, (b, *v.shape)) for p, v in rest.items()}
    objective = _tapped_objective(model, layout, mats, 'loss', precision)

    def total(p, acc, small):
        losses_ = jax.vmap(objective, in_axes=(None, 0, 0, 0, 0))(p, acc, small, tokens, loss_mask)
        return jnp.sum(losses_)

    acc0 = [jnp.zeros((b, layout.side, layout.side), jnp.float32)] * layout.num_blocks
    loss, (g_params, d_acc, d_rest) = jax.value_and_grad(total, argnums=(0, 1, 2))(
        params, acc0, per_example
    )
    # The substituted leaves' batch gradient is the sum of their per-example copies'.
    g_params = _set_by_path(g_params, {p: g.sum(0) for p, g in d_rest.items()})
    return loss, g_params, _assemble(d_acc, d_rest, layout, corrections, projections, precision)
