"""Tests for tinylm/pipelines.py: pipeline("text-generation") on a Hugging Face directory, a
tinylm run directory and objects; max_length / max_new_tokens, greedy, seeds, errors; and, with
transformers installed, the same greedy text as transformers' own pipeline.

The encoder's pipelines (fill-mask, feature-extraction, text-classification): what they return
checked against the model's own forward, their errors, and with transformers installed the same
tokens, labels and scores (within 1e-5) as transformers.pipeline on the same directory."""

import numpy as np
import pytest

from tinylm.gradcheck import randomize_params
from tinylm.model import GPT, GPTConfig
from tinylm.pipelines import TextGenerationPipeline, pipeline
from tinylm.tokenizer import EOT, BPETokenizer

TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps; the fox runs.\n" * 30
PROMPT = "The quick brown"


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT, vocab_size=256 + 40 + 1)


@pytest.fixture(scope="module")
def hf_dir(bpe, tmp_path_factory):
    config = GPTConfig(vocab_size=bpe.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config, seed=0)
    randomize_params(model, np.random.default_rng(1), scale=0.5)
    path = tmp_path_factory.mktemp("pipe") / "gpt2"
    model.save_pretrained(path, bpe)
    return path


@pytest.fixture(scope="module")
def generator(hf_dir):
    return pipeline("text-generation", model=hf_dir)


def test_returns_hugging_face_records(generator):
    out = generator(PROMPT, max_length=12, num_return_sequences=3, seed=0)
    assert isinstance(out, list) and len(out) == 3
    for record in out:
        assert list(record) == ["generated_text"]
        assert record["generated_text"].startswith(PROMPT)
    assert len({r["generated_text"] for r in out}) > 1  # three draws, not one copied


def test_max_length_counts_the_prompt_max_new_tokens_does_not(generator, bpe, monkeypatch):
    asked = []
    generate = generator.model.generate

    def spy(idx, max_new_tokens, **kw):
        asked.append((idx.shape, max_new_tokens))
        return generate(idx, max_new_tokens, **kw)

    monkeypatch.setattr(generator.model, "generate", spy)
    n_prompt = len(bpe.encode(PROMPT))
    generator(PROMPT, max_length=10, num_return_sequences=2, seed=0)
    generator(PROMPT, max_new_tokens=7, max_length=10, seed=0)  # max_new_tokens wins
    generator(PROMPT, max_length=2, seed=0)  # shorter than the prompt: nothing new
    assert asked == [((2, n_prompt), 10 - n_prompt), ((1, n_prompt), 7), ((1, n_prompt), 0)]


def test_seed_and_greedy(generator):
    a = generator(PROMPT, max_new_tokens=10, num_return_sequences=2, seed=3)
    assert a == generator(PROMPT, max_new_tokens=10, num_return_sequences=2, seed=3)
    greedy = generator(PROMPT, max_new_tokens=10, do_sample=False)
    assert greedy == generator(PROMPT, max_new_tokens=10, do_sample=False, seed=99)
    model, tok = generator.model, generator.tokenizer
    ids = np.array([tok.encode(PROMPT)])
    expected = model.generate(ids, 10, temperature=0, stop_id=tok.eot_id)[0, ids.shape[1] :]
    expected = expected.tolist()
    if tok.eot_id in expected:
        expected = expected[: expected.index(tok.eot_id)]
    assert greedy == [{"generated_text": PROMPT + tok.decode(expected)}]


def test_list_of_prompts_and_return_full_text(generator):
    out = generator([PROMPT, "A lazy"], max_new_tokens=4, num_return_sequences=2, seed=0)
    assert len(out) == 2 and all(len(records) == 2 for records in out)
    assert out[1][0]["generated_text"].startswith("A lazy")
    new_only = generator(PROMPT, max_new_tokens=4, do_sample=False, return_full_text=False)
    full = generator(PROMPT, max_new_tokens=4, do_sample=False)
    assert PROMPT + new_only[0]["generated_text"] == full[0]["generated_text"]


