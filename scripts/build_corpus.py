"""Rebuild the embedded default corpus, fact-tracing set and tokenizer of trackstar_jax.

The embedded data lets the package run an end-to-end attribution demo without any
download at run time. Everything is rebuilt deterministically from two pinned packages:

* the English Wikipedia sample shipped as test data inside the ``gensim`` wheel
  (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``);
* WordNet 3.0 as installed by the Debian package ``wordnet-base`` (``/usr/share/wordnet``).

Outputs (all under ``--out``):

* ``corpus.jsonl.gz``: Wikipedia passages (by page id, passage index), then one example per
  WordNet synset gloss (by POS n, v, a (incl. satellites), r, then offset).
* ``facts.jsonl.gz``: part_of / member_of / instance_of triples from WordNet noun pointers,
  kept only when the subject's gloss mentions the object, with the ids of entailing examples.
* ``spm.model``: SentencePiece unigram tokenizer (T5 id convention) trained on the corpus.
* ``stats.json`` and ``PROVENANCE.md``.

gensim is only used as a *data source* (its wheel is read as a zip file); it is never imported,
so it does not become a dependency of the package.

Example:
    python scripts/build_corpus.py --out trackstar_jax/data/embedded \\
        --gensim-wheel auto --wordnet-dir /usr/share/wordnet
"""

from __future__ import annotations

import argparse
import bz2
import collections
import gzip
import hashlib
import html
import io
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

GENSIM_VERSION = '4.4.0'
WIKI_MEMBER = (
    'gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
)
MAX_PASSAGE_WORDS = 120
# Paragraphs shorter than this are usually leftovers of removed markup (captions, stubs).
MIN_PARAGRAPH_WORDS = 5
# Pages whose cleaned text is shorter than this are disambiguation stubs or near-empty.
MIN_PAGE_WORDS = 50

# WordNet data file suffix -> POS letter used in example ids. Satellite adjectives ('s') live
# in data.adj and share its offset space, so they keep the file's letter 'a'.
WN_FILES = (('noun', 'n'), ('verb', 'v'), ('adj', 'a'), ('adv', 'r'))

# Pointer symbol (on the subject noun synset) -> relation name.
FACT_POINTERS = {'#p': 'part_of', '#m': 'member_of', '@i': 'instance_of'}
RELATION_ORDER = ('part_of', 'member_of', 'instance_of')

SPM_VOCAB_SIZE = 4096
SPM_SEED = 0

# Sections whose content is citations or link lists, not prose.
DROP_SECTIONS = {
    'references',
    'notes',
    'footnotes',
    'citations',
    'sources',
    'bibliography',
    'further reading',
    'external links',
    'see also',
    'notes and references',
    'references and notes',
    'works cited',
    'selected bibliography',
    'primary sources',
    'secondary sources',
}

# Tags whose *content* is not prose (formulae, galleries, code...) and is dropped entirely.
DROP_TAG_CONTENT = (
    'ref',
    'math',
    'gallery',
    'timeline',
    'imagemap',
    'score',
    'chem',
    'ce',
    'hiero',
    'syntaxhighlight',
    'source',
    'pre',
    'graph',
    'mapframe',
    'references',
    'noinclude',
)

# Link namespaces that are not inline prose (images, categories, interlanguage links).
DROP_LINK_RE = re.compile(
    r'^\s*:?\s*(file|image|media|category|wikt|wiktionary|s|q|commons|[a-z]{2,3}(-[a-z]+)?)\s*:',
    re.IGNORECASE,
)
# A lemma match is "whole word": the lemma's word-tokens appear consecutively in the text.
WORD_RE = re.compile(r'\w+')
SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")


# --------------------------------------------------------------------------------------------
# Wikipedia
# --------------------------------------------------------------------------------------------


def fetch_gensim_wheel(spec: str, workdir: Path) -> Path:
    """Returns a local gensim wheel, downloading the pinned version with pip if asked.

    Args:
        spec: Path to a wheel, or ``"auto"`` to run ``pip download`` for the pinned version.
        workdir: Scratch directory for the download.

    Returns:
        Path of the wheel file.
    """
    if spec != 'auto':
        return Path(spec)
    # pip is the ordinary client for PyPI; --no-deps keeps it to the one wheel we read.
    subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'download',
            f'gensim=={GENSIM_VERSION}',
            '--no-deps',
            '--only-binary=:all:',
            '-d',
            str(workdir),
        ],
        check=True,
    )
    wheels = sorted(workdir.glob('gensim-*.whl'))
    if not wheels:
        raise FileNotFoundError('pip download did not produce a gensim wheel')
    return wheels[0]


def read_wiki_dump(wheel: Path) -> tuple[bytes, str]:
    """Reads the bzip2-compressed Wikipedia XML sample out of the gensim wheel.

    Args:
        wheel: Path of the gensim wheel (a zip archive).

    Returns:
        The decompressed XML bytes and the wheel's version string.
    """
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(WIKI_MEMBER)
        version = 'unknown'
        for name in zf.namelist():
            if name.endswith('.dist-info/METADATA'):
                meta = zf.read(name).decode('utf-8')
                match = re.search(r'^Version:\s*(\S+)', meta, re.MULTILINE)
                version = match.group(1) if match else version
    return bz2.decompress(raw), version


