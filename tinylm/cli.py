"""The `tinylm` command: one subcommand per task, each a thin layer over the library.

    tinylm train          train a GPT (tinylm.train), writing a run directory
    tinylm sample RUN     generate text from a run's checkpoint (model.generate)
    tinylm eval RUN       loss, perplexity and bits per byte on the validation split or a text
    tinylm export RUN     write a run's GPT as a Hugging Face GPT-2 directory (save_pretrained)
    tinylm info RUN       what a run directory holds
    tinylm gradcheck      check every layer and a tiny GPT against central differences

sample and eval take a Hugging Face GPT-2 directory instead of a run with --pretrained PATH
(tinylm.hf.gpt2.load_gpt2), and train starts from either with --init-from PATH.

Errors in the user's input or surroundings (a bad flag, a missing or damaged file, a full disk)
are printed as one line, `tinylm: error: ...`, and the command exits with status 2, without a
traceback. Anything else is a bug in tinylm: one line saying so, exit status 1, and the
traceback when TINYLM_DEBUG=1 is set (or --debug given). Ctrl-C during training saves a
checkpoint, prints the command that resumes, and exits with status 130; SIGTERM does the same
and exits with 143.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shlex
import sys

EXIT_BUG = 1  # an error tinylm did not expect: a bug to report
EXIT_USAGE = 2  # bad input, as argparse
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`tinylm train: error: ...`) like every other."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------
# tinylm train


def cmd_train(args) -> int:
    from tinylm.training import SETTINGS, TrainingInterrupted, train

    settings = {}
    if args.config is not None:
        settings = _read_config_file(args.config, SETTINGS)
    settings.update({k: v for k, v in vars(args).items() if k in SETTINGS})
    if settings.get("out") is None and settings.get("resume") is None:
        settings["out"] = "out"
    try:
        result = train(**settings)
    except TrainingInterrupted as stop:
        run_dir = shlex.quote(str(stop.run_dir))
        print(
            f"\ntinylm: interrupted after step {stop.step}; checkpoint saved in "
            f"{stop.run_dir / 'checkpoint'}. Resume with:\n  tinylm train --resume {run_dir}",
            file=sys.stderr,
        )
        return 128 + int(stop.signum)  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports
    if result.config.verbose:
        print(
            f"done: {result.step} steps, validation loss {result.val_loss:.4f}; training steps "
            f"{result.train_seconds:.1f} s ({result.tokens_per_s:,.0f} tok/s), evaluation "
            f"{result.eval_seconds:.1f} s, total {result.elapsed:.1f} s; run in {result.run_dir}"
        )
    return 0


def _read_config_file(path, known) -> dict:
    """The settings of a --config JSON file: an object whose keys are TrainConfig's fields."""
    from tinylm.files import read_json_object

    settings = read_json_object(path, "config file")
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(
            f"config file {str(path)!r} has unknown setting(s) {', '.join(unknown)}; "
            "the settings are named as TrainConfig's fields (n_layer, block_size, lr, ...)"
        )
    return settings


def settings_flag(defaults):
    """A function that adds a flag for one setting of ``defaults`` (a TrainConfig or a
    PretrainConfig) to an argument group. Flags default to "not given" (SUPPRESS), so that only
    the flags typed override --config and a resumed run's own settings; the help shows the
    setting's default."""

    def setting(group, flag, help, dest=None, **kwargs):
        dest = dest or flag[2:].replace("-", "_")
        if kwargs.get("action") != "store_false":  # a --no-... flag: its name says it all
            help = f"{help} (default: {getattr(defaults, dest)})"
        group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=help, **kwargs)

    return setting


