"""tinylm.pretraining: BERT's masked-LM + NSP pretraining through the shared training loop. Tiny
models on a 60 kB slice of the pydoc corpus, seconds each."""

import argparse
import json

import numpy as np
import pytest

from tinylm import data as data_io
from tinylm.bert import Bert
from tinylm.checkpoint import load_checkpoint
from tinylm.pretraining import (
    PretrainConfig,
    _setup_pretraining,
    add_pretrain_parser,
    pretrain,
)
from tinylm.training import TrainingInterrupted, train
from tinylm.wordpiece import WordPieceTokenizer

TINY = dict(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8,
            lr=5e-3, warmup_steps=2, eval_interval=10, log_interval=5, eval_batch_size=16,
            eval_batches=2, samples=1, verbose=False, progress=False)  # fmt: skip
TIMING = ("tokens_per_s", "elapsed")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "pydoc.txt"
    path.write_text(data_io.load_corpus("pydoc", max_bytes=60_000), encoding="utf-8")
    return path


def _records(run):
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _params(model):
    return {k: np.array(a) for k, a in model.params.items()}


def test_pretraining_learns_and_reports_mlm_and_nsp_figures(tmp_path, text_file):
    run = tmp_path / "run"
    result = pretrain(text=str(text_file), out=str(run), steps=40, **TINY)
    assert isinstance(result.model, Bert) and isinstance(result.tokenizer, WordPieceTokenizer)
    first, last = np.mean(result.losses[:3]), np.mean(result.losses[-5:])
    assert first > np.log(300)  # MLM at chance (log V) plus NSP (log 2)
    assert last < first - 0.4, (first, last)  # 40 steps: about 0.6 lower

    records = _records(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 35, 40]
    evals = [r for r in records if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    for r in evals:
        assert r["val_loss"] == pytest.approx(r["val_mlm_loss"] + r["val_nsp_loss"])
        assert 0.0 <= r["val_mlm_accuracy"] <= 1.0 and 0.0 <= r["val_nsp_accuracy"] <= 1.0
    assert evals[-1]["val_mlm_accuracy"] > 1 / 300  # above chance
    assert evals[-1]["val_mlm_loss"] < evals[0]["val_mlm_loss"]
    assert result.metrics["val_mlm_accuracy"] == evals[-1]["val_mlm_accuracy"]
    assert "masked (true->guess)" in (run / "samples.txt").read_text(encoding="utf-8")
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_the_validation_batches_are_drawn_once_from_their_own_stream(text_file):
    result = pretrain(text=str(text_file), steps=10, **TINY)
    _, _, task, _, _ = _setup_pretraining(PretrainConfig(text=str(text_file), **TINY), None)
    assert task.evaluate(result.model) == result.metrics  # a new setup draws the same batches
    assert task.evaluate(result.model) == result.metrics  # and evaluating draws nothing
    # Another training batch size changes the training stream, not the validation batches.
    other = PretrainConfig(text=str(text_file), **dict(TINY, batch_size=4))
    _, _, task2, _, _ = _setup_pretraining(other, None)
    for a, b in zip(task.val_batches, task2.val_batches, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_interrupted_pretraining_resumes_record_for_record(tmp_path, text_file, monkeypatch):
    common = dict(TINY, text=str(text_file), dropout=0.1, steps=20)
    whole = pretrain(out=str(tmp_path / "whole"), **common)

    calls = {"n": 0}
    backward = Bert.backward

    def backward_then_interrupt(self):
        calls["n"] += 1
        if calls["n"] == 13:
            raise KeyboardInterrupt
        return backward(self)

    monkeypatch.setattr(Bert, "backward", backward_then_interrupt)
    with pytest.raises(TrainingInterrupted) as info:
        pretrain(out=str(tmp_path / "cut"), **common)
    assert info.value.step == 12
    monkeypatch.setattr(Bert, "backward", backward)

    rest = pretrain(resume=str(tmp_path / "cut"), verbose=False, progress=False)
    assert rest.losses == whole.losses[12:]
    a, b = _params(whole.model), _params(rest.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "cut") == _records(tmp_path / "whole")
    assert (tmp_path / "cut" / "samples.txt").read_text(encoding="utf-8") == (
        tmp_path / "whole" / "samples.txt"
    ).read_text(encoding="utf-8")


def test_a_pretraining_checkpoint_round_trips_the_bert_and_its_wordpiece(tmp_path, text_file):
    run = tmp_path / "run"
    result = pretrain(text=str(text_file), out=str(run), steps=10, **TINY)
    ckpt = load_checkpoint(run)
    assert ckpt.model_type == "bert" and ckpt.step == 10
    model = ckpt.build_model()
    assert isinstance(model, Bert) and model.config == result.model.config
    a, b = _params(result.model), _params(model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    tok = ckpt.tokenizer
    assert isinstance(tok, WordPieceTokenizer) and tok.vocab == result.tokenizer.vocab
    sentence = "The with statement is used to wrap the execution of a block."
    assert tok.encode(sentence) == result.tokenizer.encode(sentence)

    # Its outputs are those of the model that was trained.
    enc = tok.encode_batch([sentence], ["Another one."], max_length=32, truncation=True)
    model.eval(), result.model.eval()
    x = (enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
    mlm_a, nsp_a, _ = model.forward(*x)
    mlm_b, nsp_b, _ = result.model.forward(*x)
    assert np.array_equal(mlm_a, mlm_b) and np.array_equal(nsp_a, nsp_b)


def test_runs_of_the_other_family_are_refused_with_the_right_command(tmp_path, text_file):
    pretrain(text=str(text_file), out=str(tmp_path / "bert"), steps=5, **TINY)
    with pytest.raises(ValueError, match="tinylm pretrain --resume"):
        train(resume=str(tmp_path / "bert"), steps=10)
    with pytest.raises(ValueError, match="holds a bert model"):
        train(init_from=str(tmp_path / "bert"), text=str(text_file), steps=5)


def test_without_nsp_only_the_masked_lm_is_trained(text_file):
    result = pretrain(text=str(text_file), nsp=False, steps=10, **TINY)
    assert not result.model.config.nsp_head
    assert set(result.metrics) == {"val_loss", "val_mlm_loss", "val_mlm_accuracy"}
    assert result.metrics["val_loss"] == result.metrics["val_mlm_loss"]


def test_the_pretrain_command(tmp_path, text_file, capsys):
    parser = argparse.ArgumentParser()
    add_pretrain_parser(parser.add_subparsers())
    run = tmp_path / "run"
    args = parser.parse_args([
        "pretrain", "--text", str(text_file), "--out", str(run), "--steps", "10",
        "--vocab-size", "300", "--n-layer", "1", "--n-embd", "32", "--block-size", "32",
        "--batch-size", "8", "--eval-interval", "10", "--eval-batches", "1", "--no-progress",
    ])  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("tinylm pretrain:") and "MLM accuracy" in out
    assert load_checkpoint(run).train_config["n_embd"] == 32


def test_settings_are_checked():
    with pytest.raises(ValueError, match="mlm_probability"):
        PretrainConfig(mlm_probability=0)
    with pytest.raises(ValueError, match="n_embd must be divisible"):
        PretrainConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="bogus"):
        pretrain(bogus=1)
