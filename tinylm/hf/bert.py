"""BERT directories of Hugging Face <-> ``tinylm.Bert``: the config fields and the weight names.

    model, tokenizer = load_bert("bert-dir")    # tokenizer is None without vocab.txt
    save_bert(model, "out", tokenizer)          # BertForPreTraining.from_pretrained("out") reads it

(``Bert.from_pretrained(path)`` and ``model.save_pretrained(path, tokenizer)`` call these.)

Loading is a renaming, not a conversion: tinylm's Bert keeps Hugging Face's names and shapes,
including nn.Linear's (out, in) weight layout (tinylm/bert.py computes x @ W^T).

    config.json                                        BertConfig
      vocab_size, hidden_size, num_hidden_layers,        same names
      num_attention_heads, intermediate_size,
      max_position_embeddings, type_vocab_size,
      layer_norm_eps, hidden_act ("gelu" = exact erf),
      hidden_dropout_prob, attention_probs_dropout_prob,
      classifier_dropout, initializer_range, pad_token_id
      position_embedding_type "absolute"                 (the only kind tinylm computes)

    model.safetensors                                  model.params
      bert.embeddings.word_embeddings.weight (V, C)      the same name
        (BertModel saves it without "bert.")               "bert." added
      bert.encoder.layer.0.attention.self.query.weight   the same, (out, in)
      ...
      cls.predictions.decoder.weight, equal to word      (tied: nothing, the decoder uses it)
      cls.predictions.decoder.bias, equal to cls.predictions.bias   (nothing)
      bert.embeddings.position_ids                       (a buffer: ignored)
      ...LayerNorm.gamma / .beta (old TF checkpoints)    ...LayerNorm.weight / .bias

Which heads the model gets is read from the weights: the pooler, the MLM head
(``cls.predictions``), the NSP head (``cls.seq_relationship``) and the classifier
(``classifier``, whose rows give num_labels) are each present or not, so BertModel,
BertForPreTraining, BertForMaskedLM and BertForSequenceClassification directories all load.
The dropout probabilities of config.json are kept (fine-tuning drops out as Hugging Face does,
except on attention probabilities, which tinylm never drops; see tinylm/bert.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinylm.backend import to_numpy
from tinylm.bert import Bert, BertConfig, param_shapes
from tinylm.hf.common import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_tensors,
    read_config,
    read_weights,
    write_pretrained,
)

MODEL_TYPES = ("bert",)
PREFIX = "bert."
_BASE_MODEL_PARTS = ("embeddings.", "encoder.", "pooler.")  # BertModel's keys have no prefix
_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "max_position_embeddings", "type_vocab_size",
)
_OPTIONAL_FIELDS = (
    "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "classifier_dropout", "hidden_act", "initializer_range", "pad_token_id",
)


# ----------------------------------------------------------------------------------------------
# config.json <-> BertConfig


def config_from_hf(hf: dict, heads: dict, file="config.json") -> BertConfig:
    """The BertConfig of a BERT config.json (as a dict) and the heads found in its weights
    (pooler, mlm_head, nsp_head, num_labels); ValueError naming ``file`` for a missing field or
    a variant of BERT that tinylm does not compute."""
    fields = {}
    for name in _CONFIG_FIELDS:
        if hf.get(name) is None:
            raise ValueError(f"model config {str(file)!r}: field {name!r} is missing")
        fields[name] = hf[name]
    for name in _OPTIONAL_FIELDS:
        if name in hf and (hf[name] is not None or name == "classifier_dropout"):
            fields[name] = hf[name]
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(
            f"model config {str(file)!r}: position_embedding_type is {position_type!r}; "
            "tinylm computes BERT with learned absolute positions ('absolute')"
        )
    for name in ("is_decoder", "add_cross_attention"):
        if hf.get(name, False):
            raise ValueError(
                f"model config {str(file)!r}: {name} is true; tinylm's BERT is an encoder only"
            )
    try:
        return BertConfig(**fields, **heads)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model config {str(file)!r}: {err}") from err


def architecture(config: BertConfig) -> str:
    """The transformers class whose keys a model with these heads has (the closest one)."""
    if config.num_labels:
        return "BertForSequenceClassification"
    if config.nsp_head:
        return "BertForPreTraining"
    if config.mlm_head:
        return "BertForMaskedLM" if not config.pooler else "BertForPreTraining"
    return "BertModel"


def config_to_hf(config: BertConfig, id2label=None) -> dict:
    """The config.json of a BERT with this BertConfig, as transformers writes it.

    id2label: the names of the classifier's classes, in id order (default LABEL_0, LABEL_1,
    ..., transformers' default); written as id2label and label2id, which transformers'
    text-classification pipeline reports."""
    hf = {
        "model_type": "bert",
        "architectures": [architecture(config)],
        **{name: getattr(config, name) for name in _CONFIG_FIELDS + _OPTIONAL_FIELDS},
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "is_decoder": False,
        "add_cross_attention": False,
    }
    if config.num_labels:
        names = check_labels(id2label, config.num_labels)
        hf["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf["label2id"] = {name: i for i, name in enumerate(names)}
    elif id2label is not None:
        raise ValueError("id2label given, but the model has no classifier (num_labels=0)")
    return hf


def check_labels(id2label, num_labels: int) -> list[str]:
    """The class names as a list in id order: id2label (a list, or a dict id -> name) or, when
    None, transformers' defaults LABEL_0 ... ValueError when they do not fit num_labels."""
    if id2label is None:
        return [f"LABEL_{i}" for i in range(num_labels)]
    if isinstance(id2label, dict):
        try:
            by_id = {int(i): name for i, name in id2label.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"id2label: keys must be class ids 0..{num_labels - 1}") from err
        if sorted(by_id) != list(range(num_labels)):
            raise ValueError(
                f"id2label must name classes 0..{num_labels - 1}, got ids {sorted(by_id)}"
            )
        names = [by_id[i] for i in range(num_labels)]
    else:
        names = list(id2label)
    if len(names) != num_labels:
        raise ValueError(f"id2label must name {num_labels} classes, got {len(names)}")
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"id2label must be distinct non-empty strings, got {names!r}")
    return names


