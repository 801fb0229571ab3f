"""The exercises and their autograder (tinylm/exercises.py).

The student's file is written by `start`, then edited here as a student would: each
`raise NotImplementedError("name")` replaced by a body. A file of correct bodies passes; each
classic mistake, planted in such a file, is caught and named; an unfinished function is
"not started".
"""

import argparse
import types

import pytest

from tinylm import exercises, layers

# Correct bodies, as a student would write them in their copy of the template.
SOLUTIONS = {
    "embedding_backward": """
    dW = np.zeros(W_shape, dtype=W_dtype)
    np.add.at(dW, idx.reshape(-1), dout.reshape(-1, dout.shape[-1]))
    return dW
""",
    "linear_backward": """
    dout2 = dout.reshape(-1, W.shape[1])  # (N, Cout)
    dx = dout @ W.T
    dW = x.reshape(-1, W.shape[0]).T @ dout2
    db = dout2.sum(axis=0)
    return dx, dW, db
""",
    "layernorm_backward": """
    C = x.shape[-1]
    xhat = (x - mu) * rstd
    dbeta = dout.reshape(-1, C).sum(axis=0)
    dgamma = (dout * xhat).reshape(-1, C).sum(axis=0)
    dxhat = dout * gamma
    mean = lambda a: a.mean(axis=-1, keepdims=True)
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    return dx, dgamma, dbeta
""",
    "gelu_backward": """
    du = GELU_K * (1.0 + 3.0 * GELU_A * x**2)
    return dout * (0.5 * (1.0 + tanh_u) + 0.5 * x * (1.0 - tanh_u**2) * du)
""",
    "softmax_backward": """
    return y * (dout - (dout * y).sum(axis=axis, keepdims=True))
""",
    "attention_forward": """
    scale = 1.0 / math.sqrt(q.shape[-1])
    S = q @ k.swapaxes(-1, -2) * scale
    S = np.where(attention_mask(q.shape[2], k.shape[2], causal, key_padding_mask), S, -np.inf)
    P, _ = softmax_forward(S)
    return P @ v, (q, k, v, P, scale)
""",
    "attention_backward": """
    dv = P.swapaxes(-1, -2) @ dout
    dP = dout @ v.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    dq = scale * dS @ k
    dk = scale * dS.swapaxes(-1, -2) @ q
    return dq, dk, dv
""",
    "cross_entropy_backward": """
    dz = p.copy()
    dz[np.arange(len(y)), y] -= 1.0
    dz *= (dloss * weight)[:, None]
    return dz.reshape(logits_shape)
""",
    "block_backward": """
    grads = {}

    def linear(d, name):
        dinp, grads[name + ".weight"], grads[name + ".bias"] = linear_backward(d, cache[name])
        return dinp

    def norm(d, name):
        dinp, grads[name + ".weight"], grads[name + ".bias"] = layernorm_backward(d, cache[name])
        return dinp

    dg = linear(dout, "mlp.c_proj")
    dx1 = dout + norm(linear(gelu_backward(dg, cache["gelu"]), "mlp.c_fc"), "ln_2")
    da = linear(dx1, "attn.c_proj").reshape(B, T, H, D).transpose(0, 2, 1, 3)
    dq, dk, dv = attention_backward(da, cache["attn"])
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)
    dx = dx1 + norm(linear(dqkv, "attn.c_attn"), "ln_1")
    return dx, grads
""",
}

