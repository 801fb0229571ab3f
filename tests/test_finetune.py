"""Tests for tinylm/finetuning.py and tinylm/tasks.py: reading CSV/TSV data, the classifier made
from a pretrained BERT, the GPT classifier's gradients (float64, central differences), a whole
finetune run directory (files, refusals, overwrite), classify, the two commands through an
argparse parser, the demonstration task's fairness and a tiny fine-tuning clearly above the
majority class; with transformers installed, the saved model loads there with the same
probabilities and labels."""

import argparse
import json
import re

import numpy as np
import pytest

from tinylm.bert import Bert, BertConfig
from tinylm.finetuning import (
    Examples,
    GPTClassifier,
    add_classify_parser,
    add_finetune_parser,
    classify,
    confusion_matrix,
    finetune,
    fit_logistic_regression,
    learning_rate,
    read_examples,
    with_classifier,
    write_examples,
)
from tinylm.gradcheck import check_model_loss, format_table, randomize_params
from tinylm.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow"]
THINGS = ["table", "chair", "lamp", "door", "window", "book"]
FILLER = ["the", "a", "is", "big", "small", "red", "old", "near", "and", "very"]


def toy_examples(n=160, seed=0):
    """Sentences of filler words plus one animal or one thing: label says which."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 7))))
        kind = "animal" if i % 2 else "thing"
        words.insert(int(rng.integers(0, len(words) + 1)),
                     str(rng.choice(ANIMALS if kind == "animal" else THINGS)))
        texts.append(" ".join(words))
        labels.append(kind)
    return Examples(texts, labels)


@pytest.fixture(scope="module")
def tok():
    return WordPieceTokenizer(list(SPECIAL_TOKENS) + ANIMALS + THINGS + FILLER)


@pytest.fixture(scope="module")
def bert_dir(tok, tmp_path_factory):
    """A small pretraining BERT (MLM + NSP heads) saved as a Hugging Face directory."""
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=24)
    path = tmp_path_factory.mktemp("ft") / "bert"
    Bert(config, seed=0).save_pretrained(path, tok)
    return path


# ----------------------------------------------------------------------------------------------
# Data


def test_read_csv_and_tsv_with_pairs(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"a cat, here",pos\nno dog,neg\n\n', encoding="utf-8")
    ex = read_examples(csv_path)
    assert ex.texts == ["a cat, here", "no dog"] and ex.labels == ["pos", "neg"]
    assert ex.pairs is None
    tsv = tmp_path / "d.tsv"
    tsv.write_text("premise\thypothesis\tgold\nA\tB\tyes\nC\tD\tno\n", encoding="utf-8")
    ex = read_examples(tsv, label_column="gold")
    assert ex.texts == ["A", "C"] and ex.pairs == ["B", "D"] and ex.labels == ["yes", "no"]
    ex = read_examples(tsv, text_columns="hypothesis", label_column="gold")
    assert ex.texts == ["B", "D"] and ex.pairs is None
    write_examples(ex, tmp_path / "back.csv")
    assert read_examples(tmp_path / "back.csv").texts == ["B", "D"]


@pytest.mark.parametrize("name, content, kwargs, match", [
    ("d.txt", "text,label\n", {}, "expected a .csv"),
    ("d.csv", "", {}, "is empty"),
    ("d.csv", "text,y\na,b\n", {}, "no column 'label'.*--label-column"),
    ("d.csv", "a,b,c,label\n1,2,3,x\n", {}, "one text column or two"),
    ("d.csv", "text,label\na,x\nb\n", {}, "row 3: 1 fields, the header has 2"),
    ("d.csv", "text,label\na,x\nb,\n", {}, "row 3: the label is empty"),
    ("d.csv", "text,label\na,x\nb,x\n", {}, "at least 2 classes"),
    ("d.csv", "text,label\na,x\n", {"text_columns": ["body"]}, "no column 'body'"),
])
def test_read_errors_name_the_file_and_what_was_expected(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as err:
        read_examples(path, **kwargs)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_examples(tmp_path / "nope.csv")


def test_learning_rate_schedules_and_confusion_matrix():
    rates = [learning_rate(s, 1.0, 2, 10, "linear") for s in range(11)]
    assert rates[:3] == [0.5, 1.0, 1.0] and rates[10] == 0.0
    assert np.allclose(rates[2:], np.linspace(1.0, 0.0, 9))
    assert learning_rate(2, 1.0, 2, 10, "cosine") == 1.0
    assert learning_rate(6, 1.0, 2, 10, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="--schedule"):
        learning_rate(0, 1.0, 2, 10, "step")
    counts = confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_logistic_regression_separates_separable_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    y = (X[:, 0] - 2 * X[:, 3] > 0).astype(int)
    predict = fit_logistic_regression(X, y, 2)
    assert (predict(X) == y).mean() > 0.95


# ----------------------------------------------------------------------------------------------
# Models


def test_with_classifier_keeps_the_encoder_and_drops_the_pretraining_heads(bert_dir):
    pretrained = Bert.from_pretrained(bert_dir)
    model = with_classifier(pretrained, 3, seed=1, dropout=0.2)
    cfg = model.config
    assert (cfg.num_labels, cfg.mlm_head, cfg.nsp_head, cfg.hidden_dropout_prob) == \
        (3, False, False, 0.2)
    for name, array in model.params.items():
        if name.startswith("classifier."):
            continue
        assert np.array_equal(array, pretrained.params[name]), name
    assert not any(k.startswith("cls.") for k in model.params)
    assert model.params["classifier.weight"].shape == (3, 16)
    assert not model.params["classifier.bias"].any()
    assert 0.005 < model.params["classifier.weight"].std() < 0.05  # Normal(0, 0.02)


def test_gpt_classifier_gradients_match_central_differences():
    from tinylm.model import GPT, GPTConfig

    if not hasattr(GPT, "backward_features"):
        pytest.skip("GPT.features / backward_features are not in this tinylm yet")
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8,
                        dropout=0.0), dtype=np.float64)
    randomize_params(gpt, np.random.default_rng(0))
    model = GPTClassifier(gpt, 3, seed=0)
    model.params["score.weight"] = np.random.default_rng(1).normal(size=(3, 8))
    idx = np.array([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 10]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    labels = np.array([2, 0])
    model.classify(idx, None, mask, labels)
    assert set(model.backward()) == set(model.params)
    rows = check_model_loss(model, lambda: model.classify(idx, None, mask, labels)[1])
    assert all(row.ok for row in rows), format_table(rows)
    assert max(row.error for row in rows) < 1e-7
    # The padding after the last real token changes nothing.
    short, _ = model.classify(idx[:1, :4], None, None)
    padded, _ = model.classify(idx[:1], None, mask[:1])
    assert np.allclose(short, padded, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# A whole run directory


def run_finetune(data, init, out, **kw):
    settings = dict(epochs=6, batch_size=16, lr=1e-2, dropout=0.0, max_length=24, quiet=True,
                    evals_per_epoch=1)
    settings.update(kw)
    return finetune(data, init, out, **settings)


def test_finetune_writes_the_run_and_learns_the_toy_task(bert_dir, tmp_path):
    data = tmp_path / "toy.csv"
    write_examples(toy_examples(), data)
    result = run_finetune(data, bert_dir, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("finetune.json", "metrics.jsonl", "curves.png", "confusion_matrix.png",
                 "model/config.json", "model/model.safetensors", "model/vocab.txt"):
        assert (run / name).is_file(), name
    assert result.labels == ["animal", "thing"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[-1]["step"] == 6 * 8  # 128 training rows, batch 16
    assert {"step", "epoch", "lr", "train_loss", "val_loss", "val_accuracy"} <= set(records[0])
    summary = json.loads((run / "finetune.json").read_text())
    assert summary["finished"] and summary["n_train"] == 128 and summary["n_val"] == 32
    assert summary["confusion_matrix"] == result.confusion.tolist()
    assert result.confusion.sum() == 32
    assert result.val_accuracy >= 0.9 > result.majority_accuracy
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "animal", "1": "thing"}
    assert config["architectures"] == ["BertForSequenceClassification"]

    out = classify(run, ["the big dog is near", "a red lamp and a book"])
    assert [r["label"] for r in out] == ["animal", "thing"]
    for r in out:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["score"] == max(r["probabilities"].values())


def test_finetune_opens_with_what_it_is_about_to_do(bert_dir, tmp_path, capsys):
    data = tmp_path / "toy.csv"
    write_examples(toy_examples(), data)
    run_finetune(data, bert_dir, tmp_path / "run", epochs=1, quiet=False)
    first, *evaluations = capsys.readouterr().out.splitlines()
    assert re.match(rf"fine-tuning bert \([\d,]+ parameters\) from {re.escape(str(bert_dir))} on "
                    r"128 examples \(32 for validation\), 2 labels, 1 epoch = 8 steps -> ", first)
    assert len(evaluations) == 1 and evaluations[0].startswith("step     8/8 | epoch 1.00")


def test_finetune_never_writes_into_a_users_directory(bert_dir, tmp_path):
    data = tmp_path / "toy.csv"
    write_examples(toy_examples(40), data)
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty.*--overwrite"):
        run_finetune(data, bert_dir, users, epochs=1)
    with pytest.raises(ValueError, match="not a finetune run.*even with --overwrite"):
        run_finetune(data, bert_dir, users, epochs=1, overwrite=True)
    assert [p.name for p in users.iterdir()] == ["notes.txt"]
    run_finetune(data, bert_dir, tmp_path / "run", epochs=1)
    with pytest.raises(ValueError, match="is not empty"):
        run_finetune(data, bert_dir, tmp_path / "run", epochs=1)
    run_finetune(data, bert_dir, tmp_path / "run", epochs=2, overwrite=True)
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2  # the new run's, not appended to the old one's
    with pytest.raises(ValueError, match="--epochs must be an integer >= 1"):
        run_finetune(data, bert_dir, tmp_path / "other", epochs=0)
    with pytest.raises(FileNotFoundError, match="--from"):
        run_finetune(data, tmp_path / "missing", tmp_path / "other")
    assert not (tmp_path / "other").exists()  # nothing made before the inputs were good


def test_finetune_from_a_tinylm_pretraining_run(tok, tmp_path):
    """A `tinylm pretrain` run (its checkpoint holds a Bert and a WordPiece tokenizer) is a
    starting point like a Hugging Face directory, given as the run or as its checkpoint."""
    from tinylm.checkpoint import save_checkpoint
    from tinylm.optim import AdamW

    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=24,
                        nsp_head=False)
    bert = Bert(config, seed=0)
    save_checkpoint(tmp_path / "pre" / "checkpoint", model=bert, optimizer=AdamW(bert.params),
                    tokenizer=tok, step=0, batch_rng=np.random.default_rng(0))
    data = tmp_path / "toy.csv"
    write_examples(toy_examples(), data)
    for i, init in enumerate((tmp_path / "pre", tmp_path / "pre" / "checkpoint")):
        result = run_finetune(data, init, tmp_path / f"run{i}")
        assert result.val_accuracy >= 0.9
        saved = Bert.from_pretrained(tmp_path / f"run{i}" / "model")
        assert saved.params["bert.embeddings.word_embeddings.weight"].shape == (tok.vocab_size,
                                                                                 16)


def test_a_gpt_that_cannot_be_saved_is_refused_before_training(tmp_path, monkeypatch):
    """A character-level GPT run has no GPT-2 tokenizer, so its classifier could not be written
    as a Hugging Face directory: refused at once, nothing written, no epoch spent."""
    from tinylm import finetuning
    from tinylm.checkpoint import save_checkpoint
    from tinylm.model import GPT, GPTConfig
    from tinylm.optim import AdamW
    from tinylm.tokenizer import CharTokenizer

    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,")
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=1, n_embd=8))
    save_checkpoint(tmp_path / "chars" / "checkpoint", model=gpt, optimizer=AdamW(gpt.params),
                    tokenizer=tok, step=0, batch_rng=np.random.default_rng(0))
    data = tmp_path / "toy.csv"
    write_examples(toy_examples(), data)

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(finetuning, "train_classifier", no_training)
    with pytest.raises(ValueError, match="CharTokenizer"):
        run_finetune(data, tmp_path / "chars", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def parser():
    p = argparse.ArgumentParser(prog="tinylm")
    sub = p.add_subparsers(dest="command", required=True)
    add_finetune_parser(sub)
    add_classify_parser(sub)
    return p


def test_commands_through_argparse(bert_dir, tmp_path, capsys):
    data = tmp_path / "toy.tsv"
    write_examples(toy_examples(), data)
    args = parser().parse_args([
        "finetune", "--data", str(data), "--from", str(bert_dir), "--out", str(tmp_path / "r"),
        "--epochs", "6", "--lr", "1e-2", "--dropout", "0", "--max-length", "24",
        "--schedule", "cosine",
        "--evals-per-epoch", "1", "--quiet",
    ])
    assert args.func(args) == 0
    assert "validation accuracy" in capsys.readouterr().out
    texts = tmp_path / "texts.txt"
    texts.write_text("the old cow is very big\n\na small chair near the door\n")
    args = parser().parse_args(["classify", str(tmp_path / "r"), "--file", str(texts), "--json"])
    assert args.func(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in lines] == ["animal", "thing"]
    assert lines[0]["text"] == "the old cow is very big"
    args = parser().parse_args(["classify", str(tmp_path / "r"), "--text", "a fish"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("animal\t")
    args = parser().parse_args(["classify", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="--text.*--file"):
        args.func(args)


# ----------------------------------------------------------------------------------------------
# The demonstration task


@pytest.fixture(scope="module")
def task():
    from tinylm.tasks import reference_or_docstring

    return reference_or_docstring(n_per_class=250, seed=0, max_files=60)


def test_demonstration_task_is_balanced_and_not_given_away_by_a_character(task):
    from tinylm.tasks import single_character_accuracy

    examples, unlabeled = task
    assert sorted(set(examples.labels)) == ["docstring", "reference"]
    assert examples.labels.count("reference") == examples.labels.count("docstring") == 250
    assert not set(examples.texts) & set(unlabeled)
    for label in ("reference", "docstring"):  # length-matched: the same word counts
        lengths = sorted(len(t.split()) for t, y in zip(examples.texts, examples.labels,
                                                         strict=True) if y == label)
        if label == "reference":
            reference_lengths = lengths
    assert lengths == reference_lengths
    accuracy, _ = single_character_accuracy(examples)
    assert accuracy < 0.62


def test_tiny_fine_tuning_is_clearly_above_the_majority_class(task):
    """benchmarks/finetune.py's fine-tuning arm, tiny: a BERT pretrained here for 30 MLM steps,
    fine-tuned on 360 sentences, tested on 100 it never saw (not even in pretraining)."""
    from tinylm.finetuning import evaluate, split_indices, train_classifier
    from tinylm.tasks import pretrain_mlm

    examples, unlabeled = task
    labels = sorted(set(examples.labels))
    train_rows, test_rows = split_indices(len(examples), 0.2, 0, examples.labels)
    train, test = examples.subset(train_rows), examples.subset(test_rows)
    fit_rows, val_rows = split_indices(len(train), 0.1, 1, train.labels)
    corpus = unlabeled + train.texts
    tok = WordPieceTokenizer.train("\n".join(corpus), vocab_size=600)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=40,
                        nsp_head=False)
    pretrained, losses = pretrain_mlm(tok, corpus, config, 30, batch_size=16, max_length=40)
    assert len(losses) == 30 and np.isfinite(losses).all()
    model = with_classifier(pretrained, len(labels))
    train_classifier(model, tok, train.subset(fit_rows), train.subset(val_rows), labels,
                     epochs=8, batch_size=16, lr=3e-3, max_length=40)
    truth = np.array([labels.index(y) for y in test.labels])
    majority = np.bincount(truth).max() / len(truth)
    assert majority == 0.5  # a stratified split of a balanced task
    _, accuracy, _, _ = evaluate(model, tok, test, {y: i for i, y in enumerate(labels)}, 40)
    assert accuracy >= majority + 0.15, accuracy


# ----------------------------------------------------------------------------------------------
# The oracle: transformers reads the fine-tuned model


def test_oracle_transformers_loads_the_fine_tuned_model(bert_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    data = tmp_path / "toy.csv"
    write_examples(toy_examples(80), data)
    run_finetune(data, bert_dir, tmp_path / "run", epochs=2)
    path = tmp_path / "run" / "model"
    hf = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    assert hf.config.id2label == {0: "animal", 1: "thing"}
    hf_tok = transformers.BertTokenizerFast.from_pretrained(path)
    texts = ["the big dog is near", "a red lamp and a book", "very old fish"]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = torch.softmax(hf(**batch).logits, -1).numpy()
    ours = classify(tmp_path / "run", texts)
    for row, record in zip(theirs, ours, strict=True):
        assert np.abs(row - np.array(list(record["probabilities"].values()))).max() < 1e-5
        assert hf.config.id2label[int(row.argmax())] == record["label"]


# ----------------------------------------------------------------------------------------------
# A GPT fine-tuned the same way (its last real token pooled)


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    """A small GPT-2 directory (random weights) with a byte-level BPE of the toy words."""
    from tinylm.model import GPT, GPTConfig
    from tinylm.tokenizer import BPETokenizer

    if not hasattr(GPT, "backward_features"):
        pytest.skip("GPT.features / backward_features are not in this tinylm yet")
    bpe = BPETokenizer.train(" ".join(toy_examples(200).texts), vocab_size=256 + 40 + 1)
    gpt = GPT(GPTConfig(vocab_size=bpe.vocab_size, block_size=48, n_layer=1, n_head=2,
                        n_embd=16), seed=0)
    path = tmp_path_factory.mktemp("ft") / "gpt2"
    gpt.save_pretrained(path, bpe)
    return path


def test_finetune_a_gpt_and_classify_with_it(gpt_dir, tmp_path):
    data = tmp_path / "toy.csv"
    write_examples(toy_examples(), data)
    result = run_finetune(data, gpt_dir, tmp_path / "run", max_length=48)
    assert result.val_accuracy >= 0.8 > result.majority_accuracy
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "animal", "1": "thing"}
    summary = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert summary["family"] == "gpt2"
    out = classify(tmp_path / "run", ["the big dog is near", "a red lamp and a book"])
    assert [r["label"] for r in out] == ["animal", "thing"]


def test_oracle_transformers_loads_the_fine_tuned_gpt(gpt_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from tinylm.finetuning import gpt_batch, load_gpt_classifier

    data = tmp_path / "toy.csv"
    write_examples(toy_examples(80), data)
    run_finetune(data, gpt_dir, tmp_path / "run", epochs=2, max_length=48)
    path = tmp_path / "run" / "model"
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(path).eval()
    model, bpe, labels = load_gpt_classifier(path)
    texts = ["the big dog is near", "a lamp", "very old fish and a red door"]
    idx, mask = gpt_batch(bpe, texts)  # right-padded with <|endoftext|>, the pad token
    with torch.no_grad():
        theirs = hf(torch.tensor(idx), attention_mask=torch.tensor(mask)).logits.numpy()
    ours, _ = model.eval().classify(idx, None, mask)
    assert np.abs(ours - theirs).max() < 1e-5
    records = classify(tmp_path / "run", texts)
    assert [r["label"] for r in records] == [labels[j] for j in theirs.argmax(1)]


def test_pretrain_gpt_lowers_the_next_token_loss():
    from tinylm.model import GPT, GPTConfig
    from tinylm.tasks import pretrain_gpt
    from tinylm.tokenizer import BPETokenizer

    if not hasattr(GPT, "backward_features"):
        pytest.skip("GPT.features / backward_features are not in this tinylm yet")
    texts = toy_examples(200).texts
    bpe = BPETokenizer.train(" ".join(texts), vocab_size=256 + 40 + 1)
    config = GPTConfig(vocab_size=bpe.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model, losses = pretrain_gpt(bpe, texts, config, steps=40, batch_size=8, lr=1e-2)
    assert len(losses) == 40 and not model.training
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
