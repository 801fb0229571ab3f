"""How much faster is generation with the KV cache than without it?

Without the cache, every new token runs the model over the whole window again: O(T) positions of
work per token, O(T^2) for T tokens. With it, each layer keeps the keys and values of the tokens it
has read, and a new token costs one position (model.generate, use_cache=True). Once the text is
longer than block_size the window slides, positions shift under the cached keys, and the window is
read afresh at every step, so the cache helps only while the text fits in the window.

Cases (random weights: the speed does not depend on them; float32, batch 1, temperature 1):
    default model 4x4x128 block 64: 56 new tokens within the window (8-token prompt), and
                                    256 new tokens (most of them past the window)
    6x6x384 block 256:              248 new tokens within the window (8-token prompt)

    python benchmarks/sample_kv.py               # median of 3 runs per case
    python benchmarks/sample_kv.py --repeats 5

Writes benchmarks/results/sample_kv.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import numpy as np
from report import machine_info, write_report  # benchmarks/report.py

from tinylm import GPT, GPTConfig
from tinylm.backend import keep_freed_memory

VOCAB = 104  # the character vocabulary of the pydoc corpus
PROMPT = 8
CASES = [
    # name, (n_layer, n_head, n_embd, block_size), new tokens
    ("4x4x128 block 64, 56 new tokens (within the window)", (4, 4, 128, 64), 56),
    ("4x4x128 block 64, 256 new tokens (window slides)", (4, 4, 128, 64), 256),
    ("6x6x384 block 256, 248 new tokens (within the window)", (6, 6, 384, 256), 248),
]


def time_generate(model, prompt, new_tokens, use_cache, repeats):
    model.generate(prompt, 4, seed=0, use_cache=use_cache)  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompt, new_tokens, seed=0, use_cache=use_cache)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--json", default="benchmarks/results/sample_kv.json", help="output file")
    args = parser.parse_args()
    malloc_tuned = keep_freed_memory()

    rows = []
    for name, (L, H, C, T), new in CASES:
        model = GPT(
            GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=L, n_head=H, n_embd=C), seed=0
        )
        prompt = np.random.default_rng(0).integers(0, VOCAB, size=(1, PROMPT))
        with_cache, out_cache = time_generate(model, prompt, new, True, args.repeats)
        without, out_plain = time_generate(model, prompt, new, False, args.repeats)
        row = {
            "case": name,
            "n_layer": L, "n_head": H, "n_embd": C, "block_size": T,
            "prompt_tokens": PROMPT, "new_tokens": new,
            "cache_s": round(with_cache, 3), "no_cache_s": round(without, 3),
            "cache_tokens_per_s": round(new / with_cache, 1),
            "no_cache_tokens_per_s": round(new / without, 1),
            "speedup": round(without / with_cache, 2),
            "same_tokens": bool(np.array_equal(out_cache, out_plain)),
        }  # fmt: skip
        rows.append(row)
        print(
            f"{name:55s} cache {row['cache_tokens_per_s']:8.1f} tok/s   no cache "
            f"{row['no_cache_tokens_per_s']:8.1f} tok/s   speed-up {row['speedup']:5.2f}x   "
            f"same tokens: {row['same_tokens']}"
        )

    report = {
        "benchmark": "sample_kv: model.generate with and without the KV cache (CPU, float32)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "malloc_keeps_freed_memory": malloc_tuned,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "results": rows,
    }
    write_report(args.json, report)


if __name__ == "__main__":
    main()
