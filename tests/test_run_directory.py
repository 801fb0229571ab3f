"""Run directories: tinylm deletes only what it wrote, one process writes a run at a time, SIGTERM
saves like Ctrl-C, damaged weights are refused, a diverging gradient stops the run at its step,
and the CLI tells a usage error (exit 2) from a bug in tinylm (exit 1)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from tinylm import cli
from tinylm.checkpoint import load_checkpoint
from tinylm.training import RunDirectoryBusy, run_directory_lock, train

TINY = dict(
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=16,
    batch_size=4,
    eval_interval=5,
    log_interval=5,
    sample_tokens=0,
    verbose=False,
    progress=False,
)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "fox.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    return path


def users_folder(parent, name):
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("the user's own notes", encoding="utf-8")
    return folder


def test_a_users_folder_named_like_a_checkpoint_survives_new_runs(tmp_path, text_file):
    out = tmp_path / "run"
    backup = users_folder(out, "checkpoint.2024-backup")
    lookalike = users_folder(out, "checkpoint.old-deadbeef")  # tinylm's pattern, user's files
    train(text=str(text_file), steps=5, out=str(out), **TINY)
    train(text=str(text_file), steps=5, out=str(out), overwrite=True, **TINY)
    for folder in (backup, lookalike):
        assert (folder / "mine.txt").read_text(encoding="utf-8") == "the user's own notes"
    assert load_checkpoint(out).step == 5


def test_overwrite_refuses_a_checkpoint_folder_tinylm_did_not_write(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    train(text=str(text_file), steps=5, out=str(out), **TINY)
    (out / "checkpoint" / "my_weights.npy").write_bytes(b"precious")
    argv = ["train", "--text", str(text_file), "--steps", "5", "--out", str(out), "--overwrite"]
    assert cli.main(argv + ["--n-layer", "1", "--n-embd", "16", "--n-head", "2"]) == 2
    err = capsys.readouterr().err
    assert "was not written by tinylm" in err and "my_weights.npy" in err
    assert (out / "checkpoint" / "my_weights.npy").read_bytes() == b"precious"


def test_a_second_writer_is_refused_with_the_pid_that_holds_the_run(tmp_path, text_file):
    out = tmp_path / "run"
    with run_directory_lock(out):
        with pytest.raises(RunDirectoryBusy, match=rf"PID {os.getpid()}"):
            train(text=str(text_file), steps=5, out=str(out), **TINY)
    # The lock died with its holder: the run goes ahead now.
    assert train(text=str(text_file), steps=5, out=str(out), **TINY).step == 5


def test_the_lock_of_a_killed_process_does_not_stay(tmp_path, text_file):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path\n"
         "from tinylm.training import run_directory_lock\n"
         "with run_directory_lock(Path(sys.argv[1])):\n"
         "    print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirectoryBusy, match=rf"PID {holder.pid}"):
        train(text=str(text_file), steps=5, out=str(out), **TINY)
    holder.kill()  # kill -9: no cleanup runs in the holder
    holder.wait()
    assert train(text=str(text_file), steps=5, out=str(out), **TINY).step == 5


def test_sigterm_saves_and_exits_like_ctrl_c(tmp_path, text_file):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "tinylm", "train", "--text", str(text_file), "--out", str(out),
            "--steps", "100000", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
            "--block-size", "16", "--eval-interval", "5", "--sample-tokens", "0",
            "--quiet"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "checkpoint" / "config.json").exists():  # training has begun
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "tinylm train --resume" in err
    step = load_checkpoint(out).step
    assert step >= 5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] <= step


def test_weights_holding_nan_are_refused_with_the_tensor_named(tmp_path, text_file):
    out = tmp_path / "run"
    train(text=str(text_file), steps=5, out=str(out), **TINY)
    path = out / "checkpoint" / "model.safetensors"
    params = safetensors.numpy.load_file(str(path))
    params["h.0.mlp.c_fc.weight"][3, 4] = np.nan
    safetensors.numpy.save_file(params, str(path))
    with pytest.raises(ValueError, match=r"'h.0.mlp.c_fc.weight' holds 1 NaN or infinite"):
        load_checkpoint(out)


def test_a_non_finite_gradient_norm_stops_the_run_at_that_step(tmp_path, text_file, monkeypatch):
    import sys as _sys

    loop_module = _sys.modules["tinylm.training"]
    real_clip = loop_module.clip_grad_norm
    calls = []

    def clip_that_diverges_at_step_7(grads, max_norm):
        calls.append(1)
        return float("nan") if len(calls) == 7 else real_clip(grads, max_norm)

    monkeypatch.setattr(loop_module, "clip_grad_norm", clip_that_diverges_at_step_7)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"gradient norm became nan at step 7"):
        train(text=str(text_file), steps=20, out=str(out), **TINY)
    assert load_checkpoint(out).step == 5  # the last checkpoint is intact


@pytest.mark.parametrize(
    "flags, flag",
    [(["--seed", "-1"], "--seed"), (["--temperature", "nan"], "--temperature"),
     (["--temperature", "inf"], "--temperature"), (["--max-new-tokens", "-3"], "--max-new-tokens")],
)  # fmt: skip
def test_numeric_sample_flags_name_themselves(tmp_path, text_file, capsys, flags, flag):
    out = tmp_path / "run"
    train(text=str(text_file), steps=5, out=str(out), **TINY)
    assert cli.main(["sample", str(out), *flags]) == 2
    assert f"error: {flag} must be" in capsys.readouterr().err


def test_a_bug_in_tinylm_is_exit_1_with_the_debug_hint(monkeypatch, capsys):
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_gradcheck", broken)
    monkeypatch.delenv("TINYLM_DEBUG", raising=False)
    assert cli.main(["gradcheck"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "TINYLM_DEBUG=1" in err and "KeyError" in err
    with pytest.raises(KeyError):
        cli.main(["--debug", "gradcheck"])


def test_out_inside_another_runs_checkpoint_is_refused(tmp_path, text_file):
    out = tmp_path / "run"
    train(text=str(text_file), steps=5, out=str(out), **TINY)
    before = sorted(p.name for p in (out / "checkpoint").iterdir())
    for inner in (out / "checkpoint", out / "checkpoint" / "sub"):
        with pytest.raises(ValueError, match="inside the checkpoint"):
            train(text=str(text_file), steps=5, out=str(inner), **TINY)
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == before


def test_a_run_stopped_before_its_first_checkpoint_says_how_to_start_again(tmp_path, text_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 5, "train_loss": 3.0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="before its first checkpoint.*--overwrite"):
        train(text=str(text_file), steps=5, out=str(out), **TINY)
    with pytest.raises(ValueError, match="before its first checkpoint.*--overwrite"):
        train(resume=str(out), steps=10)
    assert train(text=str(text_file), steps=5, out=str(out), overwrite=True, **TINY).step == 5


def test_quiet_is_a_setting_of_one_invocation(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    train(text=str(text_file), steps=5, out=str(out), **TINY)  # verbose=False
    capsys.readouterr()
    result = train(resume=str(out), steps=10, progress=False)
    assert result.config.verbose is True
    assert "resuming at step 5" in capsys.readouterr().out


def test_a_failed_save_is_one_line_saying_the_previous_checkpoint_is_intact(
    tmp_path, text_file, monkeypatch, capsys
):
    import sys as _sys

    out = tmp_path / "run"
    train(text=str(text_file), steps=5, out=str(out), **TINY)
    loop_module = _sys.modules["tinylm.training"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop_module.ckpt_io, "save_checkpoint", disk_full)
    assert cli.main(["train", "--resume", str(out), "--steps", "10", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device" in err
    assert "the previous checkpoint (step 5) is intact" in err
    assert load_checkpoint(out).step == 5


# ----------------------------------------------------------------------------------------------
# What a run leaves is the same, however it was stopped

TIMING = ("tokens_per_s", "elapsed")
EXACT = dict(TINY, log_interval=3, eval_interval=6, sample_tokens=20, dropout=0.1, steps=12)


def _files(run):
    """metrics.jsonl without its timing fields, and samples.txt."""
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]
    return records, (run / "samples.txt").read_text(encoding="utf-8")


@pytest.fixture
def uninterrupted(tmp_path, text_file):
    train(text=str(text_file), out=str(tmp_path / "whole"), **EXACT)
    return _files(tmp_path / "whole")


def _interrupt_on_call(monkeypatch, owner, name, n, exc=KeyboardInterrupt):
    """Make owner.name raise exc on its n-th call."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize(
    "where",
    [
        ("tinylm.training.evaluate", 2),  # in the middle of the evaluation of step 12
        ("tinylm.training.sample_text", 1),  # before the sample of step 6 is written
        ("tinylm.training.plot_losses", 2),  # after the record of step 12 was written
        ("tinylm.model.GPT.backward", 5),  # mid-step, with losses since the record at step 3
        ("tinylm.checkpoint.save_checkpoint", 1),  # in the first save, after the sample
    ],
)
def test_ctrl_c_anywhere_then_resume_leaves_the_files_of_an_uninterrupted_run(
    tmp_path, text_file, monkeypatch, uninterrupted, where
):
    import importlib

    target, n = where
    module_name, _, attr = target.rpartition(".")
    try:
        owner = importlib.import_module(module_name)
    except ImportError:  # a class inside a module
        module_name, _, cls = module_name.rpartition(".")
        owner = getattr(importlib.import_module(module_name), cls)
    run = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt_on_call(m, owner, attr, n)
        with pytest.raises(KeyboardInterrupt):
            train(text=str(text_file), out=str(run), **EXACT)
    train(resume=str(run), verbose=False, progress=False)
    assert _files(run) == uninterrupted


