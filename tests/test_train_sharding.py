"""A sharded training step equals the single-device step; checkpoints reshard."""

import jax
import numpy as np
import pytest

from trackstar_jax import checkpoint, train
from trackstar_jax import sharding as shd
from trackstar_jax.models import DecoderConfig, DecoderLM

CFG = DecoderConfig(
    vocab_size=128, num_layers=2, d_model=64, num_heads=4, mlp_dim=128, max_len=16, num_kv_heads=2
)
TC = train.TrainConfig(
    seq_len=16, batch_size=8, min_dim_size_to_factor=32, warmup_steps=2, learning_rate=0.01
)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (8, 16)).astype(np.int32)
    mask = np.ones((8, 16), np.float32)
    mask[:, 0] = 0
    mask[3, 9:] = 0  # padding
    return {'tokens': tokens, 'loss_mask': mask}


def _run_steps(mesh, n=2):
    model = DecoderLM(CFG)
    state, shardings = train.create_train_state(model, TC, mesh)
    step = train.make_train_step(model, train.make_optimizer(TC), mesh, shardings)
    losses = []
    for i in range(n):
        state, metrics = step(state, train.global_batch(mesh, _batch(i)))
        losses.append(float(metrics['loss']))
    return jax.device_get(state), losses


def _grads(mesh):
    model = DecoderLM(CFG)
    params = train.init_params(model, 16, mesh, seed=0)
    fn = train.make_loss_and_grads(model, mesh, train.param_shardings(model, 16, mesh))
    return jax.device_get(fn(params, train.global_batch(mesh, _batch())))


@pytest.mark.parametrize(
    'axes', [(('data', 8), ('model', 1)), (('data', 4), ('model', 2)), (('data', 2), ('model', 4))]
)
def test_sharded_grads_and_step_equal_single_device(axes):
    single = shd.make_mesh((('data', 1), ('model', 1)), devices=jax.devices()[:1])
    mesh = shd.make_mesh(axes)
    loss_1, grads_1 = _grads(single)
    loss_n, grads_n = _grads(mesh)
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_n, grads_1
    )
    state_1, losses_1 = _run_steps(single)
    state_n, losses_n = _run_steps(mesh)
    np.testing.assert_allclose(losses_n, losses_1, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        state_n.params,
        state_1.params,
    )


def test_params_are_sharded_as_declared():
    mesh = shd.make_mesh((('data', 2), ('model', 4)))
    params = train.init_params(DecoderLM(CFG), 16, mesh, seed=0)
    q = params['layers_0']['mlp']['wi_gate']['kernel']
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, 'model')
    assert len({str(s.index) for s in q.addressable_shards}) == 4


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    mesh_a = shd.make_mesh((('data', 4), ('model', 2)))
    state, _ = _run_steps(mesh_a, n=1)
    model = DecoderLM(CFG)
    fresh, shardings_a = train.create_train_state(model, TC, mesh_a)
    state_a = jax.device_put(state, shardings_a)
    mngr = checkpoint.manager(str(tmp_path / 'ckpt'))
    config = {'model': CFG.to_dict(), 'train': TC.to_dict()}
    checkpoint.save(mngr, 1, state_a, config)

    mesh_b = shd.make_mesh((('data', 2), ('model', 4)))
    _, shardings_b = train.create_train_state(model, TC, mesh_b)
    restored, restored_config, step = checkpoint.restore(
        str(tmp_path / 'ckpt'), checkpoint.abstract_like(state_a, shardings_b)
    )
    assert step == 1 and restored_config == config
    assert DecoderConfig.from_dict(restored_config['model']) == CFG
    kernel = restored.params['layers_0']['mlp']['wo']['kernel']
    assert kernel.sharding.spec == jax.sharding.PartitionSpec('model', None)
    assert kernel.sharding.mesh.shape == {'data': 2, 'model': 4}
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        jax.device_get(restored),
        jax.device_get(state_a),
    )
    # The optimizer state keeps its factored structure through the round trip.
    v_row = restored.opt_state[0].v_row['layers_0']['mlp']['wo']['kernel']
    assert v_row.shape == (64,)
    assert checkpoint.fingerprint(restored.params) == checkpoint.fingerprint(state_a.params)
    del fresh


def test_fingerprint_is_sharding_invariant_content_sensitive_and_stays_on_device():
    from tests import pipeline_fixtures as fx

    _, params, _ = fx.model_and_state()
    one = checkpoint.fingerprint(params)
    mesh = shd.make_mesh(((shd.DATA, 2), (shd.MODEL, 4)))
    sharded = jax.tree.map(
        lambda x: (
            jax.device_put(x, shd.logical_sharding(mesh, *([None] * (x.ndim - 1)), shd.MLP))
            if x.ndim and x.shape[-1] % 4 == 0
            else x
        ),
        params,
    )
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded))
    assert checkpoint.fingerprint(sharded) == one
    # One bit of one value changes it.
    leaves, tree = jax.tree.flatten(params)
    bits = np.asarray(leaves[0]).view(np.uint32).copy()
    bits.flat[3] ^= 1
    leaves[0] = bits.view(np.float32)
    assert checkpoint.fingerprint(jax.tree.unflatten(tree, leaves)) != one
    # The digest itself needs no device-to-host copy; only its 2 words per leaf come back.
    with jax.transfer_guard_device_to_host('disallow'):
        digest = checkpoint.param_digest(sharded)
    assert all(np.asarray(d).shape == (2,) for d in jax.tree.leaves(digest))
