"""Two processes joined by jax.distributed over localhost take the same step as one."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from trackstar_jax import sharding as shd
from trackstar_jax import train
from trackstar_jax.models import DecoderConfig, DecoderLM

CFG = DecoderConfig(
    vocab_size=128, num_layers=2, d_model=64, num_heads=4, mlp_dim=128, max_len=16, num_kv_heads=2
)
TC = train.TrainConfig(seq_len=16, batch_size=8, min_dim_size_to_factor=32, warmup_steps=1)
WORKER = os.path.join(os.path.dirname(__file__), 'workers', 'train_step_worker.py')


def batch_for_test():
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, CFG.vocab_size, (8, 16)).astype(np.int32)
    mask = np.ones((8, 16), np.float32)
    mask[:, 0] = 0
    mask[5, 11:] = 0
    return {'tokens': tokens, 'loss_mask': mask}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_workers(
    worker: str, args: list[str], timeout: int = 300, num_processes: int = 2, victim=None
) -> list[int]:
    """Runs a worker script as processes 0..n-1 and fails with their logs if one fails.

    With ``victim``, that process is expected to kill itself: once it has died the
    others (blocked on it) are killed too, and the return codes are returned.
    """
    port = str(free_port())
    env = {
        **os.environ,
        'PYTHONPATH': os.pathsep.join(
            [
                os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.environ.get('PYTHONPATH', ''),
            ]
        ),
    }
    env.pop('XLA_FLAGS', None)
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), port, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    if victim is not None:
        try:
            out = procs[victim].communicate(timeout=timeout)[0]
        finally:
            for q in procs:
                q.kill()
        for q in procs:
            q.communicate()
        assert procs[victim].returncode == -9, out[-4000:]
        return [p.returncode for p in procs]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, f'worker failed ({p.returncode}):\n{out[-4000:]}'
    return [p.returncode for p in procs]


def test_two_process_step_equals_one_process(tmp_path):
    out = str(tmp_path / 'two.npz')
    run_workers(WORKER, [out])
    got = np.load(out)

    mesh = shd.make_mesh((('data', 4), ('model', 2)))
    model = DecoderLM(CFG)
    state, shardings = train.create_train_state(model, TC, mesh)
    step = train.make_train_step(model, train.make_optimizer(TC), mesh, shardings)
    state, metrics = step(state, train.global_batch(mesh, batch_for_test()))
    np.testing.assert_allclose(got['loss'], np.asarray(metrics['loss']), rtol=1e-6)
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    assert len(leaves) == len(got.files) - 1
    for path, value in leaves:
        np.testing.assert_allclose(got[jax.tree_util.keystr(path)], value, rtol=1e-5, atol=1e-7)


PIPELINE_WORKER = os.path.join(os.path.dirname(__file__), 'workers', 'pipeline_worker.py')


def test_two_process_index_and_scores_equal_one_process(tmp_path):
    from tests import pipeline_fixtures as fx
    from trackstar_jax import index, pipeline

    root = tmp_path / 'two'
    root.mkdir()
    run_workers(PIPELINE_WORKER, [str(root)])
    got = np.load(root / 'result.npz')

    mesh = shd.make_mesh((('data', 4), ('model', 2)))
    feat = fx.featurizer(mesh)
    train = fx.build_index(feat, fx.train_examples(45), str(tmp_path / 'train'), chunk_rows=8)
    queries = fx.build_index(feat, fx.query_examples(6), str(tmp_path / 'queries'), chunk_rows=4)
    two_train = index.open(str(root / 'train'))
    assert two_train.ids == train.ids
    a = train.read(slice(0, len(train)))
    np.testing.assert_allclose(
        two_train.read(slice(0, len(train))), a, rtol=1e-5, atol=1e-6 * np.abs(a).max()
    )
    index.check_compatible(two_train.manifest, train.manifest)
    h = pipeline.fit(train, queries, mesh=mesh)
    res = pipeline.score(queries, train, h, pipeline.ScoreConfig(k=5), mesh=mesh)
    assert float(got['lam']) == pytest.approx(h.info['lam'], rel=1e-4)
    np.testing.assert_array_equal(got['rows'], res.rows)
    np.testing.assert_allclose(got['scores'], res.scores, rtol=1e-5)


PIPELINE4_WORKER = os.path.join(os.path.dirname(__file__), 'workers', 'pipeline4_worker.py')


@pytest.mark.fault(
    'One process of four SIGKILLed mid-index on a multi-process job',
    "All restarted with the same command: the index equals one process's",
)
def test_four_processes_equal_one_read_their_rows_and_survive_a_kill(tmp_path):
    """4 processes x 2 devices: each builds only its own rows; the index, R and top-k
    equal one process's; one process SIGKILLed mid-index and all restarted with the same
    command finish an index byte-identical to an uninterrupted run."""
    import json

    from tests import pipeline_fixtures as fx
    from trackstar_jax import index, pipeline

    clean = tmp_path / 'clean'
    clean.mkdir()
    run_workers(PIPELINE4_WORKER, [str(clean), '-1'], timeout=600, num_processes=4)
    # 45 rows in chunks of 4: process p owns chunks p, p + 4, p + 8 (the last has 1 row).
    made = [json.load(open(clean / f'rows_{p}.json'))['rows_made'] for p in range(4)]
    assert made == [12, 12, 12, 9]

    mesh = shd.make_mesh((('data', 4), ('model', 2)))
    feat = fx.featurizer(mesh)
    one = fx.build_index(feat, fx.train_examples(45), tmp_path / 'one', chunk_rows=4)
    q_one = fx.build_index(feat, fx.query_examples(6), tmp_path / 'q_one', chunk_rows=4)
    four = index.open(str(clean / 'train'))
    assert four.ids == one.ids
    a = one.read(slice(0, 45))
    np.testing.assert_allclose(four.read(slice(0, 45)), a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
    m = pipeline.fit(one, q_one, pipeline.FitConfig(chunk_rows=16), mesh=mesh)
    res = pipeline.score(q_one, one, m, pipeline.ScoreConfig(k=5, chunk_rows=16), mesh=mesh)
    got = np.load(clean / 'result.npz')
    np.testing.assert_array_equal(got['rows'], res.rows)
    np.testing.assert_allclose(got['scores'], res.scores, rtol=1e-5)

    killed = tmp_path / 'killed'
    killed.mkdir()
    run_workers(PIPELINE4_WORKER, [str(killed), '2'], timeout=600, num_processes=4, victim=1)
    with pytest.raises(RuntimeError, match='incomplete'):
        index.open(str(killed / 'train'))
    run_workers(PIPELINE4_WORKER, [str(killed), '-1'], timeout=600, num_processes=4)
    resumed, ref = index.open(str(killed / 'train')), index.open(str(clean / 'train'))
    assert resumed.ids == ref.ids
    np.testing.assert_array_equal(resumed.read(slice(0, 45)), ref.read(slice(0, 45)))
    np.testing.assert_array_equal(resumed.norms(), ref.norms())
    np.testing.assert_array_equal(resumed.num_targets(), ref.num_targets())
    np.testing.assert_array_equal(np.load(killed / 'result.npz')['rows'], got['rows'])


SUPPORT_WORKER = os.path.join(os.path.dirname(__file__), 'workers', 'support_worker.py')


@pytest.mark.fault(
    'One process of two SIGKILLed while building a token index',
    "Both restarted with the same command: the index equals one process's, byte for byte",
)
def test_two_process_token_index_equals_one_process_and_survives_a_kill(tmp_path):
    """2 processes x 4 devices, parameters laid out over the 2-process mesh: each process
    commits only its own chunks; rows, side columns and the by-token CSR equal one
    process's build; a process SIGKILLed mid-build and both restarted finish an index
    identical to the uninterrupted one."""
    import json

    from tests import test_support as ts
    from trackstar_jax import index, support

    clean = tmp_path / 'clean'
    clean.mkdir()
    run_workers(SUPPORT_WORKER, [str(clean), '-1'])
    model, params = ts._peaked_model()
    one = support.featurize_tokens(
        model, params, ts.multiprocess_examples(), str(tmp_path / 'one'), ts._config()
    )
    num_chunks = -(-len(one) // ts._config().chunk_rows)
    assert num_chunks >= 4
    chunks = [json.load(open(clean / f'chunks_{p}.json')) for p in range(2)]
    assert chunks == [list(range(0, num_chunks, 2)), list(range(1, num_chunks, 2))]
    two = index.open(str(clean / 'tokens'))
    assert two.ids == one.ids
    np.testing.assert_allclose(two.read(slice(0, len(two))), one.read(slice(0, len(one))),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(two.extra('target'), one.extra('target'))
    np.testing.assert_allclose(two.extra('alpha'), one.extra('alpha'), atol=1e-6)
    csr_two, csr_one = support.load_by_token(two), support.load_by_token(one)
    np.testing.assert_array_equal(csr_two['offsets'], csr_one['offsets'])
    np.testing.assert_array_equal(csr_two['rows'], csr_one['rows'])
    np.testing.assert_allclose(csr_two['alpha'], csr_one['alpha'], atol=1e-6)

    killed = tmp_path / 'killed'
    killed.mkdir()
    run_workers(SUPPORT_WORKER, [str(killed), '1'], victim=1)
    with pytest.raises(RuntimeError, match='incomplete'):
        index.open(str(killed / 'tokens'))
    run_workers(SUPPORT_WORKER, [str(killed), '-1'])
    resumed = index.open(str(killed / 'tokens'))
    np.testing.assert_array_equal(
        resumed.read(slice(0, len(resumed))), two.read(slice(0, len(two)))
    )
    np.testing.assert_array_equal(resumed.extra('alpha'), two.extra('alpha'))
    np.testing.assert_array_equal(resumed.extra('target'), two.extra('target'))
    for name in ('offsets', 'rows', 'alpha'):
        np.testing.assert_array_equal(support.load_by_token(resumed)[name], csr_two[name])
