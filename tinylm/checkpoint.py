"""Saving a training run to disk and reading it back, exactly, or refusing with the reason.

A checkpoint is a directory, ``RUN_DIR/checkpoint/``, holding everything needed to continue a
run bit for bit or to sample from the model:

    config.json            format version, step, dtype, model type ("gpt" or "bert") and
                           config (GPTConfig or BertConfig), train config, the tokenizer, and the
                           loop's own bookkeeping ("extra")
    model.safetensors      the parameters, GPT-2's (or BERT's) names -> arrays (on the host)
    optimizer.safetensors  the optimizer's per-parameter arrays, as "<buffer>.<param name>"
                           (AdamW: "m.wte.weight", "v.wte.weight", ...)
    optimizer.json         the optimizer's scalars (lr, betas, eps, weight decay, step t, ...)
    rng.json               the random streams, numpy ``bit_generator.state`` dicts: "batch" (which
                           windows get_batch draws) and "dropout" (the model's dropout masks)

Writing is atomic at the level of the directory, so a crash never leaves a half-written
checkpoint where a good one stood. ``os.replace`` cannot put a directory over a non-empty one,
so a save takes four steps:

    1. write every file into a fresh sibling ``checkpoint.tmp-XXXX/``, fsync each file and the
       directory (the new checkpoint is now complete on disk, under another name);
    2. rename the current ``checkpoint/`` aside to ``checkpoint.old-XXXX/``;
    3. rename ``checkpoint.tmp-XXXX/`` to ``checkpoint/`` and fsync the parent directory;
    4. delete ``checkpoint.old-XXXX/``.

A crash in step 1 leaves the old ``checkpoint/`` untouched (and a stale tmp directory, removed by
the next save). Between steps 2 and 3 no ``checkpoint/`` exists, but the old one is complete in
``checkpoint.old-XXXX/`` and ``find_checkpoint`` falls back to it. After step 3 the new one is in
place. So at every instant a complete checkpoint exists.

``load_checkpoint`` checks every file (present, parseable, the right version, names and shapes
that agree with the config) and raises ValueError naming the file and what is wrong. The shapes
a config implies are computed, not allocated, so a config with an absurd size is refused without
building anything.

A GPT run's tokenizer is a CharTokenizer or BPETokenizer (their to_dict()); a BERT pretraining
run's is a WordPieceTokenizer, stored as {"type": "wordpiece", "vocab": [...], options}.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy

from tinylm.backend import to_numpy
from tinylm.bert import Bert, BertConfig
from tinylm.bert import param_shapes as bert_param_shapes
from tinylm.files import fsync_dir, read_json_object
from tinylm.model import GPT, GPTConfig
from tinylm.model import param_shapes as gpt_param_shapes
from tinylm.tokenizer import tokenizer_from_dict
from tinylm.wordpiece import WordPieceTokenizer

FORMAT = "tinylm-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint"  # the directory's name inside a run directory
FILES = ("config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json")

# The bit generators a saved random state may name (np.random.default_rng makes PCG64).
_BIT_GENERATORS = {
    "PCG64": np.random.PCG64,
    "PCG64DXSM": np.random.PCG64DXSM,
    "MT19937": np.random.MT19937,
    "Philox": np.random.Philox,
    "SFC64": np.random.SFC64,
}


@dataclass
class Checkpoint:
    """A checkpoint read back from disk and validated; arrays are NumPy, on the host."""

    path: Path  # the checkpoint directory
    step: int  # optimizer steps done
    model_config: GPTConfig | BertConfig
    dtype: np.dtype  # of every parameter (float32 or float64)
    train_config: dict  # the settings of the run (a TrainConfig or PretrainConfig as a dict)
    tokenizer: object  # CharTokenizer or BPETokenizer (GPT); WordPieceTokenizer (BERT)
    params: dict[str, np.ndarray]
    optimizer_state: dict  # in the form of AdamW.state_dict()
    rng_state: dict  # {"batch": bit_generator.state, "dropout": bit_generator.state}
    extra: dict = field(default_factory=dict)  # the training loop's bookkeeping

    @property
    def model_type(self) -> str:
        """"gpt" or "bert"."""
        return "bert" if isinstance(self.model_config, BertConfig) else "gpt"

    def build_model(self, device: str = "cpu") -> GPT | Bert:
        """A GPT (or a Bert, for a pretraining run) with these parameters and dropout stream, on
        "cpu" or "gpu"."""
        params = {name: a.copy() for name, a in self.params.items()}  # the model trains them
        if self.model_type == "gpt":
            model = GPT(self.model_config, dtype=self.dtype, params=params)  # no random init
        else:
            model = Bert(self.model_config, dtype=self.dtype)
            model.params = params
        model.dropout_rng = make_rng(self.rng_state["dropout"])
        return model.to(device)

    def batch_rng(self) -> np.random.Generator:
        """The batch sampler's Generator, in the state it had when the checkpoint was written."""
        return make_rng(self.rng_state["batch"])


