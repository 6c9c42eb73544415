"""The rough POS tagger: rules on a hand-made lexicon, token alignment with the real
SentencePiece model, and the lexicon read from the embedded WordNet glosses."""

from trackstar_jax.data import corpus, pos

LEX = pos.Lexicon(
    {
        'run': {'NOUN': 10, 'VERB': 25},
        'running': {'ADJ': 3},
        'time': {'NOUN': 6, 'VERB': 4},
        'cat': {'NOUN': 2, 'VERB': 1},
        'box': {'NOUN': 4},
        'church': {'NOUN': 3},
        'quickly': {'ADV': 1},
        'fast': {'ADJ': 7, 'ADV': 2},
        'large': {'ADJ': 5},
        'stop': {'NOUN': 2, 'VERB': 2},
        'can': {'NOUN': 2, 'VERB': 2},
    }
)


def test_word_rules():
    expected = {
        ',': 'PUNCT', '--': 'PUNCT', '42': 'NUM', '3.5': 'NUM', 'Twelve': 'NUM',
        'the': 'DET', 'The': 'DET', 'of': 'ADP', 'they': 'PRON', 'and': 'CCONJ',
        'because': 'SCONJ', 'were': 'AUX', 'can': 'AUX', 'not': 'PART',
        'cats': 'NOUN', 'boxes': 'NOUN', 'churches': 'NOUN', 'runs': 'VERB',
        'running': 'VERB', 'stopped': 'VERB', 'stopping': 'VERB', 'times': 'NOUN',
        'stop': 'NOUN', 'quickly': 'ADV', 'faster': 'ADJ', 'largest': 'ADJ',
        'Zanzibar': 'PROPN', 'zork': 'X', "didn't": 'AUX', "can't": 'AUX',
        "cat's": 'NOUN', "Zanzibar's": 'PROPN',
    }  # fmt: skip
    got = {w: pos.word_tag(w, LEX) for w in expected}
    assert got == expected


def test_from_records_reads_only_single_word_wordnet_lemmas():
    lex = pos.Lexicon.from_records(
        [
            {'id': 'wn/n/1', 'title': 'Run'},
            {'id': 'wn/v/2', 'title': 'run'},
            {'id': 'wn/v/3', 'title': 'run'},
            {'id': 'wn/s/4', 'title': 'red'},
            {'id': 'wn/n/5', 'title': 'physical entity'},
            {'id': 'wiki/x/0', 'title': 'box'},
        ]
    )
    assert lex.counts == {'run': {'NOUN': 1, 'VERB': 2}, 'red': {'ADJ': 1}}


def test_token_tags_follow_words_across_subword_tokens():
    tok = corpus.Tokenizer()
    text = 'The cats were running quickly, 42 times; Zanzibar stopped.'
    ids = tok.encode(text)
    tags = pos.token_tags(ids, tok.decode, LEX)
    assert len(tags) == len(ids)
    # Reference: tag each word, then give every token the tag of the word holding its
    # first non-space character, by walking the decoded pieces independently.
    words = [(m.start(), m.end(), m.group()) for m in pos.WORD_RE.finditer(text)]
    pos_in_text, want = 0, []
    for t in range(len(ids)):
        piece = tok.decode(ids[: t + 1])
        start, stop = pos_in_text, len(piece)
        first = next(i for i in range(start, stop) if not text[i].isspace())
        want.append(next(pos.word_tag(w, LEX) for a, b, w in words if a <= first < b))
        pos_in_text = stop
    assert tags == want
    assert set(tags) >= {'DET', 'NOUN', 'AUX', 'VERB', 'ADV', 'PUNCT', 'NUM', 'PROPN'}


def test_embedded_lexicon():
    lex = pos.Lexicon.embedded()
    assert len(lex.counts) > 40_000
    assert [pos.word_tag(w, lex) for w in ('breathe', 'entity', 'quickly', 'walked')] == [
        'VERB',
        'NOUN',
        'ADV',
        'VERB',
    ]
