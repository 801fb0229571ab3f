"""Training a GPT: the settings, the loop, and what a run leaves on disk.

    import tinylm
    result = tinylm.train(steps=500, n_layer=2, out="runs/small")  # or train(TrainConfig(...))
    result.val_loss, result.model, result.tokenizer

One step of the loop reads like nanoGPT's:

    lr = lr_schedule(step, ...)                # linear warmup, then cosine decay to min_lr
    x, y = get_batch(train_data, T, B, rng)    # B random windows of T tokens; y is x shifted by one
    _, loss = model.forward(x, y)
    grads = model.backward()
    clip_grad_norm(grads, grad_clip)           # the global gradient norm is at most grad_clip
    optimizer.step(grads, lr=lr)               # AdamW, parameters updated in place

Every log_interval steps the mean training loss is read back (on a GPU the only other sync is the
clipping norm), the progress bar updated and a record appended to RUN_DIR/metrics.jsonl. Every
eval_interval steps and at the end, the loss on the WHOLE validation split is computed (dropout
off), a line printed, the loss curve redrawn (loss.png), a sample appended to samples.txt and the
checkpoint rewritten (RUN_DIR/checkpoint/, see checkpoint.py).

A run resumed from its checkpoint continues bit for bit on the CPU: the checkpoint holds the
parameters, AdamW's moments and step count, and the states of the two random streams (the batch
sampler's and the model's dropout masks), and the learning rate depends only on the step number
and the schedule. So a run interrupted after N of its 2N steps and resumed gives the same losses
and parameters as 2N steps in one go; so does a run of N steps extended with --steps 2N, when both
runs were given the same schedule (--lr-decay-steps 2N). Without it, a resumed run keeps the
schedule it was trained on: the cosine of the first N steps, then min_lr.

Ctrl-C saves the checkpoint of the last finished step and raises TrainingInterrupted (a
KeyboardInterrupt) saying how to resume. A Ctrl-C that arrives while the optimizer is changing the
parameters waits until the update is complete, so the saved state is never half a step.
"""

from __future__ import annotations

import hashlib
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

import numpy as np

from tinylm import checkpoint as ckpt_io
from tinylm import data as data_io
from tinylm.backend import (
    get_array_module,
    get_backend,
    keep_freed_memory,
    set_backend,
    to_numpy,
)
from tinylm.model import GPT, GPTConfig
from tinylm.optim import AdamW, clip_grad_norm, lr_schedule
from tinylm.tokenizer import BPETokenizer, CharTokenizer

