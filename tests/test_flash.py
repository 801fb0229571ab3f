"""Tests for FlashAttention without a GPU: kernels/attention.cu, tinylm/flash.py, tinylm/cuda.py.

1. nvcc compiles the CUDA source for sm_90 and sm_80 (skipped without nvcc).
2. The NumPy model of the kernel (tinylm.flash) matches a plain float64 attention written out
   here with explicit masks, and tinylm.layers' attention, to 1e-10 relative: out, lse, dq,
   dk, dv, with small tiles so that many tiles, partial tiles and masks are exercised.
3. The real kernel source runs on the CPU: g++ compiles attention.cu against a small header
   that plays the GPU (one OS thread per CUDA thread, real barriers for __syncthreads and the
   warp shuffles), and its float32 results match the float64 reference to 1e-4 (skipped
   without g++). This checks indexing, masking, tile edges and synchronisation, not speed.
4. tinylm.cuda imports without CuPy and refuses NumPy input with a clear message.

relative error = max|a - b| / max|b| over the whole array.
"""

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tinylm import cuda
from tinylm.flash import flash_attention_backward_numpy, flash_attention_forward_numpy

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"


def rel(a, b):
    """max|a - b| / max|b| (b = the reference); 0 when both are all zeros."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.abs(b).max() if b.size else 0.0
    return np.abs(a - b).max() / scale if scale > 0 else np.abs(a - b).max() if a.size else 0.0


# ----------------------------------------------------------------------------------------------
# The plain reference: the whole (Tq, Tk) matrix, masks written out explicitly


def reference_attention(q, k, v, causal, key_padding_mask):
    """out, lse, P of softmax(q k^T / sqrt(D) + mask) v in float64, the textbook way."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    allowed = np.ones((B, H, Tq, Tk), dtype=bool)
    if causal:  # query i sits at absolute position i + Tk - Tq and sees keys j up to there
        i, j = np.arange(Tq)[:, None], np.arange(Tk)[None, :]
        allowed &= j <= i + (Tk - Tq)
    if key_padding_mask is not None:
        for b in range(B):
            allowed[b, :, :, key_padding_mask[b]] = False  # nobody attends to a padded key

    s = q @ k.swapaxes(-1, -2) / math.sqrt(D)
    s_max = np.where(allowed, s, -np.inf).max(axis=-1, keepdims=True)
    s_max = np.where(np.isfinite(s_max), s_max, 0.0)
    e = np.where(allowed, np.exp(s - s_max), 0.0)
    z = e.sum(axis=-1, keepdims=True)
    p = e / np.where(z > 0, z, 1.0)  # a row with no allowed key: all zeros
    with np.errstate(divide="ignore"):
        lse = np.log(z[..., 0]) + s_max[..., 0]  # log sum_j exp(s_ij); -inf for an empty row
    return p @ v, lse, p


