"""Pretraining a BERT: masked-language-model and next-sentence prediction on the built-in corpora.

    import tinylm.pretraining as pt
    result = pt.pretrain(steps=300, out="runs/bert")        # or pretrain(PretrainConfig(...))
    result.metrics   # {"val_loss", "val_mlm_loss", "val_mlm_accuracy", "val_nsp_loss", ...}

The data (tinylm/mlm.py): the corpus is cut into documents (paragraphs) of sentences; a batch
is B sentence pairs [CLS] a [SEP] b [SEP], half of them consecutive (NSP label 0) and half with a
random second sentence (label 1), of which 15% of the tokens are chosen for the MLM loss (80%
shown as [MASK], 10% as a random token, 10% unchanged), drawn afresh at every step. The loss is
BERT's: the mean cross-entropy over the chosen positions plus the NSP cross-entropy.

The tokenizer is a WordPiece (tinylm/wordpiece.py) trained here on the training documents, not
tinylm's byte-level BPE: WordPiece is what BERT uses, its [CLS] [SEP] [PAD] [MASK] [UNK] tokens
are part of it, and the same tokenizer then loads a Hugging Face BERT's vocab.txt.

The training loop is tinylm.training's, shared with `tinylm train`: AdamW, warmup + cosine,
gradient clipping, checkpoints, exact resume, metrics.jsonl, loss.png, Ctrl-C / SIGTERM, the
run-directory lock and the progress bar. Validation: the last val_fraction of the documents,
from which eval_batches fixed batches are drawn once, from their own seeded stream, so that
every evaluation (and a resumed run's) scores the same masked positions. Each evaluation records
the MLM loss, the MLM accuracy on the masked positions, and the NSP loss and accuracy. samples.txt
shows the model filling the masks of two validation pairs.

The checkpoint holds the Bert and its WordPieceTokenizer: ``load_checkpoint(run_dir)``
returns a Checkpoint whose ``build_model()`` is the Bert and ``.tokenizer`` the tokenizer, from
which a classifier can be fine-tuned.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import numpy as np

from tinylm import data as data_io
from tinylm import mlm
from tinylm.backend import to_numpy
from tinylm.bert import IGNORE_INDEX, Bert, BertConfig
from tinylm.bert import param_shapes as bert_param_shapes
from tinylm.training import (
    TrainResult,
    check_choice_setting,
    check_float_setting,
    check_int_setting,
    check_loop_settings,
    check_memory,
    load_training_text,
    resolve_config,
    run_training,
    settings_from_dict,
)
from tinylm.wordpiece import WordPieceTokenizer

# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run. The `tinylm pretrain` flags have the same names with
    dashes, and those it shares with `tinylm train` mean the same.

    The defaults pretrain a 0.57M-parameter BERT on the "pydoc" corpus in 500 steps, about two
    and a half minutes on the 2-core machine (a step took 0.29 s on one core, with OpenBLAS on
    one thread, while other work shared the machine). Measured: validation MLM accuracy 0.144
    on the masked positions (chance is 1/1000; always guessing the most frequent token gives
    0.064), MLM loss 5.17; NSP stays at chance (0.52). With --steps 1500 (8 minutes): MLM
    accuracy 0.216 and NSP accuracy 0.59, but the NSP validation loss rises (0.69 -> 0.85): the
    small model starts to memorise the corpus's 1,539 consecutive training pairs rather than
    learn what makes two sentences follow each other.
    """

    model_type: ClassVar[str] = "bert"
    command: ClassVar[str] = "tinylm pretrain"

    # data
    corpus: str = "pydoc"  # built-in corpus; its paragraphs are the documents
    text: str | None = None  # a UTF-8 file (or folder of .txt files) instead; blank lines part
    vocab_size: int = 1000  # the WordPiece vocabulary, special tokens included
    val_fraction: float = 0.1  # the last 10% of the documents are the validation set
    nsp: bool = True  # next-sentence prediction as a second loss (RoBERTa dropped it)
    mlm_probability: float = 0.15  # the fraction of tokens chosen for the MLM loss
    # model (BertConfig: n_layer -> num_hidden_layers, n_head -> num_attention_heads,
    # n_embd -> hidden_size, 4 * n_embd -> intermediate_size, block_size -> max positions)
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 128
    block_size: int = 64  # the longest input [CLS] a [SEP] b [SEP], in tokens
    dropout: float = 0.0  # hidden_dropout_prob
    dtype: str = "float32"
    # optimisation (AdamW, warmup + cosine schedule)
    steps: int = 500
    batch_size: int = 32  # sentence pairs per step
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    lr_decay_steps: int | None = None  # the step where the cosine reaches min_lr; None: steps
    weight_decay: float = 0.01  # BERT's
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    # evaluation, logging, samples
    eval_interval: int = 100
    eval_batch_size: int = 64  # pairs per validation batch
    eval_batches: int = 4  # fixed validation batches, drawn once
    log_interval: int = 10
    samples: int = 2  # validation pairs whose masks are filled into samples.txt; 0: none
    # the run
    seed: int = 1337
    device: str = "cpu"
    out: str | None = None
    resume: str | None = None
    overwrite: bool = False
    progress: bool | None = None
    verbose: bool = True

    def __post_init__(self):
        check_choice_setting("corpus", self.corpus, data_io.CORPORA)
        check_choice_setting("dtype", self.dtype, ("float32", "float64"))
        check_choice_setting("device", self.device, ("cpu", "gpu"))
        for name in ("n_layer", "n_head", "n_embd", "steps", "batch_size", "eval_interval",
                     "eval_batch_size", "eval_batches", "log_interval"):  # fmt: skip
            check_int_setting(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "samples", "seed"):
            check_int_setting(name, getattr(self, name), low=0)
        check_int_setting("vocab_size", self.vocab_size, low=6)  # 5 special tokens and one more
        check_int_setting("block_size", self.block_size, low=5)  # [CLS] a [SEP] b [SEP]
        self.mlm_probability = check_float_setting(
            "mlm_probability", self.mlm_probability, low=0.0, high=1.0, low_open=True
        )
        if not isinstance(self.nsp, bool):
            raise ValueError(f"nsp must be true or false, got {self.nsp!r}")
        check_loop_settings(self, paths=("text", "out", "resume"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "the settings") -> PretrainConfig:
        """A PretrainConfig from a dict of settings; unknown keys are an error naming them."""
        return settings_from_dict(cls, d, source)

    def model_config(self, tokenizer: WordPieceTokenizer) -> BertConfig:
        """The Bert's settings, for this tokenizer."""
        return BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=self.n_embd,
            num_hidden_layers=self.n_layer,
            num_attention_heads=self.n_head,
            intermediate_size=4 * self.n_embd,
            max_position_embeddings=self.block_size,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            pad_token_id=tokenizer.pad_id,
            nsp_head=self.nsp,
        )


