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


# ---------------------------------------------------------------------------
# GPT-2's format: exact pre-tokenizer, byte table, vocab.json + merges.txt.
# ---------------------------------------------------------------------------

from tinylm.tokenizer import (  # noqa: E402
    BYTE_TO_UNICODE,
    LEGACY_SPLIT_PATTERN,
    SPLIT_PATTERN,
    token_to_text,
)

VARIED = (
    "The quick brown fox's 42 jumps!\n\n  over    the lazy dog.\r\n"
    "def f(x_1):\n\treturn x_1 ** 2  # comment\n"
    "中文字符测试 and emoji 🎉👍🏽 and e\u0301 café naïve Ⅻ ² ½ \x1c\x1f\u00a0x\u3000y"
    + EOT
    + "next doc I'M he'S they've    \n\n\n   end  "
)


def test_gpt2_split_pattern_examples():
    # contractions are lower case only; \p{N} holds Ⅻ and ², which \w calls letters
    assert split_chunks("I'M he's x² Ⅻx") == ["I", "'", "M", " he", "'s", " x", "²", " Ⅻ", "x"]
    assert split_chunks("x² Ⅻx", LEGACY_SPLIT_PATTERN) == ["x²", " Ⅻx"]


def test_byte_table_is_gpt2s():
    assert len(set(BYTE_TO_UNICODE.values())) == 256
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ" and BYTE_TO_UNICODE[ord("\n")] == "Ċ"
    assert BYTE_TO_UNICODE[ord("A")] == "A" and BYTE_TO_UNICODE[0] == "Ā"
    assert token_to_text(b" the") == "Ġthe"


def test_save_pretrained_round_trip(bpe, tmp_path):
    bpe.save_pretrained(tmp_path / "tok")
    lines = (tmp_path / "tok" / "merges.txt").read_text().splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + len(bpe.merges)
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text())
    assert vocab[EOT] == bpe.eot_id and vocab["Ġ"] == ord(" ")
    loaded = BPETokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.vocab == bpe.vocab and loaded.eot_id == bpe.eot_id
    assert loaded.encode(VARIED) == bpe.encode(VARIED)
    assert loaded.to_dict() == bpe.to_dict()  # tinylm's numbering: still version 1


def gpt2_style_directory(path, tok):
    """tok's files renumbered as GPT-2 numbers them: EOT first, then the bytes in table order."""
    vocab, merges = tok._gpt2_tables()
    order = [EOT] + sorted(vocab, key=lambda t: (t != EOT, len(t), t))[1:]
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(order)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


def test_other_numbering_encodes_the_same_text(bpe, tmp_path):
    other = BPETokenizer.from_pretrained(gpt2_style_directory(tmp_path / "g", bpe))
    assert other.eot_id == 0 and other.vocab_size == bpe.vocab_size
    ids = other.encode(VARIED)
    assert [other.vocab[i] for i in ids] == [bpe.vocab[i] for i in bpe.encode(VARIED)]
    assert other.decode(ids) == VARIED
    d = json.loads(json.dumps(other.to_dict()))  # what a checkpoint stores
    assert d["version"] == 2 and tokenizer_from_dict(d).encode(VARIED) == ids


def test_old_pattern_tokenizers_still_load(bpe):
    d = bpe.to_dict()
    d["split_pattern"] = LEGACY_SPLIT_PATTERN
    old = tokenizer_from_dict(d)
    assert old.split_pattern == LEGACY_SPLIT_PATTERN
    assert old.encode("x²") == bpe.encode("x") + bpe.encode("²")  # merges may not join them
    assert split_chunks("x²", old.split_pattern) == ["x²"]
    assert tokenizer_from_dict(bpe.to_dict()).split_pattern == SPLIT_PATTERN
    with pytest.raises(ValueError, match="retrain"):
        old.pretrained_files()
    d["split_pattern"] = r"\w+"
    with pytest.raises(ValueError, match="split_pattern"):
        tokenizer_from_dict(d)


@pytest.mark.parametrize(
    "vocab, merges, expected",
    [
        ('{"a": 0}', "", "byte 0x00"),
        (None, "#version: 0.2\nĠ t h\n", "line 1"),
        (None, "#version: 0.2\nĠ 中\n", "not in vocab.json"),
        ('{"a": 1}', "", "0..n-1"),
    ],
)
def test_from_pretrained_errors(bpe, tmp_path, vocab, merges, expected):
    bpe.save_pretrained(tmp_path)
    if vocab is not None:
        (tmp_path / "vocab.json").write_text(vocab)
    (tmp_path / "merges.txt").write_text(merges)
    with pytest.raises(ValueError, match=expected) as err:
        BPETokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_from_pretrained_missing_files(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BPETokenizer.from_pretrained(tmp_path / "nope")
    bpe.save_pretrained(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        BPETokenizer.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def hf_trained_dir(corpus, tmp_path_factory):
    """A byte-level BPE trained by the `tokenizers` library and saved in GPT-2's format."""
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("hf_bpe")
    trainer = tokenizers.ByteLevelBPETokenizer()
    extra = ["中文字符测试 中文", "emoji 🎉👍🏽 ok", "def f(x):\n    return x**2\n\n\n", "a  b   c"]
    trainer.train_from_iterator([corpus] + extra * 20, vocab_size=900, special_tokens=[EOT],
                                show_progress=False)  # fmt: skip
    trainer.save_model(str(path))
    return path


def test_oracle_same_ids_as_gpt2_tokenizer_fast(hf_trained_dir, corpus):
    transformers = pytest.importorskip("transformers")
    reference = transformers.GPT2TokenizerFast.from_pretrained(hf_trained_dir)
    tok = BPETokenizer.from_pretrained(hf_trained_dir)
    assert tok.eot_id == reference.convert_tokens_to_ids(EOT) == 0  # where this vocab puts it
    for text in (VARIED, corpus[:20_000], "  \n\n \t x", EOT + EOT, ""):
        assert tok.encode(text) == reference(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == text


def test_oracle_transformers_reads_tinylm_files(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save_pretrained(tmp_path)
    reference = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert reference(VARIED)["input_ids"] == bpe.encode(VARIED)
    assert reference.eos_token_id == bpe.eot_id