def reference_attention_backward(dout, q, k, v, p):
    """dq, dk, dv of out = P v, P = softmax(q k^T / sqrt(D) + mask), from the full P."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    dv = p.swapaxes(-1, -2) @ dout
    dp = dout @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return scale * ds @ k, scale * ds.swapaxes(-1, -2) @ q, dv


def make_inputs(rng, B, H, Tq, Tk, D, scale=10.0, dtype=np.float64):
    q = rng.standard_normal((B, H, Tq, D)) * scale
    k = rng.standard_normal((B, H, Tk, D)) * scale
    v = rng.standard_normal((B, H, Tk, D)) * scale
    dout = rng.standard_normal((B, H, Tq, D))
    return [x.astype(dtype) for x in (q, k, v, dout)]


def make_padding_mask(rng, B, Tk):
    """(B, Tk) bool with True = padded: batch 0 pads key 0 only (so under causal masking
    query 0 sees no key at all), batch 1 pads a random 30%, batch 2 pads every key."""
    mask = np.zeros((B, Tk), dtype=bool)
    mask[0, 0] = True
    if B > 1:
        mask[1] = rng.random(Tk) < 0.3
    if B > 2:
        mask[2] = True
    return mask


# ----------------------------------------------------------------------------------------------
# 1. The CUDA source compiles


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_nvcc_compiles_kernels(arch, tmp_path):
    sources = sorted(KERNEL_DIR.glob("*.cu"))
    assert sources, f"no .cu files in {KERNEL_DIR}"
    for source in sources:
        result = subprocess.run(
            [
                "nvcc",
                "-std=c++17",
                f"-arch={arch}",
                "--ptx",
                "-o",
                str(tmp_path / "out.ptx"),
                str(source),
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"


# ----------------------------------------------------------------------------------------------
# 2. The NumPy model of the kernel against the plain reference, in float64


@pytest.mark.parametrize("T", [1, 17, 63, 64, 65, 130])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_flash_numpy_matches_reference(T, D, causal, masked):
    rng = np.random.default_rng(T * 1000 + D + 7 * causal + 3 * masked)
    B, H = 3, 2
    q, k, v, dout = make_inputs(rng, B, H, T, T, D)  # scaled by 10: very peaked softmax
    mask = make_padding_mask(rng, B, T) if masked else None

    out_ref, lse_ref, p = reference_attention(q, k, v, causal, mask)
    grads_ref = reference_attention_backward(dout, q, k, v, p)
    # tiles of 16 queries and 16 keys: up to 9 x 9 tiles, partial tiles at the edges
    out, lse = flash_attention_forward_numpy(q, k, v, causal, mask, block_q=16, block_k=16)
    grads = flash_attention_backward_numpy(
        dout, q, k, v, out, lse, causal, mask, block_q=16, block_k=16
    )

    assert rel(out, out_ref) < 1e-10
    empty = np.isneginf(lse_ref)  # queries with no allowed key
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    if (~empty).any():
        assert rel(lse[~empty], lse_ref[~empty]) < 1e-10
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert rel(g, g_ref) < 1e-10, name
    if empty.any():  # a query with no key: output 0, and no gradient reaches or leaves it
        assert np.all(out[empty] == 0) and np.all(grads[0][empty] == 0)


def test_lse_is_logsumexp_of_masked_scores():
    rng = np.random.default_rng(3)
    B, H, T, D = 3, 2, 40, 32
    q, k, v, _ = make_inputs(rng, B, H, T, T, D)
    mask = make_padding_mask(rng, B, T)
    _, lse = flash_attention_forward_numpy(q, k, v, True, mask, block_q=16, block_k=16)
    s = q @ k.swapaxes(-1, -2) / math.sqrt(D)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                kept = [s[b, h, i, j] for j in range(i + 1) if not mask[b, j]]
                if not kept:
                    assert lse[b, h, i] == -np.inf
                else:
                    m = max(kept)
                    expected = m + math.log(sum(math.exp(x - m) for x in kept))
                    assert abs(lse[b, h, i] - expected) <= 1e-12 * abs(expected) + 1e-12


@pytest.mark.parametrize("block_q, block_k", [(16, 32), (32, 16), (64, 64), (7, 5)])
def test_flash_numpy_any_tile_sizes(block_q, block_k):
    """Tiles need not be equal or divide T: the result does not depend on them."""
    rng = np.random.default_rng(block_q * 100 + block_k)
    q, k, v, dout = make_inputs(rng, 3, 2, 50, 50, 32)
    mask = make_padding_mask(rng, 3, 50)
    out_ref, lse_ref, p = reference_attention(q, k, v, True, mask)
    grads_ref = reference_attention_backward(dout, q, k, v, p)
    out, lse = flash_attention_forward_numpy(q, k, v, True, mask, block_q, block_k)
    grads = flash_attention_backward_numpy(dout, q, k, v, out, lse, True, mask, block_q, block_k)
    assert rel(out, out_ref) < 1e-10
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel(g, g_ref) < 1e-10


@pytest.mark.parametrize("Tq, Tk", [(1, 70), (5, 70), (17, 33)])
def test_flash_numpy_kv_cache_queries(Tq, Tk):
    """Generation with a KV cache: Tq < Tk, query i sits at position Tk - Tq + i."""
    rng = np.random.default_rng(Tq + Tk)
    q, k, v, dout = make_inputs(rng, 2, 2, Tq, Tk, 32)
    mask = make_padding_mask(rng, 2, Tk)
    for causal in (True, False):
        out_ref, lse_ref, p = reference_attention(q, k, v, causal, mask)
        grads_ref = reference_attention_backward(dout, q, k, v, p)
        out, lse = flash_attention_forward_numpy(q, k, v, causal, mask, 16, 16)
        grads = flash_attention_backward_numpy(dout, q, k, v, out, lse, causal, mask, 16, 16)
        assert rel(out, out_ref) < 1e-10
        for g, g_ref in zip(grads, grads_ref, strict=True):
            assert rel(g, g_ref) < 1e-10


@pytest.mark.parametrize("T", [1, 17, 65, 130])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_flash_numpy_matches_layers_attention(T, causal, masked):
    """The model of the kernel and the layer the GPT uses agree (float64, 1e-10)."""
    from tinylm import layers

    rng = np.random.default_rng(T + 11 * causal + 5 * masked)
    B, H, D = 3, 2, 64
    q, k, v, dout = make_inputs(rng, B, H, T, T, D)
    mask = make_padding_mask(rng, B, T) if masked else None

    out_ref, cache = layers.attention_forward(q, k, v, causal=causal, key_padding_mask=mask)
    grads_ref = layers.attention_backward(dout, cache)
    out, lse = flash_attention_forward_numpy(q, k, v, causal, mask, block_q=16, block_k=16)
    grads = flash_attention_backward_numpy(dout, q, k, v, out, lse, causal, mask, 16, 16)
    assert rel(out, out_ref) < 1e-10
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert rel(g, g_ref) < 1e-10, name


def test_flash_numpy_float32_is_float32_accurate():
    """In float32 (the kernel's precision) the model stays within 1e-4 of float64."""
    rng = np.random.default_rng(5)
    q, k, v, dout = make_inputs(rng, 2, 2, 130, 130, 64, scale=1.0)
    out_ref, _, p = reference_attention(q, k, v, True, None)
    grads_ref = reference_attention_backward(dout, q, k, v, p)
    q32, k32, v32, d32 = (x.astype(np.float32) for x in (q, k, v, dout))
    out, lse = flash_attention_forward_numpy(q32, k32, v32, True)
    grads = flash_attention_backward_numpy(d32, q32, k32, v32, out, lse, True)
    assert out.dtype == lse.dtype == np.float32
    assert rel(out, out_ref) < 1e-4
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.dtype == np.float32 and rel(g, g_ref) < 1e-4


# ----------------------------------------------------------------------------------------------
# 3. The CUDA source itself, run on the CPU
#
# The header below defines just enough of CUDA for attention.cu to compile as C++: threadIdx
# and blockIdx, one shared-memory array, __syncthreads as a barrier of the block's threads,
# __shfl_xor_sync as an exchange through a per-warp buffer between two barriers, atomicAdd as
# an atomic add. A launch runs the blocks one after another, each as blockDim.x OS threads.
# Shared memory starts as NaN, so a read of a value nobody wrote shows up in the results.

CUDA_ON_CPU_HEADER = r"""
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>
using std::max;
using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#define __CUDACC_RTC__ 1  // skip the nvcc-only explicit instantiations
struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __int_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline dim3 blockIdx, gridDim, blockDim;
inline thread_local dim3 threadIdx;
alignas(16) inline float smem[1 << 16];  // `extern __shared__ float smem[]` refers to this
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float warp_exchange[32][32];
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float x, int lane_mask) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    warp_exchange[warp][lane] = x;
    warp_barriers[warp]->arrive_and_wait();
    const float y = warp_exchange[warp][lane ^ lane_mask];
    warp_barriers[warp]->arrive_and_wait();
    return y;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
template <class Kernel> void launch(dim3 grid, dim3 block, Kernel kernel) {
    gridDim = grid;
    blockDim = block;
    const int n = block.x;
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = {bx, by, 1};
            std::fill(std::begin(smem), std::end(smem), std::nanf(""));
            block_barrier = std::make_unique<std::barrier<>>(n);
            warp_barriers.clear();
            for (int w = 0; w < (n + 31) / 32; ++w)
                warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32, n - 32 * w)));
            std::vector<std::thread> threads;
            for (int t = 0; t < n; ++t)
                threads.emplace_back([=] { threadIdx = {unsigned(t), 0, 0}; kernel(); });
            for (auto& thread : threads) thread.join();
        }
}
"""

CUDA_ON_CPU_MAIN = r"""
#include "cuda_on_cpu.h"
#include "attention.cu"

template <int D>
void run(const float* q, const float* k, const float* v, const float* dout,
         const unsigned char* mask, float* out, float* lse, float* delta, float* dq, float* dk,
         float* dv, int B, int H, int Tq, int Tk, int causal, float scale) {
    using C = FlashConfig<D>;  // the same grids and blocks tinylm/cuda.py launches
    launch({unsigned(B * H), unsigned((Tq + 63) / 64)}, {C::THREADS}, [=] {
        flash_forward_kernel<D>(q, k, v, mask, out, lse, H, Tq, Tk, causal, scale); });
    const long long rows = (long long)B * H * Tq;
    launch({unsigned((rows + 255) / 256)}, {256}, [=] {
        flash_backward_delta_kernel<D>(dout, out, delta, rows); });
    launch({unsigned(B * H), unsigned((Tk + 63) / 64)}, {C::THREADS}, [=] {
        flash_backward_kernel<D>(q, k, v, dout, lse, delta, mask, dq, dk, dv, H, Tq, Tk, causal,
                                 scale); });
}

extern "C" int attention(int D, const float* q, const float* k, const float* v,
                         const float* dout, const unsigned char* mask, float* out, float* lse,
                         float* delta, float* dq, float* dk, float* dv, int B, int H, int Tq,
                         int Tk, int causal, float scale) {
#define ARGS q, k, v, dout, mask, out, lse, delta, dq, dk, dv, B, H, Tq, Tk, causal, scale
    switch (D) {
        case 32: run<32>(ARGS); return 0;
        case 64: run<64>(ARGS); return 0;
        case 128: run<128>(ARGS); return 0;
    }
    return 1;
}

// The launch configuration tinylm/cuda.py computes on its own, to compare.
extern "C" int threads(int D) {
    return D == 32 ? FlashConfig<32>::THREADS : D == 64 ? FlashConfig<64>::THREADS
         : D == 96 ? FlashConfig<96>::THREADS : FlashConfig<128>::THREADS; }
extern "C" int forward_smem_bytes(int D) {
    return 4 * (D == 32 ? FlashConfig<32>::FORWARD_SMEM : D == 64 ? FlashConfig<64>::FORWARD_SMEM
              : D == 96 ? FlashConfig<96>::FORWARD_SMEM : FlashConfig<128>::FORWARD_SMEM); }
extern "C" int backward_smem_bytes(int D) {
    return 4 * (D == 32 ? FlashConfig<32>::BACKWARD_SMEM : D == 64 ? FlashConfig<64>::BACKWARD_SMEM
              : D == 96 ? FlashConfig<96>::BACKWARD_SMEM : FlashConfig<128>::BACKWARD_SMEM); }
"""


@pytest.fixture(scope="module")
def kernel_on_cpu(tmp_path_factory):
    """attention.cu compiled by g++ against CUDA_ON_CPU_HEADER, loaded with ctypes."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    build = tmp_path_factory.mktemp("cuda_on_cpu")
    (build / "cuda_on_cpu.h").write_text(CUDA_ON_CPU_HEADER)
    (build / "main.cpp").write_text(CUDA_ON_CPU_MAIN)
    library = build / "libattention.so"
    result = subprocess.run(
        [
            "g++",
            "-std=c++20",
            "-O1",
            "-fPIC",
            "-shared",
            "-pthread",
            "-Wno-unknown-pragmas",
            f"-I{KERNEL_DIR}",
            "-o",
            str(library),
            str(build / "main.cpp"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f"g++ could not compile attention.cu:\n{result.stderr}"
    lib = ctypes.CDLL(str(library))
    lib.attention.argtypes = (
        [ctypes.c_int] + [ctypes.c_void_p] * 11 + [ctypes.c_int] * 5 + [ctypes.c_float]
    )
    return lib


def run_kernel_on_cpu(lib, q, k, v, dout, causal, mask):
    """out, lse, dq, dk, dv from the CUDA kernels, given float64 arrays (run in float32)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    q, k, v, dout = (np.ascontiguousarray(x, dtype=np.float32) for x in (q, k, v, dout))
    out = np.full_like(q, np.nan)  # NaN: anything the kernels forget to write shows
    lse = np.full((B, H, Tq), np.nan, dtype=np.float32)
    delta = np.full((B, H, Tq), np.nan, dtype=np.float32)
    dq = np.zeros_like(q)  # the kernel adds into dq, as cuda.py's zeroed buffer
    dk, dv = np.full_like(k, np.nan), np.full_like(v, np.nan)
    mask_bytes = None if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)

    def ptr(a):
        return None if a is None else a.ctypes.data

    code = lib.attention(
        D,
        ptr(q),
        ptr(k),
        ptr(v),
        ptr(dout),
        ptr(mask_bytes),
        ptr(out),
        ptr(lse),
        ptr(delta),
        ptr(dq),
        ptr(dk),
        ptr(dv),
        B,
        H,
        Tq,
        Tk,
        int(causal),
        1.0 / math.sqrt(D),
    )
    assert code == 0
    return out, lse, dq, dk, dv