PRETRAIN_SETTINGS = tuple(f.name for f in fields(PretrainConfig))

# What a resumed run must keep (its model, tokenizer, data and optimizer state).
PretrainConfig.fixed_on_resume = (
    "corpus", "text", "vocab_size", "val_fraction", "nsp", "mlm_probability",
    "n_layer", "n_head", "n_embd", "block_size", "dropout", "dtype",
    "weight_decay", "beta1", "beta2", "eps", "seed", "eval_batch_size", "eval_batches",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The task: what the shared loop trains a Bert on


class PretrainingTask:
    """BERT's masked-LM (+ next-sentence) pretraining, for training._Loop (the methods are those
    of training.LanguageModelTask)."""

    def __init__(self, tokenizer, train_documents, val_documents, cfg: PretrainConfig, xp):
        self.tokenizer, self.documents, self.xp = tokenizer, train_documents, xp
        self.B, self.T = cfg.batch_size, cfg.block_size
        self.nsp, self.mlm_probability, self.n_samples = cfg.nsp, cfg.mlm_probability, cfg.samples
        self.tokens_per_step = self.B * self.T  # at most: the pairs are padded to the longest
        self.metric_names = ("val_loss", "val_mlm_loss", "val_mlm_accuracy")
        if self.nsp:
            self.metric_names += ("val_nsp_loss", "val_nsp_accuracy")
        # The validation batches, drawn once from their own stream: every evaluation scores the
        # same pairs and the same masked positions.
        rng = np.random.default_rng([cfg.seed, 2])
        self.val_batches = [
            self._batch(val_documents, cfg.eval_batch_size, rng) for _ in range(cfg.eval_batches)
        ]

    def _batch(self, documents, n_pairs, rng) -> dict:
        pairs = mlm.nsp_pairs(documents, rng, n_pairs)
        batch = mlm.pretraining_batch(self.tokenizer, pairs, self.T, rng, self.mlm_probability)
        return {name: self.xp.asarray(a) for name, a in batch.items()}  # to the device

    def get_batch(self, rng) -> dict:
        return self._batch(self.documents, self.B, rng)

    def loss(self, model, b):
        nsp_labels = b["nsp_labels"] if self.nsp else None
        _, _, loss = model.forward(b["idx"], b["token_type_ids"], b["attention_mask"],
                                   b["mlm_labels"], nsp_labels)  # fmt: skip
        return loss  # mean MLM cross-entropy over the chosen positions (+ the NSP one)

    def evaluate(self, model) -> dict:
        """MLM loss and accuracy over every masked position of the validation batches, NSP loss
        and accuracy over their pairs; val_loss is their sum, as the training loss."""
        was_training = model.training
        model.eval()
        mlm_loss = mlm_correct = mlm_n = nsp_loss = nsp_correct = nsp_n = 0.0
        try:
            for b in self.val_batches:
                mlm_logits, nsp_logits, loss = model.forward(
                    b["idx"], b["token_type_ids"], b["attention_mask"], mlm_labels=b["mlm_labels"]
                )
                labels = to_numpy(b["mlm_labels"])
                chosen = labels != IGNORE_INDEX  # (B, T)
                n = int(chosen.sum())
                mlm_loss += float(loss) * n  # the batch's mean, weighted by its positions
                predicted = to_numpy(mlm_logits.argmax(axis=-1))
                mlm_correct += int((predicted[chosen] == labels[chosen]).sum())
                mlm_n += n
                if self.nsp:
                    logits = to_numpy(nsp_logits).astype(np.float64)  # (B, 2)
                    y = to_numpy(b["nsp_labels"])
                    # -log softmax(logits)[y] = logsumexp(logits) - logits[y]
                    m = logits.max(axis=1)
                    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
                    nsp_loss += float((lse - logits[np.arange(len(y)), y]).sum())
                    nsp_correct += int((logits.argmax(axis=1) == y).sum())
                    nsp_n += len(y)
        finally:
            model.training = was_training
        metrics = {"val_mlm_loss": mlm_loss / mlm_n, "val_mlm_accuracy": mlm_correct / mlm_n}
        metrics["val_loss"] = metrics["val_mlm_loss"]
        if self.nsp:
            metrics["val_nsp_loss"] = nsp_loss / nsp_n
            metrics["val_nsp_accuracy"] = nsp_correct / nsp_n
            metrics["val_loss"] += metrics["val_nsp_loss"]
        return metrics

    def sample(self, model, step: int) -> str | None:
        """The first validation pairs with the model's guess at each masked position."""
        if self.n_samples == 0:
            return None
        b = self.val_batches[0]
        k = min(self.n_samples, b["idx"].shape[0])
        was_training = model.training
        model.eval()
        try:
            logits, _, _ = model.forward(b["idx"][:k], b["token_type_ids"][:k],
                                         b["attention_mask"][:k])  # fmt: skip
        finally:
            model.training = was_training
        predicted = to_numpy(logits.argmax(axis=-1))
        idx, labels = to_numpy(b["idx"][:k]), to_numpy(b["mlm_labels"][:k])
        mask = to_numpy(b["attention_mask"][:k])
        vocab = self.tokenizer.vocab
        lines = []
        for i in range(k):
            real = np.flatnonzero(mask[i])
            lines.append("input: " + " ".join(vocab[t] for t in idx[i, real]))
            guesses = [
                f"{vocab[labels[i, t]]}->{vocab[predicted[i, t]]}"
                for t in real
                if labels[i, t] != IGNORE_INDEX
            ]
            lines.append("masked (true->guess): " + ", ".join(guesses))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# pretrain()


def pretrain(config: PretrainConfig | None = None, **overrides) -> TrainResult:
    """Pretrain a BERT as ``config`` (default PretrainConfig()) with ``overrides`` applied.

    ``resume=RUN_DIR`` continues a run from its checkpoint exactly, as training.train does.
    Returns a TrainResult: ``model`` is the Bert, ``tokenizer`` its WordPieceTokenizer,
    ``metrics`` the last evaluation's figures. Raises as training.train.
    """
    cfg, ckpt = resolve_config(PretrainConfig, config, overrides)
    return run_training(cfg, ckpt, _setup_pretraining)


def _setup_pretraining(cfg: PretrainConfig, ckpt):
    """Documents, tokenizer, Bert and task of a pretraining run (new or resumed)."""
    text, text_sha256 = load_training_text(cfg, ckpt)
    documents = mlm.split_documents(text)
    n_val = max(2, data_io.validation_size(len(documents), cfg.val_fraction))
    if len(documents) - n_val < 2:
        raise ValueError(
            f"the text has {len(documents)} documents (paragraphs of at least two sentences, "
            f"between blank lines): too few for training and validation; use a longer text"
        )
    train_documents, val_documents = documents[:-n_val], documents[-n_val:]

    if ckpt is not None:
        model, tokenizer = ckpt.build_model(cfg.device), ckpt.tokenizer
    else:
        tokenizer = WordPieceTokenizer.train(
            "\n".join(s for d in train_documents for s in d), cfg.vocab_size
        )
        model_config = cfg.model_config(tokenizer)
        check_memory(bert_param_shapes(model_config), cfg.dtype)
        model = Bert(model_config, seed=cfg.seed, dtype=cfg.dtype).to(cfg.device)
    task = PretrainingTask(tokenizer, train_documents, val_documents, cfg, model.xp)

    c = model.config
    source = cfg.text if cfg.text else f"corpus {cfg.corpus}"
    header = (
        f"tinylm pretrain: {model.num_params() / 1e6:.2f}M parameters ({c.num_hidden_layers} "
        f"layers x {c.num_attention_heads} heads x {c.hidden_size}, block {cfg.block_size}, "
        f"vocab {c.vocab_size} wordpiece, MLM{' + NSP' if cfg.nsp else ''}), {source}: "
        f"{len(train_documents):,} training / {len(val_documents):,} validation documents"
    )
    return model, tokenizer, task, {"text_sha256": text_sha256}, header


# ----------------------------------------------------------------------------------------------
# tinylm pretrain


def add_pretrain_parser(sub) -> argparse.ArgumentParser:
    """Add the "pretrain" subcommand to ``sub`` (an argparse subparsers object); its function is
    cmd_pretrain (set as the parser's ``func`` default)."""
    defaults = PretrainConfig()
    p = sub.add_parser(
        "pretrain",
        help="pretrain a BERT (masked LM + next sentence) and write a run directory",
        description="Pretrain a small BERT on a built-in corpus or a text file with BERT's "
        "masked-language-model and next-sentence losses. The run directory (--out) gets "
        "metrics.jsonl (with MLM and NSP accuracy), loss.png, samples.txt and checkpoint/. "
        "Ctrl-C saves a checkpoint; --resume continues it exactly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    from tinylm.cli import settings_flag

    setting = settings_flag(defaults)  # as for tinylm train: only the flags typed override

    g = p.add_argument_group("data")
    setting(g, "--corpus", "built-in corpus, when no --text is given", choices=data_io.CORPORA)
    setting(g, "--text", "a UTF-8 text file, or a folder of .txt files; paragraphs are "
            "documents", metavar="PATH")  # fmt: skip
    setting(g, "--vocab-size", "WordPiece vocabulary, special tokens included", type=int,
            metavar="N")  # fmt: skip
    setting(g, "--val-fraction", "the last fraction of the documents validates", type=float)
    setting(g, "--no-nsp", "masked LM only, without next-sentence prediction", dest="nsp",
            action="store_false")  # fmt: skip
    setting(g, "--mlm-probability", "fraction of tokens chosen for the MLM loss", type=float,
            metavar="P")  # fmt: skip

    g = p.add_argument_group("model")
    setting(g, "--n-layer", "encoder blocks", type=int, metavar="N")
    setting(g, "--n-head", "attention heads per block", type=int, metavar="N")
    setting(g, "--n-embd", "hidden size C (a multiple of --n-head)", type=int, metavar="C")
    setting(g, "--block-size", "longest input pair in tokens", type=int, metavar="T")
    setting(g, "--dropout", "dropout probability during training", type=float, metavar="P")
    setting(g, "--dtype", "floating-point type of the parameters", choices=("float32", "float64"))

    g = p.add_argument_group("optimisation")
    setting(g, "--steps", "optimizer steps in total; with --resume, more extends the run",
            type=int, metavar="N")  # fmt: skip
    setting(g, "--batch-size", "sentence pairs per step", type=int, metavar="B")
    setting(g, "--lr", "peak learning rate", type=float)
    setting(g, "--min-lr", "learning rate at the end of the cosine decay", type=float)
    setting(g, "--warmup-steps", "steps of linear warmup", type=int, metavar="N")
    setting(g, "--lr-decay-steps", "the step where the cosine reaches --min-lr", type=int,
            metavar="N")  # fmt: skip
    setting(g, "--weight-decay", "AdamW's decoupled weight decay", type=float)
    setting(g, "--beta1", "AdamW's beta1", type=float)
    setting(g, "--beta2", "AdamW's beta2", type=float)
    setting(g, "--grad-clip", "largest global gradient norm; 0 turns clipping off", type=float)

    g = p.add_argument_group("evaluation and logging")
    setting(g, "--eval-interval", "steps between evaluations and checkpoints", type=int,
            metavar="N")  # fmt: skip
    setting(g, "--eval-batch-size", "pairs per validation batch", type=int, metavar="N")
    setting(g, "--eval-batches", "fixed validation batches", type=int, metavar="N")
    setting(g, "--log-interval", "steps between metrics records", type=int, metavar="N")
    setting(g, "--samples", "validation pairs filled in samples.txt at each evaluation",
            type=int, metavar="N")  # fmt: skip

    g = p.add_argument_group("the run")
    setting(g, "--seed", "seed of the initialisation, batches and masks", type=int)
    setting(g, "--device", "cpu (NumPy) or gpu (CuPy)", choices=("cpu", "gpu"))
    g.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                   help="the run directory (default: out-bert)")  # fmt: skip
    setting(g, "--resume", "continue the run in this directory from its checkpoint",
            metavar="DIR")  # fmt: skip
    g.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace the run in --out")  # fmt: skip
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   default=argparse.SUPPRESS, help="no progress bar")  # fmt: skip
    g.add_argument("--quiet", dest="verbose", action="store_false", default=argparse.SUPPRESS,
                   help="print nothing but errors")  # fmt: skip
    g.add_argument("--config", metavar="FILE", default=None,
                   help="a JSON file of settings (PretrainConfig's field names)")  # fmt: skip
    p.set_defaults(func=cmd_pretrain)
    return p


