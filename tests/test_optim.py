"""Tests for tinylm.optim: SGD, AdamW, gradient clipping and the learning-rate schedule.

The reference updates are written out again here, in float64 and with plain (not in-place)
NumPy, straight from the formulas, so that they do not share code with tinylm.optim.
"""

import math

import numpy as np
import pytest

from tinylm.optim import SGD, AdamW, clip_grad_norm, lr_schedule


def make_params(dtype=np.float64, seed=0):
    """A tiny stand-in for a model: one matrix (decayed by default) and one bias (not decayed)."""
    rng = np.random.default_rng(seed)
    return {
        "h.0.mlp.c_fc.weight": rng.standard_normal((3, 4)).astype(dtype),
        "h.0.mlp.c_fc.bias": rng.standard_normal(4).astype(dtype),
    }


def make_grads(params, rng):
    return {name: rng.standard_normal(p.shape).astype(p.dtype) for name, p in params.items()}


# ----------------------------------------------------------------------------------------------
# AdamW


def adamw_reference(p, grads_seq, lr, b1, b2, eps, wd):
    """AdamW on one array, written from Loshchilov & Hutter / torch.optim.AdamW."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads_seq, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
    return p


def test_adamw_matches_formula_with_decay_on_matrices_only():
    params = make_params()
    start = {name: p.copy() for name, p in params.items()}
    lr, betas, eps, wd = 0.01, (0.8, 0.95), 1e-6, 0.1
    opt = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    rng = np.random.default_rng(1)
    seq = [make_grads(params, rng) for _ in range(6)]
    for grads in seq:
        opt.step(grads)
    w, b = "h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias"
    ref_w = adamw_reference(start[w], [g[w] for g in seq], lr, *betas, eps, wd)
    ref_b = adamw_reference(start[b], [g[b] for g in seq], lr, *betas, eps, 0.0)  # 1-D: no decay
    np.testing.assert_allclose(params[w], ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params[b], ref_b, rtol=1e-12, atol=1e-14)
    assert opt.t == 6
    assert opt.decayed == {w}


def test_adamw_no_decay_overrides_the_default():
    params = make_params()
    start = {name: p.copy() for name, p in params.items()}
    opt = AdamW(params, lr=0.1, weight_decay=0.5, no_decay=[])  # decay everything
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    opt.step(grads)  # zero gradient: only the decay p *= 1 - lr * wd acts
    for name in params:
        np.testing.assert_allclose(params[name], start[name] * (1 - 0.1 * 0.5), rtol=1e-15)


def test_adamw_lr_override_is_for_one_step():
    a, b = make_params(), make_params()
    opt_a, opt_b = AdamW(a, lr=0.1), AdamW(b, lr=0.05)
    grads = make_grads(a, np.random.default_rng(2))
    opt_a.step(grads, lr=0.05)
    opt_b.step(grads)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert opt_a.lr == 0.1


def test_adamw_minimises_a_quadratic():
    # f(p) = 0.5 * sum(d * (p - target)^2), gradient d * (p - target); minimum at target.
    rng = np.random.default_rng(3)
    target = rng.standard_normal((5, 5))
    d = rng.uniform(0.1, 10.0, size=(5, 5))  # badly scaled on purpose: Adam does not mind
    params = {"w": np.zeros((5, 5))}
    opt = AdamW(params, lr=0.05)
    for step in range(1500):
        lr = lr_schedule(step, 0.05, warmup_steps=10, decay_steps=1500, min_lr=1e-4)
        opt.step({"w": d * (params["w"] - target)}, lr=lr)
    np.testing.assert_allclose(params["w"], target, atol=1e-3)


def test_adamw_keeps_float32():
    params = make_params(np.float32)
    opt = AdamW(params, lr=np.float64(1e-2), betas=(np.float64(0.9), 0.99), weight_decay=0.1)
    rng = np.random.default_rng(4)
    for _ in range(3):
        opt.step(make_grads(params, rng), lr=np.float64(3e-3))  # NumPy scalars must not promote
        # float64 gradients are computed with in float32 too
        opt.step({n: g.astype(np.float64) for n, g in make_grads(params, rng).items()})
    for name, p in params.items():
        assert p.dtype == np.float32, name
        assert opt.m[name].dtype == opt.v[name].dtype == np.float32, name


def test_adamw_updates_in_place():
    params = make_params()
    arrays = dict(params)  # the same array objects
    AdamW(params, lr=0.1).step(make_grads(params, np.random.default_rng(5)))
    for name in params:
        assert params[name] is arrays[name]


def run_steps(opt, params, rng, n):
    for _ in range(n):
        opt.step(make_grads(params, rng))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_state_dict_round_trip_is_bit_exact(dtype):
    params = make_params(dtype)
    opt = AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    run_steps(opt, params, np.random.default_rng(6), 5)
    state = opt.state_dict()
    saved_params = {name: p.copy() for name, p in params.items()}

    # Continue the original for 5 steps ...
    run_steps(opt, params, np.random.default_rng(7), 5)
    # ... and a fresh optimiser (other hyperparameters, restored from the state) for the same 5.
    params2 = saved_params
    opt2 = AdamW(params2, lr=1.0, betas=(0.5, 0.5), eps=1e-3)
    opt2.load_state_dict(state)
    run_steps(opt2, params2, np.random.default_rng(7), 5)

    for name in params:
        np.testing.assert_array_equal(params[name], params2[name])
        np.testing.assert_array_equal(opt.m[name], opt2.m[name])
        np.testing.assert_array_equal(opt.v[name], opt2.v[name])
    assert opt2.t == opt.t == 10
    assert (opt2.lr, opt2.betas, opt2.eps, opt2.decayed) == (
        opt.lr,
        opt.betas,
        opt.eps,
        opt.decayed,
    )


def test_adamw_state_dict_is_plain_and_a_copy():
    params = make_params()
    opt = AdamW(params)
    run_steps(opt, params, np.random.default_rng(8), 2)
    state = opt.state_dict()
    assert state["step"] == 2 and isinstance(state["step"], int)
    assert state["betas"] == [0.9, 0.999] and state["no_decay"] == ["h.0.mlp.c_fc.bias"]
    m_before = state["m"]["h.0.mlp.c_fc.weight"].copy()
    run_steps(opt, params, np.random.default_rng(9), 1)
    np.testing.assert_array_equal(state["m"]["h.0.mlp.c_fc.weight"], m_before)


def test_adamw_load_state_dict_validates():
    params = make_params()
    state = AdamW(params).state_dict()
    opt = AdamW(make_params())

    bad = dict(state, m={**state["m"], "h.0.mlp.c_fc.weight": np.zeros((4, 3))})
    with pytest.raises(
        ValueError, match=r"state\['m'\]\['h.0.mlp.c_fc.weight'\] has shape \(4, 3\)"
    ):
        opt.load_state_dict(bad)
    bad = dict(state, v={"h.0.mlp.c_fc.weight": state["v"]["h.0.mlp.c_fc.weight"]})
    with pytest.raises(ValueError, match=r"state\['v'\].*h.0.mlp.c_fc.bias"):
        opt.load_state_dict(bad)
    bad = {k: val for k, val in state.items() if k != "eps"}
    with pytest.raises(ValueError, match="state has no entry 'eps'"):
        opt.load_state_dict(bad)
    assert opt.t == 0  # a failed load changes nothing


def test_adamw_bad_arguments():
    params = make_params()
    with pytest.raises(ValueError, match=r"lr must be a finite number >= 0.0, got -0.1"):
        AdamW(params, lr=-0.1)
    with pytest.raises(
        ValueError, match=r"betas\[1\] must be a finite number in \[0.0, 1.0\), got 1.0"
    ):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"betas\[0\] .* got -0.5"):
        AdamW(params, betas=(-0.5, 0.9))
    with pytest.raises(ValueError, match="betas must be a pair"):
        AdamW(params, betas=0.9)
    with pytest.raises(ValueError, match="no_decay names parameter.*'nope'"):
        AdamW(params, no_decay=["nope"])
    with pytest.raises(TypeError, match="parameter 'x' must be a floating-point array"):
        AdamW({"x": np.arange(3)})
    with pytest.raises(ValueError, match="params must hold at least one parameter"):
        AdamW({})

    opt = AdamW(params)
    grads = make_grads(params, np.random.default_rng(0))
    with pytest.raises(
        ValueError, match=r"grads has no gradient for parameter\(s\) \['h.0.mlp.c_fc.bias'\]"
    ):
        opt.step({"h.0.mlp.c_fc.weight": grads["h.0.mlp.c_fc.weight"]})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['extra'\]"):
        opt.step({**grads, "extra": np.zeros(2)})
    with pytest.raises(
        ValueError, match=r"gradient of 'h.0.mlp.c_fc.bias' must have .* \(4,\), got \(5,\)"
    ):
        opt.step({**grads, "h.0.mlp.c_fc.bias": np.zeros(5)})
    with pytest.raises(ValueError, match="lr must be a finite number >= 0.0, got -1.0"):
        opt.step(grads, lr=-1.0)
    assert opt.t == 0


# ----------------------------------------------------------------------------------------------
# SGD


def test_sgd_momentum_matches_formula():
    params = make_params()
    start = {name: p.copy() for name, p in params.items()}
    lr, mu, wd = 0.1, 0.9, 0.01
    opt = SGD(params, lr=lr, momentum=mu, weight_decay=wd)
    rng = np.random.default_rng(10)
    seq = [make_grads(params, rng) for _ in range(5)]
    for grads in seq:
        opt.step(grads)
    for name, p0 in start.items():
        decay = wd if p0.ndim >= 2 else 0.0
        p, buf = p0.copy(), np.zeros_like(p0)
        for grads in seq:
            g = grads[name] + decay * p
            buf = mu * buf + g
            p = p - lr * buf
        np.testing.assert_allclose(params[name], p, rtol=1e-13, atol=1e-15)


def test_sgd_plain_and_float32():
    params = make_params(np.float32)
    start = {name: p.copy() for name, p in params.items()}
    grads = make_grads(params, np.random.default_rng(11))
    opt = SGD(params, lr=0.5)
    opt.step(grads, lr=np.float64(0.25))
    for name in params:
        assert params[name].dtype == np.float32
        np.testing.assert_allclose(params[name], start[name] - 0.25 * grads[name], rtol=1e-6)
    assert opt.buffers == {}


def test_sgd_state_dict_round_trip_is_bit_exact():
    params = make_params(np.float32)
    opt = SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    run_steps(opt, params, np.random.default_rng(12), 5)
    state = opt.state_dict()
    params2 = {name: p.copy() for name, p in params.items()}
    opt2 = SGD(params2, lr=1.0)
    opt2.load_state_dict(state)
    run_steps(opt, params, np.random.default_rng(13), 5)
    run_steps(opt2, params2, np.random.default_rng(13), 5)
    for name in params:
        np.testing.assert_array_equal(params[name], params2[name])


def test_sgd_bad_arguments():
    params = make_params()
    with pytest.raises(ValueError, match="lr must be a finite number >= 0.0, got -1.0"):
        SGD(params, lr=-1)
    with pytest.raises(
        ValueError, match=r"momentum must be a finite number in \[0.0, 1.0\), got 1.5"
    ):
        SGD(params, lr=0.1, momentum=1.5)
    with pytest.raises(TypeError, match="lr must be a number, got str"):
        SGD(params, lr="fast")
    with pytest.raises(TypeError, match="params must be a dict"):
        SGD([np.zeros(3)], lr=0.1)


# ----------------------------------------------------------------------------------------------
# clip_grad_norm


def test_clip_grad_norm_scales_above_max():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0], [4.0]], dtype=np.float32)}
    norm = clip_grad_norm(grads, max_norm=1.0)
    assert isinstance(norm, float) and norm == 5.0  # sqrt(3^2 + 4^2) over both tensors
    assert grads["b"].dtype == np.float32
    new_norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    assert new_norm == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-6)  # direction kept


def test_clip_grad_norm_leaves_small_gradients_alone():
    grads = {"a": np.array([0.3, 0.4])}
    before = grads["a"].copy()
    assert clip_grad_norm(grads, max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(grads["a"], before)


def test_clip_grad_norm_non_finite_is_reported_not_applied():
    grads = {"a": np.array([np.inf, 1.0])}
    assert clip_grad_norm(grads, 1.0) == math.inf
    assert grads["a"][1] == 1.0


def test_clip_grad_norm_bad_arguments():
    with pytest.raises(ValueError, match="max_norm must be positive, got 0.0"):
        clip_grad_norm({"a": np.ones(2)}, 0)
    with pytest.raises(ValueError, match="max_norm must be a finite number >= 0.0, got -1.0"):
        clip_grad_norm({"a": np.ones(2)}, -1.0)
    with pytest.raises(ValueError, match="grads must be a non-empty dict"):
        clip_grad_norm({}, 1.0)


# ----------------------------------------------------------------------------------------------
# lr_schedule


def test_lr_schedule_warmup_values():
    lrs = [lr_schedule(s, lr=1.0, warmup_steps=4, decay_steps=20, min_lr=0.1) for s in range(4)]
    assert lrs == [0.25, 0.5, 0.75, 1.0]  # lr * (step + 1) / warmup_steps


def test_lr_schedule_endpoints_and_monotonic():
    lr, min_lr, warmup, decay_steps = 6e-4, 6e-5, 10, 100
    lrs = [lr_schedule(s, lr, warmup, decay_steps, min_lr) for s in range(130)]
    assert lrs[warmup - 1] == lr and lrs[warmup] == lr  # the cosine starts at the peak
    assert lrs[decay_steps] == min_lr and all(x == min_lr for x in lrs[decay_steps:])
    mid = (warmup + decay_steps) // 2
    assert lrs[mid] == pytest.approx((lr + min_lr) / 2)  # cos(pi / 2) = 0: half way
    assert np.all(np.diff(lrs[:warmup]) > 0)  # rising during warmup
    assert np.all(np.diff(lrs[warmup:]) <= 0)  # then never rising
    assert all(0 < x <= lr for x in lrs) and all(x >= min_lr for x in lrs[warmup:])


def test_lr_schedule_without_warmup_and_returns_float():
    assert lr_schedule(0, lr=1.0, warmup_steps=0, decay_steps=10, min_lr=0.0) == 1.0
    assert isinstance(lr_schedule(np.int64(3), np.float32(1.0), 2, 10, 0.0), float)
    assert lr_schedule(5, lr=1.0, warmup_steps=5, decay_steps=5, min_lr=0.2) == 0.2


def test_lr_schedule_bad_arguments():
    with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
        lr_schedule(-1, 1.0, 1, 10, 0.0)
    with pytest.raises(ValueError, match="warmup_steps must be at most decay_steps=10, got 11"):
        lr_schedule(0, 1.0, 11, 10, 0.0)
    with pytest.raises(ValueError, match="min_lr must be at most lr=0.1, got 0.2"):
        lr_schedule(0, 0.1, 1, 10, 0.2)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0.0, got -0.1"):
        lr_schedule(0, -0.1, 1, 10, 0.0)


def test_lr_schedule_takes_decay_steps_and_its_old_name():
    # TrainConfig calls the length of the decay lr_decay_steps; the schedule's parameter says
    # decay_steps too. Code written for the old name max_steps gets the same numbers.
    new = [lr_schedule(s, 1.0, 3, decay_steps=12, min_lr=0.1) for s in range(15)]
    old = [lr_schedule(s, 1.0, 3, max_steps=12, min_lr=0.1) for s in range(15)]
    assert new == old == [lr_schedule(s, 1.0, 3, 12, 0.1) for s in range(15)]
    with pytest.raises(TypeError, match="not both"):
        lr_schedule(0, 1.0, 3, 12, 0.1, max_steps=12)
    with pytest.raises(ValueError, match="warmup_steps must be at most decay_steps=2"):
        lr_schedule(0, 1.0, 3, 2, 0.1)
