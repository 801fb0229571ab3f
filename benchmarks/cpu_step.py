"""How fast is one training step (forward + backward) of tinylm's GPT on the CPU?

For each model size this prints ms/step, tokens/s, the achieved GFLOP/s of the step's
matrix products, and that figure as a fraction of this machine's own float32 matmul
throughput, measured here in the same run. A step's work is almost all matrix products,
so that throughput is the ceiling: the fraction says how much the layer code (softmax,
LayerNorm, GELU, reshapes, the optimizer is *not* included) costs on top of them.

FLOPs counted (a multiply-add is 2 FLOPs), per step, N = B*T tokens:
    forward, per layer:  qkv 2*N*C*3C + scores 2*B*H*T*T*D + P@V 2*B*H*T*T*D
                         + proj 2*N*C*C + fc 2*N*C*4C + proj 2*N*4C*C
    forward, head:       2*N*C*V
    backward = 2 x forward (each product has two gradient products), so step = 3 x forward.
The full T x T score matrix is computed (masked, not skipped), so causal attention is not
halved here.

    python benchmarks/cpu_step.py                      # both sizes, JSON to benchmarks/results/
    python benchmarks/cpu_step.py --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import numpy as np
from report import machine_info, write_report  # benchmarks/report.py

from tinylm import GPT, GPTConfig
from tinylm.backend import keep_freed_memory

SIZES = {
    # name: (n_layer, n_head, n_embd, block_size, batch_size)
    "4x4x128 block 64 batch 12": (4, 4, 128, 64, 12),
    "6x6x384 block 256 batch 8": (6, 6, 384, 256, 8),
}
VOCAB = 65  # a character-level vocabulary, as in the default training run


def step_flops(n_layer, n_head, n_embd, T, B, V):
    C, N, D = n_embd, B * T, n_embd // n_head
    per_layer = 2 * N * C * 3 * C + 2 * (2 * B * n_head * T * T * D) + 2 * N * C * C
    per_layer += 2 * N * C * 4 * C + 2 * N * 4 * C * C
    forward = n_layer * per_layer + 2 * N * C * V
    return 3 * forward


def matmul_gflops(n=2048, repeats=5):
    """This machine's float32 matmul throughput: median over repeats of an n x n x n product."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def time_step(n_layer, n_head, n_embd, T, B, repeats):
    config = GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd)
    model = GPT(config, seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, VOCAB, size=(B, T))
    targets = rng.integers(0, VOCAB, size=(B, T))
    model.forward(idx, targets)  # warm up
    model.backward()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.forward(idx, targets)
        model.backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), model.num_params()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per size (median)")
    parser.add_argument("--json", default="benchmarks/results/cpu_step.json", help="output file")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (see tinylm.backend.keep_freed_memory)")
    args = parser.parse_args()
    malloc_tuned = False if args.default_malloc else keep_freed_memory()
    print(f"malloc keeps freed memory: {malloc_tuned}")

    peak = matmul_gflops()
    print(f"float32 matmul throughput (2048^3, median): {peak:.1f} GFLOP/s")
    results = []
    for name, (L, H, C, T, B) in SIZES.items():
        seconds, n_params = time_step(L, H, C, T, B, args.repeats)
        flops = step_flops(L, H, C, T, B, VOCAB)
        gflops = flops / seconds / 1e9
        row = {
            "size": name, "n_layer": L, "n_head": H, "n_embd": C, "block_size": T,
            "batch_size": B, "params": n_params, "ms_per_step": 1e3 * seconds,
            "tokens_per_s": B * T / seconds, "gflop_per_step": flops / 1e9,
            "gflops": gflops, "fraction_of_matmul": gflops / peak,
        }
        results.append(row)
        print(f"{name:28s} {row['ms_per_step']:8.1f} ms/step {row['tokens_per_s']:9.0f} tok/s "
              f"{gflops:7.1f} GFLOP/s = {100 * row['fraction_of_matmul']:5.1f}% of matmul")

    report = {
        "benchmark": "cpu_step (forward + backward, float32, median)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "malloc_keeps_freed_memory": malloc_tuned,
        "matmul_gflops": peak,
        "results": results,
    }
    write_report(args.json, report)


if __name__ == "__main__":
    main()
