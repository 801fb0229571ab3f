"""GPT-2 directories of Hugging Face <-> ``tinylm.GPT``: the config fields and the weight names.

    model, tokenizer = load_gpt2("gpt2")        # tokenizer is None without vocab.json/merges.txt
    save_gpt2(model, "out", tokenizer)     # GPT2LMHeadModel.from_pretrained("out") reads it

(``GPT.from_pretrained(path)`` and ``model.save_pretrained(path, tokenizer)`` call these.)

Loading is a mapping, not a conversion. tinylm's parameters already carry GPT-2's names and
layouts: GPT-2 stores each linear layer as a "Conv1D" whose weight is (in, out) and computes
x @ W + b, which is exactly tinylm's ``linear_forward``; wte is (V, C), wpe (block_size, C). So

    config.json                                        GPTConfig
      n_layer, n_head, n_embd, vocab_size                same names
      n_positions                                        block_size
      layer_norm_epsilon                                 layer_norm_epsilon
      activation_function "gelu_new"                     layers.gelu_forward (tanh approximation)
      tie_word_embeddings                                tie_weights

    model.safetensors                                  model.params
      transformer.wte.weight  (or wte.weight)            wte.weight
      transformer.h.0.attn.c_attn.weight  (C, 3C)        h.0.attn.c_attn.weight  (C, 3C)
      ...
      lm_head.weight, equal to wte                       (tied: nothing, logits use wte)
      h.0.attn.bias, h.0.attn.masked_bias                (causal-mask buffers: ignored)

Dropout is a training setting, not part of a checkpoint: a loaded model has dropout 0; set
``model.config.dropout`` before fine-tuning if you want it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tinylm.backend import to_numpy
from tinylm.hf.common import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_tensors,
    read_config,
    read_weights,
    write_pretrained,
)
from tinylm.model import GPT, GPTConfig, param_shapes
from tinylm.tokenizer import BPETokenizer

# model.param_shapes(config) names every parameter with its shape; for a GPT-2 config (learned
# positions, biases) those are exactly the tensors of GPT-2's checkpoints.
MODEL_TYPES = ("gpt2",)
PREFIX = "transformer."
# The activations that are the tanh approximation of GELU, the one tinylm's layers have.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Old checkpoints store the causal mask (and the value masked scores get) as buffers.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


# ----------------------------------------------------------------------------------------------
# config.json <-> GPTConfig


def config_from_hf(hf: dict, file="config.json") -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json (as a dict); ValueError naming ``file`` for a field
    that is missing or a variant of GPT-2 that tinylm does not compute."""

    def field(name, default=None):
        value = hf.get(name, default)
        if value is None:
            raise ValueError(f"model config {str(file)!r}: field {name!r} is missing")
        return value

    activation = hf.get("activation_function", "gelu_new")
    if activation not in TANH_GELU_NAMES:
        raise ValueError(
            f"model config {str(file)!r}: activation_function {activation!r} is not one tinylm "
            f"has; it computes GELU's tanh approximation ({', '.join(TANH_GELU_NAMES)})"
        )
    n_embd = field("n_embd")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise ValueError(
            f"model config {str(file)!r}: n_inner is {n_inner}; tinylm's MLP is 4 * n_embd = "
            f"{4 * n_embd} wide"
        )
    for name, tinylm_value in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(name, tinylm_value) != tinylm_value:
            raise ValueError(
                f"model config {str(file)!r}: {name} is {hf[name]!r}; tinylm computes GPT-2 "
                f"with {name} = {tinylm_value}"
            )
    try:
        return GPTConfig(
            vocab_size=field("vocab_size"),
            block_size=field("n_positions"),
            n_layer=field("n_layer"),
            n_head=field("n_head"),
            n_embd=n_embd,
            dropout=0.0,
            bias=True,
            positions="learned",
            tie_weights=bool(hf.get("tie_word_embeddings", True)),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"model config {str(file)!r}: {err}") from err


def config_to_hf(config: GPTConfig, eot_id: int | None = None) -> dict:
    """The config.json of a GPT-2 with this GPTConfig, as transformers writes it.

    ``eot_id`` (the tokenizer's "<|endoftext|>") becomes bos/eos_token_id; without a tokenizer
    the last id, where every tinylm tokenizer and GPT-2's put it. Raises ValueError for a GPT
    that GPT-2's layout cannot hold (sinusoidal positions, no biases).
    """
    if config.positions != "learned":
        raise ValueError(
            f"GPT-2 learns its positions (wpe); this model has positions={config.positions!r}"
        )
    if not config.bias:
        raise ValueError(
            "GPT-2 has biases in every linear layer and LayerNorm; this model has none"
        )
    if config.embedding_scale != 1.0:
        raise ValueError(
            f"GPT-2 adds its token embeddings unscaled; this model multiplies them by "
            f"embedding_scale={config.embedding_scale:g}"
        )
    eot_id = config.vocab_size - 1 if eot_id is None else int(eot_id)
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "tie_word_embeddings": config.tie_weights,
        # tinylm drops out after the embedding and each residual branch, never attention's
        # probabilities, so transformers' training matches it with attn_pdrop 0.
        "embd_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


