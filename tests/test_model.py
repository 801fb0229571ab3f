"""Tests for tinylm.model: GPT-2's parameter table, initialisation, a forward written out
independently here, every parameter gradient against central differences, float32, dropout,
and bad input."""

import math
import re

import numpy as np
import pytest

from tinylm import gradcheck
from tinylm.gradcheck import check_model, format_table, randomize_params, rel_error
from tinylm.model import GPT, GPTConfig, init_params

V, BLOCK, C, NH = 11, 6, 8, 2


def tiny_config(**overrides):
    fields = dict(vocab_size=V, block_size=BLOCK, n_layer=2, n_head=NH, n_embd=C)
    fields.update(overrides)
    return GPTConfig(**fields)


def random_model(seed=0, scale=0.3, dtype=np.float64, **overrides):
    model = GPT(tiny_config(**overrides), seed=seed, dtype=dtype)
    randomize_params(model, np.random.default_rng(seed + 100), scale=scale)
    return model


# ----------------------------------------------------------------------------------------------
# The parameter table: GPT-2's names and shapes


def expected_params(V, block, C, positions="learned", tie=True, bias=True):
    """GPT-2's checkpoint layout for n_layer = 2, written out (without 'transformer.')."""
    table = [("wte.weight", (V, C))]
    if positions == "learned":
        table += [("wpe.weight", (block, C))]
    table += [
        ("h.0.ln_1.weight", (C,)),
        ("h.0.ln_1.bias", (C,)),
        ("h.0.attn.c_attn.weight", (C, 3 * C)),
        ("h.0.attn.c_attn.bias", (3 * C,)),
        ("h.0.attn.c_proj.weight", (C, C)),
        ("h.0.attn.c_proj.bias", (C,)),
        ("h.0.ln_2.weight", (C,)),
        ("h.0.ln_2.bias", (C,)),
        ("h.0.mlp.c_fc.weight", (C, 4 * C)),
        ("h.0.mlp.c_fc.bias", (4 * C,)),
        ("h.0.mlp.c_proj.weight", (4 * C, C)),
        ("h.0.mlp.c_proj.bias", (C,)),
        ("h.1.ln_1.weight", (C,)),
        ("h.1.ln_1.bias", (C,)),
        ("h.1.attn.c_attn.weight", (C, 3 * C)),
        ("h.1.attn.c_attn.bias", (3 * C,)),
        ("h.1.attn.c_proj.weight", (C, C)),
        ("h.1.attn.c_proj.bias", (C,)),
        ("h.1.ln_2.weight", (C,)),
        ("h.1.ln_2.bias", (C,)),
        ("h.1.mlp.c_fc.weight", (C, 4 * C)),
        ("h.1.mlp.c_fc.bias", (4 * C,)),
        ("h.1.mlp.c_proj.weight", (4 * C, C)),
        ("h.1.mlp.c_proj.bias", (C,)),
        ("ln_f.weight", (C,)),
        ("ln_f.bias", (C,)),
    ]
    if not tie:
        table += [("lm_head.weight", (V, C))]
    if not bias:
        table = [(n, s) for n, s in table if not n.endswith(".bias")]
    return table


CONFIGS = [
    dict(positions="learned", tie_weights=True, bias=True),
    dict(positions="sinusoidal", tie_weights=True, bias=True),
    dict(positions="learned", tie_weights=False, bias=True),
    dict(positions="sinusoidal", tie_weights=False, bias=False),
    dict(positions="learned", tie_weights=True, bias=False),
]


