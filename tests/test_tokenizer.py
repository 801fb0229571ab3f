"""Tests for tinylm/tokenizer.py: round trips, EOT, errors, saving, and BPE training.

The BPE is checked three ways: a tiny example worked out by hand, a naive reference
trainer (recount every pair after every merge) that the fast incremental trainer must
agree with merge for merge, and hypothesis round trips over arbitrary Unicode.
"""

import json
from collections import Counter
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinylm.tokenizer import (
    EOT,
    BPETokenizer,
    CharTokenizer,
    merge,
    split_chunks,
    tokenizer_from_dict,
)


def pydoc_text():
    """The default corpus, built inline so this file does not depend on tinylm.data."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


@pytest.fixture(scope="module")
def corpus():
    return pydoc_text()[:60_000]


@pytest.fixture(scope="module")
def bpe(corpus):
    # 300 merges on 60 kB: a fraction of a second, shared by every test below.
    return BPETokenizer.train(corpus, vocab_size=256 + 300 + 1)


# Text strategies. st.text() leaves out lone surrogates (U+D800..U+DFFF, not valid UTF-8),
# and so does st.text(st.one_of(..., surrogates)), so strings with surrogates are built as
# lists of characters joined together.
non_latin = st.characters(categories=["Lo", "Mn", "Mc", "So", "Nd", "Zs", "Cc", "Sk"])
surrogates = st.characters(categories=["Cs"])
any_text = st.one_of(
    st.text(),
    st.text(non_latin),
    st.lists(st.one_of(st.characters(), surrogates)).map("".join),
)


# ---------------------------------------------------------------------------
# Pre-splitting and merging.
# ---------------------------------------------------------------------------


def test_split_chunks_example():
    assert split_chunks("Hello, world! don't x_1  = 42\n\n  y") == [
        "Hello", ",", " world", "!", " don", "'t", " x", "_", "1", " ", " =", " 42", "\n\n ",
        " y",
    ]  # fmt: skip


@given(any_text)
def test_split_chunks_cover_the_text(text):
    assert "".join(split_chunks(text)) == text


def test_merge_is_left_to_right_without_overlap():
    assert merge([1, 1, 1, 2], (1, 1), 9) == [9, 1, 2]
    assert merge([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert merge([], (1, 2), 9) == []


# ---------------------------------------------------------------------------
# BPE training.
# ---------------------------------------------------------------------------


def test_bpe_hand_example():
    # "aaabdaaabac" is one chunk (all letters). Counting adjacent pairs by hand:
    #   aa: 4 (twice in each "aaa"), ab: 2, bd: 1, da: 1, ba: 1, ac: 1  -> merge b"aa" first.
    # After it: [aa a b d aa a b a c]: (aa,a): 2 and (a,b): 2 tie; the smaller pair
    # (97, 98) = b"ab" wins. Then [aa ab d aa ab a c]: (aa, ab) occurs twice -> b"aaab".
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3 + 1)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert [tok.vocab[i] for i in (256, 257, 258)] == [b"aa", b"ab", b"aaab"]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.vocab_size == 260 and tok.eot_id == 259


def test_bpe_never_merges_across_chunks_and_stops_early():
    # "a", ".", "a", ... are all one-byte chunks: there is no pair to merge at all.
    tok = BPETokenizer.train("a.a.a.a." * 10, vocab_size=300)
    assert tok.merges == [] and tok.vocab_size == 257 and tok.eot_id == 256


def naive_train(text, n_merges):
    """Reference trainer: recount every pair of every chunk after every merge."""
    words = [list(chunk.encode("utf-8")) for chunk in split_chunks(text)]
    merges = []
    for _ in range(n_merges):
        counts = Counter(p for w in words for p in pairwise(w))
        if not counts:
            break
        # most frequent, then smallest pair
        best = min(counts, key=lambda p: (-counts[p], p))
        words = [merge(w, best, 256 + len(merges)) for w in words]
        merges.append(best)
    return merges


def test_bpe_incremental_training_matches_naive_reference(corpus):
    text = corpus[:4000] + " aaaa aaaaa ééé 中文中文"  # repeated-symbol pairs too
    assert BPETokenizer.train(text, 256 + 120 + 1).merges == naive_train(text, 120)


def test_bpe_training_is_deterministic(corpus, bpe):
    again = BPETokenizer.train(corpus, vocab_size=bpe.vocab_size)
    assert again.merges == bpe.merges


def test_bpe_merges_compress_the_corpus(corpus, bpe):
    n_bytes = len(corpus.encode("utf-8"))
    n_tokens = len(bpe.encode(corpus))
    assert n_bytes / n_tokens > 2.0  # 300 merges already more than halve the length
    assert len(bpe.vocab) == bpe.vocab_size == 256 + len(bpe.merges) + 1


@pytest.mark.parametrize("bad", [0, 256, -1, 300.0, True])
def test_bpe_bad_vocab_size(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("hello", bad)


# ---------------------------------------------------------------------------
# BPE encoding and decoding.
# ---------------------------------------------------------------------------


@given(any_text)
def test_bpe_round_trip_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@given(st.text(non_latin, max_size=50))
def test_bpe_round_trip_non_latin(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(np.array(ids, dtype=np.int64)) == text


def test_bpe_round_trip_examples(bpe):
    for s in ["", "中文字符", "emoji 🎉👍🏽", "e\u0301 combining", "\x00\x07\t\r\n",
              "lone \ud800 surrogate \udfff", "\ud83d\ude00 as two surrogates"]:  # fmt: skip
        assert bpe.decode(bpe.encode(s)) == s


def test_bpe_decode_cut_character_does_not_crash(bpe):
    ids = bpe.encode("é")  # two bytes, c3 a9, not merged in a 300-merge English vocab
    assert bpe.decode(ids[:1]) == "\ufffd"


def test_bpe_eot(bpe):
    ids = bpe.encode(f"one{EOT}two{EOT}")
    assert ids.count(bpe.eot_id) == 2 and ids[-1] == bpe.eot_id
    assert bpe.eot_id == bpe.vocab_size - 1
    assert bpe.decode(ids) == f"one{EOT}two{EOT}"
    assert bpe.decode([bpe.eot_id]) == EOT


def test_bpe_decode_bad_id(bpe):
    with pytest.raises(ValueError, match=rf"{bpe.vocab_size}.*0\.\.{bpe.vocab_size - 1}"):
        bpe.decode([1, bpe.vocab_size])
    with pytest.raises(ValueError, match="-1"):
        bpe.decode([-1])


def test_bpe_cache_does_not_change_results(bpe, corpus):
    bpe.clear_cache()
    cold = bpe.encode(corpus[:5000])
    assert bpe.encode(corpus[:5000]) == cold


# ---------------------------------------------------------------------------
# Character tokenizer.
# ---------------------------------------------------------------------------


def test_char_vocabulary_and_round_trip():
    tok = CharTokenizer("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 9 and tok.eot_id == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode(np.array(tok.encode("low"))) == "low"


@given(st.text(st.sampled_from("abc \n中\ud800<|>endoftx")))
def test_char_round_trip(text):
    tok = CharTokenizer("abc \n中\ud800<|>endoftx")
    assert tok.decode(tok.encode(text)) == text


def test_char_eot():
    tok = CharTokenizer("ab")  # '<', '|', ... are not in the vocabulary, EOT still works
    assert tok.encode(f"a{EOT}b") == [0, 2, 1]
    assert tok.decode([0, tok.eot_id, 1]) == f"a{EOT}b"


def test_char_unknown_character_message():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError) as err:
        tok.encode(f"ab{EOT}cxaz")
    msg = str(err.value)
    assert "'x'" in msg and "'z'" in msg  # which characters
    assert "index 16" in msg  # where: 2 + len(EOT) + 1
    assert "'a', 'b', 'c'" in msg  # what is known


def test_char_unknown_message_is_shortened():
    tok = CharTokenizer("".join(chr(i) for i in range(0x4E00, 0x4E00 + 500)))
    with pytest.raises(ValueError, match="more") as err:
        tok.encode("A")
    assert len(str(err.value)) < 1000


def test_char_decode_bad_id():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"token id 4 .*0\.\.3"):
        tok.decode([0, 4])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), dtype=np.int64))


# ---------------------------------------------------------------------------
# Saving, loading, dicts.
# ---------------------------------------------------------------------------


def test_bpe_save_load(bpe, corpus, tmp_path):
    path = tmp_path / "bpe.json"
    bpe.save(path)
    d = json.loads(path.read_text())
    assert d["type"] == "bpe" and d["version"] == 1 and d["merges"][0] == list(bpe.merges[0])
    loaded = BPETokenizer.load(path)
    assert loaded.merges == bpe.merges and loaded.vocab == bpe.vocab
    text = corpus[:3000] + EOT + "中文 🎉"
    assert loaded.encode(text) == bpe.encode(text)


def test_char_save_load(tmp_path):
    tok = CharTokenizer("hello\n\t\x00中\ud800")
    tok.save(tmp_path / "char.json")
    loaded = CharTokenizer.load(tmp_path / "char.json")
    assert loaded.chars == tok.chars and loaded.encode("hello中") == tok.encode("hello中")


def test_tokenizer_from_dict(bpe):
    char = CharTokenizer("xyz")
    for tok in (char, bpe):
        d = json.loads(json.dumps(tok.to_dict()))  # what a checkpoint would store
        again = tokenizer_from_dict(d)
        assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
        assert again.encode("zyx") == tok.encode("zyx")
    with pytest.raises(ValueError, match="type"):
        tokenizer_from_dict({"type": "wordpiece"})


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        BPETokenizer.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "char", "version": 1, "chars": []}', "type"),
        ('{"type": "bpe", "version": 99, "merges": []}', "version"),
        ('{"type": "bpe", "version": 1, "merges": [[1, 2, 3]]}', "pairs"),
        ('{"type": "bpe", "version": 1, "merges": [[1, 256]]}', "merge 0"),
        ('{"type": "bpe", "version": 1, "vocab_size": 999, "merges": []}', "vocab_size"),
    ],
)
def test_load_corrupt_file(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=expected) as err:
        BPETokenizer.load(path)
    assert "bad.json" in str(err.value)


def test_char_load_wrong_chars(tmp_path):
    path = tmp_path / "char.json"
    path.write_text('{"type": "char", "version": 1, "chars": ["b", "a"]}')
    with pytest.raises(ValueError, match="sorted"):
        CharTokenizer.load(path)


def test_decode_accepts_a_list_of_numpy_integers():
    tok = CharTokenizer("abc")
    assert tok.decode([np.int64(1), np.int32(2)]) == "bc"
