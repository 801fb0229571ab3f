"""Fused FlashAttention on the GPU: the Python side of kernels/attention.cu.

On the GPU the model calls ``cuda.attention_forward`` / ``cuda.attention_backward`` in place of
the layer pair ``layers.attention_forward`` / ``layers.attention_backward``: the same signatures,
the same results, but without building the (T, T) score matrix. Where the kernel does not apply
(float64, a head size it was not built for, NumPy input) they call the layer itself. Underneath:

    out, lse = cuda.flash_attention_forward(q, k, v, causal, key_padding_mask)
    dq, dk, dv = cuda.flash_attention_backward(dout, q, k, v, out, lse, causal, key_padding_mask)

Legend: B batch, H heads, Tq query positions, Tk key positions, D head size.
    q (B,H,Tq,D), k and v (B,H,Tk,D), out (B,H,Tq,D), lse (B,H,Tq), all float32 CuPy arrays;
    key_padding_mask (B,Tk) bool, True = padded key nobody may attend to, or None.
    Causal: query i sits at absolute position i + (Tk - Tq) and sees keys j <= i + (Tk - Tq).

The CUDA source is compiled with NVRTC through ``cupy.RawModule`` the first time a head size is
used, once per process and device (CuPy also keeps the binary on disk, in ~/.cupy/kernel_cache).
CuPy is imported only inside functions, so ``import tinylm.cuda`` works without it.

What each kernel does, and the tiles, threads and shared memory it uses, is explained at the top
of kernels/attention.cu; tinylm/flash.py is the same algorithm in NumPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm import layers
from tinylm.backend import is_cupy_array

SUPPORTED_HEAD_SIZES = (32, 64, 96, 128)  # the D the kernels are instantiated for
TILE = 64  # queries per query tile = keys per key tile (TILE in attention.cu)
_KERNEL_FILE = "attention.cu"

# Compiled kernels, one triple (forward, delta, backward) per (device id, head size).
_kernels: dict[tuple[int, int], tuple] = {}
# Largest dynamic shared memory a block may opt into, per device id.
_smem_limit: dict[int, int] = {}


# ------------------------------------------------------------------------------ the source


def kernel_source_path() -> Path:
    """Where kernels/attention.cu is: tinylm/kernels/ in an installed wheel, kernels/ beside
    tinylm/ in a checkout (an editable install reads it there too)."""
    package_dir = Path(__file__).resolve().parent
    installed = package_dir / "kernels" / _KERNEL_FILE
    return installed if installed.is_file() else package_dir.parent / "kernels" / _KERNEL_FILE


def _threads(head_size: int) -> int:
    """Threads per block: 128 for D <= 64, 256 above (FlashConfig<D>::THREADS)."""
    return 128 if head_size <= 64 else 256


def _forward_smem_bytes(head_size: int) -> int:
    """Dynamic shared memory of the forward kernel: Q, K, V tiles, the P tile, the key bias.

    Must equal FlashConfig<D>::FORWARD_SMEM floats in attention.cu.
    """
    tile_stride, score_stride = head_size + 4, TILE + 8  # padded rows (no bank conflicts)
    return 4 * (3 * TILE * tile_stride + TILE * score_stride + TILE)


def _backward_smem_bytes(head_size: int) -> int:
    """Dynamic shared memory of the backward kernel: K, V, Q, dO tiles, the P/dS tile, and the
    key bias, L and Delta vectors. Must equal FlashConfig<D>::BACKWARD_SMEM floats.
    """
    tile_stride, score_stride = head_size + 4, TILE + 8
    return 4 * (4 * TILE * tile_stride + TILE * score_stride + 3 * TILE)


def _device_smem_limit() -> int:
    """The most dynamic shared memory one block can opt into on the current device."""
    import cupy

    device = cupy.cuda.Device().id
    if device not in _smem_limit:
        props = cupy.cuda.runtime.getDeviceProperties(device)
        _smem_limit[device] = int(props.get("sharedMemPerBlockOptin", props["sharedMemPerBlock"]))
    return _smem_limit[device]


def _get_kernels(head_size: int):
    """The three kernels for head size D on the current device, compiled on first use."""
    import cupy

    key = (cupy.cuda.Device().id, head_size)
    if key not in _kernels:
        names = (
            f"flash_forward_kernel<{head_size}>",
            f"flash_backward_delta_kernel<{head_size}>",
            f"flash_backward_kernel<{head_size}>",
        )
        module = cupy.RawModule(
            code=kernel_source_path().read_text(),
            options=("-std=c++17",),
            name_expressions=names,
        )
        forward, delta, backward = (module.get_function(name) for name in names)
        # Above 48 KB of dynamic shared memory a kernel must opt in explicitly.
        forward.max_dynamic_shared_size_bytes = _forward_smem_bytes(head_size)
        backward.max_dynamic_shared_size_bytes = _backward_smem_bytes(head_size)
        _kernels[key] = (forward, delta, backward)
    return _kernels[key]


# ------------------------------------------------------------------------------ input checks


def kernel_supports(q, k, v, causal=True, key_padding_mask=None) -> bool:
    """True when the fused kernel can compute this attention; False (never an error) otherwise.

    Supported: float32 CuPy arrays q (B,H,Tq,D), k and v (B,H,Tk,D) with D in
    SUPPORTED_HEAD_SIZES, any Tq and Tk >= 1, causal or not, key_padding_mask None or a (B,Tk)
    bool CuPy array, and a GPU with enough shared memory per block. Everything else (float64,
    NumPy arrays, D = 16, ...) should take the reference path.
    """
    try:
        _check_attention_inputs(q, k, v, key_padding_mask)
    except (TypeError, ValueError):
        return False
    return _backward_smem_bytes(q.shape[3]) <= _device_smem_limit()


def _check_array(name, x, ndim, shape_text):
    """A float32 CuPy array with ndim dimensions, or a TypeError / ValueError saying what came."""
    if not is_cupy_array(x):
        raise TypeError(
            f"{name} must be a CuPy array (the kernel runs on the GPU), got "
            f"{type(x).__module__}.{type(x).__name__}"
        )
    if x.dtype != np.float32:
        raise TypeError(
            f"{name} must be float32 (the kernel computes in float32; use the "
            f"reference attention for other dtypes), got {x.dtype}"
        )
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_text}, got shape {tuple(x.shape)}")


def _check_attention_inputs(q, k, v, key_padding_mask):
    """Check q, k, v and the mask agree with each other and with what the kernel supports."""
    _check_array("q", q, 4, "(B, H, Tq, D)")
    _check_array("k", k, 4, "(B, H, Tk, D)")
    _check_array("v", v, 4, "(B, H, Tk, D)")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if D not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"head size D = q.shape[3] must be one of {SUPPORTED_HEAD_SIZES}, got {D}")
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(
            f"k must have shape (B, H, Tk, D) = ({B}, {H}, Tk, {D}) to match q "
            f"{tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if Tq < 1 or Tk < 1:
        raise ValueError(f"need at least one query and one key, got Tq = {Tq}, Tk = {Tk}")
    if key_padding_mask is not None:
        if not is_cupy_array(key_padding_mask) or key_padding_mask.dtype != np.bool_:
            raise TypeError(
                f"key_padding_mask must be a bool CuPy array of shape (B, Tk) or "
                f"None, got {type(key_padding_mask).__name__} of dtype "
                f"{getattr(key_padding_mask, 'dtype', None)}"
            )
        if key_padding_mask.shape != (B, Tk):
            raise ValueError(
                f"key_padding_mask must have shape (B, Tk) = ({B}, {Tk}), got "
                f"{tuple(key_padding_mask.shape)}"
            )


def _mask_argument(key_padding_mask):
    """The kernel's `const unsigned char*` mask: the bool array's bytes, or a null pointer."""
    if key_padding_mask is None:
        return np.uint64(0)  # a null pointer, passed by value as 8 zero bytes
    import cupy

    return cupy.ascontiguousarray(key_padding_mask).view(cupy.uint8)


def _check_shared_memory(head_size):
    needed = _backward_smem_bytes(head_size)
    limit = _device_smem_limit()
    if needed > limit:
        raise ValueError(
            f"head size {head_size} needs {needed} bytes of shared memory per "
            f"block, this GPU allows {limit}; use the reference attention"
        )


# ------------------------------------------------------------------------------ forward


def flash_attention_forward(q, k, v, causal=True, key_padding_mask=None):
    """out = softmax(q k^T / sqrt(D) + mask) v, fused, without a (T, T) matrix.

    Inputs:
        q: (B, H, Tq, D), k and v: (B, H, Tk, D), float32 CuPy arrays, D in
            SUPPORTED_HEAD_SIZES. Non-contiguous inputs are copied to contiguous ones.
        causal: query i sees keys j <= i + (Tk - Tq).
        key_padding_mask: (B, Tk) bool CuPy array, True = padded key, or None.
    Returns:
        out: (B, H, Tq, D) float32; 0 for a query with no allowed key.
        lse: (B, H, Tq) float32 log-sum-exp of each query's scaled, masked scores (-inf for a
            query with no allowed key); the backward needs it.
    Raises TypeError for a wrong array type or dtype, ValueError for a wrong shape or an
    unsupported head size.
    """
    _check_attention_inputs(q, k, v, key_padding_mask)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    _check_shared_memory(D)

    import cupy

    q, k, v = (cupy.ascontiguousarray(x) for x in (q, k, v))

    forward, _, _ = _get_kernels(D)
    out = cupy.empty_like(q)
    lse = cupy.empty((B, H, Tq), dtype=cupy.float32)
    grid = (B * H, math.ceil(Tq / TILE))  # one block per (b, h, query tile)
    forward(
        grid,
        (_threads(D),),
        (
            q,
            k,
            v,
            _mask_argument(key_padding_mask),
            out,
            lse,
            np.int32(H),
            np.int32(Tq),
            np.int32(Tk),
            np.int32(bool(causal)),
            np.float32(1.0 / math.sqrt(D)),
        ),
        shared_mem=_forward_smem_bytes(D),
    )
    return out, lse


# ------------------------------------------------------------------------------ backward


def flash_attention_backward(dout, q, k, v, out, lse, causal=True, key_padding_mask=None):
    """Gradients of the fused attention, recomputing the probabilities from lse.

    Forward was out = P v with P = softmax(q k^T / sqrt(D) + mask) and lse = log-sum-exp of
    each row of scores, so P_ij = exp(S_ij - lse_i) and
        dv = P^T dout,  dP = dout v^T,  dS = P (dP - rowsum(dout * out)),
        dq = dS k / sqrt(D),  dk = dS^T q / sqrt(D).
    Inputs:
        dout: (B, H, Tq, D) gradient of the loss with respect to out.
        q, k, v, causal, key_padding_mask: as given to flash_attention_forward.
        out, lse: what flash_attention_forward returned.
    Returns:
        dq: (B, H, Tq, D), dk and dv: (B, H, Tk, D), float32 CuPy arrays. dq is summed with
        float32 atomics, so its last bits can vary from run to run.
    """
    _check_attention_inputs(q, k, v, key_padding_mask)
    _check_array("dout", dout, 4, "(B, H, Tq, D)")
    _check_array("out", out, 4, "(B, H, Tq, D)")
    _check_array("lse", lse, 3, "(B, H, Tq)")
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    for name, x in (("dout", dout), ("out", out)):
        if x.shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}"
            )
    if lse.shape != (B, H, Tq):
        raise ValueError(
            f"lse must have shape (B, H, Tq) = ({B}, {H}, {Tq}), got {tuple(lse.shape)}"
        )
    _check_shared_memory(D)

    import cupy

    dout, q, k, v, out, lse = (cupy.ascontiguousarray(x) for x in (dout, q, k, v, out, lse))

    _, delta_kernel, backward = _get_kernels(D)

    # Step 1: Delta_i = rowsum(dout_i * out_i), one thread per query row.
    n_rows = B * H * Tq
    delta = cupy.empty((B, H, Tq), dtype=cupy.float32)
    delta_kernel((math.ceil(n_rows / 256),), (256,), (dout, out, delta, np.int64(n_rows)))

    # Step 2: one block per (b, h, key tile) writes dk, dv and adds its part of dq atomically.
    dq = cupy.zeros_like(q)  # must start at zero: the kernel only adds to it
    dk = cupy.empty_like(k)
    dv = cupy.empty_like(v)
    grid = (B * H, math.ceil(Tk / TILE))
    backward(
        grid,
        (_threads(D),),
        (
            q,
            k,
            v,
            dout,
            lse,
            delta,
            _mask_argument(key_padding_mask),
            dq,
            dk,
            dv,
            np.int32(H),
            np.int32(Tq),
            np.int32(Tk),
            np.int32(bool(causal)),
            np.float32(1.0 / math.sqrt(D)),
        ),
        shared_mem=_backward_smem_bytes(D),
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------ the layer pair


@dataclass
class KernelCache:
    """What attention_backward needs from a kernel forward: the contiguous inputs, out and lse."""

    q: object
    k: object
    v: object
    out: object
    lse: object
    causal: bool
    key_padding_mask: object


def attention_forward(q, k, v, causal=True, key_padding_mask=None):
    """layers.attention_forward on the GPU: the fused kernel where it applies, else the layer.

    Same inputs and outputs as layers.attention_forward; the cache is a KernelCache when the
    kernel ran (then no (Tq, Tk) matrix was built), else the layer's own cache.
    """
    if not kernel_supports(q, k, v, causal, key_padding_mask):
        return layers.attention_forward(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    import cupy

    # The kernel reads contiguous (B, H, T, D) arrays; copy once here and keep the copies, so
    # the backward does not copy again.
    q, k, v = (cupy.ascontiguousarray(a) for a in (q, k, v))
    out, lse = flash_attention_forward(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    return out, KernelCache(q, k, v, out, lse, causal, key_padding_mask)


def attention_backward(dout, cache):
    """layers.attention_backward on the GPU: (dq, dk, dv) from whichever forward made ``cache``."""
    if not isinstance(cache, KernelCache):
        return layers.attention_backward(dout, cache)
    c = cache
    return flash_attention_backward(
        dout, c.q, c.k, c.v, c.out, c.lse, causal=c.causal, key_padding_mask=c.key_padding_mask
    )
