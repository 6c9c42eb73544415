"""The fact-dense training mixture: what it holds, and that it is reproducible."""

import gzip
import json

import pytest

from trackstar_jax.data import corpus as corpus_lib
from trackstar_jax.data import mixture as mixture_lib

SMALL = mixture_lib.FactMixture(num_eval_facts=12, num_heldin_facts=30, num_distractors=40)


@pytest.fixture(scope='module')
def built():
    return mixture_lib.build(SMALL)


def test_eval_facts_are_stated_only_in_their_entailing_passages(built):
    records, facts = built.records, built.eval_facts
    ids = [r['id'] for r in records]
    assert len(ids) == len(set(ids))
    assert len(facts) == 12 and len({f['relation'] for f in facts}) == 3  # round robin
    texts = {r['id']: r['text'] for r in records}
    corpus = {r['id']: r['text'] for r in corpus_lib.load_corpus()}
    statements = [r for r in records if r['id'].startswith(mixture_lib.STATEMENT_PREFIX)]
    assert len(statements) == 30
    for f in facts:
        # Every evaluated fact is stated in its entailing glosses and nowhere else.
        present = [i for i in f['entailing_ids'] if i in corpus]
        statement = f['prompt'] + f['target'] + '.'
        assert present and all(texts[i].endswith(corpus[i]) for i in present)
        assert all(statement in texts[i] for i in present)
        assert sorted(r['id'] for r in records if statement in r['text']) == sorted(present)
    eval_subjects = {f['subject'] for f in facts}
    heldin = {s['id'][len(mixture_lib.STATEMENT_PREFIX) :] for s in statements}
    all_facts = {f['id']: f for f in corpus_lib.load_facts()}
    assert not {all_facts[h]['subject'] for h in heldin} & eval_subjects
    assert built.summary['distractors'] == 40
    assert built.summary['records'] == len(records)


def test_repeats_and_determinism(tmp_path):
    twice = mixture_lib.build(
        mixture_lib.FactMixture(num_eval_facts=6, num_heldin_facts=5, num_distractors=5, repeats=2)
    )
    ids = [r['id'] for r in twice.records]
    assert len(ids) == len(set(ids)) and sum(i.endswith('#1') for i in ids) == len(ids) // 2
    assert [p['id'] for p in twice.passages] == sorted(i for i in ids if '#' not in i)
    a = mixture_lib.write(str(tmp_path), SMALL)
    first = open(a['corpus'], 'rb').read()
    b = mixture_lib.write(str(tmp_path), SMALL)  # same config: the files are kept as they are
    assert a == b and open(b['corpus'], 'rb').read() == first
    with gzip.open(a['facts'], 'rt') as f:
        assert len([json.loads(line) for line in f]) == 12
    with pytest.raises(ValueError, match='holds another mixture'):
        mixture_lib.write(str(tmp_path), mixture_lib.FactMixture(num_eval_facts=13))
