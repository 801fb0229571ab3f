"""The training loop: it learns, it resumes bit for bit, it writes its run directory, and its
validation loss is the exact mean over the whole split. Tiny models, a few dozen steps."""

import json

import numpy as np
import pytest

from tinylm import data as data_io
from tinylm.checkpoint import load_checkpoint
from tinylm.model import GPT, GPTConfig
from tinylm.parallel import workers_can_start
from tinylm.training import TrainConfig, TrainingInterrupted, evaluate, train

TINY = dict(
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=16,
    batch_size=8,
    lr=1e-2,
    warmup_steps=2,
    eval_interval=10,
    log_interval=5,
    sample_tokens=0,
    verbose=False,
    progress=False,
)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "fox.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    return path


def test_loss_falls_on_a_repeated_sentence(text_file):
    result = train(text=str(text_file), steps=40, **TINY)
    assert len(result.losses) == 40 and result.step == 40
    first, last = np.mean(result.losses[:3]), np.mean(result.losses[-5:])
    assert first > 3.0  # about log(vocab) = log(30) at the start
    assert last < first - 1.0, (first, last)
    assert result.val_loss < first - 1.0
    assert result.run_dir is None  # no out: nothing written


def _params(model):
    return {k: np.array(a) for k, a in model.params.items()}


