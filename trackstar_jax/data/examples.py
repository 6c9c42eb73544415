"""Corpus passages and fact queries as examples under the loss convention.

A passage is ``[eos] + tokens(text)``: the EOS stands in for the context that precedes
a document in packed pretraining, so every text token is a target. A query is
``[eos] + tokens(prompt) + tokens(target)`` with only the target tokens masked in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trackstar_jax.data.corpus import Tokenizer


def passage_example(
    example_id: str, text: str, tokenizer: Tokenizer, seq_len: int
) -> dict[str, Any]:
    """A training example: every token after the leading EOS is a target (truncated)."""
    tokens = [tokenizer.eos_id, *tokenizer.encode(text)][:seq_len]
    mask = np.ones(len(tokens), np.float32)
    mask[0] = 0.0
    return {'id': example_id, 'tokens': np.asarray(tokens, np.int32), 'loss_mask': mask}


def query_example(
    example_id: str, prompt: str, target: str, tokenizer: Tokenizer, seq_len: int
) -> dict[str, Any]:
    """A query: prompt tokens are context, target tokens are the completion.

    Raises:
      ValueError: if the target is empty or prompt + target exceed seq_len.
    """
    prompt_ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    target_ids = tokenizer.encode(target)
    if not target_ids:
        raise ValueError(f'Query {example_id!r} has an empty target.')
    tokens = prompt_ids + target_ids
    if len(tokens) > seq_len:
        raise ValueError(f'Query {example_id!r} has {len(tokens)} tokens > seq_len {seq_len}.')
    mask = np.zeros(len(tokens), np.float32)
    mask[len(prompt_ids) :] = 1.0
    return {
        'id': example_id,
        'tokens': np.asarray(tokens, np.int32),
        'loss_mask': mask,
        'prompt_len': len(prompt_ids),
    }


def corpus_examples(
    records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, seq_len: int
) -> list[dict[str, Any]]:
    """Passage examples for corpus records {"id", "text"}."""
    texts = [r['text'] for r in records]
    encoded = tokenizer.encode(texts) if texts else []
    out = []
    for rec, ids in zip(records, encoded, strict=True):
        tokens = [tokenizer.eos_id, *ids][:seq_len]
        mask = np.ones(len(tokens), np.float32)
        mask[0] = 0.0
        out.append(
            {'id': str(rec['id']), 'tokens': np.asarray(tokens, np.int32), 'loss_mask': mask}
        )
    return out


def fact_queries(
    facts: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, seq_len: int
) -> list[dict[str, Any]]:
    """Query examples for facts {"id", "prompt", "target"}."""
    return [
        query_example(str(f['id']), f['prompt'], f['target'], tokenizer, seq_len) for f in facts
    ]


def bucket_length(longest: int, max_len: int, minimum: int = 16) -> int:
    """``longest`` rounded up to a power of two (>= ``minimum``), capped at ``max_len``.

    Batches padded to their longest example rather than to ``max_len`` make short
    examples cost their length; rounding to powers of two keeps the number of distinct
    shapes, hence jit compiles, small.
    """
    return min(max_len, max(minimum, 1 << (max(longest, 1) - 1).bit_length()))


def pad_batch(
    examples: Sequence[Mapping[str, Any]], num_rows: int, length: int
) -> dict[str, np.ndarray]:
    """{'tokens' int32, 'loss_mask' float32} [num_rows, length]; padding rows and tails are 0.

    Raises:
      ValueError: if an example is longer than ``length``, its mask and tokens differ in
        length, or there are more examples than rows.
    """
    if len(examples) > num_rows:
        raise ValueError(f'{len(examples)} examples do not fit in {num_rows} rows.')
    tokens = np.zeros((num_rows, length), np.int32)
    mask = np.zeros((num_rows, length), np.float32)
    for i, ex in enumerate(examples):
        t = np.asarray(ex['tokens'], np.int32)
        m = np.asarray(ex['loss_mask'], np.float32)
        if len(t) > length or len(m) != len(t):
            raise ValueError(
                f'Example {ex.get("id")!r}: {len(t)} tokens / {len(m)} mask '
                f'entries; need equal lengths <= {length}.'
            )
        tokens[i, : len(t)] = t
        mask[i, : len(m)] = m
    return {'tokens': tokens, 'loss_mask': mask}


def length_groups(
    keys: Sequence[Any],
    examples: Mapping[Any, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    rows: int,
    max_len: int,
    *,
    bucket: bool = True,
):
    """(keys of a group, its batch) for consecutive groups of ``rows`` of ``keys``.

    Each batch has exactly ``rows`` rows, so one jitted function serves every group: a
    short last group is filled by repeating its first example (computed and dropped by
    the caller; a repeat, not an all-zero row, because a row with no target tokens has
    no mean loss). With ``bucket`` a batch is padded to its longest example's
    power-of-two bucket (:func:`bucket_length`: few shapes compile, and short examples
    cost their length when ``keys`` are in length order); without it, to ``max_len``.

    Args:
      keys: the examples to batch, in the order to batch them.
      examples: ``examples[key]`` is a {'tokens', 'loss_mask'} record.
      rows: rows per batch.
      max_len: the longest padded length.
      bucket: pad to a power-of-two bucket rather than to ``max_len``.
    """
    if rows < 1:
        raise ValueError(f'rows must be >= 1, got {rows}.')
    for s in range(0, len(keys), rows):
        group = keys[s : s + rows]
        made = [examples[key] for key in group]
        longest = max(len(r['tokens']) for r in made)
        length = bucket_length(longest, max_len) if bucket else max_len
        yield group, pad_batch(made + [made[0]] * (rows - len(made)), rows, length)


class ExampleSource:
    """Examples made on demand: every id up front, tokens only for the rows asked for.

    A job of P processes indexes its rows only (``pipeline.featurize`` asks each process
    for its own chunks), so with a source each host tokenises only its share of the
    corpus. ``rows_made`` counts the rows this process has built.
    """

    def __init__(self, ids: Sequence[str], make: Any):
        """``make(start, stop)`` returns the examples of rows [start, stop)."""
        self.ids = [str(i) for i in ids]
        self._make = make
        self.rows_made = 0

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        """The examples of rows [start, stop)."""
        stop = min(stop, len(self.ids))
        if stop <= start:
            return []
        out = list(self._make(start, stop))
        if [str(ex['id']) for ex in out] != self.ids[start:stop]:
            raise ValueError(f'Source rows [{start}, {stop}) do not carry their ids.')
        self.rows_made += len(out)
        return out


def as_source(examples: Sequence[Mapping[str, Any]] | ExampleSource) -> ExampleSource:
    """A source over ``examples`` (already made examples are served as they are)."""
    if isinstance(examples, ExampleSource):
        return examples
    examples = list(examples)
    return ExampleSource([ex['id'] for ex in examples], lambda a, b: examples[a:b])


def corpus_source(
    records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, seq_len: int
) -> ExampleSource:
    """Passage examples of corpus records, tokenised only when a process asks for them."""
    return ExampleSource(
        [r['id'] for r in records],
        lambda a, b: corpus_examples(records[a:b], tokenizer, seq_len),
    )
