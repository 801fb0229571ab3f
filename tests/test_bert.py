"""Tests for tinylm.bert and its new layers: erf against math.erf, the exact GELU and tanh
gradient checks, Hugging Face's parameter table, every parameter gradient of a tiny BERT
(pretraining and classification losses, with padding and dropout), padding invariance on
either side, float32 against float64, dropout modes, and bad input."""

import math
import re

import numpy as np
import pytest

from tinylm import gradcheck, layers
from tinylm.bert import Bert, BertConfig, param_shapes
from tinylm.gradcheck import check_layer, format_table, randomize_params, rel_error

V, C, NH, I, P = 13, 8, 2, 12, 10


def tiny_config(**overrides):
    fields = dict(
        vocab_size=V, hidden_size=C, num_hidden_layers=2, num_attention_heads=NH,
        intermediate_size=I, max_position_embeddings=P, hidden_dropout_prob=0.0, num_labels=3,
    )
    fields.update(overrides)
    return BertConfig(**fields)


def random_model(seed=0, dtype=np.float64, **overrides):
    model = Bert(tiny_config(**overrides), seed=seed, dtype=dtype)
    randomize_params(model, np.random.default_rng(seed + 100))
    return model


# ----------------------------------------------------------------------------------------------
# erf, the exact GELU, tanh


def test_erf_float64_matches_math_erf_on_a_dense_grid():
    x = np.linspace(-9.0, 9.0, 180_001)
    reference = np.array([math.erf(v) for v in x])
    error = np.abs(layers.erf(x) - reference).max()
    assert error < 3e-15, error
    # both sides of the switch from the series to the continued fraction (|z| = 2.5)
    z = np.array([2.5 - 1e-12, 2.5, 2.5 + 1e-12, -2.5])
    assert np.abs(layers.erf(z) - [math.erf(v) for v in z]).max() < 3e-15


def test_erf_float32_is_within_float32_resolution():
    x = np.linspace(-9.0, 9.0, 180_001)
    reference = np.array([math.erf(v) for v in x])
    got = layers.erf(x.astype(np.float32))
    assert got.dtype == np.float32
    assert np.abs(got.astype(np.float64) - reference).max() < 7e-7


