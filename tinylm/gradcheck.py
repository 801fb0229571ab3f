"""Checking hand-written gradients against central differences.

A backward pass is a claim: "this is dL/dx". We test the claim the way a student
would by hand. Pick a random upstream gradient ``dout`` and look at the scalar

    f(x) = sum(forward(x) * dout),   whose exact gradient is  df/dx = backward(dout).

Nudging one entry of x by +-h gives the central difference

    df/dx_i ~ (f(x + h e_i) - f(x - h e_i)) / (2h),

whose error shrinks like h^2. In float64 with h = 1e-5 the two agree to about
1e-9 or better for smooth functions; a wrong formula is off by far more.

We report the *relative* error of the whole tensor,

    rel_error(a, b) = max_i |a_i - b_i| / max(max_i |a_i|, max_i |b_i|),

the largest disagreement measured against the size of the gradient. (Dividing
entry by entry instead would blow up rounding noise on entries that are nearly
zero.) Smooth ops pass at 1e-7; ReLU's kink allows 1e-5.

The same helpers serve the tests, the notebooks and ``tinylm gradcheck``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm import layers

SMOOTH_TOL = 1e-7  # smooth layers, float64
KINK_TOL = 1e-5  # ReLU: a nudge may cross the kink at 0
MODEL_TOL = 1e-6  # the whole GPT, float64


def rel_error(a, b) -> float:
    """max |a - b| relative to the larger of max |a| and max |b| (0 when both are zero)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error needs arrays of one shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(np.abs(a).max(), np.abs(b).max())
    if scale == 0.0:
        return 0.0
    return float(np.abs(a - b).max() / scale)


