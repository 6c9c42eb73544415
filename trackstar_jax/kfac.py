"""K-FAC and EK-FAC influence over a model's dense layers (Grosse et al. 2023).

For a dense layer y = a W (W [d_in, d_out], applied at every position), the gradient of an
example's summed loss is G = Σ_t a_t s_tᵀ with a_t the layer's input and s_t = ∂Loss/∂y_t.
K-FAC approximates the layer's block of the gradient second moment by a Kronecker product

    A = mean_t a_t a_tᵀ,   S = mean_t s_t s_tᵀ,
    F ≈ A ⊗ S = (U_A ⊗ U_S) diag(Λ_A ⊗ Λ_S) (U_A ⊗ U_S)ᵀ

over the positions t that reach a target (one pass), and EK-FAC keeps the eigenbasis but
replaces the eigenvalues by the exact second moment of the gradients in it (a second pass)

    Λ*_{io} = mean_z ((U_Aᵀ G_z U_S)_{io})².

Influence of a training example m on a query q is Σ_layers ⟨(F + λI)⁻¹ G_q, G_m⟩, with
(F + λI)⁻¹ G = U_A [(U_Aᵀ G U_S) / (Λ + λ)] U_Sᵀ applied to the query gradients only: the
training gradients are used as they are. Damping is relative and per layer:
λ = ``damping`` · mean(Λ) (the layer's mean eigenvalue), so a global scale of F (how the
means are normalised) does not change any ranking.

Stated choices: the Fisher is the *empirical* one by default (s from the training
labels); ``fisher='sampled'`` takes s from labels drawn from the model's own predictive
distribution at every position (the true Fisher, as Grosse et al. use; one draw per
position, seeded per batch, the same draw in both passes). Only ``nn.Dense`` kernels
are covered (embeddings, norms and biases are left out, and a module with a bias is an
error); statistics are float32 sums on the devices, eigendecompositions float64 on the
host. This is the full parameter space of those layers, for models whose per-layer
factors fit in memory (d_in² + d_out² + d_in·d_out floats per layer); the projected-space
variant on the fused kernel's index is not built yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from trackstar_jax import sharding as shd
from trackstar_jax.data import examples as examples_lib

LayerArrays = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class KfacConfig:
    """How to run the two passes.

    Attributes:
      seq_len: rows are padded to this length.
      batch_size: examples per step (a multiple of the mesh's data size).
      damping: relative damping: λ = damping · the layer's mean eigenvalue.
      eigenvalue_correction: True for EK-FAC (a second pass), False for K-FAC.
      fisher: 'empirical' (training labels) or 'sampled' (labels drawn from the model).
      seed: the sampled labels' seed (batch i draws with fold_in(PRNGKey(seed), i)).
    """

    seq_len: int
    batch_size: int = 16
    damping: float = 0.1
    eigenvalue_correction: bool = True
    fisher: str = 'empirical'
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(f'seq_len must be >= 2 and batch_size >= 1, got {self}.')
        if not self.damping > 0:
            raise ValueError(f'damping must be > 0 (relative), got {self.damping}.')
        if self.fisher not in ('empirical', 'sampled'):
            raise ValueError(f"fisher must be 'empirical' or 'sampled', got {self.fisher!r}.")

    @property
    def name(self) -> str:
        """'ekfac' or 'kfac'."""
        return 'ekfac' if self.eigenvalue_correction else 'kfac'


def _layer_name(module: nn.Module) -> str:
    return '/'.join(module.scope.path)


def layer_statistics(
    model: nn.Module, params: Any, batch: Mapping[str, jax.Array]
) -> tuple[LayerArrays, LayerArrays]:
    """({layer: a [B, T, d_in]}, {layer: s [B, T, d_out]}) of every ``nn.Dense`` call.

    s is the gradient of each example's *summed* loss (as ``losses.example_losses``) with
    respect to the layer's output at each position, found by adding a zero to every
    output and differentiating with respect to it (the model file is not touched). The
    loss's labels are ``batch['targets']`` if given ([B, T], position t's label at t,
    like ``tokens``; see :func:`sample_targets`), else the tokens themselves.

    Raises:
      ValueError: if a dense layer has a bias or is called more than once.
    """
    tokens, mask = batch['tokens'], batch['loss_mask']
    targets = batch.get('targets', tokens)

    def forward(perturb):
        acts: dict[str, jax.Array] = {}

        def intercept(next_fun, args, kwargs, context):
            if not (isinstance(context.module, nn.Dense) and context.method_name == '__call__'):
                return next_fun(*args, **kwargs)
            if context.module.use_bias:
                raise ValueError(
                    f'K-FAC covers kernels only; {_layer_name(context.module)} has a bias.'
                )
            name = _layer_name(context.module)
            if name in acts:
                raise ValueError(f'Dense layer {name} is called more than once per forward.')
            acts[name] = args[0]
            out = next_fun(*args, **kwargs)
            return out if perturb is None else out + perturb[name].astype(out.dtype)

        with nn.intercept_methods(intercept):
            logits = model.apply({'params': params}, tokens)
        return jnp.sum(_example_losses(logits, targets, mask)), acts

    shapes: dict[str, Any] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Dense) and context.method_name == '__call__':
            shapes[_layer_name(context.module)] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.apply({'params': params}, tokens))
    zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    s, acts = jax.grad(forward, has_aux=True)(zeros)
    return acts, s


def sample_targets(
    model: nn.Module, params: Any, batch: Mapping[str, jax.Array], key: jax.Array
) -> jax.Array:
    """[B, T] labels drawn from the model: position t's from softmax(logits[t − 1]).

    Position 0 keeps its token (nothing predicts it); the draw is not differentiated.
    """
    tokens = batch['tokens']
    logits = jax.lax.stop_gradient(model.apply({'params': params}, tokens))
    drawn = jax.random.categorical(key, logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.concatenate([tokens[:, :1], drawn.astype(tokens.dtype)], axis=1)


def _with_fisher_labels(model, params, batch, key, config: KfacConfig):
    if config.fisher == 'empirical':
        return batch
    return {**batch, 'targets': sample_targets(model, params, batch, key)}


def batch_key(config: KfacConfig, number: int) -> jax.Array:
    """The sampled-label key of batch ``number`` (the same in both passes)."""
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), number)


def _example_losses(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    # losses.example_losses in the logits' dtype (it casts to float32), so that float64
    # references stay float64 under jax.enable_x64.
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked * mask[:, 1:].astype(logits.dtype), axis=-1)


def reach_mask(loss_mask: jax.Array) -> jax.Array:
    """[B, T] 1.0 where position t reaches a target (some loss_mask[t'] > 0, t' > t)."""
    m = (loss_mask > 0).astype(jnp.float32)
    return (jnp.sum(m, axis=-1, keepdims=True) - jnp.cumsum(m, axis=-1) > 0).astype(jnp.float32)


def kernel_grads(acts: LayerArrays, outs: LayerArrays) -> LayerArrays:
    """{layer: G [B, d_in, d_out]} = Σ_t a_t s_tᵀ per example."""
    return {k: jnp.einsum('bti,bto->bio', acts[k], outs[k]) for k in acts}


@dataclasses.dataclass(frozen=True)
class LayerFactors:
    """One layer's eigenbases and eigenvalues (float64 host arrays).

    Attributes:
      a_vectors, a_values: eigh of A [d_in, d_in].
      s_vectors, s_values: eigh of S [d_out, d_out].
      corrected: EK-FAC eigenvalues Λ* [d_in, d_out], or None for K-FAC.
    """

    a_vectors: np.ndarray
    a_values: np.ndarray
    s_vectors: np.ndarray
    s_values: np.ndarray
    corrected: np.ndarray | None = None

    def eigenvalues(self) -> np.ndarray:
        """Λ [d_in, d_out]: the corrected ones if present, else Λ_A Λ_Sᵀ."""
        if self.corrected is not None:
            return self.corrected
        return np.outer(np.maximum(self.a_values, 0), np.maximum(self.s_values, 0))


@dataclasses.dataclass(frozen=True)
class Kfac:
    """A fitted K-FAC / EK-FAC preconditioner.

    Attributes:
      layers: {layer name: LayerFactors}.
      config: the config it was fitted with.
      num_tokens: positions behind A and S.
      num_examples: examples behind the corrected eigenvalues (0 for K-FAC).
    """

    layers: dict[str, LayerFactors]
    config: KfacConfig
    num_tokens: int
    num_examples: int

    def damping(self, layer: str) -> float:
        """λ of one layer: config.damping · its mean eigenvalue."""
        lam = self.config.damping * float(self.layers[layer].eigenvalues().mean())
        if not lam > 0:
            raise ValueError(
                f'Layer {layer} has no curvature (mean eigenvalue 0): no gradient reached it.'
            )
        return lam

    def precondition(self, grads: Mapping[str, np.ndarray | jax.Array]) -> dict[str, np.ndarray]:
        """(F + λI)⁻¹ G per layer for G [..., d_in, d_out] (float64)."""
        out = {}
        for name, g in grads.items():
            f = self.layers[name]
            g = np.asarray(g, np.float64)
            rotated = np.swapaxes(f.a_vectors, 0, 1) @ g @ f.s_vectors
            rotated = rotated / (f.eigenvalues() + self.damping(name))
            out[name] = f.a_vectors @ rotated @ np.swapaxes(f.s_vectors, 0, 1)
        return out


def _batches(
    examples: Sequence[Mapping[str, Any]], config: KfacConfig
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    for start in range(0, len(examples), config.batch_size):
        group = examples[start : start + config.batch_size]
        yield len(group), examples_lib.pad_batch(group, config.batch_size, config.seq_len)


def _place(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    sharding = NamedSharding(mesh, P(shd.DATA))
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def _device_float(x: np.ndarray) -> jax.Array:
    # float64 under jax.enable_x64 (the tests' references), float32 otherwise.
    return jnp.asarray(x, jnp.result_type(float))


def _check(examples: Sequence[Mapping[str, Any]], config: KfacConfig, mesh: Mesh) -> None:
    if not examples:
        raise ValueError('No examples.')
    data = mesh.shape.get(shd.DATA, 1)
    if config.batch_size % data:
        raise ValueError(
            f'batch_size {config.batch_size} is not a multiple of the data axis ({data}).'
        )


def fit(
    model: nn.Module,
    params: Any,
    examples: Sequence[Mapping[str, Any]],
    config: KfacConfig,
    *,
    mesh: Mesh | None = None,
) -> Kfac:
    """K-FAC (one pass) or EK-FAC (two passes) over ``examples``, sharded over ``mesh``.

    Args:
      model: a Flax LM, ``model.apply({'params': p}, tokens)`` -> logits.
      params: its (unboxed) parameters.
      examples: {'id', 'tokens', 'loss_mask'} records, like the index's inputs.
      config: see :class:`KfacConfig`.
      mesh: batches are split along its data axis (default: all devices).

    Raises:
      ValueError: on no examples, a batch size the mesh cannot split, or a model
        without dense layers.
    """
    mesh = shd.make_mesh() if mesh is None else mesh
    _check(examples, config, mesh)

    # Parameters are arguments, not closed over: a closure would embed every weight in
    # the compiled program as a constant.
    @jax.jit
    def moments(params, batch, key):
        acts, outs = layer_statistics(
            model, params, _with_fisher_labels(model, params, batch, key, config)
        )
        w = reach_mask(batch['loss_mask'])
        cov = lambda x: jnp.einsum('bt,bti,btj->ij', w, x, x)  # noqa: E731
        return {k: (cov(acts[k]), cov(outs[k])) for k in acts}, jnp.sum(w)

    sums: dict[str, list[np.ndarray]] = {}
    tokens = 0.0
    for number, (_, batch) in enumerate(_batches(examples, config)):
        got, n = moments(params, _place(batch, mesh), batch_key(config, number))
        for k, (a, s) in got.items():
            if k not in sums:
                sums[k] = [np.zeros(a.shape), np.zeros(s.shape)]
            sums[k][0] += np.asarray(a, np.float64)
            sums[k][1] += np.asarray(s, np.float64)
        tokens += float(n)
    if not sums:
        raise ValueError('The model has no nn.Dense layers: nothing for K-FAC to cover.')
    if tokens == 0:
        raise ValueError('No example has a target token (every loss_mask is 0).')
    layers = {}
    for k, (a, s) in sums.items():
        a_values, a_vectors = np.linalg.eigh(a / tokens)
        s_values, s_vectors = np.linalg.eigh(s / tokens)
        layers[k] = LayerFactors(a_vectors, a_values, s_vectors, s_values)
    logging.info('K-FAC factors of %d layers from %d positions.', len(layers), int(tokens))
    if not config.eigenvalue_correction:
        return Kfac(layers, config, int(tokens), 0)

    bases = {k: (_device_float(f.a_vectors), _device_float(f.s_vectors)) for k, f in layers.items()}

    @jax.jit
    def corrected(params, batch, real, key):
        batch = _with_fisher_labels(model, params, batch, key, config)
        g = kernel_grads(*layer_statistics(model, params, batch))
        return {k: jnp.einsum('b,bio->io', real, jnp.square(
            jnp.einsum('ij,bio,ok->bjk', bases[k][0], g[k], bases[k][1])))
            for k in g}  # fmt: skip

    totals = {k: np.zeros((f.a_values.size, f.s_values.size)) for k, f in layers.items()}
    count = 0
    for number, (n_real, batch) in enumerate(_batches(examples, config)):
        real = (np.arange(config.batch_size) < n_real) & (batch['loss_mask'].sum(1) > 0)
        key = batch_key(config, number)
        got = corrected(params, _place(batch, mesh), _device_float(real), key)
        for k, v in got.items():
            totals[k] += np.asarray(v, np.float64)
        count += int(real.sum())
    layers = {k: dataclasses.replace(f, corrected=totals[k] / count) for k, f in layers.items()}
    return Kfac(layers, config, int(tokens), count)


def example_kernel_grads(
    model: nn.Module,
    params: Any,
    examples: Sequence[Mapping[str, Any]],
    config: KfacConfig,
    *,
    mesh: Mesh | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Per-example kernel gradients {layer: [n, d_in, d_out]}, one batch at a time."""
    mesh = shd.make_mesh() if mesh is None else mesh
    _check(examples, config, mesh)
    step = jax.jit(lambda p, b: kernel_grads(*layer_statistics(model, p, b)))
    for n_real, batch in _batches(examples, config):
        yield {k: np.asarray(v[:n_real]) for k, v in step(params, _place(batch, mesh)).items()}


def influence(
    kfac: Kfac,
    model: nn.Module,
    params: Any,
    queries: Sequence[Mapping[str, Any]],
    train: Sequence[Mapping[str, Any]],
    *,
    query_config: KfacConfig | None = None,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Scores [n_query, n_train] = Σ_layers ⟨(F + λI)⁻¹ G_q, G_m⟩ (higher: m helps q).

    Query gradients are preconditioned once; training gradients stream by batch and are
    never stored. ``query_config`` sets the queries' seq_len / batch_size (default: the
    fit's config).
    """
    qcfg = kfac.config if query_config is None else query_config
    pre: dict[str, list[np.ndarray]] = {}
    for g in example_kernel_grads(model, params, queries, qcfg, mesh=mesh):
        for k, v in kfac.precondition({k: g[k] for k in kfac.layers}).items():
            pre.setdefault(k, []).append(v)
    q = {k: _device_float(np.concatenate(v)) for k, v in pre.items()}
    dot = jax.jit(lambda q, g: sum(jnp.einsum('qio,mio->qm', q[k], g[k]) for k in q))
    cols = [
        np.asarray(dot(q, {k: g[k] for k in q}), np.float64)
        for g in example_kernel_grads(model, params, train, kfac.config, mesh=mesh)
    ]
    return np.concatenate(cols, axis=1)