@dataclass
class WikiPage:
    """One main-namespace article of the dump."""

    page_id: int
    title: str
    wikitext: str


def iter_wiki_pages(xml_bytes: bytes) -> Iterator[tuple[int, str, int, bool, str]]:
    """Yields ``(page_id, title, ns, is_redirect, wikitext)`` for every page of the dump."""
    for _, elem in ET.iterparse(io.BytesIO(xml_bytes), events=('end',)):
        if elem.tag.rsplit('}', 1)[-1] != 'page':
            continue
        fields: dict[str, str] = {}
        redirect = False
        for child in elem.iter():
            tag = child.tag.rsplit('}', 1)[-1]
            if tag == 'redirect':
                redirect = True
            # The first <id> under <page> is the page id; later ones are revision/contributor.
            if tag in ('title', 'ns', 'id', 'text') and tag not in fields:
                fields[tag] = child.text or ''
        text = fields.get('text', '')
        redirect = redirect or text.lstrip().upper().startswith('#REDIRECT')
        yield int(fields['id']), fields.get('title', ''), int(fields.get('ns', 0)), redirect, text
        elem.clear()


def _strip_balanced(text: str, opener: str, closer: str) -> str:
    """Removes (possibly nested) ``opener ... closer`` spans; unbalanced openers are dropped."""
    out: list[str] = []
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        if text.startswith(opener, i):
            depth += 1
            i += len(opener)
        elif depth and text.startswith(closer, i):
            depth -= 1
            i += len(closer)
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return ''.join(out)


def _replace_links(text: str) -> str:
    """Resolves ``[[target|label]]`` links (nested inside captions too) to their label.

    File/Image/Category and interlanguage links are dropped with their whole (nested) content,
    which a flat regex cannot do because captions contain links themselves.
    """
    out: list[str] = []
    stack: list[list[str]] = []
    i = 0
    n = len(text)
    while i < n:
        if text.startswith('[[', i):
            stack.append([])
            i += 2
        elif stack and text.startswith(']]', i):
            inner = ''.join(stack.pop())
            i += 2
            if DROP_LINK_RE.match(inner):
                resolved = ''
            else:
                # [[a|b]] -> b ; [[a]] -> a ; [[a|]] (pipe trick) -> a without "(...)".
                target, _, label = inner.partition('|')
                if '|' in label:  # Unusual multi-pipe links: the last part is the label.
                    label = label.rsplit('|', 1)[-1]
                if not label:
                    label = re.sub(r'\s*\(.*\)$', '', target) if inner.endswith('|') else target
                resolved = label.lstrip(':')
            (stack[-1] if stack else out).append(resolved)
        else:
            (stack[-1] if stack else out).append(text[i])
            i += 1
    # Unclosed links: keep their text rather than losing prose.
    for part in stack:
        out.append(''.join(part))
    return ''.join(out)


def clean_wikitext(text: str) -> list[str]:
    """Converts MediaWiki markup to plain-text paragraphs.

    Args:
        text: Raw wikitext of one article (XML entities already decoded by the parser).

    Returns:
        Cleaned paragraphs in document order, without headings, lists of links, citations,
        tables, templates or reference sections.
    """
    text = text.replace('\r', '')
    text = re.sub(r'<!--.*?(-->|$)', '', text, flags=re.DOTALL)
    tags = '|'.join(DROP_TAG_CONTENT)
    text = re.sub(rf'<({tags})\b[^>]*/>', '', text, flags=re.IGNORECASE)
    text = re.sub(rf'<({tags})\b[^>]*>.*?</\1\s*>', '', text, flags=re.IGNORECASE | re.DOTALL)
    # Templates first (they may contain '|}' which would confuse table stripping).
    text = _strip_balanced(text, '{{', '}}')
    text = _strip_balanced(text, '{|', '|}')
    text = _replace_links(text)
    # External links: [url label] -> label ; bare [url] -> nothing.
    text = re.sub(r'\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]', r'\1', text)
    text = re.sub(r'\[(?:https?:)?//[^\]]*\]', '', text)
    text = re.sub(r'https?://\S+', '', text)
    text = re.sub(r"'{2,}", '', text)
    text = re.sub(r'<br\s*/?>', ' ', text, flags=re.IGNORECASE)
    text = re.sub(r'</?[A-Za-z][^>]*>', '', text)
    text = re.sub(r'__[A-Z]+__', '', text)
    text = html.unescape(text).replace('\xa0', ' ').replace('\u200b', '')

    paragraphs: list[str] = []
    current: list[str] = []
    skipping = False

    def flush() -> None:
        if current:
            para = _tidy(' '.join(current))
            if len(para.split()) >= MIN_PARAGRAPH_WORDS:
                paragraphs.append(para)
            current.clear()

    for line in text.split('\n'):
        stripped = line.strip()
        heading = re.match(r'^(=+)\s*(.*?)\s*\1$', stripped)
        if heading:
            flush()
            # A dropped section ends at the next heading of any level (good enough here:
            # reference sections are at the end and have no prose subsections).
            skipping = heading.group(2).strip().lower() in DROP_SECTIONS
            continue
        if skipping:
            continue
        if not stripped:
            flush()
            continue
        if stripped[0] in '*#:;|!':
            # List items and definition lines: each is its own paragraph if it is prose-like.
            flush()
            current.append(stripped.lstrip('*#:;|! '))
            flush()
            continue
        current.append(stripped)
    flush()
    return paragraphs


