"""GPU tests: the fused attention kernel and the whole GPT on CuPy (skipped without a GPU).

Run on a machine with an NVIDIA GPU and CuPy:  pytest tests/test_gpu.py -q
Everything here is compared with float64 NumPy (or the NumPy model) on the CPU;
relative error = max|a - b| / max|b| over the whole array.

Why q is the input scaled by 10 in the main accuracy test and not q, k and v together: scaling
q by 10 makes the logits 10x larger (a very peaked softmax that exercises the online rescale);
scaling both q and k by 10 makes them 100x larger (std ~100), where float32 rounding of the
scores alone costs ~6e-5 relative error for any float32 implementation (measured with the
float32 NumPy model), too close to 1e-4 for a stable test. That case is checked at 3e-4.
"""

import math

import numpy as np
import pytest

from tinylm import cuda

cupy = pytest.importorskip("cupy")
try:
    _N_DEVICES = cupy.cuda.runtime.getDeviceCount()
except Exception:  # CuPy raises CUDARuntimeError when there is no driver
    _N_DEVICES = 0
if _N_DEVICES == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu


def rel(a, b):
    """max|a - b| / max|b| with b the reference (host arrays or CuPy arrays)."""
    a = cupy.asnumpy(a).astype(np.float64)
    b = cupy.asnumpy(b).astype(np.float64)
    scale = np.abs(b).max()
    return np.abs(a - b).max() / scale if scale > 0 else np.abs(a - b).max()


