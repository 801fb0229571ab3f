"""Tests for tinylm/pipelines.py: pipeline("text-generation") on a Hugging Face directory, a
tinylm run directory and objects; max_length / max_new_tokens, greedy, seeds, errors; and, with
transformers installed, the same greedy text as transformers' own pipeline."""

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
    with pytest.raises(ValueError, match="unknown task 'fill-mask'.*text-generation"):
        pipeline("fill-mask", model=hf_dir)
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
