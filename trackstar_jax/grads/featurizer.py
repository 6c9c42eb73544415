"""The public gradient-featurisation API: GradientSpec and Featurizer.

spec = grads.GradientSpec(block_dim=4096, num_layer_blocks=8, split_attention_mlp=True,
                          seed=0, correction='adafactor', output_fn='loss',
                          exclude=('embedding',))
feat = grads.Featurizer(model, params, spec, opt_state=opt_state, mesh=None)
feat(batch)             -> float32 [B, D]   fused kernel
feat.reference(batch)   -> float32 [B, D]   vmap(grad) per example, then project
feat.project(grad_tree) -> float32 [D]      correction + projection of one gradient
feat.layout             -> which parameters went into which block, and D
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trackstar_jax import losses
from trackstar_jax import sharding as shd
from trackstar_jax.grads import correction as correction_lib
from trackstar_jax.grads import kernel, projection
from trackstar_jax.grads.layout import ATTENTION_PATTERN, LAYER_PATTERN, Layout, build_layout
from trackstar_jax.models.decoder import DecoderLM
from trackstar_jax.models.llama import LlamaLM

# Logits, log-softmax and its gradient of one kernel step stay under this (float32).
MAX_LOGITS_BYTES = 256 * 2**20
PROJECTIONS = ('two_sided', 'one_sided')
# One-sided matrices above this (float32, replicated on every device) are refused.
MAX_ONE_SIDED_BYTES = 4 * 2**30

# Models whose examples never interact: the batched kernel is exact for them (tested
# against the vmap kernel and the reference).
BATCHED_MODELS = (DecoderLM, LlamaLM)


@dataclasses.dataclass(frozen=True)
class GradientSpec:
    """What a feature vector is. Everything here changes the vectors (index manifests
    record it, and query and train indices must agree on it).

    Attributes:
      block_dim: dims per layer block d_b, a perfect square (paper: 4096 = 64 x 64).
      num_layer_blocks: groups of consecutive layers (paper: 8).
      split_attention_mlp: separate attention and MLP blocks per group (paper: True).
      seed: projection seed.
      correction: 'adafactor' | 'adam' | 'none' (paper: the optimizer's, Adafactor).
      output_fn: 'loss' | 'margin' | 'logit' | 'trak' (paper: 'loss').
      exclude: parameters whose path contains any of these are left out (paper: the
        token embedding).
      layer_pattern: regex giving a path key's layer index (see ``layout.py``).
      attention_pattern: regex marking attention parameters.
      precision: of the kernel's projection matmuls: 'default' (float32 on CPU; bf16
        inputs with float32 accumulation on TPU/GPU, the fast path), 'high' or
        'highest' (full float32 passes on accelerators, 3-6x slower on TPU).
      projection: 'two_sided' (paper: P0 W P1ᵀ per matrix, the fused kernel) or
        'one_sided' (TRAK's dense JL projection of each block's concatenated gradient,
        any block_dim; per-example gradients are materialised and the d_b x values
        matrices live on device, so it is for small models).
    """

    block_dim: int = 4096
    num_layer_blocks: int = 8
    split_attention_mlp: bool = True
    seed: int = 0
    correction: str = 'adafactor'
    output_fn: str = 'loss'
    exclude: tuple[str, ...] = ('embedding',)
    layer_pattern: str = LAYER_PATTERN
    attention_pattern: str = ATTENTION_PATTERN
    precision: str = 'default'
    projection: str = 'two_sided'

    def __post_init__(self):
        if self.projection not in PROJECTIONS:
            raise ValueError(f'projection must be one of {PROJECTIONS}, got {self.projection!r}.')
        if self.precision not in kernel.PRECISIONS:
            raise ValueError(f'precision must be one of {sorted(kernel.PRECISIONS)}.')
        if self.correction not in correction_lib.CORRECTIONS:
            raise ValueError(f'correction must be one of {correction_lib.CORRECTIONS}.')
        if self.output_fn not in kernel.OUTPUT_FNS:
            raise ValueError(f'output_fn must be one of {kernel.OUTPUT_FNS}.')
        object.__setattr__(self, 'exclude', tuple(self.exclude))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form. The default projection is left out, so manifests of
        two-sided indices written before the field existed still match."""
        d = dataclasses.asdict(self)
        if d['projection'] == 'two_sided':
            del d['projection']
        return d

    def layout(self, params: Any) -> Layout:
        """The block layout of ``params`` (arrays or shape structs) under this spec."""
        return build_layout(
            params,
            block_dim=self.block_dim,
            num_layer_blocks=self.num_layer_blocks,
            split_attention_mlp=self.split_attention_mlp,
            exclude=self.exclude,
            layer_pattern=self.layer_pattern,
            attention_pattern=self.attention_pattern,
            square=self.projection == 'two_sided',
        )


