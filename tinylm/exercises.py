"""Exercises with an autograder: the student writes the backward passes, tinylm grades them.

    tinylm exercises start DIR     writes DIR/my_layers.py, the student's file (never overwritten)
    tinylm exercises check DIR     grades it and prints the table

and from a notebook cell, ``tinylm.exercises.check("DIR")`` (or a module or any object whose
attributes are the functions) returns the same results and prints the same table.

The student's file is a copy of tinylm/exercises_template.py: for every layer of
tinylm/layers.py (embedding, linear, layer norm, GELU, softmax, attention with masks,
cross-entropy) and for one whole transformer block, a forward pass written out (its cache is
the contract, with the same layout as tinylm's) and a backward whose body is
``raise NotImplementedError``. Attention's forward is an exercise too, because the masks are.

How one function is graded (float64 throughout, as tinylm/gradcheck.py does):

1. random inputs, with what makes a mistake show: repeated token ids, a batch of several
   positions, padded keys, ignored targets, an upstream gradient that is not 1;
2. the cache comes from the student's forward when it runs and agrees with tinylm's, else from
   tinylm's forward (the layouts are the same), so each backward is graded on its own;
3. the student's gradients are compared with tinylm's own backward (the reference answer) and
   with central differences of tinylm's forward; the larger relative error is reported, and both
   must be at most 1e-7 (gradcheck.SMOOTH_TOL);
4. when the answer is wrong, it is compared with the answers of the classic mistakes, each
   computed here from the same inputs, and a match is named (a bias gradient not summed over the
   batch, ``dW[idx] += dout`` losing repeated ids, a missing 1/N in the mean, the mask applied
   after the softmax, the scale forgotten in the backward, ...).

Statuses: "ok", "wrong" (with what is wrong), "not started" (the function still raises
NotImplementedError, or waits for one that does), "error" (any other exception, with the line of
the student's file where it was raised).
"""

from __future__ import annotations

import math
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinylm import layers
from tinylm.files import write_atomic
from tinylm.gradcheck import SMOOTH_TOL, numerical_gradient, rel_error

TEMPLATE = Path(__file__).with_name("exercises_template.py")
STUDENT_FILE = "my_layers.py"
TOL = SMOOTH_TOL  # float64, smooth functions: the same bar as `tinylm gradcheck`
MISTAKE_TOL = 1e-6  # how close to a mistake's answer counts as "this is that mistake"
FORWARD_MATCH_TOL = 1e-10  # the student's forward agrees with tinylm's: use its cache

# The graded functions, in the order of the file, and the ones each calls.
FUNCTIONS = [
    "embedding_backward",
    "linear_backward",
    "layernorm_backward",
    "gelu_backward",
    "softmax_backward",
    "attention_forward",
    "attention_backward",
    "cross_entropy_backward",
    "block_backward",
]
BLOCK_NEEDS = [
    "linear_backward",
    "layernorm_backward",
    "gelu_backward",
    "attention_backward",
]

STATUS_OK, STATUS_WRONG, STATUS_NOT_STARTED, STATUS_ERROR = "ok", "wrong", "not started", "error"


@dataclass
class ExerciseResult:
    """One row of the table: how one of the student's functions did."""

    function: str
    status: str  # "ok", "wrong", "not started" or "error"
    max_rel_error: float | None  # None when nothing could be compared
    diagnosis: str = ""  # what is wrong, naming the classic mistake when recognised

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


# ----------------------------------------------------------------------------------------------
# start: the student's file


def start(directory) -> Path:
    """Write the exercises into DIRECTORY/my_layers.py and return its path.

    The directory is created if needed. An existing my_layers.py is the student's work and is
    never overwritten: FileExistsError names it.
    """
    directory = Path(directory)
    target = directory / STUDENT_FILE
    if target.exists():
        raise FileExistsError(
            f"{target} already exists (your work is kept); grade it with "
            f"`tinylm exercises check {directory}`, or start in another directory"
        )
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(target, TEMPLATE.read_text(encoding="utf-8"))
    return target


def load(target) -> types.ModuleType:
    """The student's functions: from DIR/my_layers.py, from a .py file, or a module as given."""
    if not isinstance(target, (str, Path)):
        return target  # a module, or any object with the functions as attributes
    path = Path(target)
    if path.is_dir() or path.suffix != ".py":  # a directory, existing or not, holds my_layers.py
        path = path / STUDENT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; `tinylm exercises start {path.parent}` writes it"
        )
    # Compiled here rather than imported: no module cache and no __pycache__ next to the
    # student's file, so a check right after an edit always reads the edit.
    path = path.resolve()
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    try:
        code = compile(path.read_text(encoding="utf-8"), str(path), "exec")
        exec(code, module.__dict__)
    except Exception as err:  # a syntax error or a failing import in the student's file
        line = f" line {err.lineno}" if isinstance(err, SyntaxError) else _student_line(err, path)
        raise ValueError(
            f"{path}{line}: the file cannot be imported: {type(err).__name__}: {err}"
        ) from err
    return module


