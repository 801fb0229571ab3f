"""Turning the model's logits for the next token into a choice of token.

Given logits z (V,) for the next position, each method reshapes the distribution
p = softmax(z / temperature) before drawing from it:

- temperature tau: p_i = exp(z_i / tau) / sum_j exp(z_j / tau). tau < 1 sharpens the
  distribution, tau > 1 flattens it, and tau -> 0 puts all mass on the argmax (greedy).
- top-k: keep the k largest logits (and any tied with the k-th), set the rest to -inf,
  renormalise.
- top-p (nucleus): sort by probability, keep the smallest prefix whose total reaches p
  (always at least the most likely token), renormalise.

These run on the host in NumPy: one row of V numbers per sequence is tiny next to the
model's forward.
"""

from __future__ import annotations

import math

import numpy as np


def _is_number(x):
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_sampling_args(temperature, top_k, top_p):
    """Raise TypeError/ValueError naming the argument when a sampling setting is wrong."""
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}"
        )
    if top_k is not None and (
        not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1
    ):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def sampling_distribution(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution each row of logits (B, V) is sampled from, as probabilities (B, V).

    temperature = 0 gives a one-hot on the argmax (ties go to the lowest id).
    """
    check_sampling_args(temperature, top_k, top_p)
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (B, V), got {z.shape}")
    B, V = z.shape
    if temperature == 0:
        probs = np.zeros_like(z)
        probs[np.arange(B), z.argmax(axis=-1)] = 1.0
        return probs
    # Shift by the max before dividing: the largest logit becomes 0 and the rest negative,
    # so even a tiny temperature gives -inf (probability 0), never inf - inf = NaN.
    z = (z - z.max(axis=-1, keepdims=True)) / temperature
    if top_k is not None and top_k < V:
        kth_largest = np.sort(z, axis=-1)[:, V - int(top_k)][:, None]  # (B, 1)
        z = np.where(z < kth_largest, -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")  # most likely first
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p  # probability of the better tokens
        keep_sorted = mass_before < top_p  # the first token always has mass_before = 0
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, rng=None):
    """Draw one token id per row of logits (B, V); returns an int64 array (B,)."""
    probs = sampling_distribution(logits, temperature, top_k, top_p)
    if temperature == 0:
        return probs.argmax(axis=-1).astype(np.int64)
    rng = np.random.default_rng() if rng is None else rng
    # Inverse-CDF sampling, one uniform number per row: the first id whose cumulative
    # probability exceeds u.
    u = rng.random(probs.shape[0])[:, None]  # (B, 1)
    cdf = np.cumsum(probs, axis=-1)
    ids = (cdf <= u * cdf[:, -1:]).sum(axis=-1)
    return np.minimum(ids, probs.shape[1] - 1).astype(np.int64)
