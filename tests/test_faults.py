"""Faults and bad inputs: each a clear error or a correct result, never a silent wrong one."""

import glob
import os

import numpy as np
import pytest

from tests import pipeline_fixtures as fx
from trackstar_jax import grads, index, pipeline, preconditioners
from trackstar_jax.data import examples as examples_lib

fault = pytest.mark.fault  # (fault, behaviour): one row of the README's reliability table


@pytest.fixture()
def built(tmp_path):
    feat = fx.featurizer()
    train = fx.build_index(feat, fx.train_examples(20), tmp_path / 'train', chunk_rows=8)
    queries = fx.build_index(feat, fx.query_examples(4), tmp_path / 'queries', chunk_rows=8)
    return feat, train, queries


def _chunk_files(path):
    return sorted(glob.glob(os.path.join(path, 'vectors', 'c', '*', '*')))


@fault(
    'A deleted index chunk file',
    'IntegrityError naming the chunk on read; fit and score refuse (never zeros)',
)
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


@pytest.mark.parametrize(
    'damage',
    [
        pytest.param(
            d, marks=fault(f'Index chunk file {what}', 'IntegrityError on read; score refuses')
        )
        for d, what in (
            ('flip', 'with one bit flipped'),
            ('ff', 'with 0xFF bytes'),
            ('truncate', 'cut short'),
        )
    ],
)
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


@fault(
    'An index written when markers recorded sha256 (before CRC-32)',
    'Opens and is verified with the checksum its markers name',
)
def test_markers_written_with_sha256_are_still_verified(built):
    """Indices written before markers recorded CRC-32 still open and are still checked."""
    import hashlib
    import json

    _, train, _ = built
    progress = os.path.join(train.path, 'progress')
    vectors = train.read(slice(0, 20))
    for name in sorted(os.listdir(progress)):
        path = os.path.join(progress, name)
        marker = json.load(open(path))
        start, stop = marker['rows']
        digest = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:24]
        marker['sha256'] = {
            'vectors': digest(vectors[start:stop]),
            'norms': digest(train.norms()[start:stop]),
            'num_targets': digest(train.num_targets()[start:stop]),
        }
        del marker['crc32']
        json.dump(marker, open(path, 'w'))
    again = index.open(train.path)
    np.testing.assert_array_equal(again.read(slice(0, 20)), vectors)
    np.testing.assert_array_equal(again.norms(), train.norms())
    data = bytearray(open(_chunk_files(train.path)[1], 'rb').read())
    data[len(data) // 2] ^= 0x01
    open(_chunk_files(train.path)[1], 'wb').write(bytes(data))
    with pytest.raises(index.IntegrityError, match='chunk 1'):
        index.open(train.path).read(slice(0, 20))


class Crash(Exception):
    pass


def _crash_after_first_commit(event, chunk):
    if event == 'committed' and chunk == 0:
        raise Crash()


@fault(
    'Corpus edited (tokens or ids) between a kill and the resume',
    'Refused, naming the chunk and its first id; the unchanged corpus resumes to the '
    'uninterrupted index',
)
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


@fault(
    'manifest.json deleted, then re-indexed with another seed',
    'Old progress markers never count: every row is rewritten, equal to a fresh build',
)
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


@fault('NaN/Inf feature vectors', 'Refused at write, naming the rows; the chunk stays uncommitted')
def test_non_finite_vectors_are_refused_with_their_rows(tmp_path):
    w = index.create(str(tmp_path / 'x'), {}, [f'e{i}' for i in range(4)], dim=3, chunk_rows=4)
    v = np.ones((4, 3), np.float32)
    v[2, 1] = np.nan
    with pytest.raises(ValueError, match=r'rows \[2\]'):
        w.write_chunk(0, v, np.ones(4))
    assert w.committed() == [False]


@fault(
    'Disk full while saving a preconditioner', 'The old preconditioner stays readable and verified'
)
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


@fault(
    'Non-finite parameters, or a fresh (step-0) Adafactor state (V = 0)',
    'Refused when the Featurizer is built, saying what to pass instead',
)
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


@fault(
    'An example with an extreme gradient norm',
    'Reported in outliers.json (robust z of log norm > 6) and the log',
)
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
        pytest.param(
            b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n',
            r':2: not UTF-8',
            marks=fault('A corpus line that is not UTF-8', 'Error naming the file and line'),
            id='not-utf8',
        ),
        pytest.param(
            b'{"id": "a", "text": null}\n',
            'must be a string',
            marks=fault('`"text": null` in the corpus', 'Error naming the file and line'),
            id='text-null',
        ),
        pytest.param(
            b'{"id": 7, "text": "x"}\n{"id": "7", "text": "y"}\n',
            "duplicate example id '7'",
            marks=fault('Corpus ids 7 and "7"', 'Error naming the duplicate id'),
            id='ids-7-and-str-7',
        ),
        pytest.param(
            b'{"id": "a", "text": "x"}\n{oops\n',
            r':2: not JSON',
            marks=fault('A corpus line that is not JSON', 'Error naming the file and line'),
            id='not-json',
        ),
    ],
)
def test_bad_corpus_lines_are_named(tmp_path, content, match):
    from trackstar_jax.data import corpus as corpus_lib

    path = tmp_path / 'corpus.jsonl'
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        corpus_lib.load_corpus(str(path))


