"""Tests for generation: tinylm.sample (temperature, top-k, top-p, drawing) and GPT.generate
with and without the KV cache."""

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.gradcheck import randomize_params
from tinylm.model import GPT, GPTConfig
from tinylm.sample import check_sampling_args, sample_next, sampling_distribution

V, BLOCK = 11, 6


def random_model(positions="learned", seed=0, **overrides):
    """A tiny float64 GPT with large random weights, so its argmax moves from step to step."""
    fields = dict(
        vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=8, positions=positions
    )
    fields.update(overrides)
    model = GPT(GPTConfig(**fields), seed=seed, dtype=np.float64)
    randomize_params(model, np.random.default_rng(seed + 1), scale=0.8)
    return model


def greedy_reference(model, idx, n):
    """Greedy decoding with the plain forward over the last block_size tokens, no cache."""
    out = idx.copy()
    for _ in range(n):
        logits, _ = model.forward(out[:, -model.config.block_size :])
        out = np.concatenate([out, logits[:, -1].argmax(axis=-1)[:, None]], axis=1)
    return out


# ----------------------------------------------------------------------------------------------
# sampling_distribution


def test_temperature_zero_is_one_hot_on_the_argmax():
    logits = np.array([[0.1, 2.0, -1.0, 1.9], [5.0, 5.0, 1.0, 0.0]])
    probs = sampling_distribution(logits, temperature=0)
    np.testing.assert_array_equal(
        probs, [[0, 1, 0, 0], [1, 0, 0, 0]]
    )  # a tie goes to the lowest id


def test_temperature_one_is_the_softmax():
    logits = np.array([[1.0, 2.0, 3.0]])
    e = [math.exp(1.0), math.exp(2.0), math.exp(3.0)]
    np.testing.assert_allclose(sampling_distribution(logits), [[x / sum(e) for x in e]], rtol=1e-14)
    e = [math.exp(0.5), math.exp(1.0), math.exp(1.5)]  # temperature 2 halves the logits
    np.testing.assert_allclose(
        sampling_distribution(logits, temperature=2.0), [[x / sum(e) for x in e]], rtol=1e-14
    )


def test_top_k_keeps_exactly_k():
    logits = np.array([[1.0, 3.0, 2.0, 0.5, 2.5]])
    probs = sampling_distribution(logits, top_k=2)
    z = math.exp(3.0) + math.exp(2.5)
    np.testing.assert_allclose(probs, [[0, math.exp(3.0) / z, 0, 0, math.exp(2.5) / z]], rtol=1e-14)
    assert np.count_nonzero(sampling_distribution(logits, top_k=1)) == 1
    np.testing.assert_allclose(
        sampling_distribution(logits, top_k=5), sampling_distribution(logits)
    )
    np.testing.assert_allclose(
        sampling_distribution(logits, top_k=50), sampling_distribution(logits)
    )