def test_a_crash_after_the_sample_before_the_save_does_not_repeat_the_sample(
    tmp_path, text_file, monkeypatch, uninterrupted
):
    """A process killed between writing a record and its sample and saving the checkpoint
    (here: an error in the second save) resumes from the previous checkpoint without repeating
    what was written after it."""
    run = tmp_path / "crash"
    with monkeypatch.context() as m:
        _interrupt_on_call(m, __import__("tinylm.checkpoint").checkpoint, "save_checkpoint", 2,
                           exc=RuntimeError("killed"))  # fmt: skip
        with pytest.raises(RuntimeError, match="killed"):
            train(text=str(text_file), out=str(run), **EXACT)
    assert "=== step 12 ===" in (run / "samples.txt").read_text(encoding="utf-8")
    assert load_checkpoint(run).step == 6
    train(resume=str(run), verbose=False, progress=False)
    assert _files(run) == uninterrupted


def test_a_damaged_metrics_line_is_an_error_naming_file_and_line(tmp_path, text_file):
    run = tmp_path / "run"
    train(text=str(text_file), out=str(run), steps=10, **TINY)
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    (run / "metrics.jsonl").write_text(lines[0][:-5] + "\n" + lines[1] + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON record"):
        train(resume=str(run), steps=15, verbose=False, progress=False)

    # A last line cut short without its newline (a crash while appending it) is not damage.
    (run / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20], encoding="utf-8")
    train(resume=str(run), steps=15, verbose=False, progress=False)


