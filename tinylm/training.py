"""Training: the settings of a GPT run, and the one loop that every tinylm training run shares.

    import tinylm
    result = tinylm.train(steps=500, n_layer=2, out="runs/small")  # or train(TrainConfig(...))
    result.val_loss, result.model, result.tokenizer
    tinylm.train(init_from="gpt2/", text="my.txt", lr=1e-4)  # fine-tune a pretrained GPT-2

One step of the loop reads like nanoGPT's (_Loop._step):

    lr = lr_schedule(step, ...)                # linear warmup, then cosine decay to min_lr
    batch = task.get_batch(rng)                # GPT: B random windows of T tokens, y = x shifted
    loss = task.loss(model, batch)             # the forward pass; the model keeps its caches
    grads = model.backward()
    clip_grad_norm(grads, grad_clip)           # the global gradient norm is at most grad_clip
    optimizer.step(grads, lr=lr)               # AdamW, parameters updated in place

The loop does not know what it trains: a *task* supplies the batches, the loss and the
evaluation. LanguageModelTask (here) is GPT's next-token prediction; tinylm/pretraining.py's
PretrainingTask is BERT's masked-LM + next-sentence prediction. Both get every feature below.

Every log_interval steps the mean training loss is read back (on a GPU the only other sync is the
clipping norm), the progress bar updated and a record appended to RUN_DIR/metrics.jsonl. Every
eval_interval steps and at the end, the task evaluates on its validation data (GPT: the loss on
the WHOLE validation split, dropout off), a line is printed, the loss curve redrawn (loss.png), a
sample appended to samples.txt and the checkpoint rewritten (RUN_DIR/checkpoint/, checkpoint.py).

A run resumed from its checkpoint continues bit for bit on the CPU: the checkpoint holds the
parameters, AdamW's moments and step count, and the states of the two random streams (the batch
sampler's and the model's dropout masks), and the learning rate depends only on the step number
and the schedule. So a run interrupted after N of its 2N steps and resumed gives the same losses
and parameters as 2N steps in one go; so does a run of N steps extended with --steps 2N, when both
runs were given the same schedule (--lr-decay-steps 2N). Without it, a resumed run keeps the
schedule it was trained on: the cosine of the first N steps, then min_lr.

Ctrl-C (or SIGTERM) saves the checkpoint of the last finished step and raises TrainingInterrupted
(a KeyboardInterrupt) saying how to resume. A Ctrl-C that arrives while the optimizer is changing
the parameters waits until the update is complete, so the saved state is never half a step. The
checkpoint also holds the losses of the steps since the last record and whether that step's
record was still to be written, and the length of samples.txt: so metrics.jsonl and samples.txt
of a run stopped and resumed, however often, equal those of a run that was never stopped (apart
from the timing fields tokens_per_s and elapsed).

Process-wide state: train() sets the array backend for the run and restores it afterwards. On
the CPU it also raises glibc's malloc thresholds (backend.keep_freed_memory) for the rest of the
process; this changes speed only, never a result, and glibc offers no way to read the old values
back.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from tinylm import checkpoint as ckpt_io
from tinylm import data as data_io
from tinylm.backend import (
    get_backend,
    keep_freed_memory,
    set_backend,
    to_numpy,
)
from tinylm.evaluation import nll_sum
from tinylm.files import write_atomic
from tinylm.model import GPT, GPTConfig
from tinylm.model import param_shapes as gpt_param_shapes
from tinylm.optim import AdamW, clip_grad_norm, lr_schedule
from tinylm.parallel import DataParallel
from tinylm.tokenizer import BPETokenizer, CharTokenizer

# What a run directory holds, besides the checkpoint/ directory.
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SAMPLES_FILE = "samples.txt"
RUN_FILES = (SAMPLES_FILE, PLOT_FILE, METRICS_FILE)  # metrics last: see _Loop._promote


def staged_name(name: str) -> str:
    """Where a run started with overwrite writes ``name`` until its first checkpoint is saved:
    metrics.jsonl -> metrics.new.jsonl (the old run stays whole until then)."""
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.new{dot}{suffix}"
LOCK_FILE = ".lock"  # held while a process writes the run (run_directory_lock)


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults train a character-level model on the
    "pydoc" corpus in about two minutes on two CPU cores.

    The `tinylm train` flags have the same names with dashes (--n-layer for n_layer).

    init_from starts from a pretrained GPT instead of a random one: a Hugging Face GPT-2
    directory (config.json, model.safetensors, vocab.json, merges.txt) or a tinylm run directory
    (its weights only; the optimizer starts afresh at step 0). The model's shape and tokenizer
    then come from there, so giving n_layer, n_head, n_embd, positions, bias, tie_weights,
    tokenizer or vocab_size as well is an error. block_size stays the training window (64 by
    default, at most the model's n_positions): on two CPU cores a step of GPT-2 small takes
    seconds at 64 tokens and about 16 times as long at 1024. Fine-tuning usually wants a smaller
    lr than training from scratch (e.g. 1e-4).
    """

    model_type: ClassVar[str] = "gpt"  # the model a checkpoint of this kind of run holds
    command: ClassVar[str] = "tinylm train"

    # data
    corpus: str = "pydoc"  # built-in corpus, "pydoc" or "stdlib"; unused when text is given
    text: str | None = None  # a UTF-8 file (or a folder of .txt files) to train on instead
    tokenizer: str = "char"  # "char" (one token per character) or "bpe" (byte-level BPE)
    vocab_size: int = 512  # BPE only: 256 bytes + merges + the EOT token
    val_fraction: float = 0.1  # the last 10% of the tokens are the validation split
    # model (GPTConfig)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64  # context length T
    dropout: float = 0.0
    bias: bool = True
    positions: str = "learned"  # "learned" or "sinusoidal"
    tie_weights: bool = True  # the output layer shares the token embedding
    dtype: str = "float32"  # "float32" or "float64"
    # optimisation (AdamW, warmup + cosine schedule)
    steps: int = 2000  # optimizer steps in total (a resumed run counts the earlier ones)
    batch_size: int = 12  # windows per step, B
    lr: float = 1e-3  # the peak learning rate, reached at the end of the warmup
    min_lr: float = 1e-4  # the learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup (capped at the decay length)
    lr_decay_steps: int | None = None  # the step where the cosine reaches min_lr; None: steps
    weight_decay: float = 0.1  # AdamW's decoupled decay, on the matrices and embeddings
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # the largest global gradient norm; 0 turns clipping off
    # evaluation, logging, samples
    eval_interval: int = 250  # steps between validation losses (and checkpoints)
    eval_batch_size: int = 64  # windows per forward during evaluation (no effect on the value)
    log_interval: int = 10  # steps between metrics records and progress-bar updates
    sample_tokens: int = 200  # tokens sampled into samples.txt at each evaluation; 0: none
    # the run
    seed: int = 1337  # model initialisation, batches, dropout masks, samples
    device: str = "cpu"  # "cpu" (NumPy) or "gpu" (CuPy)
    data_parallel: int = 2  # CPU: each batch in this many shards, stepped at once; 1: whole
    data_parallel_workers: str = "processes"  # the shards' workers: "processes" or "threads"
    init_from: str | None = None  # a GPT-2 directory or a run directory to fine-tune from
    out: str | None = None  # the run directory; None writes nothing
    resume: str | None = None  # a run directory to continue from its checkpoint
    overwrite: bool = False  # replace a run directory that already holds a run
    progress: bool | None = None  # the progress bar; None: only when stdout is a terminal
    verbose: bool = True  # print the header and one line per evaluation

    def __post_init__(self):
        check_choice_setting("corpus", self.corpus, data_io.CORPORA)
        check_choice_setting("tokenizer", self.tokenizer, ("char", "bpe"))
        check_choice_setting("positions", self.positions, ("learned", "sinusoidal"))
        check_choice_setting("dtype", self.dtype, ("float32", "float64"))
        check_choice_setting("device", self.device, ("cpu", "gpu"))
        check_choice_setting("data_parallel_workers", self.data_parallel_workers,
                             ("processes", "threads"))
        for name in (
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "steps",
            "batch_size",
            "eval_interval",
            "eval_batch_size",
            "log_interval",
            "vocab_size",
            "data_parallel",
        ):
            check_int_setting(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "sample_tokens", "seed"):
            check_int_setting(name, getattr(self, name), low=0)
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(
                f"vocab_size must be >= 257 for BPE (256 bytes + EOT), got {self.vocab_size}"
            )
        for name in ("bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_loop_settings(self, paths=("text", "init_from", "out", "resume"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "the settings") -> TrainConfig:
        """A TrainConfig from a dict of settings; unknown keys are an error naming them."""
        return settings_from_dict(cls, d, source)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model's settings; its checks (e.g. n_embd divisible by n_head) run here too."""
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
            bias=self.bias,
            positions=self.positions,
            tie_weights=self.tie_weights,
        )