def test_stops_at_end_of_text(bpe):
    """A model that always predicts EOT: the text ends right after the prompt, EOT left out."""
    config = GPTConfig(vocab_size=bpe.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=4)
    model = GPT(config, seed=0)
    model.params["wte.weight"][:] = 0.0
    model.params["wte.weight"][bpe.eot_id] = 1.0  # logits = ln_f(x) @ wte^T: EOT scores high
    model.params["ln_f.bias"][:] = 1.0
    generator = pipeline("text-generation", model=model, tokenizer=bpe)
    assert generator(PROMPT, max_new_tokens=5, do_sample=False) == [{"generated_text": PROMPT}]
    assert EOT not in generator(PROMPT, max_new_tokens=5, seed=0)[0]["generated_text"]


def test_empty_prompt_starts_from_end_of_text(generator):
    out = generator("", max_new_tokens=5, seed=0)
    assert isinstance(out[0]["generated_text"], str)


def test_run_directory(tmp_path, bpe):
    """A tinylm run directory (its checkpoint) works like a Hugging Face directory."""
    from tinylm.checkpoint import save_checkpoint
    from tinylm.optim import AdamW

    config = GPTConfig(vocab_size=bpe.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config, seed=0)
    save_checkpoint(tmp_path / "run" / "checkpoint", model=model, optimizer=AdamW(model.params),
                    tokenizer=bpe, step=0, batch_rng=np.random.default_rng(0))  # fmt: skip
    generator = pipeline("text-generation", model=tmp_path / "run")
    out = generator("The", max_new_tokens=5, num_return_sequences=2, seed=0)
    assert len(out) == 2 and all(r["generated_text"].startswith("The") for r in out)
    ids = np.array([bpe.encode("The")])
    expected = model.generate(ids, 5, temperature=0, stop_id=bpe.eot_id)[0, 1:].tolist()
    expected = expected[: expected.index(bpe.eot_id)] if bpe.eot_id in expected else expected
    greedy = generator("The", max_new_tokens=5, do_sample=False)
    assert greedy == [{"generated_text": "The" + bpe.decode(expected)}]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_return_sequences": 2, "do_sample": False}, ValueError, "do_sample=True"),
        ({"num_return_sequences": 0}, ValueError, "num_return_sequences"),
        ({"max_length": 0}, ValueError, "max_length"),
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ({"temperature": 0}, ValueError, "temperature"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_p": 1.5}, ValueError, "top_p"),
    ],
)
def test_bad_arguments(generator, kwargs, error, match):
    with pytest.raises(error, match=match):
        generator(PROMPT, **kwargs)


def test_bad_task_and_model(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'summarization'.*text-generation"):
        pipeline("summarization", model=hf_dir)
    with pytest.raises(FileNotFoundError, match="nope"):
        pipeline("text-generation", model=tmp_path / "nope")
    with pytest.raises(ValueError, match="tokenizer="):
        pipeline("text-generation", model=GPT.from_pretrained(hf_dir))
    assert isinstance(pipeline("text-generation", model=hf_dir), TextGenerationPipeline)


def test_oracle_greedy_text_matches_transformers_pipeline(hf_dir):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    theirs = transformers.pipeline("text-generation", model=str(hf_dir), device="cpu")
    ours = pipeline("text-generation", model=hf_dir)
    for prompt in (PROMPT, "A lazy dog", "fox"):
        expected = theirs(prompt, max_new_tokens=20, do_sample=False)
        assert ours(prompt, max_new_tokens=20, do_sample=False) == expected
        expected = theirs(prompt, max_length=15, do_sample=False)
        assert ours(prompt, max_length=15, do_sample=False) == expected


# ----------------------------------------------------------------------------------------------
# fill-mask, feature-extraction, text-classification


WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "small", "red", "bird",
         "flew", "over", "house", "##s", "##ed", ".", ",", "!"]


@pytest.fixture(scope="module")
def wordpiece():
    from tinylm.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

    return WordPieceTokenizer(list(SPECIAL_TOKENS) + WORDS)


def small_bert(tok, seed=0, **heads):
    from tinylm.bert import Bert, BertConfig

    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=24, max_position_embeddings=32,
                        **heads)
    model = Bert(config, seed=seed)
    randomize_params(model, np.random.default_rng(seed + 1), scale=0.3)
    return model


