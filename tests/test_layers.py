"""Tests for tinylm.layers: every forward against a formula written out here, every backward
against central differences in float64, float32 against float64, and bad input.

The reference forwards below are deliberately plain (explicit loops, np.mean / np.var,
math.erf) so that they share no code with tinylm.layers.
"""

import math
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinylm import layers
from tinylm.gradcheck import (
    KINK_TOL,
    SMOOTH_TOL,
    check_layer,
    format_table,
    numerical_gradient,
    rel_error,
)

FAST = settings(max_examples=30, deadline=None)
FEW = settings(max_examples=12, deadline=None)  # for property tests that run a gradient check


def randn(rng, *shape):
    return rng.standard_normal(shape)


def assert_rows_ok(rows, tol):
    assert rows, "the check produced no rows"
    for r in rows:
        assert r.tol == tol
    bad = [r for r in rows if not r.error <= tol]
    assert not bad, "\n" + format_table(rows)


def bounded_floats(lo=-5.0, hi=5.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)


# ----------------------------------------------------------------------------------------------
# Reference forwards, written from the formulas


def attention_reference(q, k, v, causal, key_padding_mask=None):
    """Loops over batch, head and query; query i sits at absolute position Tk - Tq + i."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = np.zeros((B, H, Tq, D))
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                allowed = [
                    j
                    for j in range(Tk)
                    if not (causal and j > Tk - Tq + i)
                    and not (key_padding_mask is not None and key_padding_mask[b, j])
                ]
                if not allowed:
                    continue  # a query with nothing to look at outputs zeros
                s = np.array(
                    [sum(q[b, h, i, d] * k[b, h, j, d] for d in range(D)) for j in allowed]
                )
                s = s / math.sqrt(D)
                w = np.exp(s - s.max())
                w = w / w.sum()
                for n, j in enumerate(allowed):
                    out[b, h, i] += w[n] * v[b, h, j]
    return out


def cross_entropy_reference(logits, targets, ignore_index=-100):
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    y = targets.reshape(-1)
    total, n = 0.0, 0
    for r in range(z.shape[0]):
        if y[r] == ignore_index:
            continue
        m = max(z[r])
        p = [math.exp(z[r, c] - m) for c in range(V)]
        total += -math.log(p[y[r]] / sum(p))
        n += 1
    return total / n if n else 0.0


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
    return np.array([0.5 * t * (1.0 + math.erf(t / math.sqrt(2.0))) for t in np.ravel(x)]).reshape(
        np.shape(x)
    )


def softmax_reference(x, axis):
    x = np.moveaxis(x, axis, -1)
    out = np.zeros_like(x)
    for index in np.ndindex(*x.shape[:-1]):
        row = x[index]
        e = np.array([math.exp(t) for t in row])
        out[index] = e / e.sum()
    return np.moveaxis(out, -1, axis)


# ----------------------------------------------------------------------------------------------
# Embedding


def test_embedding_forward_is_row_lookup_and_backward_is_one_hot_transpose():
    rng = np.random.default_rng(0)
    V, C = 13, 7
    W = randn(rng, V, C)
    idx = np.array([[3, 3, 0, 12], [5, 3, 12, 1]])  # repeats of 3 and 12
    out, cache = layers.embedding_forward(idx, W)
    assert out.shape == (2, 4, C)
    for b in range(2):
        for t in range(4):
            np.testing.assert_array_equal(out[b, t], W[idx[b, t]])
    dout = randn(rng, 2, 4, C)
    dW = layers.embedding_backward(dout, cache)
    one_hot = np.zeros((idx.size, V))
    one_hot[np.arange(idx.size), idx.reshape(-1)] = 1.0
    np.testing.assert_allclose(dW, one_hot.T @ dout.reshape(-1, C), rtol=1e-13, atol=1e-14)
    # the row of id 3 collects three positions, an unused id gets nothing
    np.testing.assert_allclose(dW[3], dout[0, 0] + dout[0, 1] + dout[1, 1], rtol=1e-13)
    np.testing.assert_array_equal(dW[7], np.zeros(C))


@pytest.mark.parametrize("shape", [(2, 5), (1, 1), (7,), (2, 2, 3)])
def test_embedding_gradcheck_with_repeated_ids(shape):
    rng = np.random.default_rng(1)
    V, C = 13, 7
    idx = rng.integers(0, 4, size=shape)  # only 4 distinct ids, so most repeat
    rows = check_layer(
        "embedding",
        lambda W: layers.embedding_forward(idx, W),
        layers.embedding_backward,
        {"W": randn(rng, V, C)},
    )
    assert_rows_ok(rows, SMOOTH_TOL)


@FAST
@given(
    V=st.integers(1, 9),
    C=st.integers(1, 6),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_embedding_property(V, C, shape, seed):
    rng = np.random.default_rng(seed)
    W = randn(rng, V, C)
    idx = rng.integers(0, V, size=shape)
    out, cache = layers.embedding_forward(idx, W)
    assert out.shape == shape + (C,)
    np.testing.assert_array_equal(out.reshape(-1, C), np.stack([W[i] for i in idx.reshape(-1)]))
    dout = randn(rng, *out.shape)
    one_hot = np.eye(V)[idx.reshape(-1)]  # (N, V)
    np.testing.assert_allclose(
        layers.embedding_backward(dout, cache), one_hot.T @ dout.reshape(-1, C), atol=1e-12
    )


def test_sinusoidal_positions_hand_entries():
    C = 8
    pe = layers.sinusoidal_positions(5, C)
    assert pe.shape == (5, C) and pe.dtype == np.float64
    np.testing.assert_array_equal(pe[0], [0, 1, 0, 1, 0, 1, 0, 1])  # sin 0, cos 0
    assert pe[1, 0] == pytest.approx(math.sin(1.0), abs=1e-15)
    assert pe[1, 1] == pytest.approx(math.cos(1.0), abs=1e-15)
    assert pe[3, 2] == pytest.approx(math.sin(3.0 / 10000 ** (2 / 8)), abs=1e-15)
    assert pe[3, 3] == pytest.approx(math.cos(3.0 / 10000 ** (2 / 8)), abs=1e-15)
    assert pe[4, 7] == pytest.approx(math.cos(4.0 / 10000 ** (6 / 8)), abs=1e-15)
    assert np.all(np.abs(pe) <= 1.0)


def test_sinusoidal_positions_odd_channels_and_dtype():
    pe = layers.sinusoidal_positions(3, 7, dtype=np.float32)
    assert pe.shape == (3, 7) and pe.dtype == np.float32
    np.testing.assert_array_equal(pe[0], [0, 1, 0, 1, 0, 1, 0])  # the last cosine is dropped
    assert pe[2, 6] == pytest.approx(math.sin(2.0 / 10000 ** (6 / 7)), rel=1e-6)
    assert pe[2, 5] == pytest.approx(math.cos(2.0 / 10000 ** (4 / 7)), rel=1e-6)


@pytest.mark.parametrize("T, C", [(0, 4), (3, 0), (2.5, 4), (-1, 4)])
def test_sinusoidal_positions_rejects_bad_sizes(T, C):
    with pytest.raises(ValueError, match=re.escape(f"got T={T}, C={C}")):
        layers.sinusoidal_positions(T, C)


# ----------------------------------------------------------------------------------------------
# Linear


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("x_shape", [(5, 7), (2, 3, 7), (1, 1, 7)])
def test_linear_gradcheck(has_bias, x_shape):
    rng = np.random.default_rng(2)
    inputs = {"x": randn(rng, *x_shape), "W": randn(rng, 7, 3)}
    if has_bias:
        inputs["b"] = randn(rng, 3)
    # backward always returns (dx, dW, db); db is None without a bias and is skipped
    rows = check_layer(
        "linear", layers.linear_forward, layers.linear_backward, inputs, wrt=["x", "W", "b"]
    )
    assert [r.name for r in rows] == ["linear: x", "linear: W"] + (
        ["linear: b"] if has_bias else []
    )
    assert_rows_ok(rows, SMOOTH_TOL)
    _, _, db = layers.linear_backward(
        np.ones(x_shape[:-1] + (3,)), layers.linear_forward(**inputs)[1]
    )
    assert (db is None) == (not has_bias)


def test_linear_forward_against_sums():
    rng = np.random.default_rng(3)
    x, W, b = randn(rng, 2, 3, 4), randn(rng, 4, 5), randn(rng, 5)
    out, _ = layers.linear_forward(x, W, b)
    ref = np.zeros((2, 3, 5))
    for n in np.ndindex(2, 3):
        for j in range(5):
            ref[n + (j,)] = sum(x[n + (i,)] * W[i, j] for i in range(4)) + b[j]
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    out_nb, _ = layers.linear_forward(x, W)
    np.testing.assert_allclose(out_nb, ref - b, rtol=1e-12, atol=1e-12)


@FEW
@given(
    lead=hnp.array_shapes(min_dims=1, max_dims=3, max_side=3),
    cin=st.integers(1, 5),
    cout=st.integers(1, 5),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_linear_property(lead, cin, cout, has_bias, seed):
    rng = np.random.default_rng(seed)
    inputs = {"x": randn(rng, *lead, cin), "W": randn(rng, cin, cout)}
    if has_bias:
        inputs["b"] = randn(rng, cout)
    out, _ = layers.linear_forward(**inputs)
    assert out.shape == lead + (cout,)
    rows = check_layer(
        "linear",
        layers.linear_forward,
        layers.linear_backward,
        inputs,
        wrt=["x", "W", "b"],
        seed=seed,
    )
    assert_rows_ok(rows, SMOOTH_TOL)


# ----------------------------------------------------------------------------------------------
# LayerNorm


@pytest.mark.parametrize("shape", [(2, 3, 7), (1, 1, 7), (4, 3), (5, 1)])
def test_layernorm_gradcheck(shape):
    rng = np.random.default_rng(4)
    C = shape[-1]
    inputs = {"x": randn(rng, *shape) * 2 + 1, "gamma": randn(rng, C), "beta": randn(rng, C)}
    rows = check_layer("layernorm", layers.layernorm_forward, layers.layernorm_backward, inputs)
    assert_rows_ok(rows, SMOOTH_TOL)


@FAST
@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
        elements=bounded_floats(),
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_layernorm_forward_property(x, seed):
    rng = np.random.default_rng(seed)
    C = x.shape[-1]
    gamma, beta = randn(rng, C), randn(rng, C)
    out, _ = layers.layernorm_forward(x, gamma, beta, eps=1e-5)
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.var(x, axis=-1, keepdims=True)
    ref = (x - mean) / np.sqrt(var + 1e-5) * gamma + beta
    assert out.shape == x.shape
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)


def test_layernorm_output_statistics_with_unit_gain():
    rng = np.random.default_rng(5)
    x = randn(rng, 4, 6, 32) * 3 + 7
    out, _ = layers.layernorm_forward(x, np.ones(32), np.zeros(32), eps=1e-5)
    np.testing.assert_allclose(out.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=-1), 1.0, atol=1e-5)  # eps makes it a hair under 1


@FEW
@given(
    B=st.integers(1, 3), T=st.integers(1, 4), C=st.integers(3, 7), seed=st.integers(0, 2**32 - 1)
)
def test_layernorm_gradcheck_property(B, T, C, seed):
    # C >= 3: with C = 2 every normalised row is +-1 up to eps, dx is ~1e-5 in size and the
    # central difference measures mostly rounding noise (C = 1 gives dx = 0 exactly).
    # Rows whose variance is near eps (1e-5) curve so sharply that the h^2 truncation error of
    # the central difference alone exceeds 1e-7 (it shrinks 100x per 10x smaller h there).
    rng = np.random.default_rng(seed)
    inputs = {"x": randn(rng, B, T, C), "gamma": randn(rng, C), "beta": randn(rng, C)}
    assume(np.var(inputs["x"], axis=-1).min() > 1e-2)
    rows = check_layer(
        "layernorm", layers.layernorm_forward, layers.layernorm_backward, inputs, seed=seed
    )
    assert_rows_ok(rows, SMOOTH_TOL)


# ----------------------------------------------------------------------------------------------
# GELU and ReLU


def test_gelu_hand_values():
    out, _ = layers.gelu_forward(np.array([0.0, 1.0, -1.0]))
    # 0.5 * 1 * (1 + tanh(sqrt(2/pi) * 1.044715)), by hand with math.tanh
    g1 = 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * 1.044715))
    np.testing.assert_allclose(
        out, [0.0, g1, g1 - 1.0], rtol=1e-14, atol=1e-15
    )  # gelu(-x) = gelu(x) - x


@FAST
@given(
    x=hnp.arrays(
        np.float64, hnp.array_shapes(max_dims=3, max_side=5), elements=bounded_floats(-8, 8)
    )
)
def test_gelu_matches_tanh_formula_and_exact_erf_gelu(x):
    out, _ = layers.gelu_forward(x)
    assert out.shape == x.shape and out.dtype == np.float64
    np.testing.assert_allclose(out, gelu_tanh(x), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out, gelu_erf(x), rtol=0, atol=1e-3)


def test_gelu_gradcheck():
    rng = np.random.default_rng(6)
    rows = check_layer(
        "gelu", layers.gelu_forward, layers.gelu_backward, {"x": randn(rng, 2, 3, 7) * 2}
    )
    assert_rows_ok(rows, SMOOTH_TOL)


def gelu_tanh_derivative(x):
    """d/dx of 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), written out directly."""
    k = math.sqrt(2.0 / math.pi)
    t = np.tanh(k * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * k * (1 + 3 * 0.044715 * x**2)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gelu_in_many_row_blocks_equals_the_formula(layout):
    """An activation larger than one cache block (layers._row_blocks) is computed block by
    block; every block, the last partial one included, must be written, in any input layout."""
    rng = np.random.default_rng(16)
    x = randn(rng, 3, 801, 77) * 3  # 2403 rows of 77 float64: several blocks and a partial one
    if layout == "transposed":
        x = np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0)  # same values, F order
    assert len(layers._row_blocks(x.reshape(-1, 77))) > 2
    dout = randn(rng, *x.shape)
    out, cache = layers.gelu_forward(x)
    np.testing.assert_allclose(out, gelu_tanh(x), rtol=1e-13, atol=1e-15)
    dx = layers.gelu_backward(dout, cache)
    np.testing.assert_allclose(dx, dout * gelu_tanh_derivative(x), rtol=1e-12, atol=1e-14)


def test_gelu_backward_takes_a_dout_that_broadcasts():
    x = randn(np.random.default_rng(17), 3, 4, 5)
    _, cache = layers.gelu_forward(x)
    expected = gelu_tanh_derivative(x)
    np.testing.assert_allclose(layers.gelu_backward(1.0, cache), expected, rtol=1e-12)
    np.testing.assert_allclose(layers.gelu_backward(np.ones((1, 5)), cache), expected, rtol=1e-12)


@pytest.mark.parametrize("axis", [None, (1, 2), 0, -1])
def test_softmax_over_any_axes_sums_to_one(axis):
    """The row max is found by argmax on an int axis (faster); any other axis works as well."""
    x = randn(np.random.default_rng(18), 3, 4, 5) * 10
    p, _ = layers.softmax_forward(x, axis=axis)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(axis=axis, keepdims=True), rtol=1e-13)


def away_from_zero(x, margin=1e-3):
    return np.where(np.abs(x) < margin, np.sign(x + 1e-300) * margin * 2, x)


def test_relu_forward_and_gradcheck():
    rng = np.random.default_rng(7)
    x = away_from_zero(randn(rng, 2, 3, 7))
    out, _ = layers.relu_forward(x)
    np.testing.assert_array_equal(out, np.maximum(x, 0.0))
    rows = check_layer("relu", layers.relu_forward, layers.relu_backward, {"x": x}, tol=KINK_TOL)
    assert_rows_ok(rows, KINK_TOL)


def test_relu_gradient_at_zero_is_zero():
    _, cache = layers.relu_forward(np.array([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(layers.relu_backward(np.ones(3), cache), [0.0, 0.0, 1.0])


# ----------------------------------------------------------------------------------------------
# Softmax


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_softmax_forward_and_gradcheck_on_each_axis(axis):
    rng = np.random.default_rng(8)
    x = randn(rng, 3, 4, 5) * 2
    out, _ = layers.softmax_forward(x, axis=axis)
    np.testing.assert_allclose(out, softmax_reference(x, axis), rtol=1e-12)
    np.testing.assert_allclose(out.sum(axis=axis), 1.0, rtol=1e-13)
    rows = check_layer(
        "softmax", lambda x: layers.softmax_forward(x, axis=axis), layers.softmax_backward, {"x": x}
    )
    assert_rows_ok(rows, SMOOTH_TOL)


def test_softmax_with_minus_inf_entries_and_a_fully_masked_row():
    rng = np.random.default_rng(9)
    x = randn(rng, 3, 5)
    x[0, [1, 3]] = -np.inf  # partly masked
    x[2, :] = -np.inf  # fully masked
    out, cache = layers.softmax_forward(x)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, [1, 3]], 0.0)
    keep = [0, 2, 4]
    np.testing.assert_allclose(out[0, keep], softmax_reference(x[0, keep], 0), rtol=1e-13)
    np.testing.assert_array_equal(out[2], np.zeros(5))
    dx = layers.softmax_backward(randn(rng, 3, 5), cache)
    assert np.all(np.isfinite(dx))
    np.testing.assert_array_equal(dx[2], np.zeros(5))
    np.testing.assert_array_equal(dx[0, [1, 3]], 0.0)
    rows = check_layer("softmax", layers.softmax_forward, layers.softmax_backward, {"x": x})
    assert_rows_ok(rows, SMOOTH_TOL)


def test_softmax_of_huge_logits_is_finite_and_exact():
    out, _ = layers.softmax_forward(np.array([[1e4, 0.0, -1e4], [1e4, 1e4, -1e4]]))
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], atol=1e-300)


@FAST
@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
        elements=bounded_floats(-30, 30),
    ),
    data=st.data(),
)
def test_softmax_property(x, data):
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1), label="axis")
    out, _ = layers.softmax_forward(x, axis=axis)
    assert out.shape == x.shape
    assert np.all(out >= 0)
    np.testing.assert_allclose(out.sum(axis=axis), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out, softmax_reference(x, axis), rtol=1e-10, atol=1e-300)


# ----------------------------------------------------------------------------------------------
# Attention

ATTENTION_CASES = {
    # name: (B, H, Tq, Tk, D, causal, padded keys as (batch, key) pairs)
    "causal": (2, 2, 5, 5, 3, True, []),
    "non-causal": (2, 2, 5, 5, 3, False, []),
    "padding": (2, 2, 5, 5, 3, False, [(1, 3), (1, 4)]),
    "causal+padding": (2, 3, 4, 4, 3, True, [(0, 3), (1, 0)]),
    "fully masked row": (2, 1, 4, 4, 2, True, [(1, 0), (1, 1)]),  # batch 1 query 0 sees nothing
    "Tq<Tk causal (generation)": (2, 2, 2, 5, 3, True, []),
    "Tq<Tk causal+padding": (1, 2, 1, 4, 3, True, [(0, 1)]),
    "Tq>Tk non-causal": (1, 2, 4, 2, 3, False, []),
    "T=1": (2, 2, 1, 1, 3, True, []),
    "D=1": (1, 1, 3, 3, 1, True, []),
}


def attention_inputs(B, H, Tq, Tk, D, padded, seed):
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, B, H, Tq, D), randn(rng, B, H, Tk, D), randn(rng, B, H, Tk, D)
    mask = None
    if padded:
        mask = np.zeros((B, Tk), dtype=bool)
        for b, j in padded:
            mask[b, j] = True
    return q, k, v, mask


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_forward_against_loops_and_gradcheck(case):
    B, H, Tq, Tk, D, causal, padded = ATTENTION_CASES[case]
    q, k, v, mask = attention_inputs(B, H, Tq, Tk, D, padded, seed=10)
    out, _ = layers.attention_forward(q, k, v, causal=causal, key_padding_mask=mask)
    assert out.shape == (B, H, Tq, D)
    np.testing.assert_allclose(
        out, attention_reference(q, k, v, causal, mask), rtol=1e-12, atol=1e-13
    )
    rows = check_layer(
        f"attention ({case})",
        lambda q, k, v: layers.attention_forward(q, k, v, causal=causal, key_padding_mask=mask),
        layers.attention_backward,
        {"q": q, "k": k, "v": v},
    )
    assert [r.name.split(": ")[1] for r in rows] == ["q", "k", "v"]
    assert_rows_ok(rows, SMOOTH_TOL)


def test_attention_fully_masked_query_gives_zeros_and_no_gradient():
    q, k, v, mask = attention_inputs(1, 2, 3, 3, 4, [], seed=11)
    mask = np.array([[True, True, True]])  # every key of the only sequence is padding
    out, cache = layers.attention_forward(q, k, v, causal=False, key_padding_mask=mask)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, np.zeros_like(out))
    dq, dk, dv = layers.attention_backward(np.ones_like(out), cache)
    for g in (dq, dk, dv):
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g, np.zeros_like(g))


def test_attention_causal_first_query_copies_first_value():
    q, k, v, _ = attention_inputs(1, 2, 4, 4, 3, [], seed=12)
    out, _ = layers.attention_forward(q, k, v, causal=True)
    np.testing.assert_allclose(out[:, :, 0], v[:, :, 0], rtol=1e-14)  # query 0 sees only key 0


def test_attention_mask_layout():
    allowed = layers.attention_mask(2, 4, causal=True)
    np.testing.assert_array_equal(allowed, [[1, 1, 1, 0], [1, 1, 1, 1]])
    pad = np.array([[False, True, False, False]])
    allowed = layers.attention_mask(3, 4, causal=False, key_padding_mask=pad)
    assert allowed.shape == (1, 1, 3, 4)
    np.testing.assert_array_equal(allowed[0, 0], [[1, 0, 1, 1]] * 3)


@st.composite
def attention_setups(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    D = draw(st.integers(1, 4))
    Tk = draw(st.integers(1, 5))
    causal = draw(st.booleans())
    Tq = draw(st.integers(1, Tk)) if causal else draw(st.integers(1, 5))
    mask = None
    if draw(st.booleans()):
        mask = draw(hnp.arrays(np.bool_, (B, Tk)))
    seed = draw(st.integers(0, 2**32 - 1))
    return B, H, Tq, Tk, D, causal, mask, seed


@FAST
@given(setup=attention_setups())
def test_attention_forward_property(setup):
    B, H, Tq, Tk, D, causal, mask, seed = setup
    q, k, v, _ = attention_inputs(B, H, Tq, Tk, D, [], seed)
    out, _ = layers.attention_forward(q, k, v, causal=causal, key_padding_mask=mask)
    assert out.shape == (B, H, Tq, D)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(
        out, attention_reference(q, k, v, causal, mask), rtol=1e-11, atol=1e-12
    )


@FEW
@given(setup=attention_setups())
def test_attention_gradcheck_property(setup):
    B, H, Tq, Tk, D, causal, mask, seed = setup
    q, k, v, _ = attention_inputs(B, H, Tq, Tk, D, [], seed)
    rows = check_layer(
        "attention",
        lambda q, k, v: layers.attention_forward(q, k, v, causal=causal, key_padding_mask=mask),
        layers.attention_backward,
        {"q": q, "k": k, "v": v},
        seed=seed,
    )
    assert_rows_ok(rows, SMOOTH_TOL)


# ----------------------------------------------------------------------------------------------
# Cross-entropy


def test_cross_entropy_hand_values_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]])
    loss0, _ = layers.cross_entropy_forward(logits, np.array([0]))
    loss1, _ = layers.cross_entropy_forward(logits, np.array([1]))
    loss2, cache2 = layers.cross_entropy_forward(logits, np.array([2]))
    assert np.isfinite(loss0) and abs(float(loss0)) < 1e-300  # log(1 + e^-1e4 + e^-2e4) = 0
    assert float(loss1) == pytest.approx(1e4, rel=1e-15)
    assert float(loss2) == pytest.approx(2e4, rel=1e-15)
    dlogits = layers.cross_entropy_backward(1.0, cache2)
    np.testing.assert_allclose(dlogits, [[1.0, 0.0, -1.0]], atol=1e-300)  # p - onehot
    # uniform logits: loss = log V
    loss, _ = layers.cross_entropy_forward(np.zeros((2, 3, 13)), np.zeros((2, 3), dtype=np.int64))
    assert float(loss) == pytest.approx(math.log(13), rel=1e-14)


@pytest.mark.parametrize("shape", [(2, 5, 13), (6, 13), (1, 1, 13), (3, 4)])
def test_cross_entropy_forward_against_loops_and_gradcheck_with_ignored_positions(shape):
    rng = np.random.default_rng(13)
    V = shape[-1]
    logits = randn(rng, *shape) * 3
    targets = rng.integers(0, V, size=shape[:-1])
    if targets.size > 1:
        targets.reshape(-1)[::3] = -100
    loss, _ = layers.cross_entropy_forward(logits, targets)
    assert np.ndim(loss) == 0
    assert float(loss) == pytest.approx(cross_entropy_reference(logits, targets), rel=1e-12)
    rows = check_layer(
        "cross_entropy",
        lambda logits: layers.cross_entropy_forward(logits, targets),
        layers.cross_entropy_backward,
        {"logits": logits},
    )
    assert_rows_ok(rows, SMOOTH_TOL)


def test_cross_entropy_ignored_rows_get_no_gradient_and_mean_is_over_counted():
    rng = np.random.default_rng(14)
    logits = randn(rng, 4, 5)
    targets = np.array([1, -100, 3, -100])
    loss, cache = layers.cross_entropy_forward(logits, targets)
    only_counted, _ = layers.cross_entropy_forward(logits[[0, 2]], targets[[0, 2]])
    assert float(loss) == pytest.approx(float(only_counted), rel=1e-14)
    d = layers.cross_entropy_backward(1.0, cache)
    np.testing.assert_array_equal(d[[1, 3]], 0.0)
    # dL/dz = (softmax - onehot) / n for counted rows
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(d[0], (p - np.eye(5)[1]) / 2, rtol=1e-12)


def test_cross_entropy_with_every_target_ignored_is_zero_with_zero_gradient():
    rng = np.random.default_rng(15)
    logits = randn(rng, 2, 3, 7)
    targets = np.full((2, 3), -100)
    loss, cache = layers.cross_entropy_forward(logits, targets)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(layers.cross_entropy_backward(1.0, cache), np.zeros_like(logits))
    rows = check_layer(
        "cross_entropy",
        lambda logits: layers.cross_entropy_forward(logits, targets),
        layers.cross_entropy_backward,
        {"logits": logits},
    )
    assert_rows_ok(rows, SMOOTH_TOL)


def test_cross_entropy_custom_ignore_index():
    logits = np.zeros((3, 4))
    loss, _ = layers.cross_entropy_forward(logits, np.array([2, -1, -1]), ignore_index=-1)
    assert float(loss) == pytest.approx(math.log(4), rel=1e-14)


@FAST
@given(
    lead=hnp.array_shapes(min_dims=1, max_dims=2, max_side=5),
    V=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
    ignore_frac=st.floats(0.0, 1.0),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
)
def test_cross_entropy_property(lead, V, seed, ignore_frac, scale):
    rng = np.random.default_rng(seed)
    logits = randn(rng, *lead, V) * scale
    targets = rng.integers(0, V, size=lead)
    targets[rng.random(lead) < ignore_frac] = -100
    loss, cache = layers.cross_entropy_forward(logits, targets)
    assert np.isfinite(loss) and float(loss) >= 0.0
    assert float(loss) == pytest.approx(
        cross_entropy_reference(logits, targets), rel=1e-10, abs=1e-12
    )
    d = layers.cross_entropy_backward(1.0, cache)
    assert d.shape == logits.shape
    # each counted row of (p - onehot)/n sums to zero
    np.testing.assert_allclose(d.sum(axis=-1), 0.0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Dropout


def test_dropout_p0_is_the_identity():
    rng = np.random.default_rng(16)
    x = randn(rng, 3, 4)
    out, cache = layers.dropout_forward(x, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out, x)
    dout = randn(rng, 3, 4)
    np.testing.assert_array_equal(layers.dropout_backward(dout, cache), dout)


def test_dropout_statistics():
    p = 0.3
    x = np.ones((200, 500))
    out, cache = layers.dropout_forward(x, p, np.random.default_rng(17))
    kept = out != 0
    # kept entries are scaled by 1 / (1 - p); the rest are zero
    np.testing.assert_allclose(out[kept], 1.0 / (1.0 - p), rtol=1e-15)
    # the fraction dropped is p and the mean is preserved (sd of the mean here is ~0.002)
    assert abs((~kept).mean() - p) < 0.01
    assert abs(out.mean() - 1.0) < 0.01
    # backward applies the same mask and scale
    np.testing.assert_array_equal(layers.dropout_backward(np.ones_like(x), cache), out)


def test_dropout_depends_only_on_the_rng_seed():
    x = np.ones((4, 6))
    a, _ = layers.dropout_forward(x, 0.5, np.random.default_rng(3))
    b, _ = layers.dropout_forward(x, 0.5, np.random.default_rng(3))
    c, _ = layers.dropout_forward(x, 0.5, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dropout_gradcheck_with_fixed_rng():
    rng = np.random.default_rng(18)
    rows = check_layer(
        "dropout",
        lambda x: layers.dropout_forward(x, 0.4, np.random.default_rng(1)),
        layers.dropout_backward,
        {"x": randn(rng, 2, 3, 7)},
    )
    assert_rows_ok(rows, SMOOTH_TOL)


# ----------------------------------------------------------------------------------------------
# The gradient-check helpers themselves


def test_rel_error_and_numerical_gradient_hand_cases():
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
    assert rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_error(np.array([1.0, 4.0]), np.array([1.0, 3.0])) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="one shape"):
        rel_error(np.zeros(2), np.zeros(3))
    x = np.array([1.0, -2.0, 3.0])
    g = numerical_gradient(lambda x: x**2, x, np.ones(3))
    np.testing.assert_allclose(g, 2 * x, rtol=1e-9)
    np.testing.assert_array_equal(x, [1.0, -2.0, 3.0])  # restored


def test_check_layer_catches_a_wrong_backward():
    rng = np.random.default_rng(19)
    rows = check_layer(
        "gelu",
        layers.gelu_forward,
        lambda dout, cache: 1.01 * layers.gelu_backward(dout, cache),
        {"x": randn(rng, 3, 4)},
    )
    assert not rows[0].ok and rows[0].error > 1e-3


# ----------------------------------------------------------------------------------------------
# float32 against float64


def float32_cases():
    rng = np.random.default_rng(20)
    q, k, v, mask = attention_inputs(2, 2, 5, 5, 4, [(1, 3), (1, 4)], seed=21)
    ids = rng.integers(0, 13, size=(2, 5))
    targets = rng.integers(0, 13, size=(2, 5))
    targets[0, 1] = -100
    x = randn(rng, 2, 5, 7)
    return {
        "embedding": (lambda W: layers.embedding_forward(ids, W), {"W": randn(rng, 13, 7)}),
        "linear": (layers.linear_forward, {"x": x, "W": randn(rng, 7, 3), "b": randn(rng, 3)}),
        "layernorm": (
            layers.layernorm_forward,
            {"x": x, "gamma": randn(rng, 7), "beta": randn(rng, 7)},
        ),
        "gelu": (layers.gelu_forward, {"x": x}),
        "relu": (layers.relu_forward, {"x": x}),
        "softmax": (layers.softmax_forward, {"x": x * 3}),
        "attention": (
            lambda q, k, v: layers.attention_forward(q, k, v, causal=True, key_padding_mask=mask),
            {"q": q, "k": k, "v": v},
        ),
        "cross_entropy": (
            lambda logits: layers.cross_entropy_forward(logits, targets),
            {"logits": randn(rng, 2, 5, 13) * 3},
        ),
        "dropout": (lambda x: layers.dropout_forward(x, 0.25, np.random.default_rng(2)), {"x": x}),
    }


@pytest.mark.parametrize("name", list(float32_cases()))
def test_float32_forward_matches_float64_and_stays_float32(name):
    forward, inputs = float32_cases()[name]
    out64, cache64 = forward(**inputs)
    inputs32 = {k: a.astype(np.float32) for k, a in inputs.items()}
    out32, cache32 = forward(**inputs32)
    assert out32.dtype == np.float32
    assert rel_error(out32, out64) <= 1e-5
    # the backward stays in float32 too, and agrees with float64
    dout = np.random.default_rng(3).standard_normal(np.shape(out32))
    grads32 = forward_backward_of(name)(dout.astype(np.float32), cache32)
    grads64 = forward_backward_of(name)(dout, cache64)
    grads32 = grads32 if isinstance(grads32, tuple) else (grads32,)
    grads64 = grads64 if isinstance(grads64, tuple) else (grads64,)
    for g32, g64 in zip(grads32, grads64, strict=True):
        if g32 is not None:
            assert g32.dtype == np.float32, name
            assert rel_error(g32, g64) <= 1e-5, name


def forward_backward_of(name):
    return {
        "embedding": layers.embedding_backward,
        "linear": layers.linear_backward,
        "layernorm": layers.layernorm_backward,
        "gelu": layers.gelu_backward,
        "relu": layers.relu_backward,
        "softmax": layers.softmax_backward,
        "attention": layers.attention_backward,
        "cross_entropy": lambda d, c: layers.cross_entropy_backward(1.0, c),
        "dropout": layers.dropout_backward,
    }[name]


# ----------------------------------------------------------------------------------------------
# Bad input: the error names the argument, what was expected and what came


def test_embedding_rejects_out_of_range_negative_and_float_ids():
    W = np.zeros((13, 4))
    with pytest.raises(
        ValueError, match=re.escape("idx: token ids must be in [0, 13)") + ".*got 13"
    ):
        layers.embedding_forward(np.array([[0, 13]]), W)
    with pytest.raises(
        ValueError, match=re.escape("idx: token ids must be in [0, 13)") + ".*got -1"
    ):
        layers.embedding_forward(np.array([[-1, 2]]), W)
    with pytest.raises(TypeError, match="idx must be an integer array.*got float64"):
        layers.embedding_forward(np.array([[0.0, 1.0]]), W)
    with pytest.raises(TypeError, match="idx must be an integer array.*got list"):
        layers.embedding_forward([[0, 1]], W)
    with pytest.raises(TypeError, match="W must be a float32 or float64 array, got int64"):
        layers.embedding_forward(np.array([0]), np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=re.escape("W must have shape (V, C), got shape (3,)")):
        layers.embedding_forward(np.array([0]), np.zeros(3))


@pytest.mark.parametrize(
    "name, call",
    [
        ("x", lambda a: layers.linear_forward(a, np.zeros((3, 2)))),
        ("W", lambda a: layers.linear_forward(np.zeros((2, 3)), a.T)),
        ("x", lambda a: layers.layernorm_forward(a, np.ones(3), np.zeros(3))),
        ("gamma", lambda a: layers.layernorm_forward(np.zeros((2, 3)), a[0], np.zeros(3))),
        ("x", lambda a: layers.gelu_forward(a)),
        ("x", lambda a: layers.relu_forward(a)),
        ("x", lambda a: layers.softmax_forward(a)),
        ("x", lambda a: layers.dropout_forward(a, 0.1, np.random.default_rng(0))),
        ("logits", lambda a: layers.cross_entropy_forward(a, np.array([0, 1]))),
        (
            "q",
            lambda a: layers.attention_forward(
                a[None, None], np.zeros((1, 1, 2, 3)), np.zeros((1, 1, 2, 3))
            ),
        ),
    ],
)
def test_float_layers_reject_integer_arrays(name, call):
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    with pytest.raises(TypeError, match=rf"^{name} must be a float32 or float64 array, got int64"):
        call(ints)


def test_linear_rejects_shape_mismatches():
    with pytest.raises(
        ValueError, match=re.escape("Cin = 4") + ".*" + re.escape("got x of shape (2, 3)")
    ):
        layers.linear_forward(np.zeros((2, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=re.escape("b must have shape (5,), got (4,)")):
        layers.linear_forward(np.zeros((2, 4)), np.zeros((4, 5)), np.zeros(4))


def test_layernorm_rejects_wrong_gain_shape():
    with pytest.raises(
        ValueError, match=re.escape("shape (3,)") + ".*" + re.escape("got (4,) and (3,)")
    ):
        layers.layernorm_forward(np.zeros((2, 3)), np.ones(4), np.zeros(3))


def test_attention_rejects_disagreeing_shapes_dtypes_and_masks():
    q, k, v = np.zeros((2, 2, 3, 4)), np.zeros((2, 2, 3, 4)), np.zeros((2, 2, 3, 4))
    with pytest.raises(
        ValueError,
        match=re.escape("k and v must have the same shape, got k (2, 2, 3, 4) and v (2, 2, 5, 4)"),
    ):
        layers.attention_forward(q, k, np.zeros((2, 2, 5, 4)))
    with pytest.raises(ValueError, match=re.escape("got q (2, 2, 3, 4) and k (2, 2, 3, 5)")):
        layers.attention_forward(q, np.zeros((2, 2, 3, 5)), np.zeros((2, 2, 3, 5)))
    with pytest.raises(ValueError, match=re.escape("got q (2, 2, 3, 4) and k (1, 2, 3, 4)")):
        layers.attention_forward(q, np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4)))
    with pytest.raises(
        ValueError, match=re.escape("q must have shape (B, H, T, D), got shape (3, 4)")
    ):
        layers.attention_forward(np.zeros((3, 4)), k, v)
    with pytest.raises(
        TypeError, match="q, k and v must share a dtype, got float32, float64, float64"
    ):
        layers.attention_forward(q.astype(np.float32), k, v)
    with pytest.raises(
        ValueError, match="causal attention needs at least as many keys as queries, got Tq=3, Tk=2"
    ):
        layers.attention_forward(q, k[:, :, :2], v[:, :, :2], causal=True)
    expected = "key_padding_mask must be a bool array (B, Tk), got int64"
    with pytest.raises(TypeError, match=re.escape(expected)):
        layers.attention_forward(q, k, v, key_padding_mask=np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(
        ValueError, match=re.escape("key_padding_mask must have shape (B, Tk) = (2, 3), got (2, 4)")
    ):
        layers.attention_forward(q, k, v, key_padding_mask=np.zeros((2, 4), dtype=bool))


def test_attention_rejects_a_mask_that_is_not_an_array():
    q = np.zeros((1, 1, 3, 2))
    with pytest.raises(TypeError, match="key_padding_mask"):
        layers.attention_forward(q, q, q, causal=False, key_padding_mask=[[False, False, True]])


def test_cross_entropy_rejects_bad_targets():
    logits = np.zeros((2, 3, 5))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "targets must have the shape of logits without its last axis, (2, 3), got (2, 4)"
        ),
    ):
        layers.cross_entropy_forward(logits, np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(
        ValueError, match=re.escape("targets must be in [0, 5) or equal ignore_index=-100, got 5")
    ):
        layers.cross_entropy_forward(logits, np.array([[0, 1, 5], [0, 0, 0]]))
    with pytest.raises(
        ValueError, match=re.escape("targets must be in [0, 5) or equal ignore_index=-100, got -3")
    ):
        layers.cross_entropy_forward(logits, np.array([[0, 1, -3], [0, 0, 0]]))
    with pytest.raises(
        TypeError, match="targets must be an integer array of token ids, got float64"
    ):
        layers.cross_entropy_forward(logits, np.zeros((2, 3)))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, "0.1", None])
def test_dropout_rejects_bad_p(p):
    expected = f"dropout p must be a number in [0, 1), got {p!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        layers.dropout_forward(np.zeros(3), p, np.random.default_rng(0))


@pytest.mark.parametrize("eps", [0.0, -1e-5, "1e-5"])
def test_layernorm_rejects_bad_eps(eps):
    ones = np.ones(4)
    with pytest.raises(ValueError, match=re.escape(f"eps must be a positive number, got {eps!r}")):
        layers.layernorm_forward(np.zeros((2, 4)), ones, ones, eps=eps)


def test_numpy_scalar_hyperparameters_keep_float32():
    x = np.ones((2, 4), dtype=np.float32)
    out, _ = layers.layernorm_forward(x, x[0], x[0], eps=np.float64(1e-5))
    assert out.dtype == np.float32
    out, _ = layers.dropout_forward(x, np.float64(0.5), np.random.default_rng(0))
    assert out.dtype == np.float32
