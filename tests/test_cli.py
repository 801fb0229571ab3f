"""The `tinylm` command: each subcommand works, and every kind of bad input ends in one line
`tinylm: error: ...`, a non-zero status, no traceback, and nothing overwritten."""

import json
import subprocess
import sys

import pytest

from tinylm import cli
from tinylm.checkpoint import load_checkpoint
from tinylm.model import GPT
from tinylm.parallel import workers_can_start

TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
    "--batch-size", "8", "--warmup-steps", "2", "--eval-interval", "5", "--log-interval", "5",
    "--sample-tokens", "10", "--quiet",
]  # fmt: skip
SENTENCE = "The quick brown fox jumps over the lazy dog. "


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "fox.txt"
    path.write_text(SENTENCE * 40, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_file):
    """A finished 10-step run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert (
        cli.main(["train", "--text", str(text_file), "--out", str(out), "--steps", "10", *TINY])
        == 0
    )
    return out


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Run every command from a fresh directory, so the default --out never lands in the repo."""
    monkeypatch.chdir(tmp_path)


def fails(capsys, argv, *expected):
    """Run the command, check it failed with one clean line, return that line."""
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0, argv
    assert err.count("\n") == 0, err
    assert err.startswith("tinylm") and "error:" in err, err
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, (piece, err)
    return err


# -- bad input --------------------------------------------------------------------------------


def test_missing_paths(capsys, tmp_path):
    fails(capsys, ["train", "--text", str(tmp_path / "nope.txt"), *TINY], "nope.txt", "not exist")
    fails(capsys, ["sample", str(tmp_path / "nope")], "nope")
    fails(capsys, ["eval", str(tmp_path / "nope")], "nope")
    fails(capsys, ["info", str(tmp_path / "nope")], "nope")


