"""The layers of a GPT, each a pair of functions: a forward pass and its hand-written backward.

The convention is CS231n's:

    out, cache = x_forward(inputs...)        # cache holds what the backward needs
    dinputs... = x_backward(dout, cache)     # gradients of the inputs, in input order

where ``dout`` is dL/dout, the gradient of the final scalar loss L with respect to
this layer's output, and each returned gradient has the shape of its input.
Every backward quotes the forward formula it differentiates and the result.

Shape legend (used in every comment):
    B batch, T time (sequence length), C channels (n_embd), V vocabulary,
    H heads, D head size (C = H * D), R rows: any leading axes flattened into one (R = B*T in
    the model), N the number of counted (not ignored) positions in the mean of the loss.
The symbols are those of docs/math.md, whose table lists them all: y the target id, S the
scores, P the attention probabilities, mu and rstd layer norm's mean and 1/std.

Every function is written against an array module ``xp`` taken from its inputs,
so the same lines run on NumPy (CPU) and CuPy (GPU); see tinylm/backend.py.
Constants are Python floats, so float32 inputs stay float32 (NumPy 2 would
promote a float32 array times a float64 *NumPy* scalar to float64).
"""

from __future__ import annotations

import math

import numpy as np

from tinylm.backend import get_array_module

FLOAT_DTYPES = (np.float32, np.float64)


# ---------------------------------------------------------------------------
# Input checks: every public function names the argument, what it expected and what came.
# ---------------------------------------------------------------------------


def _check_float_array(name, x):
    if not hasattr(x, "dtype") or x.dtype not in FLOAT_DTYPES:
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"{name} must be a float32 or float64 array, got {got}")


def _check_int_array(name, x):
    if not hasattr(x, "dtype") or x.dtype.kind not in "iu":
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"{name} must be an integer array of token ids, got {got}")


def _check_ndim(name, x, ndim, shape_text):
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_text}, got shape {tuple(x.shape)}")


# ---------------------------------------------------------------------------
# Embedding: a table lookup.
# ---------------------------------------------------------------------------


def embedding_forward(idx, W):
    """Look up one row of W per token id.

    Inputs:  idx integer (B, T) (any integer shape works), W (V, C).
    Returns: out (B, T, C) with out[b, t] = W[idx[b, t]], and the cache.

    The lookup is the same as one_hot(idx) @ W, without building the one-hot matrix.
    """
    _check_int_array("idx", idx)
    _check_float_array("W", W)
    _check_ndim("W", W, 2, "(V, C)")
    xp = get_array_module(idx, W)
    V = W.shape[0]
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"idx: token ids must be in [0, {V}) for a vocabulary of {V}, got {bad}"
            )
    out = xp.take(W, idx, axis=0)  # (B, T, C)
    cache = (idx, W.shape, W.dtype)
    return out, cache


def embedding_backward(dout, cache):
    """Gradient of the lookup with respect to the table.

    Forward:  out[b, t, :] = W[idx[b, t], :]   (= one_hot(idx) @ W)
    Backward: dW[v, :] = sum over (b, t) with idx[b, t] = v of dout[b, t, :]
              (= one_hot(idx)^T @ dout): a scatter-add, so repeated ids accumulate.
    Returns dW (V, C). There is no gradient for the integer ids.
    """
    idx, W_shape, W_dtype = cache
    xp = get_array_module(dout, idx)
    C = W_shape[1]
    dW = xp.zeros(W_shape, dtype=W_dtype)
    # add.at adds once per occurrence; plain dW[idx] += dout would keep only the last write.
    xp.add.at(dW, idx.reshape(-1), dout.reshape(-1, C))
    return dW