def read_labels(path) -> list[str]:
    """The class names of a BERT classifier directory in id order, from config.json's id2label
    (transformers' LABEL_i when it has none). ValueError naming the file when they do not fit
    the classifier's num_labels."""
    path = Path(path)
    hf = read_config(path, MODEL_TYPES + ("gpt2",))
    num_labels = hf.get("num_labels")
    id2label = hf.get("id2label")
    if num_labels is None:
        num_labels = len(id2label) if isinstance(id2label, dict) else 2
    try:
        return check_labels(id2label, int(num_labels))
    except ValueError as err:
        raise ValueError(f"model config {str(path / CONFIG_NAME)!r}: {err}") from err


# ----------------------------------------------------------------------------------------------
# model.safetensors <-> model.params


def _canonical_name(key: str) -> str:
    """A checkpoint's key under tinylm's name: "bert." prefixed, gamma/beta renamed."""
    name = PREFIX + key if key.startswith(_BASE_MODEL_PARTS) else key
    if name.endswith("LayerNorm.gamma"):
        name = name.removesuffix("gamma") + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name.removesuffix("beta") + "bias"
    return name


def canonical_tensors(tensors: dict, file=WEIGHTS_NAME) -> dict:
    """The tensors of a BERT model.safetensors under tinylm's names, tied copies and buffers
    dropped (no copies of the arrays). ValueError naming ``file`` when a tied copy differs."""
    params = {}
    for key, array in tensors.items():
        name = _canonical_name(key)
        if name in _BUFFERS:
            continue
        if name in params:
            raise ValueError(f"{str(file)!r}: tensor {name!r} is stored twice ({key!r} too)")
        params[name] = array
    for copy, original in (
        ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
        ("cls.predictions.decoder.bias", "cls.predictions.bias"),
    ):
        if copy not in params:
            continue
        if original not in params:
            params[original] = params.pop(copy)  # only the copy was stored
            continue
        a, b = params[copy], params[original]
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ValueError(
                f"{str(file)!r}: {copy} differs from {original}, but tinylm's BERT ties them "
                "(the MLM decoder is the word embedding matrix)"
            )
        del params[copy]
    return params


