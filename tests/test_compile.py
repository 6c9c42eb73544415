"""AOT compilation: the compiled index step is the job's kernel; costs and fits are right."""

import jax
import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import compile as compile_lib
from trackstar_jax import sharding as shd
from trackstar_jax import train
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.models import DecoderLM

TC = train.TrainConfig(seq_len=fx.SEQ_LEN, min_dim_size_to_factor=16, batch_size=8)
MESH = ((shd.DATA, 4), (shd.MODEL, 2))


def _config(**kw):
    base = dict(mesh_axes=MESH, batch_size=8, seq_len=fx.SEQ_LEN, chunk_rows=16, num_queries=6)
    return compile_lib.CompileConfig(**{**base, **kw})


def test_compiled_index_step_is_the_featurizers_kernel():
    """Compiled from shapes alone, then run on real params: the Featurizer's vectors."""
    mesh = shd.make_mesh(MESH)
    model = DecoderLM(fx.CFG)
    program, args, layout = compile_lib.index_program(model, fx.SPEC, TC, mesh, _config())
    compiled = program.lower(*args).compile()
    feat = fx.featurizer(mesh)
    assert layout.dim == feat.dim
    params = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), feat.params, args[0])
    batch = examples_lib.pad_batch(fx.train_examples(8), 8, fx.SEQ_LEN)
    got = np.asarray(compiled(params, feat.constants, batch['tokens'], batch['loss_mask']))
    want = np.asarray(feat(batch))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_local_compile_reports_memory_cost_and_fit():
    model = DecoderLM(fx.CFG)
    results = {
        job: compile_lib.compile_job(job, model, fx.SPEC, TC, _config())
        for job in ('index', 'train', 'fit', 'score')
    }
    for job, r in results.items():
        assert r['num_chips'] == 8 and r['mesh'] == {'data': 4, 'model': 2}, job
        assert r['per_chip_bytes'] == (
            r['argument_bytes'] + r['temp_bytes'] + r['output_bytes'] - r['alias_bytes']
        )
        assert r['fits'] is True and r['hbm_bytes'] > r['per_chip_bytes'] > 0
    assert results['index']['tokens_per_step'] == 8 * fx.SEQ_LEN
    # The fit step is one block-diagonal XᵀX: 2 · rows · blocks · d_b² FLOPs, split over
    # the 4 data shards (an independent count of what XLA reports per chip); with 1,024
    # rows the accumulator's additions are < 1 % of it.
    fit = compile_lib.compile_job('fit', model, fx.SPEC, TC, _config(chunk_rows=1024))
    expected = 2 * fit['rows_per_step'] * fit['num_blocks'] * fit['block_dim'] ** 2 / 4
    assert fit['flops'] == pytest.approx(expected, rel=0.01)


def test_a_step_that_does_not_fit_is_refused_with_advice():
    model = DecoderLM(fx.CFG)
    r = compile_lib.compile_job('index', model, fx.SPEC, TC, _config(hbm_bytes=1024))
    assert r['fits'] is False
    msg = compile_lib.advice(r)
    assert 'too much' in msg and 'batch' in msg and 'model' in msg
    with pytest.raises(ValueError, match='job must be one of'):
        compile_lib.compile_job('nope', model, fx.SPEC, TC, _config())


def test_tpu_topology_compiles_on_this_machine():
    """A TPU v5e 2x2 slice, described by libtpu, compiles the index step (no TPU here)."""
    model = DecoderLM(fx.CFG)
    cfg = _config(topology='v5e:2x2', mesh_axes=((shd.DATA, 2), (shd.MODEL, 2)))
    r = compile_lib.compile_job('index', model, fx.SPEC, TC, cfg)
    assert r['num_chips'] == 4 and r['device_kind'] == 'TPU v5 lite'
    assert r['hbm_bytes'] == compile_lib.CHIPS['TPU v5 lite'][1] and r['fits'] is True
    assert r['flops'] > 0
    with pytest.raises(ValueError, match='topology'):
        compile_lib.target_devices('v99:1x1')