def test_top_p_hand_example():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)[None, :]
    np.testing.assert_allclose(
        sampling_distribution(logits, top_p=0.7), [[0.625, 0.375, 0, 0]], rtol=1e-12
    )
    # p below the top token keeps only it; p = 1 keeps everything
    np.testing.assert_allclose(sampling_distribution(logits, top_p=0.3), [[1, 0, 0, 0]])
    np.testing.assert_allclose(sampling_distribution(logits, top_p=1.0), [probs], rtol=1e-12)
    # uniform logits give exact probabilities 1/4: p = 0.5 is reached by exactly two tokens
    # (ties keep the lowest ids), p = 0.75 by three, and a hair above 0.5 needs the third
    uniform = np.zeros((1, 4))
    np.testing.assert_array_equal(sampling_distribution(uniform, top_p=0.5), [[0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(sampling_distribution(uniform, top_p=0.75), [[1 / 3] * 3 + [0]])
    np.testing.assert_allclose(sampling_distribution(uniform, top_p=0.51), [[1 / 3] * 3 + [0]])
    # the order of the vocabulary does not matter
    shuffled = np.log(np.array([0.15, 0.05, 0.5, 0.3]))[None, :]
    np.testing.assert_allclose(
        sampling_distribution(shuffled, top_p=0.7), [[0, 0, 0.625, 0.375]], rtol=1e-12
    )


def test_top_k_then_top_p():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    # top_k = 3 renormalises to [4/9, 3/9, 2/9, 0]; top_p = 0.5 then keeps 4/9 and 3/9
    out = sampling_distribution(np.log(probs)[None, :], top_k=3, top_p=0.5)
    np.testing.assert_allclose(out, [[4 / 7, 3 / 7, 0, 0]], rtol=1e-12)


def test_high_temperature_flattens():
    logits = np.array([[3.0, 1.0, 0.0, -2.0, 0.5]])

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    entropies = [
        entropy(sampling_distribution(logits, temperature=t)[0]) for t in (0.25, 0.5, 1, 2, 10)
    ]
    assert entropies == sorted(entropies)
    np.testing.assert_allclose(
        sampling_distribution(logits, temperature=1e6), [[0.2] * 5], atol=1e-5
    )
    sharp = sampling_distribution(logits, temperature=1e-3)
    np.testing.assert_allclose(sharp, [[1, 0, 0, 0, 0]], atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([0.01, 1.0, 10.0, 100.0]),
    temperature=st.floats(0.05, 20.0),
    top_k=st.none() | st.integers(1, 15),
    top_p=st.none() | st.floats(0.01, 1.0),
)
def test_sampling_distribution_properties(B, n, seed, scale, temperature, top_k, top_p):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B, n)) * scale
    probs = sampling_distribution(logits, temperature, top_k, top_p)
    assert probs.shape == (B, n)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-12)
    kept = probs > 0
    assert np.all(kept[np.arange(B), logits.argmax(axis=-1)])  # the most likely token survives
    if top_k is not None:
        assert np.all(kept.sum(axis=-1) <= top_k)
    # every kept token is at least as likely as every dropped one
    for b in range(B):
        if (~kept[b]).any():
            assert logits[b][kept[b]].min() >= logits[b][~kept[b]].max()
    if top_p is not None and top_k is None:
        # the kept set is the smallest prefix (by probability) whose mass reaches p
        full = sampling_distribution(logits, temperature)
        for b in range(B):
            mass = full[b][kept[b]].sum()
            assert mass >= top_p - 1e-9
            assert mass - full[b][kept[b]].min() < top_p + 1e-9


@settings(max_examples=30, deadline=None)
@given(perm_seed=st.integers(0, 2**32 - 1), n=st.integers(1, 10), k=st.integers(1, 12))
def test_top_k_with_distinct_logits_keeps_min_k_n(perm_seed, n, k):
    logits = np.random.default_rng(perm_seed).permutation(n).astype(np.float64)[None, :]
    probs = sampling_distribution(logits, top_k=k)
    kept = np.flatnonzero(probs[0])
    assert len(kept) == min(k, n)
    assert set(kept) == set(np.argsort(-logits[0])[: min(k, n)])


# ----------------------------------------------------------------------------------------------
# sample_next


def test_sample_next_frequencies_match_the_distribution():
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0])
    n = 20000
    for kwargs in (dict(temperature=0.8), dict(temperature=1.0, top_k=3), dict(top_p=0.8)):
        expected = sampling_distribution(logits[None, :], **kwargs)[0]
        ids = sample_next(np.tile(logits, (n, 1)), rng=np.random.default_rng(0), **kwargs)
        assert ids.shape == (n,) and ids.dtype == np.int64
        counts = np.bincount(ids, minlength=5)
        assert np.all(counts[expected == 0] == 0), kwargs  # filtered tokens are never drawn
        nz = expected > 0
        chi2 = float((((counts - n * expected) ** 2)[nz] / (n * expected[nz])).sum())
        # chi-square with at most 4 degrees of freedom: P(chi2 > 25) < 1e-4
        assert chi2 < 25, (kwargs, counts, n * expected)