# ----------------------------------------------------------------------------------------------
# Running a student's function and comparing its answer


class _NotStarted(Exception):
    """The function (or one it calls) still raises NotImplementedError."""


class _Failed(Exception):
    """The function raised something else, or returned the wrong kind of thing."""


def _student_line(err: BaseException, path) -> str:
    """' line N' of the deepest frame of the traceback that lies in the student's file."""
    if path is None:
        return ""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
    return f" line {frames[-1].lineno}" if frames else ""


def _copy(obj):
    """A copy of every array in obj (arrays, and tuples, lists and dicts of them)."""
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_copy(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    return obj


def _call(student, name: str, *args):
    """student.name(*args), translating the ways it can fail. The arguments are copies, caches
    included: an in-place update (dz = p; dz[...] -= 1) cannot change the checker's arrays."""
    fn = getattr(student, name, None)
    if not callable(fn):
        raise _Failed(f"the file defines no function {name}")
    args = [_copy(a) for a in args]
    try:
        return fn(*args)
    except NotImplementedError as err:
        waits_for = str(err).strip()
        if waits_for and waits_for != name:
            raise _NotStarted(f"waits for {waits_for}") from err
        raise _NotStarted("") from err
    except Exception as err:
        path = getattr(student, "__file__", None)
        where = _student_line(err, Path(path) if path else None)
        raise _Failed(f"raised{where} {type(err).__name__}: {err}") from err


def _unpack(value, names: list[str], function: str) -> dict[str, np.ndarray]:
    """The returned gradient(s) as {name: float64 array}, checking how many there are."""
    values = [value] if len(names) == 1 else value
    if len(names) > 1 and (not isinstance(value, (tuple, list)) or len(value) != len(names)):
        got = f"{len(value)} values" if isinstance(value, (tuple, list)) else type(value).__name__
        raise _Failed(f"{function} must return {len(names)} values ({', '.join(names)}), got {got}")
    out = {}
    for name, v in zip(names, values, strict=True):
        if v is None:
            raise _Failed(f"{name} is None")
        out[name] = _as_float64(name, v)
    return out


def _as_float64(name, value) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise _Failed(f"{name} is not an array of numbers ({type(value).__name__})") from err


# A mistake: its message, and either the wrong answer it gives ({name: array}, compared with
# what the student returned) or, for a shape mistake, a test of (name, student's shape).
@dataclass
class _Mistake:
    message: str
    answer: dict[str, np.ndarray] | None = None
    shape_test: Callable[[str, tuple], bool] | None = None


def _grade(
    function: str,
    got: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    numeric: dict[str, np.ndarray] | None,
    mistakes: list[_Mistake] = (),
) -> ExerciseResult:
    """Compare the student's arrays with tinylm's (and central differences) and diagnose."""
    for name, want in expected.items():
        shape = tuple(got[name].shape)
        if shape != want.shape:
            for m in mistakes:
                if m.shape_test is not None and m.shape_test(name, shape):
                    return ExerciseResult(function, STATUS_WRONG, None, m.message)
            return ExerciseResult(
                function,
                STATUS_WRONG,
                None,
                f"{name} has shape {shape}, expected {want.shape} (the shape of its input)",
            )
    if numeric is not None:  # the checker's own premise: tinylm's answer is right
        for n in expected:
            if rel_error(expected[n], numeric[n]) > TOL:
                raise RuntimeError(
                    f"tinylm's gradient {n} for {function} disagrees with central differences "
                    f"({rel_error(expected[n], numeric[n]):.1e}): a bug in tinylm, not yours"
                )
    errors = {n: rel_error(got[n], expected[n]) for n in expected}
    if numeric is not None:
        errors = {n: max(e, rel_error(got[n], numeric[n])) for n, e in errors.items()}
    errors = {n: e if math.isfinite(e) else math.inf for n, e in errors.items()}  # NaN: inf
    worst = max(errors.values())
    if worst <= TOL:
        return ExerciseResult(function, STATUS_OK, worst)
    for m in mistakes:
        if m.answer is not None and all(
            got[n].shape == a.shape and rel_error(got[n], a) <= MISTAKE_TOL
            for n, a in m.answer.items()
        ):
            return ExerciseResult(function, STATUS_WRONG, worst, m.message)
    bad = [n for n, e in errors.items() if e > TOL]
    good = [n for n, e in errors.items() if e <= TOL]
    text = f"{', '.join(bad)} disagree{'s' if len(bad) == 1 else ''} with tinylm's answer"
    if good:
        text += f" ({', '.join(good)} agree{'s' if len(good) == 1 else ''})"
    return ExerciseResult(function, STATUS_WRONG, worst, text)


def _numeric(forward_of: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dout) -> np.ndarray:
    return numerical_gradient(forward_of, x, dout)


def _cache_from(student, name: str, args, reference_out, reference_cache):
    """The student's forward cache when their forward runs and agrees with tinylm's, else
    tinylm's (same layout), so that a backward is graded on its own."""
    try:
        out, cache = _call(student, name, *args)
        if rel_error(np.asarray(out, dtype=np.float64), reference_out) <= FORWARD_MATCH_TOL:
            return cache
    except (_NotStarted, _Failed, TypeError, ValueError):
        pass
    return reference_cache


def _not_summed(param: str, n_positions: int, what: str) -> _Mistake:
    """A broadcast parameter whose gradient kept the positions' axes."""

    def test(name, shape):
        return name == param and len(shape) > 1

    return _Mistake(
        f"{param} keeps the positions' axes: {what} was broadcast over all {n_positions} "
        f"positions of the batch, so its gradient is the sum over them (rule 1 in docs/math.md), "
        f"e.g. {param} = dout.reshape(-1, dout.shape[-1]).sum(axis=0)",
        shape_test=test,
    )


# ----------------------------------------------------------------------------------------------
# The exercises, one checker each


def _check_embedding(student, rng) -> ExerciseResult:
    V, C = 6, 3
    idx = rng.integers(0, V, size=(2, 5))
    idx[1, 4] = idx[0, 0]  # a repeated id, whatever the draw
    idx[1, 3] = idx[0, 0]
    W = rng.standard_normal((V, C))
    out, ref_cache = layers.embedding_forward(idx, W)
    dout = rng.standard_normal(out.shape)
    cache = _cache_from(student, "embedding_forward", (idx, W), out, ref_cache)
    got = _unpack(_call(student, "embedding_backward", dout, cache), ["dW"], "embedding_backward")
    expected = {"dW": layers.embedding_backward(dout, ref_cache)}
    numeric = {"dW": _numeric(lambda w: layers.embedding_forward(idx, w)[0], W, dout)}
    lost = np.zeros_like(W)
    lost[idx] += dout  # what fancy-index assignment does: one write per repeated id survives
    repeats = int(np.bincount(idx.ravel()).max())
    mistakes = [
        _Mistake(
            f"dW[idx] += dout loses repeated ids (token {int(idx[0, 0])} occurs {repeats} times "
            "here, and only one of its writes survives): use np.add.at(dW, idx, dout), which "
            "adds once per occurrence",
            {"dW": lost},
        )
    ]
    return _grade("embedding_backward", got, expected, numeric, mistakes)


def _check_linear(student, rng) -> ExerciseResult:
    x = rng.standard_normal((2, 3, 4))  # B, T, Cin
    W = rng.standard_normal((4, 5))  # Cin, Cout
    b = rng.standard_normal(5)
    out, ref_cache = layers.linear_forward(x, W, b)
    dout = rng.standard_normal(out.shape)
    cache = _cache_from(student, "linear_forward", (x, W, b), out, ref_cache)
    names = ["dx", "dW", "db"]
    got = _unpack(_call(student, "linear_backward", dout, cache), names, "linear_backward")
    expected = dict(zip(names, layers.linear_backward(dout, ref_cache), strict=True))
    numeric = {
        "dx": _numeric(lambda a: layers.linear_forward(a, W, b)[0], x, dout),
        "dW": _numeric(lambda a: layers.linear_forward(x, a, b)[0], W, dout),
        "db": _numeric(lambda a: layers.linear_forward(x, W, a)[0], b, dout),
    }
    mistakes = [
        _not_summed("db", 6, "b (Cout,)"),
        _Mistake(
            "dW has the shape of W^T: dW = x^T @ dout, (Cin, N) @ (N, Cout), not dout^T @ x",
            shape_test=lambda name, shape: name == "dW" and shape == (5, 4),
        ),
        _Mistake(
            "dW is the gradient of one batch element only: W is used at every position, so "
            "dW = x^T @ dout sums over all B*T rows (flatten the leading axes first)",
            {"dW": x[0].T @ dout[0]},
        ),
    ]
    return _grade("linear_backward", got, expected, numeric, mistakes)


def _check_layernorm(student, rng) -> ExerciseResult:
    x = rng.standard_normal((2, 3, 6)) * 2.0 + 0.5
    gamma = 1.0 + 0.3 * rng.standard_normal(6)
    beta = 0.3 * rng.standard_normal(6)
    out, ref_cache = layers.layernorm_forward(x, gamma, beta)
    dout = rng.standard_normal(out.shape)
    cache = _cache_from(student, "layernorm_forward", (x, gamma, beta), out, ref_cache)
    names = ["dx", "dgamma", "dbeta"]
    got = _unpack(_call(student, "layernorm_backward", dout, cache), names, "layernorm_backward")
    expected = dict(zip(names, layers.layernorm_backward(dout, ref_cache), strict=True))
    numeric = {
        "dx": _numeric(lambda a: layers.layernorm_forward(a, gamma, beta)[0], x, dout),
        "dgamma": _numeric(lambda a: layers.layernorm_forward(x, a, beta)[0], gamma, dout),
        "dbeta": _numeric(lambda a: layers.layernorm_forward(x, gamma, a)[0], beta, dout),
    }
    _, _, mu, rstd = ref_cache
    xhat = (x - mu) * rstd
    dxhat = dout * gamma
    sums = rstd * (
        dxhat - dxhat.sum(-1, keepdims=True) - xhat * (dxhat * xhat).sum(-1, keepdims=True)
    )
    mistakes = [
        _not_summed("dgamma", 6, "gamma (C,)"),
        _not_summed("dbeta", 6, "beta (C,)"),
        _Mistake(
            "dx = dout * gamma * rstd treats mu and rstd as constants, but both depend on every "
            "channel of the position: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * "
            "xhat)), means over the C channels",
            {"dx": dxhat * rstd},
        ),
        _Mistake(
            "a missing 1/C in the means: dx = rstd * (dxhat - mean_c(dxhat) - xhat * "
            "mean_c(dxhat * xhat)) has means over the C channels, not sums",
            {"dx": sums},
        ),
    ]
    return _grade("layernorm_backward", got, expected, numeric, mistakes)


def _check_gelu(student, rng) -> ExerciseResult:
    x = rng.standard_normal((3, 5)) * 1.5
    out, ref_cache = layers.gelu_forward(x)
    dout = rng.standard_normal(out.shape)
    cache = _cache_from(student, "gelu_forward", (x,), out, ref_cache)
    got = _unpack(_call(student, "gelu_backward", dout, cache), ["dx"], "gelu_backward")
    expected = {"dx": layers.gelu_backward(dout, ref_cache)}
    numeric = {"dx": _numeric(lambda a: layers.gelu_forward(a)[0], x, dout)}
    t = ref_cache[1]
    du = math.sqrt(2.0 / math.pi) * (1.0 + 3.0 * 0.044715 * x**2)
    mistakes = [
        _Mistake(
            "only the first half of the product rule: out = 0.5 x (1 + tanh u) also depends on "
            "x through u, adding 0.5 x (1 - tanh(u)^2) du/dx",
            {"dx": dout * 0.5 * (1.0 + t)},
        ),
        _Mistake(
            "the chain rule stops at tanh: multiply the second term by du/dx = "
            "sqrt(2/pi) (1 + 3 * 0.044715 x^2)",
            {"dx": dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t))},
        ),
        _Mistake(
            "dout is missing: the local derivative dout/dx must be multiplied by the gradient "
            "arriving at the output",
            {"dx": 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du},
        ),
    ]
    return _grade("gelu_backward", got, expected, numeric, mistakes)


