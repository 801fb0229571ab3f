"""Tests for tinylm.wordpiece: BERT's basic tokenizer, greedy longest-match WordPiece, pairs,
truncation and padding, files, training a vocabulary, and the same ids as Hugging Face's
BertTokenizerFast on a varied text (skipped without transformers)."""

import json

import numpy as np
import pytest

from tinylm.wordpiece import (
    SPECIAL_TOKENS,
    WordPieceTokenizer,
    normalize,
    split_words,
    wordpiece,
)

VOCAB = list(SPECIAL_TOKENS) + [
    "un", "##aff", "##able", "the", "a", "##b", "##c", "hello", "world", ",", "!", "'", "s",
    "it", "ca", "##fe", "é", "数", "据", "?", "##s",
]

VARIED_TEXTS = [
    "Héllo, Wörld! The quick brown fox's unbelievable déjà vu: 数据库 and 日本語.",
    "  Tabs\tand\nnewlines\u00a0nbsp\u2028sep zero\u200bwidth ctrl\x07 [MASK] [mask] ok [SEP]x",
    "ÀÉÎÕÜ çñ ß İstanbul ΣΊΣΥΦΟΣ naïve café résumé —dash– “quotes” «guillemets» 1,000.50$ @u #t",
    "x" * 120 + " supercalifragilisticexpialidocious zzzqqq ¿qué? ¡sí! a_b-c/d\\e \x00\ufffd",
    "Unaffable caféS: it's THE end... (or is it?) — 100% sure; emoji 🙂 and ½ ² Ⅻ",
]


def tiny():
    return WordPieceTokenizer(VOCAB)


# ----------------------------------------------------------------------------------------------
# The basic tokenizer and WordPiece


def test_normalize_cleans_lowercases_strips_accents_and_spaces_cjk():
    assert normalize("Héllo\tWÖRLD\x07\x00") == "hello world"
    assert normalize("Héllo", do_lower_case=False) == "Héllo"  # cased: accents stay
    assert normalize("Héllo", do_lower_case=True, strip_accents=False) == "héllo"
    assert normalize("数据") == " 数  据 "


def test_split_words_isolates_punctuation():
    assert split_words("don't stop!! a.b ¿qué?") == [
        "don", "'", "t", "stop", "!", "!", "a", ".", "b", "¿", "qué", "?",
    ]


def test_wordpiece_is_greedy_longest_match_first():
    vocab = set(VOCAB)
    assert wordpiece("unaffable", vocab) == ["un", "##aff", "##able"]
    assert wordpiece("abc", vocab) == ["a", "##b", "##c"]
    assert wordpiece("abx", vocab) == ["[UNK]"]  # one unmatched part: the whole word is unknown
    assert wordpiece("a" * 101, vocab | {"##a"}) == ["[UNK]"]  # longer than 100 characters
    assert wordpiece("a" * 100, vocab | {"##a"}) == ["a"] + ["##a"] * 99


def test_tokenize_keeps_special_tokens_written_in_the_text():
    tok = tiny()
    assert tok.tokenize("Hello [MASK] world [mask]") == [
        "hello", "[MASK]", "world", "[UNK]", "[UNK]", "[UNK]",
    ]
    assert tok.tokenize("Café, 数据!") == ["ca", "##fe", ",", "数", "据", "!"]


# ----------------------------------------------------------------------------------------------
# encode, pairs, truncation, padding, batches, decode


def test_encode_a_pair():
    tok = tiny()
    enc = tok.encode("hello world", "it's")
    cls, sep = tok.cls_id, tok.sep_id
    ids = [tok.token_to_id[t] for t in ("hello", "world", "it", "'", "s")]
    assert enc["input_ids"] == [cls, ids[0], ids[1], sep, ids[2], ids[3], ids[4], sep]
    assert enc["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert enc["attention_mask"] == [1] * 8


def test_truncation_and_padding_to_max_length():
    tok = tiny()
    enc = tok.encode("a a a a a a", "the the", max_length=8, truncation=True,
                     padding="max_length")
    a, the = tok.token_to_id["a"], tok.token_to_id["the"]
    assert enc["input_ids"] == [tok.cls_id, a, a, a, tok.sep_id, the, the, tok.sep_id]
    # max_length alone truncates, as Hugging Face's default does; truncation=False keeps all
    assert tok.encode("a a a a a a", max_length=4)["input_ids"] == [tok.cls_id, a, a, tok.sep_id]
    assert len(tok.encode("a a a a a a", max_length=4, truncation=False)["input_ids"]) == 8
    assert tok.encode_batch(["a a a a a a"], max_length=4)["input_ids"].shape == (1, 4)
    enc = tok.encode("hello", max_length=6, padding="max_length")
    assert enc["input_ids"][3:] == [tok.pad_id] * 3
    assert enc["attention_mask"] == [1, 1, 1, 0, 0, 0]
    assert enc["token_type_ids"] == [0] * 6


def test_encode_batch_pads_to_the_longest():
    tok = tiny()
    batch = tok.encode_batch(["hello world !", "a"], ["it", "the the"])
    assert batch["input_ids"].shape == (2, 7) and batch["input_ids"].dtype == np.int64
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]
    assert batch["input_ids"][1, 6] == tok.pad_id


