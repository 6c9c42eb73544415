"""The index job: storage round trip, manifests, and resume after SIGKILL."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import grads, index
from trackstar_jax import sharding as shd
from trackstar_jax.data import examples as examples_lib

KILL_WORKER = os.path.join(os.path.dirname(__file__), 'workers', 'index_kill_worker.py')


@pytest.fixture(scope='module')
def feat():
    return fx.featurizer()


def test_index_round_trip_equals_featurizer(feat, tmp_path):
    ex = fx.train_examples(21)
    idx = fx.build_index(feat, ex, str(tmp_path / 'train'), chunk_rows=8, batch_size=4)
    assert len(idx) == 21 and idx.ids == [e['id'] for e in ex]
    direct = np.concatenate(
        [np.asarray(feat(examples_lib.pad_batch(ex[i : i + 1], 1, fx.SEQ_LEN))) for i in range(21)]
    )
    np.testing.assert_allclose(
        idx.read(slice(0, 21)), direct, rtol=1e-5, atol=1e-6 * np.abs(direct).max()
    )
    np.testing.assert_allclose(idx.read([20, 3, 5]), idx.read(slice(0, 21))[[20, 3, 5]])
    np.testing.assert_allclose(
        idx.norms(), np.linalg.norm(idx.read(slice(0, 21)), axis=1), rtol=1e-6
    )
    np.testing.assert_array_equal(idx.num_targets(), [e['loss_mask'].sum() for e in ex])
    m = idx.manifest
    assert m['dim'] == feat.dim and m['num_examples'] == 21 and m['projection_seed'] == 3
    assert m['correction'] == 'adafactor' and m['output_fn'] == 'loss'
    assert m['layout']['params']['layers_0/mlp/wo/kernel'] == 1
    # Chunk size does not change the vectors; reopening an index is free.
    other = fx.build_index(feat, ex, str(tmp_path / 'train5'), chunk_rows=5)
    np.testing.assert_allclose(
        other.read(slice(0, 21)),
        idx.read(slice(0, 21)),
        rtol=1e-5,
        atol=1e-6 * np.abs(direct).max(),
    )
    again = fx.build_index(feat, ex, str(tmp_path / 'train'), chunk_rows=8, batch_size=4)
    np.testing.assert_array_equal(again.read(slice(0, 21)), idx.read(slice(0, 21)))


def test_bfloat16_storage(feat, tmp_path):
    ex = fx.train_examples(9)
    f32 = fx.build_index(feat, ex, str(tmp_path / 'a'), chunk_rows=4)
    bf16 = fx.build_index(feat, ex, str(tmp_path / 'b'), chunk_rows=4, dtype='bfloat16')
    a, b = f32.read(slice(0, 9)), bf16.read(slice(0, 9))
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=2**-7, atol=1e-30)
    assert not np.array_equal(a, b)
    index.check_compatible(f32.manifest, bf16.manifest)  # storage dtype is not semantic


def test_manifest_mismatch_is_refused(feat, tmp_path):
    ex = fx.train_examples(6)
    a = fx.build_index(feat, ex, str(tmp_path / 'a'), chunk_rows=4)
    model, params, state = fx.model_and_state()
    other_seed = grads.Featurizer(
        model, params, grads.GradientSpec(block_dim=16, num_layer_blocks=2, seed=4), opt_state=state
    )
    b = fx.build_index(other_seed, ex, str(tmp_path / 'b'), chunk_rows=4)
    with pytest.raises(index.ManifestMismatchError, match='spec'):
        index.check_compatible(a.manifest, b.manifest)
    other_model, other_params, other_state = fx.model_and_state(seed=5)
    c = fx.build_index(
        grads.Featurizer(other_model, other_params, fx.SPEC, opt_state=other_state),
        ex,
        str(tmp_path / 'c'),
        chunk_rows=4,
        seq_len=fx.SEQ_LEN,
    )
    with pytest.raises(index.ManifestMismatchError, match='model_fingerprint'):
        index.check_compatible(a.manifest, c.manifest)
    # Re-using a path with other settings is refused, not silently mixed.
    with pytest.raises(ValueError, match='other settings'):
        fx.build_index(other_seed, ex, str(tmp_path / 'a'), chunk_rows=4)
    with pytest.raises(ValueError, match='unique'):
        fx.build_index(feat, ex + ex[:1], str(tmp_path / 'd'), chunk_rows=4)


def _run_kill_worker(path, kill_at):
    # The workers share a persistent compilation cache, so only the first compiles.
    cache = os.path.join(os.path.dirname(path), 'jax_cache')
    env = {
        **os.environ,
        'PYTHONPATH': os.path.dirname(os.path.dirname(__file__)),
        'JAX_COMPILATION_CACHE_DIR': cache,
        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
        'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
    }
    return subprocess.run(
        [sys.executable, KILL_WORKER, path, str(kill_at)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.fault(
    'SIGKILL while building an index (after vectors, after metadata, after a commit)',
    'The resume gives the byte-identical index; an unfinished index refuses to open',
)
def test_sigkill_mid_build_then_resume_gives_identical_index(tmp_path):
    reference = str(tmp_path / 'reference')
    done = _run_kill_worker(reference, -1)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = index.open(reference)
    # Kill points: events are (vectors_written, meta_written, committed) per chunk, so
    # these land after the first vectors but before any metadata or marker (0), after a
    # chunk's metadata but before its commit marker (4), and right after a commit (5).
    for kill_at in (0, 4, 5):
        path = str(tmp_path / f'killed_{kill_at}')
        first = _run_kill_worker(path, kill_at)
        assert first.returncode == -9, (kill_at, first.returncode, first.stderr[-2000:])
        with pytest.raises(RuntimeError, match='incomplete'):
            index.open(path)
        resumed = _run_kill_worker(path, -1)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        got = index.open(path)
        assert got.ids == ref.ids
        np.testing.assert_array_equal(got.read(slice(0, len(ref))), ref.read(slice(0, len(ref))))
        np.testing.assert_array_equal(got.norms(), ref.norms())
        np.testing.assert_array_equal(got.num_targets(), ref.num_targets())
        markers = sorted(os.listdir(os.path.join(path, 'progress')))
        assert len(markers) == len(set(markers)) == 6
        rows = [json.load(open(os.path.join(path, 'progress', m)))['rows'] for m in markers]
        assert rows == [[i * 4, min(i * 4 + 4, 23)] for i in range(6)]
        shutil.rmtree(path)


def test_sharded_featurizer_builds_the_same_index(feat, tmp_path):
    ex = fx.train_examples(13)
    one = fx.build_index(feat, ex, str(tmp_path / 'one'), chunk_rows=8)
    mesh = shd.make_mesh((('data', 4), ('model', 2)))
    eight = fx.build_index(fx.featurizer(mesh), ex, str(tmp_path / 'eight'), chunk_rows=8)
    index.check_compatible(one.manifest, eight.manifest)
    a = one.read(slice(0, 13))
    np.testing.assert_allclose(eight.read(slice(0, 13)), a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_raw_chunk_reads_equal_tensorstore_reads(tmp_path, dtype):
    """A local index is read straight from its chunk files: the same values TensorStore
    decodes, for every slice (edge chunk, all-zero chunk never written as a file)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((21, 6)).astype(np.float32)
    vectors[8:16] = 0.0  # chunk 1: all zeros, so TensorStore writes no file for it
    writer = index.create(str(tmp_path), {'x': 1}, [f'r{i}' for i in range(21)], dim=6,
                          dtype=dtype, chunk_rows=8)  # fmt: skip
    for c in range(writer.num_chunks):
        start, stop = writer.rows(c)
        writer.write_chunk(c, vectors[start:stop], np.ones(stop - start))
    assert not os.path.exists(tmp_path / 'vectors' / 'c' / '1' / '0')
    direct = index.open(str(tmp_path))
    assert direct._chunk_files is not None
    via_ts = index.open(str(tmp_path))
    via_ts._chunk_files = None
    for rows in (slice(0, 21), slice(3, 19), slice(16, 21), slice(9, 10)):
        for upcast in (True, False):
            a, b = direct.read(rows, upcast=upcast), via_ts.read(rows, upcast=upcast)
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    expected = vectors.astype(index.DTYPES[dtype]).astype(np.float32)
    np.testing.assert_array_equal(direct.read(slice(0, 21)), expected)


