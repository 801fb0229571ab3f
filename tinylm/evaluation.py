"""How well a language model predicts a text: loss, perplexity and bits per byte.

    score = evaluate_text(model, tokenizer, text)      # a TextScore
    score.loss, score.perplexity, score.bits_per_byte

The loss is the mean negative log-likelihood per predicted token, in nats, and the perplexity is
exp(loss). Both depend on the tokenizer: a model whose tokens are longer predicts fewer of them,
each harder. Bits per byte does not, so it compares models with different tokenizers (a
character model and GPT-2's BPE, say):

    bits per byte = (sum over the predicted tokens of -ln p(token | context))
                    / (ln 2 * number of UTF-8 bytes those tokens spell)

How the text is laid out (as lm-evaluation-harness does for its rolling likelihoods):

    ids = [<|endoftext|>] + tokenizer.encode(text)             N + 1 tokens, N of the text

<|endoftext|> starts the sequence, as it starts every document GPT-2 saw, so every one of the N
tokens of the text is predicted, the first one included, and the bytes are exactly the text's.
The N targets are cut into non-overlapping windows of the model's context (block_size, GPT-2's
n_positions), which tinylm.data.eval_windows lays: window k reads ids[kT : kT + T] and predicts
ids[kT + 1 : kT + T + 1], the last window shorter when T does not divide N. Each token is
predicted once, from the tokens of its own window only, so the first token of a window sees one
token of context and the last sees T. A strided evaluation (windows that overlap, each token
scored with close to T tokens of context) gives a lower loss; non-overlapping windows are the
cheaper, simpler and pessimistic choice, and the one training's validation loss makes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinylm.backend import get_array_module
from tinylm.data import eval_windows
from tinylm.tokenizer import BPETokenizer, text_to_bytes


@dataclass
class TextScore:
    """The result of an evaluation: totals and the three figures made of them."""

    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes the predicted tokens spell
    nats: float  # sum of -ln p over the predicted tokens

    @property
    def loss(self) -> float:
        """Mean nats per predicted token (the cross-entropy loss)."""
        return self.nats / self.tokens

    @property
    def perplexity(self) -> float:
        """exp(loss): the number of equally likely tokens that would be as surprising."""
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def bits_per_byte(self) -> float:
        """nats / (ln 2 * bytes): the bits an ideal coder using the model spends per byte."""
        return self.nats / (math.log(2) * self.bytes)


def evaluate_text(model, tokenizer, text: str, batch_size=None, block_size=None):
    """Score all of ``text`` as the module docstring lays it out: <|endoftext|> first, then
    non-overlapping windows of block_size tokens (default: the model's context,
    model.config.block_size), batch_size windows at a time (default: auto_batch_size).
    Returns a TextScore."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    ids = [tokenizer.eot_id, *tokenizer.encode(text)]
    if len(ids) < 2:
        raise ValueError("the text is empty; there is nothing to predict")
    n_bytes = len(text_to_bytes(text))
    return evaluate_tokens(model, np.asarray(ids, dtype=np.int64), n_bytes, batch_size, block_size)


def evaluate_tokens(model, ids, n_bytes: int, batch_size=None, block_size=None):
    """Score the tokens ids[1:] of a 1-D token array, each from the tokens before it in its
    window (non-overlapping windows of block_size, default model.config.block_size);
    ``n_bytes`` is the UTF-8 length of what ids[1:] spell (see utf8_length). batch_size
    windows go through the model at once (default: auto_batch_size). Returns a TextScore."""
    block_size = model.config.block_size if block_size is None else block_size
    if not 1 <= block_size <= model.config.block_size:
        raise ValueError(
            f"block_size must be in 1..{model.config.block_size} (the model's context), got "
            f"{block_size}"
        )
    if batch_size is None:
        batch_size = auto_batch_size(model.config, block_size)
    ids = model.xp.asarray(ids)
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise ValueError(f"evaluation needs at least 2 tokens (one to predict), got {len(ids)}")
    if n_bytes < 1:
        raise ValueError(f"the predicted tokens must spell at least one byte, got {n_bytes}")
    nats = 0.0
    for x, y in eval_windows(ids, block_size, batch_size):  # (b, T) inputs and targets
        nats += nll_sum(model.logits(x), y)
    return TextScore(tokens=n_targets, bytes=int(n_bytes), nats=nats)


def nll_sum(logits, targets) -> float:
    """sum over positions of -ln softmax(logits)[target] = logsumexp(z) - z[target], where
    z = logits - max(logits) keeps exp from overflowing. logits (b, T, V), targets (b, T)."""
    xp = get_array_module(logits)
    z = logits - logits.max(axis=-1, keepdims=True)  # (b, T, V), each row's max is 0
    lse = xp.log(xp.exp(z).sum(axis=-1))  # (b, T)
    picked = xp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]  # (b, T): z[target]
    return float((lse - picked).astype(np.float64).sum())


def auto_batch_size(config, block_size: int, budget: int = 2**25) -> int:
    """Windows per forward so that the largest activation of a batch, b x T x max(V, 4C, H T)
    numbers (the logits, the MLP's hidden layer, the attention scores), stays within
    ``budget`` (32M numbers, 128 MB in float32); at least 1. GPT-2 small with T = 1024 gets 1
    window at a time, a small character model hundreds."""
    widest = max(config.vocab_size, 4 * config.n_embd, config.n_head * block_size)
    return max(1, budget // (block_size * widest))


def utf8_length(tokenizer, ids) -> int:
    """The number of UTF-8 bytes the tokens ``ids`` spell. A byte-level BPE token is a byte
    string of its own (one cut out of a longer text may end inside a character, so its bytes
    are counted, not the decoded text's); a character token is one character."""
    ids = [int(i) for i in ids]
    if isinstance(tokenizer, BPETokenizer):
        return sum(len(tokenizer.vocab[i]) for i in ids)
    return len(text_to_bytes(tokenizer.decode(ids)))
