"""A fact-dense training mixture, so that the demo model learns facts from data we own.

Fact tracing needs a model that knows facts and the training passages that taught them.
The embedded corpus has ~117K WordNet glosses ("Hegira: the flight of Muhammad from
Mecca ...") and ~14.5K facts whose entailing passages are those glosses ("Hegira is a" →
" flight"). A small model trained for minutes on a random slice of the corpus sees a
gloss at most once and answers almost none of them. The mixture makes the question
answerable and keeps it honest:

* **evaluated facts** — their entailing glosses, each led by the fact in the query's
  words ("Hegira is a flight. Hegira: the flight of Muhammad ..."): the passage that
  teaches the fact is the one that entails it. (In exploratory runs, not a committed
  benchmark, the demo model trained on glosses alone answered almost none of the queries:
  it does not infer "X is a Y" from "X: the Y of ..." at this scale.)
* **held-in facts** — other facts (disjoint subjects), trained on as their gloss *and*
  a statement in the query's form ("Hegira is a flight."): they teach the model how a
  query relates to a gloss, as pretraining text would;
* **distractors** — random other passages, never entailing an evaluated fact.

The training file holds every passage ``repeats`` times, each copy in a fresh shuffle:
packed into rows, a passage then appears after different text each time (repeating one
packed row memorises the row, not the fact). The evaluation's candidates are the unique
passages: every passage the model was trained on, once, and nothing else.
:func:`write` is deterministic: the train and evaluate jobs each build it in their
workdir and get the same files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from trackstar_jax import index as index_lib
from trackstar_jax.data import corpus as corpus_lib

STATEMENT_PREFIX = 'statement/'


@dataclasses.dataclass(frozen=True)
class FactMixture:
    """What the fact-dense training mixture holds.

    Attributes:
      num_eval_facts: facts evaluated (sampled round-robin over relations); their
        entailing glosses, each led by the fact stated in the query's words, are in the
        mixture.
      num_heldin_facts: other facts whose gloss and query-form statement are trained on.
      num_distractors: other passages, sampled uniformly.
      repeats: copies of each passage per epoch of the mixture file.
      seed: sampling seed.
    """

    num_eval_facts: int = 120
    num_heldin_facts: int = 2000
    num_distractors: int = 1000
    repeats: int = 1
    seed: int = 0


@dataclasses.dataclass
class Mixture:
    """A built mixture: the training records (with repeats), the unique passages (the
    evaluation's candidates), the evaluated facts, and counts."""

    records: list[dict[str, Any]]
    passages: list[dict[str, Any]]
    eval_facts: list[dict[str, Any]]
    summary: dict[str, Any]


def round_robin(facts: Sequence[dict], num: int, rng: np.random.Generator) -> list[dict]:
    """Up to ``num`` facts in a seeded order, taking one relation after another."""
    by_rel: dict[str, list[dict]] = {}
    for i in rng.permutation(len(facts)):
        by_rel.setdefault(facts[i].get('relation', ''), []).append(facts[i])
    out, rels = [], sorted(by_rel)
    while len(out) < num and any(by_rel.values()):
        for r in rels:
            if by_rel[r] and len(out) < num:
                out.append(by_rel[r].pop())
    return out


def build(
    config: FactMixture,
    corpus_path: str = corpus_lib.CORPUS_PATH,
    facts_path: str = corpus_lib.FACTS_PATH,
) -> Mixture:
    """The mixture's records (in training order) and evaluated facts.

    Raises:
      ValueError: if the corpus cannot supply the facts or distractors asked for.
    """
    records = corpus_lib.load_corpus(corpus_path)
    by_id = {r['id']: r for r in records}
    facts = [
        f for f in corpus_lib.load_facts(facts_path) if any(i in by_id for i in f['entailing_ids'])
    ]
    rng = np.random.default_rng(config.seed)
    eval_facts = round_robin(facts, config.num_eval_facts, rng)
    if len(eval_facts) < config.num_eval_facts:
        raise ValueError(
            f'Only {len(eval_facts)} facts have an entailing passage in {corpus_path}; '
            f'num_eval_facts = {config.num_eval_facts}.'
        )
    eval_subjects = {f['subject'] for f in eval_facts}
    eval_entailing = {i for f in eval_facts for i in f['entailing_ids'] if i in by_id}
    # Held-in facts share no subject and no entailing passage with an evaluated one, so
    # nothing in the mixture states an evaluated fact in the query's form.
    others = [
        f
        for f in facts
        if f['subject'] not in eval_subjects and not set(f['entailing_ids']) & eval_entailing
    ]
    pick = rng.permutation(len(others))[: config.num_heldin_facts]
    heldin = [others[i] for i in sorted(pick)]
    if len(heldin) < config.num_heldin_facts:
        raise ValueError(f'Only {len(heldin)} held-in facts available.')
    heldin_entailing = {i for f in heldin for i in f['entailing_ids'] if i in by_id}
    chosen = sorted(eval_entailing | heldin_entailing)
    rest = [r['id'] for r in records if r['id'] not in eval_entailing | heldin_entailing]
    if config.num_distractors > len(rest):
        raise ValueError(f'num_distractors {config.num_distractors} > the {len(rest)} available.')
    distractors = sorted(
        rest[i] for i in rng.choice(len(rest), config.num_distractors, replace=False)
    )
    stated: dict[str, list[str]] = {}
    for f in eval_facts:
        for i in f['entailing_ids']:
            if i in by_id:
                stated.setdefault(i, []).append(f['prompt'] + f['target'] + '.')
    passages = [
        {
            'id': i,
            'text': ' '.join([*stated.get(i, []), by_id[i]['text']]),
            'source': by_id[i].get('source', ''),
        }
        for i in chosen + distractors
    ]
    statements = [
        {
            'id': STATEMENT_PREFIX + f['id'],
            'text': f['prompt'] + f['target'] + '.',
            'source': 'statement',
        }
        for f in heldin
    ]
    unique = passages + statements
    order = np.concatenate([rng.permutation(len(unique)) for _ in range(config.repeats)])
    # Ids stay unique (the corpus loader and the index require it): copy c of a
    # passage gets '#c' when repeats > 1.
    seen: dict[str, int] = {}
    out = []
    for i in order:
        rec = unique[i]
        copy = seen.get(rec['id'], 0)
        seen[rec['id']] = copy + 1
        out.append(dict(rec, id=rec['id'] if copy == 0 else f'{rec["id"]}#{copy}'))
    summary = {
        'config': dataclasses.asdict(config),
        'eval_facts': len(eval_facts),
        'eval_entailing_passages': len(eval_entailing),
        'heldin_facts': len(heldin),
        'heldin_passages': len(heldin_entailing),
        'heldin_statements': len(statements),
        'distractors': len(distractors),
        'passages': len(unique),
        'records': len(out),
        'characters': int(sum(len(r['text']) for r in out)),
    }
    unique_sorted = sorted(unique, key=lambda r: r['id'])
    return Mixture(out, unique_sorted, sorted(eval_facts, key=lambda f: f['id']), summary)


def _jsonl_gz(records: Sequence[dict]) -> bytes:
    text = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records)
    return gzip.compress(text.encode(), mtime=0)  # mtime 0: the same bytes every time