def reference_attention(q, k, v, dout, causal, key_padding_mask):
    """out, lse, dq, dk, dv in float64 NumPy from the full (Tq, Tk) matrix."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(D)
    allowed = np.ones((B, 1, Tq, Tk), dtype=bool)
    if causal:
        allowed &= np.arange(Tk)[None, :] <= np.arange(Tq)[:, None] + (Tk - Tq)
    if key_padding_mask is not None:
        allowed &= ~key_padding_mask[:, None, None, :]
    s = np.where(allowed, q @ k.swapaxes(-1, -2) * scale, -np.inf)
    s_max = s.max(axis=-1, keepdims=True)
    s_max = np.where(np.isfinite(s_max), s_max, 0.0)
    e = np.exp(s - s_max)
    z = e.sum(axis=-1, keepdims=True)
    p = e / np.where(z > 0, z, 1.0)
    with np.errstate(divide="ignore"):
        lse = np.log(z[..., 0]) + s_max[..., 0]
    dv = p.swapaxes(-1, -2) @ dout
    dp = dout @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    return p @ v, lse, scale * ds @ k, scale * ds.swapaxes(-1, -2) @ q, dv


def float32_inputs(rng, B, H, Tq, Tk, D, q_scale=10.0, kv_scale=1.0, v_scale=10.0):
    """q, k, v, dout as float64 arrays holding float32 values (so both sides see the same)."""
    q = rng.standard_normal((B, H, Tq, D)) * q_scale
    k = rng.standard_normal((B, H, Tk, D)) * kv_scale
    v = rng.standard_normal((B, H, Tk, D)) * v_scale
    dout = rng.standard_normal((B, H, Tq, D))
    return [x.astype(np.float32).astype(np.float64) for x in (q, k, v, dout)]


def run_kernel(q, k, v, dout, causal, mask):
    """The fused kernel on the GPU, forward and backward, given host float64 arrays."""
    qg, kg, vg, dg = (cupy.asarray(x, dtype=cupy.float32) for x in (q, k, v, dout))
    mg = None if mask is None else cupy.asarray(mask)
    out, lse = cuda.flash_attention_forward(qg, kg, vg, causal=causal, key_padding_mask=mg)
    dq, dk, dv = cuda.flash_attention_backward(
        dg, qg, kg, vg, out, lse, causal=causal, key_padding_mask=mg
    )
    return out, lse, dq, dk, dv


def check_against_reference(q, k, v, dout, causal, mask, tol):
    expected = reference_attention(q, k, v, dout, causal, mask)
    got = run_kernel(q, k, v, dout, causal, mask)
    out, lse, dq, dk, dv = (cupy.asnumpy(x) for x in got)
    out_ref, lse_ref, dq_ref, dk_ref, dv_ref = expected
    empty = np.isneginf(lse_ref)  # queries with no allowed key
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    errors = {"out": rel(out, out_ref), "dv": rel(dv, dv_ref)}
    # With at most one allowed key per query (T = 1) the softmax is constant and dq, dk are 0
    # in exact arithmetic: float64 leaves ~1e-16, float32 ~1e-7 of the size of one term
    # dout * v * k / sqrt(D). Such a gradient is compared with that size instead.
    term = np.abs(dout).max() * np.abs(v).max() * max(np.abs(q).max(), np.abs(k).max())
    term /= math.sqrt(q.shape[-1])
    for name, g, g_ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref)):
        zero = np.abs(g_ref).max() <= 1e-12 * term
        errors[name] = np.abs(g - g_ref).max() / term if zero else rel(g, g_ref)
    if (~empty).any():
        errors["lse"] = rel(lse[~empty], lse_ref[~empty])
    bad = {name: err for name, err in errors.items() if not err < tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    if empty.any():
        assert np.all(out[empty] == 0) and np.all(dq[empty] == 0)


# ----------------------------------------------------------------------------------------------
# The kernel against float64


@pytest.mark.parametrize("T", [1, 17, 63, 64, 65, 1000])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_float64(T, D, causal):
    rng = np.random.default_rng(T * 10 + D + causal)
    q, k, v, dout = float32_inputs(rng, 2, 2, T, T, D)  # q and v scaled by 10
    check_against_reference(q, k, v, dout, causal, None, tol=1e-4)


@pytest.mark.parametrize("T", [17, 65, 1000])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_with_q_k_v_all_scaled_by_10(T, causal):
    """Logits with std ~100: float32 itself limits the accuracy to ~1e-4 (see the docstring)."""
    rng = np.random.default_rng(T + causal)
    q, k, v, dout = float32_inputs(rng, 2, 2, T, T, 64, q_scale=10, kv_scale=10, v_scale=10)
    check_against_reference(q, k, v, dout, causal, None, tol=3e-4)


def padding_mask(rng, B, Tk):
    """batch 0: key 0 padded (causal query 0 sees nothing); 1: random 30%; 2: every key."""
    mask = np.zeros((B, Tk), dtype=bool)
    mask[0, 0] = True
    mask[1] = rng.random(Tk) < 0.3
    mask[2] = True
    return mask


@pytest.mark.parametrize("T", [1, 17, 65, 130])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_key_padding_mask(T, D, causal):
    rng = np.random.default_rng(T + D + causal)
    q, k, v, dout = float32_inputs(rng, 3, 2, T, T, D)
    check_against_reference(q, k, v, dout, causal, padding_mask(rng, 3, T), tol=1e-4)


@pytest.mark.parametrize("Tq, Tk", [(1, 300), (5, 70), (64, 129)])
def test_kernel_kv_cache_queries(Tq, Tk):
    """Tq < Tk: query i sits at position Tk - Tq + i (generation with cached keys)."""
    rng = np.random.default_rng(Tq + Tk)
    q, k, v, dout = float32_inputs(rng, 3, 2, Tq, Tk, 64)
    for causal in (True, False):
        check_against_reference(q, k, v, dout, causal, padding_mask(rng, 3, Tk), tol=1e-4)


def test_kernel_agrees_with_the_numpy_model():
    """tinylm.flash is the kernel's algorithm: same answers in float32, to float32 noise."""
    from tinylm.flash import flash_attention_backward_numpy, flash_attention_forward_numpy

    rng = np.random.default_rng(0)
    q, k, v, dout = (x.astype(np.float32) for x in float32_inputs(rng, 2, 3, 200, 200, 64))
    out_m, lse_m = flash_attention_forward_numpy(q, k, v, True)
    grads_m = flash_attention_backward_numpy(dout, q, k, v, out_m, lse_m, True)
    out, lse, *grads = run_kernel(q, k, v, dout, True, None)
    assert rel(out, out_m) < 1e-4 and rel(lse, lse_m) < 1e-5
    for g, g_m in zip(grads, grads_m, strict=True):
        assert rel(g, g_m) < 1e-4