def config_id(cfg):
    tie = "tied" if cfg["tie_weights"] else "untied"
    bias = "bias" if cfg["bias"] else "nobias"
    return f"{cfg['positions']}-{tie}-{bias}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_param_names_and_shapes_are_gpt2s(cfg):
    model = GPT(tiny_config(**cfg))
    got = [(name, a.shape) for name, a in model.params.items()]
    assert got == expected_params(V, BLOCK, C, cfg["positions"], cfg["tie_weights"], cfg["bias"])


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_num_params_by_formula(cfg):
    model = GPT(tiny_config(**cfg))
    n_layer = 2
    # per block: c_attn C*3C (+3C), c_proj C*C (+C), c_fc C*4C (+4C), mlp c_proj 4C*C (+C),
    # two LayerNorm gains C each (+ two LayerNorm biases C each)
    per_block = 12 * C * C + 2 * C + (3 * C + C + 4 * C + C + 2 * C if cfg["bias"] else 0)
    expected = V * C + n_layer * per_block + C + (C if cfg["bias"] else 0)
    if cfg["positions"] == "learned":
        expected += BLOCK * C
    if not cfg["tie_weights"]:
        expected += V * C
    assert model.num_params() == expected


# ----------------------------------------------------------------------------------------------
# Initialisation


def test_init_is_deterministic_per_seed_and_seeds_differ():
    cfg = tiny_config()
    a, b, c = GPT(cfg, seed=3), GPT(cfg, seed=3), GPT(cfg, seed=4)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    for name in ("wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight"):
        assert not np.array_equal(a.params[name], c.params[name]), name
    # the float32 model is the float64 one, cast
    d = GPT(cfg, seed=3, dtype=np.float64)
    for name in a.params:
        assert a.params[name].dtype == np.float32 and d.params[name].dtype == np.float64
        np.testing.assert_array_equal(a.params[name], d.params[name].astype(np.float32))


def test_init_biases_zero_and_layernorm_gains_one():
    model = GPT(tiny_config(tie_weights=False), seed=1)
    for name, a in model.params.items():
        if name.endswith(".bias"):
            np.testing.assert_array_equal(a, 0.0, err_msg=name)
        elif "ln_" in name:
            np.testing.assert_array_equal(a, 1.0, err_msg=name)
        else:
            assert np.all(a != 0), name


def test_init_weight_statistics_on_a_wider_model():
    n_layer = 4
    cfg = GPTConfig(
        vocab_size=256, block_size=64, n_layer=n_layer, n_head=4, n_embd=64, tie_weights=False
    )
    p = init_params(cfg, seed=0)
    residual = ("attn.c_proj.weight", "mlp.c_proj.weight")
    groups = {
        "wte": [p["wte.weight"]],
        "wpe": [p["wpe.weight"]],
        "lm_head": [p["lm_head.weight"]],
        "c_attn": [p[f"h.{i}.attn.c_attn.weight"] for i in range(n_layer)],
        "c_fc": [p[f"h.{i}.mlp.c_fc.weight"] for i in range(n_layer)],
        "residual": [p[f"h.{i}.{r}"] for i in range(n_layer) for r in residual],
    }
    for group, arrays in groups.items():
        w = np.concatenate([a.ravel() for a in arrays])
        std = 0.02 / math.sqrt(2 * n_layer) if group == "residual" else 0.02
        # the sample sd of N normal draws is within a few 1/sqrt(2N) of the truth; N >= 4096 here
        assert w.std() == pytest.approx(std, rel=0.05), group
        assert abs(w.mean()) < 5 * std / math.sqrt(w.size), group
    # every residual projection on its own, too
    for i in range(n_layer):
        for r in residual:
            assert p[f"h.{i}.{r}"].std() == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.1)


def test_loss_at_init_is_about_log_vocab():
    cfg = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 65, size=(4, 16))
    targets = rng.integers(0, 65, size=(4, 16))
    logits, loss = model.forward(idx, targets)
    assert logits.shape == (4, 16, 65)
    assert np.ndim(loss) == 0
    assert abs(float(loss) - math.log(65)) < 0.1


# ----------------------------------------------------------------------------------------------
# The forward against GPT-2 written out here (picoGPT style, plain NumPy, float64)