def test_erf_is_odd_and_exact_at_zero():
    x = np.linspace(0.0, 6.0, 1001)
    assert np.array_equal(layers.erf(-x), -layers.erf(x))
    assert layers.erf(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_gelu_erf_forward_is_x_times_the_normal_cdf():
    x = np.linspace(-8.0, 8.0, 2001)
    out, _ = layers.gelu_erf_forward(x)
    expected = np.array([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    assert np.abs(out - expected).max() < 1e-14
    out32, _ = layers.gelu_erf_forward(x.astype(np.float32))
    assert out32.dtype == np.float32
    assert np.abs(out32 - expected).max() < 5e-6


@pytest.mark.parametrize("scale", [1.0, 4.0])  # 4.0 reaches the continued fraction and the tails
def test_gelu_erf_and_tanh_gradients(scale):
    rng = np.random.default_rng(0)
    rows = check_layer(
        "gelu_erf", layers.gelu_erf_forward, layers.gelu_erf_backward,
        {"x": scale * rng.standard_normal((3, 5, 7))},
    )
    rows += check_layer(
        "tanh", layers.tanh_forward, layers.tanh_backward,
        {"x": scale * rng.standard_normal((3, 5, 7))},
    )
    assert all(r.ok for r in rows), format_table(rows)


def test_gelu_erf_differs_from_the_tanh_approximation():
    x = np.linspace(-4.0, 4.0, 801)
    gap = np.abs(layers.gelu_erf_forward(x)[0] - layers.gelu_forward(x)[0]).max()
    assert 1e-4 < gap < 1e-3  # the two GELUs are close but not the same function


def test_new_layers_reject_integer_input():
    for forward in (layers.erf, layers.gelu_erf_forward, layers.tanh_forward):
        with pytest.raises(TypeError, match="x must be a float32 or float64 array"):
            forward(np.arange(3))


# ----------------------------------------------------------------------------------------------
# The parameter table: Hugging Face's names and shapes


def test_param_table_is_hugging_face_bert_for_pretraining_plus_classifier():
    config = tiny_config(num_hidden_layers=1)
    expected = [
        ("bert.embeddings.word_embeddings.weight", (V, C)),
        ("bert.embeddings.position_embeddings.weight", (P, C)),
        ("bert.embeddings.token_type_embeddings.weight", (2, C)),
        ("bert.embeddings.LayerNorm.weight", (C,)),
        ("bert.embeddings.LayerNorm.bias", (C,)),
        ("bert.encoder.layer.0.attention.self.query.weight", (C, C)),
        ("bert.encoder.layer.0.attention.self.query.bias", (C,)),
        ("bert.encoder.layer.0.attention.self.key.weight", (C, C)),
        ("bert.encoder.layer.0.attention.self.key.bias", (C,)),
        ("bert.encoder.layer.0.attention.self.value.weight", (C, C)),
        ("bert.encoder.layer.0.attention.self.value.bias", (C,)),
        ("bert.encoder.layer.0.attention.output.dense.weight", (C, C)),
        ("bert.encoder.layer.0.attention.output.dense.bias", (C,)),
        ("bert.encoder.layer.0.attention.output.LayerNorm.weight", (C,)),
        ("bert.encoder.layer.0.attention.output.LayerNorm.bias", (C,)),
        ("bert.encoder.layer.0.intermediate.dense.weight", (I, C)),  # nn.Linear: (out, in)
        ("bert.encoder.layer.0.intermediate.dense.bias", (I,)),
        ("bert.encoder.layer.0.output.dense.weight", (C, I)),
        ("bert.encoder.layer.0.output.dense.bias", (C,)),
        ("bert.encoder.layer.0.output.LayerNorm.weight", (C,)),
        ("bert.encoder.layer.0.output.LayerNorm.bias", (C,)),
        ("bert.pooler.dense.weight", (C, C)),
        ("bert.pooler.dense.bias", (C,)),
        ("cls.predictions.bias", (V,)),
        ("cls.predictions.transform.dense.weight", (C, C)),
        ("cls.predictions.transform.dense.bias", (C,)),
        ("cls.predictions.transform.LayerNorm.weight", (C,)),
        ("cls.predictions.transform.LayerNorm.bias", (C,)),
        ("cls.seq_relationship.weight", (2, C)),
        ("cls.seq_relationship.bias", (2,)),
        ("classifier.weight", (3, C)),
        ("classifier.bias", (3,)),
    ]
    model = Bert(config)
    assert [(k, a.shape) for k, a in model.params.items()] == expected
    assert list(param_shapes(config).items()) == expected
    assert all(a.dtype == np.float32 for a in model.params.values())


def test_heads_follow_the_config():
    masked_lm = BertConfig(**{**tiny_config().to_dict(), "pooler": False, "nsp_head": False,
                              "num_labels": 0})
    names = list(param_shapes(masked_lm))
    assert not any(n.startswith(("bert.pooler", "cls.seq", "classifier")) for n in names)
    classifier = tiny_config(mlm_head=False, nsp_head=False)
    names = list(param_shapes(classifier))
    assert not any(n.startswith("cls.") for n in names) and "classifier.weight" in names


def test_initialisation_is_hugging_faces():
    model = Bert(tiny_config(vocab_size=500, hidden_size=64, intermediate_size=64,
                             num_attention_heads=2), seed=3, dtype=np.float64)
    word = model.params["bert.embeddings.word_embeddings.weight"]
    assert np.all(word[0] == 0.0)  # the padding token's row
    assert abs(word[1:].std() - 0.02) < 0.001
    assert np.all(model.params["bert.embeddings.LayerNorm.weight"] == 1.0)
    assert np.all(model.params["cls.predictions.bias"] == 0.0)


# ----------------------------------------------------------------------------------------------
# Gradients


def test_every_parameter_gradient_of_a_two_layer_bert_with_padding_and_dropout():
    rows = gradcheck.bert_checks(seed=0, num_hidden_layers=2)
    assert len(rows) == 2 * len(param_shapes(tiny_config()))
    assert all(r.ok for r in rows), format_table(rows)


def test_key_bias_gradient_is_exactly_zero():
    """softmax(q.(k_j + b)) = softmax(q.k_j + q.b): the shift q.b is the same for every key."""
    model = random_model()
    rng = np.random.default_rng(1)
    idx, types, mask, mlm, nsp = gradcheck.tiny_bert_batch(rng)
    model.forward(idx, types, mask, mlm, nsp)
    grads = model.backward()
    big = max(np.abs(g).max() for g in grads.values())
    for i in range(2):
        dkb = grads[f"bert.encoder.layer.{i}.attention.self.key.bias"]
        assert np.abs(dkb).max() < 1e-14 * big


def test_backward_gives_every_key_and_zeros_for_unused_heads():
    model = random_model()
    rng = np.random.default_rng(2)
    idx, types, mask, mlm, nsp = gradcheck.tiny_bert_batch(rng)
    model.forward(idx, types, mask, mlm_labels=mlm)  # MLM only: NSP head and pooler unused
    grads = model.backward()
    assert list(grads) == list(model.params)
    for name in ("cls.seq_relationship.weight", "bert.pooler.dense.weight", "classifier.bias"):
        assert np.all(grads[name] == 0.0)
    assert np.abs(grads["cls.predictions.bias"]).max() > 0


# ----------------------------------------------------------------------------------------------
# Padding: exact on either side


def _run(model, idx, types, mask, mlm, nsp):
    mlm_logits, nsp_logits, loss = model.forward(idx, types, mask, mlm, nsp)
    grads = model.backward()
    hidden = model.features(idx, types, mask)
    pooled = model.pooled(idx, types, mask)
    return mlm_logits, nsp_logits, float(loss), grads, hidden, pooled


@pytest.mark.parametrize("side", ["right", "left"])
def test_appending_padding_changes_no_output_and_no_gradient(side):
    model = random_model()
    rng = np.random.default_rng(5)
    n, pad = 6, 3
    idx = rng.integers(1, V, size=(1, n))
    types = np.array([[0, 0, 0, 1, 1, 1]])
    mlm = np.full((1, n), -100)
    mlm[0, [1, 4]] = rng.integers(0, V, size=2)
    nsp = np.array([1])
    base = _run(model, idx, types, None, mlm, nsp)

    def padded(a, value):
        fill = np.full((1, pad), value, dtype=a.dtype)
        return np.concatenate([a, fill] if side == "right" else [fill, a], axis=1)

    real = slice(0, n) if side == "right" else slice(pad, pad + n)
    mask = padded(np.ones((1, n), dtype=np.int64), 0)
    got = _run(model, padded(idx, 0), padded(types, 0), mask, padded(mlm, -100), nsp)
    assert np.allclose(got[0][:, real], base[0], rtol=0, atol=1e-12)  # MLM logits
    assert np.allclose(got[1], base[1], rtol=0, atol=1e-12)  # NSP logits
    assert abs(got[2] - base[2]) < 1e-12
    for name in model.params:
        assert np.allclose(got[3][name], base[3][name], rtol=0, atol=1e-12), name
    assert np.allclose(got[4][:, real], base[4], rtol=0, atol=1e-12)  # features
    assert np.allclose(got[5], base[5], rtol=0, atol=1e-12)  # pooled


def test_padding_mask_matters():
    """Without the mask the padded keys are attended to and the real outputs change."""
    model = random_model()
    idx = np.array([[5, 6, 7, 0, 0]])
    mask = np.array([[1, 1, 1, 0, 0]])
    with_mask = model.features(idx, attention_mask=mask)
    without = model.features(idx)
    assert np.abs(with_mask[:, :3] - without[:, :3]).max() > 1e-3


def test_a_sequence_in_a_batch_gives_what_it_gives_alone():
    model = random_model().eval()
    a = np.array([[2, 3, 4, 5, 6, 7]])
    b = np.array([[8, 9, 10, 0, 0, 0]])
    mask_b = np.array([[1, 1, 1, 0, 0, 0]])
    batch = model.features(np.concatenate([a, b]), attention_mask=np.concatenate(
        [np.ones_like(a), mask_b]))
    assert np.allclose(batch[0], model.features(a)[0], rtol=0, atol=1e-12)
    assert np.allclose(batch[1, :3], model.features(b[:, :3])[0], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# float32, dropout, shapes


def test_float32_agrees_with_float64():
    m64 = random_model(dtype=np.float64)
    m32 = Bert(tiny_config(), dtype=np.float32)
    m32.params = {k: a.astype(np.float32) for k, a in m64.params.items()}
    rng = np.random.default_rng(7)
    batch = gradcheck.tiny_bert_batch(rng)
    out64 = m64.forward(*batch)
    g64 = m64.backward()
    out32 = m32.forward(*batch)
    g32 = m32.backward()
    assert out32[0].dtype == np.float32 and out32[2].dtype == np.float32
    assert rel_error(out32[0], out64[0]) < 1e-5
    assert rel_error(out32[1], out64[1]) < 1e-5
    assert abs(float(out32[2]) - float(out64[2])) < 1e-5 * abs(float(out64[2]))
    big = max(np.abs(g).max() for g in g64.values())
    for name in m64.params:
        assert g32[name].dtype == np.float32
        if name.endswith("key.bias"):  # exactly 0 in exact arithmetic: float32 rounding only
            assert np.abs(g32[name]).max() < 1e-6 * big
        else:
            assert rel_error(g32[name], g64[name]) < 1e-4, name


def test_dropout_only_in_training_mode():
    model = random_model(hidden_dropout_prob=0.3)
    idx = np.array([[1, 2, 3, 4]])
    model.eval()
    assert np.array_equal(model.features(idx), model.features(idx))
    model.train()
    assert not np.array_equal(model.features(idx), model.features(idx))


def test_shapes_of_every_output():
    model = random_model()
    idx = np.array([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    mlm_logits, nsp_logits, loss = model.forward(idx, attention_mask=mask)
    assert mlm_logits.shape == (2, 4, V) and nsp_logits.shape == (2, 2) and loss is None
    assert model.features(idx, attention_mask=mask).shape == (2, 4, C)
    assert model.pooled(idx, attention_mask=mask).shape == (2, C)
    logits, loss = model.classify(idx, attention_mask=mask, labels=np.array([0, 2]))
    assert logits.shape == (2, 3) and loss.shape == ()


def test_loss_is_the_sum_of_the_two_cross_entropies():
    model = random_model()
    idx, types, mask, mlm, nsp = gradcheck.tiny_bert_batch(np.random.default_rng(3))
    mlm_logits, nsp_logits, loss = model.forward(idx, types, mask, mlm, nsp)

    def mean_ce(logits, labels):
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        keep = labels != -100
        z = logits[keep]
        logp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - z.max(1, keepdims=True)
        return -logp[np.arange(keep.sum()), labels[keep]].mean()

    assert abs(float(loss) - (mean_ce(mlm_logits, mlm) + mean_ce(nsp_logits, nsp))) < 1e-12


@pytest.mark.parametrize("call", ["forward", "classify"])
def test_a_forward_frees_the_last_ones_caches_before_making_new_ones(monkeypatch, call):
    """One step's activations are held at a time, not two (the memory of a step is reused)."""
    import weakref

    model = random_model()
    idx, types, mask, mlm, nsp = gradcheck.tiny_bert_batch(np.random.default_rng(3))
    model.forward(idx, types, mask, mlm, nsp)
    # arrays only the caches hold: the loss's probabilities, each encoder layer's attention
    last = [weakref.ref(model._caches["mlm_loss"][0])] + [
        weakref.ref(cache[3]) for key, cache in model._caches.items() if key.endswith("attention")
    ]
    assert len(last) == 1 + model.config.num_hidden_layers
    seen = []
    real = layers.layernorm_forward

    def watching(*args, **kwargs):
        seen.append(all(ref() is None for ref in last))
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "layernorm_forward", watching)
    if call == "forward":
        model.forward(idx, types, mask, mlm, nsp)
    else:
        model.classify(idx, types, mask, labels=np.zeros(len(idx), dtype=np.int64))
    assert seen and all(seen)  # already gone at the first layer norm (the embeddings')


def test_a_bad_input_keeps_the_last_caches():
    model = random_model()
    idx, types, mask, mlm, nsp = gradcheck.tiny_bert_batch(np.random.default_rng(3))
    model.forward(idx, types, mask, mlm, nsp)
    want = model.backward()
    with pytest.raises(ValueError, match="idx"):
        model.forward(idx[:, :0], types[:, :0], mask[:, :0], mlm[:, :0], nsp)
    got = model.backward()  # the last good step's gradients, still there
    assert all(np.array_equal(got[k], want[k]) for k in want)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="hidden_size must be divisible by num_attention_heads"):
        tiny_config(hidden_size=9)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        tiny_config(hidden_act="relu6")
    with pytest.raises(ValueError, match="num_labels must be 0"):
        tiny_config(num_labels=1)
    with pytest.raises(ValueError, match="need pooler=True"):
        tiny_config(pooler=False)


def test_bad_inputs_are_named():
    model = random_model()
    idx = np.array([[1, 2, 3]])
    with pytest.raises(TypeError, match="idx must be an integer array"):
        model.features(idx.astype(np.float32))
    with pytest.raises(ValueError, match="longer than max_position_embeddings=10"):
        model.features(np.ones((1, 11), dtype=np.int64))
    with pytest.raises(ValueError, match="token_type_ids must be in"):
        model.features(idx, token_type_ids=np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="attention_mask must have idx's shape"):
        model.features(idx, attention_mask=np.ones((1, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="sequence 0 has no real token"):
        model.features(idx, attention_mask=np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="nsp_labels must have shape"):
        model.forward(idx, nsp_labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="token ids must be in"):
        model.features(np.array([[1, V]]))


def test_backward_needs_a_loss_and_heads_need_their_parts():
    model = random_model()
    idx = np.array([[1, 2, 3]])
    model.forward(idx)
    with pytest.raises(RuntimeError, match="backward\\(\\) needs"):
        model.backward()
    no_classifier = Bert(tiny_config(num_labels=0))
    with pytest.raises(ValueError, match="classify\\(\\) needs a model with a classifier"):
        no_classifier.classify(idx)
    no_nsp = Bert(tiny_config(nsp_head=False))
    with pytest.raises(ValueError, match="no NSP head"):
        no_nsp.forward(idx, nsp_labels=np.array([0]))


# ----------------------------------------------------------------------------------------------
# Bert(config, params=...): given parameters instead of the random initialisation


def test_given_params_skip_the_initialisation_and_refuse_what_does_not_fit(monkeypatch):
    source = random_model(seed=7)  # float64
    monkeypatch.setattr(
        "tinylm.bert.init_params", lambda *a, **k: pytest.fail("init_params was called")
    )
    model = Bert(source.config, dtype=np.float32, params=source.params)
    assert list(model.params) == list(param_shapes(source.config))
    for name, a in model.params.items():
        assert a.dtype == np.float32 and a.flags.c_contiguous, name
        np.testing.assert_array_equal(a, source.params[name].astype(np.float32), err_msg=name)
    same = Bert(source.config, dtype=np.float64, params=source.params)
    assert all(same.params[k] is source.params[k] for k in source.params)  # taken, not copied
    wrong = dict(source.params)
    wrong.pop("cls.seq_relationship.weight")
    with pytest.raises(ValueError, match=r"missing cls\.seq_relationship\.weight, unexpected none"):
        Bert(source.config, params=wrong)
    name = next(iter(source.params))  # the word embeddings
    with pytest.raises(ValueError, match=rf"params\['{re.escape(name)}'\] has shape \(3, 2\)"):
        Bert(source.config, params=source.params | {name: np.zeros((3, 2))})
