"""Your turn: write the backward passes of a GPT's layers, then let tinylm grade them.

This file is yours (`tinylm exercises start DIR` wrote it as DIR/my_layers.py, and never
overwrites it). Each layer is a pair, as in tinylm/layers.py:

    out, cache = x_forward(inputs...)      # given: read it, it tells you what the cache holds
    dinputs... = x_backward(dout, cache)   # yours: replace `raise NotImplementedError`

dout is dL/dout, the gradient of the final scalar loss L at the layer's output; every gradient
you return has the shape of its input. docs/math.md derives each formula, and the notebooks
check them step by step. Grade your work at any time, from a shell or a notebook cell:

    tinylm exercises check DIR
    >>> import tinylm.exercises; tinylm.exercises.check("DIR")

The checker feeds each function random float64 inputs, compares your gradients with tinylm's
own and with central differences, prints a table (function | status | max relative error), and
names the classic mistake when it recognises one. A function that still raises
NotImplementedError is "not started", not an error. Work in any order; the block comes last
because it calls your other backward functions.

Shape legend: B batch, T time, C channels, V vocabulary, H heads, D head size (C = H * D),
N any number of leading positions. Only NumPy is needed.
"""

import math

import numpy as np

# ---------------------------------------------------------------------------------------------
# 1. Embedding: a table lookup.
# ---------------------------------------------------------------------------------------------


def embedding_forward(idx, W):
    """out[b, t, :] = W[idx[b, t], :].

    Inputs:  idx integer (B, T), W (V, C).
    Returns: out (B, T, C) and the cache (idx, W.shape, W.dtype).
    """
    out = W[idx]  # (B, T, C)
    return out, (idx, W.shape, W.dtype)


def embedding_backward(dout, cache):
    """dW for out[b, t, :] = W[idx[b, t], :].

    Inputs:  dout (B, T, C); cache (idx, W_shape, W_dtype) from embedding_forward.
    Returns: dW (V, C). The ids are integers: they have no gradient.

    Formula: dW[v, :] = sum of dout[b, t, :] over every (b, t) with idx[b, t] == v.
    A token that occurs twice in the batch gets both contributions.
    """
    idx, W_shape, W_dtype = cache
    raise NotImplementedError("embedding_backward")


# ---------------------------------------------------------------------------------------------
# 2. Linear: out = x @ W + b.
# ---------------------------------------------------------------------------------------------


def linear_forward(x, W, b):
    """out = x @ W + b.

    Inputs:  x (..., Cin), W (Cin, Cout), b (Cout,).
    Returns: out (..., Cout) and the cache (x, W, True).
    """
    out = x @ W + b  # (..., Cout); b is broadcast over every leading position
    return out, (x, W, True)


def linear_backward(dout, cache):
    """dx, dW, db for out = x @ W + b.

    Inputs:  dout (..., Cout); cache (x, W, has_bias) from linear_forward.
    Returns: dx (..., Cin), dW (Cin, Cout), db (Cout,).

    Formula: with the leading axes flattened to N rows,
        out[n, j] = sum_i x[n, i] W[i, j] + b[j]
    so dx = dout @ W^T, dW = x^T @ dout (a sum over the N rows), db[j] = sum_n dout[n, j].
    """
    x, W, has_bias = cache
    raise NotImplementedError("linear_backward")


# ---------------------------------------------------------------------------------------------
# 3. Layer normalisation over the last axis.
# ---------------------------------------------------------------------------------------------


def layernorm_forward(x, gamma, beta, eps=1e-5):
    """Normalise each position over its C channels, then scale and shift.

        mu   = mean_c x                      (..., 1)
        rstd = 1 / sqrt(mean_c (x - mu)^2 + eps)
        xhat = (x - mu) * rstd               (..., C)
        out  = gamma * xhat + beta           gamma, beta (C,)

    Returns: out (..., C) and the cache (x, gamma, mu, rstd).
    """
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
    out = (x - mu) * rstd * gamma + beta  # (..., C)
    return out, (x, gamma, mu, rstd)