def _tidy(text: str) -> str:
    """Collapses whitespace and removes debris left where markup was removed."""
    text = re.sub(r'\s+', ' ', text)
    # "( )", "(; )", "(, ; )": brackets emptied by template/ref removal.
    text = re.sub(r'\(\s*[,;:]*\s*\)', '', text)
    text = re.sub(r'\(\s*[,;:]\s*', '(', text)
    text = re.sub(r'\s+([,.;:!?)])', r'\1', text)
    text = re.sub(r'([(])\s+', r'\1', text)
    text = re.sub(r',\s*,', ',', text)
    text = re.sub(r'\s+', ' ', text)
    return text.strip()


def split_sentences(paragraph: str) -> list[str]:
    """Splits a paragraph at sentence ends (punctuation followed by a capital or digit)."""
    return [s for s in SENTENCE_SPLIT_RE.split(paragraph) if s]


def pack_passages(paragraphs: Sequence[str], max_words: int = MAX_PASSAGE_WORDS) -> list[str]:
    """Greedily packs paragraphs into passages of at most ``max_words`` words.

    Paragraphs longer than the limit are split at sentence boundaries; only a single sentence
    longer than the limit is cut mid-sentence (at a word boundary).

    Args:
        paragraphs: Cleaned paragraphs of one article.
        max_words: Word budget per passage.

    Returns:
        Passage texts; paragraphs within a passage are joined by newlines.
    """
    # Units are (text, starts_new_paragraph).
    units: list[tuple[str, bool]] = []
    for para in paragraphs:
        if len(para.split()) <= max_words:
            units.append((para, True))
            continue
        first = True
        for sent in split_sentences(para):
            words = sent.split()
            for start in range(0, len(words), max_words):
                units.append((' '.join(words[start : start + max_words]), first))
                first = False

    passages: list[str] = []
    buf = ''
    buf_words = 0
    for unit, new_para in units:
        n = len(unit.split())
        if buf and buf_words + n > max_words:
            passages.append(buf)
            buf, buf_words = '', 0
        if buf:
            buf += ('\n' if new_para else ' ') + unit
        else:
            buf = unit
        buf_words += n
    if buf:
        passages.append(buf)
    return passages


def build_wiki_examples(xml_bytes: bytes) -> tuple[list[dict], dict[str, int]]:
    """Turns the dump into passage examples, ordered by page id then passage index."""
    counts = collections.Counter()
    pages: list[WikiPage] = []
    for page_id, title, ns, redirect, text in iter_wiki_pages(xml_bytes):
        counts['pages_total'] += 1
        if ns != 0:
            counts['pages_skipped_non_article'] += 1
        elif redirect:
            counts['pages_skipped_redirect'] += 1
        else:
            pages.append(WikiPage(page_id, title, text))
    examples: list[dict] = []
    for page in sorted(pages, key=lambda p: p.page_id):
        paragraphs = clean_wikitext(page.wikitext)
        if sum(len(p.split()) for p in paragraphs) < MIN_PAGE_WORDS:
            counts['pages_skipped_near_empty'] += 1
            continue
        counts['pages_used'] += 1
        for k, passage in enumerate(pack_passages(paragraphs)):
            examples.append(
                {
                    'id': f'wiki/{page.page_id}/{k}',
                    'source': 'wikipedia',
                    'title': page.title,
                    'text': passage,
                }
            )
    counts['passages'] = len(examples)
    return examples, dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------
# WordNet
# --------------------------------------------------------------------------------------------


@dataclass
class Synset:
    """One WordNet synset as parsed from a ``data.*`` file."""

    pos: str  # File POS letter used in ids: n, v, a, r.
    ss_type: str  # n, v, a, s, r.
    offset: str  # 8-digit byte offset, kept as the zero-padded string WordNet uses.
    lemmas: list[str]  # Underscores replaced by spaces, syntactic markers removed.
    pointers: list[tuple[str, str, str]] = field(default_factory=list)  # (symbol, off, pos).
    gloss: str = ''

    @property
    def example_id(self) -> str:
        """Id of this synset's gloss example in the corpus."""
        return f'wn/{self.pos}/{self.offset}'


