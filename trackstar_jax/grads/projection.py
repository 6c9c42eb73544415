"""Gaussian random projections, pure functions of (seed, block, path).

For a gradient viewed as W (m x n) in a block of side k = sqrt(d_b):

    P0 W P1ᵀ,   P0 ∈ R^{k x m},  P1 ∈ R^{k x n},  entries ~ N(0, 1/k) = N(0, 1/sqrt(d_b))

so that E<P0 A P1ᵀ, P0 B P1ᵀ> = <A, B> (paper §A.2.2). The matrices are generated on
device from ``fold_in`` keys, never written to disk; a ``Featurizer`` draws all of them
once and keeps them on device (drawing them inside the kernel dominated its compile
time). With threefry-partitionable keys they are the same on every host, mesh shape
and run.

``GradientSpec(projection='one_sided')`` instead projects each block's concatenated
gradient with one dense N(0, 1/d_b) matrix (:func:`one_sided_matrix`), TRAK's
Johnson-Lindenstrauss projection: d_b x (values in the block) numbers on device, so it is
for small models; the two-sided form needs only d_b^1/2 x (m + n) per matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from trackstar_jax.grads.layout import ParamEntry


def projection_key(seed: int, entry: ParamEntry) -> jax.Array:
    """The key of one parameter's projection pair."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), entry.block)
    return jax.random.fold_in(key, entry.path_id)


def projection_pair(seed: int, entry: ParamEntry, side: int) -> tuple[jax.Array, jax.Array]:
    """(P0 [side, m], P1 [side, n]) for ``entry``; float32, entries N(0, 1/side)."""
    m, n = entry.matrix_shape
    k0, k1 = jax.random.split(projection_key(seed, entry))
    scale = side**-0.5
    return (
        jax.random.normal(k0, (side, m), jnp.float32) * scale,
        jax.random.normal(k1, (side, n), jnp.float32) * scale,
    )


def projection_pairs(
    seed: int, entries: Sequence[ParamEntry], side: int
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """:func:`projection_pair` for many entries at once, same values.

    Keys are derived and matrices drawn with one vmapped call per distinct width
    instead of one call per parameter: on deep models the unrolled per-parameter
    generators dominated XLA compile time (threefry per call).
    """
    if not entries:
        return {}
    base = jax.random.PRNGKey(seed)
    blocks = jnp.asarray([e.block for e in entries], jnp.uint32)
    ids = jnp.asarray([e.path_id for e in entries], jnp.uint32)
    keys = jax.vmap(
        lambda b, i: jax.random.split(jax.random.fold_in(jax.random.fold_in(base, b), i))
    )(blocks, ids)  # [E, 2, key]
    wanted: dict[int, list[tuple[int, int]]] = {}
    for i, e in enumerate(entries):
        m, n = e.matrix_shape
        wanted.setdefault(m, []).append((i, 0))
        wanted.setdefault(n, []).append((i, 1))
    drawn: dict[tuple[int, int], jax.Array] = {}
    scale = side**-0.5
    for dim, items in wanted.items():
        ks = jnp.stack([keys[i, which] for i, which in items])
        mats = jax.vmap(lambda k, d=dim: jax.random.normal(k, (side, d), jnp.float32))(ks)
        for j, item in enumerate(items):
            drawn[item] = mats[j] * scale
    return {e.path: (drawn[(i, 0)], drawn[(i, 1)]) for i, e in enumerate(entries)}


def one_sided_matrix(seed: int, entry: ParamEntry, block_dim: int) -> jax.Array:
    """P [m·n, block_dim] for ``entry`` (one-sided, TRAK's JL projection); float32,
    entries N(0, 1/block_dim), so that E<vec(A) P, vec(B) P> = <A, B>.

    A block's vector is the sum over its parameters of vec(W) P: the one-sided
    projection of the block's concatenated gradient. Its key is the two-sided pair's
    (:func:`projection_key`) folded once more, so the two never share values.
    """
    m, n = entry.matrix_shape
    key = jax.random.fold_in(projection_key(seed, entry), 1)
    return jax.random.normal(key, (m * n, block_dim), jnp.float32) * block_dim**-0.5


def one_sided_matrices(
    seed: int, entries: Sequence[ParamEntry], block_dim: int
) -> dict[str, jax.Array]:
    """:func:`one_sided_matrix` of every entry, by path."""
    return {e.path: one_sided_matrix(seed, e, block_dim) for e in entries}


def one_sided_bytes(entries: Sequence[ParamEntry], block_dim: int) -> int:
    """Device memory the one-sided matrices of ``entries`` take (float32)."""
    return 4 * block_dim * sum(e.matrix_shape[0] * e.matrix_shape[1] for e in entries)