def sinusoidal_positions(T, C, dtype=np.float64):
    """The fixed positional encoding of "Attention Is All You Need" as a NumPy array (T, C).

        PE[pos, 2i]   = sin(pos / 10000^(2i / C))
        PE[pos, 2i+1] = cos(pos / 10000^(2i / C))

    Each pair of channels is a clock of its own wavelength, from 2*pi up to nearly 10000*2*pi.
    It has no parameters, so it has no backward. An odd C drops the last cosine.
    """
    if int(T) != T or T < 1 or int(C) != C or C < 1:
        raise ValueError(f"sinusoidal_positions needs positive integers T and C, got T={T}, C={C}")
    pos = np.arange(T, dtype=np.float64)[:, None]  # (T, 1)
    two_i = np.arange(0, C, 2, dtype=np.float64)[None, :]  # (1, ceil(C/2))
    angle = pos / 10000.0 ** (two_i / C)  # (T, ceil(C/2))
    pe = np.zeros((T, C), dtype=np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : C // 2])
    return pe.astype(dtype)


# ---------------------------------------------------------------------------
# Linear (affine) layer.
# ---------------------------------------------------------------------------


def linear_forward(x, W, b=None):
    """out = x @ W + b.

    Inputs:  x (..., Cin), W (Cin, Cout) (the layout of GPT-2's checkpoints), b (Cout,) or None.
    Returns: out (..., Cout), and the cache (x, W, has_bias).
    """
    _check_float_array("x", x)
    _check_float_array("W", W)
    _check_ndim("W", W, 2, "(Cin, Cout)")
    if x.ndim < 1 or x.shape[-1] != W.shape[0]:
        raise ValueError(
            f"x: last dimension must equal W's first (Cin = {W.shape[0]}), "
            f"got x of shape {tuple(x.shape)}"
        )
    # One (R, Cin) @ (Cin, Cout) product over all leading positions: a single large matrix
    # multiply is much faster than a batch of small ones.
    out = (x.reshape(-1, W.shape[0]) @ W).reshape(*x.shape[:-1], W.shape[1])  # (..., Cout)
    if b is not None:
        _check_float_array("b", b)
        if b.shape != (W.shape[1],):
            raise ValueError(f"b must have shape ({W.shape[1]},), got {tuple(b.shape)}")
        out += b
    return out, (x, W, b is not None)


def linear_backward(dout, cache):
    """Gradients of out = x @ W + b.

    Forward:  out[r, j] = sum_i x[r, i] W[i, j] + b[j]      (r runs over all R leading rows)
    Backward: dx = dout @ W^T                  (..., Cout) @ (Cout, Cin) -> (..., Cin)
              dW = x^T @ dout, summed over r   (Cin, R) @ (R, Cout)     -> (Cin, Cout)
              db = sum_r dout[r, :]                                     -> (Cout,)
    Returns (dx, dW, db); db is None when the forward had no bias.
    """
    x, W, has_bias = cache
    Cin, Cout = W.shape
    dout2 = dout.reshape(-1, Cout)  # (R, Cout)
    x2 = x.reshape(-1, Cin)  # (R, Cin)
    dx = (dout2 @ W.T).reshape(x.shape)  # (R, Cout) @ (Cout, Cin) -> (R, Cin) -> (..., Cin)
    dW = x2.T @ dout2  # (Cin, R) @ (R, Cout) -> (Cin, Cout)
    db = _sum_over_rows(dout2) if has_bias else None  # (Cout,)
    return dx, dW, db


# ---------------------------------------------------------------------------
# Layer normalisation over the last axis.
# ---------------------------------------------------------------------------


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Normalise each position over its C channels, then scale and shift.

        mu   = mean_c x                       (..., 1)
        rstd = 1 / sqrt(mean_c (x - mu)^2 + eps)
        xhat = (x - mu) * rstd
        out  = gamma * xhat + beta            gamma, beta (C,)

    The cache keeps x, gamma, mu and rstd, which is all the backward needs (xhat is
    recomputed there from them, as llm.c does, instead of storing a second (..., C) tensor).
    """
    _check_float_array("x", x)
    _check_float_array("gamma", gamma)
    _check_float_array("beta", beta)
    if x.ndim < 1:
        raise ValueError(f"x must have at least one axis (..., C), got shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    eps = float(eps)
    C = x.shape[-1]
    if gamma.shape != (C,) or beta.shape != (C,):
        raise ValueError(
            f"gamma and beta must have shape ({C},) to match x's last dimension, "
            f"got {tuple(gamma.shape)} and {tuple(beta.shape)}"
        )
    xp = get_array_module(x)
    # The two means over c: _sum_along is x @ ones (one BLAS matrix-vector product), _rowdot
    # an einsum (one pass, no (..., C) temporary); both beat NumPy's mean over short rows.
    mu = _sum_along(x, -1) / C  # (..., 1), mean_c x
    xc = x - mu  # (..., C)
    var = _rowdot(xc, xc, -1) / C  # (..., 1), mean_c (x - mu)^2, the biased variance
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    out = xc  # out = gamma * xc * rstd + beta, built in xc's buffer (one (..., C) array, not three)
    out *= rstd
    out *= gamma
    out += beta  # (..., C)
    return out, (x, gamma, mu, rstd)


def layernorm_backward(dout, cache):
    """Gradients of out = gamma * xhat + beta with xhat = (x - mu) * rstd.

    Forward:  out = gamma * xhat + beta
    Backward: dbeta  = sum over positions of dout                        (C,)
              dgamma = sum over positions of dout * xhat                 (C,)
              dxhat  = dout * gamma                                      (..., C)
              dx     = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat))
    The last line is the chain rule through mu and rstd, which depend on every channel:
    the first term is the direct path, the second removes the part that moved the mean,
    the third the part that changed the variance (derivation in docs/math.md).
    """
    x, gamma, mu, rstd = cache
    xp = get_array_module(x)
    C = x.shape[-1]
    xhat = x - mu
    xhat *= rstd  # (..., C)
    dbeta = _sum_over_rows(dout.reshape(-1, C))  # (C,)
    # sum over positions of dout * xhat, as one einsum: no (..., C) product array is made
    dgamma = xp.einsum("rc,rc->c", dout.reshape(-1, C), xhat.reshape(-1, C))  # (C,)
    dxhat = dout * gamma  # (..., C)
    mean_dxhat = _sum_along(dxhat, -1) / C  # (..., 1)
    mean_dxhat_xhat = _rowdot(dxhat, xhat, -1) / C  # (..., 1)
    # dx = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat)), term by term in
    # dxhat's buffer: every (..., C) temporary NumPy allocates is a pass over memory of its own.
    dx = dxhat
    dx -= mean_dxhat
    xhat *= mean_dxhat_xhat  # xhat's buffer now holds xhat * mean_c(dxhat * xhat)
    dx -= xhat
    dx *= rstd
    return dx, dgamma, dbeta


# ---------------------------------------------------------------------------
# Nonlinearities.
# ---------------------------------------------------------------------------

_GELU_K = math.sqrt(2.0 / math.pi)  # a Python float, so float32 stays float32
_GELU_A = 0.044715


def gelu_forward(x):
    """GELU, the tanh approximation that GPT-2 uses.

        u   = sqrt(2/pi) * (x + 0.044715 x^3)
        out = 0.5 x (1 + tanh(u))
    The cache holds x and tanh(u), both needed by the derivative.

    GELU runs on the widest activation, (B, T, 4C), a few MB, so the formula is computed one
    block of rows at a time (_row_blocks): each of its passes then reads a block that is still
    in the core's cache from the pass before, instead of streaming the whole array from memory.
    """
    _check_float_array("x", x)
    xp = get_array_module(x)
    out, tanh_u = xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype)  # C order, as _rows needs
    x2, out2, tanh_u2 = _rows(x), _rows(out), _rows(tanh_u)  # (R, C) views (x2 may be a copy)
    for rows in _row_blocks(x2):
        _gelu_forward_block(x2[rows], out2[rows], tanh_u2[rows])
    return out, (x, tanh_u)


def _gelu_forward_block(x, out, tanh_u):
    """gelu_forward's formula on one block, written into out and tanh_u (in-place steps: NumPy
    would make a new array for every operator otherwise)."""
    xp = get_array_module(x)
    xp.multiply(x, x, out=tanh_u)
    tanh_u *= _GELU_K * _GELU_A
    tanh_u += _GELU_K
    tanh_u *= x  # u = x (sqrt(2/pi) + sqrt(2/pi) 0.044715 x^2) = sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(tanh_u, out=tanh_u)  # tanh(u)
    xp.add(tanh_u, 1.0, out=out)
    out *= x
    out *= 0.5  # 0.5 x (1 + tanh(u))


def gelu_backward(dout, cache):
    """Gradient of out = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).

    By the product rule, with d tanh(u)/du = 1 - tanh(u)^2
    and du/dx = sqrt(2/pi) (1 + 3*0.044715 x^2):
        dout/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3*0.044715 x^2)
        dx = dout * dout/dx
    Computed a block of rows at a time, as the forward is.
    """
    x, tanh_u = cache
    xp = get_array_module(x)
    dx = xp.empty(x.shape, x.dtype)
    dout = xp.broadcast_to(xp.asarray(dout), x.shape)  # (a dout that broadcasts is fine too)
    dout2, x2, tanh_u2, dx2 = _rows(dout), _rows(x), _rows(tanh_u), _rows(dx)
    for rows in _row_blocks(x2):
        _gelu_backward_block(dout2[rows], x2[rows], tanh_u2[rows], dx2[rows])
    return dx


def _gelu_backward_block(dout, x, tanh_u, dx):
    """gelu_backward's formula on one block, written into dx."""
    xp = get_array_module(x)
    local = dx  # dout/dx is built in dx's buffer, then multiplied by dout
    xp.multiply(x, x, out=local)
    local *= _GELU_K * 3.0 * _GELU_A
    local += _GELU_K  # du/dx = sqrt(2/pi) + sqrt(2/pi) 3*0.044715 x^2
    sech2 = tanh_u * tanh_u
    xp.subtract(1.0, sech2, out=sech2)  # 1 - tanh(u)^2
    sech2 *= x
    local *= sech2  # x (1 - tanh(u)^2) du/dx
    local += tanh_u
    local += 1.0
    local *= 0.5  # 0.5 (1 + tanh u) + 0.5 x (1 - tanh(u)^2) du/dx = dout/dx
    local *= dout  # dx = dout * dout/dx


