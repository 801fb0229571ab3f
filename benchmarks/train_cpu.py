"""How long does `tinylm train` take on this CPU, and how good is the model it makes?

Runs a training (the default one unless flags say otherwise) and records the wall time of the
training steps alone, the time spent evaluating, tokens per second, and the final validation loss
on the whole validation split, with the machine and the date.

    python benchmarks/train_cpu.py                      # the default run: 2,000 steps on pydoc
    python benchmarks/train_cpu.py --steps 200 --n-layer 2   # any `tinylm train` flag
    python benchmarks/train_cpu.py --profile 30         # first: where a step's time goes

The target for the default run on the 2-core reference machine: the training steps finish in
<= 150 s and the validation loss is <= 1.45. The machine should be otherwise idle: the figures
are wall-clock times (the load average before and after is recorded).

--profile N times N extra steps of the same model phase by phase (batch, forward, backward,
clipping, optimizer) and one evaluation, one sample and one checkpoint, before the run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
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
from tinylm.optim import AdamW, clip_grad_norm
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


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag is passed to `tinylm train` (see tinylm train --help).",
    )
    parser.add_argument("--json", default="benchmarks/results/train_cpu.json", help="output file")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="time N steps phase by phase before the run (0: no)")  # fmt: skip
    args, train_argv = parser.parse_known_args()
    train_args = cli.build_parser().parse_args(["train", *train_argv])
    settings = {k: v for k, v in vars(train_args).items() if k in SETTINGS}
    settings.setdefault("progress", False)
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k not in ("out", "resume")})

    report = {
        "benchmark": "train_cpu: `tinylm train` on the CPU",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "malloc_keeps_freed_memory": keep_freed_memory(),
        "flags": train_argv,
        "load_average_before": os.getloadavg(),
    }
    if args.profile:
        report["profile"] = prof = profile(cfg, args.profile)
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
    report.update(
        {
            "config": result.config.to_dict(),
            "steps": result.step,
            "train_seconds": round(result.train_seconds, 2),
            "eval_seconds": round(result.eval_seconds, 2),
            "evaluations": n_evals,
            "total_seconds": round(result.elapsed, 2),
            "tokens_per_s": round(result.tokens_per_s),
            "ms_per_step": round(1e3 * result.train_seconds / max(len(result.losses), 1), 2),
            "median_interval_tokens_per_s": round(median_tok_s),
            "median_interval_ms_per_step": round(1e3 * tokens_per_step / median_tok_s, 2),
            "train_seconds_at_median_speed": round(
                len(result.losses) * tokens_per_step / median_tok_s, 1
            ),
            "final_val_loss": round(result.val_loss, 4),
            "final_train_loss_last_50_steps": round(float(np.mean(result.losses[-50:])), 4),
            "target": {"train_seconds_max": 150, "val_loss_max": 1.45},
            "meets_target": result.train_seconds <= 150 and result.val_loss <= 1.45,
            "load_average_after": os.getloadavg(),
        }
    )
    print(
        f"{result.step} steps: training steps {result.train_seconds:.1f} s "
        f"({result.tokens_per_s:,.0f} tok/s, {report['ms_per_step']} ms/step), {n_evals} "
        f"evaluations {result.eval_seconds:.1f} s, total {result.elapsed:.1f} s; "
        f"validation loss {result.val_loss:.4f}; target met: {report['meets_target']}\n"
        f"median over the log intervals: {median_tok_s:,.0f} tok/s = "
        f"{report['median_interval_ms_per_step']} ms/step -> "
        f"{report['train_seconds_at_median_speed']} s of training steps at that speed"
    )
    write_report(args.json, report)


if __name__ == "__main__":
    main()