def _check_softmax(student, rng) -> ExerciseResult:
    x = rng.standard_normal((2, 3, 5))
    out, ref_cache = layers.softmax_forward(x, axis=-1)
    dout = rng.standard_normal(out.shape)
    cache = _cache_from(student, "softmax_forward", (x, -1), out, ref_cache)
    got = _unpack(_call(student, "softmax_backward", dout, cache), ["dx"], "softmax_backward")
    expected = {"dx": layers.softmax_backward(dout, ref_cache)}
    numeric = {"dx": _numeric(lambda a: layers.softmax_forward(a, axis=-1)[0], x, dout)}
    y = out
    mistakes = [
        _Mistake(
            "only the Jacobian's diagonal, y (1 - y): every output y_i depends on every x_j, "
            "so dx_j = y_j (dout_j - sum_i dout_i y_i)",
            {"dx": dout * y * (1.0 - y)},
        ),
        _Mistake(
            "dx = y * dout misses the row-sum term: dx_j = y_j (dout_j - sum_i dout_i y_i)",
            {"dx": y * dout},
        ),
        _Mistake(
            "the row sum is taken over all entries instead of along the softmax's axis "
            "(sum(..., axis=axis, keepdims=True))",
            {"dx": y * (dout - (dout * y).sum())},
        ),
    ]
    return _grade("softmax_backward", got, expected, numeric, mistakes)


