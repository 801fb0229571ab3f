"""tinylm: a GPT-style language model in NumPy, every backward pass written by hand.

    import tinylm
    model = tinylm.GPT(tinylm.GPTConfig(vocab_size=65, block_size=64,
                                        n_layer=4, n_head=4, n_embd=128))
    logits, loss = model.forward(idx, targets)
    grads = model.backward()
"""

from tinylm.backend import get_backend, set_backend
from tinylm.model import GPT, GPTConfig

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "set_backend", "get_backend", "__version__"]