def _add_train_parser(sub):
    from tinylm.training import TrainConfig

    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a GPT and write a run directory",
        description="Train a GPT on a built-in corpus or a text file. The run directory (--out) "
        "gets metrics.jsonl, loss.png, samples.txt and checkpoint/. Settings come from the "
        "defaults, then --config, then the flags. Ctrl-C saves a checkpoint; --resume continues "
        "it exactly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    setting = settings_flag(defaults)

    g = p.add_argument_group("data")
    setting(g, "--corpus", "built-in corpus, when no --text is given", choices=("pydoc", "stdlib"))
    setting(
        g, "--text", "a UTF-8 text file, or a folder of .txt files, to train on", metavar="PATH"
    )
    setting(g, "--tokenizer", "one token per character, or byte-level BPE", choices=("char", "bpe"))
    setting(g, "--vocab-size", "BPE vocabulary: 256 bytes + merges + EOT", type=int, metavar="N")
    setting(g, "--val-fraction", "the last fraction of the tokens validates", type=float)

    g = p.add_argument_group("model")
    setting(g, "--n-layer", "transformer blocks", type=int, metavar="N")
    setting(g, "--n-head", "attention heads per block", type=int, metavar="N")
    setting(g, "--n-embd", "embedding width C (a multiple of --n-head)", type=int, metavar="C")
    setting(g, "--block-size", "context length T in tokens", type=int, metavar="T")
    setting(g, "--dropout", "dropout probability during training", type=float, metavar="P")
    setting(g, "--positions", "position embeddings", choices=("learned", "sinusoidal"))
    setting(g, "--no-tie-weights", "a separate output layer instead of wte^T",
            dest="tie_weights", action="store_false")  # fmt: skip
    setting(g, "--no-bias", "no biases in the linear layers and LayerNorms", dest="bias",
            action="store_false")  # fmt: skip
    setting(g, "--dtype", "floating-point type of the parameters", choices=("float32", "float64"))

    g = p.add_argument_group("optimisation")
    setting(g, "--steps", "optimizer steps in total; with --resume, more extends the run",
            type=int, metavar="N")  # fmt: skip
    setting(g, "--batch-size", "windows per step B", type=int, metavar="B")
    setting(g, "--lr", "peak learning rate (AdamW)", type=float)
    setting(g, "--min-lr", "learning rate at the end of the cosine decay", type=float)
    setting(g, "--warmup-steps", "linear warmup steps", type=int, metavar="N")
    setting(g, "--lr-decay-steps", "step where the cosine reaches --min-lr (None: --steps)",
            type=int, metavar="N")  # fmt: skip
    setting(g, "--weight-decay", "AdamW's decoupled weight decay", type=float)
    setting(g, "--beta1", "AdamW beta1", type=float)
    setting(g, "--beta2", "AdamW beta2", type=float)
    setting(g, "--eps", "AdamW epsilon", type=float)
    setting(g, "--grad-clip", "largest global gradient norm; 0 turns clipping off", type=float)

    g = p.add_argument_group("evaluation and output")
    setting(g, "--eval-interval", "steps between validation losses and checkpoints",
            type=int, metavar="N")  # fmt: skip
    setting(g, "--eval-batch-size", "windows per forward when evaluating", type=int, metavar="B")
    setting(g, "--log-interval", "steps between metrics records", type=int, metavar="N")
    setting(g, "--sample-tokens", "tokens sampled into samples.txt at each evaluation",
            type=int, metavar="N")  # fmt: skip
    g.add_argument("--out", default=argparse.SUPPRESS, metavar="RUN_DIR",
                   help="run directory to write (default: out)")  # fmt: skip
    g.add_argument(
        "--resume",
        default=argparse.SUPPRESS,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint (default: None)",
    )
    g.add_argument(
        "--init-from",
        dest="init_from",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="fine-tune from a Hugging Face GPT-2 directory or a tinylm run directory",
    )
    setting(g, "--overwrite", "replace a run directory that already holds a run",
            action="store_true")  # fmt: skip
    setting(g, "--no-progress", "no progress bar (it shows only on a terminal anyway)",
            dest="progress", action="store_false")  # fmt: skip
    setting(g, "--quiet", "print nothing but errors", dest="verbose", action="store_false")

    g = p.add_argument_group("run")
    setting(g, "--seed", "seed of the initialisation, batches, dropout and samples", type=int)
    setting(g, "--device", "cpu (NumPy) or gpu (CuPy)", choices=("cpu", "gpu"))
    setting(g, "--data-parallel", "on the CPU, step each batch in N shards at once, on as many "
            "cores: the same gradient up to rounding (dropout draws other masks); 1 steps it "
            "whole", type=int, metavar="N")  # fmt: skip
    setting(g, "--data-parallel-workers", "what steps the shards: worker processes (faster: "
            "no waiting for Python's lock) or threads; the same results either way",
            choices=("processes", "threads"))  # fmt: skip
    g.add_argument("--config", metavar="FILE", help="a JSON file of settings (TrainConfig names)")
    p.set_defaults(func=cmd_train)


# ----------------------------------------------------------------------------------------------
# tinylm sample