def layernorm_backward(dout, cache):
    """dx, dgamma, dbeta for out = gamma * xhat + beta, xhat = (x - mu) * rstd.

    Inputs:  dout (..., C); cache (x, gamma, mu, rstd) from layernorm_forward.
    Returns: dx (..., C), dgamma (C,), dbeta (C,).

    Formula: dbeta = dout summed over positions, dgamma = (dout * xhat) summed over positions,
    dxhat = dout * gamma, and since mu and rstd depend on every channel of the position,
        dx = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat)).
    """
    x, gamma, mu, rstd = cache
    raise NotImplementedError("layernorm_backward")


# ---------------------------------------------------------------------------------------------
# 4. GELU, the tanh approximation of GPT-2.
# ---------------------------------------------------------------------------------------------

GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_forward(x):
    """out = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).

    Returns: out (shape of x) and the cache (x, tanh(u)).
    """
    tanh_u = np.tanh(GELU_K * (x + GELU_A * x**3))
    return 0.5 * x * (1.0 + tanh_u), (x, tanh_u)


def gelu_backward(dout, cache):
    """dx for out = 0.5 x (1 + tanh(u)), elementwise.

    Inputs:  dout (shape of x); cache (x, tanh_u) from gelu_forward.
    Returns: dx (shape of x).

    Formula: the product rule, with d tanh(u)/du = 1 - tanh(u)^2 and
    du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2):
        dout/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh(u)^2) du/dx,   dx = dout * dout/dx.
    """
    x, tanh_u = cache
    raise NotImplementedError("gelu_backward")


# ---------------------------------------------------------------------------------------------
# 5. Softmax along one axis.
# ---------------------------------------------------------------------------------------------


def softmax_forward(x, axis=-1):
    """y_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j (the max keeps exp finite).

    Returns: y (shape of x) and the cache (y, axis).
    """
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    y = e / e.sum(axis=axis, keepdims=True)
    return y, (y, axis)


def softmax_backward(dout, cache):
    """dx for y = softmax(x) along `axis`.

    Inputs:  dout (shape of x); cache (y, axis) from softmax_forward.
    Returns: dx (shape of x).

    Formula: the Jacobian is dy_i/dx_j = y_i (delta_ij - y_j), so
        dx_j = sum_i dout_i y_i (delta_ij - y_j) = y_j (dout_j - sum_i dout_i y_i).
    """
    y, axis = cache
    raise NotImplementedError("softmax_backward")


# ---------------------------------------------------------------------------------------------
# 6. Attention with masks: the forward is yours too (the masks are the exercise).
# ---------------------------------------------------------------------------------------------


def attention_mask(Tq, Tk, causal=True, key_padding_mask=None):
    """Which keys each query may see, True = allowed: (Tq, Tk), or (B, 1, Tq, Tk) with padding.

    Query i sits at position Tk - Tq + i and, when causal, sees keys j <= Tk - Tq + i.
    key_padding_mask (B, Tk) is True for a padded key, which no query may see.
    """
    allowed = np.ones((Tq, Tk), dtype=bool)
    if causal:
        allowed = np.tril(allowed, k=Tk - Tq)
    if key_padding_mask is not None:
        allowed = allowed[None, None, :, :] & ~key_padding_mask[:, None, None, :]
    return allowed


def attention_forward(q, k, v, causal=True, key_padding_mask=None):
    """out = softmax(Q K^T / sqrt(D), masked) V, for every batch and head at once.

    Inputs:  q (B, H, Tq, D); k, v (B, H, Tk, D); causal; key_padding_mask bool (B, Tk) or None.
    Returns: out (B, H, Tq, D) and the cache (q, k, v, P, scale), scale = 1/sqrt(D).

    Formula:
        S = Q K^T * scale                    (B, H, Tq, Tk)
        S = -inf where attention_mask(...) is False
        P = softmax(S) over the keys         (B, H, Tq, Tk)
        O = P V                              (B, H, Tq, D)
    (softmax_forward above works on -inf entries: exp(-inf) = 0.)
    """
    raise NotImplementedError("attention_forward")


def attention_backward(dout, cache):
    """dq, dk, dv for O = softmax(scale * Q K^T, masked) V.

    Inputs:  dout (B, H, Tq, D); cache (q, k, v, P, scale) from attention_forward.
    Returns: dq (B, H, Tq, D), dk (B, H, Tk, D), dv (B, H, Tk, D).

    Formula: backwards through the forward's lines,
        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),
        dQ = scale * dS K,   dK = scale * dS^T Q.
    Masked entries have P = 0, so dS = 0 there without any extra step.
    """
    q, k, v, P, scale = cache
    raise NotImplementedError("attention_backward")