def test_noncontiguous_inputs_are_copied():
    """The GPT hands over q, k, v as transposed views of one qkv array."""
    rng = np.random.default_rng(1)
    B, T, H, D = 2, 70, 3, 32
    qkv = cupy.asarray(rng.standard_normal((B, T, 3, H, D)), dtype=cupy.float32)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # 3 x (B, H, T, D), not contiguous
    assert not q.flags.c_contiguous
    out, lse = cuda.flash_attention_forward(q, k, v)
    out_c, lse_c = cuda.flash_attention_forward(*(cupy.ascontiguousarray(x) for x in (q, k, v)))
    assert cupy.array_equal(out, out_c) and cupy.array_equal(lse, lse_c)


def test_no_t_by_t_buffer():
    """Forward + backward at T = 4096 allocate O(T*D) memory, far less than one T x T matrix."""
    B, H, T, D = 1, 2, 4096, 64
    pool = cupy.get_default_memory_pool()
    q, k, v, dout = (
        cupy.random.standard_normal((B, H, T, D), dtype=cupy.float32) for _ in range(4)
    )
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    out, lse = cuda.flash_attention_forward(q, k, v)
    grads = cuda.flash_attention_backward(dout, q, k, v, out, lse)
    cupy.cuda.Device().synchronize()
    grown = pool.total_bytes() - before
    one_score_matrix = B * H * T * T * 4
    assert grown < one_score_matrix / 8, f"grew by {grown} bytes"
    assert all(bool(cupy.isfinite(g).all()) for g in grads)


# ----------------------------------------------------------------------------------------------
# The wrapper's checks


def test_kernel_supports():
    x = cupy.zeros((2, 2, 10, 64), dtype=cupy.float32)
    mask = cupy.zeros((2, 10), dtype=bool)
    assert cuda.kernel_supports(x, x, x, True, None)
    assert cuda.kernel_supports(x, x, x, False, mask)
    assert cuda.kernel_supports(x[:, :, :3], x, x, True, mask)  # Tq < Tk
    assert not cuda.kernel_supports(x.astype(cupy.float64), x, x, True, None)
    assert not cuda.kernel_supports(cupy.asnumpy(x), x, x, True, None)
    d16 = cupy.zeros((2, 2, 10, 16), dtype=cupy.float32)
    assert not cuda.kernel_supports(d16, d16, d16, True, None)
    assert not cuda.kernel_supports(x, x, x, True, mask.astype(cupy.int32))
    assert not cuda.kernel_supports(x, x, x, True, mask[:, :5])


def test_wrapper_errors_name_the_argument():
    x = cupy.zeros((2, 2, 10, 64), dtype=cupy.float32)
    with pytest.raises(TypeError, match=r"q must be float32.*got float64"):
        cuda.flash_attention_forward(x.astype(cupy.float64), x, x)
    with pytest.raises(TypeError, match="k must be a CuPy array"):
        cuda.flash_attention_forward(x, cupy.asnumpy(x), x)
    with pytest.raises(ValueError, match=r"head size D .* must be one of .* got 16"):
        d16 = cupy.zeros((2, 2, 10, 16), dtype=cupy.float32)
        cuda.flash_attention_forward(d16, d16, d16)
    with pytest.raises(ValueError, match="q must have shape"):
        cuda.flash_attention_forward(x[0], x, x)
    with pytest.raises(ValueError, match="k must have shape"):
        cuda.flash_attention_forward(x, x[:1], x)
    with pytest.raises(ValueError, match="v must have the shape of k"):
        cuda.flash_attention_forward(x, x, x[:, :, :5])
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        cuda.flash_attention_forward(x, x, x, key_padding_mask=cupy.zeros((2, 10), cupy.int32))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Tk\)"):
        cuda.flash_attention_forward(x, x, x, key_padding_mask=cupy.zeros((2, 9), bool))
    out, lse = cuda.flash_attention_forward(x, x, x)
    with pytest.raises(ValueError, match="lse must have shape"):
        cuda.flash_attention_backward(x, x, x, x, out, lse[:, :, :5])
    with pytest.raises(ValueError, match="dout must have the shape of q"):
        cuda.flash_attention_backward(x[:, :, :5], x, x, x, out, lse)


