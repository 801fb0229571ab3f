"""Optimisers turn gradients into parameter updates: SGD with momentum and AdamW, plus the two
helpers every GPT training loop uses with them, gradient clipping and the learning-rate schedule.

The model keeps its parameters in one flat dict ``params``, GPT-2 names to arrays
(``"wte.weight"``, ``"h.0.attn.c_attn.weight"``, ...), and its backward pass returns ``grads``,
a dict with the same names and shapes. An optimiser holds a reference to ``params`` and changes
the arrays IN PLACE (``p -= ...``), so the model sees the new values without being told.

One training step reads:

    lr_now = lr_schedule(step, lr, warmup_steps, decay_steps, min_lr)
    norm = clip_grad_norm(grads, max_norm=1.0)
    optimizer.step(grads, lr=lr_now)

Numerics. The updates stay in each parameter's dtype: float32 parameters get float32 moments and
float32 arithmetic. Every scalar that touches an array is a Python float, because under NumPy 2's
promotion rules (NEP 50) ``float32_array * np.float64(x)`` is float64, while
``float32_array * x`` with a Python float stays float32. In-place operators (``*=``, ``+=``,
``out=``) keep the temporaries to about one array per parameter per step.

The array code runs unchanged on NumPy and CuPy: it only uses operators and the module returned by
``get_array_module``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from tinylm.backend import get_array_module, to_numpy

# ----------------------------------------------------------------------------------------------
# Argument checks shared by both optimisers


def _check_number(name: str, value, low: float = 0.0, high: float | None = None) -> float:
    """Return ``value`` as a Python float after checking low <= value (< high when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)  # a Python float, so that float32 arithmetic stays float32 (NEP 50)
    if not math.isfinite(value) or value < low or (high is not None and value >= high):
        expected = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number {expected}, got {value}")
    return value


def _check_params(params) -> None:
    """params must be a non-empty dict of floating-point arrays, updated in place."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of name -> array, got {type(params).__name__}")
    if not params:
        raise ValueError("params must hold at least one parameter, got an empty dict")
    for name, p in params.items():
        if not hasattr(p, "dtype") or p.dtype.kind != "f":
            got = p.dtype if hasattr(p, "dtype") else type(p).__name__
            raise TypeError(f"parameter {name!r} must be a floating-point array, got {got}")


def _check_grads(params: Mapping, grads) -> None:
    """grads must have exactly the names of params, each with its parameter's shape."""
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads must be a dict of name -> array, got {type(grads).__name__}")
    missing = [name for name in params if name not in grads]
    if missing:
        raise ValueError(f"grads has no gradient for parameter(s) {missing}")
    extra = [name for name in grads if name not in params]
    if extra:
        raise ValueError(f"grads has gradient(s) for unknown parameter(s) {extra}")
    for name, p in params.items():
        if grads[name].shape != p.shape:
            raise ValueError(
                f"gradient of {name!r} must have the parameter's shape {p.shape}, "
                f"got {grads[name].shape}"
            )


def _decayed_names(params: Mapping, no_decay: Iterable[str] | None) -> set[str]:
    """Which parameters get weight decay.

    Default (no_decay=None), as in GPT-2 / nanoGPT training: every parameter with ndim >= 2 (the
    weight matrices and the embeddings wte, wpe) is decayed; the 1-D ones (biases, LayerNorm gains
    and shifts) are not, since pulling a gain towards 0 or a bias towards 0 is no regulariser.
    Given an explicit collection of names, exactly those are NOT decayed and all others are.
    """
    if no_decay is None:
        return {name for name, p in params.items() if p.ndim >= 2}
    if isinstance(no_decay, str):
        raise TypeError(
            f"no_decay must be a collection of parameter names, got the string {no_decay!r}"
        )
    no_decay = set(no_decay)
    unknown = sorted(no_decay - set(params))
    if unknown:
        raise ValueError(f"no_decay names parameter(s) that params does not have: {unknown}")
    return set(params) - no_decay