def parse_wordnet_file(path: Path, pos: str) -> list[Synset]:
    """Parses one ``data.<pos>`` file (format wndb(5WN)).

    Args:
        path: Path of the data file.
        pos: POS letter used in example ids.

    Returns:
        Synsets in file (= offset) order.
    """
    synsets: list[Synset] = []
    with path.open('r', encoding='utf-8') as f:
        for line in f:
            # The licence header lines start with two spaces.
            if line.startswith(' '):
                continue
            data, _, gloss = line.partition(' | ')
            fields = data.split()
            offset, ss_type = fields[0], fields[2]
            w_cnt = int(fields[3], 16)
            lemmas = []
            for j in range(w_cnt):
                word = fields[4 + 2 * j]
                # Adjective markers like "galore(ip)" are syntax, not part of the lemma.
                word = re.sub(r'\((a|p|ip)\)$', '', word)
                lemmas.append(word.replace('_', ' '))
            idx = 4 + 2 * w_cnt
            p_cnt = int(fields[idx])
            pointers = []
            for j in range(p_cnt):
                sym, off, ppos, _src_tgt = fields[idx + 1 + 4 * j : idx + 5 + 4 * j]
                pointers.append((sym, off, ppos))
            synsets.append(Synset(pos, ss_type, offset, lemmas, pointers, gloss.strip()))
    return synsets


def load_wordnet(wordnet_dir: Path) -> dict[str, list[Synset]]:
    """Loads all four POS data files, keyed by POS letter in corpus order."""
    return {pos: parse_wordnet_file(wordnet_dir / f'data.{name}', pos) for name, pos in WN_FILES}


def wordnet_version(wordnet_dir: Path) -> str:
    """Returns the Debian package version of wordnet-base if dpkg knows it, else the header."""
    try:
        out = subprocess.run(
            ['dpkg-query', '-W', '-f=${Version}', 'wordnet-base'],
            capture_output=True,
            text=True,
            check=True,
        )
        return f'wordnet-base {out.stdout.strip()} (WordNet 3.0)'
    except (OSError, subprocess.CalledProcessError):
        header = (wordnet_dir / 'data.noun').read_text(encoding='utf-8')[:3000]
        match = re.search(r'WordNet (\d\.\d)', header)
        return f'WordNet {match.group(1) if match else "unknown"} (data files)'


def build_wordnet_examples(wordnet: dict[str, list[Synset]]) -> list[dict]:
    """One ``"<lemma>: <gloss>"`` example per synset, by POS then offset."""
    examples = []
    for synsets in wordnet.values():
        for syn in synsets:
            examples.append(
                {
                    'id': syn.example_id,
                    'source': 'wordnet',
                    'title': syn.lemmas[0],
                    'text': f'{syn.lemmas[0]}: {syn.gloss}',
                }
            )
    return examples


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------


def word_tokens(text: str) -> tuple[str, ...]:
    """Lower-cased word tokens; whole-word matching is consecutive-token matching."""
    return tuple(WORD_RE.findall(text.lower()))


def _is_acronym(lemma: str) -> bool:
    # "US", "UN", "U.S.": case-insensitive matching would hit the pronoun "us" etc.
    letters = re.sub(r'[^A-Za-z]', '', lemma)
    return bool(letters) and letters.isupper() and len(letters) <= 5