# Per array: a block's three or four arrays fit a 2 MB L2 cache. Measured (benchmarks/results):
# 4-5% off a training step; 128 KB blocks slowed the two-thread step (four times the NumPy calls).
_BLOCK_BYTES = 512 * 1024


def _rows(a):
    """a as an (R, C) array of rows, C its last axis: a view when a is C-contiguous (as the
    outputs made above are), else a copy (fine for an input, which is only read)."""
    C = a.shape[-1] if a.ndim and a.shape[-1] else 1
    return a.reshape(a.size // C, C)


def _row_blocks(x2):
    """Slices that cut the rows of x2 (R, C) into blocks of about _BLOCK_BYTES each.

    An element-wise formula of k operators makes k passes over its arrays. On a whole (B, T, 4C)
    activation each pass streams megabytes from main memory; on a block, every pass after the
    first finds it in the cache (cache blocking, as a BLAS does for a matrix product). On a GPU
    there is no such cache to fit and each pass is a kernel launch, so there it is one block.
    """
    R, C = x2.shape
    if not isinstance(x2, np.ndarray):
        return [slice(None)]
    rows = max(1, _BLOCK_BYTES // max(1, C * x2.itemsize))
    return [slice(i, i + rows) for i in range(0, R, rows)] or [slice(None)]


def relu_forward(x):
    """out = max(x, 0). The cache keeps the mask x > 0."""
    _check_float_array("x", x)
    mask = x > 0
    return x * mask, mask


def relu_backward(dout, cache):
    """Forward out = max(x, 0), so dx = dout where x > 0 and 0 elsewhere (0 at x = 0 by choice)."""
    return dout * cache


# ---------------------------------------------------------------------------
# Softmax.
# ---------------------------------------------------------------------------


def softmax_forward(x, axis=-1):
    """Numerically stable softmax along one axis.

        out_i = exp(x_i - m) / sum_j exp(x_j - m),  m = max_j x_j

    Subtracting the max changes nothing mathematically (it cancels) but keeps exp from
    overflowing. A row that is entirely -inf (every position masked) gives zeros, not NaN:
    its max is replaced by 0, so every exp is exp(-inf) = 0 and the row sum is 0.
    """
    _check_float_array("x", x)
    probs = _softmax(x, axis, out=None)
    return probs, (probs, axis)


def _softmax(x, axis, out):
    """softmax_forward's arithmetic, written into out (a new array when out is None; attention
    passes its own scores as out, so no second (B, H, Tq, Tk) array is made)."""
    xp = get_array_module(x)
    m = _max_along(x, axis)
    m = xp.where(xp.isfinite(m), m, 0.0)  # -inf rows: subtract 0 instead of -inf (no inf - inf)
    e = xp.subtract(x, m, out=out)  # x - m
    xp.exp(e, out=e)  # exp(x - m), in the same buffer
    s = _sum_along(e, axis)
    e /= xp.where(s == 0, 1.0, s)  # out = e / sum(e), in place
    return e


def _max_along(x, axis):
    """x.max(axis, keepdims=True), found as the entry at x.argmax(axis).

    The same number (NaN included); on the CPU, NumPy 2's max over many short rows (attention's
    rows of T scores) is two to three times slower than its argmax, so the max is read there.
    """
    xp = get_array_module(x)
    if xp is not np or not isinstance(axis, int):  # a GPU's max is one kernel; axis None, tuple
        return x.max(axis=axis, keepdims=True)
    return xp.take_along_axis(x, x.argmax(axis=axis, keepdims=True), axis=axis)


def _sum_along(x, axis):
    """x.sum(axis, keepdims=True). Over the last axis it is x @ ones, a matrix-vector product:
    BLAS sums many short rows several times faster than NumPy's reduction does. (BLAS adds in
    order, where NumPy adds pairwise: in float32 a row of 1024 then carries about 1e-6 of
    relative rounding instead of 3e-7, inside float32's tolerances everywhere in tinylm.)"""
    xp = get_array_module(x)
    if axis in (-1, x.ndim - 1):
        return (x @ xp.ones(x.shape[-1], dtype=x.dtype))[..., None]
    return x.sum(axis=axis, keepdims=True)


def _rowdot(a, b, axis):
    """sum over one axis of a * b, keepdims, without making the product a * b as an array
    (einsum adds in order, as BLAS does: see _sum_along)."""
    xp = get_array_module(a)
    if axis in (-1, a.ndim - 1):
        return xp.einsum("...j,...j->...", a, b)[..., None]
    return (a * b).sum(axis=axis, keepdims=True)


def _sum_over_rows(x2):
    """x2.sum(axis=0) of an (R, C) array, as ones(R) @ x2: a bias's or a scale's gradient,
    summed over all R positions. BLAS does it several times faster than NumPy's sum(axis=0)."""
    xp = get_array_module(x2)
    return xp.ones(x2.shape[0], dtype=x2.dtype) @ x2


def softmax_backward(dout, cache):
    """Gradient through p = softmax(x) (the cached output, named y below).

    Forward:  p_i = exp(x_i) / sum_j exp(x_j)
    Jacobian: dp_i/dx_j = p_i (delta_ij - p_j)
    Backward: dx_j = sum_i dout_i p_i (delta_ij - p_j) = p_j (dout_j - sum_i dout_i p_i)
    A fully masked row has p = 0, so its gradient is 0.
    """
    y, axis = cache
    return _softmax_backward(dout, y, axis, out=None)


def _softmax_backward(dout, y, axis, out):
    """softmax_backward's arithmetic, dx = y * (dout - sum_i dout_i y_i), written into out
    (a new array when out is None; attention passes dP, which it no longer needs)."""
    xp = get_array_module(dout)
    dx = xp.subtract(dout, _rowdot(dout, y, axis), out=out)  # dout_j - sum_i dout_i y_i
    dx *= y  # y_j (dout_j - sum_i dout_i y_i)
    return dx


# ---------------------------------------------------------------------------
# Scaled dot-product attention with causal and key-padding masks.
# ---------------------------------------------------------------------------


def attention_mask(Tq, Tk, causal=True, key_padding_mask=None, xp=np):
    """Which keys each query may attend to, as a boolean array (True = allowed).

    Returns (Tq, Tk) without a padding mask, else (B, 1, Tq, Tk) to broadcast over heads.
    Query i sits at absolute position Tk - Tq + i (so Tq < Tk is generation with cached
    keys), and when causal it sees keys j <= Tk - Tq + i: the past and itself.
    key_padding_mask (B, Tk) marks padded keys with True; nobody may attend to them.
    """
    allowed = xp.ones((Tq, Tk), dtype=bool)
    if causal:
        allowed = xp.tril(allowed, k=Tk - Tq)
    if key_padding_mask is not None:
        allowed = allowed[None, None, :, :] & ~key_padding_mask[:, None, None, :]
    return allowed


def causal_mask_bias(Tq, Tk, dtype, xp=np):
    """The causal mask as a number to add to the scores (Tq, Tk): 0 where allowed, -inf where not.

    S + bias is S where a query may look and -inf where it may not, which is what softmax needs;
    adding it in place costs one pass over S and no new (B, H, Tq, Tk) array.
    """
    return xp.where(attention_mask(Tq, Tk, causal=True, xp=xp), 0.0, -xp.inf).astype(dtype)


def _check_attention_inputs(q, k, v, causal, key_padding_mask):
    for name, a in (("q", q), ("k", k), ("v", v)):
        _check_float_array(name, a)
        _check_ndim(name, a, 4, "(B, H, T, D)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}")
    B, H, Tq, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(
            f"q and k must agree in batch, heads and head size (B, H, ., D), "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    Tk = k.shape[2]
    if causal and Tq > Tk:
        raise ValueError(
            f"causal attention needs at least as many keys as queries, got Tq={Tq}, Tk={Tk}"
        )
    if key_padding_mask is not None:
        if getattr(key_padding_mask, "dtype", None) is None or key_padding_mask.dtype != bool:
            got = getattr(key_padding_mask, "dtype", type(key_padding_mask).__name__)
            raise TypeError(f"key_padding_mask must be a bool array (B, Tk), got {got}")
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(
                f"key_padding_mask must have shape (B, Tk) = ({B}, {Tk}), "
                f"got {tuple(key_padding_mask.shape)}"
            )


def attention_forward(q, k, v, causal=True, key_padding_mask=None):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + mask) V, for every batch and head at once.

    Inputs:  q (B, H, Tq, D); k, v (B, H, Tk, D) (Tq = Tk = T in training);
             causal: query i sees only keys up to its own position;
             key_padding_mask: bool (B, Tk), True marks a padded key no query may attend to.
    Returns: out (B, H, Tq, D) and the cache. A query with no allowed key gets output 0.

        S = Q K^T * scale          (B, H, Tq, Tk), scale = 1/sqrt(D)
        S = -inf where masked
        P = softmax(S) over keys   (B, H, Tq, Tk)
        O = P V                    (B, H, Tq, D)

    This builds the whole (Tq, Tk) matrix P. On a GPU the model uses tinylm/cuda.py's fused
    kernel instead, which has this signature and never holds P (see tinylm/flash.py).
    """
    _check_attention_inputs(q, k, v, causal, key_padding_mask)
    xp = get_array_module(q, k, v)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D)
    # (Q * scale) K^T: the scale on Q (B,H,Tq,D), a smaller array than S (B,H,Tq,Tk)
    scores = (q * scale) @ _transpose(k)  # (B,H,Tq,D) @ (B,H,D,Tk) -> (B,H,Tq,Tk)
    if key_padding_mask is not None:
        allowed = attention_mask(q.shape[2], k.shape[2], causal, key_padding_mask, xp)
        scores = xp.where(allowed, scores, -xp.inf)
    elif causal:
        # S + mask, in place (scores are finite: only an overflowed run, with +inf scores,
        # would meet inf - inf here)
        scores += causal_mask_bias(q.shape[2], k.shape[2], scores.dtype, xp)
    probs = _softmax(scores, -1, out=scores)  # P = softmax(S) (B, H, Tq, Tk), in S's buffer
    out = probs @ v  # (B,H,Tq,Tk) @ (B,H,Tk,D) -> (B,H,Tq,D)
    return out, (q, k, v, probs, scale)


def _transpose(a):
    """a^T over the last two axes, copied into row order: NumPy's batched product of small
    matrices (T = 64) runs about twice as fast as with the transposed view."""
    xp = get_array_module(a)
    if xp is not np:  # cuBLAS takes the transposed view as it is
        return a.swapaxes(-1, -2)
    return xp.ascontiguousarray(a.swapaxes(-1, -2))


def attention_backward(dout, cache):
    """Gradients of O = softmax(Q K^T * scale + mask) V.

    Forward:  S = scale * Q K^T,  P = softmax(S),  O = P V
    Backward: dV = P^T dO                                (B,H,Tk,Tq) @ (B,H,Tq,D)
              dP = dO V^T                                (B,H,Tq,D) @ (B,H,D,Tk)
              dS = P * (dP - rowsum(dP * P))             softmax backward, row by row
              dQ = scale * dS K                          (B,H,Tq,Tk) @ (B,H,Tk,D)
              dK = scale * dS^T Q                        (B,H,Tk,Tq) @ (B,H,Tq,D)
    Masked entries have P = 0, so dS = 0 there: no gradient flows through a mask.
    Returns (dq, dk, dv).
    """
    q, k, v, probs, scale = cache
    dv = probs.swapaxes(-1, -2) @ dout
    dprobs = dout @ _transpose(v)  # dP = dO V^T
    dscores = _softmax_backward(dprobs, probs, -1, out=dprobs)  # softmax's backward, in dP's buffer
    dq = dscores @ k
    dq *= scale  # dQ = scale * dS K
    dk = dscores.swapaxes(-1, -2) @ q
    dk *= scale  # dK = scale * dS^T Q
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Cross-entropy loss, fused with the softmax.
# ---------------------------------------------------------------------------


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """Mean negative log-likelihood of the targets under softmax(logits).

    Inputs:  logits (..., V); targets integer with the leading shape of logits (...);
             positions whose target equals ignore_index count for nothing.
    Returns: loss (a 0-d array), the mean over counted positions of
                 -log p[target],  log p = logits - logsumexp(logits)
             computed with logsumexp(z) = m + log(sum exp(z - m)), m = max z, so logits of
             size 1e4 neither overflow nor lose the answer. The loss is 0 when every target
             is ignored (nothing to average, and nothing to learn from).
    """
    _check_float_array("logits", logits)
    _check_int_array("targets", targets)
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets must have the shape of logits without its last axis, "
            f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}"
        )
    xp = get_array_module(logits, targets)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (R, V)
    y = targets.reshape(-1)  # (R,)
    counted = y != ignore_index  # (R,)
    if y.size:
        y_counted = y[counted]
        if y_counted.size and (int(y_counted.min()) < 0 or int(y_counted.max()) >= V):
            bad = int(y_counted.min()) if int(y_counted.min()) < 0 else int(y_counted.max())
            raise ValueError(
                f"targets must be in [0, {V}) or equal ignore_index={ignore_index}, got {bad}"
            )
    y_safe = xp.where(counted, y, 0)  # any valid column for ignored rows; they are zeroed below

    m = z.max(axis=-1, keepdims=True)  # (R, 1)
    e = xp.exp(z - m)  # (R, V), every entry in (0, 1]
    sum_e = e.sum(axis=-1, keepdims=True)  # (R, 1)
    lse = m + xp.log(sum_e)  # (R, 1), logsumexp(z)
    logp_target = xp.take_along_axis(z, y_safe[:, None], axis=-1) - lse  # (R, 1)
    n_counted = int(counted.sum())
    weight = counted.astype(z.dtype) / max(n_counted, 1)  # (R,), 1/N for counted rows, else 0
    loss = -(logp_target[:, 0] * weight).sum()
    probs = e / sum_e  # (R, V), softmax(z), kept for the backward
    return loss, (probs, y_safe, weight, logits.shape)


def cross_entropy_backward(dloss, cache):
    """Gradient of the mean cross-entropy with respect to the logits.

    Forward:  L = (1/N) sum_counted -log softmax(z_r)[y_r],  N = the number of counted rows
    Backward: the softmax and the log fuse into one clean formula,
                  dL/dz_r = (p_r - onehot(y_r)) / N      for a counted row r, 0 for an ignored one,
              with p_r = softmax(z_r); dlogits = dloss * dL/dz, reshaped like the logits.
    """
    probs, y_safe, weight, logits_shape = cache
    xp = get_array_module(probs)
    dz = probs.copy()  # (R, V)
    rows = xp.arange(dz.shape[0])
    dz[rows, y_safe] -= 1.0  # p - onehot(y)
    dz *= (weight * dloss)[:, None]
    return dz.reshape(logits_shape)


# ---------------------------------------------------------------------------
# Dropout.
# ---------------------------------------------------------------------------


def dropout_forward(x, p, rng):
    """Inverted dropout: zero each entry with probability p and scale the rest by 1/(1-p).

        keep ~ Bernoulli(1 - p),  out = x * keep / (1 - p)
    so E[out] = x and nothing needs rescaling at evaluation time. p = 0 is the identity.
    rng is a numpy.random.Generator (the mask is drawn on the host and moved with x).
    """
    _check_float_array("x", x)
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be a number in [0, 1), got {p!r}")
    p = float(p)  # a Python float keeps float32 math in float32
    if p == 0.0:
        return x, None
    xp = get_array_module(x)
    keep = rng.random(x.shape) >= p  # (x.shape) bool, True with probability 1 - p
    scaled_mask = xp.asarray(keep.astype(x.dtype) * (1.0 / (1.0 - p)))
    return x * scaled_mask, scaled_mask


def dropout_backward(dout, cache):
    """Forward out = x * keep / (1 - p), so dx = dout * keep / (1 - p) (the identity when p = 0)."""
    scaled_mask = cache
    return dout if scaled_mask is None else dout * scaled_mask


# ---------------------------------------------------------------------------
# The error function and BERT's exact GELU; tanh for BERT's pooler.
# ---------------------------------------------------------------------------

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_ERF_SERIES_TERMS = 40  # float64 series for |z| <= 2.5: the last term is below 1e-17 of the sum
_ERFC_FRACTION_TERMS = 50  # float64 continued fraction for |z| > 2.5
_ERF_SPLIT = 2.5
# Abramowitz and Stegun 7.1.26 (Hastings' approximation), |error| <= 1.5e-7: enough for float32,
# whose own spacing near 1 is 6e-8 (and 1.2e-7 just below it).
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x):
    """The error function erf(x) = 2/sqrt(pi) * integral_0^x exp(-s^2) ds, elementwise.

    NumPy has no erf (SciPy and CuPy have one, but tinylm needs neither), so it is computed here
    from formulas, with the same lines on NumPy and CuPy. erf is odd, so z = |x| and the sign is
    put back at the end.

    float64, accurate to about 1e-15 (tests/test_bert.py checks it against math.erf on a dense
    grid), for gradient checks and the float64 comparison with PyTorch:
      * |z| <= 2.5, the series with positive terms only (no cancellation):
            erf(z) = 2/sqrt(pi) * exp(-z^2) * sum_{n>=0} z (2z^2)^n / (1*3*5*...*(2n+1))
        each term is the previous one times 2z^2 / (2n+3); 40 terms reach 1e-17 of the sum.
      * |z| > 2.5, the continued fraction of the complement (Laplace's):
            erfc(z) = exp(-z^2)/sqrt(pi) / (z + (1/2)/(z + 1/(z + (3/2)/(z + 2/(z + ...)))))
        evaluated from its 50th level inwards, and erf = 1 - erfc.
    float32, one cheap formula whose error is 1.5e-7 (about float32's own resolution near 1;
    evaluated in float32 arithmetic it stays within 6e-7), Abramowitz and Stegun 7.1.26:
            t = 1 / (1 + p z),   erf(z) = 1 - (a1 t + a2 t^2 + a3 t^3 + a4 t^4 + a5 t^5) exp(-z^2)
    The float64 route costs ~90 array operations, fine on the small arrays of a check; the
    float32 route ~15, because training runs it on the widest activation.
    """
    _check_float_array("x", x)
    xp = get_array_module(x)
    z = xp.abs(x)
    if x.dtype == np.float32:
        t = 1.0 / (1.0 + _AS_P * z)
        poly = _AS_A[4] * t
        for a in reversed(_AS_A[:4]):  # Horner: t (a1 + t (a2 + t (a3 + t (a4 + t a5))))
            poly += a
            poly *= t
        result = 1.0 - poly * xp.exp(-(z * z))
        return xp.copysign(result, x)
    # float64: the series on the inner part, the continued fraction on the outer part.
    inner = xp.minimum(z, _ERF_SPLIT)
    term = inner.copy()
    total = inner.copy()
    two_z2 = 2.0 * inner * inner
    for n in range(_ERF_SERIES_TERMS):
        term *= two_z2 / (2 * n + 3)
        total += term
    erf_inner = _TWO_OVER_SQRT_PI * xp.exp(-(inner * inner)) * total
    outer = xp.maximum(z, _ERF_SPLIT)
    fraction = outer.copy()
    for n in range(_ERFC_FRACTION_TERMS, 0, -1):
        fraction = outer + (0.5 * n) / fraction
    erf_outer = 1.0 - xp.exp(-(outer * outer)) / (math.sqrt(math.pi) * fraction)
    result = xp.where(z <= _ERF_SPLIT, erf_inner, erf_outer)
    return xp.copysign(result, x)


def gelu_erf_forward(x):
    """GELU in its exact form, as BERT uses it: out = x * Phi(x).

        Phi(x) = 0.5 (1 + erf(x / sqrt(2)))     the standard normal's CDF
        out    = x Phi(x)
    The cache holds x and Phi(x). (gelu_forward above is GPT-2's tanh approximation of this;
    the two differ by up to about 5e-4.)
    """
    _check_float_array("x", x)
    phi_cdf = erf(x * _INV_SQRT_2)
    phi_cdf += 1.0
    phi_cdf *= 0.5  # Phi(x)
    return x * phi_cdf, (x, phi_cdf)


def gelu_erf_backward(dout, cache):
    """Gradient of out = x Phi(x).

    By the product rule, with dPhi/dx = phi(x) = exp(-x^2/2) / sqrt(2 pi) (the normal density):
        dout/dx = Phi(x) + x phi(x)
        dx = dout * (Phi(x) + x phi(x))
    """
    x, phi_cdf = cache
    xp = get_array_module(x)
    local = x * x
    local *= -0.5
    xp.exp(local, out=local)
    local *= _INV_SQRT_2PI  # phi(x)
    local *= x
    local += phi_cdf  # Phi(x) + x phi(x)
    local *= dout
    return local


def tanh_forward(x):
    """out = tanh(x), BERT's pooler activation. The cache holds out, all the derivative needs."""
    _check_float_array("x", x)
    xp = get_array_module(x)
    out = xp.tanh(x)
    return out, out


def tanh_backward(dout, cache):
    """Forward out = tanh(x), and d tanh(x)/dx = 1 - tanh(x)^2, so dx = dout * (1 - out^2)."""
    out = cache
    return dout * (1.0 - out * out)
