"""Tests for the `tinylm gradcheck` command."""

import subprocess
import sys

from tinylm import cli

LAYER_ROWS = [
    "embedding: W",
    "linear: x",
    "linear: W",
    "linear: b",
    "layernorm: x",
    "layernorm: gamma",
    "layernorm: beta",
    "gelu: x",
    "gelu_erf: x",
    "tanh: x",
    "relu: x",
    "softmax: x",
    "attention (causal): q",
    "attention (causal): k",
    "attention (causal): v",
    "attention (padding): q",
    "attention (padding): k",
    "attention (padding): v",
    "cross_entropy: logits",
    "dropout: x",
]


def test_gradcheck_layers_only_prints_a_table_of_ok_rows(capsys):
    assert cli.main(["gradcheck", "--layers-only"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split("|")[0].strip() == "tensor"
    assert "max relative error" in lines[0]
    rows = [line for line in lines[2:] if "|" in line]
    names = [r.split("|")[0].strip() for r in rows]
    assert names == LAYER_ROWS
    for r in rows:
        name, error, ok = (cell.strip() for cell in r.split("|"))
        assert ok == "ok", r
        assert float(error) <= 1e-5, r  # ReLU's tolerance; the smooth layers are far below it
    assert f"{len(LAYER_ROWS)} of {len(LAYER_ROWS)} gradients agree" in out
    assert "NOT OK" not in out
    assert not any(n.startswith("gpt[") for n in names)


def test_gradcheck_seed_option(capsys):
    assert cli.main(["gradcheck", "--layers-only", "--seed", "3"]) == 0
    assert "NOT OK" not in capsys.readouterr().out


def test_python_dash_m_tinylm_gradcheck_help():
    result = subprocess.run(
        [sys.executable, "-m", "tinylm", "gradcheck", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--layers-only" in result.stdout
    assert "--seed" in result.stdout


def test_unknown_subcommand_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "tinylm", "no-such-command"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