def _load_buffers(params: Mapping, saved, what: str) -> dict:
    """Copy saved per-parameter arrays (NumPy) into new arrays next to each parameter."""
    if not isinstance(saved, Mapping) or set(saved) != set(params):
        names = sorted(set(saved) ^ set(params)) if isinstance(saved, Mapping) else "all"
        raise ValueError(f"state[{what!r}] does not match the parameters; mismatching: {names}")
    out = {}
    for name, p in params.items():
        arr = saved[name]
        if tuple(arr.shape) != p.shape:
            raise ValueError(
                f"state[{what!r}][{name!r}] has shape {tuple(arr.shape)}, "
                f"the parameter has {p.shape}"
            )
        xp = get_array_module(p)
        out[name] = xp.array(arr, dtype=p.dtype)  # a copy, on the parameter's device
    return out


def _state_field(state, key: str):
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
    if key not in state:
        raise ValueError(f"state has no entry {key!r}; it must come from state_dict()")
    return state[key]


# ----------------------------------------------------------------------------------------------
# SGD with momentum


class SGD:
    """Stochastic gradient descent with (heavy-ball) momentum and L2 weight decay.

    Per parameter p with gradient g, as torch.optim.SGD (dampening 0, not Nesterov):

        g = g + wd * p              # L2 penalty wd/2 * |p|^2, added to the gradient
        buf = momentum * buf + g    # buf starts at 0, so the first step has buf = g
        p = p - lr * buf

    With momentum = 0 this is plain SGD, p = p - lr * g, and no buffer is kept.
    Weight decay applies to the same parameters as in AdamW (ndim >= 2 unless ``no_decay`` says).
    """

    def __init__(
        self,
        params: dict,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        no_decay: Iterable[str] | None = None,
    ):
        _check_params(params)
        self.params = params
        self.lr = _check_number("lr", lr)
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        self.decayed = _decayed_names(params, no_decay)
        self.t = 0  # steps taken
        self.buffers = self._zero_buffers() if self.momentum > 0 else {}

    def _zero_buffers(self) -> dict:
        return {name: get_array_module(p).zeros_like(p) for name, p in self.params.items()}

    def step(self, grads: dict, lr: float | None = None) -> None:
        """Update every parameter in place; ``lr`` replaces the stored rate for this step only."""
        _check_grads(self.params, grads)
        lr = self.lr if lr is None else _check_number("lr", lr)
        mu, wd = self.momentum, self.weight_decay
        for name, p in self.params.items():
            g = grads[name]
            if g.dtype != p.dtype:
                g = g.astype(p.dtype)  # compute in the parameter's dtype
            if wd > 0 and name in self.decayed:
                g = g + wd * p  # a new array: the caller's gradient is left as it was
            if mu > 0:
                buf = self.buffers[name]
                buf *= mu
                buf += g  # buf = mu * buf + g
                g = buf
            p -= lr * g
        self.t += 1

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: hyperparameters, step count, momentum buffers.

        Plain Python values and NumPy arrays (copies, also when training on the GPU).
        """
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "no_decay": sorted(set(self.params) - self.decayed),
            "step": self.t,
            "momentum_buffer": {name: to_numpy(b).copy() for name, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(): later steps are bit-for-bit those of the saved optimiser."""
        lr = _check_number("state['lr']", _state_field(state, "lr"))
        momentum = _check_number("state['momentum']", _state_field(state, "momentum"), 0.0, 1.0)
        wd = _check_number("state['weight_decay']", _state_field(state, "weight_decay"))
        decayed = _decayed_names(self.params, _state_field(state, "no_decay"))
        t = int(_state_field(state, "step"))
        saved = _state_field(state, "momentum_buffer")
        buffers = _load_buffers(self.params, saved, "momentum_buffer") if momentum > 0 else {}
        # Assign only after every check passed, so a bad state leaves the optimiser untouched.
        self.lr, self.momentum, self.weight_decay = lr, momentum, wd
        self.decayed, self.t, self.buffers = decayed, t, buffers