def test_side_columns_round_trip_and_are_verified(tmp_path):
    """Per-row side columns come back as written, a changed byte is refused, and a chunk
    without them (or of the wrong shape) is not written."""
    rng = np.random.default_rng(1)
    n, cols = 19, {'alpha': (3, 'float32'), 'token': (3, 'int32')}
    vectors = rng.standard_normal((n, 4)).astype(np.float32)
    alpha = rng.standard_normal((n, 3)).astype(np.float32)
    token = rng.integers(-1, 1000, (n, 3)).astype(np.int32)
    url = str(tmp_path / 'idx')
    writer = index.create(url, {'x': 1}, [f'r{i}' for i in range(n)], dim=4, chunk_rows=8,
                          extras=cols)  # fmt: skip
    with pytest.raises(ValueError, match='side columns'):
        writer.write_chunk(0, vectors[:8], np.ones(8), extras={'alpha': alpha[:8]})
    with pytest.raises(ValueError, match='expected shape'):
        writer.write_chunk(0, vectors[:8], np.ones(8), extras={'alpha': alpha[:8, :2],
                                                               'token': token[:8]})  # fmt: skip
    for c in range(writer.num_chunks):
        a, b = writer.rows(c)
        writer.write_chunk(c, vectors[a:b], np.ones(b - a),
                           extras={'alpha': alpha[a:b], 'token': token[a:b]})  # fmt: skip
    idx = index.open(url)
    assert index.extras_of(idx.manifest) == cols
    np.testing.assert_array_equal(idx.extra('alpha'), alpha)
    got = idx.extra('token', slice(5, 17))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, token[5:17])
    with pytest.raises(KeyError, match='no side column'):
        idx.extra('beta')
    # Change one value of chunk 1 behind the index's back: reading it is refused.
    arr = idx._store.open_array('extras/token')
    arr[9, 0].write(np.int32(token[9, 0] + 1)).result()
    fresh = index.open(url)
    np.testing.assert_array_equal(fresh.extra('token', slice(0, 8)), token[:8])
    with pytest.raises(index.IntegrityError, match='chunk 1'):
        fresh.extra('token', slice(8, 12))


