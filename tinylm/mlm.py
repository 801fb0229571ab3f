"""BERT's pretraining data: masked-language-model inputs and next-sentence pairs.

    inputs, labels = mask_tokens(ids, rng, vocab_size, mask_id, special_ids, attention_mask)
    pairs = nsp_pairs(documents, rng, n_pairs)          # [(sentence_a, sentence_b, label), ...]
    batch = pretraining_batch(tokenizer, pairs, max_length, rng)   # arrays for Bert.forward

Masked language model (BERT, section 3.1). Each real, non-special token is *chosen* with
probability 15%; the model must predict the original token at the chosen positions, and only
there (every other label is -100, the cross-entropy's ignore_index). A chosen token is shown to
the model as
    [MASK]          with probability 80%
    a random token  with probability 10%   (uniform over the non-special vocabulary)
    itself          with probability 10%
so the model cannot learn that "the word to predict is always [MASK]" (which it never sees at
fine-tuning time), and must keep a good representation of every token. Special tokens ([CLS],
[SEP]) and padding are never chosen. The choice is drawn afresh from the Generator at every
call, so a sequence seen twice is masked differently each time (RoBERTa's "dynamic masking").

Next-sentence prediction (BERT, section 3.1). Pairs of segments (A, B): in half of them B is the
sentence that follows A in its document (label 0, "IsNext", Hugging Face's convention), in the
other half B is a random sentence from another document (label 1, "NotNext"). The model reads
[CLS] A [SEP] B [SEP] and classifies the pooled [CLS] output.
"""

from __future__ import annotations

import re

import numpy as np

from tinylm.bert import IGNORE_INDEX

MLM_PROBABILITY = 0.15
MASK_FRACTION = 0.8  # of the chosen tokens: replaced by [MASK]
RANDOM_FRACTION = 0.1  # of the chosen tokens: replaced by a random token (the rest are kept)


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")


def mask_tokens(ids, rng, vocab_size, mask_id, special_ids=(), attention_mask=None,
                mlm_probability=MLM_PROBABILITY, mask_fraction=MASK_FRACTION,
                random_fraction=RANDOM_FRACTION):
    """BERT's masking of a batch of token ids.

    Inputs:  ids integer (B, T) (any shape works); rng a numpy Generator (fresh draws per
             call); vocab_size; mask_id; special_ids, the ids never chosen ([CLS], [SEP], [PAD],
             ...); attention_mask (B, T), 0 at padding (never chosen), or None.
    Returns: (inputs, labels), both int64 like ids. labels holds the original token at the
             chosen positions and -100 elsewhere; inputs has [MASK], a random token or the
             original there (80/10/10 by default), and ids everywhere else.
    """
    _check_rng(rng)
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be an integer array of token ids, got {ids.dtype}")
    for name, p in (("mlm_probability", mlm_probability), ("mask_fraction", mask_fraction),
                    ("random_fraction", random_fraction)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p!r}")
    if mask_fraction + random_fraction > 1.0:
        raise ValueError(
            f"mask_fraction + random_fraction must be at most 1, got "
            f"{mask_fraction} + {random_fraction}"
        )
    special_ids = np.asarray(sorted(set(int(s) for s in special_ids) | {int(mask_id)}),
                             dtype=np.int64)
    candidate = ~np.isin(ids, special_ids)  # never a special token
    if attention_mask is not None:
        attention_mask = np.asarray(attention_mask)
        if attention_mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask must have ids' shape {ids.shape}, got {attention_mask.shape}"
            )
        candidate &= attention_mask != 0  # never padding
    chosen = candidate & (rng.random(ids.shape) < mlm_probability)
    labels = np.where(chosen, ids, IGNORE_INDEX).astype(np.int64)

    # One uniform draw u per chosen position splits it three ways:
    # u < 0.8 -> [MASK], 0.8 <= u < 0.9 -> random token, u >= 0.9 -> kept.
    u = rng.random(ids.shape)
    to_mask = chosen & (u < mask_fraction)
    to_random = chosen & (u >= mask_fraction) & (u < mask_fraction + random_fraction)
    ordinary = np.setdiff1d(np.arange(vocab_size), special_ids)  # the non-special ids
    if ordinary.size == 0:
        raise ValueError("the vocabulary has no non-special token to draw random tokens from")
    random_tokens = ordinary[rng.integers(0, ordinary.size, size=ids.shape)]
    inputs = ids.astype(np.int64)  # a copy
    inputs[to_mask] = mask_id
    inputs[to_random] = random_tokens[to_random]
    return inputs, labels