@pytest.mark.parametrize(
    "D, Tq, Tk, causal, masked",
    [
        (32, 17, 17, True, True),  # one partial tile; query 0 of batch 0 sees no key
        (64, 65, 65, True, True),  # one full tile and a 1-row tile
        (64, 130, 130, False, True),  # 3 x 3 tiles, no causal skipping
        (128, 65, 65, True, False),  # the 256-thread layout (2 rows per thread)
        (64, 5, 70, True, True),  # KV cache: 5 queries at positions 65..69
    ],
)
def test_cuda_kernel_source_on_cpu(kernel_on_cpu, D, Tq, Tk, causal, masked):
    rng = np.random.default_rng(D + Tq + Tk)
    B, H = 2, 1
    q, k, v, dout = make_inputs(rng, B, H, Tq, Tk, D, scale=1.0, dtype=np.float32)
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))  # exactly representable
    mask = make_padding_mask(rng, B, Tk) if masked else None

    out_ref, lse_ref, p = reference_attention(q, k, v, causal, mask)
    grads_ref = reference_attention_backward(dout, q, k, v, p)
    out, lse, dq, dk, dv = run_kernel_on_cpu(kernel_on_cpu, q, k, v, dout, causal, mask)

    assert rel(out, out_ref) < 1e-4
    empty = np.isneginf(lse_ref)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    assert rel(lse[~empty], lse_ref[~empty]) < 1e-4
    for name, g, g_ref in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_ref, strict=True):
        assert rel(g, g_ref) < 1e-4, name


