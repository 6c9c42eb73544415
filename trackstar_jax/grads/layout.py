"""Which parameter goes into which layer block, and the size D of a feature vector.

Parameters other than the excluded ones (the token embedding) are pooled into
``num_layer_blocks`` groups of consecutive layers, split into attention and MLP when
``split_attention_mlp`` (paper §A.2.2: 2 x 8 blocks of 4096 = 2^16 dims). A block's
vector is P0 W P1ᵀ summed over its matrices, each with its own (seed, block, path)
projection — the sum of independent projections of the concatenated gradient.

Rules, from the parameter's path (``'layers_3/attention/query/kernel'``):

* layer index: the first path key matching ``layer_pattern`` (``layers_3``, ``h_3``,
  ``block_3``, or a key ``3`` following ``layers``); group = index * G // L.
* attention if any key matches ``attention_pattern`` (``attention``, ``attn``,
  ``self_attention``, ...); every other in-layer parameter (MLP, its norm, ...) is
  MLP-side.
* parameters outside any layer (the final norm) go to the MLP block of the last layer
  group: they act after the last MLP and the paper's D = 2 x 8 x 4096 has no extra block.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any

import jax
import numpy as np

LAYER_PATTERN = r'^(?:layers?|blocks?|h|decoder_layer|transformer_layer)_(\d+)$'
ATTENTION_PATTERN = r'(attention|attn|self_attn|q_proj|k_proj|v_proj|o_proj)'


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """How one parameter is featurised.

    Attributes:
      path: '/'-joined parameter path, e.g. 'layers_0/mlp/wo/kernel'.
      shape: the parameter's shape.
      block: index of its block, or -1 if excluded.
      matrix_shape: (m, n) the gradient is viewed as (vectors are 1 x n).
      path_id: stable 31-bit hash of ``path`` that seeds its projection.
    """

    path: str
    shape: tuple[int, ...]
    block: int
    matrix_shape: tuple[int, int]
    path_id: int

    @property
    def excluded(self) -> bool:
        """Whether this parameter contributes nothing."""
        return self.block < 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """The block layout of a parameter tree under a GradientSpec."""

    entries: tuple[ParamEntry, ...]
    block_names: tuple[str, ...]
    block_dim: int

    @property
    def num_blocks(self) -> int:
        """Number of blocks."""
        return len(self.block_names)

    @property
    def dim(self) -> int:
        """D, the length of a feature vector."""
        return self.num_blocks * self.block_dim

    @property
    def side(self) -> int:
        """sqrt(block_dim): a block is a side x side matrix."""
        return int(round(self.block_dim**0.5))

    def by_path(self) -> dict[str, ParamEntry]:
        """Entries keyed by path."""
        return {e.path: e for e in self.entries}

    def describe(self) -> str:
        """A human-readable table of blocks and their parameters."""
        lines = [f'D = {self.num_blocks} blocks x {self.block_dim} = {self.dim}']
        for b, name in enumerate(self.block_names):
            members = [e for e in self.entries if e.block == b]
            n = sum(int(np.prod(e.shape)) for e in members)
            lines.append(f'  block {b:3d} {name:24s} {len(members):4d} params {n:>12,d} values')
        ex = [e.path for e in self.entries if e.excluded]
        lines.append(f'  excluded: {", ".join(ex) or "-"}')
        return '\n'.join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in index manifests)."""
        return {
            'block_dim': self.block_dim,
            'block_names': list(self.block_names),
            'params': {e.path: e.block for e in self.entries},
        }


def path_str(path: tuple[Any, ...]) -> str:
    """'/'-joined names of a jax tree path."""
    parts = []
    for k in path:
        for attr in ('key', 'name', 'idx'):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return '/'.join(parts)


def stable_id(text: str) -> int:
    """A 31-bit hash that is the same on every host, run and Python version."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (m, n) a gradient is viewed as: vectors are 1 x n, N-d are (prod(lead), last)."""
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return (int(np.prod(shape[:-1])), shape[-1])


def _layer_index(keys: list[str], pattern: re.Pattern) -> int | None:
    for i, k in enumerate(keys):
        m = pattern.match(k)
        if m:
            return int(m.group(1))
        if k in ('layers', 'layer', 'blocks', 'h') and i + 1 < len(keys) and keys[i + 1].isdigit():
            return int(keys[i + 1])
    return None


def build_layout(
    params: Any,
    *,
    block_dim: int,
    num_layer_blocks: int,
    split_attention_mlp: bool,
    exclude: tuple[str, ...],
    layer_pattern: str = LAYER_PATTERN,
    attention_pattern: str = ATTENTION_PATTERN,
    square: bool = True,
) -> Layout:
    """Assigns every parameter of ``params`` to a block.

    Args:
      params: the param tree (arrays or shape structs).
      block_dim: dims per block; a perfect square when ``square`` (the two-sided
        projection's blocks are side x side matrices).
      num_layer_blocks: G, groups of consecutive layers.
      split_attention_mlp: separate attention and MLP blocks per group.
      exclude: a parameter whose path contains any of these substrings is excluded.
      layer_pattern: regex whose group 1 is the layer index of a path key.
      attention_pattern: regex finding attention parameters.
      square: require a square block_dim.

    Raises:
      ValueError: if block_dim is not a square, no layers are found, or there are fewer
        layers than layer blocks.
    """
    if block_dim < 1:
        raise ValueError(f'block_dim={block_dim} must be positive.')
    side = int(round(block_dim**0.5))
    if square and side * side != block_dim:
        raise ValueError(f'block_dim={block_dim} must be a perfect square (side x side).')
    layer_re, attn_re = re.compile(layer_pattern), re.compile(attention_pattern)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    info = []
    for p, leaf in leaves:
        keys = path_str(p).split('/')
        info.append((keys, tuple(leaf.shape), _layer_index(keys, layer_re)))
    layers = sorted({li for _, _, li in info if li is not None})
    if not layers:
        raise ValueError(
            'No layer index found in any parameter path; set layer_pattern. '
            f'Paths: {[("/".join(k)) for k, _, _ in info][:8]}'
        )
    num_layers = layers[-1] + 1
    if num_layer_blocks > num_layers:
        raise ValueError(f'num_layer_blocks={num_layer_blocks} > {num_layers} layers.')
    kinds = ('attention', 'mlp') if split_attention_mlp else ('layers',)
    names = tuple(f'{kind}_{g}' for g in range(num_layer_blocks) for kind in kinds)
    entries = []
    for keys, shape, li in info:
        path = '/'.join(keys)
        if any(x in path for x in exclude):
            block = -1
        else:
            group = (li if li is not None else num_layers - 1) * num_layer_blocks // num_layers
            attention = li is not None and any(attn_re.search(k) for k in keys)
            kind = 0 if (attention or not split_attention_mlp) else 1
            block = group * len(kinds) + kind
        entries.append(ParamEntry(path, shape, block, matrix_shape(shape), stable_id(path)))
    return Layout(tuple(entries), names, block_dim)