def make_rng(state: dict) -> np.random.Generator:
    """A numpy Generator restored from a ``bit_generator.state`` dict."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise ValueError(f"unknown bit generator {name!r}; expected one of {list(_BIT_GENERATORS)}")
    rng = np.random.Generator(_BIT_GENERATORS[name]())
    rng.bit_generator.state = state  # raises ValueError/TypeError/KeyError on a malformed state
    return rng


# ----------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(
    path,
    *,
    model: GPT,
    optimizer,
    tokenizer,
    step: int,
    batch_rng: np.random.Generator,
    train_config: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically (see the module docstring); returns it.

    optimizer is anything with ``state_dict()`` whose values are JSON scalars/lists or dicts of
    parameter name -> array (AdamW, SGD). Arrays on the GPU are copied to the host.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "dtype": np.dtype(model.dtype).name,
        "model_type": "bert" if isinstance(model.config, BertConfig) else "gpt",
        "model_config": model.config.to_dict(),
        "train_config": train_config or {},
        "tokenizer": tokenizer_to_dict(tokenizer),
        "extra": extra or {},
    }
    params = {name: np.ascontiguousarray(to_numpy(a)) for name, a in model.params.items()}
    opt_tensors, opt_scalars = {}, {}
    for key, value in optimizer.state_dict().items():
        if isinstance(value, dict):  # per-parameter buffers: "m", "v", "momentum_buffer"
            for name, a in value.items():
                opt_tensors[f"{key}.{name}"] = np.ascontiguousarray(to_numpy(a))
        else:
            opt_scalars[key] = value
    opt_scalars["tensors"] = sorted({k.split(".", 1)[0] for k in opt_tensors})
    rng = {"batch": batch_rng.bit_generator.state, "dropout": model.dropout_rng.bit_generator.state}

    # Step 1: everything into a fresh temporary sibling, each file fsynced.
    tmp = parent / f"{path.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_json(tmp / "config.json", config)
        mode = (tmp / "config.json").stat().st_mode & 0o777  # what the umask gives a new file
        _write_safetensors(tmp / "model.safetensors", params, mode)
        _write_safetensors(tmp / "optimizer.safetensors", opt_tensors, mode)
        _write_json(tmp / "optimizer.json", opt_scalars)
        _write_json(tmp / "rng.json", rng)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Steps 2-4: old aside, new into place, old deleted.
    if path.exists():
        os.rename(path, parent / f"{path.name}.old-{secrets.token_hex(4)}")
    os.replace(tmp, path)
    fsync_dir(parent)
    _remove_stale(path)  # the old one, and any a crash between steps 2 and 3 left behind
    return path


def tokenizer_to_dict(tokenizer) -> dict:
    """A tokenizer as the JSON-able dict a checkpoint stores."""
    if isinstance(tokenizer, WordPieceTokenizer):
        return {
            "type": "wordpiece",
            "version": 1,
            "vocab": list(tokenizer.vocab),
            "do_lower_case": tokenizer.do_lower_case,
            "strip_accents": tokenizer.strip_accents,
            "tokenize_chinese_chars": tokenizer.tokenize_chinese_chars,
            "unk_token": tokenizer.unk_token,
            "sep_token": tokenizer.sep_token,
            "pad_token": tokenizer.pad_token,
            "cls_token": tokenizer.cls_token,
            "mask_token": tokenizer.mask_token,
        }
    return tokenizer.to_dict()


def tokenizer_from_checkpoint_dict(d):
    """The tokenizer a checkpoint's dict describes (tokenizer_to_dict's inverse)."""
    if not (isinstance(d, dict) and d.get("type") == "wordpiece"):
        return tokenizer_from_dict(d)
    if d.get("version") != 1:
        raise ValueError(f"wordpiece tokenizer version {d.get('version')!r}; this tinylm reads 1")
    vocab = d.get("vocab")
    if not (isinstance(vocab, list) and all(isinstance(t, str) for t in vocab)):
        raise ValueError('"vocab" must be a list of strings')
    options = {k: v for k, v in d.items() if k not in ("type", "version", "vocab")}
    return WordPieceTokenizer(vocab, **options)


def _leftovers(path: Path, kind: str) -> list[Path]:
    """The ``NAME.tmp-XXXXXXXX`` or ``NAME.old-XXXXXXXX`` directories next to ``path`` that a save
    of tinylm made: exactly that name (8 hex digits, as save_checkpoint draws them) and nothing
    inside but checkpoint files. A folder of the user's, such as ``checkpoint.2024-backup/``, is
    never one of them."""
    pattern = re.compile(re.escape(path.name) + r"\." + kind + r"-[0-9a-f]{8}")
    return [
        p
        for p in path.parent.glob(f"{path.name}.{kind}-*")
        if pattern.fullmatch(p.name) and is_tinylm_checkpoint(p, partial=True)
    ]


def is_tinylm_checkpoint(path, partial: bool = False) -> bool:
    """Whether ``path`` is a checkpoint directory that tinylm wrote: it holds only the checkpoint
    files, and its config.json says so. ``partial`` also accepts one cut short by a crash (some
    files, or no config.json yet)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}
    if not names <= set(FILES):
        return False
    if "config.json" not in names:
        return partial
    try:
        return read_json_object(path / "config.json").get("format") == FORMAT
    except (OSError, ValueError):
        return partial