def _attention_inputs(rng, Tq, Tk, padded_keys):
    B, H, D = 2, 2, 4
    q = rng.standard_normal((B, H, Tq, D))
    k = rng.standard_normal((B, H, Tk, D))
    v = rng.standard_normal((B, H, Tk, D))
    pad = None
    if padded_keys:
        pad = np.zeros((B, Tk), dtype=bool)
        pad[1, -padded_keys:] = True  # the last keys of the second sequence are padding
    return q, k, v, pad


def _softmax_rows(s):
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check_attention_forward(student, rng) -> ExerciseResult:
    # Two settings: training (Tq = Tk, causal, padded keys) and generation with cached keys
    # (Tq < Tk, causal), where the query i sits at position Tk - Tq + i.
    worst = None
    for Tq, Tk, padded in ((5, 5, 2), (2, 5, 0)):
        q, k, v, pad = _attention_inputs(rng, Tq, Tk, padded)
        ref, _ = layers.attention_forward(q, k, v, causal=True, key_padding_mask=pad)
        value = _call(student, "attention_forward", q, k, v, True, pad)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise _Failed("attention_forward must return (out, cache)")
        got = {"out": _as_float64("out", value[0])}
        D = q.shape[-1]
        allowed = layers.attention_mask(Tq, Tk, True, pad)
        s = q @ k.swapaxes(-1, -2) / math.sqrt(D)
        unscaled = np.where(allowed, q @ k.swapaxes(-1, -2), -np.inf)
        by_d = np.where(allowed, q @ k.swapaxes(-1, -2) / D, -np.inf)
        no_offset = np.where(np.tril(np.ones((Tq, Tk), dtype=bool)), s, -np.inf)
        mistakes = [
            _Mistake(
                "the mask is applied after the softmax: zeroing probabilities leaves rows that "
                "no longer sum to 1 (the masked keys still took their share); set the masked "
                "scores to -inf before the softmax",
                {"out": (_softmax_rows(s) * allowed) @ v},
            ),
            _Mistake(
                "the scale is missing: S = Q K^T / sqrt(D)",
                {"out": _softmax_rows(unscaled) @ v},
            ),
            _Mistake(
                "the scale is 1/D; it is 1/sqrt(D), which keeps the scores' variance at 1",
                {"out": _softmax_rows(by_d) @ v},
            ),
            _Mistake(
                f"the causal mask ignores the offset when Tq < Tk (here Tq={Tq}, Tk={Tk}): "
                "query i sits at position Tk - Tq + i, so np.tril(..., k=Tk - Tq)",
                {"out": _softmax_rows(no_offset) @ v},
            ),
        ]
        if padded:
            causal_only = np.where(layers.attention_mask(Tq, Tk, True, None), s, -np.inf)
            mistakes.append(
                _Mistake(
                    "the key padding mask is not applied: no query may attend to a padded key",
                    {"out": _softmax_rows(causal_only) @ v},
                )
            )
        result = _grade("attention_forward", got, {"out": ref}, None, mistakes)
        if not result.ok:
            return result
        worst = result if worst is None else max(worst, result, key=lambda r: r.max_rel_error)
    return worst


