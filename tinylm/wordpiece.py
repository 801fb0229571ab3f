"""BERT's WordPiece tokenizer: a basic pre-tokenizer, then greedy longest-match-first pieces.

    tok = WordPieceTokenizer.from_pretrained("bert-dir")          # vocab.txt (+ tokenizer_config)
    tok.tokenize("Héllo, world!")      # ['hello', ',', 'world', '!']  (uncased)
    enc = tok.encode("a question", "its answer", max_length=16, truncation=True,
                     padding="max_length")
    enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]   # [CLS] a [SEP] b [SEP]
    batch = tok.encode_batch(["one", "two texts"])   # NumPy (B, T) arrays, padded to the longest
    tok = WordPieceTokenizer.train(text, vocab_size=4000)          # a vocabulary of your own

Two stages, as in BERT and Hugging Face's ``BertTokenizerFast``:

1. The basic tokenizer turns text into words:
   clean       drop NUL, U+FFFD and control characters; every whitespace character -> ' '
   CJK         put spaces around each CJK ideograph, so each one is a word of its own
   accents     (when strip_accents) decompose (NFD) and drop the combining marks: é -> e
   lower case  (when do_lower_case), character by character
   split       on whitespace, and every punctuation character (ASCII symbols and Unicode
               category P*) becomes a word of its own: "don't!" -> don ' t !
   Special tokens written in the text ("[MASK]", "[SEP]", ...) are kept whole, unnormalised.
2. WordPiece splits each word greedily: the longest prefix that is in the vocabulary, then the
   longest continuation from there, written with "##" ("unaffable" -> un ##aff ##able). A word
   with a part no entry matches, or longer than 100 characters, becomes [UNK] as a whole.

Training (``train``): tinylm learns a WordPiece vocabulary the way Hugging Face's
WordPieceTrainer does, by byte-pair-style merges over the words of the corpus, each word
spelled as its first character then "##"-marked continuation characters: the most frequent
adjacent pair is merged into one entry ("##e" + "##r" -> "##er", "t" + "##he" -> "the") until
the vocabulary is full. The result is a vocab.txt like BERT's; tokenizing uses the greedy
longest match above, not the merges. (Why WordPiece and not tinylm's byte-level BPE with
special tokens: BERT's own tokenizer, its ## pieces and [UNK], loads into and saves from
Hugging Face as vocab.txt, so a model trained here and a downloaded one read text alike.)
"""

from __future__ import annotations

import heapq
import json
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np

from tinylm.files import read_json_object, write_atomic

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's order: ids 0, 100, ...
CONTINUATION = "##"
MAX_INPUT_CHARS_PER_WORD = 100


# ----------------------------------------------------------------------------------------------
# The basic tokenizer