def test_decode_glues_continuations_and_skips_specials():
    tok = tiny()
    ids = tok.encode("unaffable hello, world!")["input_ids"]
    assert tok.decode(ids) == "[CLS] unaffable hello, world! [SEP]"
    assert tok.decode(ids, skip_special_tokens=True) == "unaffable hello, world!"


# ----------------------------------------------------------------------------------------------
# Files and training


def test_save_and_load_round_trip(tmp_path):
    tok = WordPieceTokenizer(VOCAB, do_lower_case=False)
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.txt").read_text(encoding="utf-8").split("\n")[:3] == [
        "[PAD]", "[UNK]", "[CLS]",
    ]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["do_lower_case"] is False
    again = WordPieceTokenizer.from_pretrained(tmp_path / "tok")
    assert again.vocab == VOCAB and again.do_lower_case is False


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WordPieceTokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        WordPieceTokenizer.from_pretrained(tmp_path / "d")
    (tmp_path / "d" / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt.*unk_token '\\[UNK\\]' is not in"):
        WordPieceTokenizer.from_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="token 'a' appears twice"):
        WordPieceTokenizer(VOCAB + ["a"])


def test_train_learns_frequent_words_and_covers_its_text():
    text = ("the cat sat on the mat. the cat ran. " * 50) + "zebra"
    tok = WordPieceTokenizer.train(text, vocab_size=40)
    assert tok.vocab[:5] == list(SPECIAL_TOKENS)
    assert len(tok.vocab) <= 40
    assert "the" in tok.token_to_id and "cat" in tok.token_to_id  # frequent words become tokens
    assert "[UNK]" not in tok.tokenize(text)  # every character of the text has a token
    assert WordPieceTokenizer.train(text, vocab_size=40).vocab == tok.vocab  # deterministic


def test_train_on_a_built_in_corpus():
    from tinylm.data import load_corpus

    text = load_corpus("pydoc", max_bytes=200_000)
    tok = WordPieceTokenizer.train(text, vocab_size=1000)
    assert tok.vocab_size == 1000
    tokens = tok.tokenize(text[:5000])
    assert tokens.count("[UNK]") == 0
    assert len(tokens) < len(split_words(normalize(text[:5000]))) * 1.6  # words mostly whole


# ----------------------------------------------------------------------------------------------
# The oracle: Hugging Face's BertTokenizerFast reading the same vocab.txt


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_same_ids_as_bert_tokenizer_fast(tmp_path, do_lower_case):
    transformers = pytest.importorskip("transformers")
    from tinylm.data import load_corpus

    text = load_corpus("pydoc", max_bytes=100_000) + " ".join(VARIED_TEXTS)
    tok = WordPieceTokenizer.train(text, vocab_size=1200, do_lower_case=do_lower_case)
    tok.save_pretrained(tmp_path)
    hf = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    assert hf.vocab_size == tok.vocab_size
    for t in VARIED_TEXTS:
        assert tok.encode(t)["input_ids"] == hf(t)["input_ids"], t
        assert tok.tokenize(t) == hf.tokenize(t), t
    some_unknown = sum(tok.tokenize(t).count("[UNK]") for t in VARIED_TEXTS)
    assert some_unknown > 0  # the texts do reach [UNK]
    for a, b in zip(VARIED_TEXTS, VARIED_TEXTS[1:] + VARIED_TEXTS[:1], strict=True):
        assert tok.encode(a, b) == {k: list(v) for k, v in hf(a, b).items()}
        for max_length in (9, 20, 33):
            ours = tok.encode(a, b, max_length=max_length, truncation=True,
                              padding="max_length")
            theirs = hf(a, b, max_length=max_length, truncation=True, padding="max_length")
            assert ours == {k: list(v) for k, v in theirs.items()}, (a, b, max_length)
        # max_length without truncation: both truncate (Hugging Face with a warning)
        theirs = hf(a, b, max_length=9)
        assert tok.encode(a, b, max_length=9) == {k: list(v) for k, v in theirs.items()}
    batch = tok.encode_batch(VARIED_TEXTS)
    theirs = hf(VARIED_TEXTS, padding=True, return_tensors="np")
    for key in batch:
        assert np.array_equal(batch[key], theirs[key]), key
    simple = "hello world, this is a test. isn't it?"
    ids = tok.encode(simple)["input_ids"]
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