def mention_spans(
    raw_tokens: Sequence[str], lemma: str, strict_case: bool = False
) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` where ``lemma`` occurs as whole words.

    Matching is case-insensitive, except for short all-caps acronyms which must match exactly.

    Args:
        raw_tokens: Word tokens of the text, original case.
        lemma: Lemma to look for.
        strict_case: Also require a capitalised lemma to be capitalised in the text, so that
            e.g. "Union" does not match "union" (used for the noisier Wikipedia matching).

    Returns:
        Matching spans in text order.
    """
    acronym = _is_acronym(lemma)
    needle = tuple(WORD_RE.findall(lemma)) if acronym else word_tokens(lemma)
    k = len(needle)
    if not k:
        return []
    hay = tuple(raw_tokens) if acronym else tuple(t.lower() for t in raw_tokens)
    need_cap = strict_case and lemma[:1].isupper()
    return [
        (i, i + k)
        for i in range(len(hay) - k + 1)
        if hay[i : i + k] == needle and (not need_cap or raw_tokens[i][:1].isupper())
    ]


def find_mention(text: str, lemmas: Sequence[str]) -> str | None:
    """Returns the first lemma (in WordNet order) mentioned in ``text`` as whole words."""
    raw_tokens = WORD_RE.findall(text)
    for lemma in lemmas:
        if mention_spans(raw_tokens, lemma):
            return lemma
    return None


def states_together(text: str, subject_lemmas: Sequence[str], object_lemmas: Sequence[str]) -> bool:
    """Whether one sentence of ``text`` mentions a subject and a separate object lemma.

    Sentence-level, non-overlapping co-occurrence is a cheap proxy for "states the fact": it
    rejects passages that mention the two far apart, and "Cornell University" counting as a
    mention of "university".
    """
    for line in text.split('\n'):
        for sentence in split_sentences(line):
            raw_tokens = WORD_RE.findall(sentence)
            subj = [sp for lem in subject_lemmas for sp in mention_spans(raw_tokens, lem, True)]
            if not subj:
                continue
            obj = [sp for lem in object_lemmas for sp in mention_spans(raw_tokens, lem, True)]
            if any(o[1] <= s[0] or s[1] <= o[0] for s in subj for o in obj):
                return True
    return False


def make_prompt(relation: str, subject: str, obj: str) -> tuple[str, str]:
    """Renders a fact as a (prompt, target) pair; the target starts with a space.

    Args:
        relation: One of part_of, member_of, instance_of.
        subject: Subject lemma.
        obj: Object surface form (the lemma of the object that the gloss mentions).

    Returns:
        The prompt and the target continuation.
    """
    if relation == 'part_of':
        return f'{subject} is part of', f' {obj}'
    if relation == 'member_of':
        return f'{subject} is a member of', f' {obj}'
    # "Kabul is a national capital" reads naturally; the article must agree with the object.
    article = 'an' if obj[:1].lower() in 'aeiou' else 'a'
    return f'{subject} is {article}', f' {obj}'


class PhraseIndex:
    """Maps lower-cased word n-grams to the Wikipedia passages containing them."""

    def __init__(self, examples: Sequence[dict], phrases: Iterable[tuple[str, ...]]) -> None:
        """Indexes only the requested phrases, so memory stays small.

        Args:
            examples: Wikipedia passage examples.
            phrases: Token tuples to index.
        """
        wanted = {p for p in phrases if p}
        max_len = max((len(p) for p in wanted), default=1)
        self.index: dict[tuple[str, ...], set[str]] = collections.defaultdict(set)
        for ex in examples:
            toks = word_tokens(ex['text'])
            for n in range(1, max_len + 1):
                for i in range(len(toks) - n + 1):
                    gram = toks[i : i + n]
                    if gram in wanted:
                        self.index[gram].add(ex['id'])

    def passages_mentioning(self, lemmas: Sequence[str]) -> set[str]:
        """Ids of passages that may mention any of ``lemmas`` (a superset; case is ignored)."""
        hits: set[str] = set()
        for lemma in lemmas:
            hits |= self.index.get(word_tokens(lemma), set())
        return hits


def build_facts(
    wordnet: dict[str, list[Synset]], wiki_examples: Sequence[dict]
) -> tuple[list[dict], dict[str, int]]:
    """Extracts entailed relation triples from WordNet noun pointers.

    A triple (X, relation, Y) is kept only if X's gloss mentions one of Y's lemmas, so the
    gloss example really states the fact. Wikipedia passages that mention a lemma of X and a
    lemma of Y in the same sentence are added as further (co-occurrence based, hence weaker)
    entailing examples.

    Args:
        wordnet: Parsed synsets by POS.
        wiki_examples: Wikipedia passage examples.

    Returns:
        Fact records in id order and counters for the report.
    """
    nouns = {s.offset: s for s in wordnet['n']}
    counts = collections.Counter()
    candidates = []
    seen = set()
    for syn in wordnet['n']:
        for sym, off, ppos in syn.pointers:
            relation = FACT_POINTERS.get(sym)
            if relation is None or ppos != 'n':
                continue
            key = (syn.offset, relation, off)
            if key in seen:
                continue
            seen.add(key)
            counts[f'candidates_{relation}'] += 1
            obj = nouns[off]
            mention = find_mention(syn.gloss, obj.lemmas)
            if mention is None:
                continue
            if mention.lower() in {lemma.lower() for lemma in syn.lemmas}:
                # e.g. New York (city) part of New York (state): target would echo the prompt.
                counts[f'dropped_same_name_{relation}'] += 1
                continue
            candidates.append((syn, relation, obj, mention))

    phrases = {word_tokens(lemma) for s, _, o, _ in candidates for lemma in s.lemmas + o.lemmas}
    index = PhraseIndex(wiki_examples, phrases)
    wiki_order = {ex['id']: i for i, ex in enumerate(wiki_examples)}
    wiki_text = {ex['id']: ex['text'] for ex in wiki_examples}

    def sort_key(item: tuple[Synset, str, Synset, str]) -> tuple:
        syn, relation, obj, _ = item
        # Proper-noun subjects first so that a prefix of the file is the most natural facts.
        return (
            not syn.lemmas[0][:1].isupper(),
            syn.offset,
            RELATION_ORDER.index(relation),
            obj.offset,
        )

    facts = []
    for n, (syn, relation, obj, mention) in enumerate(sorted(candidates, key=sort_key)):
        # The index gives passage-level candidates cheaply; the sentence check decides.
        candidate_ids = index.passages_mentioning(syn.lemmas) & index.passages_mentioning(
            obj.lemmas
        )
        wiki_ids_sorted = [
            pid
            for pid in sorted(candidate_ids, key=wiki_order.__getitem__)
            if states_together(wiki_text[pid], syn.lemmas, obj.lemmas)
        ]
        prompt, target = make_prompt(relation, syn.lemmas[0], mention)
        proper = syn.lemmas[0][:1].isupper()
        facts.append(
            {
                'id': f'fact/{n}',
                'relation': relation,
                'subject': syn.lemmas[0],
                'object': obj.lemmas[0],
                'object_mention': mention,
                'subject_synset': syn.example_id,
                'object_synset': obj.example_id,
                'prompt': prompt,
                'target': target,
                'proper_noun': proper,
                # "Berlin airlift is an airlift": the target can be copied from the prompt.
                'object_in_subject': find_mention(syn.lemmas[0], [mention]) is not None,
                'entailing_ids': [syn.example_id, *wiki_ids_sorted],
                'n_wiki_entailing': len(wiki_ids_sorted),
            }
        )
        counts[f'facts_{relation}'] += 1
        counts[f'facts_{relation}_proper_noun'] += int(proper)
        counts[f'facts_{relation}_with_wiki'] += int(bool(wiki_ids_sorted))
    counts['facts_total'] = len(facts)
    counts['facts_with_wiki'] = sum(1 for f in facts if f['n_wiki_entailing'])
    counts['facts_proper_noun'] = sum(1 for f in facts if f['proper_noun'])
    counts['facts_object_in_subject'] = sum(1 for f in facts if f['object_in_subject'])
    counts['wiki_entailing_links_total'] = sum(f['n_wiki_entailing'] for f in facts)
    return facts, dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(examples: Sequence[dict]) -> bytes:
    """Trains the SentencePiece unigram model deterministically and returns its bytes.

    Args:
        examples: Corpus examples in corpus order.

    Returns:
        Serialized ``ModelProto``.
    """
    # Fixed input order, no sampling/shuffling and one thread: the trainer's only randomness
    # is then the seeded generator, so two builds give the same model.
    spm.set_random_generator_seed(SPM_SEED)
    lines = [line for ex in examples for line in ex['text'].split('\n') if line.strip()]
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=writer,
        model_type='unigram',
        vocab_size=SPM_VOCAB_SIZE,
        character_coverage=0.9995,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        byte_fallback=True,
        input_sentence_size=len(lines) + 1,
        shuffle_input_sentence=False,
        num_threads=1,
        max_sentence_length=16384,
        minloglevel=2,
    )
    return writer.getvalue()


def token_stats(model: bytes, examples: Sequence[dict]) -> dict[str, float | int]:
    """Token count and unigram entropy of the corpus under the tokenizer.

    The entropy is that of the empirical unigram distribution of token ids over the whole
    corpus, i.e. the cross-entropy a context-free model would reach; a trained LM should beat
    it. EOS (one per example) is reported separately because training usually appends it.
    """
    sp = spm.SentencePieceProcessor(model_proto=model)
    counter: collections.Counter[int] = collections.Counter()
    per_source: collections.Counter[str] = collections.Counter()
    for ex, ids in zip(examples, sp.encode([ex['text'] for ex in examples]), strict=True):
        counter.update(ids)
        per_source[ex['source']] += len(ids)
    total = sum(counter.values())

    def entropy(counts: Iterable[int], n: int) -> float:
        return -sum(c / n * math.log(c / n) for c in counts if c)

    with_eos = counter.copy()
    with_eos[sp.eos_id()] += len(examples)
    return {
        'tokens_total': total,
        'tokens_wikipedia': per_source['wikipedia'],
        'tokens_wordnet': per_source['wordnet'],
        'tokens_total_with_eos': total + len(examples),
        'unigram_entropy_nats': round(entropy(counter.values(), total), 6),
        'unigram_entropy_nats_with_eos': round(
            entropy(with_eos.values(), total + len(examples)), 6
        ),
        'distinct_tokens_used': len(counter),
        'max_tokens_per_example': max(len(x) for x in sp.encode([e['text'] for e in examples])),
    }


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def write_jsonl_gz(path: Path, records: Iterable[dict]) -> None:
    """Writes gzipped JSON lines with a fixed header (no name, mtime 0) for byte-identity."""
    with (
        path.open('wb') as raw,
        gzip.GzipFile(filename='', mode='wb', fileobj=raw, compresslevel=9, mtime=0) as gz,
    ):
        for rec in records:
            gz.write((json.dumps(rec, ensure_ascii=False) + '\n').encode('utf-8'))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


WORDNET_LICENSE = """\
This software and database is being provided to you, the LICENSEE, by
Princeton University under the following license.  By obtaining, using
and/or copying this software and database, you agree that you have
read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and
database and its documentation for any purpose and without fee or
royalty is hereby granted, provided that you agree to comply with
the following copyright notice and statements, including the disclaimer,
and that the same appear on ALL copies of the software, database and
documentation, including modifications that you make for internal
use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR
OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in
advertising or publicity pertaining to distribution of the software
and/or database.  Title to copyright in this software, database and
any associated documentation shall at all times remain with
Princeton University and LICENSEE agrees to preserve same.
"""


def provenance_markdown(stats: dict, articles: Sequence[tuple[int, str]]) -> str:
    """Renders PROVENANCE.md from the build statistics (no timestamps, for byte-identity).

    Args:
        stats: The content of stats.json.
        articles: ``(page_id, title)`` of the Wikipedia articles used, for attribution.

    Returns:
        The Markdown text.
    """
    article_list = '; '.join(f'{pid} {title}' for pid, title in articles)
    src = stats['sources']
    wiki = stats['wikipedia']
    wn = stats['wordnet']
    facts = stats['facts']
    tok = stats['tokenizer']
    return f"""\
# Embedded data: provenance and licences

Generated by `scripts/build_corpus.py`; do not edit by hand. Rebuild with

```
python scripts/build_corpus.py --out trackstar_jax/data/embedded \\
    --gensim-wheel auto --wordnet-dir /usr/share/wordnet