def numerical_gradient(f, x, dout, h=1e-5):
    """Central-difference gradient of sum(f(x) * dout) with respect to x.

    f:    a function of the array x that returns an array shaped like dout
          (it is called with x nudged in place, and x is restored afterwards).
    x:    the float array (float64 for a meaningful check).
    dout: the upstream gradient, the weights of the scalar sum(f(x) * dout).
    Returns an array shaped like x.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    while not it.finished:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        f_plus = float((np.asarray(f(x)) * dout).sum())
        x[i] = old - h
        f_minus = float((np.asarray(f(x)) * dout).sum())
        x[i] = old
        grad[i] = (f_plus - f_minus) / (2.0 * h)
        it.iternext()
    return grad


@dataclass
class GradCheckRow:
    """One line of a gradient-check table."""

    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)


def check_layer(name, forward, backward, inputs, wrt=None, tol=SMOOTH_TOL, seed=0, h=1e-5):
    """Check every gradient a layer's backward returns against central differences.

    name:     a label for the table ("linear" gives rows "linear: x", "linear: W", ...).
    forward:  called as forward(**inputs), returns (out, cache).
    backward: called as backward(dout, cache), returns the gradients in the order of `wrt`
              (a single array when there is one).
    inputs:   dict name -> array (float64 for the checked ones) plus any other arguments.
    wrt:      the names of the inputs whose gradients backward returns, in its order
              (default: every floating-point array or None in inputs, in order; a None
              input, such as b=None, has a None gradient, which is skipped).
    Returns a list of GradCheckRow.
    """
    if wrt is None:
        wrt = [
            k for k, a in inputs.items()
            if a is None or (isinstance(a, np.ndarray) and a.dtype.kind == "f")
        ]
    rng = np.random.default_rng(seed)
    out, cache = forward(**inputs)
    dout = rng.standard_normal(np.shape(out))
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    rows = []
    for key, grad in zip(wrt, grads, strict=True):
        if grad is None:  # e.g. db of a linear layer called with b=None
            continue

        def f(x, key=key):
            return forward(**{**inputs, key: x})[0]

        numeric = numerical_gradient(f, inputs[key], dout, h=h)
        rows.append(GradCheckRow(f"{name}: {key}", rel_error(grad, numeric), tol))
    return rows


def check_model(model, idx, targets, tol=MODEL_TOL, h=1e-5):
    """Check every parameter gradient of a GPT (built with dtype=np.float64) on one batch.

    The scalar is the loss itself (dout = 1). Each parameter is nudged entry by entry,
    so keep the model tiny. With dropout in training mode, the dropout generator is reset
    before every forward, so every nudge sees the same masks. Returns one GradCheckRow per
    parameter tensor.
    """
    if model.dtype != np.float64:
        raise TypeError(f"check_model needs a float64 model for meaningful differences, "
                        f"got {model.dtype}")
    rng_state = model.dropout_rng.bit_generator.state

    def loss():
        model.dropout_rng.bit_generator.state = rng_state  # the same dropout masks every time
        return model.forward(idx, targets)[1]

    loss()
    grads = model.backward()
    rows = []
    for name, param in model.params.items():

        def loss_of(p, name=name):
            # numerical_gradient nudges `p`, which *is* model.params[name], in place.
            return loss()

        numeric = numerical_gradient(loss_of, param, np.float64(1.0), h=h)
        rows.append(GradCheckRow(name, rel_error(grads[name], numeric), tol))
    return rows


def format_table(rows) -> str:
    """The check as a table: tensor | max relative error | ok."""
    width = max([len("tensor")] + [len(r.name) for r in rows])
    lines = [f"{'tensor':<{width}} | max relative error | ok", "-" * (width + 26)]
    for r in rows:
        lines.append(f"{r.name:<{width}} | {r.error:>18.2e} | {'ok' if r.ok else 'NOT OK'}")
    return "\n".join(lines)


def layer_checks(seed=0):
    """Check every layer of tinylm on small float64 inputs (the body of `tinylm gradcheck`)."""
    rng = np.random.default_rng(seed)

    def randn(*shape):
        return rng.standard_normal(shape)

    B, H, T, D, C, V = 2, 2, 5, 4, 6, 7
    q, k, v = randn(B, H, T, D), randn(B, H, T, D), randn(B, H, T, D)
    padding = np.zeros((B, T), dtype=bool)
    padding[1, -2:] = True  # the second sequence has two padded keys
    targets = rng.integers(0, V, size=(B, T))
    targets[0, 0] = -100  # one ignored position

    ids = rng.integers(0, V, size=(B, T))
    ids[0, :2] = 3  # a repeated id: its gradient rows must add up

    rows = []
    rows += check_layer(
        "embedding",
        lambda W: layers.embedding_forward(ids, W),
        layers.embedding_backward,
        {"W": randn(V, C)},
    )
    rows += check_layer(
        "linear", layers.linear_forward, layers.linear_backward,
        {"x": randn(B, T, C), "W": randn(C, 3), "b": randn(3)},
    )
    rows += check_layer(
        "layernorm", layers.layernorm_forward, layers.layernorm_backward,
        {"x": randn(B, T, C), "gamma": randn(C), "beta": randn(C)},
    )
    rows += check_layer("gelu", layers.gelu_forward, layers.gelu_backward, {"x": randn(B, T, C)})
    rows += check_layer(
        "gelu_erf", layers.gelu_erf_forward, layers.gelu_erf_backward,
        {"x": 2.0 * randn(B, T, C)},  # scaled so some inputs reach the continued fraction
    )
    rows += check_layer("tanh", layers.tanh_forward, layers.tanh_backward, {"x": randn(B, T, C)})
    rows += check_layer(
        "relu", layers.relu_forward, layers.relu_backward, {"x": randn(B, T, C)}, tol=KINK_TOL
    )
    rows += check_layer(
        "softmax", layers.softmax_forward, layers.softmax_backward, {"x": randn(B, T, V)}
    )
    rows += check_layer(
        "attention (causal)",
        lambda q, k, v: layers.attention_forward(q, k, v, causal=True),
        layers.attention_backward,
        {"q": q, "k": k, "v": v},
    )
    rows += check_layer(
        "attention (padding)",
        lambda q, k, v: layers.attention_forward(q, k, v, causal=False, key_padding_mask=padding),
        layers.attention_backward,
        {"q": q.copy(), "k": k.copy(), "v": v.copy()},
    )
    rows += check_layer(
        "cross_entropy",
        lambda logits: layers.cross_entropy_forward(logits, targets),
        layers.cross_entropy_backward,
        {"logits": randn(B, T, V)},
    )
    rows += check_layer(
        "dropout",
        lambda x: layers.dropout_forward(x, 0.3, np.random.default_rng(1)),
        layers.dropout_backward,
        {"x": randn(B, T, C)},
    )
    return rows


def randomize_params(model, rng, scale=0.3):
    """Give every parameter random values of order `scale`, in place.

    GPT-2's initialisation (zero biases, unit gains, weights of 0.02) makes many gradients
    tiny, so rounding noise in the loss dominates their central differences, and a bug that
    confuses a gain of exactly 1 with no gain at all would go unseen. Random values avoid both.
    """
    for name, p in model.params.items():
        is_layernorm_gain = name.endswith(".weight") and p.ndim == 1
        p[...] = rng.normal(1.0 if is_layernorm_gain else 0.0, scale, size=p.shape)


def model_checks(seed=0):
    """Check every parameter of tiny GPTs (learned and sinusoidal positions, tied and untied)
    and of a tiny BERT (pretraining and classification losses, with padding)."""
    from tinylm.model import GPT, GPTConfig

    rng = np.random.default_rng(seed)
    rows = []
    for positions, tie in (("learned", True), ("sinusoidal", False)):
        config = GPTConfig(
            vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8,
            positions=positions, tie_weights=tie,
        )
        model = GPT(config, seed=seed, dtype=np.float64)
        randomize_params(model, rng)
        idx = rng.integers(0, 11, size=(2, 5))
        targets = rng.integers(0, 11, size=(2, 5))
        for row in check_model(model, idx, targets):
            row.name = f"gpt[{positions}, {'tied' if tie else 'untied'}]: {row.name}"
            rows.append(row)
    rows += bert_checks(seed, num_hidden_layers=1)  # tests/test_bert.py checks two layers
    return rows


def check_model_loss(model, loss, tol=MODEL_TOL, h=1e-5, zero_gradients=()):
    """Check every parameter gradient of a float64 model for any scalar loss of it.

    loss:  a function of no arguments that runs a forward of the model (keeping its caches)
           and returns the scalar loss; model.backward() must then return its gradients.
    zero_gradients: names of parameters whose exact gradient is 0 by the mathematics (BERT's
           attention key biases: softmax ignores a shift q . b_k shared by every key of a row).
           Their central differences are rounding noise, so their row measures the absolute
           disagreement against the largest gradient of the whole model instead.
    With dropout in training mode, the dropout generator is reset before every forward.
    Returns one GradCheckRow per parameter tensor.
    """
    if model.dtype != np.float64:
        raise TypeError(f"check_model_loss needs a float64 model for meaningful differences, "
                        f"got {model.dtype}")
    rng_state = model.dropout_rng.bit_generator.state

    def run():
        model.dropout_rng.bit_generator.state = rng_state  # the same dropout masks every time
        return loss()

    run()
    grads = model.backward()
    numerics = {}
    for name, param in model.params.items():
        # numerical_gradient nudges `param`, which *is* model.params[name], in place.
        numerics[name] = numerical_gradient(lambda p: run(), param, np.float64(1.0), h=h)
    model_scale = max(float(np.abs(g).max()) for g in grads.values())
    rows = []
    for name in model.params:
        if name in zero_gradients:
            error = float(np.abs(grads[name] - numerics[name]).max()) / max(model_scale, 1e-300)
            rows.append(GradCheckRow(f"{name} (exactly 0)", error, tol))
        else:
            rows.append(GradCheckRow(name, rel_error(grads[name], numerics[name]), tol))
    return rows


def tiny_bert_batch(rng, vocab_size=13, B=2, T=6):
    """A padded pretraining batch for a tiny BERT: ids, token types, mask, MLM and NSP labels.

    The second sequence has two padded positions at the end; every other MLM label is -100.
    """
    idx = rng.integers(1, vocab_size, size=(B, T))
    token_type_ids = np.zeros((B, T), dtype=np.int64)
    token_type_ids[:, T // 2:] = 1
    attention_mask = np.ones((B, T), dtype=np.int64)
    attention_mask[1, -2:] = 0
    idx[1, -2:] = 0  # the padding token
    mlm_labels = rng.integers(0, vocab_size, size=(B, T))
    mlm_labels[:, ::2] = -100
    mlm_labels[1, -2:] = -100  # no loss on padding
    nsp_labels = np.arange(B) % 2
    return idx, token_type_ids, attention_mask, mlm_labels, nsp_labels


def bert_checks(seed=0, num_hidden_layers=2):
    """Check every parameter of a tiny BERT (float64), with padding and dropout: the
    pretraining loss (MLM + NSP) and the classification loss."""
    from tinylm.bert import Bert, BertConfig

    rng = np.random.default_rng(seed)
    config = BertConfig(
        vocab_size=13, hidden_size=8, num_hidden_layers=num_hidden_layers, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=8, hidden_dropout_prob=0.1, num_labels=3,
    )
    model = Bert(config, seed=seed, dtype=np.float64)
    randomize_params(model, rng)
    idx, types, mask, mlm_labels, nsp_labels = tiny_bert_batch(rng)
    class_labels = np.array([2, 0])
    key_biases = [n for n in model.params if n.endswith("attention.self.key.bias")]
    rows = []
    losses = (
        ("pretraining", lambda: model.forward(idx, types, mask, mlm_labels, nsp_labels)[2]),
        ("classify", lambda: model.classify(idx, types, mask, class_labels)[1]),
    )
    for what, loss in losses:
        for row in check_model_loss(model, loss, zero_gradients=key_biases):
            row.name = f"bert[{what}]: {row.name}"
            rows.append(row)
    return rows