def _is_control(ch: str) -> bool:
    """Unicode "other" characters (Cc, Cf, Cn, Co, Cs), except tab, newline, return (spaces)."""
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    """ASCII symbols (!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~) or Unicode punctuation (P*)."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    """A CJK Unified Ideograph (and its extensions and compatibility blocks)."""
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def normalize(text: str, do_lower_case: bool = True, strip_accents: bool | None = None,
              tokenize_chinese_chars: bool = True) -> str:
    """Steps clean, CJK, accents and lower case of the basic tokenizer (see the module doc)."""
    if strip_accents is None:
        strip_accents = do_lower_case  # BERT's default: uncased models also drop accents
    out = []
    for ch in text:
        if ch == "\x00" or ch == "\ufffd" or _is_control(ch):
            continue
        if ch.isspace():
            out.append(" ")
        elif tokenize_chinese_chars and _is_cjk(ch):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = "".join(out)
    if strip_accents:
        text = "".join(
            ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn"
        )
    if do_lower_case:
        text = "".join(ch.lower() for ch in text)
    return text


def split_words(text: str) -> list[str]:
    """Split normalised text on whitespace, with each punctuation character a word of its own."""
    words = []
    for chunk in text.split():
        start = 0
        for i, ch in enumerate(chunk):
            if _is_punctuation(ch):
                if start < i:
                    words.append(chunk[start:i])
                words.append(ch)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


def wordpiece(word: str, vocab, unk_token: str = "[UNK]",
              max_chars: int = MAX_INPUT_CHARS_PER_WORD) -> list[str]:
    """Greedy longest-match-first: the longest vocabulary entry at each point, "##" after the
    first; the whole word becomes [unk_token] when a part matches nothing or it is too long."""
    if len(word) > max_chars:
        return [unk_token]
    pieces = []
    start = 0
    while start < len(word):
        end = len(word)
        piece = None
        while start < end:
            candidate = word[start:end] if start == 0 else CONTINUATION + word[start:end]
            if candidate in vocab:
                piece = candidate
                break
            end -= 1
        if piece is None:
            return [unk_token]
        pieces.append(piece)
        start = end
    return pieces


# ----------------------------------------------------------------------------------------------
# The tokenizer


class WordPieceTokenizer:
    """BERT's tokenizer over a vocabulary (a list of tokens; a token's id is its index)."""

    def __init__(self, vocab, do_lower_case=True, strip_accents=None,
                 tokenize_chinese_chars=True, unk_token="[UNK]", sep_token="[SEP]",
                 pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]"):
        vocab = list(vocab)
        if len(set(vocab)) != len(vocab):
            seen, dup = set(), None
            for t in vocab:
                if t in seen:
                    dup = t
                    break
                seen.add(t)
            raise ValueError(f"vocab: token {dup!r} appears twice")
        self.vocab = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}
        for name, token in (("unk_token", unk_token), ("sep_token", sep_token),
                            ("pad_token", pad_token), ("cls_token", cls_token),
                            ("mask_token", mask_token)):
            if token not in self.token_to_id:
                raise ValueError(f"vocab: {name} {token!r} is not in the vocabulary")
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.unk_token, self.sep_token, self.pad_token = unk_token, sep_token, pad_token
        self.cls_token, self.mask_token = cls_token, mask_token
        self.special_tokens = [cls_token, sep_token, pad_token, unk_token, mask_token]
        self.special_ids = sorted({self.token_to_id[t] for t in self.special_tokens})

    # -- ids of the special tokens ------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def cls_id(self) -> int:
        return self.token_to_id[self.cls_token]

    @property
    def sep_id(self) -> int:
        return self.token_to_id[self.sep_token]

    @property
    def pad_id(self) -> int:
        return self.token_to_id[self.pad_token]

    @property
    def unk_id(self) -> int:
        return self.token_to_id[self.unk_token]

    @property
    def mask_id(self) -> int:
        return self.token_to_id[self.mask_token]

    # -- text -> tokens -> ids ----------------------------------------------------------------

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        """text as (piece, is_special) pieces: special tokens written in it are kept whole."""
        pieces = [(text, False)]
        for special in self.special_tokens:
            out = []
            for piece, is_special in pieces:
                if is_special or special not in piece:
                    out.append((piece, is_special))
                    continue
                parts = piece.split(special)
                for j, part in enumerate(parts):
                    if j:
                        out.append((special, True))
                    if part:
                        out.append((part, False))
            pieces = out
        return pieces

    def basic_tokenize(self, text: str) -> list[str]:
        """The words of text, before WordPiece (special tokens kept whole)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        words = []
        for piece, is_special in self._split_special(text):
            if is_special:
                words.append(piece)
            else:
                words += split_words(normalize(piece, self.do_lower_case, self.strip_accents,
                                               self.tokenize_chinese_chars))
        return words

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of text (no [CLS] / [SEP] added)."""
        tokens = []
        for word in self.basic_tokenize(text):
            if word in self.special_tokens:
                tokens.append(word)
            else:
                tokens += wordpiece(word, self.token_to_id, self.unk_token)
        return tokens

    def convert_tokens_to_ids(self, tokens) -> list[int]:
        return [self.token_to_id.get(t, self.unk_id) for t in tokens]

    def encode(self, text, text_pair=None, max_length=None, truncation=None, padding=False,
               add_special_tokens=True) -> dict[str, list[int]]:
        """One text (or pair) as {"input_ids", "token_type_ids", "attention_mask"} lists.

            [CLS] a [SEP]            token types 0 ... 0
            [CLS] a [SEP] b [SEP]    token types 0 ... 0 1 ... 1
        truncation=True (with max_length): cut a and b from their ends until the whole fits,
        taking from the longer first (Hugging Face's "longest_first"). truncation=None, the
        default, does so whenever max_length is given, as Hugging Face's tokenizers do (they
        also warn); truncation=False keeps the whole text, however long.
        padding="max_length": pad with [PAD] (attention_mask 0) up to max_length.
        """
        if truncation is None:
            truncation = max_length is not None
        a = self.convert_tokens_to_ids(self.tokenize(text))
        b = None if text_pair is None else self.convert_tokens_to_ids(self.tokenize(text_pair))
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
                raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        n_special = (3 if b is not None else 2) if add_special_tokens else 0
        if truncation and max_length is not None:
            budget = max_length - n_special
            if budget < (2 if b is not None else 1):
                raise ValueError(
                    f"max_length={max_length} leaves no room for the text after "
                    f"{n_special} special tokens"
                )
            a, b = _truncate_longest_first(a, b, budget)
        if add_special_tokens:
            ids = [self.cls_id, *a, self.sep_id]
            types = [0] * len(ids)
            if b is not None:
                ids += [*b, self.sep_id]
                types += [1] * (len(b) + 1)
        else:
            ids = a + (b or [])
            types = [0] * len(a) + [1] * len(b or [])
        mask = [1] * len(ids)
        if padding == "max_length":
            if max_length is None:
                raise ValueError('padding="max_length" needs max_length')
            n_pad = max(0, max_length - len(ids))
            ids += [self.pad_id] * n_pad
            types += [0] * n_pad
            mask += [0] * n_pad
        elif padding not in (False, None, "do_not_pad", True, "longest"):
            raise ValueError(
                f'padding must be False, True, "longest" or "max_length", got {padding!r}'
            )
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}

    def encode_batch(self, texts, text_pairs=None, max_length=None, truncation=None,
                     padding=True) -> dict[str, np.ndarray]:
        """Many texts (or pairs) as int64 NumPy arrays (B, T), right-padded with [PAD] to the
        longest (padding=True) or to max_length (padding="max_length"); truncation as in
        encode."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings; use encode() for one text")
        texts = list(texts)
        pairs = [None] * len(texts) if text_pairs is None else list(text_pairs)
        if len(pairs) != len(texts):
            raise ValueError(
                f"text_pairs must have one entry per text, got {len(pairs)} for {len(texts)}"
            )
        rows = [
            self.encode(t, p, max_length=max_length, truncation=truncation,
                        padding="max_length" if padding == "max_length" else False)
            for t, p in zip(texts, pairs, strict=True)
        ]
        if padding not in (True, "longest", "max_length"):
            lengths = {len(r["input_ids"]) for r in rows}
            if len(lengths) > 1:
                raise ValueError("texts of different lengths need padding=True to make a batch")
        T = max((len(r["input_ids"]) for r in rows), default=0)
        out = {k: np.zeros((len(rows), T), dtype=np.int64)
               for k in ("input_ids", "token_type_ids", "attention_mask")}
        out["input_ids"][:] = self.pad_id
        for i, r in enumerate(rows):
            for k in out:
                out[k][i, : len(r[k])] = r[k]
        return out

    def decode(self, ids, skip_special_tokens=False) -> str:
        """Tokens joined by spaces, "##" continuations glued on, and the space before . ? ! ,
        and English contractions removed (as Hugging Face's WordPiece decoder's cleanup)."""
        tokens = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: {i} is not in [0, {self.vocab_size})")
            if skip_special_tokens and i in self.special_ids:
                continue
            tokens.append(self.vocab[i])
        text = " ".join(tokens).replace(" " + CONTINUATION, "")
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","),
                              (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                              (" 're", "'re")):
            text = text.replace(before, after)
        return text

    # -- files --------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory) -> WordPieceTokenizer:
        """BERT's tokenizer from ``directory``: vocab.txt (one token a line, its id the line
        number) and, if present, tokenizer_config.json (do_lower_case, strip_accents,
        tokenize_chinese_chars and the special tokens' names)."""
        directory = Path(directory)
        if not directory.is_dir():
            if directory.exists():
                raise ValueError(f"{str(directory)!r} is not a directory holding vocab.txt")
            raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
        vocab_path = directory / "vocab.txt"
        if not vocab_path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(vocab_path)!r} does not exist")
        try:
            text = vocab_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"tokenizer file {str(vocab_path)!r} is not UTF-8 text") from err
        vocab = text.split("\n")
        if vocab and vocab[-1] == "":
            vocab.pop()
        vocab = [t.rstrip("\r") for t in vocab]
        options = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.exists():
            config = read_json_object(config_path, "tokenizer file")
            for key in ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "unk_token",
                        "sep_token", "pad_token", "cls_token", "mask_token"):
                value = config.get(key)
                if isinstance(value, dict):  # an AddedToken written out: {"content": ...}
                    value = value.get("content")
                if value is not None:
                    options[key] = value
        try:
            return cls(vocab, **options)
        except ValueError as err:
            raise ValueError(f"tokenizer file {str(vocab_path)!r}: {err}") from err

    def pretrained_files(self) -> dict[str, str]:
        """The files save_pretrained writes, name -> text: vocab.txt and tokenizer_config.json
        (which tells transformers the class and the options)."""
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "unk_token": self.unk_token,
            "sep_token": self.sep_token,
            "pad_token": self.pad_token,
            "cls_token": self.cls_token,
            "mask_token": self.mask_token,
            "model_max_length": 512,
        }
        return {
            "vocab.txt": "\n".join(self.vocab) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        }

    def save_pretrained(self, directory) -> Path:
        """Write vocab.txt and tokenizer_config.json into ``directory`` (created if missing),
        each atomically. Returns the directory as a Path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.pretrained_files().items():
            write_atomic(directory / name, text)
        return directory

    # -- training -----------------------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, do_lower_case=True, min_frequency=2):
        """Learn a WordPiece vocabulary of at most vocab_size tokens from text (a string).

        The vocabulary: BERT's five special tokens, every character seen (as a word start and
        as a "##" continuation), then merged pieces in the order they were learned. Merging
        stops at vocab_size or when no pair occurs min_frequency times.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 6:
            raise ValueError(f"vocab_size must be an integer >= 6, got {vocab_size!r}")
        normalized = normalize(text, do_lower_case)
        counts = Counter(w for w in split_words(normalized) if len(w) <= MAX_INPUT_CHARS_PER_WORD)
        words = [
            [w[0]] + [CONTINUATION + ch for ch in w[1:]] for w in counts
        ]  # each word as its symbols: "the" -> ["t", "##h", "##e"]
        freqs = list(counts.values())
        alphabet = sorted({s for w in words for s in w})
        vocab = list(SPECIAL_TOKENS) + alphabet
        in_vocab = set(vocab)
        if len(vocab) > vocab_size:
            # Too many characters to keep all: keep the most frequent (the rest become [UNK]).
            char_counts = Counter()
            for w, f in zip(words, freqs, strict=True):
                for s in w:
                    char_counts[s] += f
            keep = sorted(alphabet, key=lambda s: (-char_counts[s], s))[: vocab_size - 5]
            vocab = list(SPECIAL_TOKENS) + sorted(keep)
            return cls(vocab, do_lower_case=do_lower_case)

        pair_counts = Counter()
        where = {}  # pair -> the indices of the words that hold it
        for wi, (w, f) in enumerate(zip(words, freqs, strict=True)):
            for pair in zip(w, w[1:], strict=False):
                pair_counts[pair] += f
                where.setdefault(pair, set()).add(wi)
        heap = [(-c, pair) for pair, c in pair_counts.items()]
        heapq.heapify(heap)
        while len(vocab) < vocab_size and heap:
            negative, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -negative:
                continue  # a stale entry: this pair's count changed since it was pushed
            if -negative < min_frequency:
                break
            merged = pair[0] + pair[1][len(CONTINUATION):]
            if merged not in in_vocab:
                vocab.append(merged)
                in_vocab.add(merged)
            changed = set()
            for wi in where.pop(pair, ()):
                w, f = words[wi], freqs[wi]
                for p in zip(w, w[1:], strict=False):  # take the word's old pairs out
                    pair_counts[p] -= f
                    changed.add(p)
                new, i = [], 0
                while i < len(w):
                    if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                        new.append(merged)
                        i += 2
                    else:
                        new.append(w[i])
                        i += 1
                words[wi] = new
                for p in zip(new, new[1:], strict=False):  # and its new pairs in
                    pair_counts[p] += f
                    where.setdefault(p, set()).add(wi)
                    changed.add(p)
            pair_counts.pop(pair, None)
            for p in changed:
                if pair_counts.get(p, 0) > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
        return cls(vocab, do_lower_case=do_lower_case)

    def __repr__(self):
        return (f"WordPieceTokenizer(vocab_size={self.vocab_size}, "
                f"do_lower_case={self.do_lower_case})")


def _truncate_longest_first(a, b, budget):
    """Cut a (and b) from the end so that len(a) + len(b) <= budget, as Hugging Face's
    "longest_first": the shorter sequence keeps its length when the longer one can keep at
    least as many tokens; otherwise each gets half the budget (the longer one the odd token)."""
    if b is None:
        return list(a)[:budget], None
    if len(a) + len(b) <= budget:
        return list(a), list(b)
    short, long = sorted((len(a), len(b)))
    long = max(short, budget - short)
    if short + long > budget:
        short = budget // 2
        long = short + budget % 2
    if len(a) > len(b):
        return list(a)[:long], list(b)[:short]
    return list(a)[:short], list(b)[:long]
