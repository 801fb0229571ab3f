"""Tests for tinylm.hf.bert: Hugging Face BERT directories <-> tinylm.Bert.

The oracles (skipped without torch and transformers): small random BertForPreTraining,
BertForSequenceClassification, BertForMaskedLM and BertModel directories saved by
transformers load into tinylm with the same logits (float32, 1e-5) and every parameter
gradient of the same loss within 1e-8 of torch's autograd (float64); what tinylm saves loads
in transformers with the same outputs. Then every bad directory gets a one-line error naming
the file, as GPT-2's loader does.
"""

import json
import shutil

import numpy as np
import pytest

from tinylm.bert import Bert, BertConfig
from tinylm.gradcheck import randomize_params, rel_error
from tinylm.hf.bert import architecture, load_bert, save_bert
from tinylm.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=24, max_position_embeddings=16)


def hf_model(cls, seed=0, randomize=True, **extra):
    """A small transformers BERT of class cls; randomize gives every parameter values of
    order 0.3 (gains around 1), so no gradient is trivially small."""
    torch.manual_seed(seed)
    model = cls(transformers.BertConfig(**SMALL, **extra)).eval()
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                gain = name.endswith("LayerNorm.weight")
                p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if gain else 0.0))
    return model


def batch():
    """Two sequences, the second right-padded; token types; MLM labels on a few positions."""
    idx = np.array([[2, 11, 12, 13, 3, 21, 22, 3], [2, 14, 15, 3, 23, 3, 0, 0]])
    types = np.array([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]])
    mask = (np.arange(8)[None, :] < np.array([[8], [6]])).astype(np.int64)
    mlm = np.full((2, 8), -100)
    mlm[0, [1, 5]] = [17, 30]
    mlm[1, [2, 4]] = [5, 9]
    nsp = np.array([0, 1])
    return idx, types, mask, mlm, nsp


def as_torch(*arrays):
    return [torch.tensor(a) for a in arrays]


@pytest.fixture(scope="module")
def pretraining_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "pretraining"
    hf_model(transformers.BertForPreTraining).save_pretrained(d)
    return d


# ----------------------------------------------------------------------------------------------
# Loading what transformers saved


def test_pretraining_logits_match_in_float32(tmp_path):
    hf = hf_model(transformers.BertForPreTraining, randomize=False)  # Hugging Face's own init
    hf.save_pretrained(tmp_path)
    model = Bert.from_pretrained(tmp_path).eval()
    assert architecture(model.config) == "BertForPreTraining"
    assert model.dtype == np.float32
    idx, types, mask, _, _ = batch()
    mlm_logits, nsp_logits, _ = model.forward(idx, types, mask)
    with torch.no_grad():
        out = hf(*as_torch(idx), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types))
    assert np.abs(mlm_logits - out.prediction_logits.numpy()).max() < 1e-5
    assert np.abs(nsp_logits - out.seq_relationship_logits.numpy()).max() < 1e-5


def test_randomized_pretraining_logits_match_in_float32(pretraining_dir):
    hf = transformers.BertForPreTraining.from_pretrained(pretraining_dir).eval()
    model = Bert.from_pretrained(pretraining_dir).eval()
    idx, types, mask, _, _ = batch()
    mlm_logits, nsp_logits, _ = model.forward(idx, types, mask)
    with torch.no_grad():
        out = hf(torch.tensor(idx), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types))
    assert rel_error(mlm_logits, out.prediction_logits.numpy()) < 1e-5
    assert rel_error(nsp_logits, out.seq_relationship_logits.numpy()) < 1e-5


def torch_grads(hf, loss):
    loss.backward()
    return {name: p.grad.numpy() for name, p in hf.named_parameters(remove_duplicate=False)}


def compare_grads(model, grads, theirs):
    """Every tinylm gradient against torch's, relative 1e-8; the key biases, whose exact
    gradient is 0, against the largest gradient of the model."""
    big = max(np.abs(g).max() for g in grads.values())
    for name in model.params:
        assert grads[name].shape == theirs[name].shape, name
        if name.endswith("attention.self.key.bias"):
            assert np.abs(grads[name] - theirs[name]).max() < 1e-12 * big, name
        else:
            assert rel_error(grads[name], theirs[name]) < 1e-8, name