def _check_attention_backward(student, rng) -> ExerciseResult:
    q, k, v, pad = _attention_inputs(rng, 5, 5, 2)
    out, ref_cache = layers.attention_forward(q, k, v, causal=True, key_padding_mask=pad)
    dout = rng.standard_normal(out.shape)
    cache = _cache_from(student, "attention_forward", (q, k, v, True, pad), out, ref_cache)
    names = ["dq", "dk", "dv"]
    got = _unpack(_call(student, "attention_backward", dout, cache), names, "attention_backward")
    expected = dict(zip(names, layers.attention_backward(dout, ref_cache), strict=True))

    def fwd(q_, k_, v_):
        return layers.attention_forward(q_, k_, v_, causal=True, key_padding_mask=pad)[0]

    numeric = {
        "dq": _numeric(lambda a: fwd(a, k, v), q, dout),
        "dk": _numeric(lambda a: fwd(q, a, v), k, dout),
        "dv": _numeric(lambda a: fwd(q, k, a), v, dout),
    }
    _, _, _, P, scale = ref_cache
    dP = dout @ v.swapaxes(-1, -2)
    dS_no_rowsum = P * dP
    sqrt_d = 1.0 / scale
    mistakes = [
        _Mistake(
            f"the scale is forgotten in the backward: S = scale * Q K^T, so dq = scale * dS K "
            f"and dk = scale * dS^T Q (both are sqrt(D) = {sqrt_d:g} times too large)",
            {"dq": expected["dq"] * sqrt_d, "dk": expected["dk"] * sqrt_d},
        ),
        _Mistake(
            f"the scale is forgotten in dq: dq = scale * dS K (it is sqrt(D) = {sqrt_d:g} times "
            "too large)",
            {"dq": expected["dq"] * sqrt_d},
        ),
        _Mistake(
            f"the scale is forgotten in dk: dk = scale * dS^T Q (it is sqrt(D) = {sqrt_d:g} "
            "times too large)",
            {"dk": expected["dk"] * sqrt_d},
        ),
        _Mistake(
            "the softmax backward misses its row-sum term: dS = P * (dP - rowsum(dP * P))",
            {"dq": scale * dS_no_rowsum @ k, "dk": scale * dS_no_rowsum.swapaxes(-1, -2) @ q},
        ),
        _Mistake(
            "dv = dout @ P: it is P^T dO, (B,H,Tk,Tq) @ (B,H,Tq,D)",
            {"dv": P @ dout},
        ),
    ]
    return _grade("attention_backward", got, expected, numeric, mistakes)