def _remove_stale(path: Path) -> None:
    """Delete what crashed saves left next to ``path``: tmp directories, and old ones once
    ``path`` itself is complete (otherwise an old one may be the only checkpoint there is)."""
    for p in _leftovers(path, "tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if (path / "config.json").is_file():
        for p in _leftovers(path, "old"):
            shutil.rmtree(p, ignore_errors=True)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, tensors: dict, mode: int) -> None:
    safetensors.numpy.save_file(tensors, str(path))
    os.chmod(path, mode)  # safetensors creates its files readable by their owner only
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Finding and loading


def find_checkpoint(path) -> Path:
    """The checkpoint directory for ``path``: a checkpoint directory itself, or a run directory
    holding ``checkpoint/`` (or, after a crash mid-save, ``checkpoint.old-XXXX/``).

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it holds no checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory; expected a run directory")
    if (path / "config.json").is_file():
        return path
    if (path / CHECKPOINT_NAME).is_dir():
        return path / CHECKPOINT_NAME
    # A crash between steps 2 and 3 of a save: the previous checkpoint waits under .old-XXXX.
    old = sorted(_leftovers(path / CHECKPOINT_NAME, "old"), key=lambda p: p.stat().st_mtime)
    if old:
        return old[-1]
    raise ValueError(
        f"no checkpoint in {str(path)!r}: expected {str(path / CHECKPOINT_NAME)!r} "
        "(written by `tinylm train --out`)"
    )


def has_checkpoint(run_dir) -> bool:
    """Whether ``run_dir`` holds a checkpoint (complete or not)."""
    run_dir = Path(run_dir)
    return (run_dir / CHECKPOINT_NAME).exists() or bool(
        _leftovers(run_dir / CHECKPOINT_NAME, "old")
    )


def check_removable(run_dir) -> None:
    """Raise ValueError, listing what it holds, if ``run_dir/checkpoint`` exists but is not a
    checkpoint that tinylm wrote (so tinylm must not delete or replace it)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if path.exists() and not is_tinylm_checkpoint(path, partial=True):
        held = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
        raise ValueError(
            f"{str(path)!r} was not written by tinylm (it holds {', '.join(held[:10]) or 'nothing'}"
            f"{' ...' if len(held) > 10 else ''}); move it away, tinylm deletes only its own files"
        )