def test_empty_and_too_short_texts(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    fails(capsys, ["train", "--text", str(tmp_path / "empty.txt"), *TINY], "empty")
    (tmp_path / "short.txt").write_text("a few chars")  # fewer than block_size + 1 = 17
    fails(capsys, ["train", "--text", str(tmp_path / "short.txt"), *TINY], "too few", "block")


def test_text_that_is_not_utf8(capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(SENTENCE.encode() * 3 + "caf\xe9".encode("latin-1"))
    fails(
        capsys,
        ["train", "--text", str(tmp_path / "latin1.txt"), *TINY],
        "latin1.txt",
        "UTF-8",
        f"byte offset {len(SENTENCE) * 3 + 3}",
    )


def test_prompt_outside_the_vocabulary(capsys, run_dir, tmp_path):
    fails(capsys, ["sample", str(run_dir), "--prompt", "Zoë"], "'Z'", "'ë'")
    (tmp_path / "zoe.txt").write_text("Zoë", encoding="utf-8")
    fails(capsys, ["eval", str(run_dir), "--text", str(tmp_path / "zoe.txt")],
          f"--text {tmp_path / 'zoe.txt'}: ", "'Z'", "'ë'")  # fmt: skip


@pytest.mark.parametrize(
    "argv, name",
    [
        (["train", "--n-layer", "0"], "n_layer"),
        (["train", "--n-embd", "-16"], "n_embd"),
        (["train", "--batch-size", "0"], "batch_size"),
        (["train", "--block-size", "0"], "block_size"),
        (["train", "--steps", "-5"], "steps"),
        (["train", "--lr", "0"], "lr"),
        (["train", "--lr", "-1e-3"], "lr"),
        (["train", "--min-lr", "-1"], "min_lr"),
        (["train", "--weight-decay", "-0.1"], "weight_decay"),
        (["train", "--dropout", "1.5"], "dropout"),
        (["train", "--eval-interval", "0"], "eval_interval"),
        (["train", "--n-layer", "two"], "--n-layer"),
        (["sample", "RUN", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["sample", "RUN", "--temperature", "-1"], "temperature"),
        (["sample", "RUN", "--top-k", "0"], "top_k"),
        (["sample", "RUN", "--top-p", "0"], "top_p"),
        (["sample", "RUN", "--num-samples", "0"], "--num-samples"),
        (["eval", "RUN", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_zero_or_negative_sizes_and_rates(capsys, run_dir, argv, name):
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    fails(capsys, argv, name)


def test_resume_without_a_checkpoint(capsys, tmp_path):
    fails(capsys, ["train", "--resume", str(tmp_path)], "no checkpoint")


def test_resume_from_a_corrupt_checkpoint(capsys, tmp_path, run_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "checkpoint" / "model.safetensors").write_bytes(b"\x00" * 20)
    fails(capsys, ["train", "--resume", str(broken), "--steps", "20"], "model.safetensors")
    (broken / "checkpoint" / "config.json").write_text("[1, 2")
    fails(capsys, ["sample", str(broken)], "config.json")


def test_settings_that_disagree_with_the_checkpoint(capsys, run_dir):
    before = (run_dir / "metrics.jsonl").read_bytes()
    fails(capsys, ["train", "--resume", str(run_dir), "--n-embd", "32"], "n_embd", "disagrees")
    fails(capsys, ["train", "--resume", str(run_dir), "--no-tie-weights"], "tie_weights")
    fails(capsys, ["train", "--resume", str(run_dir)], "10 of its 10 steps", "--steps")
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_out_that_already_holds_a_run(capsys, run_dir, text_file):
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    fails(
        capsys,
        ["train", "--text", str(text_file), "--out", str(run_dir), *TINY],
        "already holds",
        "--resume",
        "--overwrite",
    )
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files


def test_overwrite_starts_over(tmp_path, run_dir, text_file):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    argv = ["train", "--text", str(text_file), "--out", str(copy), "--steps", "5", *TINY]
    assert cli.main([*argv, "--overwrite"]) == 0
    assert load_checkpoint(copy).step == 5
    assert [json.loads(line)["step"] for line in open(copy / "metrics.jsonl")] == [5]


def test_config_file(capsys, tmp_path, text_file):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_layer": 1, "n_leyer": 2, "colour": "red"}))
    fails(capsys, ["train", "--config", str(bad)], "bad.json", "colour", "n_leyer")
    bad.write_text("{")
    fails(capsys, ["train", "--config", str(bad)], "bad.json", "JSON")

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 32, "steps": 2, "lr": 5e-3}))
    out = tmp_path / "run"
    argv = ["train", "--config", str(good), "--text", str(text_file), "--out", str(out)]
    assert cli.main([*argv, "--n-embd", "16", "--block-size", "16", "--quiet"]) == 0
    saved = load_checkpoint(out)
    assert saved.model_config.n_embd == 16  # the flag beats the file
    assert saved.train_config["lr"] == 5e-3 and saved.train_config["steps"] == 2  # from the file


def test_gpu_without_cupy(capsys, text_file, tmp_path):
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed; the missing-GPU message cannot be seen here")
    except ImportError:
        pass
    out = tmp_path / "run"
    fails(
        capsys,
        ["train", "--text", str(text_file), "--out", str(out), "--device", "gpu"],
        "CuPy",
        "pip install",
    )
    assert not out.exists()


# -- Ctrl-C ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_ctrl_c_saves_a_checkpoint_and_exits_130(capsys, monkeypatch, tmp_path, text_file,
                                                 workers):
    calls = {"n": 0}
    backward = GPT.backward
    # backward calls in this process per step, two shards a step (--data-parallel 2): both in
    # threads here, or shard 0 here and shard 1 in a worker process (which the patch misses)
    per_step = 1 if workers == "processes" and workers_can_start() else 2

    def backward_then_interrupt(self):
        calls["n"] += 1
        if calls["n"] == per_step * 6 + 1:  # during step 7
            raise KeyboardInterrupt
        return backward(self)

    monkeypatch.setattr(GPT, "backward", backward_then_interrupt)
    out = tmp_path / "run"
    code = cli.main(["train", "--text", str(text_file), "--out", str(out), "--steps", "10",
                     "--data-parallel", "2", "--data-parallel-workers", workers,
                     *TINY])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 130
    assert f"tinylm train --resume {out}" in err
    assert load_checkpoint(out).step == 6

    monkeypatch.setattr(GPT, "backward", backward)
    assert cli.main(["train", "--resume", str(out), "--quiet"]) == 0
    assert load_checkpoint(out).step == 10


# -- the whole command, in a separate process -------------------------------------------------


def test_python_m_tinylm_end_to_end(tmp_path, text_file):
    out = tmp_path / "run"

    def tinylm(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "tinylm", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    log = tinylm("train", "--steps", "3", "--text", str(text_file), "--out", str(out),
                 *[a for a in TINY if a != "--quiet"])  # fmt: skip
    assert "step 3 | train loss" in log and "val loss" in log
    assert {"metrics.jsonl", "loss.png", "samples.txt", "checkpoint"} <= {
        p.name for p in out.iterdir()
    }

    text = tinylm("sample", str(out), "--prompt", "The ", "--max-new-tokens", "20", "--seed", "1")
    assert text.startswith("The ") and len(text.rstrip("\n")) == 24
    greedy = [tinylm("sample", str(out), "--temperature", "0", "--max-new-tokens", "15", *flag)
              for flag in ([], ["--no-cache"])]  # fmt: skip
    assert greedy[0] == greedy[1]  # the KV cache changes the speed, not the text

    assert "perplexity" in tinylm("eval", str(out))
    assert "perplexity" in tinylm("eval", str(out), "--text", str(text_file))
    info = tinylm("info", str(out), "--verbose")
    assert "step 3 of 3" in info and "wte.weight" in info and "metrics.jsonl" in info


@pytest.mark.parametrize(
    "command",
    ["train", "sample", "eval", "export", "info", "gradcheck", "pretrain", "finetune",
     "classify", "exercises"],
)
def test_help(capsys, command):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tinylm {command}")
    assert "default" in out or command == "exercises"  # exercises has actions, no settings


def test_resume_given_the_checkpoint_directory_continues_the_run(tmp_path, run_dir):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    assert cli.main(["train", "--resume", str(run / "checkpoint"), "--steps", "12"]) == 0
    assert load_checkpoint(run).step == 12  # the run directory's own checkpoint moved on
    assert not (run / "checkpoint" / "checkpoint").exists()


def test_eval_refuses_a_training_text_that_changed(capsys, tmp_path, text_file):
    text = tmp_path / "text.txt"
    text.write_text(text_file.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    assert cli.main(["train", "--text", str(text), "--out", str(out), "--steps", "3", *TINY]) == 0
    text.write_text(SENTENCE * 20, encoding="utf-8")
    fails(capsys, ["eval", str(out)], "has changed since the run was trained")


def test_out_of_memory_is_one_line(capsys, monkeypatch, text_file):
    import tinylm.training  # noqa: F401

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.73 GiB for an array with shape (64, 1024, 16384)"
                          " and data type float32")  # what NumPy says

    monkeypatch.setattr(sys.modules["tinylm.training"], "train", no_memory)
    err = fails(capsys, ["train", "--text", str(text_file), "--steps", "2"], "out of memory")
    assert "3.73 GiB" in err and "(64, 1024, 16384)" in err  # what could not be allocated
    assert "--batch-size" in err  # and what to change


# -- the commands that live next to their code (pretraining, finetuning, exercises) ---------------


def test_exercises_start_then_check_through_the_cli(capsys, tmp_path):
    assert cli.main(["exercises", "start", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "my_layers.py").is_file()
    assert cli.main(["exercises", "check", str(tmp_path / "mine")]) == 1  # nothing written yet
    out = capsys.readouterr().out
    assert "linear_backward" in out and "not started" in out
    fails(capsys, ["exercises", "start", str(tmp_path / "mine")], "my_layers.py")  # never replaced


def test_finetune_and_classify_name_what_is_missing(capsys, tmp_path):
    fails(capsys, ["classify", str(tmp_path / "nothing"), "--text", "hi"], "nothing")
    fails(capsys, ["finetune", "--data", str(tmp_path / "no.csv"), "--from",
                   str(tmp_path / "nothing"), "--out", str(tmp_path / "run")], "no.csv")
    assert not (tmp_path / "run").exists()


def test_pretrain_refuses_a_bad_flag_in_one_line(capsys, tmp_path):
    fails(capsys, ["pretrain", "--steps", "0", "--out", str(tmp_path / "bert")], "steps")
    assert not (tmp_path / "bert").exists()


def test_info_describes_a_pretraining_run(capsys, tmp_path):
    out = tmp_path / "bert"
    assert cli.main(["pretrain", "--out", str(out), "--steps", "2", "--eval-interval", "2",
                     "--n-layer", "1", "--n-embd", "32", "--vocab-size", "300",
                     "--no-progress", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "BERT encoder, 1 layers x 2 heads x 32" in text and "heads: pooler, MLM, NSP" in text
    assert "mlm accuracy" in text and "WordPieceTokenizer" in text


def test_info_shows_what_it_can_of_a_run_with_a_damaged_metrics_file(capsys, run_dir, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    lines[0] = '{"step": 1, "train_loss": oops'
    (damaged / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code = cli.main(["info", str(damaged)])
    captured = capsys.readouterr()
    assert code == 2
    assert "parameters" in captured.out and "checkpoint/" in captured.out  # the rest is shown
    assert "metrics.jsonl, line 1" in captured.err and captured.err.count("\n") == 1