def _check_cross_entropy(student, rng) -> ExerciseResult:
    logits = rng.standard_normal((2, 4, 6)) * 2.0
    targets = rng.integers(0, 6, size=(2, 4))
    targets[0, 1] = targets[1, 3] = -100  # ignored positions
    dloss = 1.7  # not 1, so that a forgotten dloss shows
    loss, ref_cache = layers.cross_entropy_forward(logits, targets)
    cache = _cache_from(student, "cross_entropy_forward", (logits, targets), loss, ref_cache)
    value = _call(student, "cross_entropy_backward", dloss, cache)
    got = _unpack(value, ["dlogits"], "cross_entropy_backward")
    ref = layers.cross_entropy_backward(dloss, ref_cache)
    numeric = {
        "dlogits": _numeric(
            lambda a: np.asarray(layers.cross_entropy_forward(a, targets)[0]), logits, dloss
        )
    }
    counted = (targets != -100).reshape(-1)
    N, R = int(counted.sum()), counted.size  # counted positions, all rows (math.md's letters)
    p = ref_cache[0]  # softmax(logits), (R, V)
    onehot = np.zeros_like(p)
    onehot[np.arange(R), np.where(counted, targets.reshape(-1), 0)] = 1.0
    every_row = (dloss * (p - onehot) / N).reshape(logits.shape)
    mistakes = [
        _Mistake(
            f"a missing 1/N in the mean: the loss is the mean over the N = {N} counted "
            f"positions, so dlogits = dloss * (p - onehot(y)) / N (it is {N} times too large)",
            {"dlogits": ref * N},
        ),
        _Mistake(
            f"divided by all {R} positions: the mean is over the {N} counted ones only "
            "(weight holds 1/N for them and 0 for the ignored ones)",
            {"dlogits": ref * N / R},
        ),
        _Mistake(
            "the ignored positions get a gradient: a position whose target is ignore_index "
            "counts for nothing, so its row of dlogits is 0 (multiply by weight)",
            {"dlogits": every_row},
        ),
        _Mistake(
            "dloss is missing: dlogits = dloss * dL/dz (here dloss = 1.7, not 1)",
            {"dlogits": ref / dloss},
        ),
    ]
    return _grade("cross_entropy_backward", got, {"dlogits": ref}, numeric, mistakes)


# The block, by tinylm's layers: the reference the student's block_backward is graded against.
BLOCK_PARAMS = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]


def block_params(C: int, rng, scale: float = 0.5) -> dict[str, np.ndarray]:
    """Random float64 parameters of one block, named as in GPT-2 (see the template)."""
    shapes = {
        "ln_1.weight": (C,),
        "ln_1.bias": (C,),
        "attn.c_attn.weight": (C, 3 * C),
        "attn.c_attn.bias": (3 * C,),
        "attn.c_proj.weight": (C, C),
        "attn.c_proj.bias": (C,),
        "ln_2.weight": (C,),
        "ln_2.bias": (C,),
        "mlp.c_fc.weight": (C, 4 * C),
        "mlp.c_fc.bias": (4 * C,),
        "mlp.c_proj.weight": (4 * C, C),
        "mlp.c_proj.bias": (C,),
    }
    params = {name: scale * rng.standard_normal(shape) for name, shape in shapes.items()}
    params["ln_1.weight"] += 1.0
    params["ln_2.weight"] += 1.0
    return params