# Each classic mistake: the function, its wrong body, and words the diagnosis must contain.
MISTAKES = {
    "bias not summed over the batch": (
        "linear_backward",
        """
    dx = dout @ W.T
    dW = x.reshape(-1, W.shape[0]).T @ dout.reshape(-1, W.shape[1])
    db = dout  # the bias was broadcast: this keeps the positions' axes
    return dx, dW, db
""",
        ["db keeps the positions' axes", "sum over them"],
    ),
    "dW[idx] += dout": (
        "embedding_backward",
        """
    dW = np.zeros(W_shape, dtype=W_dtype)
    dW[idx] += dout
    return dW
""",
        ["dW[idx] += dout loses repeated ids", "np.add.at"],
    ),
    "missing 1/N in the mean": (
        "cross_entropy_backward",
        """
    dz = p.copy()
    dz[np.arange(len(y)), y] -= 1.0
    dz *= dloss * (weight > 0)[:, None]
    return dz.reshape(logits_shape)
""",
        ["missing 1/N in the mean"],
    ),
    "mask applied after the softmax": (
        "attention_forward",
        """
    scale = 1.0 / math.sqrt(q.shape[-1])
    P, _ = softmax_forward(q @ k.swapaxes(-1, -2) * scale)
    P = P * attention_mask(q.shape[2], k.shape[2], causal, key_padding_mask)
    return P @ v, (q, k, v, P, scale)
""",
        ["mask is applied after the softmax"],
    ),
    "scale forgotten in the backward": (
        "attention_backward",
        """
    dv = P.swapaxes(-1, -2) @ dout
    dP = dout @ v.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    return dS @ k, dS.swapaxes(-1, -2) @ q, dv
""",
        ["scale is forgotten in the backward", "dq = scale * dS K"],
    ),
    "layer norm with mu and rstd held constant": (
        "layernorm_backward",
        """
    C = x.shape[-1]
    xhat = (x - mu) * rstd
    dx = dout * gamma * rstd
    return dx, (dout * xhat).reshape(-1, C).sum(axis=0), dout.reshape(-1, C).sum(axis=0)
""",
        ["treats mu and rstd as constants"],
    ),
    "softmax backward without the row sum": (
        "softmax_backward",
        """
    return y * dout
""",
        ["misses the row-sum term"],
    ),
    "ignored targets get a gradient": (
        "cross_entropy_backward",
        """
    dz = p.copy()
    dz[np.arange(len(y)), y] -= 1.0
    dz *= dloss * weight.max()
    return dz.reshape(logits_shape)
""",
        ["ignored positions get a gradient"],
    ),
    "residual gradient dropped": (
        "block_backward",
        SOLUTIONS["block_backward"]
        .replace("dx1 = dout + norm(", "dx1 = norm(")
        .replace("dx = dx1 + norm(", "dx = norm("),
        ["residual connections do not pass the gradient through"],
    ),
}


def write_student_file(directory, bodies):
    """Start the exercises in `directory` and fill in the given {function: body}."""
    path = exercises.start(directory)
    text = path.read_text()
    for name, body in bodies.items():
        stub = f'    raise NotImplementedError("{name}")\n'
        assert text.count(stub) == 1, name
        text = text.replace(stub, body.lstrip("\n"))
    path.write_text(text)
    return path


def by_function(results):
    return {r.function: r for r in results}


def test_start_writes_the_template_and_every_function_is_not_started(tmp_path, capsys):
    path = exercises.start(tmp_path / "work")
    assert path == tmp_path / "work" / "my_layers.py"
    assert path.read_text() == exercises.TEMPLATE.read_text()
    results = exercises.check(tmp_path / "work")
    assert [r.function for r in results] == exercises.FUNCTIONS
    assert {r.status for r in results} == {"not started"}
    assert all(r.max_rel_error is None for r in results)
    out = capsys.readouterr().out
    assert out.splitlines()[0].split("|")[0].strip() == "function"
    assert "0 of 9 functions pass" in out


def test_start_never_overwrites_the_students_file(tmp_path):
    path = exercises.start(tmp_path)
    path.write_text("# my work\n")
    with pytest.raises(FileExistsError, match="my_layers.py already exists"):
        exercises.start(tmp_path)
    assert path.read_text() == "# my work\n"


def test_tinylms_own_layers_pass_the_checker():
    # The reference solutions: tinylm.layers, and the block composed of them.
    solutions = types.SimpleNamespace(
        **{name: getattr(layers, name) for name in dir(layers) if not name.startswith("_")},
        block_forward=exercises.reference_block_forward,
        block_backward=exercises.reference_block_backward,
    )
    results = exercises.check(solutions, verbose=False)
    assert [r.function for r in results] == exercises.FUNCTIONS
    for r in results:
        assert r.status == "ok", r
        assert r.max_rel_error <= exercises.TOL


def test_a_correct_student_file_passes(tmp_path, capsys):
    write_student_file(tmp_path, SOLUTIONS)
    results = exercises.check(tmp_path)
    assert all(r.ok for r in results), exercises.format_table(results)
    assert "9 of 9 functions pass" in capsys.readouterr().out


def test_a_half_done_file_mixes_ok_and_not_started(tmp_path):
    write_student_file(tmp_path, {"linear_backward": SOLUTIONS["linear_backward"]})
    results = by_function(exercises.check(tmp_path, verbose=False))
    assert results["linear_backward"].status == "ok"
    assert results["gelu_backward"].status == "not started"
    # The block calls the unfinished ones: it waits for them rather than failing.
    with_block = dict(SOLUTIONS)
    del with_block["gelu_backward"]
    write_student_file(tmp_path / "b", with_block)
    block = by_function(exercises.check(tmp_path / "b", verbose=False))["block_backward"]
    assert block.status == "not started"
    assert block.diagnosis == "waits for gelu_backward"


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_classic_mistake_is_caught_and_named(tmp_path, mistake):
    function, body, words = MISTAKES[mistake]
    write_student_file(tmp_path, {**SOLUTIONS, function: body})
    results = by_function(exercises.check(tmp_path, verbose=False))
    r = results[function]
    assert r.status == "wrong", r
    for w in words:
        assert w in r.diagnosis, (w, r.diagnosis)
    others = [f for f in exercises.FUNCTIONS if f not in (function, "block_backward")]
    assert all(results[f].ok for f in others), [results[f] for f in others if not results[f].ok]
    if function in exercises.BLOCK_NEEDS:
        # The block calls the wrong function: it is wrong too, and says what to fix first.
        assert results["block_backward"].status == "wrong"
        assert f"fix {function} first" in results["block_backward"].diagnosis