def test_select_rows_copies_the_chosen_rows_and_stays_comparable(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(23, 6)).astype(np.float32)
    manifest = {'model_fingerprint': 'm', 'spec': {'block_dim': 3}, 'layout': {}}
    writer = index.create(str(tmp_path / 'src'), manifest, [f'q{i}' for i in range(23)], dim=6,
                          chunk_rows=5)  # fmt: skip
    for c in range(writer.num_chunks):
        a, b = writer.rows(c)
        writer.write_chunk(c, vecs[a:b], np.arange(a, b, dtype=np.float32))
    src = writer.finish()
    rows = [17, 3, 9, 0, 22, 11, 5]
    sub = index.select_rows(src, rows, str(tmp_path / 'sub'))
    assert sub.ids == [f'q{r}' for r in rows]
    np.testing.assert_array_equal(sub.read(slice(0, len(sub))), vecs[rows])
    np.testing.assert_array_equal(sub.num_targets(), np.asarray(rows, np.float32))
    index.check_compatible(src.manifest, sub.manifest)  # the same vectors' space
    assert sub.manifest['selected_rows'] == rows
    again = index.select_rows(src, rows, str(tmp_path / 'sub'))  # re-open: nothing rewritten
    np.testing.assert_array_equal(again.read(slice(0, len(again))), vecs[rows])
    for bad in ([], [3, 3], [23], [-1]):
        with pytest.raises(ValueError, match='[Rr]ows'):
            index.select_rows(src, bad, str(tmp_path / 'bad'))
