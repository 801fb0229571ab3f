"""GPT-2 small's shape (124M parameters, random weights) on the CPU: load, memory, generation.

Measures, in one process:

- the memory bandwidth ceiling: a float32 matrix-vector product over 512 MiB of weights
  (x (1, 8192) @ W (8192, 16384)), with every BLAS thread; batch-1 decoding reads every weight
  once per token, so bandwidth / parameter bytes is the most tokens/s it can reach;
- load: seconds for GPT.from_pretrained on a Hugging Face directory tinylm wrote (the file is
  in the page cache, as it is after the first load);
- generation: tokens/s, batch 1, a 32-token prompt, 100 new greedy tokens, with and without
  the key/value cache, and tokens/s as a fraction of the ceiling;
- resident memory (RSS, sampled every 5 ms) while generating, against the float32 parameter bytes;
- a fine-tuning step: forward, backward and AdamW on a (4, 64) batch.

    python benchmarks/gpt2.py                    # -> benchmarks/results/gpt2.json
    python benchmarks/gpt2.py --note "machine shared with other jobs"

The 2-core test machine is often shared, and its memory bandwidth changes from hour to hour
(19.8 GB/s one afternoon, 30.7 GB/s the next evening). So the ceiling is measured next to each
generation run, in turns (bandwidth, generation, bandwidth, generation, ...), each run's
tokens/s is divided by the ceiling measured just before it, and the figures quoted are medians
over the repeats. The note says what the machine was doing.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from report import machine_info, write_report  # benchmarks/report.py

from tinylm.hf.gpt2 import param_shapes, save_gpt2
from tinylm.model import GPT, GPTConfig
from tinylm.optim import AdamW

GPT2_SMALL = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The largest RSS seen, sampled every 5 ms in a thread, while the `with` block runs."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def bandwidth_matrix() -> np.ndarray:
    """The 512 MiB float32 matrix W (8192, 16384) that the bandwidth is measured on."""
    return np.random.default_rng(0).standard_normal((8192, 16384), dtype=np.float32)


def matvec_bandwidth(W: np.ndarray, repeats: int = 3) -> float:
    """GB/s of x (1, 8192) @ W (8192, 16384): the median over repeats, after a warm-up."""
    x = np.ones((1, W.shape[0]), dtype=np.float32)
    x @ W  # warm up the threads
    figures = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x @ W
        figures.append(W.nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(figures)


def write_random_gpt2(path: Path):
    """A GPT-2-small-shaped directory with Normal(0, 0.02) float32 weights, written by tinylm
    (a GPT object of this size would spend seconds on GPT-2's initialisation; this is faster)."""
    rng = np.random.default_rng(0)
    model = GPT(GPTConfig(vocab_size=2, block_size=1, n_layer=1, n_head=1, n_embd=1))
    model.config = GPT2_SMALL
    model.params = {
        name: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        for name, shape in param_shapes(GPT2_SMALL).items()
    }
    save_gpt2(model, path)
    return sum(a.nbytes for a in model.params.values())


def tokens_per_second(model, prompt, new_tokens, use_cache) -> float:
    """New tokens per second of one greedy generation (the prompt's forward included)."""
    t0 = time.perf_counter()
    model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
    return new_tokens / (time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--note", default="", help="what else the machine was doing")
    parser.add_argument("--json", default="benchmarks/results/gpt2.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpt2-small-random"
        param_bytes = write_random_gpt2(path)
        load_s = []
        for _ in range(args.repeats):
            model = None  # free the previous copy before timing the next load
            t0 = time.perf_counter()
            model = GPT.from_pretrained(path)
            load_s.append(time.perf_counter() - t0)
    n_params = model.num_params()
    print(f"load: {n_params:,} parameters, {param_bytes / 2**20:.0f} MiB, "
          f"median {statistics.median(load_s):.2f} s")  # fmt: skip

    prompt = np.random.default_rng(1).integers(0, GPT2_SMALL.vocab_size, size=(1, 32))
    model.generate(prompt, 2)  # warm up
    with PeakRSS() as rss:  # before the 512 MiB bandwidth matrix exists, so it is not counted
        tokens_per_second(model, prompt, args.new_tokens, True)

    # In turns: the ceiling now, then a generation run measured against it.
    W = bandwidth_matrix()
    bandwidth, cached, fractions = [], [], []
    for _ in range(args.repeats):
        bandwidth.append(matvec_bandwidth(W))
        cached.append(tokens_per_second(model, prompt, args.new_tokens, True))
        fractions.append(cached[-1] / (bandwidth[-1] * 1e9 / param_bytes))
    del W
    uncached = tokens_per_second(model, prompt, args.new_tokens, False)
    ceiling = statistics.median(bandwidth) * 1e9 / param_bytes  # tokens/s reading each byte once
    print(f"matvec over 512 MiB float32: median {statistics.median(bandwidth):.1f} GB/s, "
          f"so a ceiling of {ceiling:.1f} tokens/s")  # fmt: skip
    print(f"generate with cache: median {statistics.median(cached):.1f} tokens/s, "
          f"median {statistics.median(fractions):.0%} of the ceiling measured before each run; "
          f"without the cache: {uncached:.1f} tokens/s")  # fmt: skip
    print(f"RSS while generating: {rss.peak / 2**20:.0f} MiB = "
          f"{rss.peak / param_bytes:.2f} x the parameter bytes")  # fmt: skip

    rng = np.random.default_rng(2)
    x = rng.integers(0, GPT2_SMALL.vocab_size, size=(4, 64))
    y = rng.integers(0, GPT2_SMALL.vocab_size, size=(4, 64))
    optimizer = AdamW(model.params, lr=1e-5)
    model.train()
    step_s = []
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        model.forward(x, y)
        optimizer.step(model.backward())
        step_s.append(time.perf_counter() - t0)
    step_s = step_s[1:]  # the first step allocates AdamW's moments
    print(f"fine-tuning step (B=4, T=64): median {statistics.median(step_s):.2f} s")

    results = {
        "benchmark": "gpt2",
        "model": "GPT-2 small shape, random float32 weights",
        "parameters": n_params,
        "parameter_bytes": param_bytes,
        "matvec_512MiB_GB_per_s": {"median": round(statistics.median(bandwidth), 2),
                                   "all": [round(b, 2) for b in bandwidth]},
        "ceiling_tokens_per_s": round(ceiling, 2),
        "load_seconds": {"median": round(statistics.median(load_s), 3),
                         "all": [round(s, 3) for s in load_s]},
        "generate": {
            "prompt_tokens": 32,
            "new_tokens": args.new_tokens,
            "batch": 1,
            "with_cache_tokens_per_s": round(statistics.median(cached), 2),
            "with_cache_all": [round(t, 2) for t in cached],
            "with_cache_fraction_of_ceiling": round(statistics.median(fractions), 3),
            "with_cache_fractions_all": [round(f, 3) for f in fractions],
            "without_cache_tokens_per_s": round(uncached, 2),
        },
        "rss_while_generating_bytes": rss.peak,
        "rss_over_parameter_bytes": round(rss.peak / param_bytes, 3),
        "finetune_step_seconds": {"batch": [4, 64],
                                  "median": round(statistics.median(step_s), 3)},
        "targets": {"fraction_of_ceiling": 0.6, "rss_over_parameter_bytes": 1.5,
                    "load_seconds": 2.0},
        "note": args.note,
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    write_report(args.json, results)


if __name__ == "__main__":
    main()
