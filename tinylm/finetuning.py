"""Fine-tuning a pretrained model for text classification, and using what it learned.

    result = finetune("reviews.csv", init="bert-dir", out="runs/clf", epochs=3)
    classify("runs/clf", ["a new text", ...])    # [{"label", "score", "probabilities"}, ...]

A classifier reads one vector per text and maps it to K class scores:

    BERT   logits = classifier(dropout(pooled)),  pooled = tanh(dense(hidden at [CLS]))
           (Hugging Face's BertForSequenceClassification; tinylm.Bert.classify)
    GPT    logits = score(h at the last real token),   h = GPT.features(idx) (B, T, C)
           (Hugging Face's GPT2ForSequenceClassification: a causal model has seen the whole
           text only at its last token; ``score.weight`` (K, C), no bias)

Fine-tuning trains every parameter, the pretrained ones and the new head, on the mean
cross-entropy of the labels, with AdamW and a learning rate that warms up linearly and then
decays (linearly to 0, as Hugging Face's default, or along a cosine). Texts of different lengths
are batched by right padding with an attention mask, which tinylm's BERT makes exact.

The input is a CSV (or TSV) file with a header row: a label column (default "label") and one
text column, or two for text pairs (the others). Labels are strings; their sorted order gives
the class ids, saved as id2label. A seeded split holds out ``val_fraction`` of the rows.

The run directory ``finetune`` writes (it never writes into a directory that holds anything
else; ``overwrite=True`` replaces a previous finetune run's files and leaves the rest):

    finetune.json           the settings, the labels, the split sizes and the final metrics
    metrics.jsonl           one JSON record per evaluation: step, epoch, lr, train_loss,
                            val_loss, val_accuracy
    curves.png              loss and accuracy against the step
    confusion_matrix.png    validation counts, true class x predicted class
    model/                  a Hugging Face BertForSequenceClassification directory (config.json
                            with id2label, model.safetensors, vocab.txt): transformers loads it,
                            tinylm.pipeline("text-classification", model=RUN) too

Also here, for frozen features: ``sentence_features`` (the mean of the last hidden states over
the real tokens) and ``fit_logistic_regression``, a linear classifier trained in NumPy.

Shape legend: N examples, B batch, T time, C hidden size, K classes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tinylm import layers
from tinylm.bert import Bert
from tinylm.files import write_atomic, write_json_atomic
from tinylm.optim import AdamW, clip_grad_norm, lr_schedule

MODEL_DIR = "model"
RUN_FILE = "finetune.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"
RUN_FILES = (RUN_FILE, METRICS_FILE, CURVES_FILE, CONFUSION_FILE, MODEL_DIR)
SCHEDULES = ("linear", "cosine")


def model_directory(path) -> Path:
    """The Hugging Face directory of a path: RUN/model for a finetune run, else the path."""
    path = Path(path)
    if (path / RUN_FILE).is_file() and (path / MODEL_DIR).is_dir():
        return path / MODEL_DIR
    return path


# ----------------------------------------------------------------------------------------------
# Data: a CSV or TSV of text(s) and label


@dataclass
class Examples:
    """Labelled texts: texts[i] (and pairs[i] for text pairs) has the class labels[i]."""

    texts: list[str]
    labels: list[str]
    pairs: list[str] | None = None

    def __len__(self):
        return len(self.texts)

    def subset(self, indices) -> Examples:
        indices = [int(i) for i in indices]
        return Examples(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            None if self.pairs is None else [self.pairs[i] for i in indices],
        )


def read_examples(path, text_columns=None, label_column="label") -> Examples:
    """The labelled texts of a CSV (.csv, comma) or TSV (.tsv or .tab, tab) file with a header.

    text_columns: one column name or two (a text pair); None takes every column but the label
    column, which must then be one or two. Every error names the file, and the row for a bad row.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ValueError(f"--data {str(path)!r} is not a file; expected a CSV or TSV file")
        raise FileNotFoundError(f"--data {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".tab"):
        raise ValueError(
            f"--data {str(path)!r}: expected a .csv (comma-separated) or .tsv (tab-separated) "
            f"file, got {suffix or 'no extension'!r}"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not a column
    except UnicodeDecodeError as err:
        raise ValueError(f"--data {str(path)!r} is not UTF-8 text (byte {err.start})") from err
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if suffix == ".csv" else "\t")
    try:
        rows = list(reader)
    except csv.Error as err:
        raise ValueError(f"--data {str(path)!r}: {err}") from err
    rows = [r for r in rows if any(cell.strip() for cell in r)]  # blank lines are no examples
    if not rows:
        raise ValueError(f"--data {str(path)!r} is empty; expected a header row, then examples")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise ValueError(
            f"--data {str(path)!r}: no column {label_column!r} in the header {header}; name the "
            "label column with --label-column"
        )
    if text_columns is None:
        text_columns = [h for h in header if h != label_column]
    elif isinstance(text_columns, str):
        text_columns = [text_columns]
    text_columns = list(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise ValueError(
            f"--data {str(path)!r}: expected one text column or two (a pair) besides "
            f"{label_column!r}, got {text_columns}; choose them with --text-columns"
        )
    for name in text_columns:
        if name not in header:
            raise ValueError(f"--data {str(path)!r}: no column {name!r} in the header {header}")
    where = [header.index(name) for name in text_columns]
    label_at = header.index(label_column)
    texts, pairs, labels = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(
                f"--data {str(path)!r}, row {line}: {len(row)} fields, the header has "
                f"{len(header)}"
            )
        label = row[label_at].strip()
        if not label:
            raise ValueError(f"--data {str(path)!r}, row {line}: the label is empty")
        texts.append(row[where[0]])
        if len(where) == 2:
            pairs.append(row[where[1]])
        labels.append(label)
    if len(set(labels)) < 2:
        raise ValueError(
            f"--data {str(path)!r}: a classifier needs at least 2 classes, got "
            f"{sorted(set(labels))} in {len(labels)} rows"
        )
    return Examples(texts, labels, pairs if len(where) == 2 else None)


def write_examples(examples: Examples, path) -> None:
    """Write examples as a CSV (or TSV, by the suffix) that read_examples reads back."""
    path = Path(path)
    out = io.StringIO(newline="")
    writer = csv.writer(out, delimiter="\t" if path.suffix.lower() in (".tsv", ".tab") else ",",
                        lineterminator="\n")
    if examples.pairs is None:
        writer.writerow(["text", "label"])
        writer.writerows(zip(examples.texts, examples.labels, strict=True))
    else:
        writer.writerow(["text", "text_pair", "label"])
        writer.writerows(zip(examples.texts, examples.pairs, examples.labels, strict=True))
    write_atomic(path, out.getvalue())


def split_indices(n: int, val_fraction: float, seed: int,
                  labels=None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of range(n): (train indices, validation indices), each non-empty.

    With labels (one per example) the split is stratified: each class gives round(fraction x
    its count) examples to validation, so both splits keep the classes' proportions.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    if labels is None:
        groups = [np.arange(n)]
    else:
        labels = np.asarray(labels)
        groups = [np.flatnonzero(labels == c) for c in sorted(set(labels.tolist()))]
    val = []
    for group in groups:
        order = rng.permutation(group)
        val.append(order[: int(round(len(group) * val_fraction))])
    val = np.sort(np.concatenate(val)).astype(np.int64)
    if n < 2 or len(val) < 1 or len(val) >= n:
        raise ValueError(
            f"--val-fraction {val_fraction} of {n} examples leaves an empty training or "
            "validation split; give more examples or another fraction"
        )
    return np.setdiff1d(np.arange(n), val), val


# ----------------------------------------------------------------------------------------------
# Models with a classification head


def with_classifier(bert: Bert, num_labels: int, seed: int = 0, dropout=None) -> Bert:
    """A BertForSequenceClassification made from a pretrained BERT: its embeddings, encoder and
    pooler (a fresh pooler when it had none), a new classifier ~ Normal(0, initializer_range)
    with zero bias (Hugging Face's initialisation), and no pretraining heads.

    dropout: replaces hidden_dropout_prob (and the classifier's) when given.
    """
    if not isinstance(bert, Bert):
        raise TypeError(f"expected a tinylm.Bert, got {type(bert).__name__}")
    changes = dict(pooler=True, mlm_head=False, nsp_head=False, num_labels=num_labels)
    if dropout is not None:
        changes.update(hidden_dropout_prob=dropout, classifier_dropout=None)
    config = replace(bert.config, **changes)
    model = Bert(config, seed=seed, dtype=bert.dtype)
    for name, array in bert.params.items():
        if name in model.params and not name.startswith("classifier."):
            model.params[name] = array.copy()
    return model


class GPTClassifier:
    """A GPT with a linear head on its last real token: Hugging Face's
    GPT2ForSequenceClassification.

        h      = gpt.features(idx)                 (B, T, C), after the final LayerNorm
        last   = h[b, n_b - 1]                     (B, C),  n_b = number of real tokens of row b
        logits = last @ score^T                    (B, K),  score.weight (K, C), no bias

    Padding goes on the right; the GPT is causal, so the padding after the last real token
    changes nothing before it. ``params`` holds the GPT's parameters and ``score.weight``; the
    interface is Bert's: classify(...) -> (logits, loss), backward() -> grads.
    """

    def __init__(self, gpt, num_labels: int, seed: int = 0):
        self.gpt = gpt
        self.num_labels = int(num_labels)
        rng = np.random.default_rng(seed)
        score = rng.normal(0.0, 0.02, size=(num_labels, gpt.config.n_embd)).astype(gpt.dtype)
        self.params = dict(gpt.params)  # the same arrays: AdamW updates them in place
        self.params["score.weight"] = score
        self.dtype = gpt.dtype
        self.dropout_rng = gpt.dropout_rng  # the GPT's stream (tinylm.gradcheck resets it)
        self._cache = None

    @property
    def config(self):
        """The GPT's config (the head's size is num_labels)."""
        return self.gpt.config

    @property
    def training(self) -> bool:
        return self.gpt.training

    def train(self):
        self.gpt.train()
        return self

    def eval(self):
        self.gpt.eval()
        return self

    def classify(self, idx, token_type_ids=None, attention_mask=None, labels=None):
        """logits (B, K) and the mean cross-entropy of labels (B,) (None without labels)."""
        B, T = idx.shape
        lengths = np.full(B, T) if attention_mask is None else np.asarray(attention_mask).sum(1)
        h = self.gpt.features(idx)  # (B, T, C)
        last = h[np.arange(B), lengths - 1]  # (B, C), the last real token of each row
        logits, lin = layers.linear_forward(last, self.params["score.weight"].T)  # (B, K)
        loss = ce = None
        if labels is not None:
            loss, ce = layers.cross_entropy_forward(logits, labels)
        self._cache = (h.shape, lengths, lin, ce)
        return logits, loss

    def backward(self):
        shape, lengths, lin, ce = self._cache
        if ce is None:
            raise RuntimeError("backward() needs a classify(...) with labels first")
        dlogits = layers.cross_entropy_backward(1.0, ce)  # (B, K)
        # forward was logits = last @ score^T, last = h[b, n_b - 1]
        dlast, dscore_T, _ = layers.linear_backward(dlogits, lin)
        dh = np.zeros(shape, dtype=self.dtype)
        dh[np.arange(shape[0]), lengths - 1] = dlast  # one position per row: no collisions
        grads = self.gpt.backward_features(dh)
        grads["score.weight"] = dscore_T.T
        return grads


def load_pretrained(init, dtype=np.float32):
    """(model, tokenizer) of a pretrained model: a Hugging Face BERT (or GPT-2) directory, a
    tinylm run (tinylm.checkpoint.load_checkpoint), or a finetune run (its model/ directory)."""
    if isinstance(init, (tuple, list)) and len(init) == 2:
        return init[0], init[1]
    path = model_directory(Path(init))
    if not path.exists():
        raise FileNotFoundError(f"--from {str(path)!r} does not exist")
    from tinylm.pipelines import _model_type

    model_type = _model_type(path)  # None for a tinylm run or checkpoint
    if model_type == "bert":
        from tinylm.hf.bert import load_bert

        model, tokenizer = load_bert(path, dtype)
    elif model_type == "gpt2":
        from tinylm.hf.gpt2 import load_gpt2

        model, tokenizer = load_gpt2(path, dtype)
    elif model_type is not None:
        raise ValueError(
            f"--from {str(path)!r}: model_type {model_type!r}; tinylm fine-tunes 'bert' and "
            "'gpt2' directories and tinylm runs"
        )
    else:
        from tinylm.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        model, tokenizer = ckpt.build_model(), ckpt.tokenizer
    if tokenizer is None:
        raise ValueError(f"--from {str(path)!r} has no tokenizer files; tinylm needs them")
    return model, tokenizer


def classifier_for(model, tokenizer, num_labels: int, seed: int = 0, dropout=None):
    """The model with a fresh K-way head: a Bert -> with_classifier, a GPT -> GPTClassifier."""
    if isinstance(model, Bert):
        return with_classifier(model, num_labels, seed, dropout)
    from tinylm.model import GPT

    if isinstance(model, GPT):
        if not hasattr(model, "features"):
            raise ValueError("fine-tuning a GPT needs GPT.features (a newer tinylm)")
        if dropout is not None:
            model.config = replace(model.config, dropout=dropout)
        return GPTClassifier(model, num_labels, seed)
    raise TypeError(f"cannot fine-tune a {type(model).__name__}; expected a Bert or a GPT")


# ----------------------------------------------------------------------------------------------
# Batches, evaluation, training


def model_max_length(model, requested: int) -> int:
    """The longest input the model reads, at most ``requested``: max_position_embeddings for a
    BERT, block_size for a GPT."""
    cfg = model.gpt.config if isinstance(model, GPTClassifier) else model.config
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "block_size", None)
    return min(requested, limit) if limit else requested


def gpt_batch(tokenizer, texts, pairs=None, max_length: int = 1024):
    """A GPT's batch: each text's BPE tokens (a pair joined by a newline), the last max_length
    kept, right-padded with <|endoftext|>; returns idx and attention_mask (B, T) int64. An
    empty text becomes one <|endoftext|>."""
    rows = []
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t if pairs is None else t + "\n" + pairs[i])
        rows.append((ids or [tokenizer.eot_id])[-max_length:])
    T = max(len(r) for r in rows)
    idx = np.full((len(rows), T), tokenizer.eot_id, dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return idx, mask


def encode(tokenizer, examples: Examples, label_ids: dict, indices, max_length: int):
    """A batch of examples: int64 arrays idx, token_type_ids, attention_mask (B, T), right
    padded to the longest, truncated to max_length; and labels (B,)."""
    sub = examples.subset(indices)
    if hasattr(tokenizer, "encode_batch"):  # WordPiece: [CLS] a [SEP] (b [SEP])
        enc = tokenizer.encode_batch(sub.texts, sub.pairs, max_length=max_length, truncation=True)
        idx, types, mask = enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]
    else:
        idx, mask = gpt_batch(tokenizer, sub.texts, sub.pairs, max_length)
        types = np.zeros_like(idx)
    labels = np.array([label_ids[y] for y in sub.labels], dtype=np.int64)
    return idx, types, mask, labels


def evaluate(model, tokenizer, examples: Examples, label_ids: dict, max_length: int,
             batch_size: int = 64):
    """(mean loss, accuracy, predicted ids (N,), probabilities (N, K)) in eval mode."""
    max_length = model_max_length(model, max_length)
    was_training = model.training
    model.eval()
    total, preds, probs = 0.0, [], []
    for i in range(0, len(examples), batch_size):
        rows = range(i, min(i + batch_size, len(examples)))
        idx, types, mask, labels = encode(tokenizer, examples, label_ids, rows, max_length)
        logits, loss = model.classify(idx, types, mask, labels)
        logits = np.asarray(logits, dtype=np.float64)
        total += float(loss) * len(rows)
        p = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(p / p.sum(1, keepdims=True))
        preds.append(logits.argmax(1))
    if was_training:
        model.train()
    preds, probs = np.concatenate(preds), np.concatenate(probs)
    truth = np.array([label_ids[y] for y in examples.labels])
    return total / len(examples), float((preds == truth).mean()), preds, probs


def learning_rate(step: int, lr: float, warmup_steps: int, total_steps: int,
                  schedule: str) -> float:
    """Linear warmup to lr, then "linear" decay to 0 at total_steps (Hugging Face's default for
    fine-tuning) or "cosine" decay to 0 (tinylm.optim.lr_schedule)."""
    if schedule == "cosine":
        return lr_schedule(step, lr, warmup_steps, total_steps, 0.0)
    if schedule != "linear":
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train_classifier(model, tokenizer, train: Examples, val: Examples, labels: list[str], *,
                     epochs=3, batch_size=16, lr=5e-5, schedule="linear", warmup_fraction=0.1,
                     weight_decay=0.01, max_grad_norm=1.0, max_length=128, seed=0,
                     evals_per_epoch=2, on_eval=None, quiet=True):
    """Fine-tune every parameter of ``model`` (a Bert with a classifier or a GPTClassifier) on
    ``train``, evaluating on ``val`` evals_per_epoch times an epoch (and at the end).

    Each epoch visits the training examples once in a fresh seeded order. Returns the history,
    one dict per evaluation: step, epoch, lr, train_loss (mean since the last evaluation),
    val_loss, val_accuracy, seconds. on_eval(record) is called after each evaluation.
    """
    label_ids = {name: i for i, name in enumerate(labels)}
    max_length = model_max_length(model, max_length)
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(round(warmup_fraction * total_steps))
    eval_steps = {
        min(total_steps, e * steps_per_epoch + math.ceil((j + 1) * steps_per_epoch /
                                                         evals_per_epoch))
        for e in range(epochs) for j in range(evals_per_epoch)
    } | {total_steps}
    opt = AdamW(model.params, lr=lr, weight_decay=weight_decay)
    model.train()
    history, running, t0, step = [], [], time.perf_counter(), 0
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for start in range(0, len(train), batch_size):
            rows = order[start : start + batch_size]
            idx, types, mask, y = encode(tokenizer, train, label_ids, rows, max_length)
            _, loss = model.classify(idx, types, mask, y)
            grads = model.backward()
            norm = clip_grad_norm(grads, max_grad_norm)
            if not math.isfinite(norm):
                raise RuntimeError(f"fine-tuning diverged at step {step}: gradient norm {norm}")
            rate = learning_rate(step, lr, warmup_steps, total_steps, schedule)
            opt.step(grads, lr=rate)
            running.append(float(loss))
            step += 1
            if step in eval_steps:
                val_loss, val_acc, _, _ = evaluate(model, tokenizer, val, label_ids, max_length)
                record = {
                    "step": step, "epoch": round(step / steps_per_epoch, 3), "lr": rate,
                    "train_loss": float(np.mean(running)), "val_loss": val_loss,
                    "val_accuracy": val_acc, "seconds": round(time.perf_counter() - t0, 2),
                }
                running = []
                history.append(record)
                if not quiet:
                    print(f"step {step:5d}/{total_steps} | epoch {record['epoch']:.2f} | train "
                          f"loss {record['train_loss']:.4f} | val loss {val_loss:.4f} | val "
                          f"accuracy {val_acc:.3f}", flush=True)
                if on_eval is not None:
                    on_eval(record)
    model.eval()
    return history


# ----------------------------------------------------------------------------------------------
# Frozen features and a linear classifier


def sentence_features(model, tokenizer, texts, max_length=128, batch_size=64, pairs=None):
    """One vector per text (N, C): the mean of a BERT's last hidden states over the real tokens
    ([CLS] and [SEP] included), in eval mode; nothing is trained."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer.encode_batch(texts[i : i + batch_size],
                                     None if pairs is None else pairs[i : i + batch_size],
                                     max_length=max_length, truncation=True)
        mask = enc["attention_mask"][..., None].astype(np.float64)  # (B, T, 1)
        hidden = model.features(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        out.append((np.asarray(hidden, dtype=np.float64) * mask).sum(1) / mask.sum(1))
    if was_training:
        model.train()
    return np.concatenate(out)


def fit_logistic_regression(X, y, num_classes, l2=1e-3, steps=300, lr=0.5):
    """Multinomial logistic regression by full-batch gradient descent, in NumPy.

        z = (X - mean) / std,  logits = z @ W + b,  loss = mean CE + l2/2 ||W||^2
        dlogits = (softmax(logits) - onehot(y)) / N,  dW = z^T dlogits + l2 W,  db = sum dlogits

    The loss is convex, so plain gradient descent on standardised features converges.
    Returns predict(X) -> class ids, a function.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    mean, std = X.mean(0), X.std(0) + 1e-8
    Z = (X - mean) / std  # (N, C)
    N, C = Z.shape
    W, b = np.zeros((C, num_classes)), np.zeros(num_classes)
    onehot = np.eye(num_classes)[y]  # (N, K)
    for _ in range(steps):
        logits = Z @ W + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dlogits = (p - onehot) / N
        W -= lr * (Z.T @ dlogits + l2 * W)
        b -= lr * dlogits.sum(0)

    def predict(X_new):
        return (((np.asarray(X_new, dtype=np.float64) - mean) / std) @ W + b).argmax(1)

    return predict


def confusion_matrix(truth, predicted, num_classes: int) -> np.ndarray:
    """counts[i, j] = how many examples of true class i were predicted as class j.   (K, K)"""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(truth), np.asarray(predicted)), 1)
    return counts


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib without pyplot, so the caller's backend is left alone)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_curves(history: list[dict], path=None):
    """Loss (train, validation) and validation accuracy against the step; written to path as a
    PNG when given. Returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    steps = [r["step"] for r in history]
    ax_loss.plot(steps, [r["train_loss"] for r in history], "o-", label="train (mean since last)")
    ax_loss.plot(steps, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(steps, [r["val_accuracy"] for r in history], "o-", color="C2")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("validation accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        write_atomic(path, _png(fig))
    return fig


def plot_confusion(counts, labels, path=None, title="validation"):
    """The confusion matrix as a labelled heat map with the counts written in; to path when
    given. Returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    K = len(labels)
    fig = Figure(figsize=(1.2 * K + 2.5, 1.0 * K + 1.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(K), labels, rotation=30, ha="right")
    ax.set_yticks(range(K), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(counts) / max(1, counts.sum())
    ax.set_title(f"{title}: accuracy {accuracy:.3f} ({counts.sum()} examples)")
    for i in range(K):
        for j in range(K):
            dark = counts[i, j] > counts.max() / 2
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if dark else "black")
    fig.tight_layout()
    if path is not None:
        write_atomic(path, _png(fig))
    return fig


# ----------------------------------------------------------------------------------------------
# The run directory


@dataclass
class FinetuneResult:
    run_dir: Path
    labels: list[str]
    history: list[dict]
    val_accuracy: float
    majority_accuracy: float
    confusion: np.ndarray


def _prepare_out(out, overwrite: bool) -> Path:
    """The run directory, made if missing. A non-empty one is refused unless overwrite=True and
    it is a previous finetune run (it holds finetune.json); then only finetune's files are
    replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--out {str(out)!r} is not empty; choose a new directory or pass --overwrite "
                "to replace a previous finetune run"
            )
        if not (out / RUN_FILE).is_file():
            raise ValueError(
                f"--out {str(out)!r} is not empty and is not a finetune run (no {RUN_FILE}); "
                "tinylm will not write into it, even with --overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def finetune(data, init, out, *, text_columns=None, label_column="label", val_fraction=0.2,
             epochs=3, batch_size=16, lr=5e-5, schedule="linear", warmup_fraction=0.1,
             weight_decay=0.01, dropout=None, max_length=128, seed=0, evals_per_epoch=2,
             overwrite=False, quiet=False) -> FinetuneResult:
    """Fine-tune a pretrained model (init: a BERT or GPT-2 directory, or a tinylm run) on the
    labelled texts of ``data`` (a CSV/TSV path, or Examples) and write the run directory ``out``
    (module docstring). Returns a FinetuneResult."""
    for name, value, low in (("--epochs", epochs, 1), ("--batch-size", batch_size, 1),
                             ("--max-length", max_length, 2), ("--seed", seed, 0),
                             ("--evals-per-epoch", evals_per_epoch, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"--lr must be positive, got {lr}")
    if not 0 <= warmup_fraction <= 1:
        raise ValueError(f"--warmup-fraction must be in [0, 1], got {warmup_fraction}")
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {SCHEDULES}, got {schedule!r}")
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {dropout}")
    examples = data if isinstance(data, Examples) else read_examples(data, text_columns,
                                                                    label_column)
    labels = sorted(set(examples.labels))
    train_rows, val_rows = split_indices(len(examples), val_fraction, seed, examples.labels)
    train, val = examples.subset(train_rows), examples.subset(val_rows)
    pretrained, tokenizer = load_pretrained(init)
    model = classifier_for(pretrained, tokenizer, len(labels), seed, dropout)
    _check_saveable(model, tokenizer, init)  # before the training, not after it
    run_dir = _prepare_out(out, overwrite)  # only after everything above is known to be good
    settings = dict(
        data=str(data) if not isinstance(data, Examples) else "<examples>",
        init=str(init) if isinstance(init, (str, Path)) else "<model>",
        text_columns=text_columns, label_column=label_column, val_fraction=val_fraction,
        epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
        warmup_fraction=warmup_fraction, weight_decay=weight_decay, dropout=dropout,
        max_length=max_length, seed=seed,
    )
    summary = {"settings": settings, "labels": labels, "family": _family(model),
               "n_train": len(train), "n_val": len(val), "finished": False}
    write_json_atomic(run_dir / RUN_FILE, summary)
    history = []
    if not quiet:  # the opening line, as tinylm train prints one
        n_params = sum(int(a.size) for a in model.params.values())
        steps = epochs * math.ceil(len(train) / batch_size)
        print(f"fine-tuning {summary['family']} ({n_params:,} parameters) from {settings['init']} "
              f"on {len(train)} examples ({len(val)} for validation), {len(labels)} labels, "
              f"{epochs} epoch{'s' * (epochs != 1)} = {steps} steps -> {run_dir}", flush=True)

    def on_eval(record):
        history.append(record)
        write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))

    train_classifier(model, tokenizer, train, val, labels, epochs=epochs, batch_size=batch_size,
                     lr=lr, schedule=schedule, warmup_fraction=warmup_fraction,
                     weight_decay=weight_decay, max_length=max_length, seed=seed,
                     evals_per_epoch=evals_per_epoch, on_eval=on_eval, quiet=quiet)
    label_ids = {name: i for i, name in enumerate(labels)}
    _, accuracy, preds, _ = evaluate(model, tokenizer, val, label_ids, max_length)
    truth = np.array([label_ids[y] for y in val.labels])
    counts = confusion_matrix(truth, preds, len(labels))
    majority = float(np.bincount(truth, minlength=len(labels)).max() / len(truth))
    plot_curves(history, run_dir / CURVES_FILE)
    plot_confusion(counts, labels, run_dir / CONFUSION_FILE)
    _save_model(model, tokenizer, labels, run_dir / MODEL_DIR)
    summary.update(finished=True, val_accuracy=accuracy, majority_accuracy=majority,
                   confusion_matrix=counts.tolist())
    write_json_atomic(run_dir / RUN_FILE, summary)
    return FinetuneResult(run_dir, labels, history, accuracy, majority, counts)


def _check_saveable(model, tokenizer, init) -> None:
    """Refuse a GPT whose classifier could not be written as a Hugging Face directory at the end
    (a character tokenizer, sinusoidal positions, no biases), naming why, before any training."""
    if isinstance(model, Bert):
        return
    from tinylm.hf.gpt2 import config_to_hf, gpt2_tokenizer_or_reason

    source = init if isinstance(init, (str, Path)) else "the given model"
    _, reason = gpt2_tokenizer_or_reason(tokenizer)
    if reason is not None:
        raise ValueError(f"cannot fine-tune {str(source)!r} for classification: the result is "
                         f"saved as a GPT-2 directory, and {reason}")
    try:
        config_to_hf(model.gpt.config)
    except ValueError as err:
        raise ValueError(f"cannot fine-tune {str(source)!r} for classification: the result is "
                         f"saved as a GPT-2 directory, and {err}") from err


def _family(model) -> str:
    return "bert" if isinstance(model, Bert) else "gpt2"


def _save_model(model, tokenizer, labels, path):
    if isinstance(model, Bert):
        model.save_pretrained(path, tokenizer, id2label=labels)
    else:
        save_gpt_classifier(model, path, tokenizer, labels)


def save_gpt_classifier(model: GPTClassifier, path, tokenizer, labels) -> Path:
    """Write a GPTClassifier as a Hugging Face GPT2ForSequenceClassification directory:
    GPT-2's config.json (with id2label, and pad_token_id = <|endoftext|>, which transformers
    uses to find each row's last real token), the GPT's tensors under ``transformer.`` and
    ``score.weight`` (the language-model head is not part of a classifier), the tokenizer."""
    from tinylm.hf.bert import check_labels
    from tinylm.hf.common import write_pretrained
    from tinylm.hf.gpt2 import config_to_hf, gpt2_tokenizer_or_reason, params_to_hf

    tok, reason = gpt2_tokenizer_or_reason(tokenizer)
    if tok is None:
        raise ValueError(f"cannot save the GPT classifier as a GPT-2 directory: {reason}")
    names = check_labels(labels, model.num_labels)
    config = config_to_hf(model.gpt.config, tok.eot_id)
    config.update(
        architectures=["GPT2ForSequenceClassification"], pad_token_id=tok.eot_id,
        tie_word_embeddings=True,  # no output layer to tie or not
        id2label={str(i): n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
    )
    gpt_params = {k: v for k, v in model.gpt.params.items() if k != "lm_head.weight"}
    tensors = params_to_hf(gpt_params)
    tensors["score.weight"] = np.ascontiguousarray(np.asarray(model.params["score.weight"]))
    return write_pretrained(path, config, tensors, tok.pretrained_files())


def load_gpt_classifier(path, dtype=np.float32):
    """(GPTClassifier, BPETokenizer, class names) of a GPT2ForSequenceClassification
    directory; ValueError naming the file when it has no ``score.weight``."""
    from tinylm.hf.bert import read_labels
    from tinylm.hf.common import CONFIG_NAME, WEIGHTS_NAME, read_config, read_weights
    from tinylm.hf.gpt2 import config_from_hf, load_tokenizer, params_from_hf
    from tinylm.model import GPT

    path = Path(path)
    hf = read_config(path, ("gpt2",))
    tensors = read_weights(path, dtype)
    score = tensors.pop("score.weight", None)
    if score is None:
        raise ValueError(
            f"{str(path / WEIGHTS_NAME)!r} has no score.weight: not a "
            "GPT2ForSequenceClassification (text-classification needs a classifier)"
        )
    config = replace(config_from_hf(hf, path / CONFIG_NAME), tie_weights=True)
    gpt = GPT(config, dtype=dtype, params=params_from_hf(tensors, config, path / WEIGHTS_NAME))
    model = GPTClassifier(gpt, score.shape[0])
    model.params["score.weight"] = np.ascontiguousarray(score, dtype=dtype)
    return model, load_tokenizer(path), read_labels(path)


def classify(run_or_dir, texts, text_pairs=None, batch_size=32):
    """Predictions of a finetune run (or a BertForSequenceClassification directory) for a list
    of texts: [{"label", "score", "probabilities": {label: p}}], one per text."""
    from tinylm.pipelines import pipeline

    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings; wrap one text as [text]")
    clf = pipeline("text-classification", model=run_or_dir)
    probs = clf.probabilities(list(texts), text_pairs, batch_size=batch_size,
                              max_length=model_max_length(clf.model, 1 << 30))
    out = []
    for row in probs:
        best = int(row.argmax())
        out.append({"label": clf.labels[best], "score": float(row[best]),
                    "probabilities": {name: float(p) for name, p in zip(clf.labels, row,
                                                                        strict=True)}})
    return out


# ----------------------------------------------------------------------------------------------
# The commands: tinylm finetune, tinylm classify


def add_finetune_parser(sub):
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained BERT (or GPT-2) for text classification",
        description="Fine-tune every parameter of a pretrained model, with a new classification "
        "head, on a CSV or TSV of texts and labels (header row). Writes a run directory: "
        "metrics.jsonl, curves.png, confusion_matrix.png and model/ (a Hugging Face "
        "directory).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="a .csv or .tsv file with a header row")
    p.add_argument("--from", dest="init", required=True, metavar="PATH",
                   help="a Hugging Face BERT or GPT-2 directory, or a tinylm run")
    p.add_argument("--out", required=True, help="the run directory to write (new or empty)")
    p.add_argument("--text-columns", default=argparse.SUPPRESS,
                   help="one text column, or two separated by a comma (default: every column "
                   "but the label column)")
    p.add_argument("--label-column", default="label", help="the column holding the labels")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held out for validation")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=16, help="texts per step")
    p.add_argument("--lr", type=float, default=5e-5, help="the peak learning rate")
    p.add_argument("--schedule", choices=SCHEDULES, default="linear",
                   help="decay after the warmup")
    p.add_argument("--warmup-fraction", type=float, default=0.1,
                   help="share of the steps spent warming up")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled decay")
    p.add_argument("--dropout", type=float, default=None,
                   help="replaces the model's hidden dropout probability")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (truncated)")
    p.add_argument("--evals-per-epoch", type=int, default=2,
                   help="validation accuracy and loss this many times per epoch")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the head's initialisation, batches and dropout")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous finetune run in --out")
    p.add_argument("--quiet", action="store_true", help="print only the final line, not one "
                   "line per evaluation")
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_finetune(args) -> int:
    columns = None
    if getattr(args, "text_columns", None) is not None:
        columns = [c.strip() for c in args.text_columns.split(",")]
    result = finetune(
        args.data, args.init, args.out, text_columns=columns, label_column=args.label_column,
        val_fraction=args.val_fraction, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, schedule=args.schedule, warmup_fraction=args.warmup_fraction,
        weight_decay=args.weight_decay, dropout=args.dropout, max_length=args.max_length,
        seed=args.seed, evals_per_epoch=args.evals_per_epoch, overwrite=args.overwrite,
        quiet=args.quiet,
    )
    print(f"validation accuracy {result.val_accuracy:.3f} (majority class "
          f"{result.majority_accuracy:.3f}); model in {result.run_dir / MODEL_DIR}; try: "
          f"tinylm classify {result.run_dir} --text \"...\"")
    return 0


def add_classify_parser(sub):
    p = sub.add_parser(
        "classify",
        help="predict classes (with probabilities) with a fine-tuned model",
        description="Classify texts with a finetune run (or a Hugging Face "
        "BertForSequenceClassification directory). One line per text: the label, its "
        "probability, then every class's probability.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finetune run or a model directory")
    p.add_argument("--text", action="append", default=None,
                   help="a text to classify (repeat for several)")
    p.add_argument("--file", default=None, help="a UTF-8 file: one text per line")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.set_defaults(func=cmd_classify)
    return p


def cmd_classify(args) -> int:
    if (args.text is None) == (args.file is None):
        raise ValueError("give the texts with --text \"...\" (repeatable) or --file FILE, "
                         "one of the two")
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"--file {str(path)!r} does not exist or is not a file")
        try:
            texts = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
        except UnicodeDecodeError as err:
            raise ValueError(f"--file {str(path)!r} is not UTF-8 text") from err
        if not texts:
            raise ValueError(f"--file {str(path)!r} holds no text (one text per line)")
    else:
        texts = args.text
    for text, result in zip(texts, classify(args.run_dir, texts), strict=True):
        if args.json:
            print(json.dumps({"text": text, **result}))
        else:
            others = "  ".join(f"{k}={v:.3f}" for k, v in result["probabilities"].items())
            print(f"{result['label']}\t{result['score']:.3f}\t{others}\t{text}")
    sys.stdout.flush()
    return 0