SETTINGS = tuple(f.name for f in fields(TrainConfig))

# Settings that live in the checkpoint's model, tokenizer, data or optimizer state: a resumed run
# must keep them. The others only steer the loop and may change (--steps extends a run).
FIXED_ON_RESUME = (
    "corpus", "text", "tokenizer", "vocab_size", "val_fraction",
    "n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "positions", "tie_weights",
    "dtype", "weight_decay", "beta1", "beta2", "eps", "seed", "init_from",
)  # fmt: skip
TrainConfig.fixed_on_resume = FIXED_ON_RESUME

# The model's shape and tokenizer: with init_from they come from the pretrained model.
MODEL_SETTINGS = (
    "n_layer", "n_head", "n_embd", "positions", "bias", "tie_weights", "tokenizer", "vocab_size",
)  # fmt: skip


# The checks of one scalar setting of a run (TrainConfig, PretrainConfig): ValueError naming it.



def check_loop_settings(cfg, paths) -> None:
    """The checks every run's settings share (TrainConfig, PretrainConfig): the schedule, AdamW,
    clipping, dropout, the validation fraction, the switches, the paths, the head split. Floats
    are stored back as Python floats."""
    if cfg.lr_decay_steps is not None:
        check_int_setting("lr_decay_steps", cfg.lr_decay_steps, low=1)
    cfg.lr = check_float_setting("lr", cfg.lr, low=0.0, low_open=True)
    cfg.min_lr = check_float_setting("min_lr", cfg.min_lr, low=0.0)
    if cfg.min_lr > cfg.lr:
        raise ValueError(f"min_lr must be at most lr={cfg.lr}, got {cfg.min_lr}")
    cfg.weight_decay = check_float_setting("weight_decay", cfg.weight_decay, low=0.0)
    cfg.beta1 = check_float_setting("beta1", cfg.beta1, low=0.0, high=1.0)
    cfg.beta2 = check_float_setting("beta2", cfg.beta2, low=0.0, high=1.0)
    cfg.eps = check_float_setting("eps", cfg.eps, low=0.0, low_open=True)
    cfg.grad_clip = check_float_setting("grad_clip", cfg.grad_clip, low=0.0)
    cfg.dropout = check_float_setting("dropout", cfg.dropout, low=0.0, high=1.0)
    cfg.val_fraction = check_float_setting(
        "val_fraction", cfg.val_fraction, low=0.0, high=1.0, low_open=True
    )
    for name in ("overwrite", "verbose"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    if cfg.progress is not None and not isinstance(cfg.progress, bool):
        raise ValueError(f"progress must be true, false or null, got {cfg.progress!r}")
    for name in paths:
        value = getattr(cfg, name)
        if value is not None:
            if not isinstance(value, (str, Path)) or not str(value):
                raise ValueError(f"{name} must be a path, got {value!r}")
            setattr(cfg, name, str(value))
    if cfg.n_embd % cfg.n_head != 0:  # checked before any corpus is loaded
        raise ValueError(
            f"n_embd must be divisible by n_head, got n_embd={cfg.n_embd} "
            f"and n_head={cfg.n_head}"
        )


def settings_from_dict(cls, d, source: str):
    """cls(**d) for a settings dataclass, every problem a ValueError that names ``source``."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object of settings, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as err:  # a setting of the wrong kind or out of range
        raise ValueError(f"{source}: {err}") from err

def check_choice_setting(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_int_setting(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def check_float_setting(name, value, low, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    if not math.isfinite(value) or bad_low or (high is not None and value >= high):
        lo = "(" if low_open else "["
        rng = (
            f"in {lo}{low:g}, {high:g})"
            if high is not None
            else f"{'>' if low_open else '>='} {low:g}"
        )
        raise ValueError(f"{name} must be {rng}, got {value:g}")
    return value


# ----------------------------------------------------------------------------------------------
# Results and interruption


@dataclass
class TrainResult:
    """What train() returns."""

    model: object  # GPT (or, for pretraining.pretrain, Bert)
    tokenizer: object  # CharTokenizer, BPETokenizer (or WordPieceTokenizer)
    config: object  # TrainConfig (or PretrainConfig)
    step: int  # steps done in total (including those before a resume)
    losses: list[float]  # the training loss of every step this call ran, in order
    val_loss: float  # on the validation data, after the last step
    history: list[dict] = field(default_factory=list)  # the metrics records of this call
    metrics: dict = field(default_factory=dict)  # the last evaluation's figures (val_loss, ...)
    train_seconds: float = 0.0  # wall time of the training steps alone (no evaluation, no I/O)
    eval_seconds: float = 0.0  # wall time of the validation losses
    elapsed: float = 0.0  # wall time of this call
    tokens_per_s: float = 0.0  # training tokens per second of train_seconds
    run_dir: Path | None = None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during train(): the checkpoint of the last finished step was
    saved (if any). ``signum`` is the signal that stopped the run."""

    def __init__(self, step: int, run_dir: Path | None, saved: bool, signum: int = signal.SIGINT):
        self.step, self.run_dir, self.saved, self.signum = step, run_dir, saved, signum
        super().__init__(f"training interrupted after step {step}")


class RunDirectoryBusy(ValueError):
    """Another process is writing the run directory (it holds the directory's lock)."""


# The signals that stop a run cleanly: Ctrl-C, and what `timeout`, `docker stop` and cluster
# schedulers send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _DeferInterrupts:
    """Handle Ctrl-C (SIGINT) and SIGTERM during the loop: raise KeyboardInterrupt at once, unless
    the optimizer is updating the parameters; then hold it until the update is complete."""

    def __init__(self):
        self.updating = False
        self.pending = False
        self.signum = signal.SIGINT  # the last stop signal received
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)

    def _handler(self, signum, frame):
        self.signum = signum
        if self.updating:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def held(self):
        """Hold a stop signal that arrives inside the block until the caller checks
        ``pending``. An exception inside leaves ``updating`` set: the update did not finish."""
        self.updating = True
        yield
        self.updating = False


