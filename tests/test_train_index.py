"""The training-time index: a training step that also writes each example's features.

References: the Featurizer at the step's pre-update params and optimizer state, the
plain training step, and float64 numpy sums for TracIn-CP.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import grads, pipeline, train, train_index
from trackstar_jax import sharding as shd
from trackstar_jax.models import DecoderLM

TC = train.TrainConfig(
    seq_len=16, batch_size=8, min_dim_size_to_factor=16, warmup_steps=2, learning_rate=0.01
)
SPEC = grads.GradientSpec(block_dim=16, num_layer_blocks=2, seed=3)


def _batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, fx.CFG.vocab_size, (8, 16)).astype(np.int32)
    mask = np.ones((8, 16), np.float32)
    mask[:, 0] = 0
    mask[3, 9:] = 0  # a padded example
    return {'tokens': tokens, 'loss_mask': mask}


def _setup(mesh, warm_steps=2):
    """A sharded state after ``warm_steps`` plain steps (non-zero second moments)."""
    model = DecoderLM(fx.CFG)
    tx = train.make_optimizer(TC)
    state, shardings = train.create_train_state(model, TC, mesh)
    plain = train.make_train_step(model, tx, mesh, shardings)
    for i in range(warm_steps):
        state, _ = plain(state, train.global_batch(mesh, _batch(100 + i)))
    return model, tx, state, shardings, plain


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


MESHES = [(('data', 8), ('model', 1)), (('data', 2), ('model', 4))]


@pytest.mark.parametrize('axes', MESHES, ids=['data8', 'data2-model4'])
def test_rows_equal_the_featurizer_at_the_pre_step_state_and_the_update_is_the_plain_one(axes):
    assert len(jax.devices()) == 8, 'needs the 8 fake CPU devices of conftest'
    mesh = shd.make_mesh(axes)
    model, tx, state, shardings, plain = _setup(mesh)
    plan = train_index.plan_for(model, state.params, state.opt_state, SPEC, mesh=mesh)
    # Both kinds of parameter are exercised: tapped Dense kernels and per-example ones.
    assert plan.fused_paths and len(plan.fused_paths) < len(
        [e for e in plan.layout.entries if not e.excluded]
    )
    pre = jax.device_get(state)
    featurizer = grads.Featurizer(model, pre.params, SPEC, opt_state=pre.opt_state)
    batch = _batch(7)
    expected = np.asarray(featurizer.reference(batch))
    step = train_index.make_indexed_train_step(model, tx, mesh, shardings, plan)
    plain_state, plain_metrics = plain(_copy(state), train.global_batch(mesh, batch))
    new_state, metrics, feats = step(state, train.global_batch(mesh, batch), plan.projections)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(feats), expected, rtol=2e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(float(metrics['loss']), float(plain_metrics['loss']), rtol=1e-6)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(new_state)),
        jax.tree.leaves(jax.device_get(plain_state)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_features_and_grads_refuses_other_output_fns():
    with pytest.raises(ValueError, match="output_fn must be 'loss'"):
        train_index.TrainIndexConfig(spec=dataclasses.replace(SPEC, output_fn='margin'))


def _record(mesh, url, steps, checkpoints):
    """Runs ``steps`` indexed steps through the async writer; returns states at checkpoints."""
    model, tx, state, shardings, _ = _setup(mesh)
    plan = train_index.plan_for(model, state.params, state.opt_state, SPEC, mesh=mesh)
    schedule = train.learning_rate_schedule(TC)
    rates = [float(schedule(s)) for s in range(steps)]
    example_ids = [[f'ex{(s * 8 + i) % 12:02d}' for i in range(8)] for s in range(steps)]
    manifest = train_index.manifest_for(plan, 16, range(steps), rates, 8, 1)
    writer = train_index.index_lib.create(
        url, manifest, train_index.row_ids(example_ids, range(steps)), dim=plan.dim, chunk_rows=8
    )
    rows = train_index.AsyncRowWriter(writer, range(steps), max_pending=2)
    step_fn = train_index.make_indexed_train_step(model, tx, mesh, shardings, plan)
    saved, batches = {}, {}
    for s in range(steps):
        if s in checkpoints:
            rows.flush()
            train_index.record_checkpoint(url, s, state.params, state.opt_state, plan)
            saved[s] = jax.device_get(state)
        batches[s] = _batch(s)
        state, _, feats = step_fn(state, train.global_batch(mesh, batches[s]), plan.projections)
        rows.put(s, feats, batches[s]['loss_mask'].sum(1))
    rows.close()
    return model, saved, batches, example_ids, rates


def test_tracin_sums_over_steps_equal_a_float64_brute_force_and_one_step_is_trackstar(tmp_path):
    mesh = shd.make_mesh((('data', 8), ('model', 1)))
    url = str(tmp_path / 'train_time')
    model, saved, batches, example_ids, rates = _record(mesh, url, 4, checkpoints=(0, 2))
    idx = pipeline.open_index(url)
    assert len(idx) == 32 and idx.ids[8] == 'ex08@1'
    queries = fx.query_examples(5)
    query_idx = {}
    q_feats = {}
    for c, st in saved.items():
        f = grads.Featurizer(model, st.params, SPEC, opt_state=st.opt_state)
        query_idx[c] = pipeline.featurize(
            f, queries, str(tmp_path / f'q{c}'), pipeline.IndexConfig(seq_len=16, batch_size=8)
        )
        q_feats[c] = np.asarray(query_idx[c].read(slice(0, 5)), np.float64)
    rows = np.asarray(idx.read(slice(0, 32)), np.float64)
    expected = {}
    for r, row_id in enumerate(idx.ids):
        example, s = train_index.split_row_id(row_id)
        c = 2 if s >= 2 else 0
        expected[example] = expected.get(example, 0.0) + rates[s] * (q_feats[c] @ rows[r])
    names = sorted(expected)
    dense = np.stack([expected[e] for e in names], axis=1)  # [Q, E]
    result = pipeline.score_tracin(
        query_idx, idx, pipeline.ScoreConfig(k=4, unit_norm=False, opponents=2), mesh=mesh
    )
    for q in range(5):
        order = sorted(range(len(names)), key=lambda j: (-dense[q, j], names[j]))
        assert result.ids[q] == [names[j] for j in order[:4]]
        np.testing.assert_allclose(result.scores[q], dense[q, order[:4]], rtol=1e-5)
        assert result.opponent_ids[q] == [names[j] for j in order[::-1][:2]]

    # The last checkpoint's step alone, through the usual pipeline, is TrackStar there:
    # the same top-k as an index the Featurizer builds from that step's examples.
    view = train_index.step_view(idx, 2, str(tmp_path / 'step2'))
    batch = batches[2]
    examples = [
        {'id': e, 'tokens': batch['tokens'][i], 'loss_mask': batch['loss_mask'][i]}
        for i, e in enumerate(example_ids[2])
    ]
    st = saved[2]
    f = grads.Featurizer(model, st.params, SPEC, opt_state=st.opt_state)
    direct = pipeline.featurize(
        f, examples, str(tmp_path / 'direct'), pipeline.IndexConfig(seq_len=16, batch_size=8)
    )
    cfg = pipeline.ScoreConfig(k=5)
    m_view = pipeline.fit(view, query_idx[2], pipeline.FitConfig(preconditioner='mixed'))
    m_direct = pipeline.fit(direct, query_idx[2], pipeline.FitConfig(preconditioner='mixed'))
    via_view = pipeline.score(query_idx[2], view, m_view, cfg)
    via_direct = pipeline.score(query_idx[2], direct, m_direct, cfg)
    assert via_view.ids == via_direct.ids
    np.testing.assert_allclose(via_view.scores, via_direct.scores, rtol=1e-4, atol=1e-6)
    # Queries from another checkpoint are refused by the step view and by TracIn.
    with pytest.raises(pipeline.index_lib.ManifestMismatchError):
        pipeline.score(query_idx[0], view, None, cfg)
    with pytest.raises(pipeline.index_lib.ManifestMismatchError, match='checkpoint 2'):
        pipeline.score_tracin({2: query_idx[0]}, idx)


@pytest.mark.fault(
    'Training with a training-time index crashes after a checkpoint (rows of later steps '
    'uncommitted)',
    'The resumed run writes exactly those rows again (bitwise equal); rows missing before '
    'the resume checkpoint: RuntimeError before any step',
)
def test_trainer_writes_the_index_and_a_resumed_run_completes_it_exactly(tmp_path):
    import shutil

    import gin

    from trackstar_jax import index as index_lib
    from trackstar_jax.jobs import train_lm

    cfg = dataclasses.replace(fx.CFG, vocab_size=4096)
    tc = dataclasses.replace(TC, num_steps=6, checkpoint_every=3, log_every=3)
    record = train_index.TrainIndexConfig(spec=SPEC, first_step=1)
    run = dict(
        workdir=str(tmp_path),
        model_config=cfg,
        train_config=tc,
        max_documents=40,
        train_index=record,
    )
    with gin.unlock_config():
        summary = train_lm.train_lm(**run)
    assert summary['train_index']['rows'] == 5 * 8 and summary['train_index']['recorded_steps'] == 5
    url = str(tmp_path / 'train_time_index')
    first = index_lib.open(url)
    rows = np.asarray(first.read(slice(0, len(first))))
    assert train_index.split_row_id(first.ids[0])[1] == 1
    assert sorted(train_index.checkpoint_fingerprints(first)) == [3, 6]

    # A crash after checkpoint 3: the last checkpoint and the rows of steps 3-5 are lost
    # (chunk c holds step c + 1). The resumed run writes exactly those rows again.
    shutil.rmtree(tmp_path / 'checkpoints' / '6')
    store = index_lib.Store(url)
    for chunk in (2, 3, 4):
        store.delete(f'progress/chunk_{chunk:08d}')
    with gin.unlock_config():
        summary = train_lm.train_lm(**run)
    assert summary['train_index']['rows_written_this_run'] == 3 * 8
    again = index_lib.open(url)
    np.testing.assert_array_equal(np.asarray(again.read(slice(0, len(again)))), rows)

    # Rows lost before the checkpoint training resumes from cannot be recomputed.
    shutil.rmtree(tmp_path / 'checkpoints' / '6')
    store.delete('progress/chunk_00000000')
    with gin.unlock_config(), pytest.raises(RuntimeError, match='lacks the rows of 1 recorded'):
        train_lm.train_lm(**run)


def test_score_training_job_featurizes_queries_at_the_recorded_checkpoints(tmp_path):
    import json

    import gin

    from trackstar_jax import index as index_lib
    from trackstar_jax.jobs import attribution, train_lm

    cfg = dataclasses.replace(fx.CFG, vocab_size=4096)
    tc = dataclasses.replace(TC, num_steps=6, checkpoint_every=2, log_every=3)
    with gin.unlock_config():
        train_lm.train_lm(
            workdir=str(tmp_path), model_config=cfg, train_config=tc, max_documents=40,
            train_index=train_index.TrainIndexConfig(spec=SPEC, first_step=1),
        )  # fmt: skip
        url = attribution.score_training(
            workdir=str(tmp_path),
            max_queries=4,
            query_config=pipeline.IndexConfig(seq_len=16, batch_size=8),
            config=pipeline.ScoreConfig(k=3, unit_norm=False, opponents=1),
        )
    # Checkpoints 2 and 4 lie inside the recorded steps 1-5 (6 is after them); every
    # checkpoint was kept.
    for step in (2, 4):
        q = index_lib.open(str(tmp_path / f'tracin_scores.jsonl_queries_step{step}'))
        assert q.manifest['checkpoint_step'] == step
    assert not (tmp_path / 'tracin_scores.jsonl_queries_step6').exists()
    kept = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert kept == [2, 4, 6]
    records = [json.loads(line) for line in open(url)]
    assert len({r['query_id'] for r in records}) == 4
    assert sorted({r['rank'] for r in records}) == [-1, 1, 2, 3]
    assert all(r['example_id'].startswith('row') and '@' not in r['example_id'] for r in records)
    with gin.unlock_config(), pytest.raises(ValueError, match='asked for \\[5\\]'):
        attribution.score_training(workdir=str(tmp_path), checkpoint_steps=[5])
