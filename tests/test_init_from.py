"""train(init_from=...): fine-tuning starts from a pretrained GPT (a Hugging Face GPT-2 directory
or a tinylm run directory) and leaves a run directory like any other. Tiny models, seconds."""

import numpy as np
import pytest

from tinylm import data as data_io
from tinylm.checkpoint import load_checkpoint
from tinylm.hf.gpt2 import load_gpt2
from tinylm.model import GPT, GPTConfig
from tinylm.tokenizer import BPETokenizer
from tinylm.training import sample_text, train

TEXT = "The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun. " * 40
LOOP = dict(batch_size=4, lr=3e-3, warmup_steps=2, eval_interval=5, log_interval=5,
            sample_tokens=0, verbose=False, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A small random GPT-2 in Hugging Face's layout, with a byte-level BPE in GPT-2's files."""
    path = tmp_path_factory.mktemp("gpt2")
    tokenizer = BPETokenizer.train(TEXT, 300)
    config = GPTConfig(vocab_size=304, block_size=32, n_layer=2, n_head=2, n_embd=16)
    GPT(config, seed=5).save_pretrained(path, tokenizer)  # 304 rows: 4 more than the tokenizer
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "fox.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _params(model):
    return {k: np.array(a) for k, a in model.params.items()}


def test_fine_tuning_starts_from_the_pretrained_weights_and_learns(gpt2_dir, text_file):
    pretrained, tokenizer = load_gpt2(gpt2_dir)
    result = train(init_from=str(gpt2_dir), text=str(text_file), block_size=16, steps=30, **LOOP)

    # The first step's loss is the pretrained model's loss on the first batch.
    ids = np.asarray(tokenizer.encode(TEXT), dtype=np.int64)
    train_ids, _ = data_io.split_train_val(ids, 0.1)
    x, y = data_io.get_batch(train_ids, 16, 4, np.random.default_rng([1337, 1]))
    _, loss0 = pretrained.forward(x, y)
    assert result.losses[0] == pytest.approx(float(loss0), rel=1e-6)

    assert result.model.config.block_size == 32  # all 32 positions kept; windows of 16
    assert result.tokenizer.vocab_size == 300 and result.model.config.vocab_size == 304
    assert np.mean(result.losses[-5:]) < result.losses[0] - 1.0, result.losses


def test_an_init_from_run_saves_its_tokenizer_samples_and_resumes_exactly(
    tmp_path, gpt2_dir, text_file
):
    common = dict(LOOP, init_from=str(gpt2_dir), text=str(text_file), block_size=16, dropout=0.1)
    whole = train(out=str(tmp_path / "whole"), steps=20, **common)
    first = train(out=str(tmp_path / "split"), steps=10, lr_decay_steps=20, **common)
    rest = train(resume=str(tmp_path / "split"), steps=20, verbose=False, progress=False)
    assert first.losses + rest.losses == whole.losses
    a, b = _params(whole.model), _params(rest.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)

    ckpt = load_checkpoint(tmp_path / "split")
    _, tokenizer = load_gpt2(gpt2_dir)
    assert ckpt.tokenizer.encode(TEXT[:200]) == tokenizer.encode(TEXT[:200])
    assert ckpt.model_config.n_layer == 2 and ckpt.train_config["n_embd"] == 16
    model = ckpt.build_model().eval()
    assert isinstance(sample_text(model, ckpt.tokenizer, 10, seed=0), str)


def test_init_from_a_tinylm_run_takes_its_weights_and_a_fresh_optimizer(tmp_path, text_file):
    base = train(out=str(tmp_path / "base"), text=str(text_file), n_layer=1, n_head=2,
                 n_embd=16, block_size=16, steps=10, **LOOP)  # fmt: skip
    tuned = train(init_from=str(tmp_path / "base"), text=str(text_file), block_size=16,
                  out=str(tmp_path / "tuned"), steps=5, **LOOP)  # fmt: skip
    assert tuned.step == 5 and load_checkpoint(tmp_path / "tuned").optimizer_state["step"] == 5
    assert tuned.tokenizer.chars == base.tokenizer.chars
    assert tuned.model.config.n_embd == 16

    # Zero steps would be refused, so compare the first loss with the base model's own.
    x, y = data_io.get_batch(
        data_io.split_train_val(np.array(base.tokenizer.encode(TEXT)), 0.1)[0],
        16, 4, np.random.default_rng([1337, 1]),
    )  # fmt: skip
    _, loss0 = base.model.forward(x, y)
    assert tuned.losses[0] == pytest.approx(float(loss0), rel=1e-6)


@pytest.mark.parametrize("setting", [{"n_layer": 2}, {"n_embd": 32}, {"tokenizer": "char"}])
def test_model_settings_with_init_from_are_refused_in_one_line(gpt2_dir, text_file, setting):
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"{name} cannot be set with init_from") as info:
        train(init_from=str(gpt2_dir), text=str(text_file), steps=5, **setting, **LOOP)
    assert "\n" not in str(info.value)


def test_a_window_longer_than_the_pretrained_positions_is_refused(gpt2_dir, text_file):
    with pytest.raises(ValueError, match="block_size 64 is longer than the 32 positions"):
        train(init_from=str(gpt2_dir), text=str(text_file), block_size=64, steps=5, **LOOP)


def test_init_from_a_directory_without_a_tokenizer_is_refused(tmp_path, text_file):
    GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=1, n_embd=8)).save_pretrained(
        tmp_path / "bare"
    )
    with pytest.raises(ValueError, match="no tokenizer"):
        train(init_from=str(tmp_path / "bare"), text=str(text_file), block_size=8, steps=5,
              **LOOP)  # fmt: skip
