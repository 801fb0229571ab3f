"""FlashAttention in NumPy: the tiled online-softmax algorithm of kernels/attention.cu.

The plain attention layer (``tinylm.layers.attention_forward``) builds the whole (T, T) score
matrix. This file computes the same out, and the same gradients, one (block_q, block_k) tile
of scores at a time, the way the CUDA kernel in ``kernels/attention.cu`` does: same tiles,
same loop order, same rescaling, same order of the backward steps. Where the GPU runs one
thread block per tile, this model runs one iteration of a Python loop, vectorised over batch
and heads. It is a model for reading and testing, not a fast path.

Legend: B batch, H heads, Tq query positions, Tk key positions, D head size.
    q (B,H,Tq,D), k and v (B,H,Tk,D), out (B,H,Tq,D), lse (B,H,Tq)
    key_padding_mask (B,Tk) bool, True = padded key that no query may attend to.
    Causal: query i sits at absolute position i + (Tk - Tq) and sees keys j <= i + (Tk - Tq).

The math (scale = 1/sqrt(D), masked scores are -inf):
    forward    S = scale * Q K^T,  P = softmax(S),  O = P V,  lse_i = log sum_j exp(S_ij)
    backward   P_ij = exp(S_ij - lse_i)            (recomputed from lse, never stored)
               dV = P^T dO,  dP = dO V^T,  Delta_i = rowsum(dO_i * O_i)
               dS_ij = P_ij (dP_ij - Delta_i),  dQ = scale * dS K,  dK = scale * dS^T Q

A query row with no allowed key (every key padded, or causal with nothing before it) gets
out = 0 and lse = -inf, and contributes nothing to any gradient.

Differences from the kernel that do not change the algorithm: the kernel uses base-2
exponentials (exp2 of scores pre-multiplied by log2(e), one hardware instruction) where this
file uses exp; it keeps each score tile transposed (keys as rows) in the backward; and it
accumulates in float32 where this file follows the dtype of its inputs (float64 in the tests,
so the model can be checked against the plain layer to 1e-10).
"""

from __future__ import annotations

import math

import numpy as np


def _tile_mask(q0, q1, k0, k1, Tq, Tk, causal, key_padding_mask):
    """Which scores of the tile (queries q0:q1, keys k0:k1) may be used; (B or 1, 1, bq, bk) bool.

    This is the kernel's key_bias (padding) combined with its causal test
    `key_index > query_index + (Tk - Tq)`.
    """
    allowed = np.ones((1, 1, q1 - q0, k1 - k0), dtype=bool)
    if causal:
        query_pos = np.arange(q0, q1)[:, None] + (Tk - Tq)  # absolute positions of the queries
        key_pos = np.arange(k0, k1)[None, :]
        allowed = allowed & (key_pos <= query_pos)[None, None]
    if key_padding_mask is not None:
        allowed = allowed & ~np.asarray(key_padding_mask, dtype=bool)[:, None, None, k0:k1]
    return allowed


