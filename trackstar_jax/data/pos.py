"""A rough part-of-speech tag for every token, from what ships offline.

The support-samples analyses split tokens by the POS of the word they belong to (the
paper "roughly annotates" them with a tagger). No tagger ships offline, so this module
tags *words out of context* by rules, in order:

1. punctuation (no letter or digit) -> ``PUNCT``; digits or a number word -> ``NUM``;
2. English closed-class words (determiners, adpositions, pronouns, conjunctions,
   auxiliaries, particles: the short lists below) -> their Universal POS tag;
3. open-class words by WordNet: the lemmas of the embedded corpus's WordNet glosses
   (one per synset, its POS in the example id ``wn/<pos>/<offset>``), reached through
   WordNet's own suffix-detachment rules ("morphy": ``cats`` -> ``cat``,
   ``running`` -> ``run``); a word with lemmas in several POS takes the one with most
   synsets (ties: NOUN, VERB, ADJ, ADV);
4. anything else -> ``PROPN`` when capitalised, else ``X``.

A word with a clitic takes its host's tag (``didn't`` -> ``did`` -> AUX, ``Paris's`` ->
``Paris``).

Out of context the tags are a word's most common class, not its class in the sentence
("can" is always AUX, "run" always VERB): good enough to compare groups of thousands of
tokens, not for any single token. A subword token gets the tag of the word it starts or
continues.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

# Universal POS tags used here.
NOUN, VERB, ADJ, ADV = 'NOUN', 'VERB', 'ADJ', 'ADV'
OPEN_CLASS = (NOUN, VERB, ADJ, ADV)
WORDNET_POS = {'n': NOUN, 'v': VERB, 'a': ADJ, 's': ADJ, 'r': ADV}

CLOSED_CLASS: dict[str, str] = {
    **dict.fromkeys(
        'the a an this that these those every each some any no all both either neither '
        'another such which whose'.split(),
        'DET',
    ),
    **dict.fromkeys(
        'of in to for with on at by from about as into like through after over between '
        'against during without before under around among upon within along across behind '
        'beyond toward towards via per than despite throughout onto unto amid near since '
        'until till'.split(),
        'ADP',
    ),
    **dict.fromkeys(
        'i me you he him she it we us they them my mine your yours his her hers its our '
        'ours their theirs myself yourself himself herself itself ourselves themselves who '
        'whom what something anything nothing everything someone anyone everyone nobody'.split(),
        'PRON',
    ),
    **dict.fromkeys('and or but nor yet'.split(), 'CCONJ'),
    **dict.fromkeys('if because although though while whereas unless whether'.split(), 'SCONJ'),
    **dict.fromkeys(
        'be is am are was were been being have has had having do does did will would shall '
        'should can could may might must'.split(),
        'AUX',
    ),
    **dict.fromkeys(['not', "n't", "'s", "'"], 'PART'),
}
CONTRACTED_HOSTS = {'ca': 'can', 'wo': 'will', 'sha': 'shall'}
NUMBER_WORDS = frozenset(
    'one two three four five six seven eight nine ten eleven twelve thirteen fourteen '
    'fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy '
    'eighty ninety hundred thousand million billion trillion'.split()
)

# WordNet's detachment rules (morph.c): (suffix, ending) per POS.
MORPHY_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    NOUN: (
        ('s', ''),
        ('ses', 's'),
        ('xes', 'x'),
        ('zes', 'z'),
        ('ches', 'ch'),
        ('shes', 'sh'),
        ('men', 'man'),
        ('ies', 'y'),
    ),  # fmt: skip
    VERB: (
        ('s', ''),
        ('ies', 'y'),
        ('es', 'e'),
        ('es', ''),
        ('ed', 'e'),
        ('ed', ''),
        ('ing', 'e'),
        ('ing', ''),
    ),  # fmt: skip
    ADJ: (('er', ''), ('est', ''), ('er', 'e'), ('est', 'e')),
    ADV: (),
}

# A word: letters (with an inner apostrophe part), a number, or one other character.
WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+(?:[.,]\d+)*|'[^\W\d_]+|[^\w\s]")


class Lexicon:
    """Synset counts of lemmas by POS: ``counts[lemma][POS]``."""

    def __init__(self, counts: Mapping[str, Mapping[str, int]]):
        self.counts = {w: dict(c) for w, c in counts.items()}

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, str]]) -> Lexicon:
        """From WordNet gloss records (``id`` ``wn/<pos>/<offset>``, ``title`` the lemma);
        other records are ignored, and so are multi-word lemmas."""
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for rec in records:
            parts = str(rec.get('id', '')).split('/')
            if len(parts) != 3 or parts[0] != 'wn' or parts[1] not in WORDNET_POS:
                continue
            lemma = str(rec.get('title', '')).lower()
            if lemma and ' ' not in lemma and '_' not in lemma:
                counts[lemma][WORDNET_POS[parts[1]]] += 1
        return cls(counts)

    @classmethod
    def embedded(cls) -> Lexicon:
        """From the embedded corpus's WordNet glosses."""
        from trackstar_jax.data import corpus

        return cls.from_records(corpus.load_corpus(sources=('wordnet',)))

    def lemma_pos(self, word: str) -> str | None:
        """The open-class POS of a lower-cased word by WordNet (module docstring, rule 3),
        or None when no lemma of it is known."""
        votes: collections.Counter = collections.Counter()
        for pos in OPEN_CLASS:
            forms = {word}
            for suf, end in MORPHY_RULES[pos]:
                if word.endswith(suf) and len(word) > len(suf):
                    stem = word[: -len(suf)]
                    forms.add(stem + end)
                    if not end and len(stem) > 2 and stem[-1] == stem[-2]:
                        forms.add(stem[:-1])  # running -> run (WordNet's exception lists)
            votes[pos] = max((self.counts.get(f, {}).get(pos, 0) for f in forms), default=0)
        best = max(OPEN_CLASS, key=lambda p: (votes[p], -OPEN_CLASS.index(p)))
        return best if votes[best] > 0 else None


