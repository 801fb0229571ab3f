"""How long does `tinylm train` take on this CPU, how good is the model it makes, and how does the
same recipe do in PyTorch?

Runs a training (the default one unless flags say otherwise) and records the wall time of the
training steps alone, the time spent evaluating, tokens per second, and the final validation loss
on the whole validation split, with the machine and the date. Then, in a process of its own, the
same recipe in PyTorch eager (nanoGPT's model from benchmarks/cpu_step.py, on as many threads):
the same text, tokenizer and split, the same initial weights (tinylm's, copied), the same batches
(the same seeded sampler), the same warmup + cosine schedule, AdamW with the same settings and
weight decay on the same parameters, the same gradient clipping, and the same evaluation of the
whole validation split every eval_interval steps and at the end. The ratio tinylm / torch of the
time to the final validation loss (training steps + evaluations) is the figure of issue 13.
tinylm's run also writes its run directory (samples, plots, checkpoints: in its total only).

    python benchmarks/train_cpu.py                      # the default run: 2,000 steps on pydoc
    python benchmarks/train_cpu.py --steps 200 --n-layer 2   # any `tinylm train` flag
    python benchmarks/train_cpu.py --profile 30         # first: where a step's time goes
    python benchmarks/train_cpu.py --no-torch           # tinylm alone

The target for the default run on the 2-core reference machine: the training steps finish in
<= 150 s and the validation loss is <= 1.45; against torch, a time ratio <= 1.05 and a
validation loss within 0.01. The machine should be otherwise idle: the figures are wall-clock
times (the load average before and after is recorded). The torch run is skipped, with a line
saying so, without torch or for a model it does not rebuild (dropout, sinusoidal positions, no
biases, untied output layer, init_from, resume).

--profile N times N extra steps of the same model phase by phase (batch, forward, backward,
clipping, optimizer) and one evaluation, one sample and one checkpoint, before the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import machine_info, write_report  # benchmarks/report.py

from tinylm import cli
from tinylm import data as data_io
from tinylm.backend import keep_freed_memory
from tinylm.checkpoint import save_checkpoint
from tinylm.model import GPT
from tinylm.optim import AdamW, clip_grad_norm, lr_schedule
from tinylm.training import (
    SETTINGS,
    TrainConfig,
    evaluate,
    make_tokenizer,
    sample_text,
    split_tokens,
    train,
)


def profile(cfg: TrainConfig, n_steps: int) -> dict:
    """Median milliseconds of each phase of a step, and the seconds of one evaluation."""
    text = data_io.load_text(cfg.text) if cfg.text else data_io.load_corpus(cfg.corpus)
    tok = make_tokenizer(cfg, text)
    train_ids, val_ids = split_tokens(cfg, tok, text)
    model = GPT(cfg.model_config(tok.vocab_size), seed=cfg.seed, dtype=cfg.dtype)
    opt = AdamW(
        model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    rng = np.random.default_rng(0)
    phases = {"batch": [], "forward": [], "backward": [], "clip": [], "optimizer": []}
    for i in range(n_steps + 3):  # 3 warm-up steps
        t0 = time.perf_counter()
        x, y = data_io.get_batch(train_ids, cfg.block_size, cfg.batch_size, rng)
        t1 = time.perf_counter()
        model.forward(x, y)
        t2 = time.perf_counter()
        grads = model.backward()
        t3 = time.perf_counter()
        clip_grad_norm(grads, cfg.grad_clip)
        t4 = time.perf_counter()
        opt.step(grads, lr=cfg.lr)
        t5 = time.perf_counter()
        if i >= 3:
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                dt_ms = 1e3 * dt
                phases[name].append(dt_ms)
    out = {f"{name}_ms": statistics.median(v) for name, v in phases.items()}
    out["step_ms"] = sum(out.values())
    t = time.perf_counter()
    evaluate(model, val_ids, cfg.block_size, cfg.eval_batch_size)
    out["eval_whole_val_split_s"] = time.perf_counter() - t
    out["val_tokens"] = int(len(val_ids))
    t = time.perf_counter()
    sample_text(model, tok, cfg.sample_tokens, seed=0)
    out["sample_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        save_checkpoint(Path(tmp) / "checkpoint", model=model, optimizer=opt, tokenizer=tok,
                        step=0, batch_rng=rng, train_config=cfg.to_dict())  # fmt: skip
        out["checkpoint_s"] = time.perf_counter() - t
    return out


def torch_skip_reason(cfg: TrainConfig) -> str | None:
    """Why the torch recipe cannot rebuild this run, or None when it can."""
    if cfg.init_from or cfg.resume:
        return "it starts from tinylm's random initialisation only (no init_from, no resume)"
    if cfg.device != "cpu":
        return "this benchmark compares CPU runs"
    if cfg.dropout or cfg.positions != "learned" or not cfg.bias or not cfg.tie_weights:
        return ("its model is nanoGPT's without dropout: learned positions, biases, the output "
                "layer tied")
    return None


def torch_evaluate(model, data, block_size: int, batch_size: int) -> float:
    """tinylm.training.evaluate for the torch model: the exact mean loss over ALL of data."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in data_io.eval_windows(data, block_size, batch_size):
            loss = model(torch.from_numpy(x), torch.from_numpy(y))
            total += loss.item() * y.size
            n += y.size
    return total / n