def test_an_absurd_model_size_is_refused_before_anything_is_allocated(tmp_path, text_file):
    with pytest.raises(ValueError, match=r"would have [\d,]+ parameters"):
        train(text=str(text_file), **dict(TINY, block_size=10**12, steps=5))
    with pytest.raises(ValueError, match=r"would have [\d,]+ parameters"):
        train(text=str(text_file), **dict(TINY, n_layer=10**6, steps=5))

    # A checkpoint whose config claims such a size is refused from the shapes alone.
    run = tmp_path / "run"
    train(text=str(text_file), out=str(run), steps=5, **TINY)
    config_file = run / "checkpoint" / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["model_config"]["block_size"] = 10**12
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=r"'wpe.weight' has shape \(16, 16\)"):
        load_checkpoint(run)


def test_train_restores_the_array_backend(text_file):
    from tinylm.backend import get_backend

    before = get_backend()
    train(text=str(text_file), steps=2, **TINY)
    assert get_backend() == before


def test_overwrite_keeps_the_old_run_until_the_new_one_saved_its_first_checkpoint(
    tmp_path, text_file, monkeypatch
):
    run = tmp_path / "run"
    train(text=str(text_file), out=str(run), steps=10, **dict(TINY, sample_tokens=10))
    old = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "samples.txt")}

    # The new run fails at its first step (as an out-of-memory would): the old run is whole.
    from tinylm.model import GPT

    def out_of_memory(self):
        raise MemoryError("Unable to allocate")

    with monkeypatch.context() as m:
        m.setattr(GPT, "backward", out_of_memory)
        with pytest.raises(MemoryError):
            train(text=str(text_file), out=str(run), steps=6, overwrite=True, **TINY)
    assert {name: (run / name).read_bytes() for name in old} == old
    assert load_checkpoint(run).step == 10
    assert sorted(p.name for p in run.iterdir()) == [
        ".lock", "checkpoint", "loss.png", "metrics.jsonl", "samples.txt",
    ]  # fmt: skip

    # Before its first checkpoint, the new run's records have their own names.
    seen = {}
    from tinylm import training

    plot = training.plot_losses

    def look(history, path):  # the first evaluation, before the first checkpoint
        seen.setdefault("files", sorted(p.name for p in run.iterdir()))
        seen.setdefault("metrics", (run / "metrics.jsonl").read_bytes())
        return plot(history, path)

    with monkeypatch.context() as m:
        m.setattr(training, "plot_losses", look)
        train(text=str(text_file), out=str(run), steps=6, overwrite=True, **TINY)
    assert "metrics.new.jsonl" in seen["files"] and seen["metrics"] == old["metrics.jsonl"]
    assert load_checkpoint(run).step == 6
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [5, 6]
    assert (run / "samples.txt").read_text(encoding="utf-8") == ""  # sample_tokens=0 now
    assert not [p for p in run.iterdir() if ".new." in p.name]


