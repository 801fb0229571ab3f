"""How fast is tinylm's fused attention kernel on the GPU, next to the alternatives?

Causal attention, head size D = 64, B = 4 sequences x H = 12 heads (B*H = 48), for several
sequence lengths T. Each implementation is timed forward and backward separately:

    tinylm kernel      tinylm.cuda.flash_attention_forward / _backward (kernels/attention.cu)
    tinylm reference   tinylm.layers.attention_forward(...) on CuPy arrays (the layer itself):
                       builds the (T, T) score matrix; runs out of memory at large T
    torch math         torch scaled_dot_product_attention, math backend, float32, TF32 off
    torch mem-eff      torch scaled_dot_product_attention, memory-efficient backend, float32
                       (the torch rows appear only where torch with CUDA is importable)

Time: median over --repeats runs, measured with CUDA events after --warmup runs.
FLOPs (a multiply-add is 2 FLOPs): forward = 4 * T^2 * D * B * H (two T x T x D products),
halved because causal attention skips the masked half; backward = 2.5 x forward (five
products of the same size: S recomputed, dV, dP, dQ, dK). TFLOP/s = FLOPs / time, and its
fraction of --peak-tflops (67 = the H100 SXM's float32 peak without tensor cores).
Memory: what the case needed on top of its inputs (q, k, v, dout): CuPy's memory pool size
after the case (the pool keeps freed blocks, so this is the peak it held), or torch's
max_memory_allocated; both are reset between cases.

    python benchmarks/attention_gpu.py                  # -> benchmarks/results/attention_gpu.json
    python benchmarks/attention_gpu.py --T 1024 4096 --repeats 5 --json /tmp/attention.json
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys

import numpy as np
from report import write_report  # benchmarks/report.py


def gpu_or_exit():
    """CuPy with a CUDA device, or exit with one line saying what is missing."""
    try:
        import cupy
    except ImportError:
        sys.exit("attention_gpu.py: CuPy is not installed; this benchmark needs an NVIDIA GPU")
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDARuntimeError when there is no driver
        sys.exit(f"attention_gpu.py: no usable CUDA device ({err})")
    if n_devices == 0:
        sys.exit("attention_gpu.py: CUDA reports 0 devices; this benchmark needs an NVIDIA GPU")
    return cupy


def import_torch_cuda():
    """torch, when it is installed and sees the GPU; None otherwise."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def forward_flops(T, D, B, H, causal=True):
    flops = 4 * T * T * D * B * H
    return flops / 2 if causal else flops


def median_ms(fn, new_event, elapsed_ms, repeats, warmup):
    """Median time of fn() in milliseconds over repeats runs, after warmup runs, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = new_event(), new_event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(elapsed_ms(start, end))
    return statistics.median(times)


# ------------------------------------------------------------------------------ implementations


def bench_tinylm(cupy, T, args, use_kernel):
    """forward ms, backward ms, extra bytes for tinylm's kernel or its CuPy reference path."""
    from tinylm import cuda, layers

    B, H, D = args.batch, args.heads, args.head_size
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    shape = (B, H, T, D)
    q, k, v, dout = (cupy.random.standard_normal(shape, dtype=cupy.float32) for _ in range(4))
    cupy.cuda.Device().synchronize()
    base = pool.total_bytes()

    def cupy_ms(fn):
        return median_ms(fn, cupy.cuda.Event, cupy.cuda.get_elapsed_time, args.repeats, args.warmup)

    if use_kernel:
        out, lse = cuda.flash_attention_forward(q, k, v, causal=True)
        fwd = cupy_ms(lambda: cuda.flash_attention_forward(q, k, v, causal=True))
        bwd = cupy_ms(lambda: cuda.flash_attention_backward(dout, q, k, v, out, lse, causal=True))
    else:
        _, cache = layers.attention_forward(q, k, v, causal=True)
        fwd = cupy_ms(lambda: layers.attention_forward(q, k, v, causal=True))
        bwd = cupy_ms(lambda: layers.attention_backward(dout, cache))
    cupy.cuda.Device().synchronize()
    return fwd, bwd, pool.total_bytes() - base


