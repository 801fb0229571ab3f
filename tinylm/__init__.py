"""tinylm: Transformer language models in NumPy, every backward pass written by hand.

    import tinylm
    model = tinylm.GPT(tinylm.GPTConfig(vocab_size=65, block_size=64,
                                        n_layer=4, n_head=4, n_embd=128))
    logits, loss = model.forward(idx, targets)
    grads = model.backward()

    result = tinylm.train(steps=500, out="runs/first")  # the loop, with checkpoints

    gpt2 = tinylm.GPT.from_pretrained("path/to/gpt2")    # a local Hugging Face directory
    generator = tinylm.pipeline("text-generation", model="path/to/gpt2")

    bert = tinylm.Bert(tinylm.BertConfig(...))           # the encoder family
    tinylm.pretrain(steps=500, out="runs/bert")          # masked LM + next sentence
    tinylm.finetune("data.csv", "runs/bert", "runs/cls") # a classifier; tinylm.classify(...)
"""

from tinylm.backend import get_backend, set_backend
from tinylm.bert import Bert, BertConfig
from tinylm.finetuning import classify, finetune
from tinylm.model import GPT, GPTConfig
from tinylm.pipelines import pipeline
from tinylm.pretraining import PretrainConfig, pretrain
from tinylm.tokenizer import BPETokenizer, CharTokenizer
from tinylm.training import TrainConfig, train
from tinylm.wordpiece import WordPieceTokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPTConfig",
    "Bert",
    "BertConfig",
    "CharTokenizer",
    "BPETokenizer",
    "WordPieceTokenizer",
    "TrainConfig",
    "train",
    "PretrainConfig",
    "pretrain",
    "finetune",
    "classify",
    "pipeline",
    "set_backend",
    "get_backend",
    "__version__",
]