# ----------------------------------------------------------------------------------------------
# Next-sentence pairs


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])")


def split_sentences(text: str) -> list[str]:
    """A paragraph's sentences: split after . ! or ? followed by space and a capital letter
    (or an opening quote or bracket). Whitespace inside a sentence becomes one space."""
    text = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(text) if s]


def split_documents(text: str, min_sentences: int = 2) -> list[list[str]]:
    """A corpus as documents of sentences: a document is a paragraph (text between blank
    lines) with at least min_sentences sentences. For tinylm.data.load_corpus("pydoc")."""
    documents = []
    for paragraph in re.split(r"\n\s*\n", text):
        sentences = split_sentences(paragraph)
        if len(sentences) >= min_sentences:
            documents.append(sentences)
    return documents


def nsp_pairs(documents, rng, n_pairs):
    """n_pairs next-sentence pairs (a, b, label) from documents (a list of lists of sentences;
    a sentence may be a string or a list of token ids).

    Exactly half of the pairs (n_pairs // 2, in a random order) are consecutive sentences of a
    document, label 0; the rest pair a sentence with a random sentence of another document,
    label 1. Every draw comes from rng, afresh at each call.
    """
    _check_rng(rng)
    documents = [list(d) for d in documents]
    if len(documents) < 2:
        raise ValueError(f"documents: need at least 2 documents for random pairs, got "
                         f"{len(documents)}")
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 0:
        raise ValueError(f"n_pairs must be a non-negative integer, got {n_pairs!r}")
    # Every (document, sentence) whose sentence has a successor can start a pair.
    starts = [(d, i) for d, doc in enumerate(documents) for i in range(len(doc) - 1)]
    if not starts:
        raise ValueError("documents: no document has two sentences, so no consecutive pair")
    labels = rng.permutation(np.arange(n_pairs) % 2)  # exactly balanced, shuffled
    pairs = []
    for label in labels:
        d, i = starts[rng.integers(len(starts))]
        a = documents[d][i]
        if label == 0:
            b = documents[d][i + 1]
        else:
            other = rng.integers(len(documents) - 1)
            other += other >= d  # any document but d
            b = documents[other][rng.integers(len(documents[other]))]
        pairs.append((a, b, int(label)))
    return pairs


def pretraining_batch(tokenizer, pairs, max_length, rng, mlm_probability=MLM_PROBABILITY):
    """A batch for Bert.forward from NSP pairs of strings and a WordPieceTokenizer.

    Each pair becomes [CLS] a [SEP] b [SEP], truncated to max_length and right-padded to the
    longest; then mask_tokens chooses the MLM positions afresh. Returns a dict of int64 arrays:
    idx, token_type_ids, attention_mask, mlm_labels (B, T) and nsp_labels (B,).
    """
    texts_a = [a for a, _, _ in pairs]
    texts_b = [b for _, b, _ in pairs]
    encoded = tokenizer.encode_batch(texts_a, texts_b, max_length=max_length, truncation=True)
    inputs, labels = mask_tokens(
        encoded["input_ids"], rng, tokenizer.vocab_size, tokenizer.mask_id,
        tokenizer.special_ids, encoded["attention_mask"], mlm_probability,
    )
    return {
        "idx": inputs,
        "token_type_ids": encoded["token_type_ids"],
        "attention_mask": encoded["attention_mask"],
        "mlm_labels": labels,
        "nsp_labels": np.array([label for _, _, label in pairs], dtype=np.int64),
    }
