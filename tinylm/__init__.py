"""tinylm: a GPT-style language model in NumPy, every backward pass written by hand.

    import tinylm
    model = tinylm.GPT(tinylm.GPTConfig(vocab_size=65, block_size=64,
                                        n_layer=4, n_head=4, n_embd=128))
    logits, loss = model.forward(idx, targets)
    grads = model.backward()

    result = tinylm.train(steps=500, out="runs/first")  # the loop, with checkpoints
"""

from tinylm.backend import get_backend, set_backend
from tinylm.model import GPT, GPTConfig
from tinylm.tokenizer import BPETokenizer, CharTokenizer
from tinylm.train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPTConfig",
    "CharTokenizer",
    "BPETokenizer",
    "TrainConfig",
    "train",
    "set_backend",
    "get_backend",
    "__version__",
]