class Featurizer:
    """Computes φ(z) = P · (∇θ f(z) / sqrt(V)), block by block, for batches of examples.

    The caller's params are not modified. With a mesh, examples are split along its
    ``data`` axis and params keep their sharding if they are already arrays on this
    mesh (otherwise they are replicated onto it); the output is sharded along ``data``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Any,
        spec: GradientSpec,
        *,
        opt_state: Any | None = None,
        mesh: Mesh | None = None,
        max_len: int | None = None,
        batched: bool | None = None,
        max_logits_bytes: int = MAX_LOGITS_BYTES,
        max_one_sided_bytes: int = MAX_ONE_SIDED_BYTES,
    ):
        """Builds the layout, the corrections and the compiled kernels.

        Args:
          model: any Flax linen LM, ``model.apply({'params': p}, tokens[B, T])`` ->
            logits [B, T, V].
          params: its parameters (boxed ``nn.Partitioned`` leaves are unboxed, and so
            are those of ``opt_state``).
          spec: the gradient spec.
          opt_state: optax state of ``params`` (Adafactor or Adam), or the output of
            ``estimate_second_moments``; needed unless spec.correction == 'none'.
          mesh: the mesh to shard over (None: default device, no sharding).
          max_len: sequence length used to trace the model when discovering its Dense
            layers (default: ``model.config.max_len`` or 8).
          batched: run the fused kernel on the whole batch at once
            (``kernel.fused_features_batched``, faster) instead of under vmap per
            example. None: batched for this package's models (``BATCHED_MODELS``) when
            every untapped parameter is an RMSNorm scale; pass True for another model
            built from ``nn.Dense`` and this package's ``RMSNorm`` only if its examples
            never interact.
          max_logits_bytes: a batch whose [B, T, V] logits (three float32 copies: the
            logits, their log-softmax and its gradient) would exceed this runs in
            sequential slices (``micro_steps``): exact, with one slice's memory.
          max_one_sided_bytes: with ``spec.projection == 'one_sided'``, refuse when the
            dense projection matrices would exceed this (they sit on every device).
        """
        self.model = model
        self.spec = spec
        self.mesh = mesh
        params = nn.unbox(params)
        self.layout: Layout = spec.layout(params)
        self.corrections = correction_lib.param_corrections(self.layout, spec.correction, opt_state)
        trace_len = max_len or getattr(getattr(model, 'config', None), 'max_len', 8)
        dense = kernel.discover_dense_kernels(model, params, min(trace_len, 8))
        self.fused_paths = kernel.fusable_paths(self.layout, dense, self.corrections)
        unfused = [
            e.path for e in self.layout.entries if not e.excluded and e.path not in self.fused_paths
        ]
        unfused_size = sum(int(np.prod(e.shape)) for e in self.layout.entries if e.path in unfused)
        logging.info(
            'Featurizer: %s\n  fused Dense kernels: %d; per-example (unfused) '
            'params: %d (%d values per example)',
            self.layout.describe(),
            len(self.fused_paths),
            len(unfused),
            unfused_size,
        )
        scales = kernel.discover_norm_scales(model, params, min(trace_len, 8))
        can_batch = kernel.batchable(self.layout, params, self.fused_paths, scales)
        if batched is None:
            batched = isinstance(model, BATCHED_MODELS) and can_batch
        elif batched and not can_batch:
            raise ValueError(
                'batched=True needs every parameter the taps do not take to be an RMSNorm '
                'scale (here a Dense kernel has an elementwise correction, or another '
                'parameter is present); use batched=False.'
            )
        self.batched = batched
        self.params = self._place_params(params, min(trace_len, 8))
        refuse_non_finite(self.params, 'parameters')
        refuse_non_finite(
            self.corrections,
            'optimizer corrections 1/sqrt(V)',
            'A fresh (step-0) optimizer state has all-zero second moments, so V is '
            'undefined: pass the state of a trained checkpoint, estimate V '
            "(launch/estimate_second_moments.py), or use correction='none'.",
        )
        if mesh is not None:
            # Row/column factors are small: replicated. Elementwise factors are as large
            # as their parameter: sharded like it.
            shardings = correction_shardings(
                self.corrections, kernel.tree_by_path(self.params), mesh
            )
            self.corrections = jax.tree.map(_put, self.corrections, shardings)
        # P is a pure function of (seed, block, path), drawn on device once per
        # Featurizer (one compiled generator; inside every kernel it dominated compile
        # time) and kept in device memory, never written anywhere.
        entries = [e for e in self.layout.entries if not e.excluded]
        rep = None if mesh is None else shd.replicated(mesh)
        if spec.projection == 'one_sided':
            self._init_one_sided(entries, rep, max_one_sided_bytes)
            return
        projections = jax.jit(
            lambda: projection.projection_pairs(spec.seed, entries, self.layout.side),
            out_shardings=rep,
        )()
        self.constants = (self.corrections, projections)
        precision = kernel.PRECISIONS[spec.precision]
        self._fused = fused_program(
            model,
            self.layout,
            spec.output_fn,
            self.fused_paths,
            mesh,
            *self._shardings(),
            spec.precision,
            batched,
            _vocab_size(model, self.params, min(trace_len, 8)),
            max_logits_bytes,
        )
        self._reference = self._jit(
            lambda p, c, t, m: kernel.reference_features(
                model, p, t, m, self.layout, c[0], c[1], spec.output_fn, precision
            )
        )
        self._project = jax.jit(
            lambda g, c: kernel.project_gradients(g, self.layout, c[0], c[1], precision)
        )

    def _init_one_sided(self, entries, replicated, max_bytes: int) -> None:
        """The one-sided (TRAK) path: vmap(grad) per example, then one dense matrix per
        parameter; the fused kernel (two-sided only) is not used."""
        need = projection.one_sided_bytes(entries, self.spec.block_dim)
        if need > max_bytes:
            raise ValueError(
                f'The one-sided projection of this model needs {need / 2**30:.2f} GiB of '
                f'matrices on every device (d_b = {self.spec.block_dim} x '
                f'{need // (4 * self.spec.block_dim):,} gradient values), over the '
                f'{max_bytes / 2**30:.2f} GiB limit: use projection="two_sided" (the '
                "paper's, d_b^1/2 x (m + n) per matrix), a smaller block_dim, or raise "
                'max_one_sided_bytes.'
            )
        matrices = jax.jit(
            lambda: projection.one_sided_matrices(self.spec.seed, entries, self.spec.block_dim),
            out_shardings=replicated,
        )()
        self.constants = (self.corrections, matrices)
        precision = kernel.PRECISIONS[self.spec.precision]
        output_fn = self.spec.output_fn
        self._reference = self._jit(
            lambda p, c, t, m: kernel.reference_features(
                self.model, p, t, m, self.layout, c[0], c[1], output_fn, precision, 'one_sided'
            )
        )
        self._fused = self._reference
        self._project = jax.jit(
            lambda g, c: kernel.project_gradients_one_sided(g, self.layout, c[0], c[1], precision)
        )

    @property
    def dim(self) -> int:
        """D, the feature length."""
        return self.layout.dim

    def _place_params(self, params: Any, seq_len: int) -> Any:
        """Params sharded as the model's logical axes say on this mesh (checked)."""
        if self.mesh is None:
            return params
        expected = model_param_shardings(self.model, params, self.mesh, seq_len)
        placed = jax.tree.map(lambda x, s: _put(x, s), params, expected)
        check_sufficiently_sharded(placed, self.mesh)
        return placed

    def _jit(self, fn):
        return _jit_sharded(fn, self.mesh, *self._shardings())

    def _shardings(self) -> tuple[Any, Any]:
        """(params, constants) shardings, as the kernels take them (None without a mesh)."""
        if self.mesh is None:
            return None, None
        sharding = lambda x: x.sharding  # noqa: E731
        return jax.tree.map(sharding, self.params), jax.tree.map(sharding, self.constants)

    def _run(self, fn, batch: Mapping[str, Any]) -> jax.Array:
        host = {k: np.asarray(batch[k]) for k in ('tokens', 'loss_mask')}
        losses.validate_batch(host)
        n = host['tokens'].shape[0]
        # Pad the batch to a multiple of the data axis with empty (mask 0) rows.
        multiple = self.mesh.shape[shd.DATA] if self.mesh is not None else 1
        pad = -n % multiple
        if pad:
            host = {
                k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
                for k, v in host.items()
            }
        out = fn(
            self.params,
            self.constants,
            host['tokens'].astype(np.int32),
            host['loss_mask'].astype(np.float32),
        )
        return out[:n] if pad else out

    def local(self, batch: Mapping[str, Any]) -> np.ndarray:
        """This process's rows in, this process's feature rows out (as numpy).

        In a multi-process run every process calls this with its own rows of a global
        batch (its ``DataLayout`` slice, the same count on every process) and gets the
        features of exactly those rows. In a single process it is ``np.asarray(self(b))``.
        """
        if jax.process_count() == 1 or self.mesh is None:
            return np.asarray(self(batch))
        host = {k: np.asarray(batch[k]) for k in ('tokens', 'loss_mask')}
        losses.validate_batch(host)
        rows = NamedSharding(self.mesh, PartitionSpec(shd.DATA))
        arrays = [
            jax.make_array_from_process_local_data(rows, host[k].astype(dt))
            for k, dt in (('tokens', np.int32), ('loss_mask', np.float32))
        ]
        out = self._fused(self.params, self.constants, *arrays)
        shards = {}
        for s in out.addressable_shards:
            shards.setdefault(s.index[0].start or 0, np.asarray(s.data))
        return np.concatenate([shards[k] for k in sorted(shards)])

    def __call__(self, batch: Mapping[str, Any]) -> jax.Array:
        """Fused kernel (the reference path for a one-sided spec): float32 [B, D] for a
        batch {'tokens', 'loss_mask'}."""
        return self._run(self._fused, batch)

    def reference(self, batch: Mapping[str, Any]) -> jax.Array:
        """Reference path (vmap(grad), then project): float32 [B, D]."""
        return self._run(self._reference, batch)

    def project(self, grad_tree: Any) -> jax.Array:
        """Correction + projection of one gradient pytree (shaped like params): [D]."""
        return self._project(kernel.tree_by_path(nn.unbox(grad_tree)), self.constants)