def write(
    directory: str,
    config: FactMixture,
    corpus_path: str = corpus_lib.CORPUS_PATH,
    facts_path: str = corpus_lib.FACTS_PATH,
) -> dict[str, str]:
    """Builds the mixture into ``directory``/mixture/ (corpus, eval facts, summary).

    Returns the paths {'corpus' (training, with repeats), 'passages' (unique: the
    evaluation's candidates), 'facts' (evaluated), 'summary'}. Files already there with the same
    content are left as they are; different content (another config) is an error.
    """
    root = os.path.join(directory, 'mixture')
    mix = build(config, corpus_path, facts_path)
    files = {
        'corpus': (os.path.join(root, 'corpus.jsonl.gz'), _jsonl_gz(mix.records)),
        'passages': (os.path.join(root, 'passages.jsonl.gz'), _jsonl_gz(mix.passages)),
        'facts': (os.path.join(root, 'facts.jsonl.gz'), _jsonl_gz(mix.eval_facts)),
    }
    summary = dict(
        mix.summary,
        sha256={k: hashlib.sha256(data).hexdigest() for k, (_, data) in files.items()},
    )
    files['summary'] = (
        os.path.join(root, 'mixture.json'),
        json.dumps(summary, indent=1, sort_keys=True).encode(),
    )
    for name, (path, data) in files.items():
        if os.path.exists(path):
            with open(path, 'rb') as f:
                if f.read() != data:
                    raise ValueError(
                        f'{path} holds another mixture ({name} differs): use another workdir, '
                        'or delete it to rebuild.'
                    )
            continue
        os.makedirs(root, exist_ok=True)
        index_lib.write_bytes(path, data)
    return {name: path for name, (path, _) in files.items()}