@fault('Repeated example ids (including 7 vs "7")', 'Refused, naming them')
def test_repeated_index_ids_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"repeated: \['7'\]"):
        index.create(str(tmp_path / 'x'), {}, [7, '7', 'a'], dim=2)


# --- stored artefacts other than the index -------------------------------------------


def _preconditioner_files(url):
    return sorted(
        p
        for p in glob.glob(os.path.join(url, 'arrays_*', '**'), recursive=True)
        if os.path.isfile(p) and '/c/' in p
    )


@pytest.mark.parametrize(
    'damage',
    [
        pytest.param(
            'delete',
            marks=fault(
                'A deleted preconditioner array file',
                'IntegrityError on load (TensorStore would read zeros: every score 0.0)',
            ),
        ),
        pytest.param(
            'flip',
            marks=fault('A changed byte in a preconditioner array', 'IntegrityError on load'),
        ),
    ],
)
def test_a_damaged_preconditioner_is_refused(built, tmp_path, damage):
    _, train, queries = built
    url = pipeline.fit(train, queries).save(str(tmp_path / 'pre'))
    target = next(p for p in _preconditioner_files(url) if 'r_inv_sqrt' in p)
    if damage == 'delete':
        os.remove(target)
    else:
        data = bytearray(open(target, 'rb').read())
        data[len(data) // 2] ^= 0x10
        open(target, 'wb').write(bytes(data))
    with pytest.raises(index.IntegrityError, match='r_inv_sqrt'):
        preconditioners.load(url)
    with pytest.raises(index.IntegrityError):
        pipeline.score(queries, train, url)


@fault(
    'A results file (scores.jsonl, results.json) changed, or its write interrupted',
    'Written with a sha256 beside it; read_checked / ScoreResult.from_jsonl refuse a mismatch '
    'or a missing checksum',
)
def test_results_files_are_verified_on_read(built, tmp_path):
    _, train, queries = built
    out = str(tmp_path / 'scores.jsonl')
    res = pipeline.score(queries, train, None, pipeline.ScoreConfig(k=3), out_path=out)
    back = pipeline.ScoreResult.from_jsonl(out)
    assert back.query_ids == res.query_ids and back.ids == res.ids
    np.testing.assert_array_equal(back.rows, res.rows)
    np.testing.assert_array_equal(back.scores, res.scores)
    assert os.system(f'cd {tmp_path} && sha256sum -c --quiet scores.jsonl.sha256') == 0
    text = open(out).read()
    open(out, 'w').write(text.replace('"rank": 1,', '"rank": 1, ', 1))  # one byte more
    with pytest.raises(index.IntegrityError, match='does not match its checksum'):
        pipeline.ScoreResult.from_jsonl(out)
    os.remove(out + '.sha256')
    with pytest.raises(index.IntegrityError, match='no checksum'):
        index.read_checked(out)


@fault(
    'Estimated second moments (V) changed or cut short on disk',
    'Refused on load, naming the file; re-estimate',
)
def test_damaged_second_moments_are_refused(tmp_path):
    import optax

    from trackstar_jax.grads import second_moments

    _, _, state = fx.model_and_state()
    moments = next(s for s in jax_leaves_of(state) if isinstance(s, optax.FactoredState))
    second_moments.save_moments(str(tmp_path), moments, {'note': 'test'})
    got, meta = second_moments.load_moments(str(tmp_path))
    assert meta['note'] == 'test'
    np.testing.assert_array_equal(
        np.asarray(got.v_row['final_norm']['scale']),
        np.asarray(moments.v_row['final_norm']['scale']),
    )
    npz = os.path.join(str(tmp_path), second_moments.MOMENTS_DIR, 'moments.npz')
    data = bytearray(open(npz, 'rb').read())
    open(npz, 'wb').write(bytes(data[: len(data) - 7]))
    with pytest.raises(RuntimeError, match='does not match the checksum'):
        second_moments.load_moments(str(tmp_path))


def jax_leaves_of(tree):
    """Every node of an optax state (namedtuples included)."""
    out = [tree]
    if isinstance(tree, tuple):
        for child in tree:
            out += jax_leaves_of(child)
    return out


# --- settings that used to fail late or silently --------------------------------------


@fault('Score with k > the rows of the index', 'All N rows, in the exact order (a warning)')
def test_k_larger_than_the_index_returns_every_row(tmp_path):
    feat = fx.featurizer()
    train = fx.build_index(feat, fx.train_examples(5), tmp_path / 't', chunk_rows=8)
    queries = fx.build_index(feat, fx.query_examples(2), tmp_path / 'q', chunk_rows=8)
    got = pipeline.score(queries, train, None, pipeline.ScoreConfig(k=9, unit_norm=False))
    q, t = queries.read(slice(0, 2)).astype(np.float64), train.read(slice(0, 5)).astype(np.float64)
    brute = np.argsort(-(q @ t.T), axis=1, kind='stable')
    assert got.rows.shape == (2, 5) and all(r != '' for row in got.ids for r in row)
    np.testing.assert_array_equal(got.rows, brute)


@fault(
    "IndexConfig.seq_len > the model's max_len",
    'Refused before anything is written; the corrected run then builds normally',
)
def test_seq_len_beyond_the_model_is_refused_before_writing(tmp_path):
    feat = fx.featurizer()
    with pytest.raises(ValueError, match="exceeds the model's max_len 16"):
        fx.build_index(feat, fx.train_examples(5), tmp_path / 's', chunk_rows=8, seq_len=32)
    assert not os.path.exists(tmp_path / 's')
    fx.build_index(feat, fx.train_examples(5), tmp_path / 's', chunk_rows=8)


@fault(
    'An index left with a manifest but no committed chunk, re-run with other settings',
    'Replaced (nothing to keep; a warning); with committed chunks it is refused',
)
def test_an_index_with_nothing_committed_is_replaced_by_a_corrected_run(tmp_path):
    url = str(tmp_path / 'x')
    index.create(url, {'seq_len': 32}, ['a', 'b'], dim=3, chunk_rows=2)
    w = index.create(url, {'seq_len': 16}, ['a', 'b'], dim=4, chunk_rows=2)
    w.write_chunk(0, np.ones((2, 4)), np.ones(2))
    assert w.finish().manifest['seq_len'] == 16
    with pytest.raises(ValueError, match='other settings'):
        index.create(url, {'seq_len': 8}, ['a', 'b'], dim=4, chunk_rows=2)


@fault('A truncated manifest.json', 'IntegrityError naming the file (open and resume)')
def test_a_truncated_manifest_names_the_file(built, tmp_path):
    feat, train, _ = built
    path = os.path.join(train.path, 'manifest.json')
    text = open(path).read()
    open(path, 'w').write(text[: len(text) // 2])
    with pytest.raises(index.IntegrityError, match='manifest.json'):
        index.open(train.path)
    with pytest.raises(index.IntegrityError, match='manifest.json'):
        fx.build_index(feat, fx.train_examples(20), train.path, chunk_rows=8)


@fault(
    'Two jobs with different settings writing one index at once',
    'The writer whose manifest was replaced stops before committing, saying why',
)
def test_a_racing_writer_with_other_settings_stops(tmp_path):
    url = str(tmp_path / 'x')
    mine = index.create(url, {'seed': 1}, ['a', 'b', 'c'], dim=2, chunk_rows=2)
    mine.write_chunk(0, np.ones((2, 2)), np.ones(2))
    # What the other job's create does when it wins the race: its manifest replaces ours.
    other = dict(mine.manifest, seed=2)
    index.Store(url).write_json('manifest.json', other)
    with pytest.raises(RuntimeError, match='another writer'):
        mine.write_chunk(1, np.ones((1, 2)), np.ones(1))


@fault(
    'Flax LogicallyPartitioned (boxed) params and optimizer state',
    'Accepted: both unboxed consistently; features equal the unboxed ones',
)
def test_boxed_params_and_optimizer_state_are_accepted():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    model = fx.DecoderLM(fx.CFG)
    boxed = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    assert any(
        isinstance(x, nn.LogicallyPartitioned)
        for x in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    )
    tx = optax.adafactor(1e-2, min_dim_size_to_factor=16)
    grad = jax.tree.map(lambda x: jnp.full_like(x, 0.1), boxed)
    _, state = tx.update(grad, tx.init(boxed), boxed)  # one step: V is defined
    ex = fx.train_examples(4)
    batch = examples_lib.pad_batch(ex, 4, 16)
    got = grads.Featurizer(model, boxed, fx.SPEC, opt_state=state).local(batch)
    plain = grads.Featurizer(model, nn.unbox(boxed), fx.SPEC, opt_state=nn.unbox(state))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(plain.local(batch)))


# --- checkpoints and imports ------------------------------------------------------------


@pytest.fixture()
def saved_checkpoint(tmp_path):
    from trackstar_jax import checkpoint

    _, params, _ = fx.model_and_state()
    directory = str(tmp_path / 'ckpt')
    checkpoint.save(checkpoint.manager(directory), 1, {'params': params}, {'model': 'tiny'})
    return directory, params


def _restore(directory, params):
    from trackstar_jax import checkpoint
    from trackstar_jax import sharding as shd

    mesh = shd.make_mesh((('data', -1), ('model', 1)))
    tree = {'params': params}
    return checkpoint.restore(
        directory, checkpoint.abstract_like(tree, checkpoint.replicated_like(tree, mesh))
    )


@pytest.mark.parametrize(
    'damage',
    [
        pytest.param(
            d,
            marks=fault(
                f'An Orbax checkpoint with {what}',
                'CheckpointError naming the checkpoint and step, and the other steps',
            ),
        )
        for d, what in (
            ('delete', 'a data file deleted'),
            ('truncate', 'a data file cut short'),
            ('flip', 'one byte of array data changed'),
            ('config', 'its config cut short'),
        )
    ],
)
def test_a_damaged_checkpoint_is_a_clear_error(saved_checkpoint, damage):
    from trackstar_jax import checkpoint

    directory, params = saved_checkpoint
    state, _, _ = _restore(directory, params)  # intact: restores, fingerprint verified
    np.testing.assert_array_equal(
        np.asarray(state['params']['final_norm']['scale']),
        np.asarray(params['final_norm']['scale']),
    )
    data = sorted(
        glob.glob(os.path.join(directory, '1', 'state', 'ocdbt.process_0', 'd', '*')),
        key=os.path.getsize,
    )[-1]
    if damage == 'delete':
        os.remove(data)
    elif damage == 'truncate':
        open(data, 'r+b').truncate(os.path.getsize(data) // 2)
    elif damage == 'flip':  # zstd-compressed data decodes to other numbers: Orbax passes it
        raw = bytearray(open(data, 'rb').read())
        raw[len(raw) // 2] ^= 0x01
        open(data, 'wb').write(bytes(raw))
    else:
        open(os.path.join(directory, '1', 'config', 'metadata'), 'r+b').truncate(10)
    with pytest.raises(checkpoint.CheckpointError, match=r'ckpt step 1'):
        _restore(directory, params)


@fault(
    'A checkpoint_dir with no checkpoint (e.g. an import not yet run)',
    'FileNotFoundError saying how to train or import one; nothing is created',
)
def test_a_missing_checkpoint_says_how_to_make_one(tmp_path):
    from trackstar_jax import sharding as shd
    from trackstar_jax.jobs import common

    where = str(tmp_path / 'runs' / 'smollm2_135m')
    with pytest.raises(FileNotFoundError, match='import_checkpoint.py --output=.*smollm2_135m'):
        common.load_model(where, shd.make_mesh((('data', -1), ('model', 1))))
    assert not os.path.exists(where)


@pytest.mark.parametrize(
    'cut',
    [
        pytest.param(
            c, marks=fault(f'A GGUF file {what}', 'ValueError naming the file and its size')
        )
        for c, what in (
            ('half', 'cut in half'),
            ('header', 'cut inside its header'),
            ('empty', 'of 0 bytes'),
        )
    ],
)
def test_a_truncated_gguf_names_the_file(tmp_path, cut):
    from tests import test_llama as tl
    from trackstar_jax.models import gguf_import

    cfg, quantize = tl.GGUF_SHAPES['tied_q8']
    path = tmp_path / 'model.gguf'
    tl.write_gguf(path, cfg, tl.random_hf_weights(cfg, seed=2), quantize)
    data = path.read_bytes()
    path.write_bytes(data[: {'half': len(data) // 2, 'header': 300, 'empty': 0}[cut]])
    with pytest.raises(ValueError, match=r'model.gguf .*(not a complete GGUF|cut short)'):
        gguf_import.read_gguf(str(path))


@fault(
    'Resuming training with another model shape',
    'ValueError naming each setting that differs (saved vs now)',
)
def test_resuming_training_with_another_model_is_refused(tmp_path):
    import dataclasses

    import gin

    from trackstar_jax import train
    from trackstar_jax.jobs import train_lm

    cfg = dataclasses.replace(fx.CFG, vocab_size=4096)
    tc = train.TrainConfig(
        seq_len=16,
        batch_size=8,
        num_steps=1,
        warmup_steps=1,
        min_dim_size_to_factor=16,
        checkpoint_every=1,
        log_every=1,
    )
    with gin.unlock_config():
        train_lm.train_lm(
            workdir=str(tmp_path), model_config=cfg, train_config=tc, max_documents=40
        )
    wider = dataclasses.replace(cfg, d_model=48)
    with pytest.raises(ValueError, match=r'model.d_model: 32 saved, 48 now'):
        train_lm.train_lm(
            workdir=str(tmp_path),
            model_config=wider,
            train_config=dataclasses.replace(tc, num_steps=2),
            max_documents=40,
        )


@pytest.mark.parametrize(
    'facts',
    [
        pytest.param(
            [], marks=fault('An empty facts file', 'ValueError before any work'), id='empty'
        ),
        pytest.param(
            [{'id': 'f', 'prompt': 'p', 'target': ' t', 'entailing_ids': ['not-in-corpus']}],
            marks=fault('No fact with an entailing id in the corpus', 'ValueError before any work'),
            id='none-entailed',
        ),
    ],
)
def test_no_usable_fact_is_an_error(facts):
    from trackstar_jax.eval import fact_tracing

    with pytest.raises(ValueError, match='No fact has an entailing passage'):
        fact_tracing.prepare_data(
            [{'id': 'd', 'text': 'x'}], facts, None, fact_tracing.EvalConfig()
        )


FIT_SCORE_WORKER = os.path.join(os.path.dirname(__file__), 'workers', 'fit_score_kill_worker.py')


def _fit_score(workdir, kind, kill_at):
    import subprocess
    import sys

    env = {
        **os.environ,
        'PYTHONPATH': os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        'JAX_COMPILATION_CACHE_DIR': os.path.join(os.path.dirname(workdir), 'jax_cache'),
        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
        'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
    }
    env.pop('XLA_FLAGS', None)
    return subprocess.run(
        [sys.executable, FIT_SCORE_WORKER, workdir, kind, str(kill_at)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _outputs(workdir):
    """(preconditioner arrays, scores) as stored; an error for scores that are refused."""
    pre = preconditioners.load(os.path.join(workdir, 'preconditioner'))
    try:
        scores = pipeline.ScoreResult.from_jsonl(os.path.join(workdir, 'scores.jsonl'))
        scores = (scores.ids, scores.scores.tolist())
    except index.IntegrityError as e:
        scores = e
    return (pre.kind, {k: v.tolist() for k, v in pre.arrays.items()}), scores


@fault(
    'SIGKILL during the fit job, the preconditioner save or the score job',
    'The old preconditioner and scores stay readable and verified (or scores whose write was '
    'cut are refused); the re-run gives the uninterrupted result',
)
def test_sigkill_in_fit_save_or_score_loses_nothing(tmp_path):
    import shutil

    old = str(tmp_path / 'old')
    first = _fit_score(old, 'train', -1)  # a finished run with another preconditioner
    assert first.returncode == 0, first.stderr[-3000:]
    ref = str(tmp_path / 'ref')
    shutil.copytree(old, ref)
    done = _fit_score(ref, 'mixed', -1)
    assert done.returncode == 0, done.stderr[-3000:]
    events = done.stdout.strip().splitlines()[-1].removeprefix('EVENTS ').split('|')
    old_out, new_out = _outputs(old), _outputs(ref)
    assert old_out != new_out
    # Kill points: the first array write, before the switch to the new arrays, right
    # after it (old arrays not yet deleted), between scores.jsonl and its checksum.
    points = [
        0,
        events.index('preconditioner.json'),
        events.index('preconditioner.json') + 1,
        events.index('scores.jsonl') + 1,
    ]
    for kill_at in points:
        work = str(tmp_path / f'killed_{kill_at}')
        shutil.copytree(old, work)
        killed = _fit_score(work, 'mixed', kill_at)
        assert killed.returncode == -9, (kill_at, events, killed.stderr[-2000:])
        pre, scores = _outputs(work)
        assert pre in (old_out[0], new_out[0]), (kill_at, events[kill_at])
        assert isinstance(scores, index.IntegrityError) or scores in (old_out[1], new_out[1])
        again = _fit_score(work, 'mixed', -1)
        assert again.returncode == 0, again.stderr[-3000:]
        assert _outputs(work) == new_out, (kill_at, events[kill_at])