# What a run directory holds, besides the checkpoint/ directory.
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SAMPLES_FILE = "samples.txt"
LOCK_FILE = ".lock"  # held while a process writes the run (run_directory_lock)


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults train a character-level model on the
    "pydoc" corpus in about two minutes on two CPU cores.

    The `tinylm train` flags have the same names with dashes (--n-layer for n_layer).
    """

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
    out: str | None = None  # the run directory; None writes nothing
    resume: str | None = None  # a run directory to continue from its checkpoint
    overwrite: bool = False  # replace a run directory that already holds a run
    progress: bool | None = None  # the progress bar; None: only when stdout is a terminal
    verbose: bool = True  # print the header and one line per evaluation

    def __post_init__(self):
        _check_choice("corpus", self.corpus, data_io.CORPORA)
        _check_choice("tokenizer", self.tokenizer, ("char", "bpe"))
        _check_choice("positions", self.positions, ("learned", "sinusoidal"))
        _check_choice("dtype", self.dtype, ("float32", "float64"))
        _check_choice("device", self.device, ("cpu", "gpu"))
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
        ):
            _check_int(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "sample_tokens", "seed"):
            _check_int(name, getattr(self, name), low=0)
        if self.lr_decay_steps is not None:
            _check_int("lr_decay_steps", self.lr_decay_steps, low=1)
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(
                f"vocab_size must be >= 257 for BPE (256 bytes + EOT), got {self.vocab_size}"
            )
        self.lr = _check_float("lr", self.lr, low=0.0, low_open=True)
        self.min_lr = _check_float("min_lr", self.min_lr, low=0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be at most lr={self.lr}, got {self.min_lr}")
        self.weight_decay = _check_float("weight_decay", self.weight_decay, low=0.0)
        self.beta1 = _check_float("beta1", self.beta1, low=0.0, high=1.0)
        self.beta2 = _check_float("beta2", self.beta2, low=0.0, high=1.0)
        self.eps = _check_float("eps", self.eps, low=0.0, low_open=True)
        self.grad_clip = _check_float("grad_clip", self.grad_clip, low=0.0)
        self.dropout = _check_float("dropout", self.dropout, low=0.0, high=1.0)
        self.val_fraction = _check_float(
            "val_fraction", self.val_fraction, low=0.0, high=1.0, low_open=True
        )
        for name in ("bias", "tie_weights", "overwrite", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ValueError(f"progress must be true, false or null, got {self.progress!r}")
        for name in ("text", "out", "resume"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, Path)) or not str(value):
                    raise ValueError(f"{name} must be a path, got {value!r}")
                setattr(self, name, str(value))
        if self.n_embd % self.n_head != 0:  # checked before any corpus is loaded
            raise ValueError(
                f"n_embd must be divisible by n_head, got n_embd={self.n_embd} "
                f"and n_head={self.n_head}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "the settings") -> TrainConfig:
        """A TrainConfig from a dict of settings; unknown keys are an error naming them."""
        if not isinstance(d, dict):
            raise ValueError(
                f"{source}: expected a JSON object of settings, got {type(d).__name__}"
            )
        unknown = sorted(set(d) - set(SETTINGS))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        return cls(**d)

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
    "dtype", "weight_decay", "beta1", "beta2", "eps", "seed",
)  # fmt: skip


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _check_float(name, value, low, high=None, low_open=False):
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

    model: GPT
    tokenizer: object  # CharTokenizer or BPETokenizer
    config: TrainConfig
    step: int  # steps done in total (including those before a resume)
    losses: list[float]  # the training loss of every step this call ran, in order
    val_loss: float  # on the whole validation split, after the last step
    history: list[dict] = field(default_factory=list)  # the metrics records of this call
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
# Evaluation and samples


def evaluate(model: GPT, data, block_size: int, batch_size: int = 64) -> float:
    """The mean loss per token over ALL of ``data`` (a 1-D token array), dropout off.

    data.eval_windows tiles the N - 1 targets exactly once; each batch's mean loss is weighted by
    its number of targets, so the result is the exact token-weighted mean (it does not depend on
    batch_size up to float rounding).
    """
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for x, y in data_io.eval_windows(data, block_size, batch_size):
            _, loss = model.forward(x, y)
            total = total + loss.astype(np.float64) * y.size  # stays on the device until the end
            n += y.size
    finally:
        model.training = was_training
    return float(total) / n


def sample_text(model: GPT, tokenizer, max_new_tokens: int, seed: int, prompt: str = "") -> str:
    """A continuation of ``prompt`` (an empty prompt starts from the EOT token), temperature 1."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    out = model.generate(np.array([ids]), max_new_tokens, rng=np.random.default_rng(seed))
    return prompt + tokenizer.decode(out[0, len(ids) :])