def cmd_sample(args) -> int:
    import numpy as np

    from tinylm.sample import check_sampling_args

    _check_flag("--max-new-tokens", args.max_new_tokens, low=0)
    _check_flag("--num-samples", args.num_samples, low=1)
    _check_flag("--seed", args.seed, low=0)
    _check_flag("--temperature", args.temperature, low=0)
    if args.top_p is not None:
        _check_flag("--top-p", args.top_p, low=0)
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    model, tok, _ = _load_model(args)
    try:
        ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]  # empty: start from EOT
    except ValueError as err:  # e.g. characters a CharTokenizer has never seen
        raise ValueError(f"--prompt: {err}") from err
    out = model.eval().generate(
        np.array([ids] * args.num_samples),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    start = 0 if args.prompt else 1  # leave out the EOT we started from
    for i, row in enumerate(out):
        if i:
            print("-" * 40)
        _print_text(tok.decode(row[start:]))
    return 0


def _load_model(args):
    """(GPT on args.device, tokenizer, checkpoint or None) from RUN_DIR or --pretrained PATH:
    exactly one of them must be given."""
    from pathlib import Path

    from tinylm.checkpoint import has_checkpoint, load_checkpoint

    if (args.run_dir is None) == (args.pretrained is None):
        raise ValueError(
            "give a run directory (RUN_DIR) or a Hugging Face GPT-2 directory (--pretrained "
            f"PATH), {'not both' if args.run_dir else 'one of them'}"
        )
    if args.pretrained is not None:
        from tinylm.hf.gpt2 import load_gpt2

        path = Path(args.pretrained)
        if path.is_dir() and not (path / "config.json").exists() and has_checkpoint(path):
            raise ValueError(
                f"--pretrained {str(path)!r} is a tinylm run directory; give it as RUN_DIR, "
                "without --pretrained"
            )
        model, tok = load_gpt2(path)
        if tok is None:
            raise ValueError(
                f"--pretrained {str(path)!r} has no tokenizer files (vocab.json and merges.txt); "
                "copy GPT-2's into it"
            )
        return model.to(args.device), tok, None
    path = Path(args.run_dir)
    if _is_hugging_face_directory(path):
        raise ValueError(
            f"{str(path)!r} is a Hugging Face model directory, not a run directory; give it "
            "with --pretrained"
        )
    ckpt = load_checkpoint(path)
    if ckpt.model_type != "gpt":
        raise ValueError(
            f"{str(ckpt.path)!r} holds a {ckpt.model_type.upper()} model; this command reads a "
            "GPT's run directory"
        )
    return ckpt.build_model(args.device), ckpt.tokenizer, ckpt


def _is_hugging_face_directory(path) -> bool:
    """A Hugging Face directory's config.json names a model_type; a tinylm checkpoint's does not."""
    from tinylm.files import read_json_object

    config = path / "config.json"
    return config.is_file() and "model_type" in read_json_object(config, "model config")


def _check_flag(flag: str, value, low) -> None:
    """A numeric flag must be finite and >= low; the error names the flag."""
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{flag} must be a finite number >= {low}, got {value}")


def _print_text(text: str) -> None:
    """Print model output even where it spells a lone surrogate or the terminal cannot show it."""
    encoding = sys.stdout.encoding or "utf-8"
    print(text.encode(encoding, errors="replace").decode(encoding, errors="replace"))


def _add_model_arguments(p):
    """RUN_DIR or --pretrained PATH, the two places a model comes from."""
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default=None,
                   help="a run directory (or its checkpoint/)")  # fmt: skip
    p.add_argument("--pretrained", metavar="PATH", default=None,
                   help="a Hugging Face GPT-2 directory instead of RUN_DIR (config.json, "
                   "model.safetensors, vocab.json, merges.txt)")  # fmt: skip


def _add_sample_parser(sub):
    p = sub.add_parser(
        "sample",
        help="generate text from a run's checkpoint or a GPT-2 directory",
        description="Generate text with the model of a run directory or of a Hugging Face "
        "GPT-2 directory (--pretrained), KV cache on by default.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_arguments(p)
    p.add_argument("--prompt", default="", help="text to continue; empty starts from EOT")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="keep the nucleus of mass p")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where to run")
    p.add_argument("--no-cache", action="store_true", help="recompute every step (no KV cache)")
    p.set_defaults(func=cmd_sample)


# ----------------------------------------------------------------------------------------------
# tinylm eval