# ----------------------------------------------------------------------------------------------
# The attention layer and the whole GPT on the GPU


def test_layer_uses_the_kernel_and_agrees_with_the_reference_path():
    from tinylm import cuda, layers

    rng = np.random.default_rng(2)
    q, k, v, dout = (
        cupy.asarray(x, dtype=cupy.float32) for x in float32_inputs(rng, 2, 4, 100, 100, 64)
    )
    out, cache = cuda.attention_forward(q, k, v, causal=True)
    assert isinstance(cache, cuda.KernelCache)
    out_ref, cache_ref = layers.attention_forward(q, k, v, causal=True)
    assert not isinstance(cache_ref, cuda.KernelCache)
    assert rel(out, out_ref) < 1e-4
    for g, g_ref in zip(
        cuda.attention_backward(dout, cache),
        layers.attention_backward(dout, cache_ref),
        strict=True,
    ):
        assert rel(g, g_ref) < 1e-4


def gpt_config():
    from tinylm import GPTConfig

    # head size 128 / 2 = 64: the attention runs in the fused kernel
    return GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=128)


def test_gpt_on_gpu_matches_cpu(monkeypatch):
    from tinylm import GPT, set_backend

    calls = []
    kernel_forward = cuda.flash_attention_forward
    monkeypatch.setattr(
        cuda,
        "flash_attention_forward",
        lambda *a, **kw: calls.append(1) or kernel_forward(*a, **kw),
    )

    rng = np.random.default_rng(0)
    idx = rng.integers(0, 65, size=(4, 50))  # T = 50: a partial tile
    targets = rng.integers(0, 65, size=(4, 50))

    cpu = GPT(gpt_config(), seed=0, dtype=np.float32)
    logits_cpu, loss_cpu = cpu.forward(idx, targets)
    grads_cpu = cpu.backward()

    set_backend("gpu")
    try:
        gpu = GPT(gpt_config(), seed=0, dtype=np.float32).to("gpu")
        logits_gpu, loss_gpu = gpu.forward(cupy.asarray(idx), cupy.asarray(targets))
        grads_gpu = gpu.backward()
    finally:
        set_backend("numpy")

    assert len(calls) == gpt_config().n_layer  # every layer's attention took the kernel
    assert rel(logits_gpu, logits_cpu) < 1e-4
    assert abs(float(loss_gpu) - float(loss_cpu)) <= 1e-4 * abs(float(loss_cpu))
    assert grads_gpu.keys() == grads_cpu.keys() == gpu.params.keys()
    bad = {name: rel(grads_gpu[name], grads_cpu[name]) for name in grads_cpu}
    bad = {name: err for name, err in bad.items() if not err < 1e-4}
    assert not bad, f"gradients differing by more than 1e-4 relative: {bad}"


def test_adamw_training_on_gpu_matches_cpu():
    """A few AdamW steps give the same losses on both devices, up to float32 noise.

    Adam's first steps move each weight by about lr * sign(g), so weights whose gradient is
    ~0 can move differently on the two devices; they barely affect the loss, hence 1e-3.
    """
    from tinylm import GPT, set_backend
    from tinylm.optim import AdamW

    rng = np.random.default_rng(1)
    idx = rng.integers(0, 65, size=(4, 64))
    targets = np.roll(idx, -1, axis=1)

    def train(device, idx, targets):
        model = GPT(gpt_config(), seed=0, dtype=np.float32).to(device)
        opt = AdamW(model.params, lr=1e-3)
        losses = []
        for _ in range(5):
            _, loss = model.forward(idx, targets)
            opt.step(model.backward())
            losses.append(float(loss))
        return losses

    losses_cpu = train("cpu", idx, targets)
    set_backend("gpu")
    try:
        losses_gpu = train("gpu", cupy.asarray(idx), cupy.asarray(targets))
    finally:
        set_backend("numpy")
    assert losses_cpu[-1] < losses_cpu[0]  # it learns
    np.testing.assert_allclose(losses_gpu, losses_cpu, rtol=1e-3)