def flash_attention_forward_numpy(
    q, k, v, causal=True, key_padding_mask=None, block_q=64, block_k=64
):
    """Attention forward by tiles with an online softmax, as kernels/attention.cu runs it.

    Inputs:
        q: (B, H, Tq, D); k, v: (B, H, Tk, D); float32 or float64.
        causal: mask keys after each query's absolute position.
        key_padding_mask: (B, Tk) bool, True = padded key, or None.
        block_q, block_k: queries per query tile and keys per key tile (the kernel: 64 and 64).
    Returns:
        out: (B, H, Tq, D) attention output.
        lse: (B, H, Tq) log-sum-exp of each query's (masked, scaled) scores; -inf for a query
            with no allowed key. The backward recomputes probabilities from it.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D)  # a Python float: float32 inputs stay float32
    out = np.zeros_like(q)
    lse = np.full((B, H, Tq), -np.inf, dtype=q.dtype)

    # One GPU thread block per (b, h, query tile): here one iteration, all (b, h) at once.
    for q0 in range(0, Tq, block_q):
        q1 = min(q0 + block_q, Tq)
        q_tile = q[:, :, q0:q1]  # (B, H, bq, D), the kernel's Qs in shared memory

        # Running statistics of each query row, the kernel keeps them in registers:
        m = np.full((B, H, q1 - q0), -np.inf, dtype=q.dtype)  # max score seen so far
        l = np.zeros((B, H, q1 - q0), dtype=q.dtype)  # sum of exp(score - m) so far
        acc = np.zeros((B, H, q1 - q0, D), dtype=q.dtype)  # sum of exp(score - m) * v so far

        # Causal: the tile's last query sees keys up to its absolute position, no further.
        kv_end = min(Tk, q1 - 1 + (Tk - Tq) + 1) if causal else Tk
        for k0 in range(0, kv_end, block_k):
            k1 = min(k0 + block_k, Tk)
            s = (q_tile @ k[:, :, k0:k1].swapaxes(-1, -2)) * scale  # (B, H, bq, bk)
            allowed = _tile_mask(q0, q1, k0, k1, Tq, Tk, causal, key_padding_mask)
            s = np.where(allowed, s, -np.inf)

            # The online softmax. The new max may be larger than the old one; everything
            # accumulated so far was exp(score - m_old), so multiply it by
            # alpha = exp(m_old - m_new) to make it exp(score - m_new).
            m_new = np.maximum(m, s.max(axis=-1))
            # m_use: a row that has seen only masked keys has max -inf; subtracting 0 instead
            # keeps exp(-inf - 0) = 0 rather than exp(-inf - -inf) = nan. (Same rule on GPU.)
            m_use = np.where(m_new == -np.inf, 0.0, m_new)
            alpha = np.exp(m - m_use)  # (B, H, bq); exp(-inf) = 0 on the first tile
            p = np.exp(s - m_use[..., None])  # (B, H, bq, bk), unnormalised probabilities
            l = alpha * l + p.sum(axis=-1)
            acc = alpha[..., None] * acc + p @ v[:, :, k0:k1]  # the rescale, then P V
            m = m_new

        # Normalise once at the end: out = acc / l. A row with no allowed key has l = 0.
        has_key = l > 0
        safe_l = np.where(has_key, l, 1.0)
        out[:, :, q0:q1] = np.where(has_key[..., None], acc / safe_l[..., None], 0.0)
        lse[:, :, q0:q1] = np.where(has_key, m + np.log(safe_l), -np.inf)
    return out, lse


def flash_attention_backward_numpy(
    dout, q, k, v, out, lse, causal=True, key_padding_mask=None, block_q=64, block_k=64
):
    """Attention backward by tiles from the saved lse, as kernels/attention.cu runs it.

    Forward was O = softmax(scale * Q K^T + mask) V, with lse = rowwise log-sum-exp of the scores.
    So, recomputing P_ij = exp(S_ij - lse_i) tile by tile:
        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q
    with Delta_i = rowsum(dO_i * O_i) (= sum_j P_ij dP_ij, since O = P V).

    Inputs:
        dout: (B, H, Tq, D) gradient of the loss with respect to out.
        q, k, v, causal, key_padding_mask: as given to the forward.
        out, lse: what the forward returned.
        block_q, block_k: tile sizes (the kernel: 64 and 64).
    Returns:
        dq: (B, H, Tq, D), dk and dv: (B, H, Tk, D).
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D)  # a Python float: float32 inputs stay float32

    # Step 1 (flash_backward_delta_kernel): one number per query row.
    delta = (dout * out).sum(axis=-1)  # (B, H, Tq)
    # A row with lse = -inf has only -inf scores; subtract 0 instead so P = exp(-inf) = 0.
    lse_use = np.where(lse == -np.inf, 0.0, lse)

    dq = np.zeros_like(q)  # on the GPU: zeroed float32, added to with atomicAdd
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)

    # Step 2 (flash_backward_kernel): one thread block per (b, h, key tile). It keeps its K, V
    # and its dK, dV accumulators, and walks every query tile that can see its keys.
    for k0 in range(0, Tk, block_k):
        k1 = min(k0 + block_k, Tk)
        k_tile, v_tile = k[:, :, k0:k1], v[:, :, k0:k1]  # (B, H, bk, D)
        dk_acc = np.zeros_like(k_tile)
        dv_acc = np.zeros_like(v_tile)

        # Causal: key k0 is first seen by query k0 - (Tk - Tq); start at the tile holding it.
        q_begin = 0
        if causal and k0 - (Tk - Tq) > 0:
            q_begin = (k0 - (Tk - Tq)) // block_q * block_q
        for q0 in range(q_begin, Tq, block_q):
            q1 = min(q0 + block_q, Tq)
            q_tile, do_tile = q[:, :, q0:q1], dout[:, :, q0:q1]  # (B, H, bq, D)

            # 1. recompute the probabilities of this tile from the saved lse
            s = (q_tile @ k_tile.swapaxes(-1, -2)) * scale  # (B, H, bq, bk)
            allowed = _tile_mask(q0, q1, k0, k1, Tq, Tk, causal, key_padding_mask)
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - lse_use[:, :, q0:q1, None])  # P_ij = exp(S_ij - lse_i)
            # 2. dP = dO V^T
            dp = do_tile @ v_tile.swapaxes(-1, -2)  # (B, H, bq, bk)
            # 3. dS = P (dP - Delta), with the scale of S = scale * Q K^T folded in
            ds = p * (dp - delta[:, :, q0:q1, None]) * scale
            # 4. dV += P^T dO
            dv_acc += p.swapaxes(-1, -2) @ do_tile
            # 5. dK += scale dS^T Q
            dk_acc += ds.swapaxes(-1, -2) @ q_tile
            # 6. dQ += scale dS K; other key tiles add to the same rows (atomicAdd on the GPU)
            dq[:, :, q0:q1] += ds @ k_tile

        dk[:, :, k0:k1] = dk_acc
        dv[:, :, k0:k1] = dv_acc
    return dq, dk, dv
