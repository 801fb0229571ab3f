"""Run the fused attention kernels on small shapes, for NVIDIA's compute-sanitizer.

Every kernel in kernels/attention.cu runs forward and backward for T in {1, 17, 65}, head
sizes 32, 64 and 128, causal and not, with and without a key padding mask, plus one KV-cache
shape (Tq < Tk). Each result is compared with float64 NumPy, so the script also fails loudly
(exit 1) on a wrong answer. Run it under each tool on a machine with a GPU:

    compute-sanitizer --tool memcheck --leak-check full python benchmarks/sanitize_gpu.py
    compute-sanitizer --tool racecheck --racecheck-report analysis python benchmarks/sanitize_gpu.py
    compute-sanitizer --tool synccheck python benchmarks/sanitize_gpu.py
    compute-sanitizer --tool initcheck python benchmarks/sanitize_gpu.py

Each should end with "ERROR SUMMARY: 0 errors" (racecheck: "RACECHECK SUMMARY: 0 hazards").
memcheck checks global and shared memory accesses, racecheck shared-memory races (a missing
__syncthreads), synccheck barriers reached by only part of a block, initcheck reads of global
memory never written. CuPy's memory pool is switched off here, so that every array is its own
allocation and a read past the end of one is caught instead of landing in a neighbour.
The first run compiles the kernels (NVRTC), which takes a while under the sanitizer.
"""

from __future__ import annotations

import math
import sys

import numpy as np


def reference(q, k, v, dout, causal, mask):
    """out, dq, dk, dv in float64 from the full score matrix."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    allowed = np.ones((B, 1, Tq, Tk), dtype=bool)
    if causal:
        allowed &= np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)
    if mask is not None:
        allowed &= ~mask[:, None, None, :]
    s = np.where(allowed, q @ k.swapaxes(-1, -2) / math.sqrt(D), -np.inf)
    s_max = s.max(axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(s_max), s_max, 0.0))
    z = e.sum(axis=-1, keepdims=True)
    p = e / np.where(z > 0, z, 1.0)
    dp = dout @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) / math.sqrt(D)
    return p @ v, ds @ k, ds.swapaxes(-1, -2) @ q, p.swapaxes(-1, -2) @ dout


def relative_error(a, b, term):
    """max|a - b| / max|b|; for a b that is 0 in exact arithmetic (dq and dk when each query
    sees one key: the softmax is constant), max|a - b| / term, the size of one of its terms."""
    err = np.abs(a - b).max()
    scale = np.abs(b).max()
    return float(err / term if scale <= 1e-12 * term else err / scale)


def main():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("CUDA reports 0 devices")
    except Exception as err:
        sys.exit(f"sanitize_gpu.py: needs CuPy and a CUDA GPU ({err})")
    from tinylm import cuda

    cupy.cuda.set_allocator(None)  # no pool: each array its own cudaMalloc (see docstring)
    rng = np.random.default_rng(0)
    shapes = [(T, T) for T in (1, 17, 65)] + [(5, 70)]  # (Tq, Tk)
    failures = 0
    for D in (32, 64, 128):
        for Tq, Tk in shapes:
            for causal in (True, False):
                for masked in (False, True):
                    B, H = 2, 2
                    q, k, v, dout = (
                        rng.standard_normal(shape).astype(np.float32)
                        for shape in [(B, H, Tq, D), (B, H, Tk, D), (B, H, Tk, D), (B, H, Tq, D)]
                    )
                    mask = None
                    if masked:
                        mask = rng.random((B, Tk)) < 0.3
                        mask[0, 0] = True  # causal query 0 of batch 0 sees no key
                    qg, kg, vg, dg = (cupy.asarray(x) for x in (q, k, v, dout))
                    mg = None if mask is None else cupy.asarray(mask)
                    out, lse = cuda.flash_attention_forward(
                        qg, kg, vg, causal=causal, key_padding_mask=mg
                    )
                    grads = cuda.flash_attention_backward(
                        dg, qg, kg, vg, out, lse, causal=causal, key_padding_mask=mg
                    )
                    cupy.cuda.Device().synchronize()
                    expected = reference(
                        *(x.astype(np.float64) for x in (q, k, v, dout)), causal, mask
                    )
                    term = float(np.abs(dout).max() * np.abs(v).max() * np.abs(k).max())
                    term /= math.sqrt(D)  # the size of one term of dq or dk
                    error = max(
                        relative_error(cupy.asnumpy(a), b, term)
                        for a, b in zip((out, *grads), expected, strict=True)
                    )
                    ok = error < 1e-4
                    failures += not ok
                    print(
                        f"{'OK' if ok else 'NOT OK':6} D={D:3d} Tq={Tq:2d} Tk={Tk:2d} "
                        f"causal={causal!s:5} mask={masked!s:5} max rel error {error:.1e}"
                    )
    print(f"{failures} wrong results")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