def test_sample_next_greedy_and_seeded():
    logits = np.array([[0.0, 3.0, 1.0], [2.0, -1.0, 0.0]])
    np.testing.assert_array_equal(sample_next(logits, temperature=0), [1, 0])
    a = sample_next(np.tile(logits, (50, 1)), rng=np.random.default_rng(5))
    b = sample_next(np.tile(logits, (50, 1)), rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert np.all((a >= 0) & (a < 3))
    # a one-hot distribution (top_k = 1) always gives the argmax
    np.testing.assert_array_equal(
        sample_next(logits, top_k=1, rng=np.random.default_rng(1)), [1, 0]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
        (
            dict(temperature=float("nan")),
            "temperature must be a finite number >= 0 (0 = greedy), got nan",
        ),
        (
            dict(temperature=float("inf")),
            "temperature must be a finite number >= 0 (0 = greedy), got inf",
        ),
        (dict(top_k=0), "top_k must be a positive integer or None, got 0"),
        (dict(top_k=2.5), "top_k must be a positive integer or None, got 2.5"),
        (dict(top_k=-3), "top_k must be a positive integer or None, got -3"),
        (dict(top_p=0.0), "top_p must be a number in (0, 1] or None, got 0.0"),
        (dict(top_p=1.5), "top_p must be a number in (0, 1] or None, got 1.5"),
        (dict(top_p=-0.2), "top_p must be a number in (0, 1] or None, got -0.2"),
        (dict(temperature=None), "temperature must be a finite number >= 0 (0 = greedy), got None"),
        (dict(top_k=True), "top_k must be a positive integer or None, got True"),
        (dict(top_k="a"), "top_k must be a positive integer or None, got 'a'"),
        (dict(top_p="0.5"), "top_p must be a number in (0, 1] or None, got '0.5'"),
    ],
)
def test_bad_sampling_arguments_raise(kwargs, message):
    args = dict(temperature=1.0, top_k=None, top_p=None) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        check_sampling_args(**args)
    with pytest.raises(ValueError, match=re.escape(message)):
        sampling_distribution(np.zeros((1, 4)), **args)
    with pytest.raises(ValueError, match=re.escape(message)):
        sample_next(np.zeros((1, 4)), rng=np.random.default_rng(0), **args)
    with pytest.raises(ValueError, match=re.escape(message)):
        random_model().generate(np.zeros((1, 2), dtype=np.int64), 3, seed=0, **args)


def test_logits_must_be_two_dimensional():
    with pytest.raises(ValueError, match=re.escape("logits must have shape (B, V), got (4,)")):
        sampling_distribution(np.zeros(4))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_tiny_positive_temperature_still_gives_the_argmax():
    logits = np.array([[1.0, 2.0, 0.5]])
    np.testing.assert_allclose(sampling_distribution(logits, temperature=1e-310), [[0, 1, 0]])


# ----------------------------------------------------------------------------------------------
# GPT.generate and the KV cache


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_cached_logits_equal_the_full_forward(positions):
    model = random_model(positions, seed=2).eval()
    B, T = 2, BLOCK
    idx = np.random.default_rng(3).integers(0, V, size=(B, T))
    full, _ = model.forward(idx)
    kv = [{} for _ in range(model.config.n_layer)]
    first = model._forward_inference(idx[:, :2], kv, 0)  # a two-token prompt, then one at a time
    np.testing.assert_allclose(first, full[:, :2], rtol=1e-12, atol=1e-12)
    for t in range(2, T):
        step = model._forward_inference(idx[:, t : t + 1], kv, t)
        assert step.shape == (B, 1, V)
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-12, atol=1e-12)
        for layer in kv:
            assert layer["k"].shape == layer["v"].shape == (B, 2, t + 1, 4)  # (B, H, seen, D)


def test_kv_cache_fills_one_buffer_in_place_and_refuses_more_than_block_size():
    model = random_model("learned", seed=2).eval()
    idx = np.random.default_rng(4).integers(0, V, size=(1, BLOCK))
    kv = [{} for _ in range(model.config.n_layer)]
    model._forward_inference(idx[:, :3], kv, 0)
    buffers = [layer["k_buffer"] for layer in kv]
    for t in range(3, BLOCK):
        model._forward_inference(idx[:, t : t + 1], kv, t)
    for layer, buffer in zip(kv, buffers, strict=True):
        assert layer["k_buffer"] is buffer  # the same buffer all along: nothing was regrown
        assert buffer.shape == (1, 2, BLOCK, 4)  # (B, H, block_size, D)
        assert np.shares_memory(layer["k"], buffer) and layer["k"].shape == (1, 2, BLOCK, 4)
    with pytest.raises(ValueError, match=f"at most block_size={BLOCK}.*{BLOCK} are cached and 1"):
        model._forward_inference(idx[:, :1], kv, BLOCK - 1)  # a valid position, a full cache


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
@pytest.mark.parametrize("prompt_len, n_new", [(2, 3), (3, 9), (BLOCK, 4), (BLOCK + 2, 3)])
def test_greedy_with_and_without_cache_match_the_plain_forward(positions, prompt_len, n_new):
    # (3, 9) and the longer prompts outgrow block_size, so the window slides
    model = random_model(positions, seed=4)
    idx = np.random.default_rng(prompt_len).integers(0, V, size=(2, prompt_len))
    cached = model.generate(idx, n_new, temperature=0, use_cache=True)
    uncached = model.generate(idx, n_new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + n_new) and cached.dtype == np.int64
    np.testing.assert_array_equal(cached[:, :prompt_len], idx)
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached, greedy_reference(model, idx, n_new))