def cmd_eval(args) -> int:
    """Loss, perplexity and bits per byte (tinylm.evaluation): on --text, <|endoftext|> then all
    of the text, every text token predicted; on a run's validation split, its tokens after the
    first. Both in non-overlapping windows of the model's block_size (n_positions)."""
    import numpy as np

    from tinylm import data as data_io
    from tinylm import evaluation
    from tinylm.backend import set_backend
    from tinylm.training import TrainConfig, split_tokens

    if args.batch_size is not None:
        _check_flag("--batch-size", args.batch_size, low=1)
    if args.pretrained is not None and args.text is None:
        raise ValueError(
            "--pretrained needs --text FILE: a Hugging Face directory has no validation split"
        )
    if args.device == "gpu":
        set_backend("gpu")
    model, tok, ckpt = _load_model(args)
    # Windows of the run's training block_size (a fine-tuning run may train on windows shorter
    # than its model's context), or of a Hugging Face model's n_positions.
    T = model.config.block_size
    run_T = ckpt.train_config.get("block_size") if ckpt is not None else None
    if isinstance(run_T, int) and not isinstance(run_T, bool) and run_T >= 1:
        T = min(T, run_T)
    if args.text is not None:
        text = data_io.load_text(args.text)
        try:
            score = evaluation.evaluate_text(model, tok, text, args.batch_size, T)
        except ValueError as err:  # e.g. characters a CharTokenizer has never seen
            raise ValueError(f"--text {args.text}: {err}") from err
        what = f"{args.text} (all of it, after <|endoftext|>)"
    else:
        cfg = TrainConfig.from_dict(ckpt.train_config, source=f"{ckpt.path / 'config.json'}")
        text = data_io.load_text(cfg.text) if cfg.text else data_io.load_corpus(cfg.corpus)
        text_sha256 = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
        if ckpt.extra.get("text_sha256") not in (None, text_sha256):
            raise ValueError(
                f"{cfg.text or 'the corpus'} has changed since the run was trained, so its "
                "validation split is not the run's; pass --text to evaluate on a text as it is"
            )
        _, ids = split_tokens(cfg, tok, text)
        n_bytes = evaluation.utf8_length(tok, ids[1:])
        score = evaluation.evaluate_tokens(model, np.asarray(ids), n_bytes, args.batch_size, T)
        what = f"the validation split of {cfg.text or 'corpus ' + cfg.corpus}"
    step = f" | step {ckpt.step}" if ckpt is not None else ""
    print(
        f"{what}: {score.tokens:,} predicted tokens, {score.bytes:,} bytes | loss "
        f"{score.loss:.4f} | perplexity {score.perplexity:.3f} | bits per byte "
        f"{score.bits_per_byte:.4f} | windows of {T} tokens{step}"
    )
    return 0


def _add_eval_parser(sub):
    p = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a run's model or a GPT-2 directory",
        description="The mean loss per token, its exp (the perplexity) and the bits per UTF-8 "
        "byte (comparable across tokenizers) of a run's model on the whole validation split of "
        "its training text, or of a run's or a Hugging Face GPT-2 directory's model "
        "(--pretrained) on all of a text (--text), read after <|endoftext|>. The tokens are "
        "read in non-overlapping windows of the run's block_size (a GPT-2 directory's "
        "n_positions).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_arguments(p)
    p.add_argument("--text", metavar="PATH", default=None,
                   help="evaluate on this text (a file, or a folder of .txt files)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward; None: as many as keep the largest activation "
                   "under 32M numbers (one 1024-token window for GPT-2)")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where to run")
    p.set_defaults(func=cmd_eval)


# ----------------------------------------------------------------------------------------------
# tinylm export


def cmd_export(args) -> int:
    """The run's GPT (and its tokenizer, when it is GPT-2's byte-level BPE) as a new Hugging
    Face GPT-2 directory: tinylm.hf.gpt2.save_gpt2 with new=True (written aside, then renamed
    into place; an existing non-empty directory is refused, never written into)."""
    from pathlib import Path

    from tinylm.checkpoint import is_tinylm_checkpoint, load_checkpoint
    from tinylm.hf.gpt2 import gpt2_tokenizer_or_reason, save_gpt2

    out = Path(args.to)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"--to {str(out)!r} already exists and is not an empty directory; tinylm export "
            "writes a new directory and never writes over existing files"
        )
    inside = [p for p in out.resolve().parents if is_tinylm_checkpoint(p)]
    if inside:
        raise ValueError(
            f"--to {str(out)!r} is inside the checkpoint directory {str(inside[0])!r}, which "
            "holds only a checkpoint's files; choose a directory outside it"
        )
    ckpt = load_checkpoint(args.run_dir)
    if ckpt.model_type != "gpt":
        raise ValueError(
            f"{str(ckpt.path)!r} holds a {ckpt.model_type.upper()} model; tinylm export writes "
            "GPT-2 directories (for BERT: tinylm.hf.bert.save_bert)"
        )
    tokenizer, reason = gpt2_tokenizer_or_reason(ckpt.tokenizer)
    save_gpt2(ckpt.build_model(), out, tokenizer, new=True)
    run = ckpt.path.parent if ckpt.path.name == "checkpoint" else ckpt.path
    if tokenizer is not None:
        print(
            f"exported {run} (step {ckpt.step}) to {out}: config.json, model.safetensors and "
            "GPT-2's tokenizer files (vocab.json, merges.txt, tokenizer_config.json)"
        )
    else:
        print(
            f"exported the model of {run} (step {ckpt.step}) to {out}: config.json and "
            f"model.safetensors only; {reason}, so no tokenizer files were written and text "
            f"must be encoded with the run's own tokenizer (tinylm.checkpoint.load_checkpoint"
            f"({str(run)!r}).tokenizer)"
        )
    return 0