def test_cost_model_by_hand():
    """The price of a made-up compiled step, worked out by hand."""
    from trackstar_jax import cost

    peak_flops, _, hbm_s = compile_lib.CHIPS['TPU v5']
    step = {
        'job': 'index',
        'device_kind': 'TPU v5',
        'num_chips': 128,
        'flops': 1e13,
        'bytes_accessed': 1e9,
        'examples_per_step': 16,
        'tokens_per_step': 16 * 2048,
        'dim': 65536,
    }
    work = cost.Workload(corpus_tokens=2048 * 16 * 1000, mfu=0.5)
    got = cost.index_cost(step, work)
    seconds = 1e13 / (peak_flops * 0.5)  # compute-bound: 1e9 B / hbm_s is far less
    assert seconds > 1e9 / hbm_s and got['bound'] == 'compute'
    assert got['steps'] == pytest.approx(1000)
    assert got['chip_hours'] == pytest.approx(1000 * seconds * 128 / 3600)
    assert got['index_bytes'] == pytest.approx(16000 * 65536 * 2)
    assert got['flops_per_token'] == pytest.approx(1e13 * 128 / (16 * 2048))
    # Streaming: 32 hosts each reading 1 GB/s bound a job with cheap steps.
    read = cost.streaming_cost(
        {**step, 'job': 'score', 'flops': 1e6, 'rows_per_step': 4096}, work, passes=2
    )
    expected_read_s = 2 * 16000 * 65536 * 2 / (32 * 1e9)
    assert read['bound'] == 'index read' and read['hosts'] == 32
    assert read['wall_hours'] == pytest.approx(expected_read_s / 3600)


@pytest.mark.parametrize('precision', ['default', 'highest'])
def test_kernel_precision_is_a_setting(precision):
    """The projection matmuls carry the spec's precision into the lowered program."""
    import dataclasses

    mesh = shd.make_mesh(MESH)
    spec = dataclasses.replace(fx.SPEC, precision=precision)
    program, args, _ = compile_lib.index_program(DecoderLM(fx.CFG), spec, TC, mesh, _config())
    text = program.lower(*args).as_text()
    assert ('HIGHEST' in text) == (precision == 'highest')
    with pytest.raises(ValueError, match='precision'):
        dataclasses.replace(fx.SPEC, precision='fast')


def test_r_accumulation_step_has_no_collective_and_donates():
    """Each device adds its rows into its own partial sum: no all-reduce per chunk."""
    mesh = shd.make_mesh(MESH)
    _, _, layout = compile_lib.index_program(DecoderLM(fx.CFG), fx.SPEC, TC, mesh, _config())
    step, args = compile_lib.fit_program(layout, mesh, _config(chunk_rows=64))
    hlo = step.lower(*args).compile().as_text()
    assert 'all-reduce' not in hlo and 'all-gather' not in hlo
    assert 'input_output_alias' in hlo  # the running sums are updated in place


def test_a_tpu_step_the_compiler_refuses_is_reported_not_raised():
    """Temporaries beyond HBM make libtpu refuse to compile: that is a 'does not fit'."""
    import dataclasses

    cfg = dataclasses.replace(fx.CFG, vocab_size=32000, max_len=2048)
    conf = _config(
        topology='v5e:2x2', mesh_axes=((shd.DATA, 4), (shd.MODEL, 1)), batch_size=512,
        seq_len=2048,
    )  # fmt: skip
    r = compile_lib.compile_job('train', DecoderLM(cfg), fx.SPEC, TC, conf)
    assert r['fits'] is False and 'RESOURCE_EXHAUSTED' in r['compiler_error']
    assert r['per_chip_bytes'] > r['hbm_bytes'] > 0
    assert 'compiler refused' in compile_lib.advice(r) and 'batch' in compile_lib.advice(r)