def test_a_crash_between_the_first_checkpoint_and_the_renames_is_finished_on_resume(
    tmp_path, text_file, monkeypatch
):
    run = tmp_path / "run"
    train(text=str(text_file), out=str(run), steps=5, **TINY)
    from tinylm import training

    with monkeypatch.context() as m:
        m.setattr(training, "_promote", lambda run_dir: (_ for _ in ()).throw(OSError("crash")))
        with pytest.raises(OSError, match="crash"):
            train(text=str(text_file), out=str(run), steps=10, lr=5e-3, overwrite=True, **TINY)
    # The new run's first checkpoint (step 5) is in place; its files still have staged names.
    assert load_checkpoint(run).train_config["lr"] == 5e-3
    assert (run / "metrics.new.jsonl").exists()
    train(resume=str(run), verbose=False, progress=False)
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [5, 10]
    assert records[0]["lr"] == pytest.approx(5e-3 * 5 / 10)  # the new run's warmup (old: 1e-3)
    assert not (run / "metrics.new.jsonl").exists()


def test_a_wrong_field_in_optimizer_json_names_the_file_and_the_field(tmp_path, text_file):
    run = tmp_path / "run"
    train(text=str(text_file), out=str(run), steps=5, **TINY)
    path = run / "checkpoint" / "optimizer.json"
    state = json.loads(path.read_text(encoding="utf-8"))
    state["lr"] = "fast"
    path.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ValueError, match=r"optimizer\.json: .*lr") as info:
        train(resume=str(run), steps=10, verbose=False, progress=False)
    assert "\n" not in str(info.value)


def test_a_wrong_setting_in_the_checkpoints_config_names_the_file_and_the_setting(
    tmp_path, text_file
):
    run = tmp_path / "run"
    train(text=str(text_file), out=str(run), steps=5, **TINY)
    path = run / "checkpoint" / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["train_config"]["lr"] = -1
    path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.json: train_config: lr must be > 0"):
        train(resume=str(run), steps=10, verbose=False, progress=False)