def _add_export_parser(sub):
    p = sub.add_parser(
        "export",
        help="write a run's model as a Hugging Face GPT-2 directory",
        description="Write the model of a run directory's checkpoint as a new Hugging Face "
        "GPT-2 directory (config.json, model.safetensors, and vocab.json + merges.txt when "
        "the run's tokenizer is byte-level BPE), which transformers' "
        "GPT2LMHeadModel.from_pretrained and tinylm's --pretrained read. A character "
        "tokenizer has no GPT-2 form: then only the model is written, and the output says so.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its checkpoint/)")
    p.add_argument("--to", metavar="DIR", required=True,
                   help="the directory to write: a new one, or an empty one")  # fmt: skip
    p.set_defaults(func=cmd_export)


# ----------------------------------------------------------------------------------------------
# tinylm info


def cmd_info(args) -> int:
    from tinylm.checkpoint import load_checkpoint
    from tinylm.training import METRICS_FILE, format_record, read_metrics

    ckpt = load_checkpoint(args.run_dir)
    run_dir = ckpt.path.parent  # the checkpoint is RUN_DIR/checkpoint
    tc, mc = ckpt.train_config, ckpt.model_config
    n_params = sum(a.size for a in ckpt.params.values())
    print(f"run directory  {run_dir}")
    print(f"checkpoint     {ckpt.path}: step {ckpt.step} of {tc.get('steps', '?')}")
    if ckpt.model_type == "bert":  # a `tinylm pretrain` run: BertConfig's names
        heads = [name for name, on in (("pooler", mc.pooler), ("MLM", mc.mlm_head),
                                        ("NSP", mc.nsp_head)) if on]
        if mc.num_labels:
            heads.append(f"{mc.num_labels}-way classifier")
        print(
            f"model          BERT encoder, {mc.num_hidden_layers} layers x "
            f"{mc.num_attention_heads} heads x {mc.hidden_size} (MLP {mc.intermediate_size}), "
            f"max positions {mc.max_position_embeddings}, vocab {mc.vocab_size}, dropout "
            f"{mc.hidden_dropout_prob}, heads: {', '.join(heads) or 'none'}"
        )
    else:
        print(
            f"model          {mc.n_layer} layers x {mc.n_head} heads x {mc.n_embd}, block "
            f"{mc.block_size}, vocab {mc.vocab_size}, dropout {mc.dropout}, positions "
            f"{mc.positions}, tied weights {mc.tie_weights}, bias {mc.bias}"
        )
    print(f"parameters     {n_params:,} ({ckpt.dtype})")
    print(f"tokenizer      {ckpt.tokenizer!r}")
    source = tc.get("text") or f"corpus {tc.get('corpus')}"
    print(f"data           {source}, last {tc.get('val_fraction')} validates")
    print(
        f"training       batch {tc.get('batch_size')} x block {tc.get('block_size')}, AdamW lr "
        f"{tc.get('lr')} -> {tc.get('min_lr')} (warmup {tc.get('warmup_steps')}), weight decay "
        f"{tc.get('weight_decay')}, clip {tc.get('grad_clip')}, seed {tc.get('seed')}"
    )
    damaged = None  # a damaged metrics.jsonl: everything else is still shown, then the error
    if (run_dir / METRICS_FILE).is_file():
        try:
            records = read_metrics(run_dir)
        except ValueError as err:
            damaged, records = err, []
            print("metrics        cannot be read (the error follows)")
        evals = [r for r in records if r.get("val_loss") is not None]
        if records:
            print(f"last record    {format_record(records[-1])}")
        if evals:
            print(f"last eval      {format_record(evals[-1])}")
    if args.verbose:
        print("settings")
        for key, value in tc.items():
            print(f"  {key:16s} {value!r}")
        print("tensors")
        for name, a in ckpt.params.items():
            print(f"  {name:28s} {str(tuple(a.shape)):14s} {a.size:>10,}")
    print("files")
    for path in sorted(run_dir.iterdir()):
        if path.is_dir():
            files = [f for f in path.rglob("*") if f.is_file()]
            size = sum(f.stat().st_size for f in files)
            print(f"  {path.name + '/':16s} {_human(size):>10s}  ({len(files)} files)")
        else:
            print(f"  {path.name:16s} {_human(path.stat().st_size):>10s}")
    if damaged is not None:
        raise damaged  # printed as one line by main(), exit status 2
    return 0


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _add_info_parser(sub):
    p = sub.add_parser(
        "info",
        help="what a run directory holds",
        description="Show a run's settings, parameter count, progress, last losses and files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its checkpoint/)")
    p.add_argument("--verbose", action="store_true", help="every setting and every tensor's shape")
    p.set_defaults(func=cmd_info)