def test_pretraining_gradients_match_torch_autograd_in_float64(pretraining_dir):
    hf = transformers.BertForPreTraining.from_pretrained(pretraining_dir).double().eval()
    model = Bert.from_pretrained(pretraining_dir, dtype=np.float64).eval()
    idx, types, mask, mlm, nsp = batch()
    _, _, loss = model.forward(idx, types, mask, mlm, nsp)
    grads = model.backward()
    out = hf(torch.tensor(idx), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(types), labels=torch.tensor(mlm),
             next_sentence_label=torch.tensor(nsp))
    assert abs(float(loss) - out.loss.item()) < 1e-12
    compare_grads(model, grads, torch_grads(hf, out.loss))


def test_sequence_classification_logits_and_gradients(tmp_path):
    hf_model(transformers.BertForSequenceClassification, num_labels=3).save_pretrained(tmp_path)
    model = Bert.from_pretrained(tmp_path).eval()
    assert model.config.num_labels == 3 and not model.config.mlm_head
    assert architecture(model.config) == "BertForSequenceClassification"
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    idx, types, mask, _, _ = batch()
    labels = np.array([2, 0])
    logits, _ = model.classify(idx, types, mask)
    with torch.no_grad():
        out = hf(torch.tensor(idx), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types))
    assert rel_error(logits, out.logits.numpy()) < 1e-5

    model64 = Bert.from_pretrained(tmp_path, dtype=np.float64).eval()
    hf = hf.double()
    _, loss = model64.classify(idx, types, mask, labels)
    grads = model64.backward()
    out = hf(torch.tensor(idx), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(types), labels=torch.tensor(labels))
    assert abs(float(loss) - out.loss.item()) < 1e-12
    compare_grads(model64, grads, torch_grads(hf, out.loss))


def test_masked_lm_and_base_model_directories(tmp_path):
    hf_model(transformers.BertForMaskedLM).save_pretrained(tmp_path / "mlm")
    model = Bert.from_pretrained(tmp_path / "mlm").eval()
    assert not model.config.pooler and not model.config.nsp_head and model.config.mlm_head
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    idx, types, mask, _, _ = batch()
    mlm_logits, nsp_logits, _ = model.forward(idx, types, mask)
    assert nsp_logits is None
    with torch.no_grad():
        out = hf(torch.tensor(idx), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types))
    assert rel_error(mlm_logits, out.logits.numpy()) < 1e-5

    base = hf_model(transformers.BertModel)
    base.save_pretrained(tmp_path / "base")  # keys without the "bert." prefix
    model = Bert.from_pretrained(tmp_path / "base").eval()
    assert architecture(model.config) == "BertModel"
    with torch.no_grad():
        out = base(torch.tensor(idx), attention_mask=torch.tensor(mask),
                   token_type_ids=torch.tensor(types))
    real = mask.astype(bool)
    hidden = model.features(idx, types, mask)
    assert rel_error(hidden[real], out.last_hidden_state.numpy()[real]) < 1e-5
    assert rel_error(model.pooled(idx, types, mask), out.pooler_output.numpy()) < 1e-5


# ----------------------------------------------------------------------------------------------
# What tinylm saves, transformers loads


@pytest.mark.parametrize(
    "heads, cls",
    [
        (dict(), transformers.BertForPreTraining),
        (dict(pooler=False, nsp_head=False), transformers.BertForMaskedLM),
        (dict(mlm_head=False, nsp_head=False, num_labels=4),
         transformers.BertForSequenceClassification),
    ],
)
def test_saved_directory_loads_in_transformers_with_the_same_outputs(tmp_path, heads, cls):
    config = BertConfig(**SMALL, **heads)
    model = Bert(config, seed=1)
    randomize_params(model, np.random.default_rng(1))
    model.eval()
    tok = WordPieceTokenizer(list(SPECIAL_TOKENS) + [f"w{i}" for i in range(35)])
    save_bert(model, tmp_path / "out", tok)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [
        cls.__name__
    ]
    hf = cls.from_pretrained(tmp_path / "out").eval()
    idx, types, mask, _, _ = batch()
    with torch.no_grad():
        out = hf(torch.tensor(idx), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types))
    if config.num_labels:
        assert rel_error(model.classify(idx, types, mask)[0], out.logits.numpy()) < 1e-5
    else:
        mlm_logits, nsp_logits, _ = model.forward(idx, types, mask)
        theirs = out.prediction_logits if config.nsp_head else out.logits
        assert rel_error(mlm_logits, theirs.numpy()) < 1e-5
        if config.nsp_head:
            assert rel_error(nsp_logits, out.seq_relationship_logits.numpy()) < 1e-5
    hf_tok = transformers.BertTokenizerFast.from_pretrained(tmp_path / "out")
    assert hf_tok("w3 w7")["input_ids"] == tok.encode("w3 w7")["input_ids"]
    again, again_tok = load_bert(tmp_path / "out")
    assert again_tok.vocab == tok.vocab
    assert all(np.array_equal(again.params[k], model.params[k]) for k in model.params)
    save_bert(model, tmp_path / "out", tok)  # a second save replaces its own files