# ----------------------------------------------------------------------------------------------
# AdamW


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", 2019), the optimiser GPT-2-style models are trained with.

    Per parameter p with gradient g, at step t = 1, 2, ... (m, v start at 0):

        p     = p * (1 - lr * wd)            # decoupled decay, first, as torch.optim.AdamW does
        m     = b1 * m + (1 - b1) * g        # running mean of g      (first moment)
        v     = b2 * v + (1 - b2) * g^2      # running mean of g^2    (second moment)
        m_hat = m / (1 - b1^t)               # bias correction: m, v started at 0
        v_hat = v / (1 - b2^t)
        p     = p - lr * m_hat / (sqrt(v_hat) + eps)

    Together: p_new = p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), the decay using the old p.
    "Decoupled": wd * p is added to the update, not to g, so it is not rescaled by 1/sqrt(v_hat)
    as an L2 term in the loss would be.

    Weight decay applies to parameters with ndim >= 2 only (matrices, embeddings), as in GPT-2 /
    nanoGPT training; pass ``no_decay`` (a collection of names) to choose explicitly which
    parameters are NOT decayed.
    """

    def __init__(
        self,
        params: dict,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_decay: Iterable[str] | None = None,
    ):
        _check_params(params)
        self.params = params
        self.lr = _check_number("lr", lr)
        self.betas = self._check_betas(betas)
        self.eps = _check_number("eps", eps)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        self.decayed = _decayed_names(params, no_decay)
        self.t = 0  # steps taken; the next step is number t + 1
        # First and second moments, one pair per parameter, in the parameter's dtype and device.
        self.m = {name: get_array_module(p).zeros_like(p) for name, p in params.items()}
        self.v = {name: get_array_module(p).zeros_like(p) for name, p in params.items()}

    @staticmethod
    def _check_betas(betas) -> tuple[float, float]:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        return (
            _check_number("betas[0]", betas[0], 0.0, 1.0),
            _check_number("betas[1]", betas[1], 0.0, 1.0),
        )

    def step(self, grads: dict, lr: float | None = None) -> None:
        """Update every parameter in place; ``lr`` replaces the stored rate for this step only."""
        _check_grads(self.params, grads)
        lr = self.lr if lr is None else _check_number("lr", lr)
        b1, b2 = self.betas
        self.t += 1
        # Scalars of the bias correction, in Python floats (they are the same for every parameter).
        step_size = lr / (1.0 - b1**self.t)  # lr / (1 - b1^t)
        sqrt_bc2 = math.sqrt(1.0 - b2**self.t)  # sqrt(1 - b2^t)
        for name, p in self.params.items():
            g, m, v = grads[name], self.m[name], self.v[name]
            if g.dtype != p.dtype:
                g = g.astype(p.dtype)  # compute in the parameter's dtype
            xp = get_array_module(p)
            if self.weight_decay > 0 and name in self.decayed:
                p *= 1.0 - lr * self.weight_decay  # p = p * (1 - lr * wd)
            m *= b1
            m += (1.0 - b1) * g  # m = b1 m + (1 - b1) g
            v *= b2
            g2 = g * g
            g2 *= 1.0 - b2
            v += g2  # v = b2 v + (1 - b2) g^2
            # sqrt(v_hat) + eps = sqrt(v) / sqrt(1 - b2^t) + eps, built in one buffer
            denom = xp.sqrt(v, out=g2)  # reuse g2's memory
            denom /= sqrt_bc2
            denom += self.eps
            # p -= lr * m_hat / (sqrt(v_hat) + eps), with m_hat / ... = m / (1 - b1^t) / denom
            update = xp.divide(m, denom, out=denom)
            update *= step_size
            p -= update

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: hyperparameters, step count t, moments m and v.

        Plain Python values and NumPy arrays (copies, also when training on the GPU):
        {"lr", "betas", "eps", "weight_decay", "no_decay", "step", "m": {name: array},
        "v": {name: array}}.
        """
        return {
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "no_decay": sorted(set(self.params) - self.decayed),
            "step": self.t,
            "m": {name: to_numpy(a).copy() for name, a in self.m.items()},
            "v": {name: to_numpy(a).copy() for name, a in self.v.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(): later steps are bit-for-bit those of the saved optimiser."""
        lr = _check_number("state['lr']", _state_field(state, "lr"))
        betas = self._check_betas(tuple(_state_field(state, "betas")))
        eps = _check_number("state['eps']", _state_field(state, "eps"))
        wd = _check_number("state['weight_decay']", _state_field(state, "weight_decay"))
        decayed = _decayed_names(self.params, _state_field(state, "no_decay"))
        t = int(_state_field(state, "step"))
        m = _load_buffers(self.params, _state_field(state, "m"), "m")
        v = _load_buffers(self.params, _state_field(state, "v"), "v")
        # Assign only after every check passed, so a bad state leaves the optimiser untouched.
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, wd
        self.decayed, self.t, self.m, self.v = decayed, t, m, v


# ----------------------------------------------------------------------------------------------
# Gradient clipping and the learning-rate schedule


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``.

        total_norm = sqrt( sum over tensors g of sum(g^2) )
        if total_norm > max_norm:  g = g * max_norm / (total_norm + 1e-6)   for every g, in place

    One factor for all tensors keeps the direction of the full gradient; only its length changes.
    The sums are accumulated in float64, so the norm does not depend on float32 rounding.
    A non-finite norm (inf or nan gradients) is returned as is and nothing is scaled, so that the
    caller can see it and skip the step.

    Returns: total_norm before clipping, a Python float.
    """
    if not isinstance(grads, Mapping) or not grads:
        got = f"{len(grads)} entries" if isinstance(grads, Mapping) else type(grads).__name__
        raise ValueError(f"grads must be a non-empty dict of name -> array, got {got}")
    max_norm = _check_number("max_norm", max_norm)
    if max_norm == 0:
        raise ValueError("max_norm must be positive, got 0.0")
    xp = get_array_module(*grads.values())
    # Sum the per-tensor squares on the device and read one number back (one sync on a GPU).
    squares = [xp.sum(xp.square(g), dtype=xp.float64) for g in grads.values()]
    total_norm = float(xp.sqrt(sum(squares)))
    if math.isfinite(total_norm) and total_norm > max_norm:
        scale = max_norm / (total_norm + 1e-6)  # the 1e-6 as in torch.nn.utils.clip_grad_norm_
        for g in grads.values():
            g *= scale
    return total_norm


def lr_schedule(step: int, lr: float, warmup_steps: int, decay_steps: int | None = None,
                min_lr: float | None = None, *, max_steps: int | None = None) -> float:
    """The learning rate at ``step`` (counted from 0): linear warmup, then cosine decay.

        step < warmup_steps:                lr * (step + 1) / warmup_steps
        warmup_steps <= step < decay_steps: min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * r)),
                                            r = (step - warmup_steps) / (decay_steps - warmup_steps)
        step >= decay_steps:                min_lr

    The warmup: step 0 already gets lr / warmup_steps (not 0, which would waste a
    step), and step warmup_steps - 1 reaches lr. The cosine starts at lr (r = 0) and ends at
    min_lr (r = 1). ``decay_steps`` is TrainConfig's ``lr_decay_steps``; ``max_steps`` is its
    old name, still accepted. Returns a Python float.
    """
    if max_steps is not None:
        if decay_steps is not None:
            raise TypeError("give decay_steps or its old name max_steps, not both")
        decay_steps = max_steps
    if decay_steps is None or min_lr is None:
        raise TypeError("lr_schedule needs step, lr, warmup_steps, decay_steps and min_lr")
    for name, value in (("step", step), ("warmup_steps", warmup_steps),
                        ("decay_steps", decay_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    lr = _check_number("lr", lr)
    min_lr = _check_number("min_lr", min_lr)
    if min_lr > lr:
        raise ValueError(f"min_lr must be at most lr={lr}, got {min_lr}")
    if warmup_steps > decay_steps:
        raise ValueError(
            f"warmup_steps must be at most decay_steps={decay_steps}, got {warmup_steps}"
        )
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / (decay_steps - warmup_steps)  # 0 -> 1 over the decay
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))
