"""The one pipeline: storage on any URL, preconditioner kinds vs numpy, compiled-step reuse."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import index, pipeline, preconditioners, scoring
from trackstar_jax import sharding as shd
from trackstar_jax.pipeline import FitConfig, Method, ScoreConfig


@pytest.fixture(scope='module')
def indices(tmp_path_factory):
    root = tmp_path_factory.mktemp('pipe')
    feat = fx.featurizer()
    train = fx.build_index(feat, fx.train_examples(30), root / 'train', chunk_rows=8)
    queries = fx.build_index(feat, fx.query_examples(5), root / 'queries', chunk_rows=8)
    return feat, train, queries


def test_storage_imports_no_model_code():
    code = (
        'import sys, trackstar_jax.index; '
        "bad = [m for m in sys.modules if m.startswith(('trackstar_jax.grads', "
        "'trackstar_jax.models', 'flax', 'optax'))]; print(bad); assert not bad"
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_core_never_imports_tensorflow():
    code = (
        'import sys, trackstar_jax.gin_utils, trackstar_jax.data.sources; '
        "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules"
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_url_specs():
    assert index.kvstore_spec('gs://bucket/a/b') == {
        'driver': 'gcs',
        'bucket': 'bucket',
        'path': 'a/b/',
    }
    assert index.kvstore_spec('memory://x/y')['driver'] == 'memory'
    assert index.kvstore_spec('file:///tmp/z') == {'driver': 'file', 'path': '/tmp/z/'}
    with pytest.raises(ValueError, match='Unsupported'):
        index.kvstore_spec('s3://bucket/x')


def test_memory_round_trip_equals_file_index(indices):
    feat, train, _ = indices
    ex = fx.train_examples(30)
    mem = fx.build_index(feat, ex, 'memory://roundtrip/train', chunk_rows=8)
    again = index.open('memory://roundtrip/train')  # a fresh handle sees the same store
    assert again.ids == train.ids and again.manifest['dim'] == train.dim
    np.testing.assert_array_equal(again.read(slice(0, 30)), train.read(slice(0, 30)))
    np.testing.assert_array_equal(again.norms(), train.norms())
    assert mem.manifest == again.manifest
    # Resuming a complete index writes nothing new and gives the same rows.
    resumed = fx.build_index(feat, ex, 'memory://roundtrip/train', chunk_rows=8)
    np.testing.assert_array_equal(resumed.read(slice(0, 30)), train.read(slice(0, 30)))
    # Derive and a preconditioner live on memory:// too.
    half = index.derive(again, 'memory://roundtrip/half', lambda v: v[:, ::2], {'note': 'half'})
    np.testing.assert_array_equal(half.read(slice(0, 30)), train.read(slice(0, 30))[:, ::2])
    p = pipeline.fit(again, None, FitConfig(preconditioner='train'))
    p.save('memory://roundtrip/pre')
    back = preconditioners.load('memory://roundtrip/pre')
    np.testing.assert_array_equal(back.arrays['r_inv_sqrt'], p.arrays['r_inv_sqrt'])
    with pytest.raises(FileNotFoundError):
        index.open('memory://roundtrip/nothing')


def test_storage_is_handed_its_manifest(tmp_path):
    """The storage API alone: create, write chunks out of order, resume, refuse mixing."""
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(10, 6)).astype(np.float32)
    ids = [f'e{i}' for i in range(10)]
    w = index.create(str(tmp_path / 'x'), {'what': 'random'}, ids, dim=6, chunk_rows=4)
    assert w.num_chunks == 3
    w.write_chunk(2, vecs[8:], np.ones(2))
    with pytest.raises(RuntimeError, match='incomplete'):
        index.open(str(tmp_path / 'x'))
    w = index.create(str(tmp_path / 'x'), {'what': 'random'}, ids, dim=6, chunk_rows=4)
    assert w.committed() == [False, False, True]
    for c in (0, 1):
        w.write_chunk(c, vecs[c * 4 : c * 4 + 4], np.full(4, 3.0))
    got = w.finish()
    np.testing.assert_array_equal(got.read(slice(0, 10)), vecs)
    np.testing.assert_array_equal(got.num_targets(), [3.0] * 8 + [1.0] * 2)
    assert got.manifest['what'] == 'random' and got.manifest['num_examples'] == 10
    with pytest.raises(ValueError, match='other settings'):
        index.create(str(tmp_path / 'x'), {'what': 'else'}, ids, dim=6, chunk_rows=4)
    with pytest.raises(ValueError, match='shape'):
        w.write_chunk(0, vecs[:3], np.ones(3))


def _numpy_diagonal(t, damping):
    second = (t.astype(np.float64) ** 2).mean(0)
    return 1.0 / np.sqrt(second + damping * second.mean())


def test_diagonal_preconditioner_scores_equal_numpy(indices):
    _, train, queries = indices
    p = pipeline.fit(train, queries, FitConfig(preconditioner='diagonal', damping=0.1))
    t, q = train.read(slice(0, len(train))), queries.read(slice(0, len(queries)))
    scale = _numpy_diagonal(t, 0.1)
    np.testing.assert_allclose(p.arrays['scale'], scale, rtol=1e-4)
    res = pipeline.score(queries, train, p, ScoreConfig(k=4, chunk_rows=7))
    a, b = q * scale, t * scale
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    s = a @ b.T
    order = np.array(
        [sorted(range(len(t)), key=lambda j, r=r: (-r[j], train.ids[j]))[:4] for r in s]
    )
    np.testing.assert_array_equal(res.rows, order)
    np.testing.assert_allclose(res.scores, np.take_along_axis(s, order, 1), rtol=1e-5, atol=1e-6)


def test_compiled_steps_are_reused_across_methods_and_chunks(indices):
    feat, train, queries = indices
    mesh = shd.make_mesh(((shd.DATA, -1), (shd.MODEL, 1)))
    other = fx.build_index(feat, fx.train_examples(30, seed=7), 'memory://reuse/t', chunk_rows=8)
    step = scoring.make_chunk_scorer(mesh, 3, 'train', True)
    before = step._cache_size()
    fitted = {}
    # Two methods with the same kind on two train indices of the same shape, several
    # chunks each (chunk_rows 8 of 30 rows): one executable serves all of them.
    for name, t in (('a', train), ('b', other)):
        m = Method(name=name, preconditioner='train')
        pipeline.run_method(
            m, t, queries, score_config=ScoreConfig(k=3, chunk_rows=8), mesh=mesh, fitted=fitted
        )
    assert scoring.make_chunk_scorer(mesh, 3, 'train', True) is step
    assert step._cache_size() - before <= 1
    assert len(fitted) == 2
    # The same method again is a cache hit for its fit too.
    pipeline.run_method(
        Method(name='a', preconditioner='train'),
        train,
        queries,
        score_config=ScoreConfig(k=3, chunk_rows=8),
        mesh=mesh,
        fitted=fitted,
    )
    assert len(fitted) == 2 and step._cache_size() - before <= 1


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match='registered'):
        Method(name='x', preconditioner='nope')
    with pytest.raises(ValueError, match='kind'):
        Method(name='x', kind='magic')
    with pytest.raises(ValueError, match='divide'):
        pipeline.IndexConfig(batch_size=3, chunk_rows=8)
    assert {'none', 'diagonal', 'train', 'mixed'} <= set(preconditioners.names())
    assert jax.device_count() == 8  # the suite's fake devices are in place