def reference_block_forward(x, params, n_head):
    """tinylm's block: x1 = x + attn(ln_1(x)); x2 = x1 + mlp(ln_2(x1)); the template's cache."""
    B, T, C = x.shape
    H, D = n_head, C // n_head
    p, c = params, {"shape": (B, T, C, H, D)}
    h, c["ln_1"] = layers.layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"])
    qkv, c["attn.c_attn"] = layers.linear_forward(h, p["attn.c_attn.weight"], p["attn.c_attn.bias"])
    q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
    a, c["attn"] = layers.attention_forward(q, k, v, causal=True)
    a = a.transpose(0, 2, 1, 3).reshape(B, T, C)
    y, c["attn.c_proj"] = layers.linear_forward(a, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    x1 = x + y
    h, c["ln_2"] = layers.layernorm_forward(x1, p["ln_2.weight"], p["ln_2.bias"])
    f, c["mlp.c_fc"] = layers.linear_forward(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])
    g, c["gelu"] = layers.gelu_forward(f)
    m, c["mlp.c_proj"] = layers.linear_forward(g, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    return x1 + m, c


def reference_block_backward(dout, cache, residual=True):
    """The gradients of reference_block_forward: (dx, grads). residual=False drops the identity
    path of both residuals, the mistake the checker recognises."""
    B, T, C, H, D = cache["shape"]
    grads = {}

    def linear_back(d, name):
        dinp, dW, db = layers.linear_backward(d, cache[name])
        grads[name + ".weight"], grads[name + ".bias"] = dW, db
        return dinp

    def ln_back(d, name):
        dinp, dgamma, dbeta = layers.layernorm_backward(d, cache[name])
        grads[name + ".weight"], grads[name + ".bias"] = dgamma, dbeta
        return dinp

    # x2 = x1 + c_proj(gelu(c_fc(ln_2(x1))))
    df = layers.gelu_backward(linear_back(dout, "mlp.c_proj"), cache["gelu"])
    dx1 = ln_back(linear_back(df, "mlp.c_fc"), "ln_2") + (dout if residual else 0.0)
    # x1 = x + c_proj(attention(split(c_attn(ln_1(x)))))
    da = linear_back(dx1, "attn.c_proj").reshape(B, T, H, D).transpose(0, 2, 1, 3)
    dq, dk, dv = layers.attention_backward(da, cache["attn"])
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)  # undo the split
    dx = ln_back(linear_back(dqkv, "attn.c_attn"), "ln_1") + (dx1 if residual else 0.0)
    return dx, grads


def _check_block(student, rng, ok_so_far: dict[str, bool]) -> ExerciseResult:
    B, T, C, H = 2, 3, 4, 2
    x = rng.standard_normal((B, T, C))
    params = block_params(C, rng)
    out, ref_cache = reference_block_forward(x, params, H)
    dout = rng.standard_normal(out.shape)
    cache = _cache_from(student, "block_forward", (x, params, H), out, ref_cache)
    value = _call(student, "block_backward", dout, cache)
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not isinstance(value[1], dict):
        raise _Failed("block_backward must return (dx, grads), grads a dict of arrays")
    missing = [n for n in BLOCK_PARAMS if n not in value[1]]
    if missing:
        raise _Failed(f"grads has no {', '.join(missing)}")
    got = {"dx": _as_float64("dx", value[0])}
    got.update({n: _as_float64(n, value[1][n]) for n in BLOCK_PARAMS})
    ref_dx, ref_grads = reference_block_backward(dout, ref_cache)
    expected = {"dx": ref_dx, **ref_grads}
    numeric = {"dx": _numeric(lambda a: reference_block_forward(a, params, H)[0], x, dout)}
    for name in BLOCK_PARAMS:
        numeric[name] = _numeric(
            lambda a, name=name: reference_block_forward(x, {**params, name: a}, H)[0],
            params[name],
            dout,
        )
    no_residual_dx, _ = reference_block_backward(dout, ref_cache, residual=False)
    # Every vector parameter (biases, LayerNorm gains) is broadcast over the B*T positions.
    mistakes = [_not_summed(n, B * T, n) for n in BLOCK_PARAMS if params[n].ndim == 1]
    mistakes.append(
        _Mistake(
            "the residual connections do not pass the gradient through: x1 = x + y(x) gives "
            "dx = dx1 + (the branch's backward of dx1), and likewise for x2 = x1 + m(x1)",
            {"dx": no_residual_dx},
        )
    )
    result = _grade("block_backward", got, expected, numeric, mistakes)
    waiting = [f for f in BLOCK_NEEDS if not ok_so_far.get(f, False)]
    if waiting and not result.ok:
        result.diagnosis = (
            f"fix {', '.join(waiting)} first (the block calls them); {result.diagnosis}"
        )
    return result