@contextmanager
def run_directory_lock(run_dir: Path | None):
    """Hold an exclusive OS lock on ``run_dir`` (its file .lock) while a process writes the run.

    The lock belongs to the open file, so the OS releases it when the process ends however it
    ends (kill -9 included): a run directory is never left locked. A second writer gets
    RunDirectoryBusy naming the PID that holds it. The lock file itself is tinylm's; it holds
    the PID of the last writer and is harmless when left behind.
    """
    if run_dir is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock, as before
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            raise RunDirectoryBusy(
                f"{str(run_dir)!r} is being written by another tinylm process (PID {pid}); "
                "wait for it to finish, or stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # closing the file releases the lock
        if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            # This call made the directory and the run failed before writing anything into
            # it: leave no trace, so the same command can simply be run again.
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            run_dir.rmdir()


# ----------------------------------------------------------------------------------------------
# The language-model task: what the loop trains a GPT on


class LanguageModelTask:
    """GPT's next-token prediction over one long array of token ids. The loop asks a task for:

        batch = task.get_batch(rng)        # the inputs of one training step
        loss = task.loss(model, batch)     # its forward pass (model.backward() follows)
        metrics = task.evaluate(model)     # {"val_loss": ...}, dropout off
        text = task.sample(model, step)    # a sample for samples.txt, or None

    tokens_per_step (B * T) counts the throughput, and metric_names lists the evaluation's
    fields in the order metrics.jsonl writes them (each None in the records between
    evaluations). pretraining.PretrainingTask answers the same questions for a BERT.
    """

    metric_names = ("val_loss",)

    def __init__(self, train_data, val_data, tokenizer, cfg: TrainConfig):
        self.train_data, self.val_data, self.tokenizer = train_data, val_data, tokenizer
        self.T, self.B = cfg.block_size, cfg.batch_size
        self.eval_batch_size, self.sample_tokens, self.seed = (
            cfg.eval_batch_size, cfg.sample_tokens, cfg.seed
        )
        self.tokens_per_step = self.B * self.T
        self.parallel = None  # the loop's DataParallel, when it steps the batch in shards

    def get_batch(self, rng):
        return data_io.get_batch(self.train_data, self.T, self.B, rng)  # x, y: (B, T)

    def loss(self, model, batch):
        x, y = batch
        _, loss = model.forward(x, y)
        return loss

    def evaluate(self, model) -> dict:
        return {"val_loss": evaluate(model, self.val_data, self.T, self.eval_batch_size,
                                     self.parallel)}

    def sample(self, model, step: int) -> str | None:
        if self.sample_tokens == 0:
            return None
        return sample_text(model, self.tokenizer, self.sample_tokens, seed=self.seed + step)


def evaluate(model: GPT, data, block_size: int, batch_size: int = 64, parallel=None) -> float:
    """The mean loss per token over ALL of ``data`` (a 1-D token array), dropout off.

    data.eval_windows tiles the N - 1 targets exactly once; the per-token losses of every batch
    are summed in float64 and divided by their count, so the result is the exact token mean (it
    does not depend on batch_size up to float rounding). With ``parallel`` (a DataParallel of
    the model) each batch's shards are scored at once, in its threads or worker processes.
    """
    total, n = 0.0, 0
    for x, y in data_io.eval_windows(data, block_size, batch_size):
        if parallel is not None:  # the batch's shards at once
            total += parallel.loss_sum(x, y)
        else:  # model.logits: dropout off and no caches kept for a backward that never comes
            total += nll_sum(model.logits(x), model.xp.asarray(y))  # summed over the targets
        n += y.size
    return total / n


def sample_text(model: GPT, tokenizer, max_new_tokens: int, seed: int, prompt: str = "") -> str:
    """A continuation of ``prompt`` (an empty prompt starts from the EOT token), temperature 1."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    out = model.generate(np.array([ids]), max_new_tokens, rng=np.random.default_rng(seed))
    return prompt + tokenizer.decode(out[0, len(ids) :])


# ----------------------------------------------------------------------------------------------
# train(): a GPT from scratch, or fine-tuned from a pretrained one


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train a GPT as ``config`` (default TrainConfig()) with ``overrides`` applied; see the module
    docstring for the loop and TrainConfig for the settings.

    With ``resume=RUN_DIR`` the run continues from RUN_DIR's checkpoint, in RUN_DIR: its saved
    settings are the starting point and ``overrides`` may change those that only steer the loop
    (``steps`` extends the run); one that disagrees with the checkpoint's model, data or optimizer
    is a ValueError naming it. With ``init_from=PATH`` the model starts from a pretrained GPT
    (see TrainConfig).

    Process-wide state: the array backend is restored on return; on the CPU glibc's malloc
    thresholds stay raised (backend.keep_freed_memory: speed only, never results).

    Raises ValueError (bad settings, text, run directory), FileNotFoundError, RuntimeError (the GPU
    is missing), TrainingInterrupted (Ctrl-C; the checkpoint was saved first).
    """
    t_call = time.perf_counter()
    cfg, ckpt = resolve_config(TrainConfig, config, overrides)
    if ckpt is None and cfg.init_from is not None:
        given = set(overrides)
        if config is not None:  # a TrainConfig: the settings it changed from the defaults
            given |= {n for n in MODEL_SETTINGS if getattr(config, n) != getattr(TrainConfig, n)}
        clash = [n for n in MODEL_SETTINGS if n in given]
        if clash:
            raise ValueError(
                f"{', '.join(clash)} cannot be set with init_from: the model and its tokenizer "
                f"come from {cfg.init_from}"
            )
    return run_training(cfg, ckpt, _setup_language_model, t_call)


def _setup_language_model(cfg: TrainConfig, ckpt):
    """The text, tokenizer, model and task of a GPT run (new, fine-tuned or resumed)."""
    text, text_sha256 = load_training_text(cfg, ckpt)
    if ckpt is not None:
        model, tokenizer = ckpt.build_model(cfg.device), ckpt.tokenizer
    elif cfg.init_from is not None:
        model, tokenizer = load_pretrained_gpt(cfg)
        model.to(cfg.device)
    else:
        tokenizer = make_tokenizer(cfg, text)
        model_config = cfg.model_config(tokenizer.vocab_size)
        check_memory(gpt_param_shapes(model_config), cfg.dtype)
        model = GPT(model_config, seed=cfg.seed, dtype=cfg.dtype)
        model.to(cfg.device)
    train_ids, val_ids = split_tokens(cfg, tokenizer, text)
    xp = model.xp
    train_data, val_data = xp.asarray(train_ids), xp.asarray(val_ids)  # to the device, once
    task = LanguageModelTask(train_data, val_data, tokenizer, cfg)

    c = model.config
    source = cfg.text if cfg.text else f"corpus {cfg.corpus}"
    start = f", from {cfg.init_from}" if cfg.init_from else ""
    header = (
        f"tinylm train: {model.num_params() / 1e6:.2f}M parameters ({c.n_layer} layers x "
        f"{c.n_head} heads x {c.n_embd}, block {cfg.block_size}, vocab {c.vocab_size} "
        f"{cfg.tokenizer}{start}), {source}: {len(train_ids):,} training / {len(val_ids):,} "
        "validation tokens"
    )
    return model, tokenizer, task, {"text_sha256": text_sha256}, header


def load_training_text(cfg, ckpt) -> tuple[str, str]:
    """The text of a run (cfg.text, else the built-in cfg.corpus) and its SHA-256; a resumed run
    must be given the text its checkpoint was trained on. cfg.text becomes an absolute path,
    so that the saved settings resume from any directory."""
    text = data_io.load_text(cfg.text) if cfg.text else data_io.load_corpus(cfg.corpus)
    if cfg.text is not None:
        cfg.text = str(Path(cfg.text).resolve())
    sha256 = data_io.text_sha256(text)
    if ckpt is not None and ckpt.extra.get("text_sha256") not in (None, sha256):
        raise ValueError(
            f"the training text has changed since the checkpoint in {cfg.out} was written; "
            "a resumed run needs the same text"
        )
    return text, sha256


def load_pretrained_gpt(cfg: TrainConfig):
    """The GPT and tokenizer that ``cfg.init_from`` names: a Hugging Face GPT-2 directory or a
    tinylm run directory (weights only). The model-shape settings of ``cfg`` are set to the
    model's, so the run's saved settings describe the model it trains."""
    from tinylm.hf.gpt2 import load_gpt2

    path = Path(cfg.init_from)
    if not path.is_dir():
        raise ValueError(
            f"init_from {cfg.init_from!r} is not a directory; expected a Hugging Face GPT-2 "
            "directory or a tinylm run directory"
        )
    if ckpt_io.is_tinylm_checkpoint(path) or ckpt_io.has_checkpoint(path):
        source = ckpt_io.load_checkpoint(path)
        if source.model_type != "gpt":
            raise ValueError(
                f"init_from {cfg.init_from!r} holds a {source.model_type} model; "
                f"{TrainConfig.command} fine-tunes a GPT"
            )
        params = {name: a.astype(cfg.dtype) for name, a in source.params.items()}  # copies
        model = GPT(source.model_config, dtype=cfg.dtype, params=params)
        tokenizer = source.tokenizer
    else:
        model, tokenizer = load_gpt2(path, dtype=cfg.dtype)
        if tokenizer is None:
            raise ValueError(
                f"init_from {cfg.init_from!r} has no tokenizer (vocab.json and merges.txt); "
                "tinylm needs GPT-2's tokenizer files next to the weights"
            )
    c = model.config
    if cfg.block_size > c.block_size:
        raise ValueError(
            f"block_size {cfg.block_size} is longer than the {c.block_size} positions of the "
            f"model in {cfg.init_from}"
        )
    c.dropout = cfg.dropout  # dropout is the run's choice, not the model's
    model.dropout_rng = np.random.default_rng(cfg.seed + 1)  # as GPT(seed=cfg.seed) makes it
    cfg.n_layer, cfg.n_head, cfg.n_embd = c.n_layer, c.n_head, c.n_embd
    cfg.positions, cfg.bias, cfg.tie_weights = c.positions, c.bias, c.tie_weights
    cfg.tokenizer = "char" if isinstance(tokenizer, CharTokenizer) else "bpe"
    cfg.vocab_size = tokenizer.vocab_size if cfg.tokenizer == "bpe" else cfg.vocab_size
    return model, tokenizer


def make_tokenizer(cfg: TrainConfig, text: str):
    """The tokenizer a new run learns from its text."""
    if cfg.tokenizer == "char":
        return CharTokenizer(text)
    return BPETokenizer.train(text, cfg.vocab_size)


def split_tokens(cfg: TrainConfig, tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode the text and split it; the training split must hold one window plus its target."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    need = cfg.block_size + 1
    n_val = data_io.validation_size(len(ids), cfg.val_fraction)
    if len(ids) - n_val < need or n_val < 2:
        raise ValueError(
            f"the text has {len(ids):,} tokens: too few to train with block_size "
            f"{cfg.block_size} (the training split needs {need}, the validation split 2); "
            "use a longer text or a smaller block size"
        )
    return data_io.split_train_val(ids, cfg.val_fraction)


def check_memory(shapes: dict[str, tuple], dtype) -> None:
    """Refuse a model whose training state cannot fit in this machine's memory, from the shapes
    alone (nothing is allocated): parameters, gradients and AdamW's two moments in ``dtype``,
    plus the float64 draw of the initialisation."""
    n = sum(math.prod(shape) for shape in shapes.values())
    need = n * (4 * np.dtype(dtype).itemsize + 8)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no check
        return
    if need > have:
        raise ValueError(
            f"the model would have {n:,} parameters, which need {need / 2**30:,.1f} GiB to train "
            f"(weights, gradients, AdamW's moments), more than this machine's "
            f"{have / 2**30:,.1f} GiB; choose a smaller n_layer, n_embd, block_size or vocab_size"
        )


# ----------------------------------------------------------------------------------------------
# What every run shares: its settings on resume, its directory, and the loop


def resolve_config(cls, config, overrides):
    """The effective settings (a ``cls``: TrainConfig or PretrainConfig), and the checkpoint
    when resuming."""
    settings = tuple(f.name for f in fields(cls))
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
    resume = overrides.get("resume", config.resume if config is not None else None)
    if not resume:
        return replace(config or cls(), **overrides), None
    if config is not None:
        raise ValueError(
            f"to resume a run, give its changed settings as keyword overrides, not a {cls.__name__}"
        )

    try:
        ckpt = ckpt_io.load_checkpoint(resume)
    except ValueError as err:
        if Path(resume).is_dir() and (Path(resume) / METRICS_FILE).exists():
            raise ValueError(
                f"{err}; the run in {resume} was stopped before its first checkpoint, so there "
                f"is nothing to resume: start it again with --out {resume} --overwrite"
            ) from err
        raise
    resume = str(ckpt.path.parent)  # the run directory, also when given its checkpoint/
    if ckpt.model_type != cls.model_type:
        other = "tinylm pretrain" if ckpt.model_type == "bert" else "tinylm train"
        raise ValueError(
            f"the run in {resume} trains a {ckpt.model_type} model; continue it with "
            f"{other} --resume {resume}"
        )
    cfg_file = ckpt.path / "config.json"
    train_config = dict(ckpt.train_config)
    if "data_parallel" in {f.name for f in fields(cls)}:
        # a run saved before this setting existed stepped each batch whole
        train_config.setdefault("data_parallel", 1)
    saved = cls.from_dict(train_config, source=f"{cfg_file}: train_config")
    for name in cls.fixed_on_resume:
        if name in overrides and not _same_setting(name, overrides[name], getattr(saved, name)):
            raise ValueError(
                f"{name}={overrides[name]!r} disagrees with the checkpoint in {resume} "
                f"({name}={getattr(saved, name)!r}); a resumed run keeps its model, data "
                "and optimizer"
            )
    if overrides.get("overwrite"):
        raise ValueError(
            "overwrite and resume exclude each other: a resumed run continues its files"
        )
    out = overrides.get("out")
    if out is not None and Path(out).resolve() != Path(resume).resolve():
        raise ValueError(
            f"a resumed run continues in its own directory {resume}; leave out out={out!r}"
        )
    # How this invocation prints (verbose, progress) is its own choice, not the saved run's.
    per_invocation = {"verbose": cls.verbose, "progress": cls.progress}
    settings = {
        **per_invocation,
        **overrides,
        "out": str(resume),
        "resume": str(resume),
        "overwrite": False,
    }
    cfg = replace(saved, **settings)
    # A run stopped while writing the record of its last step may resume just to write it.
    if cfg.steps < ckpt.step or (cfg.steps == ckpt.step and not ckpt.extra.get("log_due")):
        raise ValueError(
            f"the run in {resume} has done {ckpt.step} of its {saved.steps} steps; "
            f"give more steps (e.g. --steps {ckpt.step + saved.steps}) to continue it"
        )
    if cfg.lr_decay_steps is None:
        # Keep the schedule the saved steps were trained on: "steps" only extends the run.
        cfg.lr_decay_steps = saved.steps
    return cfg, ckpt


def _same_setting(name, a, b) -> bool:
    if name in ("text", "init_from") and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a) == b
    return a == b


def run_training(cfg, ckpt, setup, t_call: float | None = None) -> TrainResult:
    """Run the loop for ``cfg`` (resolved by resolve_config) in its locked run directory.

    ``setup(cfg, ckpt)`` returns (model, tokenizer, task, extra, header): the model and data of
    the run, ``extra`` for the checkpoint, and the first line it prints. train() and
    pretraining.pretrain() differ only in their setup.
    """
    t_call = time.perf_counter() if t_call is None else t_call
    run_dir = None if cfg.out is None else Path(cfg.out)
    if run_dir is not None:  # checked before the lock creates anything
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"out {cfg.out!r} is a file, not a directory")
        resolved = run_dir.resolve()
        inside = [p for p in (resolved, *resolved.parents) if ckpt_io.is_tinylm_checkpoint(p)]
        if inside:
            raise ValueError(
                f"out {cfg.out!r} is inside the checkpoint {str(inside[0])!r} of another run; "
                "choose a directory of its own"
            )
    with run_directory_lock(run_dir):  # one writer per run directory
        run_dir = _check_run_dir(cfg, ckpt)  # nothing is written before the data is known good
        old_backend = get_backend()
        if cfg.device == "gpu":
            set_backend("gpu")  # RuntimeError with the install hint when CuPy or the GPU is missing
        else:
            keep_freed_memory()  # a step's many temporaries reuse freed memory; speed only
        try:
            model, tokenizer, task, extra, header = setup(cfg, ckpt)
            optimizer = AdamW(
                model.params,
                lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2),
                eps=cfg.eps,
                weight_decay=cfg.weight_decay,
            )
            if ckpt is not None:
                try:
                    optimizer.load_state_dict(ckpt.optimizer_state)
                except (TypeError, ValueError, KeyError) as err:  # a field of the wrong kind
                    raise ValueError(f"{ckpt.path / 'optimizer.json'}: {err}") from err
                batch_rng = ckpt.batch_rng()
            else:
                # The batch sampler's own stream; a seed list is hashed into a stream apart from
                # the model's initialisation (seed) and its dropout masks (seed + 1).
                batch_rng = np.random.default_rng([cfg.seed, 1])
            loop = _Loop(cfg, run_dir, model, tokenizer, task, optimizer, batch_rng, ckpt)
            loop.extra = extra
            if cfg.verbose:
                where = f" -> {run_dir}" if run_dir is not None else ""
                print(f"{header}, {cfg.device} {cfg.dtype}{where}")
                if ckpt is not None:
                    print(f"resuming at step {ckpt.step} of {cfg.steps}")
                sys.stdout.flush()
            result = loop.run()
        finally:
            set_backend(old_backend)
    result.elapsed = time.perf_counter() - t_call
    return result


