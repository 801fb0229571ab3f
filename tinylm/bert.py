"""BERT, the encoder family, assembled from tinylm/layers.py, with its backward pass.

    idx (B, T) token ids, token_type_ids (B, T) segment 0/1, attention_mask (B, T) 1 real, 0 pad
      -> x = LN(word[idx] + position[pos] + token_type[type])       embeddings       (B, T, C)
      -> num_hidden_layers blocks, each post-LayerNorm:
             x = LN(x + attn(x))       bidirectional self-attention; padded keys masked out
             x = LN(x + mlp(x))        Linear(C, I) -> exact GELU -> Linear(I, C)
      -> hidden (B, T, C)                                           model.features(...)
      -> pooled = tanh(dense(hidden at [CLS]))                 (B, C), model.pooled(...)
    heads:
      MLM  logits = LN(gelu(dense(hidden))) @ word^T + bias    (B, T, V), decoder tied to word
      NSP  logits = dense(pooled)                              (B, 2)
      classifier logits = dense(dropout(pooled))               (B, num_labels)

As Hugging Face's ``BertForPreTraining``, the pretraining loss is the sum of two mean
cross-entropies: the MLM loss over the positions whose label is not -100, plus the NSP loss.

Parameters: one flat dict under Hugging Face's names and shapes (``bert.embeddings...``,
``bert.encoder.layer.{i}...``, ``bert.pooler...``, ``cls.predictions...``,
``cls.seq_relationship...``, ``classifier...``), so loading a checkpoint is a pure renaming
(tinylm/hf/bert.py). A linear layer's weight is stored as PyTorch's ``nn.Linear`` stores it,
(out, in), and the layer computes x @ W^T: layers.linear_forward receives the transposed *view*
W.T (in, out), and its gradient (in, out) is transposed back, both without copying.

Which parts a model holds is set by the config: ``pooler``, ``mlm_head``, ``nsp_head`` and
``num_labels`` (0 = no classifier). Hugging Face's ``BertForPreTraining`` has the pooler and
both pretraining heads, ``BertForMaskedLM`` only the MLM head (no pooler), and
``BertForSequenceClassification`` the pooler and the classifier.

Padding is exact. A sequence "starts" at its first real token: positions are counted from there
and the pooler reads that token ([CLS]). With right padding (what BERT's tokenizers produce) that
is position 0, exactly as Hugging Face; with left padding tinylm stays exact where Hugging Face's
BertModel would pool a pad token. Padded keys are masked out of every attention row, so
appending padding on either side changes no output at a real position and no gradient.

Dropout: ``hidden_dropout_prob`` is applied where Hugging Face applies it (embeddings, after
each attention output and MLP output dense, and ``classifier_dropout`` before the classifier).
``attention_probs_dropout_prob`` (dropout on the attention probabilities) is kept in the config
for the round trip with Hugging Face but **not applied**: tinylm's attention layer has no dropout
on its probabilities. In eval mode (model.eval()) both libraries drop nothing.

Shape legend: B batch, T time, C hidden_size, I intermediate_size, V vocab_size,
H num_attention_heads, D = C / H head size, K number of labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tinylm import layers
from tinylm.backend import backend_name, get_array_module, get_backend, to_backend, xp_for
from tinylm.model import checked_params

IGNORE_INDEX = -100  # an MLM label that counts for nothing (every unmasked position)

# hidden_act -> the layer pair. "gelu" is BERT's exact erf GELU; "gelu_new" and
# "gelu_pytorch_tanh" are Hugging Face's names for GPT-2's tanh approximation.
ACTIVATIONS = {
    "gelu": (layers.gelu_erf_forward, layers.gelu_erf_backward),
    "gelu_new": (layers.gelu_forward, layers.gelu_backward),
    "gelu_pytorch_tanh": (layers.gelu_forward, layers.gelu_backward),
}


@dataclass
class BertConfig:
    """BERT's hyperparameters under Hugging Face's names (the defaults are bert-base's).

    The last four fields say which parts the model holds (see the module docstring).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1  # kept for Hugging Face, not applied (see above)
    classifier_dropout: float | None = None  # None: hidden_dropout_prob, as Hugging Face
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    pad_token_id: int = 0
    pooler: bool = True
    mlm_head: bool = True
    nsp_head: bool = True
    num_labels: int = 0  # 0: no classifier; K >= 2: a K-way classifier on the pooled output

    def __post_init__(self):
        for name in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "type_vocab_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"BertConfig.hidden_size must be divisible by num_attention_heads, got "
                f"hidden_size={self.hidden_size} and num_attention_heads="
                f"{self.num_attention_heads}"
            )
        for name in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
                     "initializer_range", "classifier_dropout"):
            value = getattr(self, name)
            if value is None and name == "classifier_dropout":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise TypeError(f"BertConfig.{name} must be a number, got {value!r}")
            setattr(self, name, float(value))  # a Python float keeps float32 math in float32
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {value!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(
                f"BertConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"BertConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, "
                f"got {self.hidden_act!r}"
            )
        for name in ("pooler", "mlm_head", "nsp_head"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"BertConfig.{name} must be True or False, got "
                                f"{getattr(self, name)!r}")
        value = self.num_labels
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0 \
                or value == 1:
            raise ValueError(
                f"BertConfig.num_labels must be 0 (no classifier) or an integer >= 2, got "
                f"{value!r} (a 1-output regression head is not supported)"
            )
        if (self.nsp_head or self.num_labels) and not self.pooler:
            raise ValueError(
                "BertConfig: the NSP head and the classifier read the pooled output, so they "
                "need pooler=True"
            )
        value = self.pad_token_id
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                not 0 <= value < self.vocab_size:
            raise ValueError(
                f"BertConfig.pad_token_id must be an id in [0, {self.vocab_size}), got {value!r}"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


def layer_prefix(i: int) -> str:
    return f"bert.encoder.layer.{i}."


def param_shapes(config: BertConfig) -> dict[str, tuple]:
    """Every parameter's name and shape, in Hugging Face's order (nn.Linear weights (out, in))."""
    C, V, I = config.hidden_size, config.vocab_size, config.intermediate_size
    shapes = {
        "bert.embeddings.word_embeddings.weight": (V, C),
        "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, C),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, C),
        "bert.embeddings.LayerNorm.weight": (C,),
        "bert.embeddings.LayerNorm.bias": (C,),
    }
    for i in range(config.num_hidden_layers):
        p = layer_prefix(i)
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"] = (C, C)
            shapes[p + f"attention.self.{name}.bias"] = (C,)
        shapes[p + "attention.output.dense.weight"] = (C, C)
        shapes[p + "attention.output.dense.bias"] = (C,)
        shapes[p + "attention.output.LayerNorm.weight"] = (C,)
        shapes[p + "attention.output.LayerNorm.bias"] = (C,)
        shapes[p + "intermediate.dense.weight"] = (I, C)
        shapes[p + "intermediate.dense.bias"] = (I,)
        shapes[p + "output.dense.weight"] = (C, I)
        shapes[p + "output.dense.bias"] = (C,)
        shapes[p + "output.LayerNorm.weight"] = (C,)
        shapes[p + "output.LayerNorm.bias"] = (C,)
    if config.pooler:
        shapes["bert.pooler.dense.weight"] = (C, C)
        shapes["bert.pooler.dense.bias"] = (C,)
    if config.mlm_head:
        shapes["cls.predictions.bias"] = (V,)  # the decoder's bias; its weight is word_embeddings
        shapes["cls.predictions.transform.dense.weight"] = (C, C)
        shapes["cls.predictions.transform.dense.bias"] = (C,)
        shapes["cls.predictions.transform.LayerNorm.weight"] = (C,)
        shapes["cls.predictions.transform.LayerNorm.bias"] = (C,)
    if config.nsp_head:
        shapes["cls.seq_relationship.weight"] = (2, C)
        shapes["cls.seq_relationship.bias"] = (2,)
    if config.num_labels:
        shapes["classifier.weight"] = (config.num_labels, C)
        shapes["classifier.bias"] = (config.num_labels,)
    return shapes


def init_params(config: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face's BERT initialisation, in float64 NumPy from one seeded Generator.

    Linear and embedding weights ~ Normal(0, initializer_range), the padding token's word
    embedding row 0, biases 0, LayerNorm gains 1.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("LayerNorm.weight"):
            params[name] = np.ones(shape)
        elif name.endswith("bias"):
            params[name] = np.zeros(shape)
        else:
            params[name] = rng.normal(0.0, config.initializer_range, size=shape)
    params["bert.embeddings.word_embeddings.weight"][config.pad_token_id] = 0.0
    return params


class Bert:
    """A BERT encoder with pretraining and classification heads, and a hand-written backward.

        model = Bert(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=512))
        mlm_logits, nsp_logits, loss = model.forward(idx, token_type_ids, attention_mask,
                                                     mlm_labels, nsp_labels)
        grads = model.backward()                         # dict like model.params
        logits, loss = model.classify(idx, token_type_ids, attention_mask, labels)
        grads = model.backward()                         # the classification loss's gradients
        hidden = model.features(idx, token_type_ids, attention_mask)    # (B, T, C)
        pooled = model.pooled(idx, token_type_ids, attention_mask)      # (B, C)

    backward() returns a gradient for every parameter; the parts the last loss did not use
    (the classifier after a pretraining forward, the NSP head without nsp_labels, ...) get zeros.

    ``Bert(config, params=arrays)`` takes given parameters (a Hugging Face directory's) instead
    of drawing the random initialisation; ``seed`` then seeds only dropout. Arrays already of
    the model's dtype (and contiguous) are used as they are, not copied, and trained in place.
    """

    def __init__(self, config: BertConfig, seed: int = 0, dtype=np.float32, params=None):
        if not isinstance(config, BertConfig):
            raise TypeError(f"config must be a BertConfig, got {type(config).__name__}")
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.config = config
        self.dtype = np.dtype(dtype)
        self.device = "cpu"
        self.training = True  # dropout is applied only while training
        self.dropout_rng = np.random.default_rng(seed + 1)  # its own stream, apart from init
        if params is None:
            self.params = {k: a.astype(self.dtype) for k, a in init_params(config, seed).items()}
        else:  # checked against the config's names and shapes; no initialisation drawn
            self.params = checked_params(params, param_shapes(config), self.dtype)
        self._caches = None
        self.use_kernel = True  # on the GPU, attention runs in the fused kernel (tinylm/cuda.py)
        if get_backend() == "cupy":  # tinylm.set_backend("cupy"): new models live on the GPU
            self.to("gpu")

    # -- bookkeeping ----------------------------------------------------------------------

    @property
    def xp(self):
        return xp_for("cupy" if self.device == "gpu" else "numpy")

    def num_params(self) -> int:
        """The number of trainable scalars (the tied MLM decoder counts once)."""
        return int(sum(a.size for a in self.params.values()))

    def to(self, device: str) -> Bert:
        """Move the parameters to "cpu" (NumPy) or "gpu" (CuPy), in place; returns self."""
        name = backend_name(device)
        for k in self.params:
            self.params[k] = to_backend(self.params[k], name)
        self.device = "gpu" if name == "cupy" else "cpu"
        self._caches = None
        return self

    def train(self) -> Bert:
        self.training = True
        return self

    def eval(self) -> Bert:
        self.training = False
        return self

    # -- Hugging Face directories (tinylm/hf/bert.py knows their files) ----------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> Bert:
        """The BERT of a Hugging Face directory (config.json + model.safetensors of a BertModel,
        BertForPreTraining, BertForMaskedLM or BertForSequenceClassification), float32 unless
        dtype says float64. Its tokenizer: ``tinylm.hf.bert.load_bert(path)`` returns
        (model, tokenizer), or ``WordPieceTokenizer.from_pretrained(path)``."""
        from tinylm.hf.bert import load_bert

        model, _ = load_bert(path, dtype)
        return model

    def save_pretrained(self, path, tokenizer=None, id2label=None):
        """Write this model (and a WordPieceTokenizer) as a Hugging Face BERT directory that
        ``transformers`` loads (BertForPreTraining, ... by its heads); returns the path.
        id2label: the classifier's class names in id order (default LABEL_0, LABEL_1, ...)."""
        from tinylm.hf.bert import save_bert

        return save_bert(self, path, tokenizer, id2label)

    def _attention_pair(self):
        """layers.py's attention on the CPU; on the GPU the fused kernel of tinylm/cuda.py."""
        if self.device == "gpu" and self.use_kernel:
            from tinylm import cuda

            return cuda.attention_forward, cuda.attention_backward
        return layers.attention_forward, layers.attention_backward

    def _check_inputs(self, idx, token_type_ids, attention_mask):
        """Check the three (B, T) inputs; returns (token_type_ids, real) with defaults filled in.

        real is a bool (B, T) array, True at real tokens (attention_mask != 0).
        """
        xp = self.xp
        if not hasattr(idx, "dtype") or idx.dtype.kind not in "iu":
            got = getattr(idx, "dtype", type(idx).__name__)
            raise TypeError(f"idx must be an integer array of token ids, got {got}")
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape (B, T), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T == 0:
            raise ValueError("idx must hold at least one token per sequence, got T = 0")
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"idx: sequence length {T} is longer than max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = xp.zeros((B, T), dtype=np.int64)
        else:
            if not hasattr(token_type_ids, "dtype") or token_type_ids.dtype.kind not in "iu":
                got = getattr(token_type_ids, "dtype", type(token_type_ids).__name__)
                raise TypeError(f"token_type_ids must be an integer array, got {got}")
            if tuple(token_type_ids.shape) != (B, T):
                raise ValueError(
                    f"token_type_ids must have idx's shape {(B, T)}, "
                    f"got {tuple(token_type_ids.shape)}"
                )
            n_types = self.config.type_vocab_size
            if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= n_types:
                raise ValueError(
                    f"token_type_ids must be in [0, {n_types}) for type_vocab_size={n_types}, "
                    f"got values in [{int(token_type_ids.min())}, {int(token_type_ids.max())}]"
                )
        if attention_mask is None:
            real = xp.ones((B, T), dtype=bool)
        else:
            if not hasattr(attention_mask, "dtype") or attention_mask.dtype.kind not in "iub":
                got = getattr(attention_mask, "dtype", type(attention_mask).__name__)
                raise TypeError(f"attention_mask must be an integer or bool array, got {got}")
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(
                    f"attention_mask must have idx's shape {(B, T)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            real = attention_mask != 0
            empty = ~real.any(axis=1)
            if bool(empty.any()):
                raise ValueError(
                    f"attention_mask: sequence {int(xp.argmax(empty))} has no real token "
                    "(attention_mask is 1 at real tokens, 0 at padding)"
                )
        return token_type_ids, real

    # -- forward ----------------------------------------------------------------------------

    def _dropout(self, x, p, c, key):
        out, c[key] = layers.dropout_forward(x, p if self.training else 0.0, self.dropout_rng)
        return out

    def _dense(self, x, name, c):
        """out = x @ W^T + b, W (out, in) as nn.Linear stores it; the layer gets the view W.T."""
        W, b = self.params[name + ".weight"], self.params[name + ".bias"]
        out, c[name] = layers.linear_forward(x, W.T, b)
        return out

    def _layernorm(self, x, name, c):
        P = self.params
        out, c[name] = layers.layernorm_forward(
            x, P[name + ".weight"], P[name + ".bias"], self.config.layer_norm_eps
        )
        return out

    def _activation(self, x, key, c):
        forward, _ = ACTIVATIONS[self.config.hidden_act]
        out, c[key] = forward(x)
        return out

    def _embed(self, idx, token_type_ids, start, c):
        """x = LN(word[idx] + position[pos] + token_type[type]), then dropout.   (B, T, C)

        pos counts from each sequence's first real token (start, (B,)): 0, 1, 2, ... as in
        Hugging Face when start is 0; the left padding before it takes position 0.
        """
        P, xp = self.params, self.xp
        T = idx.shape[1]
        pre = "bert.embeddings."
        x, c["word"] = layers.embedding_forward(idx, P[pre + "word_embeddings.weight"])
        if bool((start == 0).all()):
            positions = xp.arange(T)  # (T,), the same for every sequence: broadcast over B
        else:
            positions = xp.maximum(xp.arange(T)[None, :] - start[:, None], 0)  # (B, T)
        x_pos, c["position"] = layers.embedding_forward(
            positions, P[pre + "position_embeddings.weight"]
        )
        x_type, c["token_type"] = layers.embedding_forward(
            token_type_ids, P[pre + "token_type_embeddings.weight"]
        )
        x = x + x_pos  # (B, T, C) + (T, C) or (B, T, C)
        x += x_type
        x = self._layernorm(x, pre + "LayerNorm", c)
        return self._dropout(x, self.config.hidden_dropout_prob, c, "drop_embeddings")

    def _layer(self, x, i, key_padding_mask, c):
        """One post-LayerNorm block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""
        cfg, p = self.config, layer_prefix(i)
        B, T, C = x.shape
        H, D = cfg.num_attention_heads, cfg.head_size
        p_drop = cfg.hidden_dropout_prob

        # --- attention: three projections, split into heads (B, T, C) -> (B, H, T, D) ---
        q, k, v = (
            self._dense(x, p + f"attention.self.{name}", c)
            .reshape(B, T, H, D)
            .transpose(0, 2, 1, 3)
            for name in ("query", "key", "value")
        )
        attention_forward, _ = self._attention_pair()
        a, c[p + "attention"] = attention_forward(
            q, k, v, causal=False, key_padding_mask=key_padding_mask
        )  # (B, H, T, D); every query sees every real key, before and after it
        a = a.transpose(0, 2, 1, 3).reshape(B, T, C)  # merge heads: (B, T, H, D) -> (B, T, C)
        y = self._dense(a, p + "attention.output.dense", c)
        y = self._dropout(y, p_drop, c, p + "attention.dropout")
        x = self._layernorm(x + y, p + "attention.output.LayerNorm", c)  # post-LN

        # --- MLP: Linear(C, I) -> GELU -> Linear(I, C) ---
        f = self._dense(x, p + "intermediate.dense", c)  # (B, T, I)
        g = self._activation(f, p + "intermediate.act", c)
        o = self._dense(g, p + "output.dense", c)  # (B, T, C)
        o = self._dropout(o, p_drop, c, p + "output.dropout")
        return self._layernorm(x + o, p + "output.LayerNorm", c)

    def _encode(self, idx, token_type_ids, attention_mask, c, with_pooler=True, checked=None):
        """hidden (B, T, C) and pooled (B, C) (None without the pooler); caches go into c.
        checked: what _check_inputs returned for these inputs, when the caller has run it."""
        token_type_ids, real = checked or self._check_inputs(idx, token_type_ids, attention_mask)
        xp = self.xp
        start = xp.argmax(real, axis=1)  # (B,), each sequence's first real token
        key_padding_mask = None if attention_mask is None else ~real  # True = padded key
        c["start"] = start
        x = self._embed(idx, token_type_ids, start, c)
        for i in range(self.config.num_hidden_layers):
            x = self._layer(x, i, key_padding_mask, c)
        hidden = x
        pooled = None
        if with_pooler and self.config.pooler:
            first = hidden[xp.arange(idx.shape[0]), start]  # (B, C), the [CLS] token's state
            pooled = self._dense(first, "bert.pooler.dense", c)
            pooled, c["pooler.tanh"] = layers.tanh_forward(pooled)
        return hidden, pooled

    def features(self, idx, token_type_ids=None, attention_mask=None):
        """The last hidden states (B, T, C), for feature extraction. Keeps nothing for backward.

        Dropout follows the model's mode: call model.eval() first for deterministic features.
        """
        hidden, _ = self._encode(idx, token_type_ids, attention_mask, {}, with_pooler=False)
        return hidden

    def pooled(self, idx, token_type_ids=None, attention_mask=None):
        """The pooled output tanh(dense(hidden at [CLS])) (B, C). Keeps nothing for backward."""
        if not self.config.pooler:
            raise ValueError("pooled() needs a model with a pooler (BertConfig.pooler=True)")
        _, pooled = self._encode(idx, token_type_ids, attention_mask, {})
        return pooled

    def _mlm_head(self, hidden, c):
        """logits = LN(gelu(dense(hidden))) @ word^T + bias    (B, T, C) -> (B, T, V)."""
        pre = "cls.predictions."
        t = self._dense(hidden, pre + "transform.dense", c)
        t = self._activation(t, pre + "transform.act", c)
        t = self._layernorm(t, pre + "transform.LayerNorm", c)
        W_word = self.params["bert.embeddings.word_embeddings.weight"]  # (V, C), tied
        logits, c["decoder"] = layers.linear_forward(t, W_word.T, self.params[pre + "bias"])
        return logits

    def forward(self, idx, token_type_ids=None, attention_mask=None, mlm_labels=None,
                nsp_labels=None):
        """Pretraining forward: returns (mlm_logits (B, T, V), nsp_logits (B, 2), loss).

        mlm_labels (B, T): the original token at masked positions, -100 elsewhere;
        nsp_labels (B,): 0 when segment B follows segment A, 1 when it is random (Hugging
        Face's convention). loss is the sum of the mean cross-entropies of the labels given, or
        None without labels. A head the model lacks gives None logits. The caches for
        backward() are kept; a later forward or classify replaces them.
        """
        cfg = self.config
        if mlm_labels is not None and not cfg.mlm_head:
            raise ValueError("mlm_labels given, but the model has no MLM head (mlm_head=False)")
        if nsp_labels is not None and not cfg.nsp_head:
            raise ValueError("nsp_labels given, but the model has no NSP head (nsp_head=False)")
        checked = self._check_inputs(idx, token_type_ids, attention_mask)  # bad input: caches kept
        self._caches = None  # the last step's activations go first: one copy held, not two
        c = {}
        hidden, pooled = self._encode(idx, token_type_ids, attention_mask, c, checked=checked)
        mlm_logits = self._mlm_head(hidden, c) if cfg.mlm_head else None
        nsp_logits = self._dense(pooled, "cls.seq_relationship", c) if cfg.nsp_head else None
        loss = None
        if mlm_labels is not None:
            loss, c["mlm_loss"] = layers.cross_entropy_forward(mlm_logits, mlm_labels)
        if nsp_labels is not None:
            if getattr(nsp_labels, "shape", None) != (idx.shape[0],):
                raise ValueError(
                    f"nsp_labels must have shape ({idx.shape[0]},), one per sequence, got "
                    f"{getattr(nsp_labels, 'shape', type(nsp_labels).__name__)}"
                )
            nsp_loss, c["nsp_loss"] = layers.cross_entropy_forward(nsp_logits, nsp_labels)
            loss = nsp_loss if loss is None else loss + nsp_loss
        self._caches = c
        return mlm_logits, nsp_logits, loss

    def classify(self, idx, token_type_ids=None, attention_mask=None, labels=None):
        """Sequence classification: returns (logits (B, K), mean cross-entropy or None).

            logits = dense(dropout(pooled))      Hugging Face's BertForSequenceClassification
        labels (B,) integers in [0, K). The caches for backward() are kept.
        """
        cfg = self.config
        if not cfg.num_labels:
            raise ValueError("classify() needs a model with a classifier (BertConfig.num_labels)")
        checked = self._check_inputs(idx, token_type_ids, attention_mask)  # bad input: caches kept
        self._caches = None  # the last step's activations go first: one copy held, not two
        c = {}
        _, pooled = self._encode(idx, token_type_ids, attention_mask, c, checked=checked)
        p_drop = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else \
            cfg.classifier_dropout
        pooled = self._dropout(pooled, p_drop, c, "classifier.dropout")
        logits = self._dense(pooled, "classifier", c)  # (B, K)
        loss = None
        if labels is not None:
            if getattr(labels, "shape", None) != (idx.shape[0],):
                raise ValueError(
                    f"labels must have shape ({idx.shape[0]},), one per sequence, got "
                    f"{getattr(labels, 'shape', type(labels).__name__)}"
                )
            loss, c["classifier_loss"] = layers.cross_entropy_forward(logits, labels)
        self._caches = c
        return logits, loss

    # -- backward ---------------------------------------------------------------------------

    def backward(self):
        """The gradient of the last forward's (or classify's) loss for every parameter."""
        c = self._caches
        if c is None or not any(k in c for k in ("mlm_loss", "nsp_loss", "classifier_loss")):
            raise RuntimeError(
                "backward() needs a forward(...) with mlm_labels or nsp_labels, or a "
                "classify(...) with labels, first"
            )
        P, xp = self.params, self.xp
        grads = {}
        B, T = c["word"][0].shape
        C = self.config.hidden_size
        dhidden = xp.zeros((B, T, C), dtype=self.dtype)
        dpooled = None

        if "classifier_loss" in c:
            dlogits = layers.cross_entropy_backward(1.0, c["classifier_loss"])  # (B, K)
            dpooled = self._dense_backward(dlogits, "classifier", c, grads)
            dpooled = layers.dropout_backward(dpooled, c["classifier.dropout"])
        if "nsp_loss" in c:
            dlogits = layers.cross_entropy_backward(1.0, c["nsp_loss"])  # (B, 2)
            dpooled = self._dense_backward(dlogits, "cls.seq_relationship", c, grads)
        dword_decoder = None
        if "mlm_loss" in c:
            dhidden, dword_decoder = self._mlm_head_backward(c, grads)

        if dpooled is not None:
            # Forward: pooled = tanh(first @ W^T + b), first[b] = hidden[b, start[b]]
            dpre = layers.tanh_backward(dpooled, c["pooler.tanh"])
            dfirst = self._dense_backward(dpre, "bert.pooler.dense", c, grads)  # (B, C)
            dhidden[xp.arange(B), c["start"]] += dfirst  # one position per row: no collisions

        dx = dhidden
        for i in reversed(range(self.config.num_hidden_layers)):
            dx = self._layer_backward(dx, i, c, grads)
        self._embed_backward(dx, c, grads)
        if dword_decoder is not None:
            # word_embeddings is used twice (lookup and MLM decoder), so its gradients add.
            grads["bert.embeddings.word_embeddings.weight"] += dword_decoder
        return {k: grads[k] if k in grads else xp.zeros_like(P[k]) for k in P}

    def _dense_backward(self, dout, name, c, grads):
        """Backward of out = x @ W^T + b: the layer's dW is (in, out), stored back as (out, in)."""
        dx, dW_T, db = layers.linear_backward(dout, c[name])
        grads[name + ".weight"] = dW_T.T
        grads[name + ".bias"] = db
        return dx

    def _layernorm_backward(self, dout, name, c, grads):
        dx, grads[name + ".weight"], grads[name + ".bias"] = layers.layernorm_backward(
            dout, c[name]
        )
        return dx

    def _activation_backward(self, dout, key, c):
        _, backward = ACTIVATIONS[self.config.hidden_act]
        return backward(dout, c[key])

    def _mlm_head_backward(self, c, grads):
        """Backward of logits = LN(gelu(dense(hidden))) @ word^T + bias.

        Returns (dhidden (B, T, C), the decoder's share of d word_embeddings (V, C)).
        """
        pre = "cls.predictions."
        dlogits = layers.cross_entropy_backward(1.0, c["mlm_loss"])  # (B, T, V)
        dt, dW_T, grads[pre + "bias"] = layers.linear_backward(dlogits, c["decoder"])
        dt = self._layernorm_backward(dt, pre + "transform.LayerNorm", c, grads)
        dt = self._activation_backward(dt, pre + "transform.act", c)
        dhidden = self._dense_backward(dt, pre + "transform.dense", c, grads)
        return dhidden, dW_T.T  # (C, V) -> (V, C)

    def _layer_backward(self, dx, i, c, grads):
        """Backward through one block; dx (B, T, C) is the gradient at the block's output.

        Forward:  x1 = LN_1(x + y),  y = dense_o(attention(q(x), k(x), v(x)))
                  x2 = LN_2(x1 + o), o = dense_out(gelu(dense_in(x1)))
        Post-LN: the gradient first passes the LayerNorm, then the residual sends it both ways:
                  ds2 = LN_2 backward(dx2);  dx1 = ds2 + mlp backward(ds2)
                  ds1 = LN_1 backward(dx1);  dx  = ds1 + attn backward(ds1)
        x feeds q, k and v, so its gradient is the sum of the three projections' backwards.
        """
        cfg, p = self.config, layer_prefix(i)
        B, T, C = dx.shape
        H, D = cfg.num_attention_heads, cfg.head_size
        xp = get_array_module(dx)

        # --- MLP: x2 = LN_2(x1 + dense_out(gelu(dense_in(x1)))) ---
        ds2 = self._layernorm_backward(dx, p + "output.LayerNorm", c, grads)
        do = layers.dropout_backward(ds2, c[p + "output.dropout"])
        dg = self._dense_backward(do, p + "output.dense", c, grads)  # (B, T, I)
        df = self._activation_backward(dg, p + "intermediate.act", c)
        dx1 = ds2 + self._dense_backward(df, p + "intermediate.dense", c, grads)

        # --- attention: x1 = LN_1(x + dense_o(merge(attention(split(q, k, v))))) ---
        ds1 = self._layernorm_backward(dx1, p + "attention.output.LayerNorm", c, grads)
        dy = layers.dropout_backward(ds1, c[p + "attention.dropout"])
        da = self._dense_backward(dy, p + "attention.output.dense", c, grads)  # (B, T, C)
        da = da.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # undo the merge: (B, H, T, D)
        _, attention_backward = self._attention_pair()
        dq, dk, dv = attention_backward(da, c[p + "attention"])
        dx = ds1
        for name, dheads in (("query", dq), ("key", dk), ("value", dv)):
            dproj = xp.ascontiguousarray(dheads.transpose(0, 2, 1, 3)).reshape(B, T, C)
            dx = dx + self._dense_backward(dproj, p + f"attention.self.{name}", c, grads)
        return dx

    def _embed_backward(self, dx, c, grads):
        """Backward of x = dropout(LN(word[idx] + position[pos] + token_type[type])).

        The sum passes its gradient unchanged to each of the three lookups.
        """
        pre = "bert.embeddings."
        dx = layers.dropout_backward(dx, c["drop_embeddings"])
        dsum = self._layernorm_backward(dx, pre + "LayerNorm", c, grads)  # (B, T, C)
        grads[pre + "word_embeddings.weight"] = layers.embedding_backward(dsum, c["word"])
        positions = c["position"][0]
        # positions (T,) were broadcast over the batch, so their gradient first sums over B.
        dpos = dsum.sum(axis=0) if positions.ndim == 1 else dsum
        grads[pre + "position_embeddings.weight"] = layers.embedding_backward(dpos, c["position"])
        grads[pre + "token_type_embeddings.weight"] = layers.embedding_backward(
            dsum, c["token_type"]
        )