# ----------------------------------------------------------------------------------------------
# check: grade every function


def _run(function, checker, *args) -> ExerciseResult:
    try:
        return checker(*args)
    except _NotStarted as err:
        return ExerciseResult(function, STATUS_NOT_STARTED, None, str(err))
    except _Failed as err:
        return ExerciseResult(function, STATUS_ERROR, None, str(err))


def check(target, seed: int = 0, verbose: bool = True) -> list[ExerciseResult]:
    """Grade the student's functions and return one ExerciseResult per function.

    target: a directory holding my_layers.py (what `tinylm exercises start` wrote), a .py file,
    or a module (or any object) with the functions as attributes. Prints the table unless
    verbose is False. Raises FileNotFoundError or ValueError (naming the file) when the file is
    missing or cannot be imported; a wrong or unfinished function is a row of the table.
    """
    student = load(target)
    rng = np.random.default_rng(seed)
    checkers = [
        ("embedding_backward", _check_embedding),
        ("linear_backward", _check_linear),
        ("layernorm_backward", _check_layernorm),
        ("gelu_backward", _check_gelu),
        ("softmax_backward", _check_softmax),
        ("attention_forward", _check_attention_forward),
        ("attention_backward", _check_attention_backward),
        ("cross_entropy_backward", _check_cross_entropy),
    ]
    results = []
    with np.errstate(all="ignore"):  # a wrong answer may overflow; it is reported, not warned
        for name, checker in checkers:
            results.append(_run(name, checker, student, np.random.default_rng(rng.integers(2**31))))
        ok_so_far = {r.function: r.ok for r in results}
        results.append(
            _run(
                "block_backward",
                _check_block,
                student,
                np.random.default_rng(rng.integers(2**31)),
                ok_so_far,
            )
        )
    if verbose:
        print(format_table(results))
    return results


def format_table(results: list[ExerciseResult]) -> str:
    """function | status | max relative error, then what is wrong, one line per function."""
    header = ("function", "status", "max relative error")
    rows = [
        (
            r.function,
            r.status,
            "" if r.max_rel_error is None else f"{r.max_rel_error:.1e}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]

    def line(cells):
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(header), "-+-".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    notes = [f"  {r.function}: {r.diagnosis}" for r in results if r.diagnosis]
    n_ok = sum(r.ok for r in results)
    out.append("")
    out.append(
        f"{n_ok} of {len(results)} functions pass (float64; tinylm's answer and central "
        f"differences, relative error <= {TOL:g})"
    )
    if notes:
        out.append("What to look at:")
        out += notes
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# The command: `tinylm exercises start DIR` and `tinylm exercises check DIR`


def add_exercises_parser(sub) -> None:
    """Add `tinylm exercises {start,check} DIR` to the CLI's subparsers."""
    import argparse

    p = sub.add_parser(
        "exercises",
        help="write the backward-pass exercises, or grade them",
        description="Write the backward-pass exercises into DIR/my_layers.py (start), or grade "
        "them against tinylm's own gradients and central differences (check).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = actions.add_parser(
        "start",
        help="write DIR/my_layers.py (an existing one is never overwritten)",
        description="Write the exercises into DIR/my_layers.py; DIR is created if needed.",
    )
    s.add_argument("dir", metavar="DIR", help="the directory for your file")
    s.set_defaults(func=cmd_exercises)
    c = actions.add_parser(
        "check",
        help="grade DIR/my_layers.py and print the table",
        description="Grade each function of DIR/my_layers.py (or of a .py file given instead) "
        "and print function | status | max relative error, with the classic mistake named "
        "when it is recognised. Exits 0 when every function passes, 1 otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("dir", metavar="DIR", help="the directory holding my_layers.py, or a .py file")
    c.add_argument("--seed", type=int, default=0, help="seed for the random test inputs")
    c.set_defaults(func=cmd_exercises)


def cmd_exercises(args) -> int:
    """Run `tinylm exercises start|check DIR`; errors in the input raise (the CLI prints them)."""
    if args.action == "start":
        path = start(args.dir)
        print(f"wrote {path}; write the backward passes, then: tinylm exercises check {args.dir}")
        return 0
    seed = getattr(args, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    results = check(args.dir, seed=seed)
    return 0 if all(r.ok for r in results) else 1