def cmd_pretrain(args) -> int:
    """`tinylm pretrain`: run pretrain() with the flags given; returns the exit status."""
    from tinylm.files import read_json_object
    from tinylm.training import TrainingInterrupted

    settings = {}
    if getattr(args, "config", None) is not None:
        settings = read_json_object(args.config, "config file")
        unknown = sorted(set(settings) - set(PRETRAIN_SETTINGS))
        if unknown:
            raise ValueError(
                f"config file {str(args.config)!r} has unknown setting(s) {', '.join(unknown)}; "
                "the settings are named as PretrainConfig's fields (n_layer, block_size, lr, ...)"
            )
    settings.update({k: v for k, v in vars(args).items() if k in PRETRAIN_SETTINGS})
    if settings.get("out") is None and settings.get("resume") is None:
        settings["out"] = "out-bert"
    try:
        result = pretrain(**settings)
    except TrainingInterrupted as stop:
        print(
            f"\ntinylm: interrupted after step {stop.step}; checkpoint saved in "
            f"{stop.run_dir / 'checkpoint'}. Resume with:\n"
            f"  tinylm pretrain --resume {shlex.quote(str(stop.run_dir))}",
            file=sys.stderr,
        )
        return 128 + int(stop.signum)
    if result.config.verbose:
        m = result.metrics
        nsp = f", NSP accuracy {m['val_nsp_accuracy']:.3f}" if "val_nsp_accuracy" in m else ""
        print(
            f"done: {result.step} steps, MLM loss {m['val_mlm_loss']:.4f}, MLM accuracy "
            f"{m['val_mlm_accuracy']:.3f}{nsp}; training steps {result.train_seconds:.1f} s, "
            f"evaluation {result.eval_seconds:.1f} s, total {result.elapsed:.1f} s; run in "
            f"{result.run_dir}"
        )
    return 0
