"""Pod inputs: an ArrayRecord corpus through grain, read only where a row is featurized."""

import json

import numpy as np
import pytest
from array_record.python import array_record_module

from tests import pipeline_fixtures as fx
from trackstar_jax.data import examples as examples_lib
from trackstar_jax.data import sources

TEXTS = [f'The {w} is number {i} of the list.' for i, w in enumerate('abcdefghijklm')]


class CountingSource:
    """A random-access source that counts the records read."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.inner[i]


@pytest.fixture(scope='module')
def array_record(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('ar') / 'passages.array_record')
    writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
    for t in TEXTS:
        writer.write(json.dumps({'text': t}).encode())
    writer.close()
    return path


class CharTokenizer:
    """Characters mod the tiny model's vocabulary (ids 1..63; 0 is the document start)."""

    eos_id = 0

    def encode(self, texts):
        return [[1 + ord(c) % 63 for c in t] for t in texts]


def test_array_record_corpus_is_read_only_where_featurized(array_record, tmp_path):
    import grain.python as grain

    tok = CharTokenizer()
    counting = CountingSource(grain.ArrayRecordDataSource([array_record]))
    src = sources.record_source(counting, tok, fx.SEQ_LEN, name='passages.array_record')
    assert len(src) == 13 and src.ids[4] == 'passages.array_record:000000004'
    assert counting.reads == []  # ids need no reads
    rows = src.rows(4, 8)
    assert sorted(counting.reads) == [4, 5, 6, 7]  # only the rows asked for
    want = examples_lib.corpus_examples(
        [{'id': src.ids[i], 'text': TEXTS[i]} for i in range(4, 8)], tok, fx.SEQ_LEN
    )
    for got, ref in zip(rows, want, strict=True):
        assert got['id'] == ref['id']
        np.testing.assert_array_equal(got['tokens'], ref['tokens'])

    # The job's path (grain's own source) into an index: the vectors of the same
    # passages given as already tokenised examples.
    feat = fx.featurizer()
    whole = sources.array_record_source(array_record, tok, fx.SEQ_LEN)
    got = fx.build_index(feat, whole, tmp_path / 'a', chunk_rows=4)
    assert got.ids == whole.ids and whole.rows_made == 13
    ref = examples_lib.corpus_examples(
        [{'id': whole.ids[i], 'text': t} for i, t in enumerate(TEXTS)], tok, fx.SEQ_LEN
    )
    ref = fx.build_index(feat, ref, tmp_path / 'b', chunk_rows=4)
    np.testing.assert_array_equal(got.read(slice(0, 13)), ref.read(slice(0, 13)))


def test_bad_records_are_refused():
    class Broken:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return json.dumps({'body': 'x'}).encode()

    src = sources.record_source(Broken(), CharTokenizer(), 8, name='b')
    with pytest.raises(KeyError, match="no 'text' field"):
        src.rows(0, 2)
    with pytest.raises(ValueError, match='ids'):
        sources.record_source(Broken(), None, 8, name='b', ids=['only-one'])


def test_seqio_task_corpus_has_stable_ids_and_the_same_vectors(tmp_path):
    """A real seqio Task over a text file made here, indexed through its source."""
    import seqio

    lines = [f'line {i} says {w}' for i, w in enumerate('pqrstuv')]
    path = tmp_path / 'lines.txt'
    path.write_text('\n'.join(lines) + '\n')
    name = 'trackstar_test_lines'
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.TextLineDataSource({'train': str(path)}),
        preprocessors=[lambda ds: ds.map(lambda line: {'text': line})],
        output_features={},
    )
    tok = CharTokenizer()
    src = sources.seqio_source(name, tok, fx.SEQ_LEN)
    assert src.ids == [f'{name}:train:{i:09d}' for i in range(7)]
    assert sources.seqio_source(name, tok, fx.SEQ_LEN).ids == src.ids  # stable
    part = src.rows(2, 5)
    assert [e['id'] for e in part] == src.ids[2:5] and src.rows_made == 3
    feat = fx.featurizer()
    got = fx.build_index(feat, sources.seqio_source(name, tok, fx.SEQ_LEN), tmp_path / 'a', 4)
    ref = examples_lib.corpus_examples(
        [{'id': src.ids[i], 'text': t} for i, t in enumerate(lines)], tok, fx.SEQ_LEN
    )
    ref = fx.build_index(feat, ref, tmp_path / 'b', chunk_rows=4)
    assert got.ids == ref.ids
    np.testing.assert_array_equal(got.read(slice(0, 7)), ref.read(slice(0, 7)))