def word_tag(word: str, lexicon: Lexicon) -> str:
    """The rough tag of one word (module docstring, rules 1-4)."""
    if not any(ch.isalnum() for ch in word):
        return 'PUNCT'
    low = word.lower()
    if "'" in low[1:]:  # a clitic: tag the host word (didn't -> did, Muhammad's -> Muhammad)
        host = low[:-3] if low.endswith("n't") else low[: low.index("'", 1)]
        host = CONTRACTED_HOSTS.get(host, host)
        return word_tag(word[: len(host)] if host == low[: len(host)] else host, lexicon)
    if any(ch.isdigit() for ch in word) or low in NUMBER_WORDS:
        return 'NUM'
    if low in CLOSED_CLASS:
        return CLOSED_CLASS[low]
    pos = lexicon.lemma_pos(low)
    if pos is not None:
        return pos
    return 'PROPN' if word[0].isupper() else 'X'


def token_tags(
    tokens: Sequence[int], decode: Callable[[Sequence[int]], str], lexicon: Lexicon
) -> list[str]:
    """The tag of every token of one sequence: that of the first word its text touches.

    Token t's text is the span between the lengths of ``decode(tokens[:t])`` and
    ``decode(tokens[:t + 1])``; a token with no text of its own (a bare space, a special
    token) is tagged ``X``.
    """
    text = decode(tokens)
    words = [(m.start(), m.end(), m.group()) for m in WORD_RE.finditer(text)]
    tags, prev, w = [], 0, 0
    for t in range(len(tokens)):
        end = min(len(decode(tokens[: t + 1])), len(text))
        while w < len(words) and words[w][1] <= prev:
            w += 1  # words wholly before this token's text
        if w < len(words) and words[w][0] < end:
            tags.append(word_tag(words[w][2], lexicon))
        else:
            tags.append('X')
        prev = max(prev, end)
    return tags
