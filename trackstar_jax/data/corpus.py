"""The embedded default corpus, its fact set and its SentencePiece tokenizer.

Built by ``scripts/build_corpus.py`` from packages (see ``embedded/PROVENANCE.md``):

* ``corpus.jsonl.gz`` — one example per line: ``{"id", "source", "title", "text"}``;
  Wikipedia passages (``wiki/<page>/<k>``) then WordNet glosses (``wn/<pos>/<offset>``).
* ``facts.jsonl.gz`` — WordNet fact triples with the ids of the examples that entail
  them: ``{"id", "relation", "subject", "object", "prompt", "target", "entailing_ids",
  ...}``.
* ``spm.model`` — a SentencePiece unigram model (pad 0, eos 1, unk 2, no bos).

The same JSONL formats are how users bring their own corpus and facts.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import sentencepiece as spm

EMBEDDED_DIR = os.path.join(os.path.dirname(__file__), 'embedded')
CORPUS_PATH = os.path.join(EMBEDDED_DIR, 'corpus.jsonl.gz')
FACTS_PATH = os.path.join(EMBEDDED_DIR, 'facts.jsonl.gz')
TOKENIZER_PATH = os.path.join(EMBEDDED_DIR, 'spm.model')

REQUIRED_CORPUS_KEYS = ('id', 'text')


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """Yields the records of a JSONL file (gzip if the name ends in .gz).

    Raises:
      ValueError: naming the file and line of a line that is not UTF-8 or not JSON.
    """
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError as e:
                raise ValueError(
                    f'{path}:{line_no}: not UTF-8 (at byte {e.start} of the line); '
                    're-encode the file as UTF-8.'
                ) from e
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f'{path}:{line_no}: not JSON: {e}') from e


def load_corpus(
    path: str = CORPUS_PATH, sources: Sequence[str] | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Corpus examples, in file order.

    Args:
      path: a JSONL(.gz) file of ``{"id", "text", ...}`` records.
      sources: keep only records whose "source" is one of these.
      limit: keep at most this many (after filtering).

    Raises:
      ValueError: on a record without id/text or a duplicate id.
    """
    out, seen = [], set()
    for rec in read_jsonl(path):
        missing = [k for k in REQUIRED_CORPUS_KEYS if k not in rec]
        if missing:
            raise ValueError(f'{path}: record {rec!r:.200} lacks {missing}.')
        if not isinstance(rec['text'], str):
            raise ValueError(
                f'{path}: record {rec["id"]!r} has text {rec["text"]!r:.40} (must be a string).'
            )
        # Ids are compared as the index stores them, as strings: 7 and "7" collide.
        if str(rec['id']) in seen:
            raise ValueError(
                f'{path}: duplicate example id {rec["id"]!r} (ids are compared as strings).'
            )
        seen.add(str(rec['id']))
        if sources is None or rec.get('source') in sources:
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    return out


def load_facts(path: str = FACTS_PATH) -> list[dict[str, Any]]:
    """The fact set: records with prompt, target and entailing_ids."""
    facts = list(read_jsonl(path))
    for f in facts:
        for k in ('id', 'prompt', 'target', 'entailing_ids'):
            if k not in f:
                raise ValueError(f'{path}: fact {f!r:.200} lacks {k!r}.')
        if not isinstance(f['entailing_ids'], list):
            raise ValueError(
                f'{path}: fact {f["id"]!r} has entailing_ids {f["entailing_ids"]!r:.80}; '
                'it must be a list of passage ids, e.g. ["doc-17"].'
            )
    return facts


class Tokenizer:
    """A thin SentencePiece wrapper with the ids the models assume (pad 0, eos 1)."""

    def __init__(self, model_path: str = TOKENIZER_PATH):
        if not os.path.exists(model_path):
            raise FileNotFoundError(f'No SentencePiece model at {model_path}.')
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """Padding id."""
        return max(self._sp.pad_id(), 0)

    @property
    def eos_id(self) -> int:
        """End-of-sequence id."""
        return self._sp.eos_id()

    def encode(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
        """Token ids of one text or of each text in a list."""
        return self._sp.encode(text if isinstance(text, str) else list(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a list of ids."""
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
    """A ``tokenizers`` tokenizer (e.g. rebuilt from a GGUF file) with ``Tokenizer``'s API.

    ``eos_id`` is the *document separator* the examples put before every passage and
    query (for SmolLM2, ``<|endoftext|>``), so that the loss convention is the same as for
    the embedded SentencePiece model. No special tokens are added by ``encode``.

    Args:
      path: a ``tokenizer.json``.
      document_id: the id that starts a document.
      pad_id: the padding id (defaults to ``document_id``; padding is masked out anyway).
    """

    def __init__(self, path: str, document_id: int, pad_id: int | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        if not os.path.exists(path):
            raise FileNotFoundError(f'No tokenizer.json at {path}.')
        self.model_path = path
        self._tok = _Tokenizer.from_file(path)
        if not 0 <= document_id < self._tok.get_vocab_size():
            raise ValueError(f'document_id {document_id} is outside the vocabulary.')
        self._document_id = int(document_id)
        self._pad_id = int(document_id if pad_id is None else pad_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids (added tokens included)."""
        return self._tok.get_vocab_size()

    @property
    def pad_id(self) -> int:
        """Padding id."""
        return self._pad_id

    @property
    def eos_id(self) -> int:
        """The document separator."""
        return self._document_id

    def encode(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
        """Token ids of one text or of each text in a list (no special tokens added)."""
        if isinstance(text, str):
            return self._tok.encode(text, add_special_tokens=False).ids
        return [e.ids for e in self._tok.encode_batch(list(text), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a list of ids."""
        return self._tok.decode([int(i) for i in ids])