# ---------------------------------------------------------------------------------------------
# 7. Cross-entropy, the loss, fused with its softmax.
# ---------------------------------------------------------------------------------------------


def cross_entropy_forward(logits, targets, ignore_index=-100):
    """L = mean over the counted positions of -log softmax(logits)[target].

    Inputs:  logits (..., V); targets integer (...), ignore_index marks a position to skip.
    Returns: the loss (a 0-d array) and the cache (p, y, weight, logits.shape) where, for the
             R rows of logits, p (R, V) = softmax of each row, y (R,) the targets (0 where
             ignored), and weight (R,) = 1/N for each of the N counted rows, 0 for an ignored
             one.
    """
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (R, V)
    y = targets.reshape(-1)  # (R,)
    counted = y != ignore_index
    y = np.where(counted, y, 0)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)  # (R, V)
    weight = counted / max(int(counted.sum()), 1)  # (R,)
    loss = -(np.log(p[np.arange(len(y)), y]) * weight).sum()
    return np.asarray(loss), (p, y, weight, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits for the mean cross-entropy.

    Inputs:  dloss, a number (1.0 when the loss is the final output); cache from the forward.
    Returns: dlogits (shape of the logits).

    Formula: for a counted row r, dL/dz_r = (p_r - onehot(y_r)) / N, N the number of counted
    rows; an ignored row gets 0. Then dlogits = dloss * dL/dz.
    """
    p, y, weight, logits_shape = cache
    raise NotImplementedError("cross_entropy_backward")


# ---------------------------------------------------------------------------------------------
# 8. A whole transformer block, built from the layers above.
# ---------------------------------------------------------------------------------------------


def block_forward(x, params, n_head):
    """x1 = x + attn(ln_1(x));  x2 = x1 + mlp(ln_2(x1))   (GPT-2's pre-norm block).

    Inputs:  x (B, T, C); params, a dict of arrays named as in GPT-2:
               ln_1.weight, ln_1.bias (C,)        attn.c_attn.weight (C, 3C), .bias (3C,)
               attn.c_proj.weight (C, C), .bias   ln_2.weight, ln_2.bias (C,)
               mlp.c_fc.weight (C, 4C), .bias     mlp.c_proj.weight (4C, C), .bias (C,)
             n_head, H (D = C / H).
    Returns: x2 (B, T, C) and the cache, a dict of every layer's cache plus the shapes.
    """
    B, T, C = x.shape
    H, D = n_head, C // n_head
    p, c = params, {"shape": (B, T, C, H, D)}
    h, c["ln_1"] = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"])
    qkv, c["attn.c_attn"] = linear_forward(h, p["attn.c_attn.weight"], p["attn.c_attn.bias"])
    q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
    a, c["attn"] = attention_forward(q, k, v, causal=True)  # (B, H, T, D)
    a = a.transpose(0, 2, 1, 3).reshape(B, T, C)  # merge the heads
    y, c["attn.c_proj"] = linear_forward(a, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    x1 = x + y
    h, c["ln_2"] = layernorm_forward(x1, p["ln_2.weight"], p["ln_2.bias"])
    f, c["mlp.c_fc"] = linear_forward(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])
    g, c["gelu"] = gelu_forward(f)  # (B, T, 4C)
    m, c["mlp.c_proj"] = linear_forward(g, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    return x1 + m, c


def block_backward(dout, cache):
    """dx and every parameter's gradient for the block above.

    Inputs:  dout (B, T, C); cache from block_forward.
    Returns: dx (B, T, C) and grads, a dict with a gradient for every name of params.

    Formula: walk block_forward bottom-up, calling your backward functions. A residual
    x1 = x + y(x) passes its gradient both ways: dx = dx1 + (the branch's backward of dx1).
    The head split q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4) is undone by
    stacking dq, dk, dv on axis 0 and applying the inverse transpose and reshape.
    """
    B, T, C, H, D = cache["shape"]
    raise NotImplementedError("block_backward")