# ----------------------------------------------------------------------------------------------
# tinylm gradcheck


def cmd_gradcheck(args) -> int:
    from tinylm import gradcheck

    _check_flag("--seed", args.seed, low=0)
    rows = gradcheck.layer_checks(seed=args.seed)
    if not args.layers_only:
        rows += gradcheck.model_checks(seed=args.seed)
    print(gradcheck.format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} gradients agree with central differences "
        f"(float64; tolerance {gradcheck.SMOOTH_TOL:g} for layers, "
        f"{gradcheck.KINK_TOL:g} for ReLU, {gradcheck.MODEL_TOL:g} for the model)"
    )
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tinylm",
        description="A GPT in NumPy with hand-written backward passes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_sample_parser(sub)
    _add_eval_parser(sub)
    _add_export_parser(sub)
    _add_info_parser(sub)
    # The encoder family and the exercises keep their commands next to their code.
    from tinylm.exercises import add_exercises_parser
    from tinylm.finetuning import add_classify_parser, add_finetune_parser
    from tinylm.pretraining import add_pretrain_parser

    add_pretrain_parser(sub)
    add_finetune_parser(sub)
    add_classify_parser(sub)
    add_exercises_parser(sub)

    p = sub.add_parser(
        "gradcheck",
        help="check every backward pass against central differences",
        description="Check every layer's backward and a tiny GPT's gradients against central "
        "differences in float64, and print the table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random test inputs")
    p.add_argument("--layers-only", action="store_true", help="skip the whole-model check")
    p.set_defaults(func=cmd_gradcheck)
    return parser


# What to make smaller when a command runs out of memory.
OOM_FLAGS = {
    "train": "a smaller --n-embd, --n-layer, --block-size, --batch-size or --vocab-size",
    "pretrain": "a smaller --n-embd, --n-layer, --block-size, --batch-size or --vocab-size",
    "finetune": "a smaller --batch-size or --max-length",
    "sample": "fewer --num-samples or --max-new-tokens",
    "eval": "a smaller --batch-size",
    "classify": "fewer texts at a time",
}


def main(argv=None) -> int:
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2), already printed
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except BrokenPipeError:  # `tinylm ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, RuntimeError) as err:
        # What tinylm raises on purpose for bad input (ValueError, FileNotFoundError) and what
        # the surroundings raise (a full disk, no permission, no GPU): the user can act on it.
        if args.debug or os.environ.get("TINYLM_DEBUG"):
            raise
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"tinylm: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError as err:
        # NumPy says what it could not allocate ("Unable to allocate 3.7 GiB for an array with
        # shape (...)"); the flags that size this command's arrays say what to change.
        what = " ".join(str(err).split()) or "an array did not fit"
        flags = OOM_FLAGS.get(args.command, "smaller sizes")
        print(f"tinylm: error: out of memory ({what}); try {flags}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ntinylm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # anything else is a bug in tinylm, not in the user's input
        if args.debug or os.environ.get("TINYLM_DEBUG"):
            raise
        message = " ".join(f"{type(err).__name__}: {err}".split())
        print(
            f"tinylm: internal error (a bug in tinylm): {message}; rerun with TINYLM_DEBUG=1 "
            "or --debug for the traceback",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
