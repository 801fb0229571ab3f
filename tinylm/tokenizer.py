"""Tokenizers: turn text into a list of integer ids and back.

A language model never sees text, only integers. A tokenizer fixes the
vocabulary -- the V things the model can read and write -- and two maps:
``encode(str) -> list[int]`` and ``decode(ids) -> str``. tinylm has two.

GPT-2's own tokenizer is a BPETokenizer too: ``BPETokenizer.from_pretrained(dir)`` reads its
vocab.json and merges.txt and encodes exactly as Hugging Face's GPT2TokenizerFast, and
``save_pretrained(dir)`` writes a trained one in that format.

CharTokenizer
    One id per distinct character of the training text. Tiny, transparent, and
    a fine start; but it cannot encode a character it never saw, and every
    character costs the model one time step.

BPETokenizer (byte-level byte-pair encoding, as in GPT-2)
    *Why bytes.* Any string is, in UTF-8, a sequence of bytes 0..255. If ids
    0..255 are the raw bytes, every possible text -- Chinese, emoji, a stray
    control character -- can be encoded: there is no "unknown token".
    Characters outside ASCII just take 2 to 4 byte tokens.

    *What a merge is.* Bytes alone make sequences long (the model's context is
    spent on single letters). So training looks at the token sequences of the
    corpus, finds the adjacent pair of ids that occurs most often, say
    (116 't', 104 'h'), and creates a new id 256 meaning "the bytes of 116
    followed by the bytes of 104" = b"th". Every occurrence of the pair is
    replaced by 256, the pairs are counted again, and the next most frequent
    pair becomes 257, and so on. Each merge adds one id; the list of merges,
    in the order they were learned (their *rank*), is the whole tokenizer.
    Encoding a new text replays the merges in rank order; decoding looks each
    id up as a byte string and joins them.

    *Why pre-split.* Before counting pairs the text is cut into chunks with
    GPT-2's own regex (``SPLIT_PATTERN``): a word with its leading space (" the"),
    a run of digits, a run of punctuation, a run of whitespace. Pairs are only
    counted, and merges only applied, *inside* a chunk. Otherwise the most
    frequent pairs would glue words to the punctuation that follows them
    ("dog." "dog!" "dog?" would become three unrelated tokens) and tokens
    would straddle word boundaries. Pre-splitting also makes training fast:
    a corpus of half a million characters has only some tens of thousands
    of *distinct* chunks, so we count each distinct chunk once, with its
    frequency, instead of walking the whole text for every merge.

Both tokenizers know one special token, ``EOT = "<|endoftext|>"``, which
separates documents. It gets the last id (``eot_id``). ``encode`` turns the
literal string "<|endoftext|>" into that single id (what GPT-2's tiktoken does
with ``allowed_special='all'``), and ``decode`` turns the id back into the string,
so ``decode(encode(s)) == s`` for every string.

Training cost (BPE). The naive loop -- recount every pair of the whole corpus
after each merge -- costs O(merges x corpus). Here the pair counts are kept in a
dict together with an index "pair -> the chunks that contain it". A merge only
touches the chunks in the index entry of the merged pair, and only the counts of
pairs in those chunks change; a heap finds the next most frequent pair. Learning
2,000 merges on the ~465 kB default corpus takes about half a second (benchmarks/bpe.py).

Surrogates. A Python ``str`` may hold lone surrogate code points (U+D800..U+DFFF),
which are not valid UTF-8. We encode text with ``errors="surrogatepass"`` (a lone
surrogate becomes the 3 bytes UTF-8 would give it if it were allowed), and decode
with a handler that undoes exactly that and replaces every other invalid byte
sequence with U+FFFD. So the round trip is exact for every ``str``, and a token
sequence cut mid-character (as a model may sample) decodes to "\ufffd" instead of
crashing. One caveat: a decoded string may then contain a lone surrogate, which
``print`` refuses on a UTF-8 terminal; that can only happen if the ids spell one.
"""