def reference_logits(params, cfg, idx):
    P = params
    Cc, H = cfg.n_embd, cfg.n_head
    D = Cc // H
    T = idx.shape[1]
    eps = cfg.layer_norm_epsilon

    def layer_norm(x, name):
        bias = P.get(name + ".bias", np.zeros(Cc))
        return (x - np.mean(x, -1, keepdims=True)) / np.sqrt(
            np.var(x, -1, keepdims=True) + eps
        ) * P[name + ".weight"] + bias

    def dense(x, name):
        return x @ P[name + ".weight"] + P.get(name + ".bias", 0.0)

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    if cfg.positions == "learned":
        pos = P["wpe.weight"][:T]
    else:
        pos = np.array(
            [
                [
                    math.sin(t / 10000 ** (2 * (c // 2) / Cc))
                    if c % 2 == 0
                    else math.cos(t / 10000 ** (2 * (c // 2) / Cc))
                    for c in range(Cc)
                ]
                for t in range(T)
            ]
        )
    # The original Transformer scales the tokens by sqrt(C) next to its fixed sinusoids.
    token_scale = math.sqrt(Cc) if cfg.positions == "sinusoidal" else 1.0
    x = token_scale * P["wte.weight"][idx] + pos  # [B, T, C]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        qkv = dense(layer_norm(x, h + "ln_1"), h + "attn.c_attn")  # [B, T, 3C]
        q, k, v = qkv[..., :Cc], qkv[..., Cc : 2 * Cc], qkv[..., 2 * Cc :]
        heads = []
        for hh in range(H):
            cols = slice(hh * D, (hh + 1) * D)
            s = q[..., cols] @ np.swapaxes(k[..., cols], 1, 2) / math.sqrt(D)  # [B, T, T]
            s[:, future] = -np.inf
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            heads.append(w @ v[..., cols])
        x = x + dense(np.concatenate(heads, axis=-1), h + "attn.c_proj")
        x = x + dense(gelu(dense(layer_norm(x, h + "ln_2"), h + "mlp.c_fc")), h + "mlp.c_proj")
    W_out = P["wte.weight"] if cfg.tie_weights else P["lm_head.weight"]
    return layer_norm(x, "ln_f") @ W_out.T


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_forward_matches_gpt2_written_out(cfg):
    model = random_model(seed=5, **cfg)
    idx = np.random.default_rng(6).integers(0, V, size=(3, BLOCK))
    logits, loss = model.forward(idx)
    assert loss is None
    assert logits.shape == (3, BLOCK, V) and logits.dtype == np.float64
    np.testing.assert_allclose(
        logits, reference_logits(model.params, model.config, idx), rtol=1e-10, atol=1e-10
    )
    # and the loss is the cross-entropy of those logits, by hand
    targets = np.random.default_rng(7).integers(0, V, size=(3, BLOCK))
    _, loss = model.forward(idx, targets)
    ref = reference_logits(model.params, model.config, idx)
    logp = ref - ref.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.mean([logp[b, t, targets[b, t]] for b in range(3) for t in range(BLOCK)])
    assert float(loss) == pytest.approx(expected, rel=1e-10)


def test_forward_is_causal_and_batch_rows_are_independent():
    model = random_model(seed=8)
    idx = np.random.default_rng(9).integers(0, V, size=(2, BLOCK))
    logits, _ = model.forward(idx)
    changed = idx.copy()
    changed[:, 3] = (changed[:, 3] + 1) % V
    logits2, _ = model.forward(changed)
    np.testing.assert_array_equal(logits2[:, :3], logits[:, :3])  # the past cannot see the future
    assert np.abs(logits2[:, 3:] - logits[:, 3:]).max() > 1e-6
    alone, _ = model.forward(idx[1:2])
    np.testing.assert_allclose(alone[0], logits[1], rtol=1e-12, atol=1e-12)
    short, _ = model.forward(idx[:, :1])  # T = 1 works and matches the first position
    np.testing.assert_allclose(short[:, 0], logits[:, 0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Backward: every parameter against central differences


# gradcheck.model_checks (tested below) covers learned+tied and sinusoidal+untied, with biases;
# the configurations here cover the rest: no biases, T = block_size, T = 1, one head, ignored
# targets, and dropout with a pinned mask.
GRAD_CONFIGS = {
    "learned-untied-nobias-dropout-T6": (
        dict(positions="learned", tie_weights=False, bias=False, dropout=0.3),
        (1, BLOCK),
        [(0, 2)],
    ),
    "sinusoidal-tied-bias-1head-T1": (
        dict(positions="sinusoidal", tie_weights=True, bias=True, n_head=1),
        (2, 1),
        [],
    ),
}


@pytest.mark.parametrize("case", list(GRAD_CONFIGS))
def test_check_model_every_parameter(case):
    overrides, shape, ignored = GRAD_CONFIGS[case]
    model = random_model(seed=10, **overrides)
    # With dropout in training mode, check_model itself keeps the masks fixed across nudges.
    assert model.training
    rng = np.random.default_rng(11)
    idx = rng.integers(0, V, size=shape)
    targets = rng.integers(0, V, size=shape)
    for b, t in ignored:
        targets[b, t] = -100
    rows = check_model(model, idx, targets)
    assert [r.name for r in rows] == list(model.params)
    bad = [r for r in rows if not r.error <= 1e-6]
    assert not bad, "\n" + format_table(rows)


def test_model_checks_helper_passes():
    rows = gradcheck.model_checks(seed=0)
    names = [r.name for r in rows]
    assert "gpt[learned, tied]: wpe.weight" in names
    assert "gpt[sinusoidal, untied]: lm_head.weight" in names
    assert all(r.tol == gradcheck.MODEL_TOL == 1e-6 for r in rows)
    assert all(r.ok for r in rows), "\n" + format_table(rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3]], ids=config_id)
def test_backward_returns_a_gradient_for_every_parameter(dtype, cfg):
    model = GPT(tiny_config(**cfg), seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    _, loss = model.forward(rng.integers(0, V, size=(2, 4)), rng.integers(0, V, size=(2, 4)))
    assert loss.dtype == dtype
    grads = model.backward()
    assert list(grads) == list(model.params)
    for name, g in grads.items():
        assert g.shape == model.params[name].shape, name
        assert g.dtype == model.params[name].dtype, name
        assert np.all(np.isfinite(g)), name


def test_tied_gradient_is_the_sum_of_both_uses():
    # with tied weights, wte's gradient = (embedding use) + (output layer use); untie the same
    # weights and the two separate gradients must add up to the tied one
    tied = random_model(seed=14, tie_weights=True)
    untied = GPT(tiny_config(tie_weights=False), dtype=np.float64)
    for name, a in tied.params.items():
        untied.params[name][...] = a
    untied.params["lm_head.weight"][...] = tied.params["wte.weight"]
    rng = np.random.default_rng(15)
    idx, targets = rng.integers(0, V, size=(2, 5)), rng.integers(0, V, size=(2, 5))
    _, loss_t = tied.forward(idx, targets)
    _, loss_u = untied.forward(idx, targets)
    assert float(loss_t) == pytest.approx(float(loss_u), rel=1e-14)
    gt, gu = tied.backward(), untied.backward()
    np.testing.assert_allclose(
        gt["wte.weight"], gu["wte.weight"] + gu["lm_head.weight"], rtol=1e-12, atol=1e-15
    )


# ----------------------------------------------------------------------------------------------
# float32 against float64, and stability


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3]], ids=config_id)
def test_float32_model_matches_float64(cfg):
    m64 = random_model(seed=16, **cfg)
    m32 = GPT(m64.config, dtype=np.float32)
    for name, a in m64.params.items():
        m32.params[name] = a.astype(np.float32)
    rng = np.random.default_rng(17)
    idx, targets = rng.integers(0, V, size=(2, BLOCK)), rng.integers(0, V, size=(2, BLOCK))
    logits64, loss64 = m64.forward(idx, targets)
    logits32, loss32 = m32.forward(idx, targets)
    assert logits32.dtype == np.float32 and loss32.dtype == np.float32
    assert rel_error(logits32, logits64) <= 1e-5
    assert abs(float(loss32) - float(loss64)) <= 1e-5 * abs(float(loss64))
    g64, g32 = m64.backward(), m32.backward()
    for name in g64:
        assert rel_error(g32[name], g64[name]) <= 1e-5, name


def test_huge_logits_give_a_finite_loss():
    model = GPT(tiny_config(tie_weights=False), dtype=np.float64)
    model.params["lm_head.weight"][...] = 0.0
    model.params["lm_head.weight"][3] = 1e4 / math.sqrt(C)  # logit 3 is huge for every position
    model.params["ln_f.weight"][...] = 0.0
    model.params["ln_f.bias"][...] = 1.0  # ln_f(x) = all ones, so logit_v = sum(lm_head[v])
    idx = np.zeros((1, 3), dtype=np.int64)
    _, loss = model.forward(idx, np.full((1, 3), 3))
    assert abs(float(loss)) < 1e-12
    _, loss = model.forward(idx, np.full((1, 3), 0))
    assert float(loss) == pytest.approx(1e4 / math.sqrt(C) * C, rel=1e-12)
    assert all(np.all(np.isfinite(g)) for g in model.backward().values())


# ----------------------------------------------------------------------------------------------
# Dropout in train and eval mode


def test_dropout_in_train_and_eval_mode():
    model = GPT(tiny_config(dropout=0.5), seed=0, dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, V, size=(2, 5))
    assert model.training
    a, _ = model.forward(idx)
    b, _ = model.forward(idx)
    assert not np.array_equal(a, b)  # a fresh mask per call
    assert model.eval() is model and not model.training
    c, _ = model.forward(idx)
    d, _ = model.forward(idx)
    np.testing.assert_array_equal(c, d)
    no_dropout = GPT(tiny_config(dropout=0.0), seed=0, dtype=np.float64)
    np.testing.assert_allclose(c, no_dropout.forward(idx)[0], rtol=1e-13, atol=1e-13)
    assert model.train() is model and model.training


# ----------------------------------------------------------------------------------------------
# Bad input


def test_forward_rejects_bad_token_ids():
    model = GPT(tiny_config())
    with pytest.raises(
        ValueError, match=re.escape(f"idx: token ids must be in [0, {V})") + f".*got {V}"
    ):
        model.forward(np.array([[1, V]]))
    with pytest.raises(
        ValueError, match=re.escape(f"idx: token ids must be in [0, {V})") + ".*got -2"
    ):
        model.forward(np.array([[1, -2]]))
    with pytest.raises(TypeError, match="idx must be an integer array of token ids, got float64"):
        model.forward(np.array([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="idx must be an integer array of token ids, got list"):
        model.forward([[1, 2]])
    with pytest.raises(ValueError, match=re.escape("idx must have shape (B, T), got shape (3,)")):
        model.forward(np.array([1, 2, 3]))
    with pytest.raises(
        ValueError, match="idx must hold at least one token per sequence, got T = 0"
    ):
        model.forward(np.zeros((2, 0), dtype=np.int64))


def test_forward_rejects_a_sequence_longer_than_block_size():
    model = GPT(tiny_config())
    with pytest.raises(
        ValueError, match=f"idx: sequence length {BLOCK + 1} is longer than block_size={BLOCK}"
    ):
        model.forward(np.zeros((1, BLOCK + 1), dtype=np.int64))


def test_forward_rejects_bad_targets():
    model = GPT(tiny_config())
    idx = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "targets must have the shape of logits without its last axis, (2, 4), got (2, 3)"
        ),
    ):
        model.forward(idx, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(
        ValueError,
        match=re.escape(f"targets must be in [0, {V}) or equal ignore_index=-100, got {V}"),
    ):
        model.forward(idx, np.full((2, 4), V))
    with pytest.raises(
        TypeError, match="targets must be an integer array of token ids, got float64"
    ):
        model.forward(idx, np.zeros((2, 4)))


def test_backward_needs_a_forward_with_targets():
    model = GPT(tiny_config())
    with pytest.raises(
        RuntimeError, match=re.escape("backward() needs a forward(idx, targets) with targets first")
    ):
        model.backward()
    model.forward(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(RuntimeError, match="with targets"):
        model.backward()


def test_a_forward_lets_the_last_ones_caches_go_block_by_block(monkeypatch):
    """Each block's activations from the step before are freed before the next block is
    computed (their memory is reused at once), and the head's and loss's before the first."""
    import copy
    import weakref

    from tinylm import layers

    model = random_model(n_layer=3)
    idx = np.random.default_rng(0).integers(0, V, size=(2, BLOCK))
    model.forward(idx, np.roll(idx, -1, axis=1))
    old = model._caches
    # the last step's GELU inputs, one per block, and its loss's probabilities
    gelu_inputs = [weakref.ref(old[i]["gelu"][0]) for i in range(3)]
    loss_probs = weakref.ref(old["loss"][0])
    del old
    alive_at_gelu = []  # at block i's GELU: which old blocks' inputs are still alive
    real_gelu = layers.gelu_forward

    def watching_gelu(x):
        assert loss_probs() is None
        alive_at_gelu.append([ref() is not None for ref in gelu_inputs])
        return real_gelu(x)

    monkeypatch.setattr(layers, "gelu_forward", watching_gelu)
    model.forward(idx, np.roll(idx, -1, axis=1))
    # block 0 computes while all three old blocks live; block 1 after old block 0 went, ...
    assert alive_at_gelu == [[True, True, True], [False, True, True], [False, False, True]]
    assert all(ref() is None for ref in gelu_inputs)  # and nothing of the old step is left

    # a copy sharing the caches dict (copy.copy) does not take the original's caches with it
    monkeypatch.setattr(layers, "gelu_forward", real_gelu)
    twin = copy.copy(model)
    want = model.backward()
    twin.forward(idx[:1], np.roll(idx, -1, axis=1)[:1])
    got = model.backward()
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(n_embd=10, n_head=4),
            "GPTConfig.n_embd must be divisible by n_head, got n_embd=10 and n_head=4",
        ),
        (dict(vocab_size=0), "GPTConfig.vocab_size must be a positive integer, got 0"),
        (dict(block_size=0), "GPTConfig.block_size must be a positive integer, got 0"),
        (dict(n_layer=0), "GPTConfig.n_layer must be a positive integer, got 0"),
        (dict(n_head=0), "GPTConfig.n_head must be a positive integer, got 0"),
        (dict(n_embd=-8), "GPTConfig.n_embd must be a positive integer, got -8"),
        (dict(n_embd=8.0), "GPTConfig.n_embd must be a positive integer, got 8.0"),
        (dict(n_layer=True), "GPTConfig.n_layer must be a positive integer, got True"),
        (dict(dropout=1.0), re.escape("GPTConfig.dropout must be in [0, 1), got 1.0")),
        (dict(dropout=-0.1), re.escape("GPTConfig.dropout must be in [0, 1), got -0.1")),
        (
            dict(positions="rotary"),
            "GPTConfig.positions must be 'learned' or 'sinusoidal', got 'rotary'",
        ),
        (dict(layer_norm_epsilon=0.0), "GPTConfig.layer_norm_epsilon must be positive, got 0.0"),
        (dict(embedding_scale=0.0), "GPTConfig.embedding_scale must be a positive number"),
        (dict(embedding_scale=math.inf), "GPTConfig.embedding_scale must be a positive number"),
    ],
)
def test_config_rejects_bad_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("overrides", [dict(dropout=None), dict(dropout="0.1")])
def test_config_rejects_a_non_numeric_dropout_naming_the_field(overrides):
    with pytest.raises((TypeError, ValueError), match="GPTConfig.dropout"):
        tiny_config(**overrides)


def test_model_rejects_a_non_float_dtype():
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int32"):
        GPT(tiny_config(), dtype=np.int32)


def test_config_checks_flags_and_keeps_float32_with_numpy_scalars():
    with pytest.raises(TypeError, match="GPTConfig.bias must be True or False, got 'no'"):
        tiny_config(bias="no")
    with pytest.raises(TypeError, match="GPTConfig.tie_weights must be True or False, got None"):
        tiny_config(tie_weights=None)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got None"):
        GPT(tiny_config(), seed=None)
    model = GPT(tiny_config(dropout=np.float64(0.1), layer_norm_epsilon=np.float64(1e-5)))
    idx = np.zeros((1, 3), dtype=np.int64)
    logits, loss = model.forward(idx, idx)
    assert logits.dtype == np.float32 and loss.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# GPT(config, params=...): given parameters instead of the random initialisation


def test_given_params_skip_the_initialisation_and_are_cast(monkeypatch):
    source = random_model(seed=20)  # float64
    monkeypatch.setattr(
        "tinylm.model.init_params", lambda *a, **k: pytest.fail("init_params was called")
    )
    model = GPT(source.config, seed=3, dtype=np.float32, params=source.params)
    assert list(model.params) == list(source.params)
    for name, a in model.params.items():
        assert a.dtype == np.float32 and a.flags.c_contiguous, name
        np.testing.assert_array_equal(a, source.params[name].astype(np.float32), err_msg=name)
    idx = np.random.default_rng(21).integers(0, V, size=(2, 5))
    assert rel_error(model.forward(idx)[0], source.forward(idx)[0]) <= 1e-5
    # Arrays already of the model's dtype are taken as they are, without a copy.
    same = GPT(source.config, dtype=np.float64, params=source.params)
    assert all(same.params[k] is source.params[k] for k in source.params)
    # The seed still seeds dropout: the same stream as a randomly initialised model's.
    monkeypatch.undo()
    initialised = GPT(source.config, seed=3)
    assert model.dropout_rng.random(4).tolist() == initialised.dropout_rng.random(4).tolist()


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_given_params_may_be_any_config_layout(cfg):
    config = tiny_config(**cfg)
    params = init_params(config, seed=5)
    model = GPT(config, dtype=np.float64, params=params)
    reference = GPT(config, seed=5, dtype=np.float64)
    for name in reference.params:
        np.testing.assert_array_equal(model.params[name], reference.params[name])


def test_given_params_that_do_not_fit_are_refused_by_name():
    config = tiny_config()
    params = init_params(config)
    missing = {k: a for k, a in params.items() if not k.startswith("h.1.")}
    with pytest.raises(ValueError, match=r"missing h\.1\.ln_1\.weight, .* and 7 more, unexpected"
                       r" none"):  # fmt: skip
        GPT(config, params=missing)
    extra = params | {"lm_head.weight": np.zeros((V, C)), "h.9.attn.c_attn.weight": np.zeros(1)}
    with pytest.raises(
        ValueError, match=r"missing none, unexpected lm_head\.weight, h\.9\.attn\.c_attn\.weight$"
    ):
        GPT(config, params=extra)
    wrong = params | {"h.0.mlp.c_fc.weight": np.zeros((C, 3 * C))}
    with pytest.raises(
        ValueError,
        match=re.escape(f"params['h.0.mlp.c_fc.weight'] has shape ({C}, {3 * C}), expected "
                        f"({C}, {4 * C})"),
    ):  # fmt: skip
        GPT(config, params=wrong)
    with pytest.raises(ValueError, match=r"params\['wte.weight'\] has shape list, expected"):
        GPT(config, params=params | {"wte.weight": [[0.0] * C] * V})
    with pytest.raises(TypeError, match="params must be a dict of name -> array, got list"):
        GPT(config, params=list(params.values()))


# ----------------------------------------------------------------------------------------------
# features(idx) and backward_features(dfeatures): the hidden states and their gradients


@pytest.mark.parametrize("tie", [True, False])
def test_features_are_what_the_output_layer_reads(tie):
    model = random_model(seed=22, tie_weights=tie)
    idx = np.random.default_rng(23).integers(0, V, size=(2, 5))
    hidden = model.features(idx)
    assert hidden.shape == (2, 5, C) and hidden.dtype == np.float64
    W_out = model.params["wte.weight" if tie else "lm_head.weight"]
    np.testing.assert_allclose(model.forward(idx)[0], hidden @ W_out.T, rtol=1e-13, atol=1e-13)
    # ln_f's output: each position normalised, then scaled and shifted
    reference = reference_logits(model.params, model.config, idx)
    np.testing.assert_allclose(hidden @ W_out.T, reference, rtol=1e-10, atol=1e-10)


FEATURE_CONFIGS = {
    "learned-tied-bias": dict(),
    "sinusoidal-untied-nobias-dropout": dict(
        positions="sinusoidal", tie_weights=False, bias=False, dropout=0.3
    ),
}


@pytest.mark.parametrize("case", list(FEATURE_CONFIGS))
def test_backward_features_against_central_differences(case):
    """float64, the scalar sum(features(idx) * W) with a random W: every parameter's gradient
    from backward_features(W) within 1e-7 (relative) of central differences."""
    model = random_model(seed=24, **FEATURE_CONFIGS[case])
    rng = np.random.default_rng(25)
    idx = rng.integers(0, V, size=(2, 5))
    W = rng.standard_normal((2, 5, C))
    state = model.dropout_rng.bit_generator.state

    def features(_):
        model.dropout_rng.bit_generator.state = state  # the same dropout masks every time
        return model.features(idx)

    features(None)
    grads = model.backward_features(W)
    assert list(grads) == list(model.params)
    errors = {}
    for name, param in model.params.items():
        numeric = gradcheck.numerical_gradient(features, param, W)  # nudges param in place
        errors[name] = rel_error(grads[name], numeric)
    bad = {name: e for name, e in errors.items() if not e <= 1e-7}
    assert not bad, bad
    if "lm_head.weight" in grads:
        assert not grads["lm_head.weight"].any()  # the output layer was not used


def test_backward_features_of_the_logits_is_backward():
    """Feeding backward_features the gradient that flows into the features from the loss gives
    backward()'s gradients, less the output layer's use of wte."""
    model = random_model(seed=26, tie_weights=False)
    rng = np.random.default_rng(27)
    idx, targets = rng.integers(0, V, size=(2, 5)), rng.integers(0, V, size=(2, 5))
    logits, _ = model.forward(idx, targets)
    full = model.backward()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dlogits = (probs - np.eye(V)[targets]) / targets.size  # d mean cross-entropy / d logits
    partial = model.backward_features(dlogits @ model.params["lm_head.weight"])
    for name in model.params:
        if name != "lm_head.weight":
            np.testing.assert_allclose(partial[name], full[name], rtol=1e-10, atol=1e-14)


def test_backward_features_checks_its_input():
    model = GPT(tiny_config(), dtype=np.float64)
    with pytest.raises(RuntimeError, match=r"needs a features\(idx\)"):
        model.backward_features(np.zeros((1, 3, C)))
    model.features(np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=re.escape(f"shape (1, 3, {C}), got (1, 3, {V})")):
        model.backward_features(np.zeros((1, 3, V)))
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(idx, targets\)"):
        model.backward()  # features() computed no loss


# ----------------------------------------------------------------------------------------------
# Token embeddings scaled by sqrt(C) next to sinusoidal positions


def test_embedding_scale_defaults_to_sqrt_c_for_sinusoidal_positions_only():
    assert tiny_config(positions="learned").embedding_scale == 1.0
    sinusoidal = tiny_config(positions="sinusoidal")
    assert sinusoidal.embedding_scale == math.sqrt(sinusoidal.n_embd)
    assert tiny_config(positions="sinusoidal", embedding_scale=1.0).embedding_scale == 1.0
    assert GPTConfig(**sinusoidal.to_dict()) == sinusoidal  # saved resolved, read back the same


def test_sinusoidal_forward_scales_the_tokens_not_the_positions():
    # x = s * wte[idx] + PE, written out. The backward of the scale (dwte = s * scatter(dx)) is
    # checked against central differences by test_check_model_every_parameter's sinusoidal
    # case and by gradcheck.model_checks, whose sinusoidal models now carry s = sqrt(C).
    from tinylm import layers

    model = random_model(seed=3, positions="sinusoidal")
    C, T = model.config.n_embd, 4
    idx = np.array([[1, 2, 2, 0]])
    x = model._embed(idx, 0, {})
    pe = layers.sinusoidal_positions(model.config.block_size, C)[:T]
    assert np.allclose(x[0], math.sqrt(C) * model.params["wte.weight"][idx[0]] + pe, atol=1e-12)
    unscaled = random_model(seed=3, positions="sinusoidal", embedding_scale=1.0)._embed(idx, 0, {})
    assert np.allclose(unscaled[0], model.params["wte.weight"][idx[0]] + pe, atol=1e-12)
