"""The commands around Hugging Face GPT-2 directories: `tinylm sample --pretrained`, `tinylm eval
--pretrained` (and bits per byte everywhere), `tinylm export RUN_DIR --to DIR`.

Every directory is built here: a small random GPT saved with save_pretrained next to a small
BPE trained on the spot, and runs trained for a few steps. Nothing is downloaded. The oracle test
(transformers loads an exported run with the same logits) is skipped without transformers.
"""

import math
import re

import numpy as np
import pytest

from tinylm import cli
from tinylm.checkpoint import load_checkpoint
from tinylm.evaluation import (
    TextScore,
    auto_batch_size,
    evaluate_text,
    evaluate_tokens,
    utf8_length,
)
from tinylm.gradcheck import randomize_params
from tinylm.hf.gpt2 import load_gpt2
from tinylm.model import GPT, GPTConfig
from tinylm.tokenizer import BPETokenizer, CharTokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 42 degrees!\n"
    "def f(x):\n    return x ** 2  # square\n\n"
    "Grüße, 中文 and emoji 🎉 too.  Spaces   and\n\nnewlines.\n"
) * 12
TINY = [
    "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
    "--batch-size", "4", "--warmup-steps", "1", "--eval-interval", "3", "--log-interval", "3",
    "--sample-tokens", "0", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "mixed.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT, vocab_size=256 + 40 + 1)


@pytest.fixture(scope="module")
def gpt2_dir(bpe, tmp_path_factory):
    """A random GPT-2 (block 16) and its BPE, saved as a Hugging Face directory."""
    config = GPTConfig(vocab_size=bpe.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(config, seed=0)
    randomize_params(model, np.random.default_rng(1), scale=0.3)  # a peaked, varied distribution
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path, tokenizer=bpe)
    return path


def train_run(out, text_file, *flags):
    argv = ["train", "--text", str(text_file), "--out", str(out), "--steps", "3", *TINY, *flags]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("runs") / "bpe"
    return train_run(out, text_file, "--tokenizer", "bpe", "--vocab-size", "300")


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, text_file):
    return train_run(tmp_path_factory.mktemp("runs") / "char", text_file)


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def run(capsys, argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def fails(capsys, argv, *expected):
    """The command failed with status 2 and one line `tinylm: error: ...` holding `expected`."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert err.count("\n") == 0 and err.startswith("tinylm") and "error:" in err, err
    for piece in expected:
        assert piece in err, (piece, err)
    return err


# ----------------------------------------------------------------------------------------------
# tinylm sample --pretrained


def test_sample_pretrained(capsys, gpt2_dir):
    out = run(capsys, ["sample", "--pretrained", gpt2_dir, "--prompt", "The quick",
                       "--max-new-tokens", "12", "--num-samples", "3", "--seed", "4"])  # fmt: skip
    samples = out.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3
    assert all(s.startswith("The quick") for s in samples)
    assert len(set(samples)) > 1  # three independent draws from a spread-out distribution

    greedy = [
        run(capsys, ["sample", "--pretrained", gpt2_dir, "--prompt", "The quick",
                     "--max-new-tokens", "12", "--temperature", "0", *flag])
        for flag in ([], ["--no-cache"])
    ]  # fmt: skip
    assert greedy[0] == greedy[1]
    model, tok = load_gpt2(gpt2_dir)  # the same greedy tokens, computed here without the CLI
    prompt = tok.encode("The quick")
    ids = [*prompt]
    for _ in range(12):
        logits, _ = model.forward(np.array([ids[-16:]]))
        ids.append(int(np.argmax(logits[0, -1])))
    assert greedy[0] == tok.decode(ids) + "\n"


def test_sample_from_an_empty_prompt_starts_at_endoftext(capsys, gpt2_dir):
    out = run(capsys, ["sample", "--pretrained", gpt2_dir, "--max-new-tokens", "5"])
    assert out.endswith("\n") and not out.startswith("<|endoftext|>")


def test_model_source_errors(capsys, gpt2_dir, bpe_run, text_file, tmp_path):
    for command, text in (("sample", []), ("eval", ["--text", text_file])):
        fails(capsys, [command], "give a run directory (RUN_DIR) or", "one of them")
        fails(capsys, [command, bpe_run, "--pretrained", gpt2_dir, *text], "not both")
        fails(capsys, [command, "--pretrained", bpe_run, *text],
              "is a tinylm run directory; give it as RUN_DIR")  # fmt: skip
        fails(capsys, [command, gpt2_dir, *text], "is a Hugging Face model directory",
              "--pretrained")  # fmt: skip
        fails(capsys, [command, "--pretrained", tmp_path / "nowhere", *text],
              "nowhere", "does not exist")  # fmt: skip
    no_tokenizer = tmp_path / "model-only"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((gpt2_dir / name).read_bytes())
    fails(capsys, ["sample", "--pretrained", no_tokenizer], "model-only",
          "has no tokenizer files (vocab.json and merges.txt)")  # fmt: skip
    (gpt2_dir.parent / "bad").mkdir(exist_ok=True)
    (gpt2_dir.parent / "bad" / "config.json").write_text('{"model_type": "bert"}')
    fails(capsys, ["sample", "--pretrained", gpt2_dir.parent / "bad"], "config.json",
          "model_type is 'bert', expected 'gpt2'")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Bits per byte: tinylm.evaluation and `tinylm eval`


def hand_score(model, ids, T):
    """-ln p summed over ids[1:], laid out by hand: non-overlapping windows of T inputs, each
    predicting the next T tokens, the last window shorter; log-softmax in float64 here."""
    nats, n = 0.0, 0
    for start in range(0, len(ids) - 1, T):
        x = np.array([ids[start : start + T]])
        y = ids[start + 1 : start + T + 1]
        x = x[:, : len(y)]
        logits, _ = model.eval().forward(x)
        z = logits[0].astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nats -= sum(logp[t, y[t]] for t in range(len(y)))
        n += len(y)
    return nats, n


def test_bits_per_byte_by_hand_bpe(gpt2_dir):
    model, tok = load_gpt2(gpt2_dir)
    text = TEXT[:300]
    ids = [tok.eot_id, *tok.encode(text)]
    assert (len(ids) - 1) % 16 != 0 and len(ids) - 1 > 3 * 16  # full windows and a short one
    nats, n = hand_score(model, ids, 16)
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)  # "ü", "中", "🎉": bytes are not characters
    score = evaluate_text(model, tok, text, batch_size=2)
    assert (score.tokens, score.bytes) == (n, n_bytes) == (len(ids) - 1, n_bytes)
    assert score.nats == pytest.approx(nats, rel=1e-6)
    assert score.bits_per_byte == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-6)
    assert score.loss == pytest.approx(nats / n, rel=1e-6)
    assert score.perplexity == pytest.approx(math.exp(nats / n), rel=1e-5)
    # Shorter windows: the same tokens, each with less context.
    nats8, _ = hand_score(model, ids, 8)
    assert evaluate_text(model, tok, text, block_size=8).nats == pytest.approx(nats8, rel=1e-6)


def test_bits_per_byte_by_hand_characters():
    text = "Grüße aus Köln: 中文 🎉!\n" * 3
    tok = CharTokenizer(text)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8)
    model = GPT(config, seed=2, dtype=np.float64)
    randomize_params(model, np.random.default_rng(3))
    ids = [tok.eot_id, *tok.encode(text)]
    nats, n = hand_score(model, ids, 8)
    score = evaluate_text(model, tok, text)
    assert score.tokens == n == len(text)
    extra = 1 + 1 + 1 + 2 + 2 + 3  # the bytes beyond one of ü, ß, ö, 中, 文, 🎉 in each line
    assert score.bytes == len(text.encode("utf-8")) == len(text) + 3 * extra
    assert score.bits_per_byte == pytest.approx(nats / (math.log(2) * score.bytes), rel=1e-12)


def test_utf8_length_counts_token_bytes(bpe):
    ids = bpe.encode("中文 🎉 Grüße")
    assert utf8_length(bpe, ids) == len("中文 🎉 Grüße".encode())
    for cut in range(1, len(ids)):  # a cut may fall inside a character: bytes still add up
        assert utf8_length(bpe, ids[:cut]) + utf8_length(bpe, ids[cut:]) == utf8_length(bpe, ids)
    tok = CharTokenizer("aü中")
    assert utf8_length(tok, tok.encode("aü中<|endoftext|>")) == 1 + 2 + 3 + 13


def test_batch_size_changes_nothing_but_the_speed(gpt2_dir):
    model, tok = load_gpt2(gpt2_dir)
    scores = [evaluate_text(model, tok, TEXT, batch_size=b).nats for b in (1, 3, 1000, None)]
    assert max(scores) - min(scores) <= 1e-6 * max(scores)
    gpt2_small = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    assert auto_batch_size(gpt2_small, 1024) == 1  # 1024 x 50257 logits alone are 51M numbers
    assert auto_batch_size(gpt2_small, 64) == 10
    char = GPTConfig(vocab_size=104, block_size=64, n_layer=4, n_head=4, n_embd=128)
    assert auto_batch_size(char, 64) == 2**25 // (64 * 512)  # the MLP's 4C = 512 is widest


def test_logits_keep_no_caches_and_match_forward(gpt2_dir):
    model, tok = load_gpt2(gpt2_dir)
    model.config.dropout = 0.5  # logits() reads with dropout off, whatever the mode
    x = np.array([tok.encode(TEXT)[:16]])
    model.train()
    assert model.logits(x).shape == (1, 16, tok.vocab_size) and model.training
    assert model._caches is None  # nothing kept for a backward
    np.testing.assert_array_equal(model.logits(x), model.eval().forward(x)[0])


def test_evaluation_input_errors(gpt2_dir):
    model, tok = load_gpt2(gpt2_dir)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_tokens(model, np.array([1]), 1)
    with pytest.raises(ValueError, match=r"block_size must be in 1\.\.16 .*got 17"):
        evaluate_text(model, tok, "abc", block_size=17)
    assert TextScore(tokens=2, bytes=4, nats=8 * math.log(2)).bits_per_byte == pytest.approx(2)


def parse(line):
    """The numbers of an eval line."""
    fields = {}
    for key, pattern in (
        ("tokens", r"([\d,]+) predicted tokens"), ("bytes", r"([\d,]+) bytes"),
        ("loss", r"loss ([\d.]+)"), ("perplexity", r"perplexity ([\d.]+)"),
        ("bpb", r"bits per byte ([\d.]+)"), ("T", r"windows of (\d+) tokens"),
    ):  # fmt: skip
        fields[key] = float(re.search(pattern, line).group(1).replace(",", ""))
    return fields


def test_eval_pretrained(capsys, gpt2_dir, text_file):
    out = run(capsys, ["eval", "--pretrained", gpt2_dir, "--text", text_file, "--batch-size", 3])
    assert out.count("\n") == 1 and "step" not in out
    got = parse(out)
    model, tok = load_gpt2(gpt2_dir)
    ids = [tok.eot_id, *tok.encode(TEXT)]
    nats, n = hand_score(model, ids, 16)
    n_bytes = len(TEXT.encode("utf-8"))
    assert (got["tokens"], got["bytes"], got["T"]) == (n, n_bytes, 16)
    assert got["loss"] == pytest.approx(nats / n, abs=1e-4)
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), abs=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(nats / n), rel=1e-3)
    fails(capsys, ["eval", "--pretrained", gpt2_dir], "--pretrained needs --text FILE")


def test_eval_run_gives_bits_per_byte(capsys, bpe_run, text_file):
    model = load_checkpoint(bpe_run).build_model()
    tok = load_checkpoint(bpe_run).tokenizer
    got = parse(run(capsys, ["eval", bpe_run, "--text", text_file]))
    ids = [tok.eot_id, *tok.encode(TEXT)]
    nats, n = hand_score(model, ids, 16)
    assert got["tokens"] == n and got["bytes"] == len(TEXT.encode("utf-8"))
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * got["bytes"]), abs=1e-4)
    # The validation split: its tokens after the first, their bytes counted token by token.
    line = run(capsys, ["eval", bpe_run])
    assert "the validation split of" in line and "| step 3" in line
    got = parse(line)
    assert got["bpb"] * math.log(2) * got["bytes"] == pytest.approx(
        got["loss"] * got["tokens"], rel=1e-3
    )


# ----------------------------------------------------------------------------------------------
# tinylm export RUN_DIR --to DIR


def test_export_bpe_run(capsys, bpe_run, text_file, tmp_path):
    out = tmp_path / "exported"
    line = run(capsys, ["export", bpe_run, "--to", out])
    assert line.count("\n") == 1 and "GPT-2's tokenizer files" in line and str(out) in line
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json",
    ]  # fmt: skip
    assert not list(tmp_path.glob("exported.tmp-*"))
    ckpt = load_checkpoint(bpe_run)
    model, tok = load_gpt2(out)
    for name, a in ckpt.params.items():
        np.testing.assert_array_equal(model.params[name], a, err_msg=name)
    assert tok.encode(TEXT) == ckpt.tokenizer.encode(TEXT)
    # ... and the other commands read it with --pretrained.
    assert "bits per byte" in run(capsys, ["eval", "--pretrained", out, "--text", text_file])


def test_export_char_run_writes_the_model_and_says_why_not_the_tokenizer(capsys, char_run,
                                                                          tmp_path):  # fmt: skip
    out = tmp_path / "char-model"
    out.mkdir()  # an empty directory is fine
    line = run(capsys, ["export", char_run, "--to", out])
    assert line.count("\n") == 1
    assert "config.json and model.safetensors only" in line
    assert "CharTokenizer, not GPT-2's byte-level BPE" in line and "own tokenizer" in line
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model, tok = load_gpt2(out)
    assert tok is None
    ckpt = load_checkpoint(char_run)
    idx = np.array([ckpt.tokenizer.encode("The quick brown")])
    np.testing.assert_array_equal(model.forward(idx)[0], ckpt.build_model().forward(idx)[0])


def test_export_never_writes_over_anything(capsys, bpe_run, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    fails(capsys, ["export", bpe_run, "--to", full], "--to", "already exists", "not an empty")
    assert [p.name for p in full.iterdir()] == ["notes.txt"]
    assert (full / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    fails(capsys, ["export", bpe_run, "--to", a_file], "already exists")
    assert a_file.read_text() == "mine"
    fails(capsys, ["export", tmp_path / "no-run", "--to", tmp_path / "x"], "no-run")
    fails(capsys, ["export", bpe_run, "--to", bpe_run / "checkpoint" / "hf"],
          "is inside the checkpoint directory")  # fmt: skip
    assert load_checkpoint(bpe_run).step == 3  # the checkpoint is as it was
    assert not (tmp_path / "x").exists()
    assert cli.main(["export", str(bpe_run)]) == 2  # --to is required
    assert "--to" in capsys.readouterr().err


def test_export_of_a_model_gpt2_cannot_hold_leaves_nothing(capsys, tmp_path, text_file):
    run_dir = train_run(tmp_path / "sinusoidal", text_file, "--positions", "sinusoidal")
    fails(capsys, ["export", run_dir, "--to", tmp_path / "out"], "GPT-2 learns its positions")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sinusoidal"]


def test_help_of_the_new_flags(capsys):
    for command in ("sample", "eval"):
        assert cli.main([command, "--help"]) == 0
        assert "--pretrained PATH" in capsys.readouterr().out
    assert cli.main(["export", "--help"]) == 0
    assert "--to DIR" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Oracle: transformers reads what tinylm export writes


def test_oracle_transformers_loads_an_exported_run(capsys, bpe_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "exported"
    run(capsys, ["export", bpe_run, "--to", out])
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(out)
    ckpt = load_checkpoint(bpe_run)
    text = "The quick brown fox, 中文 🎉"
    ids = ckpt.tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    idx = np.array([ids[:16]])
    ours, _ = ckpt.build_model().eval().forward(idx)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
