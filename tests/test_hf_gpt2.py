"""Tests for tinylm/hf (common.py, gpt2.py): Hugging Face GPT-2 directories in and out.

Without torch: a directory tinylm writes reads back to the same logits and tokenizer ids; key
variants (prefix, mask buffers, tied lm_head) load; float16 and bfloat16 files load; every error
names its file (and tensor and shapes). With torch and transformers (skipped otherwise): a
random GPT2LMHeadModel loads with the same logits and greedy tokens, float64 gradients agree
with autograd for every parameter, and transformers loads what tinylm writes.
"""

import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from tinylm.gradcheck import randomize_params, rel_error
from tinylm.hf.common import check_tensors, read_config, read_weights, write_pretrained
from tinylm.hf.gpt2 import load_gpt2, param_shapes
from tinylm.model import GPT, GPTConfig
from tinylm.tokenizer import EOT, BPETokenizer, CharTokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 42 degrees!\n"
    "def f(x_1):\n    return x_1 ** 2  # square\n\n"
    "中文字符 and emoji 🎉 too.  Spaces   and\n\n\nnewlines. "
) * 20


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT, vocab_size=256 + 60 + 1)


def small_config(vocab_size, **overrides):
    fields = dict(vocab_size=vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16)
    return GPTConfig(**(fields | overrides))


def random_gpt(vocab_size, seed=0, dtype=np.float32, **overrides):
    model = GPT(small_config(vocab_size, **overrides), seed=seed, dtype=dtype)
    randomize_params(model, np.random.default_rng(seed + 1), scale=0.3)  # not GPT-2's zeros/ones
    return model


@pytest.fixture(scope="module")
def saved(bpe, tmp_path_factory):
    """A tinylm GPT and BPE written as a Hugging Face GPT-2 directory."""
    model = random_gpt(bpe.vocab_size)
    path = tmp_path_factory.mktemp("gpt2") / "model"
    model.save_pretrained(path, tokenizer=bpe)
    return model, path


def ids(tokenizer, text=TEXT[:200]):
    return np.array([tokenizer.encode(text)[:32]], dtype=np.int64)


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ----------------------------------------------------------------------------------------------
# Round trips within tinylm


def test_round_trip_gives_identical_logits_and_ids(saved, bpe):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "tokenizer_config.json", "vocab.json",
    ]  # fmt: skip
    loaded, tok = load_gpt2(path)
    assert loaded.config == model.config and loaded.dtype == np.float32
    assert list(loaded.params) == list(model.params)
    for name in model.params:
        assert np.array_equal(loaded.params[name], model.params[name]), name
    x = ids(bpe)
    assert np.array_equal(loaded.forward(x)[0], model.forward(x)[0])
    assert tok.encode(TEXT + EOT + "x") == bpe.encode(TEXT + EOT + "x")
    assert GPT.from_pretrained(path).config == model.config


def test_config_json_holds_gpt2_fields(saved, bpe):
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_layer"], config["n_head"], config["n_embd"]) == (2, 2, 16)
    assert (config["n_positions"], config["vocab_size"]) == (32, bpe.vocab_size)
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    assert config["eos_token_id"] == bpe.eot_id
    keys = safetensors.numpy.load_file(path / "model.safetensors").keys()
    assert "transformer.h.1.mlp.c_proj.weight" in keys and "lm_head.weight" not in keys


def test_untied_float64_round_trip(tmp_path):
    model = random_gpt(20, dtype=np.float64, tie_weights=False)
    model.save_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m", dtype=np.float64)
    assert not loaded.config.tie_weights and loaded.dtype == np.float64
    assert np.array_equal(loaded.params["lm_head.weight"], model.params["lm_head.weight"])
    x = np.array([[1, 2, 3]])
    assert np.array_equal(loaded.forward(x)[0], model.forward(x)[0])
    assert load_gpt2(tmp_path / "m")[1] is None  # no tokenizer files


def test_key_variants_load_the_same(saved, tmp_path):
    """No 'transformer.' prefix, the old mask buffers, and a tied lm_head stored explicitly."""
    model, path = saved
    d = copy_dir(path, tmp_path / "variant")
    tensors = {name: a for name, a in model.params.items()}  # no prefix
    T = model.config.block_size
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, T, T), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = model.params["wte.weight"].copy()
    safetensors.numpy.save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    loaded, _ = load_gpt2(d)
    assert loaded.config.tie_weights and list(loaded.params) == list(model.params)
    x = np.array([[5, 6, 7]])
    assert np.array_equal(loaded.forward(x)[0], model.forward(x)[0])