def heads_in(params: dict) -> dict:
    """Which parts a set of canonical tensors holds: BertConfig's pooler, mlm_head, nsp_head,
    num_labels."""
    classifier = params.get("classifier.weight")
    return {
        "pooler": "bert.pooler.dense.weight" in params,
        "mlm_head": "cls.predictions.transform.dense.weight" in params,
        "nsp_head": "cls.seq_relationship.weight" in params,
        "num_labels": 0 if classifier is None else int(classifier.shape[0]),
    }


def params_to_hf(params: dict) -> dict[str, np.ndarray]:
    """The tensors transformers' BERT classes save: tinylm's names (the tied decoder is left
    out, as transformers leaves it out), as contiguous NumPy arrays."""
    return {name: np.ascontiguousarray(to_numpy(a)) for name, a in params.items()}


# ----------------------------------------------------------------------------------------------
# Whole directories


def load_tokenizer(path):
    """The WordPiece tokenizer of a directory (vocab.txt), or None when it has none."""
    from tinylm.wordpiece import WordPieceTokenizer

    path = Path(path)
    if not (path / "vocab.txt").exists():
        return None
    return WordPieceTokenizer.from_pretrained(path)


def load_bert(path, dtype=None):
    """A Hugging Face BERT directory as (tinylm.Bert, its WordPieceTokenizer or None).

    dtype: float32 (the default) or float64; float16 and bfloat16 weights are widened to it.
    Every problem is a one-line error naming the file (see tinylm.hf.common).
    """
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    path = Path(path)
    hf_config = read_config(path, MODEL_TYPES)
    tensors = read_weights(path, dtype)
    params = canonical_tensors(tensors, path / WEIGHTS_NAME)
    config = config_from_hf(hf_config, heads_in(params), path / CONFIG_NAME)
    check_tensors(path / WEIGHTS_NAME, params, param_shapes(config))
    tokenizer = load_tokenizer(path)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{str(path)!r}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
            f"reads only vocab_size={config.vocab_size}"
        )
    # check_tensors named any missing or misshapen tensor; the model takes the ones it reads
    model = Bert(config, dtype=dtype, params={k: params[k] for k in param_shapes(config)})
    return model, tokenizer


def save_bert(model: Bert, path, tokenizer=None, id2label=None) -> Path:
    """Write ``model`` (and ``tokenizer``, a WordPieceTokenizer) as a Hugging Face BERT
    directory: config.json, model.safetensors (in the model's dtype), and vocab.txt and
    tokenizer_config.json when a tokenizer is given. id2label names a classifier's classes
    (see config_to_hf). The directory rules are those of tinylm.hf.common.write_pretrained.
    Returns the directory."""
    from tinylm.wordpiece import WordPieceTokenizer

    extra_files = None
    if tokenizer is not None:
        if not isinstance(tokenizer, WordPieceTokenizer):
            raise TypeError(
                f"BERT's tokenizer files are WordPiece's (vocab.txt), got "
                f"{type(tokenizer).__name__}; pass tokenizer=None to save the model alone"
            )
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model reads only "
                f"vocab_size={model.config.vocab_size}"
            )
        extra_files = tokenizer.pretrained_files()
    config = config_to_hf(model.config, id2label)
    return write_pretrained(path, config, params_to_hf(model.params), extra_files)
