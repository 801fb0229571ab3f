"""Does glibc's malloc slow tinylm's CPU step down, and by how much per page fault?

Each variant steps tinylm's GPT (forward + backward, float32) in a process of its own, the
processes taking turns; printed per variant: the median ms per step and minor page faults per
step (a freed block that glibc gave back to the OS must be faulted in again, page by page).

    plain         nothing but `import tinylm` (the notebook path)
    kept          tinylm.backend.keep_freed_memory() first (what `tinylm train` does)
    trim_only     only glibc's trim threshold raised: this switches glibc's dynamic mmap
                  threshold off, so every block over 128 kB is mmapped afresh: many faults,
                  which gives the cost of one fault on this machine

and, for each, whether the step's gradients are kept until the next step (a notebook's
`grads = model.backward()`) or dropped at once (the training loop, after the optimizer).

    python benchmarks/profile_cpu.py                 # 4x4x128, block 64, batch 12
    python benchmarks/profile_cpu.py --size 6,6,384,256,8 --steps 3
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cpu_step  # benchmarks/cpu_step.py: the same model and batch

VARIANTS = ("plain", "kept", "trim_only")


def run_variant(variant, size, steps, keep_grads):
    """Step the model ``steps`` times in this process; ms and minor faults of each step."""
    if variant == "kept":
        from tinylm.backend import keep_freed_memory

        keep_freed_memory()
    elif variant == "trim_only":
        M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
        ctypes.CDLL("libc.so.6").mallopt(M_TRIM_THRESHOLD, 2 << 30)
    L, H, C, T, B = size
    model = cpu_step.tinylm_model(L, H, C, T)
    idx, targets = cpu_step.make_batch(T, B)
    grads = None
    for _ in range(2):  # warm up
        model.forward(idx, targets)
        grads = model.backward()
        if not keep_grads:
            grads = None  # dropped at once, as the training loop does after the optimizer
    ms, faults = [], []
    for _ in range(steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        model.forward(idx, targets)
        grads = model.backward()
        if not keep_grads:
            grads = None
        ms.append(1e3 * (time.perf_counter() - t0))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    del grads
    return {"ms": ms, "faults": faults}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="4,4,128,64,12", metavar="L,H,C,T,B")
    parser.add_argument("--steps", type=int, default=10, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=3, help="turns per variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split(","))
    if args.worker:
        variant, keep = args.worker.split(":")
        print(json.dumps(run_variant(variant, size, args.steps, keep == "keep")))
        return
    results = {}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            for keep in ("keep", "drop"):
                out = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--worker",
                     f"{variant}:{keep}", "--size", args.size, "--steps", str(args.steps)],
                    capture_output=True, text=True, check=True,
                ).stdout  # fmt: skip
                r = json.loads(out.splitlines()[-1])
                acc = results.setdefault((variant, keep), {"ms": [], "faults": []})
                acc["ms"] += r["ms"]
                acc["faults"] += r["faults"]
    print(f"size {args.size}: median over {args.rounds} x {args.steps} steps")
    print(f"{'variant':10s} {'grads':5s} {'ms/step':>8s} {'faults/step':>12s}")
    med = {}
    for (variant, keep), r in results.items():
        med[variant, keep] = (statistics.median(r["ms"]), statistics.median(r["faults"]))
        ms, faults = med[variant, keep]
        print(f"{variant:10s} {keep:5s} {ms:8.2f} {faults:12,.0f}")
    for keep in ("keep", "drop"):
        (t_trim, f_trim), (t_kept, f_kept) = med["trim_only", keep], med["kept", keep]
        if f_trim > f_kept:
            cost_us = 1e3 * (t_trim - t_kept) / (f_trim - f_kept)
            print(f"one page fault costs about {cost_us:.2f} us (trim_only against kept, "
                  f"grads {keep})")


if __name__ == "__main__":
    main()