from __future__ import annotations

import codecs
import heapq
import json
import re
import time
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import regex

from tinylm.files import read_json_object, write_atomic

EOT = "<|endoftext|>"

# Version of the JSON written by save()/to_dict(); load() refuses any other.
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# Shared helpers: id validation, UTF-8 with surrogates, JSON files.
# ---------------------------------------------------------------------------


def _as_id_list(ids, vocab_size):
    """Return ``ids`` (a list or a 1-D integer NumPy array) as a list of Python ints in range."""
    if hasattr(ids, "ndim") and ids.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got an array of shape {ids.shape}")
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    for n, i in enumerate(ids):
        # bool is an int subclass, and a float 3.0 would index silently: both are mistakes.
        # NumPy integers (from a list such as [np.int64(83)]) have __index__; floats do not.
        if not hasattr(i, "__index__") or type(i).__name__ in ("bool", "bool_"):
            raise ValueError(f"token ids must be integers, got {i!r} ({type(i).__name__})")
        ids[n] = i = i.__index__()
        # Python lists accept negative indices, so check both ends ourselves.
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is out of range: valid ids are 0..{vocab_size - 1}")
    return ids


def _surrogatepass_or_replace(err):
    """Codec error handler: give back lone surrogates, replace any other bad bytes with U+FFFD.

    Python's "surrogatepass" handler decodes the 3 bytes ED A0..BF xx of a surrogate
    and raises on anything else; in that case we do what errors="replace" does.
    """
    try:
        return codecs.lookup_error("surrogatepass")(err)
    except UnicodeDecodeError:
        return codecs.replace_errors(err)


_UTF8_ERRORS = "tinylm.surrogatepass_or_replace"
codecs.register_error(_UTF8_ERRORS, _surrogatepass_or_replace)


def text_to_bytes(text):
    """UTF-8 bytes of ``text``; lone surrogates become their 3-byte form instead of an error."""
    return text.encode("utf-8", errors="surrogatepass")


def bytes_to_text(data):
    """Inverse of ``text_to_bytes``; invalid byte sequences (e.g. a cut character) become U+FFFD."""
    return data.decode("utf-8", errors=_UTF8_ERRORS)