def write_bfloat16(path, tensors):
    """A safetensors file of BF16 tensors, written by hand (NumPy has no bfloat16): the top 16
    bits of each float32, rounded to nearest even."""
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        data = rounded.astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}  # fmt: skip
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


def to_bfloat16_values(a):
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def test_float16_and_bfloat16_files_load_as_float32(saved, tmp_path):
    model, path = saved
    d16 = copy_dir(path, tmp_path / "f16")
    half = {"transformer." + k: a.astype(np.float16) for k, a in model.params.items()}
    safetensors.numpy.save_file(half, d16 / "model.safetensors")
    loaded, _ = load_gpt2(d16)
    for name, a in model.params.items():
        assert loaded.params[name].dtype == np.float32
        assert np.array_equal(loaded.params[name], a.astype(np.float16).astype(np.float32))

    dbf = copy_dir(path, tmp_path / "bf16")
    write_bfloat16(
        dbf / "model.safetensors", {"transformer." + k: a for k, a in model.params.items()}
    )
    loaded, _ = load_gpt2(dbf, dtype=np.float64)
    for name, a in model.params.items():
        assert loaded.params[name].dtype == np.float64
        assert np.array_equal(loaded.params[name], to_bfloat16_values(a).astype(np.float64))
    assert rel_error(loaded.forward(ids_of_len(3))[0], model.forward(ids_of_len(3))[0]) < 0.05


def ids_of_len(T):
    return np.arange(T, dtype=np.int64)[None, :]


# ----------------------------------------------------------------------------------------------
# Every error names the file


def edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


@pytest.fixture
def broken(saved, tmp_path):
    """A fresh copy of the saved directory, to break."""
    return copy_dir(saved[1], tmp_path / "broken")


def test_error_pytorch_model_bin_only(broken):
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin") as err:
        load_gpt2(broken)
    msg = str(err.value)
    assert "never unpickles" in msg and "safe_serialization=True" in msg and str(broken) in msg


def test_error_missing_weights_and_directory(broken, tmp_path):
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_gpt2(broken)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_gpt2(tmp_path / "nowhere")
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gpt2(broken)


def test_error_wrong_model_type(broken):
    edit_config(broken, model_type="bert")
    with pytest.raises(ValueError, match=r"config\.json.*model_type is 'bert', expected 'gpt2'"):
        load_gpt2(broken)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_error_unsupported_activation(broken, activation):
    edit_config(broken, activation_function=activation)
    with pytest.raises(ValueError, match=rf"config\.json.*{activation}.*tanh approximation"):
        load_gpt2(broken)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"n_inner": 10}, "n_inner is 10"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_layer": None}, "'n_layer' is missing"),
        ({"n_head": 3}, "divisible by n_head"),
    ],
)
def test_error_config_variants(broken, changes, expected):
    edit_config(broken, **changes)
    with pytest.raises(ValueError, match=expected) as err:
        load_gpt2(broken)
    assert "config.json" in str(err.value)


def test_error_bad_json(broken):
    (broken / "config.json").write_text('{"model_type": "gpt2",')
    with pytest.raises(ValueError, match=r"config\.json.*not valid JSON"):
        load_gpt2(broken)


def rewrite_tensors(d, change):
    tensors = safetensors.numpy.load_file(d / "model.safetensors")
    change(tensors)
    safetensors.numpy.save_file(tensors, d / "model.safetensors")


def test_error_missing_tensor(broken):
    rewrite_tensors(broken, lambda t: t.pop("transformer.h.1.ln_2.bias"))
    with pytest.raises(
        ValueError, match=r"model\.safetensors.*'h\.1\.ln_2\.bias' of shape \(16,\) is missing"
    ):
        load_gpt2(broken)


def test_error_extra_tensor(broken):
    rewrite_tensors(broken, lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(16)}))
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors.*unexpected tensor 'h\.2\.ln_1\.weight' of shape \(16,\)",
    ):
        load_gpt2(broken)


