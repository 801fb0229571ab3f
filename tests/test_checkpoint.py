"""Checkpoints: an exact round trip, an atomic write, and a ValueError naming the file for every
kind of damage."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy

from tinylm import checkpoint as ckpt_io
from tinylm.checkpoint import load_checkpoint, save_checkpoint
from tinylm.model import GPT, GPTConfig
from tinylm.optim import AdamW
from tinylm.tokenizer import BPETokenizer, CharTokenizer

TEXT = "hello tiny world, hello again. "


def _trained(seed=0, steps=3):
    """A tiny model, its AdamW and a batch stream, a few steps in (so moments are non-zero)."""
    tok = CharTokenizer(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8,
                    dropout=0.1)  # fmt: skip
    model = GPT(cfg, seed=seed)
    opt = AdamW(model.params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    data = np.array(tok.encode(TEXT * 4))
    for _ in range(steps):
        x = data[rng.integers(0, len(data) - 9, size=(4, 1)) + np.arange(8)]
        y = data[1:][rng.integers(0, len(data) - 9, size=(4, 1)) + np.arange(8)]
        model.forward(x, y)
        opt.step(model.backward())
    return model, opt, tok, rng


def _save(path, model, opt, tok, rng, step=3):
    return save_checkpoint(
        path, model=model, optimizer=opt, tokenizer=tok, step=step, batch_rng=rng,
        train_config={"n_layer": 1}, extra={"elapsed": 1.5},
    )  # fmt: skip


def test_round_trip_is_exact(tmp_path):
    model, opt, tok, rng = _trained()
    _save(tmp_path / "checkpoint", model, opt, tok, rng)
    ck = load_checkpoint(tmp_path)  # the run directory finds its checkpoint/
    assert ck.step == 3 and ck.dtype == np.float32 and ck.model_config == model.config
    assert ck.train_config == {"n_layer": 1} and ck.extra == {"elapsed": 1.5}
    assert ck.tokenizer.to_dict() == tok.to_dict()
    for name, a in model.params.items():
        assert np.array_equal(ck.params[name], a) and ck.params[name].dtype == a.dtype

    state, saved = opt.state_dict(), ck.optimizer_state
    for key in ("lr", "betas", "eps", "weight_decay", "no_decay", "step"):
        assert saved[key] == state[key], key
    for name in model.params:
        assert np.array_equal(saved["m"][name], state["m"][name])
        assert np.array_equal(saved["v"][name], state["v"][name])

    # The random streams continue where they were.
    assert ck.batch_rng().random() == rng.random()
    rebuilt = ck.build_model()
    assert rebuilt.dropout_rng.random() == model.dropout_rng.random()
    # A restored optimizer takes exactly the same next step.
    opt2 = AdamW(rebuilt.params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    opt2.load_state_dict(ck.optimizer_state)
    grads = {k: np.full_like(a, 0.01) for k, a in model.params.items()}
    opt.step({k: g.copy() for k, g in grads.items()})
    opt2.step(grads)
    assert all(np.array_equal(model.params[k], rebuilt.params[k]) for k in grads)


def test_bpe_tokenizer_and_float64_round_trip(tmp_path):
    tok = BPETokenizer.train(TEXT * 3, 260)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=4, n_layer=1, n_head=1, n_embd=4,
                    tie_weights=False, positions="sinusoidal")  # fmt: skip
    model = GPT(cfg, dtype=np.float64)
    opt = AdamW(model.params)
    _save(tmp_path / "checkpoint", model, opt, tok, np.random.default_rng(1), step=0)
    ck = load_checkpoint(tmp_path / "checkpoint")
    assert ck.dtype == np.float64 and ck.tokenizer.merges == tok.merges
    assert "lm_head.weight" in ck.params and "wpe.weight" not in ck.params


def test_sinusoidal_checkpoints_keep_their_token_scale(tmp_path):
    # A new sinusoidal GPT scales its tokens by sqrt(C) and says so in config.json; one written
    # before GPTConfig.embedding_scale existed has no such field and was trained unscaled.
    tok = BPETokenizer.train(TEXT * 3, 260)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=4, n_layer=1, n_head=1, n_embd=4,
                    positions="sinusoidal")  # fmt: skip
    model = GPT(cfg, dtype=np.float64)
    _save(tmp_path / "checkpoint", model, AdamW(model.params), tok, np.random.default_rng(1),
          step=0)  # fmt: skip
    assert load_checkpoint(tmp_path / "checkpoint").model_config.embedding_scale == 2.0
    cfg_file = tmp_path / "checkpoint" / "config.json"
    saved = json.loads(cfg_file.read_text())
    del saved["model_config"]["embedding_scale"]  # as an older tinylm wrote it
    cfg_file.write_text(json.dumps(saved))
    old = load_checkpoint(tmp_path / "checkpoint")
    assert old.model_config.embedding_scale == 1.0
    idx = np.array([[1, 2, 3]])
    unscaled = GPT(GPTConfig(**{**cfg.to_dict(), "embedding_scale": 1.0}), dtype=np.float64,
                   params=model.params)  # fmt: skip
    assert np.array_equal(old.build_model().forward(idx)[0], unscaled.forward(idx)[0])


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    model, opt, tok, rng = _trained()
    _save(tmp_path / "checkpoint", model, opt, tok, rng, step=3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}

    real_save_file = safetensors.numpy.save_file
    calls = []

    def crash_on_second_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # model.safetensors written, optimizer.safetensors half done
            with open(filename, "wb") as f:
                f.write(b"\x00" * 10)
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", crash_on_second_file)
    model.params["wte.weight"] += 1.0  # the new checkpoint would differ
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path / "checkpoint", model, opt, tok, rng, step=4)
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save_file)

    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    assert after == before  # byte for byte
    assert load_checkpoint(tmp_path).step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no tmp left behind


def test_a_crash_between_the_renames_finds_the_old_checkpoint(tmp_path, monkeypatch):
    """Step 2 (old aside) done, step 3 (new into place) never happens: the previous checkpoint
    is found under checkpoint.old-XXXX, and the next save cleans up."""
    model, opt, tok, rng = _trained()
    _save(tmp_path / "checkpoint", model, opt, tok, rng, step=3)

    def crash(src, dst):
        raise KeyboardInterrupt  # the process dies here

    with monkeypatch.context() as m:
        m.setattr(ckpt_io.os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path / "checkpoint", model, opt, tok, rng, step=4)
    assert not (tmp_path / "checkpoint").exists()
    assert load_checkpoint(tmp_path).step == 3

    _save(tmp_path / "checkpoint", model, opt, tok, rng, step=5)
    assert load_checkpoint(tmp_path).step == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.fixture
def saved(tmp_path):
    model, opt, tok, rng = _trained()
    return _save(tmp_path / "checkpoint", model, opt, tok, rng)


def _load_error(path):
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    return str(info.value)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert "model.safetensors" in _load_error(saved)


def test_garbage_config(saved):
    (saved / "config.json").write_text("{not json", encoding="utf-8")
    message = _load_error(saved)
    assert "config.json" in message and "JSON" in message


def test_missing_file(saved):
    os.remove(saved / "rng.json")
    message = _load_error(saved)
    assert "rng.json" in message and "missing" in message


def test_wrong_format_version(saved):
    config = json.loads((saved / "config.json").read_text())
    config["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    message = _load_error(saved)
    assert "config.json" in message and "99" in message


def test_shape_mismatch(saved):
    tensors = safetensors.numpy.load_file(str(saved / "model.safetensors"))
    tensors["h.0.mlp.c_fc.weight"] = np.zeros((8, 16), np.float32)  # the config needs (8, 32)
    safetensors.numpy.save_file(tensors, str(saved / "model.safetensors"))
    message = _load_error(saved)
    assert "model.safetensors" in message and "h.0.mlp.c_fc.weight" in message


def test_config_that_disagrees_with_the_tensors(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model_config"]["n_layer"] = 2
    (saved / "config.json").write_text(json.dumps(config))
    message = _load_error(saved)
    assert "model.safetensors" in message and "h.1." in message


def test_optimizer_tensors_missing(saved):
    tensors = safetensors.numpy.load_file(str(saved / "optimizer.safetensors"))
    del tensors["v.wte.weight"]
    safetensors.numpy.save_file(tensors, str(saved / "optimizer.safetensors"))
    message = _load_error(saved)
    assert "optimizer.safetensors" in message and "v.wte.weight" in message


def test_bad_rng_state(saved):
    (saved / "rng.json").write_text(json.dumps({"batch": {"bit_generator": "Nope"}}))
    assert "rng.json" in _load_error(saved)


def test_no_checkpoint_at_all(tmp_path):
    assert "no checkpoint" in _load_error(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nowhere")


def test_a_bert_and_its_wordpiece_round_trip(tmp_path):
    from tinylm.bert import Bert, BertConfig
    from tinylm.wordpiece import WordPieceTokenizer

    tok = WordPieceTokenizer.train("The Cat sat on the mat. The dog sat too. " * 5, 40,
                                   do_lower_case=False)  # fmt: skip
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=8, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=12,
                     pad_token_id=tok.pad_id)  # fmt: skip
    model = Bert(cfg, seed=1)
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.01)
    _save(tmp_path / "checkpoint", model, opt, tok, np.random.default_rng(0))

    ck = load_checkpoint(tmp_path)
    assert ck.model_type == "bert" and ck.model_config == cfg
    rebuilt = ck.build_model()
    assert isinstance(rebuilt, Bert)
    assert all(np.array_equal(rebuilt.params[k], a) for k, a in model.params.items())
    assert isinstance(ck.tokenizer, WordPieceTokenizer) and ck.tokenizer.vocab == tok.vocab
    assert not ck.tokenizer.do_lower_case
    assert ck.tokenizer.encode("The Cat sat.") == tok.encode("The Cat sat.")

    # A damaged tokenizer entry is named.
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text(encoding="utf-8"))
    config["tokenizer"]["vocab"] = "not a list"
    (tmp_path / "checkpoint" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValueError, match="config.json: bad tokenizer"):
        load_checkpoint(tmp_path)