def _write_json(path, d):
    """Write a flat dict as JSON, one list item per line, so a diff or a reader can follow it."""
    lines = []
    for key, value in d.items():
        if isinstance(value, list) and value:
            items = ",\n".join(f"    {json.dumps(v)}" for v in value)
            lines.append(f"  {json.dumps(key)}: [\n{items}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    write_atomic(path, "{\n" + ",\n".join(lines) + "\n}\n")


def _check_header(d, expected_type, versions=(FORMAT_VERSION,)):
    """Check the fields every tokenizer dict has: a "type" and a "version"."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object (dict), got {type(d).__name__}")
    if d.get("type") != expected_type:
        raise ValueError(f'expected "type": "{expected_type}", got {d.get("type")!r}')
    if d.get("version") not in versions or isinstance(d.get("version"), bool):
        expected = " or ".join(str(v) for v in versions)
        raise ValueError(f'expected "version": {expected}, got {d.get("version")!r}')


# ---------------------------------------------------------------------------
# Character-level tokenizer.
# ---------------------------------------------------------------------------


def _shorten(items, head=40, tail=5):
    """'a', 'b', ..., 'z': the reprs of a long list, with the middle left out."""
    reprs = [repr(x) for x in items]
    if len(reprs) > head + tail:
        reprs = reprs[:head] + [f"... ({len(reprs) - head - tail} more) ..."] + reprs[-tail:]
    return ", ".join(reprs)


class _SavedAsJSON:
    """save/load for both tokenizers: the JSON file holds to_dict(), read back by from_dict()."""

    def save(self, path):
        _write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        d = read_json_object(path, "tokenizer file")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"tokenizer file {str(path)!r}: {e}") from e


class CharTokenizer(_SavedAsJSON):
    """One id per character: ids 0..n-1 are the sorted distinct characters of ``text``, id n is EOT.

    >>> tok = CharTokenizer("hello")
    >>> tok.encode("hole"), tok.vocab_size, tok.eot_id
    ([1, 3, 2, 0], 5, 4)
    """

    def __init__(self, text):
        self.chars = sorted(set(text))
        self._stoi = {ch: i for i, ch in enumerate(self.chars)}  # string -> id
        self.eot_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    def encode(self, text):
        """Ids of the characters of ``text``; each "<|endoftext|>" becomes the single ``eot_id``."""
        ids = []
        for k, part in enumerate(text.split(EOT)):
            if k > 0:
                ids.append(self.eot_id)
            try:
                ids.extend(self._stoi[ch] for ch in part)
            except KeyError:
                raise self._unknown_characters_error(text) from None
        return ids

    def _unknown_characters_error(self, text):
        # Slow path, taken only on error: find the first unknown character outside any EOT.
        i, first = 0, None
        while i < len(text):
            if text.startswith(EOT, i):
                i += len(EOT)
            elif text[i] not in self._stoi:
                first = i
                break
            else:
                i += 1
        unknown = sorted(set(text.replace(EOT, "")) - self._stoi.keys())
        return ValueError(
            f"CharTokenizer cannot encode {len(unknown)} unknown character(s) "
            f"{_shorten(unknown, head=10, tail=2)} (first at index {first}). "
            f"Known characters ({len(self.chars)}): {_shorten(self.chars)}. "
            "Build the tokenizer from a text that contains them, or use BPETokenizer."
        )

    def decode(self, ids):
        """The string spelled by ``ids`` (a list or a 1-D integer array); ``eot_id`` gives EOT."""
        ids = _as_id_list(ids, self.vocab_size)
        return "".join(EOT if i == self.eot_id else self.chars[i] for i in ids)

    def to_dict(self):
        return {"type": "char", "version": FORMAT_VERSION, "chars": list(self.chars)}

    @classmethod
    def from_dict(cls, d):
        _check_header(d, "char")
        chars = d.get("chars")
        if not (isinstance(chars, list) and all(isinstance(c, str) and len(c) == 1 for c in chars)):
            raise ValueError('"chars" must be a list of single-character strings')
        if chars != sorted(set(chars)):
            # The ids are the positions in the sorted list; any other order would change them.
            raise ValueError('"chars" must be sorted and free of duplicates')
        return cls("".join(chars))

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------
# Byte-level BPE: pre-splitting, merging, training, encoding.
# ---------------------------------------------------------------------------

# GPT-2's pre-tokenization pattern, exactly (\p{L} letters and \p{N} numbers are Unicode
# classes, which the ``regex`` package knows and the stdlib ``re`` does not):
#   's 't 're 've 'm 'll 'd     English contractions, split off the word (lower case only)
#   ' ?\p{L}+'                  letters, with an optional leading space
#   ' ?\p{N}+'                  numbers
#   ' ?[^\s\p{L}\p{N}]+'        anything else: punctuation, symbols, underscore, marks
#   '\s+(?!\S)'                 whitespace, except the last space before a word ...
#   '\s+'                       ... which the word takes as its leading space
# Every character is whitespace, a letter, a number, or "anything else", so the chunks
# cover the text exactly: "".join(findall(text)) == text.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The stdlib-``re`` approximation of it that tinylm 0.1 trained with (\w minus digits for
# letters, so "x²" was one chunk). Tokenizers saved with it keep it, so they encode as before.
LEGACY_SPLIT_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"

_SPLIT_REGEXES = {
    SPLIT_PATTERN: regex.compile(SPLIT_PATTERN),
    LEGACY_SPLIT_PATTERN: re.compile(LEGACY_SPLIT_PATTERN),
}


def split_chunks(text, pattern=SPLIT_PATTERN):
    """Cut ``text`` into the chunks BPE works inside: "Hello, world" -> ["Hello", ",", " world"]."""
    return _SPLIT_REGEXES[pattern].findall(text)


def merge(ids, pair, new_id):
    """Replace each occurrence of ``pair`` in ``ids``, scanning left to right, by ``new_id``.

    merge([1, 1, 1, 2], (1, 1), 9) == [9, 1, 2]: occurrences do not overlap.
    """
    out = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _pairs(ids):
    """Counter of the adjacent pairs in ``ids``: [1, 2, 1, 2] -> {(1, 2): 2, (2, 1): 1}."""
    return Counter(pairwise(ids))


# ---------------------------------------------------------------------------
# GPT-2's files: vocab.json and merges.txt, with bytes written as printable characters.
# ---------------------------------------------------------------------------


def bytes_to_unicode():
    """GPT-2's table from the 256 byte values to 256 printable characters, byte -> str.

    vocab.json and merges.txt are text, and a token is a byte string, which may hold a space,
    a newline or half of a UTF-8 character. So each byte is written as one printable character:
    the 188 bytes that are already printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ')
    stand for themselves, and the other 68 (control characters, space, ...) take the characters
    from U+0100 on, in byte order. The space byte 0x20 becomes 'Ġ' (U+0120), newline 'Ċ'.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return dict(sorted(table.items()))


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {ch: b for b, ch in BYTE_TO_UNICODE.items()}
GPT2_FILES = ("vocab.json", "merges.txt")
MERGES_HEADER = "#version: 0.2"


def token_to_text(data: bytes) -> str:
    """A token's bytes as vocab.json spells them: b" the" -> "Ġthe"."""
    return "".join(BYTE_TO_UNICODE[b] for b in data)


def text_to_token(text: str) -> bytes | None:
    """Inverse of ``token_to_text``; None for a string outside the 256 characters (a special
    token such as "<pad>" is inside them; one written with a space or a CJK character is not)."""
    try:
        return bytes(UNICODE_TO_BYTE[ch] for ch in text)
    except KeyError:
        return None


class BPETokenizer(_SavedAsJSON):
    """Byte-level BPE: every byte has an id, learned merges build longer tokens, plus EOT.

    Attributes:
        merges:     list of (left_id, right_id) pairs in rank order (the order they were learned).
        merge_ids:  merge_ids[r] is the id merge r creates.
        byte_ids:   byte_ids[b] is the id of the single byte b (0..255).
        vocab:      dict id -> bytes that id decodes to (EOT maps to b"<|endoftext|>").
        eot_id:     the id of "<|endoftext|>".
        vocab_size: the number of ids, 0..vocab_size-1.
        split_pattern: the pre-tokenization regex (GPT-2's, ``SPLIT_PATTERN``).

    A tokenizer tinylm trains numbers its ids simply: byte b is id b, merge r creates 256 + r,
    and EOT is the last id, 256 + len(merges). GPT-2's vocab.json numbers them its own way (id
    0 is "!", 50256 is EOT); loading it fills the same tables, so encoding and decoding are the
    same code for both.

    Build one with ``BPETokenizer.train(text, vocab_size)``, ``BPETokenizer.load(path)`` (tinylm's
    JSON) or ``BPETokenizer.from_pretrained(directory)`` (GPT-2's vocab.json + merges.txt).
    """

    def __init__(self, merges=(), split_pattern=SPLIT_PATTERN):
        merges = list(merges)
        for rank, (a, b) in enumerate(merges):
            new_id = 256 + rank
            # A merge may only use ids that exist before it: bytes and earlier merges.
            for x in (a, b):
                if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < new_id:
                    raise ValueError(
                        f"merge {rank} is {[a, b]}: ids must be integers in 0..{new_id - 1} "
                        "(bytes and earlier merges)"
                    )
        vocab = {i: bytes([i]) for i in range(256)}
        for rank, (a, b) in enumerate(merges):
            vocab[256 + rank] = vocab[a] + vocab[b]
        eot_id = 256 + len(merges)
        vocab[eot_id] = EOT.encode("utf-8")
        self._set_tables(
            byte_ids=list(range(256)),
            merges=merges,
            merge_ids=[256 + rank for rank in range(len(merges))],
            vocab=vocab,
            eot_id=eot_id,
            split_pattern=split_pattern,
        )

    def _set_tables(self, byte_ids, merges, merge_ids, vocab, eot_id, split_pattern):
        if split_pattern not in _SPLIT_REGEXES:
            raise ValueError(
                "split_pattern must be GPT-2's (SPLIT_PATTERN) or tinylm 0.1's "
                f"(LEGACY_SPLIT_PATTERN), got {split_pattern!r}"
            )
        self.byte_ids = byte_ids
        self.merges = [tuple(pair) for pair in merges]
        self.merge_ids = merge_ids
        self.vocab = vocab
        self.eot_id = eot_id
        self.vocab_size = len(vocab)
        self.split_pattern = split_pattern
        self.ranks = {}  # (left, right) -> rank; the first merge of a pair counts
        self._merged = {}  # (left, right) -> the id it creates
        for rank, (pair, new_id) in enumerate(zip(self.merges, merge_ids, strict=True)):
            if pair not in self.ranks:
                self.ranks[pair] = rank
                self._merged[pair] = new_id
        self._cache = {}  # chunk (str) -> its ids; see encode()

    def _is_tinylm_layout(self):
        """Whether the ids are numbered as tinylm trains them (bytes, merges, then EOT)."""
        n = len(self.merges)
        return (
            self.byte_ids == list(range(256))
            and self.merge_ids == list(range(256, 256 + n))
            and self.eot_id == 256 + n == self.vocab_size - 1
        )

    # -- training -------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, verbose=False):
        """Learn ``vocab_size - 257`` merges from ``text`` (256 bytes + merges + 1 EOT).

        Stops early if no adjacent pair is left; ``vocab_size`` then says what was learned.
        Ties between equally frequent pairs go to the smallest pair (a, b), so training
        is deterministic. The text is pre-split with GPT-2's pattern (``SPLIT_PATTERN``).
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise ValueError(
                "vocab_size must be an integer >= 257 (256 bytes + the EOT token), "
                f"got {vocab_size!r}"
            )
        n_merges = vocab_size - 257
        t0 = time.perf_counter()

        # 1. Distinct chunks and how often each occurs. The EOT marker is a separator,
        #    not text to learn from, so it is cut out first, exactly as encode() does.
        chunk_freq = Counter()
        for part in text.split(EOT):
            chunk_freq.update(split_chunks(part))
        words = [list(text_to_bytes(chunk)) for chunk in chunk_freq]  # each chunk as ids
        freqs = list(chunk_freq.values())  # freqs[w] = occurrences of words[w] in the text

        # 2. Pair counts over the whole text, and an index from each pair to the words
        #    containing it. A word w that occurs freqs[w] times adds freqs[w] per occurrence
        #    of the pair inside it.
        pair_count = defaultdict(int)  # (a, b) -> occurrences in the text
        where = defaultdict(set)  # (a, b) -> indices w of the words that contain it
        for w, ids in enumerate(words):
            for pair, n in _pairs(ids).items():
                pair_count[pair] += n * freqs[w]
                where[pair].add(w)

        # 3. A max-heap of (count, pair), as (-count, pair) on Python's min-heap, so the
        #    top is the most frequent pair and, among equal counts, the smallest pair.
        #    Counts change after every merge; rather than find and update old entries we
        #    push a fresh one and, when popping, skip entries whose count is out of date
        #    ("lazy deletion").
        heap = [(-n, pair) for pair, n in pair_count.items()]
        heapq.heapify(heap)

        merges = []
        while len(merges) < n_merges:
            best = None
            while heap:
                neg_n, pair = heapq.heappop(heap)
                if pair_count.get(pair) == -neg_n:  # an up-to-date entry
                    best = pair
                    break
            if best is None:
                break  # no pair left anywhere: every chunk is a single token
            new_id = 256 + len(merges)
            merges.append(best)

            # 4. The incremental update. Only the words that contain `best` change, and the
            #    index tells us which. For each, compare its pairs before and after the merge:
            #        old = a X Y b   pairs (a,X) (X,Y) (Y,b)       with best = (X, Y)
            #        new = a Z b     pairs (a,Z) (Z,b)             Z = new_id
            #    (a,X), (X,Y), (Y,b) lose freqs[w] each; (a,Z), (Z,b) gain freqs[w] each.
            #    Counting "after minus before" with Counters also gets repeats right,
            #    e.g. best = (X, X) in "X X X" -> "Z X".
            changed = set()  # pairs whose count moved, to push to the heap once each
            for w in where.pop(best):
                old_pairs = _pairs(words[w])
                words[w] = merge(words[w], best, new_id)
                new_pairs = _pairs(words[w])
                for pair in old_pairs.keys() | new_pairs.keys():
                    delta = new_pairs[pair] - old_pairs[pair]
                    if delta:
                        pair_count[pair] += delta * freqs[w]
                        changed.add(pair)
                    # Keep the index exact: w now contains `pair` iff new_pairs has it.
                    if pair in new_pairs:
                        where[pair].add(w)
                    elif pair != best:  # best's entry is already popped
                        where[pair].discard(w)
            for pair in changed:
                if pair_count[pair] == 0:
                    del pair_count[pair]  # also makes any heap entry of it stale
                else:
                    heapq.heappush(heap, (-pair_count[pair], pair))
            # Every occurrence was merged, so `best` can never be chosen again.
            assert best not in pair_count

            if verbose and (len(merges) % max(1, n_merges // 20) == 0 or len(merges) == 1):
                tok = cls(merges)  # cheap: only to show the bytes of the new token
                print(
                    f"merge {len(merges):5d}/{n_merges}: {best} -> {new_id} "
                    f"{tok.vocab[new_id]!r}  ({-neg_n} occurrences, "
                    f"{time.perf_counter() - t0:.1f}s)"
                )

        if verbose and len(merges) < n_merges:
            print(f"stopped early after {len(merges)} merges: no adjacent pairs left")
        return cls(merges)

    # -- encoding and decoding ------------------------------------------------

    def _encode_chunk(self, chunk):
        """Ids of one pre-split chunk: start from its bytes and replay merges in rank order."""
        ids = [self.byte_ids[b] for b in text_to_bytes(chunk)]
        ranks = self.ranks
        while len(ids) >= 2:
            # Of the pairs present, the one learned first (lowest rank) must be applied
            # first, exactly as in training; pairs never learned have rank "infinity".
            pair = min(pairwise(ids), key=lambda p: ranks.get(p, float("inf")))
            if pair not in ranks:
                break  # no learned merge applies any more
            ids = merge(ids, pair, self._merged[pair])
        return ids

    def encode(self, text):
        """Ids of ``text``: EOT -> ``eot_id``, then pre-split, then merges inside each chunk.

        Text is mostly the same few thousand words, so each distinct chunk is encoded once
        and remembered in ``self._cache`` (cleared by ``clear_cache()``).
        """
        ids = []
        cache = self._cache
        for k, part in enumerate(text.split(EOT)):
            if k > 0:
                ids.append(self.eot_id)
            for chunk in split_chunks(part, self.split_pattern):
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    chunk_ids = cache[chunk] = self._encode_chunk(chunk)
                ids.extend(chunk_ids)
        return ids

    def clear_cache(self):
        """Forget the encoded chunks (the cache grows with the number of distinct chunks seen)."""
        self._cache = {}

    def decode(self, ids):
        """The string spelled by ``ids`` (list or 1-D integer array): join the bytes, then UTF-8.

        A sequence cut in the middle of a character gives U+FFFD instead of an error.
        """
        ids = _as_id_list(ids, self.vocab_size)
        return bytes_to_text(b"".join(self.vocab[i] for i in ids))

    # -- tinylm's JSON (checkpoints, --tokenizer files) -----------------------

    def to_dict(self):
        """A JSON-able dict. Version 1 (merges as id pairs) for tinylm's own numbering; version 2
        (GPT-2's vocab.json and merges.txt, as a dict and a list) for any other."""
        if not self._is_tinylm_layout():
            vocab, merges = self._gpt2_tables()
            return {
                "type": "bpe",
                "version": 2,
                "vocab_size": self.vocab_size,
                "eot": EOT,
                "split_pattern": self.split_pattern,
                "merges": merges,
                "vocab": vocab,
            }
        return {
            "type": "bpe",
            "version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "eot": EOT,
            "split_pattern": self.split_pattern,
            "merges": [list(pair) for pair in self.merges],
        }

    @classmethod
    def from_dict(cls, d):
        _check_header(d, "bpe", versions=(1, 2))
        if d.get("eot", EOT) != EOT:
            raise ValueError(f'"eot" is {d["eot"]!r}, tinylm uses {EOT!r}')
        # Version 1 dicts written before GPT-2's exact pattern came in carry the old one.
        pattern = d.get("split_pattern", LEGACY_SPLIT_PATTERN if d["version"] == 1 else None)
        if pattern not in _SPLIT_REGEXES:
            # Different chunks would give different encodings from the same merges.
            raise ValueError(
                "\"split_pattern\" is neither GPT-2's nor tinylm 0.1's; this tinylm cannot "
                "encode with it"
            )
        merges = d.get("merges")
        if d["version"] == 2:
            vocab = d.get("vocab")
            if not isinstance(vocab, dict):
                raise ValueError('"vocab" must be an object of token -> id')
            if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
                raise ValueError('"merges" must be a list of "left right" strings')
            tok = cls._from_gpt2_tables(vocab, merges, pattern)
        else:
            if not isinstance(merges, list) or not all(
                isinstance(m, (list, tuple)) and len(m) == 2 for m in merges
            ):
                raise ValueError('"merges" must be a list of [left_id, right_id] pairs')
            tok = cls([tuple(m) for m in merges], split_pattern=pattern)  # checks the ids
        if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
            raise ValueError(
                f'"vocab_size" is {d["vocab_size"]!r} but the tokens and merges give '
                f"{tok.vocab_size}"
            )
        return tok

    # -- GPT-2's files: vocab.json + merges.txt -------------------------------

    @classmethod
    def from_pretrained(cls, directory):
        """GPT-2's tokenizer (or any byte-level BPE in its format) from ``directory``.

        vocab.json maps each token, its bytes spelled with ``BYTE_TO_UNICODE``, to its id;
        merges.txt lists the merges in rank order, one "left right" per line, after a
        "#version" line. "<|endoftext|>" is the id vocab.json gives it (50256 in GPT-2), or
        the next free id when it has none. Raises FileNotFoundError when a file is missing
        and ValueError naming the file and line when one is malformed.
        """
        directory = Path(directory)
        if not directory.is_dir():
            if directory.exists():
                raise ValueError(f"{str(directory)!r} is not a directory holding vocab.json")
            raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
        vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
        vocab = read_json_object(vocab_path, "tokenizer file")
        if not merges_path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(merges_path)!r} does not exist")
        try:
            lines = merges_path.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as err:
            raise ValueError(f"tokenizer file {str(merges_path)!r} is not UTF-8 text") from err
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        while lines and lines[-1] == "":
            lines.pop()
        try:
            return cls._from_gpt2_tables(vocab, lines, SPLIT_PATTERN)
        except ValueError as err:
            raise ValueError(f"tokenizer {str(directory)!r}: {err}") from err

    @classmethod
    def _from_gpt2_tables(cls, vocab: dict, merge_lines: list, split_pattern):
        """Build from vocab.json's dict (token -> id) and merges.txt's lines ("left right")."""
        ids = list(vocab.values())
        if any(type(i) is not int for i in ids) or sorted(ids) != list(range(len(ids))):
            raise ValueError("vocab.json: the ids must be the integers 0..n-1, each once")
        vocab = dict(vocab)
        if EOT not in vocab:
            vocab[EOT] = len(vocab)  # as GPT2TokenizerFast adds it: the next id
        id_bytes = {}
        for token, i in vocab.items():
            data = text_to_token(token)
            # A special token spelled outside the byte alphabet decodes to its own text.
            id_bytes[i] = data if data is not None else token.encode("utf-8")
        byte_ids = []
        for b in range(256):
            i = vocab.get(BYTE_TO_UNICODE[b])
            if i is None:
                raise ValueError(
                    f"vocab.json has no token for byte 0x{b:02x} ({BYTE_TO_UNICODE[b]!r}); "
                    "a byte-level BPE needs all 256"
                )
            byte_ids.append(i)
        merges, merge_ids = [], []
        for n, line in enumerate(merge_lines, start=1):
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f'merges.txt line {n}: expected "left right", got {line!r}')
            left, right = parts
            for token in (left, right, left + right):
                if token not in vocab:
                    raise ValueError(
                        f"merges.txt line {n} ({line!r}): {token!r} is not in vocab.json"
                    )
            merges.append((vocab[left], vocab[right]))
            merge_ids.append(vocab[left + right])
        tok = cls.__new__(cls)
        tok._set_tables(byte_ids, merges, merge_ids, dict(sorted(id_bytes.items())),
                        vocab[EOT], split_pattern)  # fmt: skip
        return tok

    def _gpt2_tables(self):
        """(vocab.json's dict token -> id, merges.txt's lines) for this tokenizer."""
        vocab = {}
        for i, data in self.vocab.items():
            token = EOT if i == self.eot_id else token_to_text(data)
            if token in vocab:
                raise ValueError(
                    f"ids {vocab[token]} and {i} both spell {data!r}; GPT-2's vocab.json can "
                    "hold each token only once"
                )
            vocab[token] = i
        merges = []
        for a, b in self.merges:
            merges.append(f"{token_to_text(self.vocab[a])} {token_to_text(self.vocab[b])}")
        return vocab, merges

    def pretrained_files(self) -> dict[str, str]:
        """The files ``save_pretrained`` writes, name -> text: vocab.json, merges.txt and
        tokenizer_config.json (which tells ``transformers`` the class and the EOT token)."""
        if self.split_pattern != SPLIT_PATTERN:
            raise ValueError(
                "this tokenizer pre-splits with tinylm 0.1's pattern, not GPT-2's, so GPT-2's "
                "files would encode differently; retrain it with this tinylm"
            )
        vocab, merges = self._gpt2_tables()
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "bos_token": EOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "model_max_length": 1024,
        }
        return {
            "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
            "merges.txt": "\n".join([MERGES_HEADER, *merges]) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        }

    def save_pretrained(self, directory):
        """Write GPT-2's tokenizer files into ``directory`` (created if missing), each atomically;
        ``BPETokenizer.from_pretrained`` and ``GPT2TokenizerFast.from_pretrained`` read them.
        Returns the directory as a Path."""
        directory = Path(directory)
        files = self.pretrained_files()
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            write_atomic(directory / name, text)
        return directory

    def __repr__(self):
        return f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"


def tokenizer_from_dict(d):
    """Rebuild a CharTokenizer or BPETokenizer from its ``to_dict()`` (as stored in checkpoints)."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind == "bpe":
        return BPETokenizer.from_dict(d)
    raise ValueError(f'unknown tokenizer dict: expected "type" "char" or "bpe", got {kind!r}')