# ----------------------------------------------------------------------------------------------
# The run


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train a GPT as ``config`` (default TrainConfig()) with ``overrides`` applied; see the module
    docstring for the loop and TrainConfig for the settings.

    With ``resume=RUN_DIR`` the run continues from RUN_DIR's checkpoint, in RUN_DIR: its saved
    settings are the starting point and ``overrides`` may change those that only steer the loop
    (``steps`` extends the run); one that disagrees with the checkpoint's model, data or optimizer
    is a ValueError naming it.

    Raises ValueError (bad settings, text, run directory), FileNotFoundError, RuntimeError (the GPU
    is missing), TrainingInterrupted (Ctrl-C; the checkpoint was saved first).
    """
    t_call = time.perf_counter()
    cfg, ckpt = _resolve_config(config, overrides)
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
        return _train_locked(cfg, ckpt, t_call)


def _train_locked(cfg: TrainConfig, ckpt, t_call: float) -> TrainResult:
    """train() once the run directory is locked: check it, set up, run the loop."""
    run_dir = _check_run_dir(cfg, ckpt)  # nothing is written before the data is known to be good

    old_backend = get_backend()
    if cfg.device == "gpu":
        set_backend("gpu")  # RuntimeError with the install hint when CuPy or the GPU is missing
    else:
        keep_freed_memory()  # a step's many temporaries reuse freed memory; speed only
    try:
        text = data_io.load_text(cfg.text) if cfg.text else data_io.load_corpus(cfg.corpus)
        if cfg.text is not None:
            cfg.text = str(Path(cfg.text).resolve())  # saved so, a resume works from anywhere
        text_sha256 = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
        if ckpt is not None and ckpt.extra.get("text_sha256") not in (None, text_sha256):
            raise ValueError(
                f"the training text has changed since the checkpoint in {run_dir} was written; "
                "a resumed run needs the same text"
            )
        tokenizer = ckpt.tokenizer if ckpt is not None else make_tokenizer(cfg, text)
        train_ids, val_ids = split_tokens(cfg, tokenizer, text)

        if ckpt is not None:
            model = ckpt.build_model(cfg.device)
            batch_rng = ckpt.batch_rng()
        else:
            model = GPT(cfg.model_config(tokenizer.vocab_size), seed=cfg.seed, dtype=cfg.dtype)
            model.to(cfg.device)
            # The batch sampler's own stream; a seed list is hashed into a stream apart from the
            # model's initialisation (seed) and its dropout masks (seed + 1).
            batch_rng = np.random.default_rng([cfg.seed, 1])
        optimizer = AdamW(
            model.params,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )
        if ckpt is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        xp = model.xp
        train_data, val_data = xp.asarray(train_ids), xp.asarray(val_ids)  # to the device, once

        loop = _Loop(cfg, run_dir, model, tokenizer, optimizer, batch_rng, ckpt)
        loop.extra = {"text_sha256": text_sha256}
        if cfg.verbose:
            _print_header(cfg, model, tokenizer, len(train_ids), len(val_ids), run_dir, ckpt)
        result = loop.run(train_data, val_data)
    finally:
        set_backend(old_backend)
    result.elapsed = time.perf_counter() - t_call
    return result


def make_tokenizer(cfg: TrainConfig, text: str):
    """The tokenizer a new run learns from its text."""
    if cfg.tokenizer == "char":
        return CharTokenizer(text)
    return BPETokenizer.train(text, cfg.vocab_size)


def split_tokens(cfg: TrainConfig, tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode the text and split it; the training split must hold one window plus its target."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    need = cfg.block_size + 1
    n_val = math.floor(len(ids) * cfg.val_fraction)  # as data.split_train_val splits
    if len(ids) - n_val < need or n_val < 2:
        raise ValueError(
            f"the text has {len(ids):,} tokens: too few to train with block_size "
            f"{cfg.block_size} (the training split needs {need}, the validation split 2); "
            "use a longer text or a smaller block size"
        )
    return data_io.split_train_val(ids, cfg.val_fraction)


def _resolve_config(config, overrides) -> tuple[TrainConfig, ckpt_io.Checkpoint | None]:
    """The effective settings, and the checkpoint when resuming."""
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
    resume = overrides.get("resume", config.resume if config is not None else None)
    if not resume:
        return replace(config or TrainConfig(), **overrides), None
    if config is not None:
        raise ValueError(
            "to resume a run, give its changed settings as keyword overrides, not a TrainConfig"
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
    cfg_file = ckpt.path / "config.json"
    saved = TrainConfig.from_dict(ckpt.train_config, source=f"{cfg_file}: train_config")
    for name in FIXED_ON_RESUME:
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
    per_invocation = {"verbose": TrainConfig.verbose, "progress": TrainConfig.progress}
    settings = {
        **per_invocation,
        **overrides,
        "out": str(resume),
        "resume": str(resume),
        "overwrite": False,
    }
    cfg = replace(saved, **settings)
    if cfg.steps <= ckpt.step:
        raise ValueError(
            f"the run in {resume} has done {ckpt.step} of its {saved.steps} steps; "
            f"give more steps (e.g. --steps {ckpt.step + saved.steps}) to continue it"
        )
    if cfg.lr_decay_steps is None:
        # Keep the schedule the saved steps were trained on: "steps" only extends the run.
        cfg.lr_decay_steps = saved.steps
    return cfg, ckpt


def _same_setting(name, a, b) -> bool:
    if name == "text" and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    if isinstance(b, float) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a) == b
    return a == b


def _check_run_dir(cfg: TrainConfig, ckpt) -> Path | None:
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


def _print_header(cfg, model, tokenizer, n_train, n_val, run_dir, ckpt):
    c = model.config
    where = f" -> {run_dir}" if run_dir is not None else ""
    source = cfg.text if cfg.text else f"corpus {cfg.corpus}"
    print(
        f"tinylm train: {model.num_params() / 1e6:.2f}M parameters ({c.n_layer} layers x "
        f"{c.n_head} heads x {c.n_embd}, block {c.block_size}, vocab {c.vocab_size} "
        f"{cfg.tokenizer}), {source}: {n_train:,} training / {n_val:,} validation tokens, "
        f"{cfg.device} {cfg.dtype}{where}"
    )
    if ckpt is not None:
        print(f"resuming at step {ckpt.step} of {cfg.steps}")
    sys.stdout.flush()


class _Loop:
    """The training loop and its bookkeeping (records, files, timing), kept apart from the setup."""

    def __init__(self, cfg, run_dir, model, tokenizer, optimizer, batch_rng, ckpt):
        self.cfg, self.run_dir, self.model, self.tokenizer = cfg, run_dir, model, tokenizer
        self.optimizer, self.batch_rng = optimizer, batch_rng
        self.step = ckpt.step if ckpt is not None else 0
        self.saved_step = ckpt.step if ckpt is not None else None  # of the last checkpoint
        self.elapsed0 = float(ckpt.extra.get("elapsed", 0.0)) if ckpt is not None else 0.0
        self.extra = {}
        self.history_before = self._prepare_files(ckpt)

    # -- files --------------------------------------------------------------------------------

    def _prepare_files(self, ckpt) -> list[dict]:
        """Start the run directory's files; on resume keep the records up to the checkpoint."""
        if self.run_dir is None:
            return []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if ckpt is None:  # a new run (an existing one was refused unless overwrite)
            for name in (METRICS_FILE, SAMPLES_FILE, PLOT_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
            ckpt_io.remove_checkpoint(self.run_dir)
            return []
        history = read_metrics(self.run_dir) if metrics.exists() else []
        # Records written after the checkpoint (a crash before the next save) are dropped: the
        # resumed run writes them again.
        history = [r for r in history if r.get("step", 0) <= ckpt.step]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
        return history

    def _append_record(self, record):
        self.history.append(record)
        if self.run_dir is not None:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def save(self):
        try:
            ckpt_io.save_checkpoint(
                self.run_dir / ckpt_io.CHECKPOINT_NAME,
                model=self.model,
                optimizer=self.optimizer,
                tokenizer=self.tokenizer,
                step=self.step,
                batch_rng=self.batch_rng,
                train_config=self.cfg.to_dict(),
                extra={**self.extra, "elapsed": self.elapsed()},
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

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0

    # -- the loop -------------------------------------------------------------------------------

    def run(self, train_data, val_data) -> TrainResult:
        from tqdm import tqdm

        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        T, B = cfg.block_size, cfg.batch_size
        decay_steps = cfg.lr_decay_steps or cfg.steps
        warmup = min(cfg.warmup_steps, decay_steps)
        xp = get_array_module(train_data)
        show_bar = sys.stdout.isatty() if cfg.progress is None else cfg.progress

        self.t0 = time.perf_counter()
        self.history = []
        losses = []  # floats, read back every log_interval steps
        pending = []  # the losses of the steps since the last read-back, still on the device
        interval_time = 0.0  # seconds of training steps since the last record
        self.train_seconds = self.eval_seconds = 0.0
        val_loss = None  # of the last evaluation; the last step always has one
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            unit="step",
            disable=not show_bar,
            dynamic_ncols=True,
            file=sys.stdout,
        )

        guard = _DeferInterrupts()
        mid_step = False
        try:
            with guard:
                while self.step < cfg.steps:
                    # -- one training step --
                    t_step = time.perf_counter()
                    rng_states = (
                        self.batch_rng.bit_generator.state,
                        model.dropout_rng.bit_generator.state,
                    )
                    mid_step = True
                    lr_now = lr_schedule(self.step, cfg.lr, warmup, decay_steps, cfg.min_lr)
                    x, y = data_io.get_batch(train_data, T, B, self.batch_rng)
                    _, loss = model.forward(x, y)
                    grads = model.backward()
                    if cfg.grad_clip > 0:
                        norm = clip_grad_norm(grads, cfg.grad_clip)
                        if not math.isfinite(norm):
                            # Stop rather than skip: a step whose gradient is inf or NaN means
                            # the run diverged, and skipping would hide it behind later steps.
                            # Nothing of this step was applied; the last checkpoint is intact.
                            raise RuntimeError(
                                f"the gradient norm became {norm} at step {self.step + 1}; "
                                "nothing of that step was applied and the last checkpoint is "
                                "intact. Try a smaller --lr"
                            )
                    guard.updating = True
                    optimizer.step(grads, lr=lr_now)
                    self.step += 1
                    mid_step = False
                    guard.updating = False  # only now may a Ctrl-C save: the step is complete
                    pending.append(loss)
                    dt = time.perf_counter() - t_step
                    interval_time += dt
                    self.train_seconds += dt
                    bar.update(1)
                    if guard.pending:
                        raise KeyboardInterrupt

                    # -- bookkeeping: records every log_interval steps, evaluation every
                    #    eval_interval steps and at the end --
                    is_eval = self.step % cfg.eval_interval == 0 or self.step == cfg.steps
                    if self.step % cfg.log_interval == 0 or is_eval:
                        t_read = time.perf_counter()
                        step_losses = [float(v) for v in to_numpy(xp.stack(pending))]
                        # On a GPU the steps run ahead of the host until this read waits for
                        # them, so the wait counts as training time.
                        t_read = time.perf_counter() - t_read
                        interval_time += t_read
                        self.train_seconds += t_read
                        losses += step_losses
                        train_loss = sum(step_losses) / len(step_losses)
                        if not math.isfinite(train_loss):
                            raise RuntimeError(
                                f"the training loss became {train_loss} at step {self.step}; "
                                "try a smaller --lr or keep --grad-clip on"
                            )
                        tok_s = len(pending) * B * T / max(interval_time, 1e-9)
                        pending, interval_time = [], 0.0
                        if is_eval:
                            val_loss = self._evaluate(val_data)
                        record = {
                            "step": self.step,
                            "train_loss": train_loss,
                            "val_loss": val_loss if is_eval else None,
                            "lr": lr_now,
                            "tokens_per_s": tok_s,
                            "elapsed": self.elapsed(),
                        }
                        self._append_record(record)
                        bar.set_postfix(
                            {
                                "loss": f"{train_loss:.3f}",
                                "lr": f"{lr_now:.2e}",
                                "tok/s": f"{tok_s:,.0f}",
                            },
                            refresh=False,
                        )
                        if is_eval:
                            self._after_eval(record, bar)
        except KeyboardInterrupt:
            bar.close()
            if guard.updating or self.run_dir is None:
                raise  # parameters half-updated (or nowhere to save): keep the last checkpoint
            if mid_step:  # undo the random draws of the unfinished step
                self.batch_rng.bit_generator.state = rng_states[0]
                model.dropout_rng.bit_generator.state = rng_states[1]
            self.save()
            raise TrainingInterrupted(
                self.step, self.run_dir, saved=True, signum=guard.signum
            ) from None
        bar.close()

        return TrainResult(
            model=model,
            tokenizer=self.tokenizer,
            config=cfg,
            step=self.step,
            losses=losses,
            val_loss=val_loss,
            history=self.history,
            train_seconds=self.train_seconds,
            eval_seconds=self.eval_seconds,
            tokens_per_s=len(losses) * B * T / max(self.train_seconds, 1e-9),
            run_dir=self.run_dir,
        )

    def _evaluate(self, val_data) -> float:
        t = time.perf_counter()
        loss = evaluate(self.model, val_data, self.cfg.block_size, self.cfg.eval_batch_size)
        self.eval_seconds += time.perf_counter() - t
        return loss

    def _after_eval(self, record, bar):
        """Print the evaluation line; write the plot, a sample and the checkpoint."""
        if self.cfg.verbose:
            bar.write(format_record(record), file=sys.stdout)
        if self.run_dir is None:
            return
        plot_losses(self.history_before + self.history, self.run_dir / PLOT_FILE)
        if self.cfg.sample_tokens > 0:
            text = sample_text(
                self.model, self.tokenizer, self.cfg.sample_tokens, seed=self.cfg.seed + self.step
            )
            with open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8", errors="replace") as f:
                f.write(f"=== step {self.step} ===\n{text}\n\n")
        self.save()


def format_record(r: dict) -> str:
    """step 250 | train loss 1.9213 | val loss 1.9812 | lr 9.71e-04 | 12,345 tok/s | 31.2 s"""
    val = f" | val loss {r['val_loss']:.4f}" if r.get("val_loss") is not None else ""
    return (
        f"step {r['step']} | train loss {r['train_loss']:.4f}{val} | lr {r['lr']:.2e} | "
        f"{r['tokens_per_s']:,.0f} tok/s | {r['elapsed']:.1f} s"
    )


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (lines that are not JSON objects are skipped)."""
    records = []
    path = Path(run_dir) / METRICS_FILE
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # e.g. a line cut short by a crash
        if isinstance(r, dict):
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