def test_an_unrecognised_wrong_answer_says_which_tensor_is_off(tmp_path):
    body = SOLUTIONS["linear_backward"].replace("dx = dout @ W.T", "dx = 2.0 * dout @ W.T")
    write_student_file(tmp_path, {**SOLUTIONS, "linear_backward": body})
    r = by_function(exercises.check(tmp_path, verbose=False))["linear_backward"]
    assert r.status == "wrong"
    assert r.max_rel_error > 0.1
    assert r.diagnosis.startswith("dx disagrees with tinylm's answer (dW, db agree)")


def test_an_exception_is_an_error_with_the_line_of_the_students_file(tmp_path):
    path = write_student_file(
        tmp_path, {**SOLUTIONS, "gelu_backward": "    return dout * undefined_name\n"}
    )
    r = by_function(exercises.check(tmp_path, verbose=False))["gelu_backward"]
    assert r.status == "error"
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "undefined_name" in t)
    assert r.diagnosis == f"raised line {line} NameError: name 'undefined_name' is not defined"


def test_a_file_that_cannot_be_imported_is_named(tmp_path):
    (tmp_path / "my_layers.py").write_text("def broken(:\n")
    with pytest.raises(ValueError, match=r"my_layers.py line 1: the file cannot be imported"):
        exercises.check(tmp_path)
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        exercises.check(nowhere)
    expected = f"{nowhere / 'my_layers.py'} does not exist; `tinylm exercises start {nowhere}`"
    assert str(info.value).startswith(expected)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="tinylm")
    exercises.add_exercises_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_the_command_starts_and_checks(tmp_path, capsys):
    directory = tmp_path / "work"
    args = _parse(["exercises", "start", str(directory)])
    assert args.func(args) == 0
    assert f"wrote {directory / 'my_layers.py'}" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        args.func(args)
    check = _parse(["exercises", "check", str(directory)])
    assert check.func(check) == 1  # nothing done yet
    assert "not started" in capsys.readouterr().out
    write_student_file(tmp_path / "done", SOLUTIONS)
    check = _parse(["exercises", "check", str(tmp_path / "done"), "--seed", "3"])
    assert check.func(check) == 0


def test_a_check_right_after_an_edit_reads_the_edit(tmp_path):
    path = exercises.start(tmp_path)
    before = by_function(exercises.check(tmp_path, verbose=False))["softmax_backward"]
    assert before.status == "not started"
    stub = '    raise NotImplementedError("softmax_backward")\n'
    path.write_text(path.read_text().replace(stub, SOLUTIONS["softmax_backward"].lstrip("\n")))
    after = by_function(exercises.check(tmp_path, verbose=False))["softmax_backward"]
    assert after.status == "ok"
    assert not (tmp_path / "__pycache__").exists()  # nothing written beside the student's file


def test_nan_in_an_answer_is_wrong_not_a_crash(tmp_path):
    write_student_file(tmp_path, {**SOLUTIONS, "gelu_backward": "    return dout * np.nan\n"})
    r = by_function(exercises.check(tmp_path, verbose=False))["gelu_backward"]
    assert r.status == "wrong"
    assert r.max_rel_error == float("inf")


def test_a_backward_that_updates_its_cache_in_place_is_graded_fairly():
    # dz = p (no copy), then dz[...] -= 1, changes the cache's p. Without a forward of its own
    # the student gets the checker's cache: it must be a copy, or the checker's reference
    # answer, computed from that cache afterwards, would change and this correct one fail.
    import numpy as np

    def cross_entropy_backward(dloss, cache):
        p, y, weight, logits_shape = cache
        dz = p
        dz[np.arange(len(y)), y] -= 1.0
        dz *= (dloss * weight)[:, None]
        return dz.reshape(logits_shape)

    student = types.SimpleNamespace(cross_entropy_backward=cross_entropy_backward)
    r = by_function(exercises.check(student, verbose=False))["cross_entropy_backward"]
    assert r.status == "ok", r


def test_a_return_value_that_is_not_an_array_is_an_error(tmp_path):
    write_student_file(tmp_path, {**SOLUTIONS, "softmax_backward": '    return "dx"\n'})
    r = by_function(exercises.check(tmp_path, verbose=False))["softmax_backward"]
    assert r.status == "error"
    assert r.diagnosis == "dx is not an array of numbers (str)"
