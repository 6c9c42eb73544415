"""Corpus inputs for pods: grain data sources (ArrayRecord, any random-access source) and
seqio Tasks.

Each becomes an :class:`~trackstar_jax.data.examples.ExampleSource`: every id is known
up front (for the index's ``ids.json``), but a record is read and tokenised only when
the process that featurizes its row asks for it, so on a pod each host reads only its
share of the corpus (``pipeline.featurize`` gives process p the chunks p, p + P, ...,
the same partition ``grain``'s ``ShardByJaxProcess`` makes by contiguous ranges).

Ids are stable without reading the corpus: by default a record's id is its source name
and position (``'shard.array_record:000000042'``), which is stable as long as the files
are; pass ``ids`` to use your own (e.g. from an ids file written with the data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trackstar_jax.data import examples as examples_lib


def _decode(record: Any) -> Mapping[str, Any]:
    """A record as a mapping: JSON bytes/str are parsed, mappings pass through."""
    if isinstance(record, (bytes, bytearray)):
        record = record.decode('utf-8')
    if isinstance(record, str):
        return json.loads(record)
    if isinstance(record, Mapping):
        return record
    raise TypeError(f'Cannot read a record of type {type(record).__name__}.')


def record_source(
    data_source: Any,
    tokenizer: Any,
    seq_len: int,
    *,
    name: str,
    text_key: str = 'text',
    ids: Sequence[str] | None = None,
    decode: Callable[[Any], Mapping[str, Any]] = _decode,
) -> examples_lib.ExampleSource:
    """Passage examples of a random-access source (``len`` and integer indexing).

    Args:
      data_source: e.g. ``grain.sources.ArrayRecordDataSource(paths)``.
      tokenizer: the model's tokenizer.
      seq_len: passages are cut to this many tokens.
      name: the source's name in positional ids.
      text_key: the field holding the passage text.
      ids: one id per record (default: ``f'{name}:{index:09d}'``).
      decode: record -> mapping (default: JSON bytes or a mapping).
    """
    n = len(data_source)
    ids = [f'{name}:{i:09d}' for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f'{len(ids)} ids for {n} records of {name}.')

    def make(start: int, stop: int) -> list[dict[str, Any]]:
        if hasattr(data_source, '__getitems__'):
            records = data_source.__getitems__(list(range(start, stop)))
        else:
            records = [data_source[i] for i in range(start, stop)]
        texts = []
        for i, rec in zip(range(start, stop), records, strict=True):
            fields = decode(rec)
            if text_key not in fields:
                raise KeyError(f'Record {i} of {name} has no {text_key!r} field.')
            texts.append({'id': ids[i], 'text': fields[text_key]})
        return examples_lib.corpus_examples(texts, tokenizer, seq_len)

    return examples_lib.ExampleSource(ids, make)


def array_record_source(
    paths: str | Sequence[str], tokenizer: Any, seq_len: int, *, text_key: str = 'text'
) -> examples_lib.ExampleSource:
    """Passages from ArrayRecord files of JSON records (``{"text": ...}``), via grain.

    ``paths``: one path, a comma-separated list, or a sequence (local or ``gs://``).
    Needs ``pip install trackstar_jax[grain]``.
    """
    try:
        import grain.python as grain
    except ImportError as e:
        raise ImportError('ArrayRecord corpora need grain: pip install trackstar_jax[grain]') from e
    if isinstance(paths, str):
        paths = [p for p in paths.split(',') if p]
    paths = sorted(paths)
    source = grain.ArrayRecordDataSource(list(paths))
    name = os.path.basename(paths[0]) if len(paths) == 1 else f'{os.path.basename(paths[0])}+'
    return record_source(source, tokenizer, seq_len, name=name, text_key=text_key)


def seqio_source(
    task: str,
    tokenizer: Any,
    seq_len: int,
    *,
    split: str = 'train',
    text_key: str = 'text',
) -> examples_lib.ExampleSource:
    """Passages of a registered seqio Task or Mixture (``pip install trackstar_jax[seqio]``).

    The dataset is read in its deterministic order (no shuffling, one epoch), so the
    ids ``f'{task}:{split}:{index:09d}'`` are the same in every run and on every host.
    seqio datasets are sequential: every host counts the examples once and streams past
    the rows of other hosts without tokenising them (grain/ArrayRecord, which reads only
    a host's own records, is the input to prefer on pods).

    Args:
      task: the registered Task or Mixture name.
      tokenizer: the model's tokenizer (applied to the raw ``text_key`` field).
      seq_len: passages are cut to this many tokens.
      split: the dataset split.
      text_key: the feature holding the passage text (bytes or str).
    """
    import seqio  # noqa: PLC0415 - TensorFlow only when a seqio corpus is used

    provider = seqio.get_mixture_or_task(task)

    def dataset():
        return provider.get_dataset(
            sequence_length=None, split=split, shuffle=False, num_epochs=1, use_cached=False
        )

    n = int(dataset().reduce(0, lambda count, _: count + 1).numpy())
    ids = [f'{task}:{split}:{i:09d}' for i in range(n)]
    state = {'it': None, 'pos': 0}

    def make(start: int, stop: int) -> list[dict[str, Any]]:
        if state['it'] is None or start < state['pos']:
            state['it'], state['pos'] = dataset().as_numpy_iterator(), 0
        texts = []
        for ex in state['it']:
            i = state['pos']
            state['pos'] += 1
            if i >= start:
                text = ex[text_key]
                texts.append(
                    {'id': ids[i], 'text': text.decode() if isinstance(text, bytes) else text}
                )
            if state['pos'] >= stop:
                break
        return examples_lib.corpus_examples(texts, tokenizer, seq_len)

    return examples_lib.ExampleSource(ids, make)