def bench_torch(torch, T, args, backend_name):
    """forward ms, backward ms, extra bytes for torch's scaled_dot_product_attention."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"math": SDPBackend.MATH, "mem-eff": SDPBackend.EFFICIENT_ATTENTION}[backend_name]
    B, H, D = args.batch, args.heads, args.head_size
    torch.cuda.empty_cache()
    shape = (B, H, T, D)
    q, k, v = (
        torch.randn(shape, device="cuda", dtype=torch.float32, requires_grad=True) for _ in range(3)
    )
    dout = torch.randn(shape, device="cuda", dtype=torch.float32)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def torch_ms(fn):
        return median_ms(
            fn,
            lambda: torch.cuda.Event(enable_timing=True),
            lambda start, end: start.elapsed_time(end),
            args.repeats,
            args.warmup,
        )

    with sdpa_kernel(backend):

        def forward():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        fwd = torch_ms(forward)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # with its graph
        bwd = torch_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    torch.cuda.synchronize()
    return fwd, bwd, torch.cuda.max_memory_allocated() - base


def check_kernel(cupy):
    """The kernel against the CuPy reference path at a small size: max relative error."""
    from tinylm import cuda, layers

    q, k, v, dout = (
        cupy.random.standard_normal((2, 4, 300, 64), dtype=cupy.float32) for _ in range(4)
    )
    out, lse = cuda.flash_attention_forward(q, k, v, causal=True)
    grads = cuda.flash_attention_backward(dout, q, k, v, out, lse, causal=True)
    out_ref, cache = layers.attention_forward(q, k, v, causal=True)
    grads_ref = layers.attention_backward(dout, cache)
    errors = [
        float(cupy.abs(a - b).max() / cupy.abs(b).max())
        for a, b in zip((out, *grads), (out_ref, *grads_ref), strict=True)
    ]
    return max(errors)


# ------------------------------------------------------------------------------ main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=67.0, help="FP32 peak of the GPU")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch rows")
    parser.add_argument("--json", default="benchmarks/results/attention_gpu.json")
    args = parser.parse_args(argv)

    cupy = gpu_or_exit()
    torch = None if args.no_torch else import_torch_cuda()
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = False  # true float32 products
        torch.backends.cudnn.allow_tf32 = False

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    device = name.decode() if isinstance(name, bytes) else str(name)
    max_error = check_kernel(cupy)
    print(f"{device}; kernel vs CuPy reference at T=300: max relative error {max_error:.1e}")

    implementations = [
        ("tinylm kernel", lambda T: bench_tinylm(cupy, T, args, use_kernel=True)),
        ("tinylm reference", lambda T: bench_tinylm(cupy, T, args, use_kernel=False)),
    ]
    if torch is not None:
        implementations += [
            ("torch math", lambda T: bench_torch(torch, T, args, "math")),
            ("torch mem-eff", lambda T: bench_torch(torch, T, args, "mem-eff")),
        ]
    oom_errors = [cupy.cuda.memory.OutOfMemoryError]
    if torch is not None:
        oom_errors.append(torch.cuda.OutOfMemoryError)

    B, H, D = args.batch, args.heads, args.head_size
    header = (
        f"{'T':>5}  {'implementation':<17} {'fwd ms':>8} {'TFLOP/s':>8} {'%peak':>6}"
        f" {'bwd ms':>8} {'TFLOP/s':>8} {'%peak':>6} {'extra MiB':>10}"
    )
    print(f"causal, D={D}, B={B}, H={H}, peak {args.peak_tflops} TFLOP/s")
    print(header)
    print("-" * len(header))
    rows = []
    for T in args.T:
        fwd_flops = forward_flops(T, D, B, H, causal=True)
        bwd_flops = 2.5 * fwd_flops
        for label, run in implementations:
            row = {"T": T, "implementation": label}
            try:
                fwd_ms, bwd_ms, extra = run(T)
            except tuple(oom_errors):
                row["error"] = "out of memory"
                print(f"{T:>5}  {label:<17} out of memory")
                rows.append(row)
                continue
            finally:
                cupy.get_default_memory_pool().free_all_blocks()
                if torch is not None:
                    torch.cuda.empty_cache()
            fwd_tflops = fwd_flops / (fwd_ms * 1e-3) / 1e12
            bwd_tflops = bwd_flops / (bwd_ms * 1e-3) / 1e12
            row.update(
                forward_ms=fwd_ms,
                forward_tflops=fwd_tflops,
                forward_fraction_of_peak=fwd_tflops / args.peak_tflops,
                backward_ms=bwd_ms,
                backward_tflops=bwd_tflops,
                backward_fraction_of_peak=bwd_tflops / args.peak_tflops,
                extra_memory_bytes=int(extra),
            )
            rows.append(row)
            print(
                f"{T:>5}  {label:<17} {fwd_ms:8.3f} {fwd_tflops:8.2f} "
                f"{100 * fwd_tflops / args.peak_tflops:5.1f}% {bwd_ms:8.3f} {bwd_tflops:8.2f} "
                f"{100 * bwd_tflops / args.peak_tflops:5.1f}% {extra / 2**20:10.1f}"
            )

    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
    }
    if torch is not None:
        versions["torch"] = torch.__version__
    results = {
        "benchmark": "attention_gpu",
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "config": {
            "causal": True,
            "B": B,
            "H": H,
            "D": D,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "peak_tflops": args.peak_tflops,
            "flops": "forward 4*T^2*D*B*H / 2 (causal), backward 2.5 x forward",
        },
        "kernel_check_max_relative_error": max_error,
        "results": rows,
    }
    write_report(args.json, results)


if __name__ == "__main__":
    main()
