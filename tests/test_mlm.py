"""Tests for tinylm.mlm: the 15% / 80-10-10 masking statistics over many draws, special tokens
and padding never chosen, fresh draws per call, balanced next-sentence pairs, and a
pretraining batch that a Bert reads."""

import numpy as np
import pytest

from tinylm.mlm import (
    mask_tokens,
    nsp_pairs,
    pretraining_batch,
    split_documents,
    split_sentences,
)

V, MASK, CLS, SEP, PAD = 1000, 4, 2, 3, 0
SPECIALS = (PAD, 1, CLS, SEP, MASK)


def sample_ids(rng, B=64, T=128):
    """Sequences [CLS] ... [SEP] ... [SEP] with a random amount of right padding."""
    ids = rng.integers(5, V, size=(B, T))
    lengths = rng.integers(T // 2, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = CLS
    ids[np.arange(B), lengths - 1] = SEP
    ids[:, T // 3] = SEP
    ids[mask == 0] = PAD
    return ids, mask


def test_masking_statistics_over_many_draws():
    rng = np.random.default_rng(0)
    ids, mask = sample_ids(rng)
    candidates = (mask == 1) & ~np.isin(ids, SPECIALS)
    n_candidates = n_chosen = n_masked = n_random = n_kept = 0
    for _ in range(40):
        inputs, labels = mask_tokens(ids, rng, V, MASK, SPECIALS, mask)
        chosen = labels != -100
        assert not (chosen & ~candidates).any()  # never a special token, never padding
        assert np.array_equal(labels[chosen], ids[chosen])  # the label is the original token
        assert np.array_equal(inputs[~chosen], ids[~chosen])  # nothing else changes
        n_candidates += candidates.sum()
        n_chosen += chosen.sum()
        n_masked += (inputs[chosen] == MASK).sum()
        kept = inputs[chosen] == ids[chosen]
        n_kept += kept.sum()
        n_random += (~kept & (inputs[chosen] != MASK)).sum()
        assert not np.isin(inputs[chosen & (inputs != MASK)], SPECIALS).any()
    # Binomial standard deviations: about 6e-4 for the 15%, 2e-3 for the 80/10/10 split
    # (over ~2e5 candidates and ~3e4 chosen tokens); the tolerances are about 5 of them.
    assert abs(n_chosen / n_candidates - 0.15) < 0.003
    assert abs(n_masked / n_chosen - 0.8) < 0.012
    # a random token equals the original with probability 1/995: "kept" gains 0.1/995
    assert abs(n_random / n_chosen - 0.1) < 0.009
    assert abs(n_kept / n_chosen - 0.1) < 0.009


def test_masks_are_drawn_afresh_and_reproducible():
    ids, mask = sample_ids(np.random.default_rng(1))
    rng = np.random.default_rng(5)
    first = mask_tokens(ids, rng, V, MASK, SPECIALS, mask)
    second = mask_tokens(ids, rng, V, MASK, SPECIALS, mask)
    assert not np.array_equal(first[1], second[1])
    again = mask_tokens(ids, np.random.default_rng(5), V, MASK, SPECIALS, mask)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_masking_leaves_its_input_alone_and_checks_arguments():
    ids, mask = sample_ids(np.random.default_rng(2), B=2, T=16)
    before = ids.copy()
    mask_tokens(ids, np.random.default_rng(0), V, MASK, SPECIALS, mask, mlm_probability=1.0)
    assert np.array_equal(ids, before)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        mask_tokens(ids, 0, V, MASK)
    with pytest.raises(ValueError, match="mlm_probability must be in"):
        mask_tokens(ids, np.random.default_rng(0), V, MASK, mlm_probability=1.5)
    with pytest.raises(ValueError, match="attention_mask must have ids' shape"):
        mask_tokens(ids, np.random.default_rng(0), V, MASK, attention_mask=mask[:, :3])


def test_probability_one_chooses_every_candidate():
    ids, mask = sample_ids(np.random.default_rng(3), B=4, T=32)
    _, labels = mask_tokens(ids, np.random.default_rng(0), V, MASK, SPECIALS, mask,
                            mlm_probability=1.0)
    assert np.array_equal(labels != -100, (mask == 1) & ~np.isin(ids, SPECIALS))


# ----------------------------------------------------------------------------------------------
# Next-sentence pairs


def documents():
    return [[f"d{d} s{i}" for i in range(3 + d % 4)] for d in range(12)]


def test_nsp_pairs_are_balanced_and_right():
    docs = documents()
    rng = np.random.default_rng(0)
    n_random_from_same_document = 0
    for n in (1, 2, 7, 100):
        pairs = nsp_pairs(docs, rng, n)
        labels = [label for _, _, label in pairs]
        assert len(pairs) == n and labels.count(0) == (n + 1) // 2  # exactly half
        for a, b, label in pairs:
            da, ia = (int(x[1:]) for x in a.split())
            db, ib = (int(x[1:]) for x in b.split())
            if label == 0:
                assert (db, ib) == (da, ia + 1)  # the next sentence of the same document
            else:
                n_random_from_same_document += db == da
    assert n_random_from_same_document == 0


def test_nsp_pairs_vary_their_order_and_sentences():
    docs = documents()
    rng = np.random.default_rng(1)
    first, second = nsp_pairs(docs, rng, 50), nsp_pairs(docs, rng, 50)
    assert first != second
    labels = np.array([[label for _, _, label in nsp_pairs(docs, rng, 20)] for _ in range(300)])
    assert np.all(labels.sum(axis=1) == 10)
    assert np.all(np.abs(labels.mean(axis=0) - 0.5) < 0.12)  # each slot is random, not fixed


def test_nsp_pairs_need_two_documents_with_sentences():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least 2 documents"):
        nsp_pairs([["a", "b"]], rng, 4)
    with pytest.raises(ValueError, match="no document has two sentences"):
        nsp_pairs([["a"], ["b"]], rng, 4)


def test_split_sentences_and_documents():
    assert split_sentences("It works. Does it?  Yes!\nIt does.") == [
        "It works.", "Does it?", "Yes!", "It does.",
    ]
    text = "One. Two.\n\nA lonely sentence.\n\nThree here. Four there. Five."
    assert split_documents(text) == [["One.", "Two."], ["Three here.", "Four there.", "Five."]]


def test_a_pretraining_batch_from_the_built_in_corpus_runs_through_bert():
    from tinylm.bert import Bert, BertConfig
    from tinylm.data import load_corpus
    from tinylm.wordpiece import WordPieceTokenizer

    text = load_corpus("pydoc", max_bytes=150_000)
    docs = split_documents(text)
    assert len(docs) > 50
    tok = WordPieceTokenizer.train(text, vocab_size=600)
    rng = np.random.default_rng(0)
    batch = pretraining_batch(tok, nsp_pairs(docs, rng, 8), max_length=48, rng=rng)
    B, T = batch["idx"].shape
    assert B == 8 and T <= 48
    assert np.all(batch["idx"][:, 0] == tok.cls_id)
    assert np.all(batch["mlm_labels"][batch["attention_mask"] == 0] == -100)
    assert (batch["mlm_labels"] != -100).sum() > 0
    model = Bert(BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=64))
    _, _, loss = model.forward(batch["idx"], batch["token_type_ids"], batch["attention_mask"],
                               batch["mlm_labels"], batch["nsp_labels"])
    # at initialisation: about log(V) for the MLM loss plus log(2) for NSP
    assert abs(float(loss) - (np.log(tok.vocab_size) + np.log(2))) < 0.5
    grads = model.backward()
    assert set(grads) == set(model.params)