def test_greedy_output_is_not_trivially_constant():
    # guards the tests above: with these weights the argmax changes along the sequence
    model = random_model("learned", seed=4)
    out = model.generate(np.zeros((2, 1), dtype=np.int64), 12, temperature=0)
    assert len(set(out[:, 1:].ravel().tolist())) >= 3


def test_sampled_generation_with_cache_equals_without():
    # same seed, same distributions at each step -> same draws, cache or not
    model = random_model("sinusoidal", seed=5)
    idx = np.random.default_rng(6).integers(0, V, size=(3, 2))
    a = model.generate(idx, 8, temperature=0.9, top_k=5, seed=11, use_cache=True)
    b = model.generate(idx, 8, temperature=0.9, top_k=5, seed=11, use_cache=False)
    np.testing.assert_array_equal(a, b)


def test_generate_is_deterministic_per_seed():
    model = random_model("learned", seed=7)
    idx = np.random.default_rng(8).integers(0, V, size=(2, 3))
    a = model.generate(idx, 10, temperature=1.0, seed=123)
    b = model.generate(idx, 10, temperature=1.0, seed=123)
    np.testing.assert_array_equal(a, b)
    others = [model.generate(idx, 10, temperature=1.0, seed=s) for s in range(124, 128)]
    assert any(not np.array_equal(a, o) for o in others)
    assert np.all((a >= 0) & (a < V))
    # an explicit rng gives the same stream as the seed
    np.testing.assert_array_equal(
        a, model.generate(idx, 10, temperature=1.0, rng=np.random.default_rng(123))
    )


def test_generate_restores_training_mode_and_ignores_dropout():
    model = random_model("learned", seed=9, dropout=0.5)
    assert model.training
    idx = np.zeros((1, 2), dtype=np.int64)
    a = model.generate(idx, 6, temperature=0)
    b = model.generate(idx, 6, temperature=0)
    np.testing.assert_array_equal(a, b)  # dropout is off while generating
    assert model.training
    model.eval()
    np.testing.assert_array_equal(model.generate(idx, 6, temperature=0), a)
    assert not model.training


def test_generate_zero_tokens_and_stop_id():
    model = random_model("learned", seed=10)
    idx = np.array([[1, 2, 3]], dtype=np.int32)
    out = model.generate(idx, 0)
    np.testing.assert_array_equal(out, idx)
    assert out.dtype == np.int64
    first = int(model.generate(idx, 1, temperature=0)[0, -1])
    stopped = model.generate(idx, 5, temperature=0, stop_id=first)
    np.testing.assert_array_equal(stopped, [[1, 2, 3, first]])


def test_generate_rejects_bad_input():
    model = random_model()
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        model.generate(np.zeros((1, 2), dtype=np.int64), -1)
    with pytest.raises(TypeError, match="idx must be an integer array of token ids, got float64"):
        model.generate(np.zeros((1, 2)), 2)
    with pytest.raises(
        ValueError, match=re.escape(f"idx: token ids must be in [0, {V})") + f".*got {V}"
    ):
        model.generate(np.array([[0, V]]), 2)
    with pytest.raises(
        ValueError, match="idx must hold at least one token per sequence, got T = 0"
    ):
        model.generate(np.zeros((1, 0), dtype=np.int64), 2)


def test_generate_rejects_a_one_dimensional_prompt():
    with pytest.raises(ValueError, match=re.escape("idx must have shape (B, T)")):
        random_model().generate(np.array([1, 2, 3]), 2)


def test_stop_id_waits_for_every_sequence():
    model = random_model("learned", seed=10)
    idx = np.array([[3, 9, 2], [2, 7, 6]], dtype=np.int64)
    free = model.generate(idx, 8, temperature=0)
    stop = int(free[0, 3])  # row 0 produces it at once; row 1 only at its second token
    assert free[1, 3] != stop and free[1, 4] == stop and free[0, 4] != stop  # the case we test
    stopped = model.generate(idx, 8, temperature=0, stop_id=stop)
    np.testing.assert_array_equal(stopped, free[:, :5])