def remove_checkpoint(run_dir) -> None:
    """Delete the checkpoint of ``run_dir`` and anything a crashed save left next to it: only
    what tinylm can prove it wrote. A ``checkpoint/`` that holds anything else is refused with
    a ValueError listing what it holds, and nothing is deleted."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_NAME
    check_removable(run_dir)
    for p in [*_leftovers(path, "tmp"), *_leftovers(path, "old")]:
        shutil.rmtree(p, ignore_errors=True)
    if path.exists():
        shutil.rmtree(path)


def load_checkpoint(path) -> Checkpoint:
    """Read and validate the checkpoint in ``path`` (a run directory or a checkpoint directory).

    Raises FileNotFoundError if ``path`` does not exist, and ValueError naming the file and the
    problem for anything else: a missing file, bad JSON, another format version, safetensors that
    fail to parse, parameter or optimizer names/shapes/dtypes that disagree with the config.
    """
    ckpt = find_checkpoint(path)
    for name in FILES:
        if not (ckpt / name).is_file():
            raise ValueError(f"checkpoint {str(ckpt)!r} is incomplete: {name} is missing")

    # config.json
    cfg_file = ckpt / "config.json"
    config = read_json_object(cfg_file, "checkpoint file")
    if config.get("format") != FORMAT:
        raise ValueError(
            f'{cfg_file}: not a tinylm checkpoint ("format" is {config.get("format")!r})'
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{cfg_file}: format_version {config.get('format_version')!r} is not supported; "
            f"this tinylm reads version {FORMAT_VERSION}"
        )
    for key, kind in (
        ("step", int),
        ("dtype", str),
        ("model_config", dict),
        ("tokenizer", dict),
        ("train_config", dict),
        ("extra", dict),
    ):
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise ValueError(f"{cfg_file}: {key!r} is missing or not a {kind.__name__}")
    if config["step"] < 0:
        raise ValueError(f"{cfg_file}: step must be >= 0, got {config['step']}")
    if config["dtype"] not in ("float32", "float64"):
        raise ValueError(f"{cfg_file}: dtype must be float32 or float64, got {config['dtype']!r}")
    dtype = np.dtype(config["dtype"])
    model_type = config.get("model_type", "gpt")  # version 1 checkpoints before BERT: a GPT
    if model_type not in ("gpt", "bert"):
        raise ValueError(f'{cfg_file}: model_type must be "gpt" or "bert", got {model_type!r}')
    config_cls, param_shapes = (
        (BertConfig, bert_param_shapes) if model_type == "bert" else (GPTConfig, gpt_param_shapes)
    )
    fields = dict(config["model_config"])  # checked to be an object above
    if model_type == "gpt":
        # Written before GPTConfig.embedding_scale existed: those models added their token
        # vectors unscaled, whatever their positions, and must load as they were trained.
        fields.setdefault("embedding_scale", 1.0)
    try:
        model_config = config_cls(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_file}: bad model_config: {err}") from err
    try:
        tokenizer = tokenizer_from_checkpoint_dict(config["tokenizer"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_file}: bad tokenizer: {err}") from err
    # A model may have more embedding rows than its tokenizer has ids (a pretrained GPT-2's
    # vocabulary padded to a round number), never fewer.
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"{cfg_file}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is only {model_config.vocab_size}"
        )

    # model.safetensors: exactly the parameters a model of this config has (shapes computed
    # from the config, nothing allocated).
    expected = param_shapes(model_config)
    params = _read_safetensors(ckpt / "model.safetensors")
    _check_tensors(ckpt / "model.safetensors", params, expected, dtype)

    # optimizer.json + optimizer.safetensors
    opt_file = ckpt / "optimizer.json"
    opt_scalars = read_json_object(opt_file, "checkpoint file")
    buffers = opt_scalars.pop("tensors", None)
    if not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers):
        raise ValueError(f"{opt_file}: 'tensors' must list the optimizer's buffer names")
    opt_tensors = _read_safetensors(ckpt / "optimizer.safetensors")
    optimizer_state = dict(opt_scalars)
    want = {f"{b}.{name}": shape for b in buffers for name, shape in expected.items()}
    _check_tensors(ckpt / "optimizer.safetensors", opt_tensors, want, dtype)
    for b in buffers:
        optimizer_state[b] = {name: opt_tensors[f"{b}.{name}"] for name in expected}

    # rng.json
    rng_file = ckpt / "rng.json"
    rng_state = read_json_object(rng_file, "checkpoint file")
    for key in ("batch", "dropout"):
        try:
            make_rng(rng_state.get(key))
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{rng_file}: bad random state {key!r}: {err}") from err

    return Checkpoint(
        path=ckpt,
        step=config["step"],
        model_config=model_config,
        dtype=dtype,
        train_config=config["train_config"],
        tokenizer=tokenizer,
        params={name: params[name] for name in expected},  # in the model's order
        optimizer_state=optimizer_state,
        rng_state={"batch": rng_state["batch"], "dropout": rng_state["dropout"]},
        extra=config["extra"],
    )


def _read_safetensors(path: Path) -> dict:
    try:
        return safetensors.numpy.load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError, ...)
        raise ValueError(f"{path}: cannot be read as safetensors ({err})") from err


def _check_tensors(path: Path, tensors: dict, expected: dict, dtype: np.dtype) -> None:
    """Names, shapes and dtype of ``tensors`` must be exactly those ``expected``."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(
            f"{path}: missing tensor(s) {missing[:5]}" + (" ..." if len(missing) > 5 else "")
        )
    unknown = [k for k in tensors if k not in expected]
    if unknown:
        raise ValueError(
            f"{path}: unexpected tensor(s) {unknown[:5]}" + (" ..." if len(unknown) > 5 else "")
        )
    for name, shape in expected.items():
        a = tensors[name]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(a.shape)}, "
                f"the config needs {tuple(shape)}"
            )
        if a.dtype != dtype:
            raise ValueError(f"{path}: tensor {name!r} is {a.dtype}, the checkpoint says {dtype}")
        if not np.isfinite(a).all():
            bad = int(a.size - np.isfinite(a).sum())
            raise ValueError(
                f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s); expected finite "
                "numbers (the run diverged, or the file is damaged)"
            )
