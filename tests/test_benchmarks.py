"""The helpers of benchmarks/cpu_step.py and benchmarks/train_cpu.py, on tiny sizes (seconds).

Nothing here times anything: these check that the benchmarks measure what they say (the torch
model is tinylm's model, the FLOP count is the formula, the profile names every layer, the
arguments are read and refused as documented).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling report.py the same way

import cpu_step  # noqa: E402
import profile_cpu  # noqa: E402
import train_cpu  # noqa: E402

TINY = (2, 2, 16, 8, 3)  # n_layer, n_head, n_embd, block, batch


def test_step_flops_is_three_forwards_of_the_documented_products():
    L, H, C, T, B, V = 1, 1, 2, 3, 1, 5
    N = B * T
    forward = 2 * N * C * 3 * C + 4 * B * H * T * T * C + 2 * N * C * C + 16 * N * C * C
    forward += 2 * N * C * V
    assert cpu_step.step_flops(L, H, C, T, B, V) == 3 * forward
    assert cpu_step.step_flops(2, 1, 2, 3, 1, 5) == 3 * (2 * (forward - 2 * N * C * V)
                                                        + 2 * N * C * V)


def test_parse_args_reads_a_size_of_your_own_and_refuses_a_bad_one(capsys):
    args = cpu_step.parse_args(["--size", "2,2,16,8,3", "--rounds", "1"])
    assert args.sizes == {"2x2x16 block 8 batch 3": TINY}
    assert cpu_step.parse_args([]).sizes == cpu_step.SIZES
    for bad in ("2,2,16,8", "2,3,16,8,3", "2,x,16,8,3", "0,2,16,8,3"):
        with pytest.raises(SystemExit):
            cpu_step.parse_args(["--size", bad])
        assert "--size" in capsys.readouterr().err


def test_layer_kind_names_each_linear_by_its_weight():
    config = cpu_step.tinylm_model(*TINY[:4]).config
    C, V = config.n_embd, config.vocab_size
    x = np.zeros((1, C), dtype=np.float32)
    for shape, kind in (((C, 3 * C), "linear qkv"), ((C, C), "linear attn proj"),
                        ((C, 4 * C), "linear fc"), ((4 * C, C), "linear mlp proj"),
                        ((C, V), "head (linear)")):
        W = np.zeros(shape, dtype=np.float32)
        assert cpu_step.layer_kind("linear_forward", (x, W, None), config) == kind
        assert cpu_step.layer_kind("linear_backward", (x, (x, W, True)), config) == kind
    assert cpu_step.layer_kind("cross_entropy_backward", (1.0, None), config) == "cross-entropy"


def test_profile_covers_every_layer_and_leaves_layers_unchanged():
    from tinylm import layers

    before = {name: getattr(layers, name) for name in dir(layers)}
    model = cpu_step.tinylm_model(*TINY[:4])
    idx, targets = cpu_step.make_batch(TINY[3], TINY[4])
    raw = cpu_step.profile_steps(model, idx, targets, n_steps=2)
    prof = cpu_step.summarize_profile(cpu_step.merge_profiles([raw, raw]))
    assert prof["steps"] == 4
    assert {name: getattr(layers, name) for name in dir(layers)} == before
    kinds = {(r["layer"], r["direction"]) for r in prof["rows"]}
    for layer in ("embedding", "layernorm", "linear qkv", "linear attn proj", "linear fc",
                  "linear mlp proj", "head (linear)", "attention", "gelu", "cross-entropy"):
        assert (layer, "forward") in kinds and (layer, "backward") in kinds, layer
    assert all(r["ms"] >= 0 for r in prof["rows"])
    assert prof["step_ms"] >= sum(r["ms"] for r in prof["rows"])


def test_the_torch_model_is_tinylms_model():
    """Same weights, same batch: the same loss and the same gradients (float32 precision)."""
    torch = pytest.importorskip("torch")
    model = cpu_step.tinylm_model(*TINY[:4])
    idx, targets = cpu_step.make_batch(TINY[3], TINY[4])
    tmodel = cpu_step.torch_gpt(model.config, model.params)
    assert sum(p.numel() for p in tmodel.parameters()) == model.num_params()
    _, loss = model.forward(idx, targets)
    grads = model.backward()
    tloss = tmodel(torch.from_numpy(idx), torch.from_numpy(targets))
    tloss.backward()
    assert abs(float(loss) - tloss.item()) < 1e-5
    np.testing.assert_allclose(tmodel.wte.weight.grad.numpy(), grads["wte.weight"], atol=2e-6)
    np.testing.assert_allclose(tmodel.h[0].c_fc.weight.grad.numpy().T,
                               grads["h.0.mlp.c_fc.weight"], atol=2e-6)


def test_train_cpu_reads_its_flags_and_passes_the_others_to_tinylm_train():
    args, train_argv, settings, cfg = train_cpu.parse_args(
        ["--steps", "7", "--no-torch", "--threads", "1", "--n-layer", "1"])
    assert args.no_torch and args.threads == 1
    assert train_argv == ["--steps", "7", "--n-layer", "1"]
    assert cfg.steps == 7 and cfg.n_layer == 1 and settings["progress"] is False
    assert train_cpu.torch_skip_reason(cfg) is None
    _, _, _, cfg = train_cpu.parse_args(["--dropout", "0.1"])
    assert "dropout" in train_cpu.torch_skip_reason(cfg)


def test_the_torch_recipe_matches_tinylm_train_on_a_tiny_run(tmp_path):
    """Same data, weights, batches, schedule and AdamW: the same validation loss (to float32)."""
    pytest.importorskip("torch")
    from tinylm.training import train

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    settings = dict(text=str(text), steps=6, n_layer=1, n_head=2, n_embd=16, block_size=8,
                    batch_size=4, warmup_steps=2, eval_interval=3, verbose=False,
                    progress=False)
    ours = train(**settings)
    _, _, _, cfg = train_cpu.parse_args(["--text", str(text), "--steps", "6", "--n-layer", "1",
                                         "--n-head", "2", "--n-embd", "16", "--block-size", "8",
                                         "--batch-size", "4", "--warmup-steps", "2",
                                         "--eval-interval", "3"])
    theirs = train_cpu.torch_recipe(cfg, threads=1)
    assert theirs["evaluations"] == 2
    assert abs(theirs["final_val_loss"] - ours.val_loss) < 1e-3


def test_profile_cpu_steps_a_tiny_model_and_counts_its_faults():
    for keep in (True, False):
        r = profile_cpu.run_variant("plain", TINY, steps=2, keep_grads=keep)
        assert len(r["ms"]) == len(r["faults"]) == 2
        assert all(ms > 0 for ms in r["ms"]) and all(f >= 0 for f in r["faults"])


def test_peak_rss_is_a_new_process_own_and_grows_with_an_array():
    """In a fresh process (so that no earlier test's peak hides the growth): the peak starts
    small, not at the parent's, and a touched 64 MB array raises it by about that much."""
    import subprocess

    code = ("import cpu_step, numpy as np; before = cpu_step.peak_rss_mib(); "
            "block = np.ones(64 * 2**20 // 8); print(before, cpu_step.peak_rss_mib())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(cpu_step.__file__).parent).stdout
    before, after = map(float, out.split())
    assert 1 < before < 1000 and after >= before + 60


def test_ratio_spread_takes_each_rounds_ratio():
    turns = {"tinylm": [2.0, 2.0, 4.0, 2.0], "tinylm_plain": [2.2, 2.0, 4.4, 2.4],
             "torch": [2.0, 1.0, 4.0, 2.0]}
    spread = cpu_step.ratio_spread(turns)
    assert set(spread) == {"tinylm/torch", "tinylm_plain/torch", "tinylm_plain/tinylm"}
    # per round: tinylm/torch 1, 2, 1, 1; plain/tinylm 1.1, 1, 1.1, 1.2
    assert spread["tinylm/torch"]["median"] == 1.0 and spread["tinylm/torch"]["rounds"] == 4
    assert abs(spread["tinylm_plain/tinylm"]["median"] - 1.1) < 1e-12
    q1, q3 = spread["tinylm_plain/tinylm"]["quartiles"]
    assert q1 <= 1.1 <= q3 and q1 >= 1.0 and q3 <= 1.2
    assert cpu_step.ratio_spread({"tinylm": [1.0]}) == {}  # nothing to compare with