def _jit_sharded(fn, mesh: Mesh | None, param_shardings: Any, constant_shardings: Any):
    """jit of fn(params, constants, tokens, mask) with its shardings stated at the boundary:
    params and constants as given, examples (and the output rows) along ``data``."""
    if mesh is None:
        return jax.jit(fn)
    rows = NamedSharding(mesh, PartitionSpec(shd.DATA))
    return jax.jit(
        fn,
        in_shardings=(param_shardings, constant_shardings, rows, rows),
        out_shardings=NamedSharding(mesh, PartitionSpec(shd.DATA, None)),
    )


def fused_program(
    model: nn.Module,
    layout: Layout,
    output_fn: str,
    fused_paths: frozenset[str],
    mesh: Mesh | None,
    param_shardings: Any,
    constant_shardings: Any,
    precision: str = 'default',
    batched: bool = False,
    vocab_size: int | None = None,
    max_logits_bytes: int = MAX_LOGITS_BYTES,
):
    """The jit-compiled fused kernel ``(params, (corrections, projections), tokens, mask)
    -> [B, D]``, sharded over ``mesh``: what a Featurizer runs, and what
    :mod:`trackstar_jax.compile` lowers from abstract inputs for a target topology.
    ``batched``: :func:`kernel.fused_features_batched` instead of the vmap kernel.
    With ``vocab_size``, a batch whose logits (with their log-softmax and gradient)
    would exceed ``max_logits_bytes`` runs as a sequence of smaller slices of it
    (:func:`micro_steps`): the same rows, one slice's temporaries in memory at a time."""
    fn = kernel.fused_features_batched if batched else kernel.fused_features
    data = 1 if mesh is None else mesh.shape[shd.DATA]

    def run(p, c, tokens, mask):
        def one(tm):
            return fn(
                model, p, tm[0], tm[1], layout, c[0], c[1], output_fn, fused_paths,
                kernel.PRECISIONS[precision],
            )  # fmt: skip

        b, t = tokens.shape
        n = micro_steps(b, t, vocab_size, data, max_logits_bytes)
        if n == 1:
            return one((tokens, mask))
        # Slice j holds rows j, n + j, 2n + j, ...: every device keeps its own rows (the
        # leading axis stays the sharded one), so slicing moves no data between devices.
        split = lambda x: x.reshape(b // n, n, t).swapaxes(0, 1)  # noqa: E731
        out = jax.lax.map(one, (split(tokens), split(mask)))  # [n, B / n, D]
        return out.swapaxes(0, 1).reshape(b, -1)

    return _jit_sharded(run, mesh, param_shardings, constant_shardings)


def micro_steps(
    batch: int, seq_len: int, vocab_size: int | None, data: int, max_logits_bytes: int
) -> int:
    """Sequential slices a batch runs in: the fewest whose rows' [T, V] float32 logits
    (three copies) fit ``max_logits_bytes``, each slice still a multiple of ``data``."""
    if not vocab_size:
        return 1
    fit = max(1, max_logits_bytes // (3 * 4 * seq_len * vocab_size))
    valid = [n for n in range(1, batch + 1) if batch % n == 0 and (batch // n) % data == 0]
    return next((n for n in valid if batch // n <= fit), valid[-1] if valid else 1)


def _vocab_size(model: nn.Module, params: Any, seq_len: int) -> int | None:
    """V, the last dim of the model's output (abstract trace)."""
    try:
        out = jax.eval_shape(
            lambda p: model.apply({'params': p}, jnp.zeros((1, seq_len), jnp.int32)), params
        )
        return int(out.shape[-1])
    except Exception:  # noqa: BLE001 - then batches are never sliced
        return None


def _put(x: Any, sharding: NamedSharding) -> Any:
    """``x`` with ``sharding``: kept if it has it, moved device to device if it is a local
    array, built from the host value otherwise (a multi-process global placement)."""
    s = getattr(x, 'sharding', None)
    if s is not None and s.is_equivalent_to(sharding, np.ndim(x)):
        return x
    if isinstance(x, jax.Array) and (sharding.is_fully_addressable or not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    return jax.device_put(np.asarray(x), sharding)


def model_param_shardings(model: nn.Module, params: Any, mesh: Mesh, seq_len: int = 8) -> Any:
    """Each param's sharding from the model's logical axis annotations (replicated where
    it has none); params whose tree differs from ``model.init``'s are replicated."""
    rep = shd.replicated(mesh)
    try:
        boxed = jax.eval_shape(
            model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
        )
        expected = shd.tree_shardings(mesh, boxed)['params']
        if jax.tree.structure(expected) == jax.tree.structure(params):
            return expected
    except Exception as e:  # noqa: BLE001 - a model whose init needs other inputs
        logging.warning("Featurizer: cannot read the model's param shardings (%s).", e)
    return jax.tree.map(lambda _: rep, params)


def correction_shardings(corrections: Any, params_by_path: Mapping[str, Any], mesh: Mesh) -> Any:
    """Shardings of the corrections: rank-one factors replicated, full ones like params."""
    rep = shd.replicated(mesh)

    def one(path, corr):
        full = None
        if corr.full is not None:
            param = params_by_path.get(path)
            s = getattr(param, 'sharding', None)
            full = s if s is not None and tuple(param.shape) == tuple(corr.full.shape) else rep
        return correction_lib.ParamCorrection(
            corr.kind,
            row=None if corr.row is None else rep,
            col=None if corr.col is None else rep,
            full=full,
        )

    return {path: one(path, c) for path, c in corrections.items()}


def check_sufficiently_sharded(params: Any, mesh: Mesh, tolerance: float = 0.5) -> None:
    """Raises unless each device holds at most (1 + tolerance) / model-axis of the params.

    With a ``model`` axis of size M the params are meant to be split M ways; a model
    whose logical annotations leave its big matrices replicated would silently hold
    all of them on every chip (as maxtext's ``assert_params_sufficiently_sharded``).
    """
    m = mesh.shape.get(shd.MODEL, 1)
    if m == 1:
        return
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(x.size * x.dtype.itemsize for _, x in leaves)
    per_device = sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for _, x in leaves
    )
    if per_device > (1 + tolerance) * total / m:
        replicated = sorted(
            (
                (x.size * x.dtype.itemsize, jax.tree_util.keystr(p))
                for p, x in leaves
                if x.sharding.is_fully_replicated
            ),
            reverse=True,
        )[:5]
        raise ValueError(
            f'Params are not sharded along the model axis ({m}): each device holds '
            f'{per_device / 2**20:.1f} MiB of {total / 2**20:.1f} MiB (target '
            f'{total / m / 2**20:.1f} MiB). Largest replicated: '
            f'{[name for _, name in replicated]}. Annotate the model with logical axes '
            '(nn.with_logical_partitioning, see sharding.LOGICAL_AXIS_RULES) or use a mesh '
            "with ('model', 1)."
        )


@jax.jit
def _all_finite(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def refuse_non_finite(tree: Any, what: str, hint: str = '') -> None:
    """Raises ValueError naming the leaves of ``tree`` that hold NaN or Inf.

    The check runs where the arrays live; only one boolean per leaf reaches the host.
    """
    flags = jax.device_get(_all_finite(tree))
    bad = [
        jax.tree_util.keystr(path)
        for path, ok in jax.tree_util.tree_leaves_with_path(flags)
        if not bool(ok)
    ]
    if bad:
        raise ValueError(
            f'Non-finite {what} in {len(bad)} arrays (first {bad[:5]}): features from them '
            f'would be NaN. {hint}'.strip()
        )
