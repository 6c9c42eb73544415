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