def test_error_misshapen_tensor(broken):
    def transpose(t):
        t["transformer.h.0.mlp.c_fc.weight"] = np.ascontiguousarray(
            t["transformer.h.0.mlp.c_fc.weight"].T
        )

    rewrite_tensors(broken, transpose)
    with pytest.raises(
        ValueError,
        match=r"safetensors.*'h\.0\.mlp\.c_fc\.weight' has shape \(64, 16\), expected \(16, 64",
    ):
        load_gpt2(broken)


def test_error_lm_head_differs_from_tied_wte(broken):
    rewrite_tensors(broken, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*lm_head\.weight differs"):
        load_gpt2(broken)


def test_error_truncated_safetensors(broken):
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        load_gpt2(broken)
    (broken / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        load_gpt2(broken)


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json" + b" " * 7,
        b'{"a": {"dtype": "F32"}}',
        b'{"a": {"dtype": "F32", "shape": [9], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": "XX", "shape": [1], "data_offsets": [0, 4]}}',
        b'{"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 4]}}',
    ],
)
def test_error_corrupt_safetensors(broken, raw):
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(ValueError, match=r"model\.safetensors") as err:
        load_gpt2(broken)
    assert "corrupt" in str(err.value) or "cannot be read" in str(err.value)


def test_read_config_and_check_tensors_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_config(tmp_path, ("gpt2",))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=r"config\.json.*'llama', expected 'gpt2' or 'bert'"):
        read_config(tmp_path, ("gpt2", "bert"))
    with pytest.raises(ValueError, match=r"'f': tensor 'w' has shape \(2,\), expected \(3,\)"):
        check_tensors("f", {"w": np.zeros(2)}, {"w": (3,)})


# ----------------------------------------------------------------------------------------------
# Writing