# ----------------------------------------------------------------------------------------------
# model.safetensors <-> model.params


def params_from_hf(tensors: dict, config: GPTConfig, file=WEIGHTS_NAME) -> dict:
    """tinylm's params from the tensors of a GPT-2 model.safetensors (no copies).

    Strips the ``transformer.`` prefix, drops the mask buffers and an ``lm_head.weight`` equal
    to wte (tied), then checks that exactly the parameters of ``config`` are there with their
    shapes (ValueError naming ``file`` and the tensor otherwise).
    """
    params = {}
    for key, array in tensors.items():
        name = key.removeprefix(PREFIX)
        if _MASK_BUFFER.fullmatch(name):
            continue
        if name in params:
            raise ValueError(f"{str(file)!r}: tensor {name!r} is stored twice ({key!r} too)")
        params[name] = array
    if config.tie_weights and "lm_head.weight" in params:
        lm_head, wte = params["lm_head.weight"], params.get("wte.weight")
        if wte is not None and lm_head.shape == wte.shape and np.array_equal(lm_head, wte):
            del params["lm_head.weight"]  # tied: the logits use wte
        else:
            raise ValueError(
                f"{str(file)!r}: lm_head.weight differs from wte.weight, but the config ties "
                "them (tie_word_embeddings is true)"
            )
    check_tensors(file, params, param_shapes(config))
    return {name: params[name] for name in param_shapes(config)}


def params_to_hf(params: dict) -> dict[str, np.ndarray]:
    """The tensors transformers' GPT2LMHeadModel saves: ``transformer.`` + each name, and
    ``lm_head.weight`` only when it is not tied (a tied one is written once, as wte)."""
    tensors = {}
    for name, array in params.items():
        key = name if name == "lm_head.weight" else PREFIX + name
        tensors[key] = np.ascontiguousarray(to_numpy(array))
    return tensors


# ----------------------------------------------------------------------------------------------
# Whole directories


def load_tokenizer(path) -> BPETokenizer | None:
    """The GPT-2 tokenizer of a directory (vocab.json + merges.txt), or None when it has none."""
    path = Path(path)
    if not (path / "vocab.json").exists() and not (path / "merges.txt").exists():
        return None
    return BPETokenizer.from_pretrained(path)


def load_gpt2(path, dtype=None) -> tuple[GPT, BPETokenizer | None]:
    """A Hugging Face GPT-2 directory as (tinylm.GPT, its tokenizer or None).

    dtype: float32 (the default) or float64; float16 and bfloat16 weights are widened to it.
    The tokenizer is read when the directory holds vocab.json and merges.txt. Every problem is a
    one-line error naming the file (see tinylm.hf.common).
    """
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    path = Path(path)
    hf_config = read_config(path, MODEL_TYPES)
    config = config_from_hf(hf_config, path / CONFIG_NAME)
    tensors = read_weights(path, dtype)
    params = params_from_hf(tensors, config, path / WEIGHTS_NAME)
    tokenizer = load_tokenizer(path)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{str(path)!r}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"reads only vocab_size={config.vocab_size}"
        )
    # GPT(params=...) skips the random initialisation (seconds and a GB for GPT-2 small).
    return GPT(config, dtype=dtype, params=params), tokenizer


def gpt2_tokenizer_or_reason(tokenizer) -> tuple[BPETokenizer | None, str | None]:
    """(tokenizer, None) when ``tokenizer`` has GPT-2's files (a byte-level BPETokenizer that
    pre-splits with GPT-2's pattern), else (None, the reason, for a message)."""
    if not isinstance(tokenizer, BPETokenizer):
        return None, (
            f"the tokenizer is a {type(tokenizer).__name__}, not GPT-2's byte-level BPE"
        )
    try:
        tokenizer.pretrained_files()
    except ValueError as err:  # an old tinylm's pre-split pattern
        return None, f"the tokenizer has no GPT-2 form ({err})"
    return tokenizer, None


def save_gpt2(model: GPT, path, tokenizer=None, new=False) -> Path:
    """Write ``model`` (and ``tokenizer``, a BPETokenizer) as a Hugging Face GPT-2 directory.

    config.json, model.safetensors (GPT2LMHeadModel's keys, in the model's dtype), and
    vocab.json, merges.txt, tokenizer_config.json when a tokenizer is given. The directory
    rules are those of tinylm.hf.common.write_pretrained: files from an earlier save are
    replaced, anything else in the directory is refused; with ``new``, the directory must not
    exist or be empty, and it appears complete or not at all. Returns the directory.
    """
    extra_files = None
    eot_id = None
    if tokenizer is not None:
        if not isinstance(tokenizer, BPETokenizer):
            raise TypeError(
                f"only a byte-level BPETokenizer has GPT-2's tokenizer files, got "
                f"{type(tokenizer).__name__}; pass tokenizer=None to save the model alone"
            )
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model reads only "
                f"vocab_size={model.config.vocab_size}"
            )
        extra_files = tokenizer.pretrained_files()
        eot_id = tokenizer.eot_id
    config = config_to_hf(model.config, eot_id)
    return write_pretrained(path, config, params_to_hf(model.params), extra_files, new=new)
