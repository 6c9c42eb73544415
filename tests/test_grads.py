"""The gradient kernel against independent references (issue 3)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import grads, losses
from trackstar_jax import sharding as shd
from trackstar_jax.grads import kernel
from trackstar_jax.grads.correction import factored_axes
from trackstar_jax.grads.layout import ParamEntry
from trackstar_jax.grads.projection import projection_pair
from trackstar_jax.models import DecoderConfig

# Two model shapes: PaLM-style parallel multi-query, and serial GQA with other widths.
# min_dim_size_to_factor=16 makes optax factor most matrices (the fused rank-one path);
# the (64 x 8) key/value kernels of the first stay unfactored (elementwise fallback).
SHAPES = {
    'parallel_mqa': DecoderConfig(
        vocab_size=64, num_layers=3, d_model=32, num_heads=4, num_kv_heads=1, mlp_dim=48, max_len=16
    ),
    'serial_gqa': DecoderConfig(
        vocab_size=50,
        num_layers=2,
        d_model=24,
        num_heads=6,
        num_kv_heads=2,
        mlp_dim=40,
        max_len=16,
        parallel_block=False,
    ),
}
MIN_DIM = 16


def trained(cfg, steps=3, seed=0):
    """Params and an Adafactor state after a few real steps (non-trivial V)."""
    return fx.trained(cfg, steps=steps, seed=seed, min_dim=MIN_DIM)


def batch(cfg, pattern, seed=1):
    rng = np.random.default_rng(seed)
    b, t = 5, 12
    tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    if pattern == 'full':
        mask[:, 1:] = 1
    elif pattern == 'prompt_completion':  # queries: only the completion is a target
        for i, (p, e) in enumerate([(3, 12), (8, 10), (1, 4), (6, 7), (10, 12)]):
            mask[i, p:e] = 1
    elif pattern == 'padding_and_single_targets':
        mask[0, 1:] = 1
        mask[1, 1:5] = 1  # padded after position 4
        mask[2, 11] = 1  # length-1 target at the end
        mask[3, 1] = 1  # length-1 target at the start
        # row 4: no target at all (an all-padding row) -> zero vector
    return {'tokens': tokens, 'loss_mask': mask}


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize(
    'shape,output_fn',
    [
        ('parallel_mqa', 'loss'),
        ('serial_gqa', 'loss'),
        ('parallel_mqa', 'margin'),
        ('serial_gqa', 'logit'),
        ('parallel_mqa', 'trak'),
    ],
)
@pytest.mark.parametrize('batched', [True, False], ids=['batched', 'vmap'])
def test_fused_equals_reference(shape, output_fn, batched):
    cfg = SHAPES[shape]
    # Batched: every matrix factored (Adafactor's min dim 2), so every parameter the taps
    # do not take is a vector (norm scales): what the batched kernel handles per example.
    model, params, state = fx.trained(cfg, steps=3, min_dim=2 if batched else MIN_DIM)
    spec = grads.GradientSpec(
        block_dim=16, num_layer_blocks=2, output_fn=output_fn, correction='adafactor'
    )
    feat = grads.Featurizer(model, params, spec, opt_state=state, batched=batched)
    # This package's models take the batched kernel by default whenever it applies.
    assert grads.Featurizer(model, params, spec, opt_state=state).batched == batched
    # Both code paths are exercised: fused rank-one kernels and unfused params.
    assert len(feat.fused_paths) >= 10
    assert any(e.path not in feat.fused_paths for e in feat.layout.entries if not e.excluded)
    for pattern in ['full', 'prompt_completion', 'padding_and_single_targets']:
        b = batch(cfg, pattern)
        fused, ref = feat(b), feat.reference(b)
        assert fused.shape == (5, feat.dim) == (5, 2 * 2 * 16)
        assert rel_err(fused, ref) < 1e-4, (pattern, rel_err(fused, ref))
        if pattern == 'padding_and_single_targets':
            np.testing.assert_array_equal(np.asarray(fused[4]), 0.0)


def test_margin_equals_loss_gradient():
    # Loss = -log sigmoid(f) for the margin f, so Q_t ∇f_t summed per token is ∇Loss.
    model, params, state = trained(SHAPES['parallel_mqa'])
    b = batch(SHAPES['parallel_mqa'], 'prompt_completion')
    out = {}
    for fn in ('loss', 'margin'):
        spec = grads.GradientSpec(block_dim=16, num_layer_blocks=3, output_fn=fn)
        out[fn] = grads.Featurizer(model, params, spec, opt_state=state)(b)
    assert rel_err(out['margin'], out['loss']) < 1e-4


def test_reference_is_projection_of_dense_per_example_gradient():
    # Independent of both kernels: one example's full gradient by jax.grad, projected.
    cfg = SHAPES['serial_gqa']
    model, params, state = trained(cfg)
    spec = grads.GradientSpec(block_dim=9, num_layer_blocks=1, correction='adafactor')
    feat = grads.Featurizer(model, params, spec, opt_state=state)
    b = batch(cfg, 'prompt_completion')
    for i in (0, 2):
        toks, mask = b['tokens'][i : i + 1], b['loss_mask'][i : i + 1]
        g = jax.grad(
            lambda p, t=toks, m=mask: losses.example_losses(model.apply({'params': p}, t), t, m)[0]
        )(params)
        assert rel_err(feat(b)[i], feat.project(g)) < 1e-4


def test_project_is_linear():
    model, params, state = trained(SHAPES['parallel_mqa'])
    feat = grads.Featurizer(
        model, params, grads.GradientSpec(block_dim=16, num_layer_blocks=1), opt_state=state
    )
    rng = np.random.default_rng(3)
    g1 = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    g2 = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    combo = jax.tree.map(lambda a, b: 2.5 * a - 0.75 * b, g1, g2)
    expected = 2.5 * feat.project(g1) - 0.75 * feat.project(g2)
    assert rel_err(feat.project(combo), expected) < 1e-5
    # The embedding is excluded: changing its gradient changes nothing.
    g3 = {**g1, 'embedding': jax.tree.map(lambda x: x * 100.0, g1['embedding'])}
    np.testing.assert_array_equal(np.asarray(feat.project(g3)), np.asarray(feat.project(g1)))


def test_projection_preserves_inner_products_in_expectation():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(20, 12))
    b = a + rng.normal(size=(20, 12))
    side = 4
    entry = ParamEntry('w', (20, 12), 0, (20, 12), 123)

    @jax.jit
    def dots(seeds):
        def one(s):
            key = jax.random.fold_in(jax.random.PRNGKey(0), s)
            k0, k1 = jax.random.split(key)
            p0 = jax.random.normal(k0, (side, 20)) * side**-0.5
            p1 = jax.random.normal(k1, (side, 12)) * side**-0.5
            return jnp.sum((p0 @ a @ p1.T) * (p0 @ b @ p1.T))

        return jax.vmap(one)(seeds)

    # The library's own generator, over many seeds.
    lib = np.array(
        [
            float(
                jnp.sum(
                    (lambda p: (p[0] @ a @ p[1].T) * (p[0] @ b @ p[1].T))(
                        projection_pair(s, entry, side)
                    )
                )
            )
            for s in range(400)
        ]
    )
    vals = np.concatenate([np.asarray(dots(jnp.arange(20000))), lib])
    exact = float(np.sum(a * b))
    stderr = vals.std() / np.sqrt(len(vals))
    assert abs(vals.mean() - exact) < 4 * stderr, (vals.mean(), exact, stderr)
    lib_stderr = lib.std() / np.sqrt(len(lib))
    assert abs(lib.mean() - exact) < 4 * lib_stderr
    # Entries have variance 1/side = 1/sqrt(block_dim).
    p0, p1 = projection_pair(0, ParamEntry('x', (300, 300), 0, (300, 300), 7), 16)
    assert abs(float(jnp.var(p0)) * 16 - 1) < 0.05 and abs(float(jnp.var(p1)) * 16 - 1) < 0.05


@pytest.mark.parametrize('shape', [(24, 40), (40, 24), (32, 32), (40,)])
def test_adafactor_correction_matches_float64_numpy(shape):
    # A one-parameter model: W's optax state after a few steps, then compare the
    # corrected projection with numpy's V = v_row v_colᵀ / mean(v_row) placed on the axes
    # optax reduces over (or the full v for vectors), in float64.
    rng = np.random.default_rng(5)
    params = {'layers_0': {'mlp': {'w': jnp.asarray(rng.normal(size=shape), jnp.float32)}}}
    tx = optax.adafactor(1e-2, min_dim_size_to_factor=8)
    state = tx.init(params)
    for _ in range(3):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) ** 3, jnp.float32), params)
        _, state = tx.update(g, state, params)
    fs = state[0]
    v_row = np.asarray(fs.v_row['layers_0']['mlp']['w'], np.float64)
    v_col = np.asarray(fs.v_col['layers_0']['mlp']['w'], np.float64)
    v = np.asarray(fs.v['layers_0']['mlp']['w'], np.float64)
    if len(shape) == 2:
        m, n = shape
        # optax: v_row = mean of g² over the *largest* axis (ties: the last); v_col over
        # the other one.
        row_on_axis0 = n >= m
        if row_on_axis0:
            assert v_row.shape == (m,) and v_col.shape == (n,)
            V = np.outer(v_row, v_col) / v_row.mean()
        else:
            assert v_row.shape == (n,) and v_col.shape == (m,)
            V = np.outer(v_col, v_row) / v_row.mean()
    else:
        V = v
    grad = rng.normal(size=shape)
    corrected = grad / np.sqrt(V)

    class Dummy(nn.Module):
        def __call__(self, x):
            return x

    spec = grads.GradientSpec(block_dim=16, num_layer_blocks=1, correction='adafactor')
    feat = grads.Featurizer(Dummy(), params, spec, opt_state=state)
    none = grads.Featurizer(
        Dummy(), params, grads.GradientSpec(block_dim=16, num_layer_blocks=1, correction='none')
    )
    as_tree = lambda x: {'layers_0': {'mlp': {'w': jnp.asarray(x, jnp.float32)}}}  # noqa: E731
    got = feat.project(as_tree(grad))
    want = none.project(as_tree(corrected))
    assert rel_err(got, want) < 1e-5
    if len(shape) == 2:
        c = feat.corrections['layers_0/mlp/w']
        assert c.kind == 'rank_one'
        np.testing.assert_allclose(np.outer(c.row, c.col), 1 / np.sqrt(V), rtol=1e-5)


def test_adam_correction_is_elementwise_nu():
    model, params, _ = trained(SHAPES['serial_gqa'])
    tx = optax.adam(1e-3)
    state = tx.init(params)
    g = jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, params)
    _, state = tx.update(g, state, params)
    feat = grads.Featurizer(
        model,
        params,
        grads.GradientSpec(block_dim=9, num_layer_blocks=1, correction='adam'),
        opt_state=state,
    )
    none = grads.Featurizer(
        model, params, grads.GradientSpec(block_dim=9, num_layer_blocks=1, correction='none')
    )
    nu = state[0].nu
    scaled = jax.tree.map(lambda x, v: x / np.sqrt(np.asarray(v, np.float64)), g, nu)
    assert rel_err(feat.project(g), none.project(scaled)) < 1e-5
    b = batch(SHAPES['serial_gqa'], 'full')
    assert rel_err(feat(b), feat.reference(b)) < 1e-4


def test_identical_across_meshes_and_batch_sizes():
    cfg = SHAPES['parallel_mqa']
    model, params, state = trained(cfg)
    spec = grads.GradientSpec(block_dim=16, num_layer_blocks=3)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, cfg.vocab_size, (8, 12)).astype(np.int32)
    mask = np.ones((8, 12), np.float32)
    mask[:, :3] = 0
    b = {'tokens': tokens, 'loss_mask': mask}
    single = grads.Featurizer(model, params, spec, opt_state=state)
    base = np.asarray(single(b))
    for axes in [
        (('data', 1), ('model', 1)),
        (('data', 8), ('model', 1)),
        (('data', 4), ('model', 2)),
        (('data', 2), ('model', 4)),
    ]:
        devices = jax.devices()[: int(np.prod([s for _, s in axes]))]
        mesh = shd.make_mesh(axes, devices=devices)
        # Params sharded by the model's logical axes on this mesh.
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        shardings = shd.tree_shardings(mesh, boxed)['params']
        feat = grads.Featurizer(
            model, jax.device_put(params, shardings), spec, opt_state=state, mesh=mesh
        )
        out = feat(b)
        assert out.sharding.spec == jax.sharding.PartitionSpec('data', None)
        np.testing.assert_allclose(np.asarray(out), base, rtol=2e-5, atol=1e-6 * np.abs(base).max())
    one_by_one = np.concatenate(
        [np.asarray(single({k: v[i : i + 1] for k, v in b.items()})) for i in range(8)]
    )
    np.testing.assert_allclose(one_by_one, base, rtol=2e-5, atol=1e-6 * np.abs(base).max())
    # A batch that does not divide the data axis is padded internally and trimmed.
    mesh = shd.make_mesh((('data', 8), ('model', 1)))
    feat = grads.Featurizer(model, params, spec, opt_state=state, mesh=mesh)
    np.testing.assert_allclose(
        np.asarray(feat({k: v[:5] for k, v in b.items()})),
        base[:5],
        rtol=2e-5,
        atol=1e-6 * np.abs(base).max(),
    )


def test_layout_blocks_and_errors():
    model, params, state = trained(SHAPES['parallel_mqa'])
    feat = grads.Featurizer(
        model, params, grads.GradientSpec(block_dim=16, num_layer_blocks=2), opt_state=state
    )
    blocks = {
        e.path: feat.layout.block_names[e.block] for e in feat.layout.entries if not e.excluded
    }
    # 3 layers into 2 groups: layers 0,1 -> group 0; layer 2 -> group 1.
    assert blocks['layers_0/attention/query/kernel'] == 'attention_0'
    assert blocks['layers_1/attention_norm/scale'] == 'attention_0'
    assert blocks['layers_1/mlp/wo/kernel'] == 'mlp_0'
    assert blocks['layers_2/mlp_norm/scale'] == 'mlp_1'
    assert blocks['final_norm/scale'] == 'mlp_1'
    assert [e.path for e in feat.layout.entries if e.excluded] == ['embedding/embedding']
    with pytest.raises(ValueError, match='perfect square'):
        grads.Featurizer(model, params, grads.GradientSpec(block_dim=10), opt_state=state)
    with pytest.raises(ValueError, match='num_layer_blocks'):
        grads.Featurizer(
            model, params, grads.GradientSpec(block_dim=16, num_layer_blocks=4), opt_state=state
        )
    with pytest.raises(ValueError, match='needs opt_state'):
        grads.Featurizer(model, params, grads.GradientSpec(block_dim=16, num_layer_blocks=1))
    with pytest.raises(ValueError, match='first'):
        feat({'tokens': np.zeros((1, 4), np.int32), 'loss_mask': np.ones((1, 4), np.float32)})


@pytest.mark.parametrize('t,m,n', [(5, 40, 24), (30, 6, 7)], ids=['gram', 'direct'])
def test_squared_gradient_sums_equal_float64_numpy(t, m, n):
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((t, m)), rng.standard_normal((t, n))
    full = (x.T @ g) ** 2  # the per-example gradient the taps never form
    rows, cols = kernel.squared_gradient_sums(
        jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(rows), full.sum(1), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(cols), full.sum(0), rtol=2e-5)


@pytest.mark.parametrize('method', ['taps', 'per_example'])
def test_estimate_second_moments_equals_brute_force(method):
    cfg = SHAPES['serial_gqa']
    model, params, _ = trained(cfg)
    b = batch(cfg, 'prompt_completion')
    est = grads.estimate_second_moments(
        model,
        params,
        [b, batch(cfg, 'full', seed=9)],
        factored=True,
        min_dim_size_to_factor=MIN_DIM,
        chunk_size=3,
        method=method,
    )
    # Brute force: one jax.grad per example, squared, averaged in float64.
    sq = None
    n = 0
    for bb in [b, batch(cfg, 'full', seed=9)]:
        for i in range(len(bb['tokens'])):
            toks, mask = bb['tokens'][i : i + 1], bb['loss_mask'][i : i + 1]
            g = jax.grad(
                lambda p, t=toks, m=mask: losses.example_losses(
                    model.apply({'params': p}, t), t, m
                )[0]
            )(params)
            g2 = jax.tree.map(lambda x: np.asarray(x, np.float64) ** 2, g)
            sq = g2 if sq is None else jax.tree.map(np.add, sq, g2)
            n += 1
    mean = jax.tree.map(lambda x: x / n, sq)
    wo = mean['layers_0']['mlp']['wo']['kernel']  # (40, 24): factored, largest axis 0
    np.testing.assert_allclose(est.v_row['layers_0']['mlp']['wo']['kernel'], wo.mean(0), rtol=1e-4)
    np.testing.assert_allclose(est.v_col['layers_0']['mlp']['wo']['kernel'], wo.mean(1), rtol=1e-4)
    np.testing.assert_allclose(est.v['final_norm']['scale'], mean['final_norm']['scale'], rtol=1e-4)
    assert int(est.count) == 10
    # Every parameter, factored or not, against the brute force.
    by_path = kernel.tree_by_path
    for path, v in by_path(mean).items():
        if by_path(est.v)[path].size == v.size:
            np.testing.assert_allclose(by_path(est.v)[path], v, rtol=1e-4, err_msg=path)
        else:
            d1, d0 = factored_axes(v.shape)
            np.testing.assert_allclose(
                by_path(est.v_row)[path], v.mean(d0), rtol=1e-4, err_msg=path
            )
            np.testing.assert_allclose(
                by_path(est.v_col)[path], v.mean(d1), rtol=1e-4, err_msg=path
            )
    # It is accepted as an Adafactor state by the Featurizer.
    feat = grads.Featurizer(
        model, params, grads.GradientSpec(block_dim=9, num_layer_blocks=1), opt_state=est
    )
    assert rel_err(feat(b), feat.reference(b)) < 1e-4


def test_params_and_elementwise_corrections_are_sharded_by_the_rules():
    """Replicated inputs are placed as the logical axes say (device to device), Adam's
    elementwise V is sharded like its parameter, and the vectors do not change."""
    model, params, _ = trained(SHAPES['serial_gqa'])
    tx = optax.adam(1e-3)
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(lambda x: jnp.ones_like(x) * 0.3, params), state, params)
    spec = grads.GradientSpec(block_dim=9, num_layer_blocks=1, correction='adam')
    b = batch(SHAPES['serial_gqa'], 'full')
    base = np.asarray(grads.Featurizer(model, params, spec, opt_state=state)(b))
    mesh = shd.make_mesh((('data', 4), ('model', 2)))
    with jax.transfer_guard_device_to_host('disallow'):  # no host round trip
        feat = grads.Featurizer(model, params, spec, opt_state=state, mesh=mesh)
    expected = grads.featurizer.model_param_shardings(model, params, mesh)
    for x, s in zip(jax.tree.leaves(feat.params), jax.tree.leaves(expected), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    wide = [p for p, c in feat.corrections.items() if c.full is not None and c.full.ndim == 2]
    assert wide and any(not feat.corrections[p].full.sharding.is_fully_replicated for p in wide)
    np.testing.assert_allclose(np.asarray(feat(b)), base, rtol=2e-5, atol=1e-6 * np.abs(base).max())


def test_unsharded_params_on_a_model_axis_are_refused():
    """A model without logical annotations would hold every param on every chip."""

    class PlainLM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(64, 32, name='embedding')(tokens)
            for i in range(2):
                x = x + nn.Dense(32, name=f'layers_{i}/mlp')(nn.Dense(128)(x))
            return nn.Dense(64, name='head')(x)

    model = PlainLM()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    spec = grads.GradientSpec(block_dim=16, num_layer_blocks=1, correction='none')
    grads.Featurizer(model, params, spec, mesh=shd.make_mesh((('data', 8), ('model', 1))))
    with pytest.raises(ValueError, match='not sharded along the model axis'):
        grads.Featurizer(model, params, spec, mesh=shd.make_mesh((('data', 4), ('model', 2))))


def test_micro_steps_choice():
    from trackstar_jax.grads.featurizer import micro_steps

    # SmolLM2-sized logits: 3 copies of 128 x 49,152 float32 are 72 MiB per row, so
    # 256 MiB holds 3 rows: 8 slices of 2 rows.
    assert micro_steps(16, 128, 49152, 1, 256 * 2**20) == 8
    # Slices stay multiples of the data axis: 2 slices of 8 (the most it can split).
    assert micro_steps(16, 128, 49152, 8, 256 * 2**20) == 2
    assert micro_steps(32, 128, 4096, 1, 256 * 2**20) == 1
    assert micro_steps(5, 12, None, 1, 1) == 1


@pytest.mark.parametrize('axes', [None, (('data', 8), ('model', 1))], ids=['one', 'data8'])
def test_sliced_batches_equal_whole_batches(axes):
    """A batch run in sequential slices (a tiny logits budget) gives the same rows."""
    mesh = None if axes is None else shd.make_mesh(axes)
    model, params, state = fx.trained(fx.CFG, steps=2, min_dim=2)
    spec = grads.GradientSpec(block_dim=16, num_layer_blocks=2)
    whole = grads.Featurizer(model, params, spec, opt_state=state, mesh=mesh)
    sliced = grads.Featurizer(model, params, spec, opt_state=state, mesh=mesh,
                              max_logits_bytes=1)  # fmt: skip
    rng = np.random.default_rng(3)
    b = {'tokens': rng.integers(0, 64, (16, 12)).astype(np.int32),
         'loss_mask': np.ones((16, 12), np.float32)}  # fmt: skip
    b['loss_mask'][:, 0] = 0
    b['loss_mask'][5, 7:] = 0
    a, c = np.asarray(whole(b)), np.asarray(sliced(b))
    np.testing.assert_allclose(c, a, rtol=2e-5, atol=1e-6 * np.abs(a).max())
    np.testing.assert_allclose(c, np.asarray(whole.reference(b)), rtol=1e-4,
                               atol=1e-5 * np.abs(a).max())  # fmt: skip
    lowered = sliced._fused.lower(sliced.params, sliced.constants, b['tokens'], b['loss_mask'])
    assert 'while' in lowered.as_text()  # the slices ran as a loop