def test_write_refuses_foreign_files_and_replaces_its_own(saved, bpe, tmp_path):
    model, _ = saved
    d = tmp_path / "out"
    model.save_pretrained(d, bpe)
    model.save_pretrained(d, bpe)  # a second save replaces the first
    (d / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt") as err:
        model.save_pretrained(d, bpe)
    assert str(d) in str(err.value)
    assert (d / "notes.txt").read_text() == "mine"
    assert not [p for p in d.iterdir() if ".tmp-" in p.name]  # nothing half written


def test_write_pretrained_extra_files(tmp_path):
    d = write_pretrained(tmp_path / "x", {"model_type": "gpt2"}, {"w": np.ones(2, np.float32)},
                         {"extra.txt": "hi", "blob.bin": b"\x00\x01"})  # fmt: skip
    assert (d / "extra.txt").read_text() == "hi" and (d / "blob.bin").read_bytes() == b"\0\1"
    assert read_weights(d)["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="plain file name"):
        write_pretrained(tmp_path / "y", {}, {}, {"../escape": "x"})


def test_write_pretrained_new_directory_appears_whole_or_not_at_all(monkeypatch, tmp_path):
    from tinylm.hf import common

    tensors = {"w": np.ones(2, np.float32)}
    d = write_pretrained(tmp_path / "a" / "new", {"model_type": "gpt2"}, tensors, new=True)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_pretrained(empty, {}, tensors, new=True)  # an empty directory is taken
    assert (empty / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="already exists and is not an empty directory"):
        write_pretrained(empty, {}, tensors, new=True)  # even tinylm's own files stay

    # Files appear in the target while the new directory is being written: the rename fails,
    # the user's file is untouched, and the half-built sibling is gone.
    late = tmp_path / "late"
    write_files = common._write_files

    def racing(directory, *args):
        late.mkdir()
        (late / "theirs.txt").write_text("theirs")
        write_files(directory, *args)

    monkeypatch.setattr(common, "_write_files", racing)
    with pytest.raises(ValueError, match="could not be created.*nothing was written there"):
        write_pretrained(late, {}, tensors, new=True)
    assert [p.name for p in late.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty", "late"]


def test_save_refuses_what_gpt2_cannot_hold(tmp_path, bpe):
    with pytest.raises(ValueError, match="sinusoidal"):
        random_gpt(20, positions="sinusoidal").save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="biases"):
        random_gpt(20, bias=False).save_pretrained(tmp_path / "b")
    with pytest.raises(TypeError, match="CharTokenizer"):
        random_gpt(20).save_pretrained(tmp_path / "c", CharTokenizer("abc"))
    with pytest.raises(ValueError, match="tokens but the model"):
        random_gpt(20).save_pretrained(tmp_path / "d", bpe)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_param_shapes_match_the_model():
    model = random_gpt(30, tie_weights=False)
    assert param_shapes(model.config) == {k: a.shape for k, a in model.params.items()}


# ----------------------------------------------------------------------------------------------
# Oracles: transformers' GPT-2 (skipped without torch and transformers)


@pytest.fixture(scope="module")
def hf_gpt2(bpe, tmp_path_factory):
    """A random transformers GPT2LMHeadModel with a vocabulary of bpe's size, saved offline."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=bpe.vocab_size, n_positions=64, n_layer=2, n_head=4, n_embd=32,
        bos_token_id=bpe.eot_id, eos_token_id=bpe.eot_id,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2 starts its LayerNorms and biases at 1 and 0: move them
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path)
    bpe.save_pretrained(path)
    return model, path


def test_oracle_logits_and_greedy_tokens(hf_gpt2, bpe):
    torch = pytest.importorskip("torch")
    hf, path = hf_gpt2
    model, tok = load_gpt2(path)
    x = ids(bpe)
    with torch.no_grad():
        expected = hf(torch.tensor(x)).logits.numpy()
    assert rel_error(model.forward(x)[0], expected) < 1e-5

    prompt = x[:, :8]
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False,
                             pad_token_id=bpe.eot_id, eos_token_id=None)  # fmt: skip
    ours = model.generate(prompt, 20, temperature=0)
    assert ours.tolist() == hf_out.numpy().tolist()


def test_oracle_float64_gradients_match_autograd(hf_gpt2, bpe):
    torch = pytest.importorskip("torch")
    hf, path = hf_gpt2
    hf64 = type(hf)(hf.config).double().eval()
    hf64.load_state_dict(hf.state_dict())
    model, _ = load_gpt2(path, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.integers(0, bpe.vocab_size, size=(2, 12))
    y = rng.integers(0, bpe.vocab_size, size=(2, 12))

    _, loss = model.forward(x, y)
    grads = model.backward()
    logits = hf64(torch.tensor(x)).logits
    torch_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, bpe.vocab_size), torch.tensor(y).reshape(-1)
    )
    torch_loss.backward()
    assert abs(loss - torch_loss.item()) < 1e-12
    torch_grads = {
        n.removeprefix("transformer."): p.grad.numpy() for n, p in hf64.named_parameters()
    }
    assert set(torch_grads) == set(grads)  # lm_head is tied: one parameter, one gradient
    errors = {name: rel_error(grads[name], torch_grads[name]) for name in grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-8, f"{worst}: {errors[worst]:.2e}"


def test_oracle_transformers_loads_tinylm_save(saved, bpe):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model, path = saved
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    x = ids(bpe)
    with torch.no_grad():
        expected = hf(torch.tensor(x)).logits.numpy()
    assert rel_error(model.forward(x)[0], expected) < 1e-5
    hf_tok = transformers.GPT2TokenizerFast.from_pretrained(path)
    assert hf_tok(TEXT + EOT + "x")["input_ids"] == bpe.encode(TEXT + EOT + "x")
    assert hf_tok.eos_token == EOT and hf_tok.eos_token_id == bpe.eot_id


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_oracle_half_precision_checkpoints_load(hf_gpt2, bpe, tmp_path, torch_dtype):
    torch = pytest.importorskip("torch")
    hf, _ = hf_gpt2
    half = type(hf)(hf.config).eval()
    half.load_state_dict(hf.state_dict())
    half = half.to(getattr(torch, torch_dtype))
    half.save_pretrained(tmp_path / torch_dtype)
    model, _ = load_gpt2(tmp_path / torch_dtype)
    for name, p in half.transformer.named_parameters():
        assert np.array_equal(model.params[name], p.detach().float().numpy()), name
    x = ids(bpe)
    with torch.no_grad():
        expected = half.float()(torch.tensor(x)).logits.numpy()  # the same rounded weights
    assert rel_error(model.forward(x)[0], expected) < 1e-5