def torch_recipe(cfg: TrainConfig, threads: int) -> dict:
    """The default `tinylm train` loop, step for step, in PyTorch eager; its times and losses."""
    import torch
    from cpu_step import torch_gpt  # benchmarks/cpu_step.py: nanoGPT's model in torch

    torch.set_num_threads(threads)
    text = data_io.load_text(cfg.text) if cfg.text else data_io.load_corpus(cfg.corpus)
    tok = make_tokenizer(cfg, text)
    train_ids, val_ids = split_tokens(cfg, tok, text)
    init = GPT(cfg.model_config(tok.vocab_size), seed=cfg.seed, dtype=cfg.dtype)
    model = torch_gpt(init.config, init.params)  # tinylm's initial weights, copied
    if cfg.dtype == "float64":
        model = model.double()
    # Weight decay on the matrices and embeddings (ndim >= 2), as tinylm's AdamW.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
    )  # fmt: skip
    batch_rng = np.random.default_rng([cfg.seed, 1])  # the batch sampler of tinylm.train
    decay_steps = cfg.lr_decay_steps or cfg.steps
    warmup = min(cfg.warmup_steps, decay_steps)
    T, B = cfg.block_size, cfg.batch_size
    losses, val_losses = [], {}
    train_seconds = eval_seconds = 0.0
    t_start = time.perf_counter()
    for step in range(cfg.steps):
        t = time.perf_counter()
        lr = lr_schedule(step, cfg.lr, warmup, decay_steps, cfg.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data_io.get_batch(train_ids, T, B, batch_rng)
        loss = model(torch.from_numpy(x), torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        train_seconds += time.perf_counter() - t
        done = step + 1
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            t = time.perf_counter()
            val_losses[done] = torch_evaluate(model, val_ids, T, cfg.eval_batch_size)
            eval_seconds += time.perf_counter() - t
            print(f"torch step {done}: train loss {np.mean(losses[-cfg.log_interval:]):.4f}, "
                  f"val loss {val_losses[done]:.4f}", flush=True)
    return {
        "torch": torch.__version__,
        "threads": threads,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "evaluations": len(val_losses),
        "time_to_final_val_loss_s": round(train_seconds + eval_seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "ms_per_step": round(1e3 * train_seconds / max(len(losses), 1), 2),
        "tokens_per_s": round(len(losses) * B * T / max(train_seconds, 1e-9)),
        "final_val_loss": round(val_losses[cfg.steps], 4),
        "val_losses": val_losses,
        "final_train_loss_last_50_steps": round(float(np.mean(losses[-50:])), 4),
    }


def tinylm_run(cfg: TrainConfig, settings: dict, profile_steps: int) -> dict:
    """`tinylm train` with these settings (and, first, the phase profile); the figures."""
    out = {"malloc_keeps_freed_memory": keep_freed_memory()}
    if profile_steps:
        out["profile"] = prof = profile(cfg, profile_steps)
        print(
            "profile (median ms per step): "
            + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in prof.items() if k.endswith("_ms"))
            + f"; one evaluation of the whole validation split ({prof['val_tokens']:,} tokens) "
            f"{prof['eval_whole_val_split_s']:.2f} s, one sample {prof['sample_s']:.2f} s, "
            f"one checkpoint {prof['checkpoint_s']:.3f} s"
        )
    with tempfile.TemporaryDirectory() as tmp:
        settings.setdefault("out", str(Path(tmp) / "run"))
        result = train(**settings)
    n_evals = sum(r.get("val_loss") is not None for r in result.history)
    # On a shared machine other processes slow some stretches down; the median over the
    # log intervals is the speed of an undisturbed stretch.
    median_tok_s = statistics.median(r["tokens_per_s"] for r in result.history)
    tokens_per_step = result.config.batch_size * result.config.block_size
    out.update(
        {
            "config": result.config.to_dict(),
            "steps": result.step,
            "train_seconds": round(result.train_seconds, 2),
            "eval_seconds": round(result.eval_seconds, 2),
            "evaluations": n_evals,
            "time_to_final_val_loss_s": round(result.train_seconds + result.eval_seconds, 2),
            "total_seconds": round(result.elapsed, 2),
            "tokens_per_s": round(result.tokens_per_s),
            "ms_per_step": round(1e3 * result.train_seconds / max(len(result.losses), 1), 2),
            "median_interval_tokens_per_s": round(median_tok_s),
            "median_interval_ms_per_step": round(1e3 * tokens_per_step / median_tok_s, 2),
            "train_seconds_at_median_speed": round(
                len(result.losses) * tokens_per_step / median_tok_s, 1
            ),
            "final_val_loss": round(result.val_loss, 4),
            "val_losses": {r["step"]: round(r["val_loss"], 4) for r in result.history
                           if r.get("val_loss") is not None},
            "final_train_loss_last_50_steps": round(float(np.mean(result.losses[-50:])), 4),
            "target": {"train_seconds_max": 150, "val_loss_max": 1.45},
            "meets_target": result.train_seconds <= 150 and result.val_loss <= 1.45,
        }
    )
    print(
        f"{result.step} steps: training steps {result.train_seconds:.1f} s "
        f"({result.tokens_per_s:,.0f} tok/s, {out['ms_per_step']} ms/step), {n_evals} "
        f"evaluations {result.eval_seconds:.1f} s, total {result.elapsed:.1f} s; "
        f"validation loss {result.val_loss:.4f}; target met: {out['meets_target']}\n"
        f"median over the log intervals: {median_tok_s:,.0f} tok/s = "
        f"{out['median_interval_ms_per_step']} ms/step -> "
        f"{out['train_seconds_at_median_speed']} s of training steps at that speed"
    )
    return out


def parse_args(argv=None):
    """This script's own flags, the `tinylm train` flags, and the TrainConfig they make."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag is passed to `tinylm train` (see tinylm train --help).",
    )
    parser.add_argument("--json", default="benchmarks/results/train_cpu.json", help="output file")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="time N steps phase by phase before the run (0: no)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="BLAS / torch threads (default: the core count)")
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch run")
    parser.add_argument("--note", default="", help="how loaded the machine was, for the record")
    parser.add_argument("--worker", choices=("tinylm", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args, train_argv = parser.parse_known_args(argv)
    if args.threads < 1 or args.profile < 0:
        parser.error("--threads must be at least 1 and --profile at least 0")
    train_args = cli.build_parser().parse_args(["train", *train_argv])
    settings = {k: v for k, v in vars(train_args).items() if k in SETTINGS}
    settings.setdefault("progress", False)
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k not in ("out", "resume")})
    return args, train_argv, settings, cfg


def run_worker(kind: str, argv: list[str], threads: int) -> dict:
    """Run this script as ``--worker kind`` in a process of its own; its figures."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{kind}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", kind,
               "--worker-out", str(out)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text(encoding="utf-8"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args, train_argv, settings, cfg = parse_args(argv)
    if args.worker:
        if args.worker == "tinylm":
            result = tinylm_run(cfg, settings, args.profile)
        else:
            result = torch_recipe(cfg, args.threads)
        Path(args.worker_out).write_text(json.dumps(result), encoding="utf-8")
        return

    report = {
        "benchmark": "train_cpu: `tinylm train` on the CPU, and the same recipe in torch eager",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "threads": args.threads,
        "flags": train_argv,
        "note": args.note,
        "load_average_before": os.getloadavg(),
    }
    skip = "--no-torch was given" if args.no_torch else torch_skip_reason(cfg)
    if skip is None:
        try:
            import torch  # noqa: F401
        except ImportError:
            skip = "torch is not installed (pip install torch)"
    worker_argv = [a for a in argv if a != "--no-torch"]
    report.update(run_worker("tinylm", worker_argv, args.threads))
    if skip is not None:
        print(f"skipped the torch run: {skip}")
        report["torch_run"] = {"skipped": skip}
    else:
        worker_argv = [a for a in worker_argv if not a.startswith("--profile")]
        if "--profile" in argv:  # "--profile N" as two words: drop N too
            i = argv.index("--profile")
            worker_argv = [a for a in argv[:i] + argv[i + 2:] if a != "--no-torch"]
        theirs = report["torch_run"] = run_worker("torch", worker_argv, args.threads)
        ratio = report["time_to_final_val_loss_s"] / theirs["time_to_final_val_loss_s"]
        report["ratio_time_to_final_val_loss"] = round(ratio, 3)
        report["ratio_train_seconds"] = round(report["train_seconds"] / theirs["train_seconds"], 3)
        report["ratio_eval_seconds"] = round(report["eval_seconds"] / theirs["eval_seconds"], 3)
        report["val_loss_minus_torch"] = round(
            report["final_val_loss"] - theirs["final_val_loss"], 4)
        print(
            f"torch {theirs['torch']}: training steps {theirs['train_seconds']:.1f} s "
            f"({theirs['ms_per_step']} ms/step), {theirs['evaluations']} evaluations "
            f"{theirs['eval_seconds']:.1f} s; validation loss {theirs['final_val_loss']:.4f}\n"
            f"tinylm / torch: time to the final validation loss {ratio:.2f} "
            f"({report['time_to_final_val_loss_s']:.1f} s vs "
            f"{theirs['time_to_final_val_loss_s']:.1f} s), training steps "
            f"{report['ratio_train_seconds']:.2f}, evaluations {report['ratio_eval_seconds']:.2f}; "
            f"validation loss {report['final_val_loss']:.4f} vs {theirs['final_val_loss']:.4f}"
        )
    report["load_average_after"] = os.getloadavg()
    write_report(args.json, report)


if __name__ == "__main__":
    main()