```

The build is deterministic: rebuilding from the same package versions gives byte-identical
files (gzip headers carry no name and mtime 0; the tokenizer is trained single-threaded on a
fixed sentence order with a fixed seed). SHA-256 of the outputs are in `stats.json`.

## Files

| file | content |
|---|---|
| `corpus.jsonl.gz` | {stats['corpus']['examples']} examples `{{id, source, title, text}}`: \
{wiki['passages']} Wikipedia passages, then {wn['glosses_total']} WordNet glosses |
| `facts.jsonl.gz` | {facts['facts_total']} fact triples with prompt/target and \
entailing example ids |
| `spm.model` | SentencePiece unigram tokenizer, vocab {tok['vocab_size']} |
| `stats.json` | counts, token statistics, checksums |

## Sources

### Wikipedia sample (from the gensim wheel)

* Package: `gensim` {src['gensim_version']} wheel from PyPI (used only as a data source; gensim is
  never imported and is not a dependency of trackstar_jax).
* Member: `{WIKI_MEMBER}`
  (SHA-256 of the bz2 member: `{src['wiki_member_sha256']}`), an excerpt of the English
  Wikipedia dump `enwiki-latest-pages-articles1.xml-p000000010p000030302` (revisions of 2016).
* Licence of the text: Wikipedia content is dual-licensed under the
  [Creative Commons Attribution-ShareAlike 3.0 Unported licence (CC BY-SA 3.0)]\
(https://creativecommons.org/licenses/by-sa/3.0/) and the
  [GNU Free Documentation Licence (GFDL)](https://www.gnu.org/licenses/fdl-1.3.html).
  Authors: the Wikipedia contributors listed in each article's revision history at
  `https://en.wikipedia.org/wiki/<title>?action=history`. The passages are modified
  (markup stripped, split into passages); they are redistributed under CC BY-SA 3.0.
  (gensim's own code is LGPL-2.1; none of it is included here.)
* Processing: main-namespace pages only; redirects and pages with fewer than
  {MIN_PAGE_WORDS} words of clean text skipped. A regex cleaner removes comments, `<ref>` and
  other non-prose tags with their content, nested templates `{{{{...}}}}`, tables `{{|...|}}`,
  File/Image/Category/interlanguage links (with nested captions), external-link URLs, bold/italic
  quotes, HTML tags, headings, and the sections References / Notes / See also / External links /
  Further reading / Bibliography (and similar). `[[a|b]]` becomes `b`. Paragraphs of fewer than
  {MIN_PARAGRAPH_WORDS} words are dropped. Paragraphs are packed greedily into passages of at most
  {MAX_PASSAGE_WORDS} words (paragraphs joined with a newline); longer paragraphs are split at
  sentence ends, and only single sentences longer than the limit are cut at a word boundary.
* Ids: `wiki/<page_id>/<k>`; ordered by page id, then `k`.
* Articles used ({len(articles)}, page id and title; CC BY-SA attribution is to the contributors
  of these articles): {article_list}.

### WordNet 3.0 (Debian package `wordnet-base`)

* Package: {src['wordnet_version']}, files `data.noun`, `data.verb`, `data.adj`, `data.adv`
  parsed directly (format wndb(5WN)).
* One example per synset: text `"<first lemma>: <gloss>"` (the full gloss, including its quoted
  usage examples), title = first lemma; underscores become spaces and adjective markers such as
  `(ip)` are removed. Ids: `wn/<pos>/<8-digit offset>` with pos `n`, `v`, `a` (head and
  satellite adjectives, which share `data.adj`), `r`; ordered n, v, a, r then offset.
* Licence: WordNet 3.0 licence (Princeton University), reproduced in full below.

## Fact-tracing set

Triples come from pointers of WordNet noun synsets X to noun synsets Y:

| pointer | relation | prompt | target |
|---|---|---|---|
| `#p` part holonym | `part_of` | `"{{subject}} is part of"` | `" {{object_mention}}"` |
| `#m` member holonym | `member_of` | `"{{subject}} is a member of"` | `" {{object_mention}}"` |
| `@i` instance hypernym | `instance_of` | `"{{subject}} is a"` / `"{{subject}} is an"` | \
`" {{object_mention}}"` |

* `subject` / `object` are the first lemmas of X / Y. A triple is kept only if X's gloss mentions
  one of Y's lemmas as whole words (case-insensitive, except short all-caps acronyms such as `US`,
  which must match exactly); `object_mention` is that lemma (the first of Y's lemmas that matches),
  and the target uses it so that the target string really occurs in the entailing gloss. Triples
  whose mentioned object equals a subject lemma (e.g. New York city / New York state) are dropped.
  For `instance_of` the article (`a`/`an`) agrees with the target.
* `entailing_ids`: X's gloss example first (it states the fact), then every Wikipedia passage
  with a sentence that mentions a lemma of X and, in a non-overlapping span, a lemma of Y (same
  whole-word rule, and capitalised lemmas must be capitalised in the text, so "Union" does not
  match "union"); `n_wiki_entailing` counts the latter. This co-occurrence is weaker evidence
  than the gloss: word-sense ambiguity remains (e.g. Jack London the writer vs. London).
* `object_in_subject`: the target also occurs in the subject (e.g. "Berlin airlift is an
  airlift"), so it can be copied from the prompt; filter these out for harder evaluations.
* `proper_noun`: the subject lemma is capitalised. Facts are ordered proper nouns first, then by
  subject offset, relation and object offset; ids `fact/<n>` follow that order.
* Counts: {facts['facts_part_of']} part_of, {facts['facts_member_of']} member_of,
  {facts['facts_instance_of']} instance_of ({facts['facts_proper_noun']} with proper-noun
  subjects; {facts['facts_with_wiki']} with at least one Wikipedia passage).

## Tokenizer

SentencePiece {tok['sentencepiece_version']}, trained on the corpus text (one line per paragraph, in
corpus order): unigram, `vocab_size={tok['vocab_size']}`, `character_coverage=0.9995`,
`pad_id=0, eos_id=1, unk_id=2, bos_id=-1` (T5 convention), `byte_fallback=True`,
`shuffle_input_sentence=False`, all sentences used, `num_threads=1`, random seed {SPM_SEED},
default `nmt_nfkc` normalisation. Corpus: {tok['tokens_total']} tokens (without EOS), unigram
entropy {tok['unigram_entropy_nats']} nats/token.

## WordNet 3.0 licence

```
{WORDNET_LICENSE}```
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Builds all embedded data files and prints a summary."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--out', type=Path, default=Path('trackstar_jax/data/embedded'))
    parser.add_argument(
        '--gensim-wheel',
        default='auto',
        help=f"path to a gensim wheel, or 'auto' to pip-download gensim=={GENSIM_VERSION}",
    )
    parser.add_argument('--wordnet-dir', type=Path, default=Path('/usr/share/wordnet'))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_gensim_wheel(args.gensim_wheel, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            member_sha = hashlib.sha256(zf.read(WIKI_MEMBER)).hexdigest()
        xml_bytes, gensim_version = read_wiki_dump(wheel)

    wiki_examples, wiki_counts = build_wiki_examples(xml_bytes)
    wordnet = load_wordnet(args.wordnet_dir)
    wn_examples = build_wordnet_examples(wordnet)
    corpus = wiki_examples + wn_examples
    facts, fact_counts = build_facts(wordnet, wiki_examples)

    model = train_tokenizer(corpus)
    tok_stats = token_stats(model, corpus)

    corpus_path = args.out / 'corpus.jsonl.gz'
    facts_path = args.out / 'facts.jsonl.gz'
    model_path = args.out / 'spm.model'
    write_jsonl_gz(corpus_path, corpus)
    write_jsonl_gz(facts_path, facts)
    model_path.write_bytes(model)

    wn_counts = collections.Counter(ex['id'].split('/')[1] for ex in wn_examples)
    stats = {
        'sources': {
            'gensim_version': gensim_version,
            'wiki_member': WIKI_MEMBER,
            'wiki_member_sha256': member_sha,
            'wordnet_version': wordnet_version(args.wordnet_dir),
        },
        'wikipedia': wiki_counts,
        'wordnet': {
            'glosses_total': len(wn_examples),
            **{f'glosses_{pos}': wn_counts[pos] for _, pos in WN_FILES},
            'satellite_adjectives': sum(1 for s in wordnet['a'] if s.ss_type == 's'),
        },
        'corpus': {
            'examples': len(corpus),
            'characters': sum(len(ex['text']) for ex in corpus),
            'words': sum(len(ex['text'].split()) for ex in corpus),
        },
        'facts': fact_counts,
        'tokenizer': {
            'sentencepiece_version': spm.__version__,
            'vocab_size': SPM_VOCAB_SIZE,
            'model_type': 'unigram',
            **tok_stats,
        },
        'build': {'python': platform.python_version()},
        'sha256': {
            'corpus.jsonl.gz': sha256(corpus_path),
            'facts.jsonl.gz': sha256(facts_path),
            'spm.model': sha256(model_path),
        },
        'bytes': {
            'corpus.jsonl.gz': corpus_path.stat().st_size,
            'facts.jsonl.gz': facts_path.stat().st_size,
            'spm.model': model_path.stat().st_size,
        },
    }
    (args.out / 'stats.json').write_text(json.dumps(stats, indent=2) + '\n', encoding='utf-8')
    articles = sorted({(int(ex['id'].split('/')[1]), ex['title']) for ex in wiki_examples})
    (args.out / 'PROVENANCE.md').write_text(provenance_markdown(stats, articles), encoding='utf-8')

    print(f'wikipedia: {wiki_counts}')
    print(f'wordnet:   {stats["wordnet"]}')
    print(f'facts:     {fact_counts}')
    print(f'tokenizer: {stats["tokenizer"]}')
    print(f'bytes:     {stats["bytes"]}')
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