def _check_run_dir(cfg, ckpt) -> Path | None:
    """The run directory; refuse one that holds another run unless overwrite is set."""
    if cfg.out is None:
        return None
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"out {str(run_dir)!r} is a file, not a directory")
    if ckpt is None and run_dir.is_dir():
        ours = [n for n in (METRICS_FILE, SAMPLES_FILE, PLOT_FILE) if (run_dir / n).exists()]
        if not cfg.overwrite and ckpt_io.has_checkpoint(run_dir):
            raise ValueError(
                f"{str(run_dir)!r} already holds a training run; continue it with "
                f"--resume {run_dir}, start over with --overwrite, or choose another --out"
            )
        if not cfg.overwrite and ours:
            raise ValueError(
                f"{str(run_dir)!r} holds a run that stopped before its first checkpoint "
                f"({', '.join(ours)}); start it again with --overwrite, or choose another --out"
            )
    return run_dir


class _Loop:
    """The training loop: one optimizer step after another (_step), a record every log_interval
    steps and an evaluation every eval_interval steps (_log), a clean stop on Ctrl-C or SIGTERM
    (_stop). The task supplies the batches, the loss and the evaluation."""

    def __init__(self, cfg, run_dir, model, tokenizer, task, optimizer, batch_rng, ckpt):
        self.cfg, self.run_dir, self.model, self.tokenizer = cfg, run_dir, model, tokenizer
        self.task, self.optimizer, self.batch_rng = task, optimizer, batch_rng
        self.decay_steps = cfg.lr_decay_steps or cfg.steps
        self.warmup = min(cfg.warmup_steps, self.decay_steps)
        state = ckpt.extra if ckpt is not None else {}
        self.step = ckpt.step if ckpt is not None else 0
        self.saved_step = ckpt.step if ckpt is not None else None  # of the last checkpoint
        # The step whose record is written; a run stopped in the middle of writing it (or just
        # before) finishes that record first when it is resumed.
        self.logged_step = None if state.get("log_due") else self.step
        self.elapsed0 = float(state.get("elapsed", 0.0))
        self.extra = {}
        self.history = []  # the records this call writes
        self.losses = []  # the training losses of this call's steps, as floats
        self.pending = []  # the losses since the last record, still on the device
        self.carried = [float(v) for v in state.get("pending_losses", [])]  # from before a stop
        self.mark = None  # what _log started from, to go back to if it is interrupted
        self.metrics = {}  # of the last evaluation
        self.interval_time = self.train_seconds = self.eval_seconds = 0.0
        self.guard = _DeferInterrupts()
        # A GPT on the CPU steps its batch in shards, at once (tinylm/parallel.py): shard 0 in
        # this process, the others in worker processes (or threads, data_parallel_workers).
        shards = getattr(cfg, "data_parallel", 1)
        self.parallel = None
        if shards > 1 and isinstance(task, LanguageModelTask) and model.device == "cpu":
            processes = getattr(cfg, "data_parallel_workers", "processes") == "processes"
            self.parallel = DataParallel(model, shards, processes=processes)
            task.parallel = self.parallel  # the evaluations use its workers too
        self.staged = False  # writing the staged names (see staged_name)
        self.history_before = self._prepare_files(ckpt, state)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run()
        except BaseException:
            if self.staged and self.saved_step is None:
                # Stopped before its first checkpoint: the old run stays as it was.
                for name in RUN_FILES:
                    (self.run_dir / staged_name(name)).unlink(missing_ok=True)
            raise
        finally:
            if self.parallel is not None:
                self.parallel.close()

    def _run(self) -> TrainResult:
        from tqdm import tqdm

        show_bar = sys.stdout.isatty() if self.cfg.progress is None else self.cfg.progress
        self.bar = tqdm(total=self.cfg.steps, initial=self.step, unit="step",
                        disable=not show_bar, dynamic_ncols=True, file=sys.stdout)  # fmt: skip
        self.t0 = time.perf_counter()
        self.snapshot = None
        try:
            with self.guard:
                if self._log_due():  # stopped before the record of its last step was written
                    self._log()
                while self.step < self.cfg.steps:
                    self._timed_step()
                    if self.guard.pending:  # a Ctrl-C held during the update
                        raise KeyboardInterrupt
                    if self._log_due():
                        self._log()
        except KeyboardInterrupt:
            self._stop()
        self.bar.close()
        return TrainResult(
            model=self.model,
            tokenizer=self.tokenizer,
            config=self.cfg,
            step=self.step,
            losses=self.losses,
            val_loss=self.metrics.get("val_loss"),
            history=self.history,
            metrics=self.metrics,
            train_seconds=self.train_seconds,
            eval_seconds=self.eval_seconds,
            tokens_per_s=len(self.losses) * self.task.tokens_per_step
            / max(self.train_seconds, 1e-9),
            run_dir=self.run_dir,
        )

    def _step(self):
        """One optimizer step, as in nanoGPT's training loop."""
        cfg, model = self.cfg, self.model
        lr = lr_schedule(self.step, cfg.lr, self.warmup, self.decay_steps, cfg.min_lr)
        batch = self.task.get_batch(self.batch_rng)
        if self.parallel is not None:  # the same loss and gradients, the batch split over cores
            loss, grads = self.parallel.forward_backward(*batch)
        else:
            loss = self.task.loss(model, batch)
            grads = model.backward()
        if cfg.grad_clip > 0:
            norm = clip_grad_norm(grads, cfg.grad_clip)  # scales grads in place when too large
            _check_norm(norm, self.step + 1)
        with self.guard.held():  # a Ctrl-C now waits until the update is complete
            self.optimizer.step(grads, lr=lr)
            self.step += 1
            self.pending.append(loss)

    def _timed_step(self):
        """_step, timed, with the random streams noted so that a stop in its middle undoes its
        draws."""
        t = time.perf_counter()
        self.snapshot = (
            self.step,
            self.batch_rng.bit_generator.state,
            self.model.dropout_rng.bit_generator.state,
        )
        self._step()
        dt = time.perf_counter() - t
        self.interval_time += dt
        self.train_seconds += dt
        self.bar.update(1)

    def _is_eval_step(self) -> bool:
        return self.step % self.cfg.eval_interval == 0 or self.step == self.cfg.steps

    def _log_due(self) -> bool:
        """Whether this step is one that gets a record, and its record is not written yet."""
        is_log = self.step % self.cfg.log_interval == 0 or self._is_eval_step()
        return self.step > 0 and is_log and self.logged_step != self.step

    def _log(self):
        """The record of this step: the mean training loss since the last record; on evaluation
        steps also the task's validation figures, a printed line, the plot, a sample and the
        checkpoint."""
        self.mark = (self._samples_size(), list(self.carried), list(self.pending))
        train_loss, tok_s = self._read_losses()
        lr = lr_schedule(self.step - 1, self.cfg.lr, self.warmup, self.decay_steps, self.cfg.min_lr)
        is_eval = self._is_eval_step()
        if is_eval:
            t = time.perf_counter()
            self.metrics = self.task.evaluate(self.model)
            self.eval_seconds += time.perf_counter() - t
        record = {"step": self.step, "train_loss": train_loss}
        record |= {name: self.metrics.get(name) if is_eval else None
                   for name in self.task.metric_names}  # fmt: skip
        record |= {"lr": lr, "tokens_per_s": tok_s, "elapsed": self.elapsed()}
        self._append_record(record)
        self.pending, self.carried, self.interval_time = [], [], 0.0
        self.bar.set_postfix(
            {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"},
            refresh=False,
        )
        if is_eval:
            self._after_eval(record)
        self.logged_step, self.mark = self.step, None
        if is_eval and self.run_dir is not None:
            self.save()

    def _read_losses(self) -> tuple[float, float]:
        """The mean training loss of the steps since the last record, and tokens per second."""
        t = time.perf_counter()
        new = [float(v) for v in to_numpy(self.model.xp.stack(self.pending))] if self.pending \
            else []  # fmt: skip
        # On a GPU the steps run ahead of the host until this read waits for them, so the wait
        # counts as training time.
        t = time.perf_counter() - t
        self.interval_time += t
        self.train_seconds += t
        self.losses += new
        step_losses = self.carried + new  # carried: steps before a stop and resume
        train_loss = sum(step_losses) / len(step_losses)
        if not math.isfinite(train_loss):
            raise RuntimeError(
                f"the training loss became {train_loss} at step {self.step}; "
                "try a smaller --lr or keep --grad-clip on"
            )
        return train_loss, len(new) * self.task.tokens_per_step / max(self.interval_time, 1e-9)

    def _after_eval(self, record):
        """Print the evaluation's line; draw the curves and append a sample to the run."""
        if self.cfg.verbose:
            self.bar.write(format_record(record), file=sys.stdout)
        if self.run_dir is None:
            return
        plot_losses(self.history_before + self.history, self._path(PLOT_FILE))
        text = self.task.sample(self.model, self.step)
        if text is not None:
            with open(self._path(SAMPLES_FILE), "a", encoding="utf-8", errors="replace") as f:
                f.write(f"=== step {self.step} ===\n{text}\n\n")

    def _stop(self):
        """Ctrl-C or SIGTERM: save the last finished step and raise TrainingInterrupted."""
        self.bar.close()
        if self.guard.updating or self.run_dir is None:
            raise  # parameters half-updated (or nowhere to save): keep the last checkpoint
        if self.snapshot is not None and self.snapshot[0] == self.step:
            # Stopped in the middle of a step: undo its random draws.
            self.batch_rng.bit_generator.state = self.snapshot[1]
            self.model.dropout_rng.bit_generator.state = self.snapshot[2]
        self.save()
        raise TrainingInterrupted(
            self.step, self.run_dir, saved=True, signum=self.guard.signum
        ) from None

    # -- files --------------------------------------------------------------------------------

    def _prepare_files(self, ckpt, state) -> list[dict]:
        """Start the run directory's files; on resume keep what the checkpoint's step had
        written: the records up to it (before it, if its own record was still due) and
        samples.txt as long as it was."""
        if self.run_dir is None:
            return []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if ckpt is None and self.cfg.overwrite and ckpt_io.has_checkpoint(self.run_dir):
            # Replace the old run only once the new one has its first checkpoint: until then
            # the new files have staged names, and the old checkpoint stays.
            ckpt_io.check_removable(self.run_dir)
            self.staged = True
            for name in (METRICS_FILE, SAMPLES_FILE):
                write_atomic(self._path(name), "")
            self._path(PLOT_FILE).unlink(missing_ok=True)
            return []
        if ckpt is None:  # a new run (an existing one was refused unless overwrite)
            for name in RUN_FILES:
                (self.run_dir / name).unlink(missing_ok=True)
                (self.run_dir / staged_name(name)).unlink(missing_ok=True)
            ckpt_io.remove_checkpoint(self.run_dir)
            return []
        if state.get("staged") and (self.run_dir / staged_name(METRICS_FILE)).exists():
            _promote(self.run_dir)  # a crash between the first checkpoint and its promotion
        history = read_metrics(self.run_dir) if metrics.exists() else []
        # Records written after the checkpoint (a crash before the next save) are dropped: the
        # resumed run writes them again.
        last = ckpt.step if self.logged_step == ckpt.step else ckpt.step - 1
        history = [r for r in history if r.get("step", 0) <= last]
        write_atomic(metrics, "".join(json.dumps(r) + "\n" for r in history))
        samples = self.run_dir / SAMPLES_FILE
        size = state.get("samples_bytes")
        if isinstance(size, int) and samples.is_file() and samples.stat().st_size > size:
            with open(samples, "r+b") as f:  # samples written after the checkpoint
                f.truncate(size)
        return history

    def _path(self, name: str) -> Path:
        return self.run_dir / (staged_name(name) if self.staged else name)

    def _samples_size(self) -> int:
        path = None if self.run_dir is None else self._path(SAMPLES_FILE)
        return path.stat().st_size if path is not None and path.is_file() else 0

    def _append_record(self, record):
        self.history.append(record)
        if self.run_dir is not None:
            with open(self._path(METRICS_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save(self):
        """Write the checkpoint of this step, with what a resumed run needs to write the same
        records and samples as an uninterrupted one."""
        if self._log_due() and self.mark is not None:
            # Stopped inside this step's _log: the resumed run writes that record again, from
            # what _log started from.
            samples_bytes, carried, pending = self.mark
        else:
            samples_bytes, carried, pending = self._samples_size(), self.carried, self.pending
        losses = carried + ([float(v) for v in to_numpy(self.model.xp.stack(pending))]
                            if pending else [])  # fmt: skip
        extra = {
            **self.extra,
            "elapsed": self.elapsed(),
            "pending_losses": losses,
            "log_due": self._log_due(),
            "samples_bytes": samples_bytes,
            "staged": self.staged,
        }
        if self.staged:  # every staged file exists when the checkpoint that owns them is saved
            plot_losses(self.history_before + self.history, self._path(PLOT_FILE))
        try:
            ckpt_io.save_checkpoint(
                self.run_dir / ckpt_io.CHECKPOINT_NAME,
                model=self.model,
                optimizer=self.optimizer,
                tokenizer=self.tokenizer,
                step=self.step,
                batch_rng=self.batch_rng,
                train_config=self.cfg.to_dict(),
                extra=extra,
            )
        except OSError as err:  # a full disk, a read-only directory, ...
            # save_checkpoint writes a new checkpoint beside the old one and swaps them only
            # once it is complete, so the old one is untouched.
            before = (
                f"the previous checkpoint (step {self.saved_step}) is intact"
                if self.saved_step is not None
                else "no checkpoint was written; the same command starts the run again"
            )
            raise OSError(
                f"could not save the checkpoint of step {self.step} in {self.run_dir} "
                f"({err.strerror or err}); {before}"
            ) from err
        self.saved_step = self.step
        if self.staged:  # the new run's first checkpoint replaced the old one: now its files
            _promote(self.run_dir)
            self.staged = False

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0


def _promote(run_dir: Path) -> None:
    """Rename the staged files of a run started with overwrite over the old run's, metrics.jsonl
    last: while metrics.new.jsonl exists the promotion is unfinished, and a resume finishes it."""
    for name in RUN_FILES:
        staged = run_dir / staged_name(name)
        if staged.exists():
            os.replace(staged, run_dir / name)


def _check_norm(norm, step: int) -> None:
    if not math.isfinite(norm):
        # Stop rather than skip: a step whose gradient is inf or NaN means the run diverged,
        # and skipping would hide it behind later steps. Nothing of this step was applied; the
        # last checkpoint is intact.
        raise RuntimeError(
            f"the gradient norm became {norm} at step {step}; nothing of that step was applied "
            "and the last checkpoint is intact. Try a smaller --lr"
        )


def format_record(r: dict) -> str:
    """step 250 | train loss 1.9213 | val loss 1.9812 | lr 9.71e-04 | 12,345 tok/s | 31.2 s"""
    val = f" | val loss {r['val_loss']:.4f}" if r.get("val_loss") is not None else ""
    for key, value in r.items():  # a task's own figures: val_mlm_accuracy -> "mlm accuracy"
        if key.startswith("val_") and key != "val_loss" and isinstance(value, (int, float)):
            val += f" | {key[4:].replace('_', ' ')} {value:.4f}"
    return (
        f"step {r['step']} | train loss {r['train_loss']:.4f}{val} | lr {r['lr']:.2e} | "
        f"{r['tokens_per_s']:,.0f} tok/s | {r['elapsed']:.1f} s"
    )


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl.

    A last line without its newline was cut short by a crash while it was written, and is left
    out (a resumed run writes it again). Any other line that is not a JSON object is a
    ValueError naming the file and the line.
    """
    records = []
    path = Path(run_dir) / METRICS_FILE
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # the unfinished last line of a crash
                continue
            raise ValueError(
                f"{path}, line {number}: not a JSON record ({err.msg}); expected one JSON "
                "object per line"
            ) from err
        if not isinstance(r, dict):
            raise ValueError(
                f"{path}, line {number}: expected a JSON object, got a {type(r).__name__}"
            )
        records.append(r)
    return records


def plot_losses(history: list[dict], path) -> None:
    """Draw the training and validation losses against the step into a PNG (no pyplot, so the
    caller's matplotlib backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train = [r for r in history if r.get("train_loss") is not None]
    val = [r for r in history if r.get("val_loss") is not None]
    if train:
        steps, losses = [r["step"] for r in train], [r["train_loss"] for r in train]
        ax.plot(steps, losses, label="train (mean over the log interval)", lw=1, alpha=0.8)
    if val:
        steps, losses = [r["step"] for r in val], [r["val_loss"] for r in val]
        ax.plot(steps, losses, "o-", label="validation (whole split)", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