@pytest.fixture(scope="module")
def mlm_dir(wordpiece, tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "mlm"
    small_bert(wordpiece, nsp_head=False, pooler=False).save_pretrained(path, wordpiece)
    return path


@pytest.fixture(scope="module")
def cls_dir(wordpiece, tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "cls"
    model = small_bert(wordpiece, seed=3, mlm_head=False, nsp_head=False, num_labels=3)
    model.save_pretrained(path, wordpiece, id2label=["negative", "neutral", "positive"])
    return path


def test_fill_mask_scores_are_the_mlm_softmax(mlm_dir, wordpiece):
    from tinylm.bert import Bert

    unmasker = pipeline("fill-mask", model=mlm_dir)
    out = unmasker("the cat [MASK] on the mat.", top_k=wordpiece.vocab_size)
    model = Bert.from_pretrained(mlm_dir).eval()
    enc = wordpiece.encode("the cat [MASK] on the mat.")
    logits, _, _ = model.forward(np.array([enc["input_ids"]]))
    z = logits[0, 3].astype(np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert [r["token"] for r in out] == np.argsort(-probs, kind="stable").tolist()
    assert np.allclose([r["score"] for r in out], np.sort(probs)[::-1], atol=1e-7)
    best = out[0]
    assert set(best) == {"score", "token", "token_str", "sequence"}
    assert best["token_str"] == wordpiece.vocab[best["token"]]
    filled = enc["input_ids"].copy()
    filled[3] = best["token"]
    assert best["sequence"] == wordpiece.decode(filled, skip_special_tokens=True)
    assert len(unmasker("the cat [MASK] on the mat.")) == 5  # top_k=5 by default


def test_fill_mask_several_masks_and_lists(mlm_dir):
    unmasker = pipeline("fill-mask", model=mlm_dir)
    two = unmasker("the [MASK] [MASK] on the mat.", top_k=2)
    assert len(two) == 2 and all(len(r) == 2 for r in two)
    assert two[0][0]["sequence"].startswith("[CLS] the ")  # the other mask is kept, as HF
    batch = unmasker(["a [MASK] sat.", "the dog [MASK]."], top_k=3)
    assert batch == [unmasker("a [MASK] sat.", top_k=3), unmasker("the dog [MASK].", top_k=3)]


def test_feature_extraction_is_the_last_hidden_state(mlm_dir, wordpiece):
    from tinylm.bert import Bert

    extractor = pipeline("feature-extraction", model=mlm_dir)
    out = extractor("the big dog ran")
    enc = wordpiece.encode("the big dog ran")
    assert np.array(out).shape == (1, len(enc["input_ids"]), 16)
    hidden = Bert.from_pretrained(mlm_dir).eval().features(np.array([enc["input_ids"]]))
    assert np.array_equal(np.array(out, dtype=np.float32), hidden)
    arrays = extractor(["the big dog ran", "a cat"], return_tensors=True)
    assert [a.shape for a in arrays] == [(1, 6, 16), (1, 4, 16)]


def test_feature_extraction_of_a_gpt(hf_dir, bpe):
    if not hasattr(GPT, "features"):
        pytest.skip("GPT.features is not in this tinylm yet")
    extractor = pipeline("feature-extraction", model=hf_dir)
    out = np.array(extractor("The quick brown fox"), dtype=np.float32)
    ids = np.array([bpe.encode("The quick brown fox")])
    assert out.shape == (1, ids.shape[1], 16)
    assert np.array_equal(out, GPT.from_pretrained(hf_dir).eval().features(ids))


def test_text_classification_labels_and_top_k(cls_dir, wordpiece):
    from tinylm.bert import Bert

    classifier = pipeline("text-classification", model=cls_dir)
    assert classifier.labels == ["negative", "neutral", "positive"]
    model = Bert.from_pretrained(cls_dir).eval()
    enc = wordpiece.encode("the big dog ran")
    logits, _ = model.classify(np.array([enc["input_ids"]]))
    z = logits[0].astype(np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    best = int(probs.argmax())
    one = classifier("the big dog ran")
    assert one == [{"label": classifier.labels[best], "score": pytest.approx(probs[best])}]
    every = classifier("the big dog ran", top_k=None)
    assert [r["label"] for r in every] == [classifier.labels[j] for j in np.argsort(-probs)]
    assert sum(r["score"] for r in every) == pytest.approx(1.0)
    assert classifier("the big dog ran", top_k=2) == every[:2]
    many = classifier(["the big dog ran", "a cat sat"])
    assert many[0] == one[0] and isinstance(many[1], dict)
    pair = classifier({"text": "a cat sat", "text_pair": "the dog ran"})
    assert set(pair) == {"label", "score"}
    long = " ".join(["the big dog ran"] * 10)  # 42 tokens; the model reads 32
    with pytest.raises(ValueError, match="42 tokens is longer than the 32 the model reads; pass "
                       "truncation=True"):  # fmt: skip
        classifier(long)
    assert classifier(long, truncation=True) == classifier(" ".join(long.split()[:30]))


def test_encoder_pipeline_errors(mlm_dir, cls_dir, hf_dir, wordpiece):
    unmasker = pipeline("fill-mask", model=mlm_dir)
    with pytest.raises(ValueError, match="no \\[MASK\\] token"):
        unmasker("the cat sat")
    with pytest.raises(ValueError, match="top_k"):
        unmasker("the [MASK]", top_k=0)
    with pytest.raises(ValueError, match="needs a BERT with its MLM head"):
        pipeline("fill-mask", model=cls_dir)
    with pytest.raises(ValueError, match="needs a BERT with a classifier"):
        pipeline("text-classification", model=mlm_dir)
    with pytest.raises(ValueError, match="'gpt2' model.*BERT"):
        pipeline("fill-mask", model=hf_dir)
    with pytest.raises(ValueError, match="tokenizer="):
        pipeline("fill-mask", model=small_bert(wordpiece))
    with pytest.raises(ValueError, match="'text' and 'text_pair'"):
        pipeline("text-classification", model=cls_dir)({"text": "a"})


# The oracle: directories saved by transformers, read by both pipelines.


def hf_bert_dir(transformers, torch, cls, path, **extra):
    """A small random transformers BERT of class cls saved in path, with a vocab.txt."""
    from tinylm.wordpiece import SPECIAL_TOKENS

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(WORDS), hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=24, max_position_embeddings=32, **extra)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("LayerNorm.weight")
            p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if gain else 0.0))
    model.save_pretrained(path)
    (path / "vocab.txt").write_text("\n".join(list(SPECIAL_TOKENS) + WORDS) + "\n")
    return path


def assert_same_records(ours, theirs, keys):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        assert abs(a["score"] - b["score"]) < 1e-5


TEXTS = ["the cat [MASK] on the mat.", "a big [MASK] flew over the house!",
         "[MASK] dogs ran, the birds flew."]


def test_oracle_fill_mask_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    path = hf_bert_dir(transformers, torch, transformers.BertForMaskedLM, tmp_path / "mlm")
    theirs = transformers.pipeline("fill-mask", model=str(path), device="cpu")
    ours = pipeline("fill-mask", model=path)
    for text in TEXTS:
        assert_same_records(ours(text, top_k=5), theirs(text, top_k=5),
                            ("token", "token_str", "sequence"))
    two = "the [MASK] sat on a [MASK]."
    for mine, hf in zip(ours(two, top_k=3), theirs(two, top_k=3), strict=True):
        assert_same_records(mine, hf, ("token", "token_str", "sequence"))


def test_oracle_feature_extraction_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    path = hf_bert_dir(transformers, torch, transformers.BertForMaskedLM, tmp_path / "mlm")
    theirs = transformers.pipeline("feature-extraction", model=str(path), device="cpu")
    ours = pipeline("feature-extraction", model=path)
    for text in ("the cat sat on the mat.", "a big red bird flew over the houses!"):
        a, b = np.array(ours(text)), np.array(theirs(text))
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


def test_oracle_text_classification_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    path = hf_bert_dir(transformers, torch, transformers.BertForSequenceClassification,
                       tmp_path / "cls", num_labels=3, id2label=labels,
                       label2id={v: k for k, v in labels.items()})
    theirs = transformers.pipeline("text-classification", model=str(path), device="cpu")
    ours = pipeline("text-classification", model=path)
    texts = ["the cat sat on the mat.", "a big red bird flew over the houses!", "dogs ran"]
    for text in texts:
        assert_same_records(ours(text, top_k=None), theirs(text, top_k=None), ("label",))
        assert_same_records(ours(text), theirs(text), ("label",))
    assert_same_records(ours(texts), theirs(texts), ("label",))
    pair = {"text": "the cat sat", "text_pair": "a dog ran"}
    assert_same_records([ours(pair)], [theirs(pair)], ("label",))
