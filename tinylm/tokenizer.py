"""Tokenizers: turn text into a list of integer ids and back.

A language model never sees text, only integers. A tokenizer fixes the
vocabulary -- the V things the model can read and write -- and two maps:
``encode(str) -> list[int]`` and ``decode(ids) -> str``. tinylm has two.

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

    *Why pre-split.* Before counting pairs the text is cut into chunks with a
    regex in the spirit of GPT-2's: a word with its leading space (" the"),
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


def _check_header(d, expected_type):
    """Check the fields every tokenizer dict has: a "type" and a "version"."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object (dict), got {type(d).__name__}")
    if d.get("type") != expected_type:
        raise ValueError(f'expected "type": "{expected_type}", got {d.get("type")!r}')
    if d.get("version") != FORMAT_VERSION:
        raise ValueError(f'expected "version": {FORMAT_VERSION}, got {d.get("version")!r}')


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

# GPT-2's pattern, rewritten for the stdlib ``re`` (which has no \p{L}):
#   's 't 're 've 'm 'll 'd     English contractions, split off the word
#   ' ?[^\W\d_]+'               letters (\w minus digits and underscore), optional leading space
#   ' ?\d+'                     digits
#   ' ?(?:[^\s\w]|_)+'          anything else: punctuation, symbols, underscore, marks
#   '\s+(?!\S)'                 whitespace, except the last space before a word ...
#   '\s+'                       ... which the word takes as its leading space
# Every character is whitespace, a letter, a digit, or "anything else", so the chunks
# cover the text exactly: "".join(findall(text)) == text.
SPLIT_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
_SPLIT_RE = re.compile(SPLIT_PATTERN)


def split_chunks(text):
    """Cut ``text`` into the chunks BPE works inside: "Hello, world" -> ["Hello", ",", " world"]."""
    return _SPLIT_RE.findall(text)


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


class BPETokenizer(_SavedAsJSON):
    """Byte-level BPE: ids 0..255 are bytes, 256.. are learned merges, the last id is EOT.

    Attributes:
        merges:     list of (left_id, right_id) pairs in rank order; merge r creates id 256 + r.
        vocab:      dict id -> bytes that id decodes to (EOT maps to b"<|endoftext|>").
        vocab_size: 256 + len(merges) + 1.
        eot_id:     256 + len(merges), the last id.

    Build one with ``BPETokenizer.train(text, vocab_size)`` or ``BPETokenizer.load(path)``.
    """

    def __init__(self, merges=()):
        self.merges = []
        self.vocab = {i: bytes([i]) for i in range(256)}
        for rank, (a, b) in enumerate(merges):
            new_id = 256 + rank
            # A merge may only use ids that exist before it: bytes and earlier merges.
            for x in (a, b):
                if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < new_id:
                    raise ValueError(
                        f"merge {rank} is {[a, b]}: ids must be integers in 0..{new_id - 1} "
                        "(bytes and earlier merges)"
                    )
            self.merges.append((a, b))
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.eot_id = 256 + len(self.merges)
        self.vocab[self.eot_id] = EOT.encode("utf-8")
        self.vocab_size = self.eot_id + 1
        self._cache = {}  # chunk (str) -> its ids; see encode()

    # -- training -------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, verbose=False):
        """Learn ``vocab_size - 257`` merges from ``text`` (256 bytes + merges + 1 EOT).

        Stops early if no adjacent pair is left; ``vocab_size`` then says what was learned.
        Ties between equally frequent pairs go to the smallest pair (a, b), so training
        is deterministic.
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
        ids = list(text_to_bytes(chunk))
        while len(ids) >= 2:
            # Of the pairs present, the one learned first (lowest rank) must be applied
            # first, exactly as in training; pairs never learned have rank "infinity".
            pair = min(pairwise(ids), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break  # no learned merge applies any more
            ids = merge(ids, pair, 256 + self.ranks[pair])
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
            for chunk in split_chunks(part):
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

    # -- saving and loading ---------------------------------------------------

    def to_dict(self):
        return {
            "type": "bpe",
            "version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "eot": EOT,
            "split_pattern": SPLIT_PATTERN,
            "merges": [list(pair) for pair in self.merges],
        }

    @classmethod
    def from_dict(cls, d):
        _check_header(d, "bpe")
        merges = d.get("merges")
        if not isinstance(merges, list) or not all(
            isinstance(m, (list, tuple)) and len(m) == 2 for m in merges
        ):
            raise ValueError('"merges" must be a list of [left_id, right_id] pairs')
        if d.get("eot", EOT) != EOT:
            raise ValueError(f'"eot" is {d["eot"]!r}, tinylm uses {EOT!r}')
        if d.get("split_pattern", SPLIT_PATTERN) != SPLIT_PATTERN:
            # Different chunks would give different encodings from the same merges.
            raise ValueError('"split_pattern" differs from this version of tinylm')
        tok = cls([tuple(m) for m in merges])  # checks the ids themselves
        if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
            raise ValueError(
                f'"vocab_size" is {d["vocab_size"]!r} but {len(merges)} merges give '
                f"256 + {len(merges)} + 1 = {tok.vocab_size}"
            )
        return tok

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