def test_cuda_py_launch_numbers_match_the_kernel(kernel_on_cpu):
    """tinylm/cuda.py repeats threads and shared-memory sizes from FlashConfig; they agree."""
    for D in cuda.SUPPORTED_HEAD_SIZES:
        assert cuda._threads(D) == kernel_on_cpu.threads(D)
        assert cuda._forward_smem_bytes(D) == kernel_on_cpu.forward_smem_bytes(D)
        assert cuda._backward_smem_bytes(D) == kernel_on_cpu.backward_smem_bytes(D)


# ----------------------------------------------------------------------------------------------
# 4. tinylm.cuda without a GPU


def test_kernel_source_path_exists():
    path = cuda.kernel_source_path()
    assert path.name == "attention.cu" and path.is_file()
    assert "flash_forward_kernel" in path.read_text()


def test_cuda_refuses_numpy_input_clearly():
    q = np.zeros((1, 1, 4, 32), dtype=np.float32)
    assert cuda.kernel_supports(q, q, q, True, None) is False
    with pytest.raises(TypeError, match="q must be a CuPy array"):
        cuda.flash_attention_forward(q, q, q)
    with pytest.raises(TypeError, match="CuPy array"):
        cuda.flash_attention_backward(q, q, q, q, q, q[..., 0])