# ----------------------------------------------------------------------------------------------
# Every error names the file


@pytest.fixture
def broken(pretraining_dir, tmp_path):
    return shutil.copytree(pretraining_dir, tmp_path / "broken")


def edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def rewrite_weights(d, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def one_line(err):
    assert "\n" not in str(err.value)


def test_error_missing_directory_and_pickle_only(broken, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist") as err:
        load_bert(tmp_path / "nowhere")
    one_line(err)
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*never unpickles") as err:
        load_bert(broken)
    one_line(err)


def test_error_wrong_model_type_and_variants(broken):
    edit_config(broken, model_type="gpt2")
    with pytest.raises(ValueError, match=r"config\.json.*model_type is 'gpt2', expected 'bert'"):
        load_bert(broken)
    edit_config(broken, model_type="bert", position_embedding_type="relative_key")
    with pytest.raises(ValueError, match=r"config\.json.*position_embedding_type"):
        load_bert(broken)
    edit_config(broken, position_embedding_type="absolute", hidden_act="silu")
    with pytest.raises(ValueError, match=r"config\.json.*hidden_act must be one of") as err:
        load_bert(broken)
    one_line(err)
    config = json.loads((broken / "config.json").read_text())
    del config["hidden_size"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*field 'hidden_size' is missing"):
        load_bert(broken)


def test_error_missing_extra_and_misshapen_tensors(broken):
    rewrite_weights(broken, lambda t: t.pop("bert.encoder.layer.1.output.dense.bias"))
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors.*'bert\.encoder\.layer\.1\.output\.dense\.bias' of shape "
              r"\(16,\) is missing",
    ) as err:
        load_bert(broken)
    one_line(err)

    def extra(t):
        t["bert.encoder.layer.1.output.dense.bias"] = np.zeros(16, np.float32)
        t["bert.encoder.layer.2.output.dense.bias"] = np.zeros(16, np.float32)

    rewrite_weights(broken, extra)
    with pytest.raises(ValueError, match=r"unexpected tensor 'bert\.encoder\.layer\.2"):
        load_bert(broken)

    def misshapen(t):
        del t["bert.encoder.layer.2.output.dense.bias"]
        t["bert.pooler.dense.weight"] = np.zeros((16, 8), np.float32)

    rewrite_weights(broken, misshapen)
    with pytest.raises(ValueError, match=r"'bert\.pooler\.dense\.weight' has shape \(16, 8\), "
                                         r"expected \(16, 16\)"):
        load_bert(broken)


def test_error_untied_decoder(broken):
    def untie(t):
        t["cls.predictions.decoder.weight"] = np.ones((40, 16), np.float32)

    rewrite_weights(broken, untie)
    with pytest.raises(ValueError, match=r"model\.safetensors.*decoder\.weight differs"):
        load_bert(broken)


def test_tied_copies_and_old_names_are_accepted(broken):
    def legacy(t):
        t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"].copy()
        t["cls.predictions.decoder.bias"] = t["cls.predictions.bias"].copy()
        t["bert.embeddings.position_ids"] = np.arange(16)[None, :]
        t["bert.embeddings.LayerNorm.gamma"] = t.pop("bert.embeddings.LayerNorm.weight")
        t["bert.embeddings.LayerNorm.beta"] = t.pop("bert.embeddings.LayerNorm.bias")

    reference = Bert.from_pretrained(broken)
    rewrite_weights(broken, legacy)
    model = Bert.from_pretrained(broken)
    assert all(np.array_equal(model.params[k], reference.params[k]) for k in model.params)