def test_resume_is_bit_for_bit(tmp_path, text_file):
    """20 steps in one go == 10 steps, then 10 more resumed from the checkpoint (dropout on)."""
    common = dict(TINY, text=str(text_file), dropout=0.1)
    whole = train(out=str(tmp_path / "whole"), steps=20, **common)

    first = train(out=str(tmp_path / "split"), steps=10, lr_decay_steps=20, **common)
    assert load_checkpoint(tmp_path / "split").step == 10
    rest = train(resume=str(tmp_path / "split"), steps=20, verbose=False, progress=False)

    assert first.losses + rest.losses == whole.losses  # exact float equality, step by step
    assert rest.val_loss == whole.val_loss
    a, b = _params(whole.model), _params(rest.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # The metrics of the resumed directory continue those of the first part.
    steps = [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [5, 10, 15, 20]


@pytest.mark.parametrize("shards, workers", [(1, "threads"), (2, "threads"), (2, "processes")])
def test_interrupted_run_resumes_exactly(tmp_path, text_file, monkeypatch, shards, workers):
    """A KeyboardInterrupt in the middle of step 13 saves the state after step 12 (the random
    draws of the unfinished step undone), and the resumed run matches an uninterrupted one,
    with the batch stepped whole or in two shards: in two threads (two backward calls a step
    in this process) or here and in a worker process (one here)."""
    common = dict(TINY, text=str(text_file), dropout=0.1, steps=20, data_parallel=shards,
                  data_parallel_workers=workers)
    whole = train(out=str(tmp_path / "whole"), **common)

    calls = {"n": 0}
    backward = GPT.backward
    per_step = 1 if workers == "processes" and workers_can_start() else shards

    def backward_then_interrupt(self):
        calls["n"] += 1
        if calls["n"] == per_step * 12 + 1:
            raise KeyboardInterrupt
        return backward(self)

    monkeypatch.setattr(GPT, "backward", backward_then_interrupt)
    with pytest.raises(TrainingInterrupted) as info:
        train(out=str(tmp_path / "cut"), **common)
    assert info.value.step == 12 and info.value.saved
    monkeypatch.setattr(GPT, "backward", backward)

    assert load_checkpoint(tmp_path / "cut").step == 12
    rest = train(resume=str(tmp_path / "cut"), verbose=False, progress=False)
    assert rest.losses == whole.losses[12:]
    a, b = _params(whole.model), _params(rest.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not workers_can_start(), reason="worker processes start on 2 cores or more")
def test_worker_processes_and_threads_train_to_the_same_bits(tmp_path, text_file):
    """data_parallel_workers changes who computes each shard, not what: the same losses at
    every step, the same validation loss and the same weights, with dropout on."""
    common = dict(TINY, text=str(text_file), dropout=0.1, steps=12, data_parallel=3)
    runs = {w: train(data_parallel_workers=w, **common) for w in ("threads", "processes")}
    assert runs["threads"].losses == runs["processes"].losses
    assert runs["threads"].val_loss == runs["processes"].val_loss
    a, b = _params(runs["threads"].model), _params(runs["processes"].model)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_run_saved_before_data_parallel_existed_resumes_with_whole_batches(tmp_path, text_file):
    common = dict(TINY, text=str(text_file), dropout=0.1, steps=20, lr_decay_steps=20,
                  data_parallel=1)
    whole = train(out=str(tmp_path / "whole"), **common)
    train(out=str(tmp_path / "old"), **dict(common, steps=10))
    config_file = tmp_path / "old" / "checkpoint" / "config.json"
    config = json.loads(config_file.read_text())
    del config["train_config"]["data_parallel"]  # as written before the setting existed
    config_file.write_text(json.dumps(config))
    rest = train(resume=str(tmp_path / "old"), steps=20, verbose=False, progress=False)
    assert rest.config.data_parallel == 1
    assert rest.losses == whole.losses[10:]  # the same whole-batch steps, to the bit


def test_run_directory_files(tmp_path, text_file):
    run = tmp_path / "run"
    train(text=str(text_file), out=str(run), steps=20, **dict(TINY, sample_tokens=30))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert set(r) == {"step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed"}
    assert [r["step"] for r in records if r["val_loss"] is not None] == [10, 20]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (run / "samples.txt").read_text(encoding="utf-8")
    assert "=== step 10 ===" in samples and "=== step 20 ===" in samples
    assert load_checkpoint(run).step == 20


def test_validation_loss_is_the_exact_mean_over_the_whole_split():
    rng = np.random.default_rng(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=3)
    model.config.dropout = 0.5  # evaluate must switch dropout off
    val = rng.integers(0, 11, size=101)
    loss = evaluate(model, val, block_size=8, batch_size=3)
    assert model.training  # the mode is restored
    assert evaluate(model, val, block_size=8, batch_size=3) == loss  # deterministic
    assert evaluate(model, val, block_size=8, batch_size=64) == pytest.approx(loss, rel=1e-6)

    # By hand: every target val[1:] once, each window alone, float64 sum / count.
    model.eval()
    total = 0.0
    for start in range(0, 100, 8):
        x = val[None, start : min(start + 8, 100)]
        y = val[None, start + 1 : start + 1 + x.shape[1]]
        _, window_loss = model.forward(x, y)
        total += float(window_loss) * y.size
    assert data_io.count_eval_tokens(val) == 100
    assert loss == pytest.approx(total / 100, rel=1e-6)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="n_layer"):
        TrainConfig(n_layer=-1)
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(dropout=1.0)
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({"n_layer": 2, "bogus": 1})
    with pytest.raises(ValueError, match="n_leyer"):
        train(n_leyer=2)


def test_a_text_too_short_for_one_window_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij", encoding="utf-8")
    with pytest.raises(ValueError, match="too few"):
        train(text=str(path), **TINY)


def test_resume_refuses_a_different_model(tmp_path, text_file):
    train(text=str(text_file), out=str(tmp_path / "run"), steps=5, **TINY)
    with pytest.raises(ValueError, match="n_embd"):
        train(resume=str(tmp_path / "run"), n_embd=32, steps=10)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(text=str(text_file), out=str(tmp_path / "run"), steps=5, **TINY)


def test_bpe_run_resumes_with_its_own_tokenizer(tmp_path, text_file):
    run = str(tmp_path / "bpe")
    first = train(text=str(text_file), out=run, tokenizer="bpe", vocab_size=270, steps=5, **TINY)
    assert first.tokenizer.vocab_size == 270 and first.model.config.vocab_size == 270
    rest = train(resume=run, steps=10, verbose=False, progress=False)
    assert rest.tokenizer.merges == first.tokenizer.merges and rest.step == 10
