"""Faults and bad inputs: each a clear error or a correct result, never a silent wrong one."""

import glob
import os

import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import grads, index, pipeline, preconditioners


@pytest.fixture()
def built(tmp_path):
    feat = fx.featurizer()
    train = fx.build_index(feat, fx.train_examples(20), tmp_path / 'train', chunk_rows=8)
    queries = fx.build_index(feat, fx.query_examples(4), tmp_path / 'queries', chunk_rows=8)
    return feat, train, queries


def _chunk_files(path):
    return sorted(glob.glob(os.path.join(path, 'vectors', 'c', '*', '*')))


def test_a_deleted_chunk_file_is_an_error_not_zeros(built):
    _, train, queries = built
    os.remove(_chunk_files(train.path)[1])  # TensorStore would read it as zeros
    again = index.open(train.path)
    np.testing.assert_array_equal(again.read(slice(0, 8)), train.read(slice(0, 8)))  # chunk 0
    with pytest.raises(index.IntegrityError, match='chunk 1'):
        again.read(slice(0, 20))
    with pytest.raises(index.IntegrityError):
        pipeline.fit(again, queries)
    with pytest.raises(index.IntegrityError):
        pipeline.score(queries, index.open(train.path))


@pytest.mark.parametrize('damage', ['flip', 'ff', 'truncate'])
def test_changed_bytes_do_not_pass(built, damage):
    _, train, queries = built
    path = _chunk_files(train.path)[0]
    data = bytearray(open(path, 'rb').read())
    if damage == 'flip':
        data[len(data) // 2] ^= 0x01
    elif damage == 'ff':
        data[8:40] = b'\xff' * 32
    else:
        data = data[: len(data) // 2]
    open(path, 'wb').write(bytes(data))
    with pytest.raises((index.IntegrityError, ValueError)):
        index.open(train.path).read(slice(0, 8))
    with pytest.raises((index.IntegrityError, ValueError)):
        pipeline.score(queries, index.open(train.path))


class Crash(Exception):
    pass


def _crash_after_first_commit(event, chunk):
    if event == 'committed' and chunk == 0:
        raise Crash()


def test_resume_after_the_corpus_changed_is_refused(tmp_path):
    feat = fx.featurizer()
    ex = fx.train_examples(20)
    with pytest.raises(Crash):
        fx.build_index(feat, ex, tmp_path / 't', chunk_rows=8, fault_hook=_crash_after_first_commit)
    edited = [dict(e) for e in ex]
    edited[3] = dict(edited[3], tokens=(np.asarray(edited[3]['tokens']) + 1) % fx.CFG.vocab_size)
    with pytest.raises(ValueError, match='changed since it was written'):
        fx.build_index(feat, edited, tmp_path / 't', chunk_rows=8)
    renamed = [dict(e, id=f'other-{i}') for i, e in enumerate(ex)]
    with pytest.raises(ValueError, match='ids_sha256'):
        fx.build_index(feat, renamed, tmp_path / 't', chunk_rows=8)
    # The unchanged corpus resumes to the index an uninterrupted run makes.
    done = fx.build_index(feat, ex, tmp_path / 't', chunk_rows=8)
    ref = fx.build_index(feat, ex, tmp_path / 'ref', chunk_rows=8)
    np.testing.assert_array_equal(done.read(slice(0, 20)), ref.read(slice(0, 20)))


def test_markers_of_another_manifest_never_count(tmp_path):
    """manifest.json deleted, then re-indexed with another seed: every row is rewritten."""
    model, params, state = fx.model_and_state()
    ex = fx.train_examples(20)
    fx.build_index(fx.featurizer(), ex, tmp_path / 't', chunk_rows=8)
    os.remove(tmp_path / 't' / 'manifest.json')
    other = grads.Featurizer(
        model,
        params,
        grads.GradientSpec(block_dim=16, num_layer_blocks=2, seed=11),
        opt_state=state,
    )
    got = fx.build_index(other, ex, tmp_path / 't', chunk_rows=8)
    ref = fx.build_index(other, ex, tmp_path / 'ref', chunk_rows=8)
    np.testing.assert_array_equal(got.read(slice(0, 20)), ref.read(slice(0, 20)))


def test_non_finite_vectors_are_refused_with_their_rows(tmp_path):
    w = index.create(str(tmp_path / 'x'), {}, [f'e{i}' for i in range(4)], dim=3, chunk_rows=4)
    v = np.ones((4, 3), np.float32)
    v[2, 1] = np.nan
    with pytest.raises(ValueError, match=r'rows \[2\]'):
        w.write_chunk(0, v, np.ones(4))
    assert w.committed() == [False]


def test_a_crash_while_saving_a_preconditioner_keeps_the_old_one(built, tmp_path, monkeypatch):
    _, train, queries = built
    old = pipeline.fit(train, queries)
    url = str(tmp_path / 'pre')
    old.save(url)
    new = pipeline.fit(train, None, pipeline.FitConfig(preconditioner='train'))

    def fail(self, key, value, indent=None):
        raise OSError('disk full')

    monkeypatch.setattr(index.Store, 'write_json', fail)
    with pytest.raises(OSError, match='disk full'):
        new.save(url)
    monkeypatch.undo()
    back = preconditioners.load(url)
    assert back.kind == 'mixed' and back.info == old.info
    np.testing.assert_array_equal(back.arrays['r_inv_sqrt'], old.arrays['r_inv_sqrt'])


def test_non_finite_parameters_and_a_fresh_adafactor_state_are_refused():
    import jax
    import optax

    model, params, state = fx.model_and_state()
    fresh = optax.adafactor(1e-2, min_dim_size_to_factor=16).init(params)
    with pytest.raises(ValueError, match='fresh'):
        grads.Featurizer(model, params, fx.SPEC, opt_state=fresh)
    leaves, tree = jax.tree.flatten(params)
    leaves[2] = np.asarray(leaves[2]).copy()
    leaves[2].flat[0] = np.inf
    with pytest.raises(ValueError, match='Non-finite parameters'):
        grads.Featurizer(model, jax.tree.unflatten(tree, leaves), fx.SPEC, opt_state=state)


def test_extreme_norms_are_reported_not_hidden(tmp_path):
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(0, 0.1, 200))
    norms[17] *= 50.0  # a gradient 50x the typical size
    norms[3] = 0.0  # no targets: not an outlier
    ids = [f'e{i}' for i in range(200)]
    found = pipeline.norm_outliers(norms, ids)
    assert [o['id'] for o in found] == ['e17'] and found[0]['z'] > 6
    feat = fx.featurizer()
    idx = fx.build_index(feat, fx.train_examples(20), tmp_path / 't', chunk_rows=8)
    report = __import__('json').load(open(os.path.join(idx.path, 'outliers.json')))
    assert report['statistic'] == 'robust z of log norm' and isinstance(report['outliers'], list)


@pytest.mark.parametrize(
    'content,match',
    [
        (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n', r':2: not UTF-8'),
        (b'{"id": "a", "text": null}\n', 'must be a string'),
        (b'{"id": 7, "text": "x"}\n{"id": "7", "text": "y"}\n', "duplicate example id '7'"),
        (b'{"id": "a", "text": "x"}\n{oops\n', r':2: not JSON'),
    ],
)
def test_bad_corpus_lines_are_named(tmp_path, content, match):
    from trackstar_jax.data import corpus as corpus_lib

    path = tmp_path / 'corpus.jsonl'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        corpus_lib.load_corpus(str(path))


def test_repeated_index_ids_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"repeated: \['7'\]"):
        index.create(str(tmp_path / 'x'), {}, [7, '7', 'a'], dim=2)
