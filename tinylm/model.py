"""The GPT-2 model, assembled from the layers in tinylm/layers.py, with its backward pass.

    idx (B, T) token ids
      -> x = wte[idx] + wpe[0..T-1]                  token + position embeddings  (B, T, C)
      -> n_layer blocks, each (pre-LayerNorm, residual):
             x = x + attn(ln_1(x))                   causal multi-head self-attention
             x = x + mlp(ln_2(x))                    Linear(C, 4C) -> GELU -> Linear(4C, C)
      -> features = ln_f(x)                          (B, T, C), what ``features(idx)`` returns
      -> logits = features @ wte^T                   (B, T, V), the output weights tied to wte
      -> loss = cross_entropy(logits, targets)

The forward keeps every layer's cache; ``backward()`` walks the same path in reverse,
calling each layer's backward with the gradient flowing in, and returns the gradient
of the mean loss for every parameter (``backward_features(dfeatures)`` starts the same walk
at the features, for a loss of your own on them). The parameters are one flat dict whose names
and shapes are those of GPT-2's checkpoints (without the ``transformer.`` prefix), listed by
``param_shapes(config)``.

Shape legend: B batch, T time, C n_embd, V vocab_size, H n_head, D = C / H head size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from tinylm import layers
from tinylm.backend import (
    backend_name,
    get_array_module,
    get_backend,
    to_backend,
    to_numpy,
    xp_for,
)


@dataclass
class GPTConfig:
    """The hyperparameters of a GPT, named as in GPT-2 and nanoGPT."""

    vocab_size: int
    block_size: int  # the longest sequence the model reads (its context window)
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms (GPT-2 has them)
    positions: str = "learned"  # "learned" (GPT-2's wpe) or "sinusoidal" (fixed, no parameters)
    tie_weights: bool = True  # logits = ln_f(x) @ wte^T, the output layer shares the embedding
    layer_norm_epsilon: float = 1e-5
    # The token embeddings are multiplied by this before the positions are added. None picks
    # sqrt(n_embd) for sinusoidal positions, as the original Transformer does (the fixed table
    # has entries of size ~1, the 0.02-scale token vectors would drown in it), and 1 otherwise.
    embedding_scale: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd must be divisible by n_head, got n_embd={self.n_embd} "
                f"and n_head={self.n_head}"
            )
        for name in ("dropout", "layer_norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise TypeError(f"GPTConfig.{name} must be a number, got {value!r}")
            setattr(self, name, float(value))  # a Python float keeps float32 math in float32
        for name in ("bias", "tie_weights"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"GPTConfig.{name} must be True or False, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.positions not in ("learned", "sinusoidal"):
            raise ValueError(
                f"GPTConfig.positions must be 'learned' or 'sinusoidal', got {self.positions!r}"
            )
        if not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"GPTConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}"
            )
        if self.embedding_scale is None:
            self.embedding_scale = math.sqrt(self.n_embd) if self.positions == "sinusoidal" else 1.0
        value = self.embedding_scale
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
                or not 0 < value < math.inf):
            raise ValueError(
                f"GPTConfig.embedding_scale must be a positive number or None, got {value!r}"
            )
        self.embedding_scale = float(value)  # a Python float keeps float32 math in float32

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def param_shapes(config: GPTConfig) -> dict[str, tuple]:
    """Every parameter's name and shape, in GPT-2's checkpoint order (no ``transformer.``).

    The linear weights are (in, out), as GPT-2's "Conv1D" stores them: a layer computes x @ W + b.
    """
    C, V = config.n_embd, config.vocab_size
    shapes = {"wte.weight": (V, C)}
    if config.positions == "learned":
        shapes["wpe.weight"] = (config.block_size, C)
    for i in range(config.n_layer):
        h = f"h.{i}."
        shapes[h + "ln_1.weight"] = (C,)
        shapes[h + "ln_1.bias"] = (C,)
        shapes[h + "attn.c_attn.weight"] = (C, 3 * C)
        shapes[h + "attn.c_attn.bias"] = (3 * C,)
        shapes[h + "attn.c_proj.weight"] = (C, C)
        shapes[h + "attn.c_proj.bias"] = (C,)
        shapes[h + "ln_2.weight"] = (C,)
        shapes[h + "ln_2.bias"] = (C,)
        shapes[h + "mlp.c_fc.weight"] = (C, 4 * C)
        shapes[h + "mlp.c_fc.bias"] = (4 * C,)
        shapes[h + "mlp.c_proj.weight"] = (4 * C, C)
        shapes[h + "mlp.c_proj.bias"] = (C,)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if not config.tie_weights:
        shapes["lm_head.weight"] = (V, C)
    if not config.bias:
        # Without biases the linear layers have none and the LayerNorms keep only their gain.
        shapes = {name: shape for name, shape in shapes.items() if not name.endswith(".bias")}
    return shapes


def init_params(config: GPTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2's initialisation, in float64 NumPy from one seeded Generator (the same on any device).

    Weights ~ Normal(0, 0.02); the two projections that write into the residual stream
    (attn.c_proj, mlp.c_proj) use 0.02 / sqrt(2 * n_layer), so the residual sum of 2*n_layer
    branches keeps its variance; biases 0; LayerNorm gains 1. The weights are drawn in the order
    of ``param_shapes``.
    """
    rng = np.random.default_rng(seed)
    std = 0.02
    std_residual = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".bias"):
            params[name] = np.zeros(shape)
        elif name.split(".")[-2].startswith("ln_"):  # the gains of ln_1, ln_2, ln_f
            params[name] = np.ones(shape)
        elif name.endswith("c_proj.weight"):
            params[name] = rng.normal(0.0, std_residual, size=shape)
        else:
            params[name] = rng.normal(0.0, std, size=shape)
    return params


def _shorten(names, head=5) -> str:
    """A list of names for an error message: all of a short list, the first few of a long one."""
    if not names:
        return "none"
    more = f" and {len(names) - head} more" if len(names) > head else ""
    return ", ".join(names[:head]) + more


def checked_params(params, expected: dict[str, tuple], dtype) -> dict:
    """A model's given parameters: ``params`` checked name by name and shape by shape against
    ``expected`` (name -> shape), each cast to ``dtype``.

    Arrays already of that dtype (and contiguous) are used as they are, not copied: the model
    then trains them in place. GPT(params=...) and Bert(params=...) both take their weights here.
    """
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of name -> array, got {type(params).__name__}")
    missing = [name for name in expected if name not in params]
    extra = [name for name in params if name not in expected]
    if missing or extra:
        raise ValueError(
            f"params do not fit the config: missing {_shorten(missing)}, unexpected "
            f"{_shorten(extra)}"
        )
    given = {}
    for name, shape in expected.items():
        array = params[name]
        if tuple(getattr(array, "shape", ())) != shape:
            got = getattr(array, "shape", type(array).__name__)
            got = tuple(got) if not isinstance(got, str) else got
            raise ValueError(f"params[{name!r}] has shape {got}, expected {shape}")
        xp = get_array_module(array)
        given[name] = xp.ascontiguousarray(array, dtype=dtype)  # (a copy only if needed)
    return given


class GPT:
    """A GPT-2 style language model with a hand-written backward pass.

        model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
        logits, loss = model.forward(idx, targets)   # idx, targets: integer (B, T)
        grads = model.backward()                     # dict like model.params

        hidden = model.features(idx)                 # (B, T, C), the states after ln_f
        grads = model.backward_features(dhidden)     # for a loss of your own on them

    ``GPT(config, params=arrays)`` takes given parameters (a checkpoint's, a Hugging Face
    directory's) instead of drawing the random initialisation; ``seed`` then seeds only dropout.
    """

    def __init__(self, config: GPTConfig, seed: int = 0, dtype=np.float32, params=None):
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
        else:
            self.params = self._given_params(params)
        self._pe = None
        if config.positions == "sinusoidal":
            self._pe = layers.sinusoidal_positions(config.block_size, config.n_embd, self.dtype)
        self._caches = None
        self.use_kernel = True  # on the GPU, attention runs in the fused kernel (tinylm/cuda.py)
        if get_backend() == "cupy":  # tinylm.set_backend("cupy"): new models live on the GPU
            self.to("gpu")

    def _given_params(self, params) -> dict:
        """``params`` checked against ``param_shapes(config)`` and cast to the model's dtype.

        The random initialisation is skipped: for GPT-2 small it would cost seconds and a GB of
        float64 only to be thrown away (see checked_params).
        """
        return checked_params(params, param_shapes(self.config), self.dtype)

    # -- bookkeeping ----------------------------------------------------------------------

    @property
    def xp(self):
        return xp_for("cupy" if self.device == "gpu" else "numpy")

    def num_params(self) -> int:
        """The number of trainable scalars (the tied output layer counts once)."""
        return int(sum(a.size for a in self.params.values()))

    def to(self, device: str) -> GPT:
        """Move the parameters to "cpu" (NumPy) or "gpu" (CuPy), in place; returns self."""
        name = backend_name(device)
        for k in self.params:
            self.params[k] = to_backend(self.params[k], name)
        if self._pe is not None:
            self._pe = to_backend(self._pe, name)
        self.device = "gpu" if name == "cupy" else "cpu"
        self._caches = None
        return self

    def train(self) -> GPT:
        self.training = True
        return self

    def eval(self) -> GPT:
        self.training = False
        return self

    # -- Hugging Face directories (tinylm/hf/gpt2.py knows their files) ----------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None) -> GPT:
        """The GPT-2 of a Hugging Face directory (config.json + model.safetensors), float32
        unless dtype says float64. Its tokenizer: ``tinylm.hf.gpt2.load_gpt2(path)`` returns
        (model, tokenizer), or ``BPETokenizer.from_pretrained(path)``."""
        from tinylm.hf.gpt2 import load_gpt2

        model, _ = load_gpt2(path, dtype)
        return model

    def save_pretrained(self, path, tokenizer=None):
        """Write this model (and a BPETokenizer) as a Hugging Face GPT-2 directory that
        ``transformers.GPT2LMHeadModel.from_pretrained(path)`` loads; returns the path."""
        from tinylm.hf.gpt2 import save_gpt2

        return save_gpt2(self, path, tokenizer)

    def _check_idx(self, idx, name="idx"):
        if not hasattr(idx, "dtype") or idx.dtype.kind not in "iu":
            got = getattr(idx, "dtype", type(idx).__name__)
            raise TypeError(f"{name} must be an integer array of token ids, got {got}")
        if idx.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T), got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"{name}: sequence length {idx.shape[1]} is longer than "
                f"block_size={self.config.block_size}"
            )
        if idx.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one token per sequence, got T = 0")

    # -- forward ----------------------------------------------------------------------------

    def _dropout(self, x, caches, key):
        p = self.config.dropout if self.training else 0.0
        out, cache = layers.dropout_forward(x, p, self.dropout_rng)
        if caches is not None:
            caches[key] = cache
        return out

    def _embed(self, idx, pos0, caches):
        """x = s * wte[idx] + position(pos0 .. pos0+T-1)   (B, T, C), s = embedding_scale."""
        xp = get_array_module(self.params["wte.weight"])
        T = idx.shape[1]
        x, cache = layers.embedding_forward(idx, self.params["wte.weight"])  # (B, T, C)
        if caches is not None:
            caches["wte"] = cache
        if self.config.embedding_scale != 1.0:  # sinusoidal positions: tokens times sqrt(C)
            x = x * self.config.embedding_scale
        pos = xp.arange(pos0, pos0 + T)  # (T,)
        if self.config.positions == "learned":
            x_pos, cache = layers.embedding_forward(pos, self.params["wpe.weight"])  # (T, C)
            if caches is not None:
                caches["wpe"] = cache
        else:
            x_pos = self._pe[pos0 : pos0 + T]  # (T, C), fixed
        return self._dropout(x + x_pos, caches, "drop_emb")  # (B, T, C) + (T, C) broadcasts

    def _block(self, x, i, caches, kv_cache=None):
        """One transformer block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)).

        kv_cache, when given, is a dict holding this layer's keys and values of the tokens
        seen so far (generation); the new keys and values are appended to it.
        """
        P, h, cfg = self.params, f"h.{i}.", self.config
        c = {} if caches is not None else None
        B, T, C = x.shape
        H, D = cfg.n_head, cfg.head_size
        eps = cfg.layer_norm_epsilon

        def ln(x, name):
            out, cache = layers.layernorm_forward(
                x, P[h + name + ".weight"], self._bias(h + name + ".bias", C), eps
            )
            if c is not None:
                c[name] = cache
            return out

        def linear(x, name):
            W, b = P[h + name + ".weight"], P.get(h + name + ".bias")  # b is None without biases
            out, cache = layers.linear_forward(x, W, b)
            if c is not None:
                c[name] = cache
            return out

        # --- attention branch ---
        qkv = linear(ln(x, "ln_1"), "attn.c_attn")  # (B, T, 3C)
        # split into q, k, v and then into heads: (B, T, 3, H, D) -> 3 x (B, H, T, D)
        q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)
        if kv_cache is not None:
            k, v = self._extend_kv_cache(kv_cache, k, v)  # (B, H, T_past + T, D)
        attention_forward, _ = self._attention_pair()
        # A single query (T = 1, each step of cached generation) comes after every key it
        # is given, so the causal mask would allow them all: it is skipped, not built.
        a, cache = attention_forward(q, k, v, causal=T > 1)  # (B, H, T, D)
        if c is not None:
            c["attn"] = cache
        a = a.transpose(0, 2, 1, 3).reshape(B, T, C)  # merge heads: (B, T, H, D) -> (B, T, C)
        x = x + self._dropout(linear(a, "attn.c_proj"), c, "drop_attn")

        # --- MLP branch ---
        f = linear(ln(x, "ln_2"), "mlp.c_fc")  # (B, T, 4C)
        g, cache = layers.gelu_forward(f)
        if c is not None:
            c["gelu"] = cache
        x = x + self._dropout(linear(g, "mlp.c_proj"), c, "drop_mlp")  # (B, T, C)

        if caches is not None:
            caches[i] = c
        return x

    def _extend_kv_cache(self, kv_cache, k, v):
        """Append this step's keys and values (B, H, T, D) to a layer's cache; return all of them.

        The cache holds one (B, H, block_size, D) buffer for keys and one for values, made on
        the first call and filled from the left. A new token then costs a copy of its own key
        and value; growing an array by concatenation would copy the whole past at every token.
        kv_cache["k"] and kv_cache["v"] are views of the filled part, (B, H, T_past + T, D).
        (On the GPU the fused kernel copies such a view to a contiguous array, so there the
        buffer saves the regrowing, not the copy.)
        """
        xp = get_array_module(k)
        B, H, T, D = k.shape
        if "k_buffer" not in kv_cache:
            shape = (B, H, self.config.block_size, D)
            kv_cache["k_buffer"] = xp.empty(shape, dtype=k.dtype)
            kv_cache["v_buffer"] = xp.empty(shape, dtype=v.dtype)
            kv_cache["length"] = 0
        start = kv_cache["length"]
        end = start + T
        if end > self.config.block_size:
            raise ValueError(
                f"the key/value cache holds at most block_size={self.config.block_size} "
                f"positions; {start} are cached and {T} more were given"
            )
        kv_cache["k_buffer"][:, :, start:end] = k
        kv_cache["v_buffer"][:, :, start:end] = v
        kv_cache["length"] = end
        kv_cache["k"] = kv_cache["k_buffer"][:, :, :end]  # (B, H, end, D), a view
        kv_cache["v"] = kv_cache["v_buffer"][:, :, :end]
        return kv_cache["k"], kv_cache["v"]

    def _attention_pair(self):
        """The attention forward/backward to call: layers.py's on the CPU; on the GPU the fused
        CUDA kernel of tinylm/cuda.py (same signatures), unless use_kernel is False."""
        if self.device == "gpu" and self.use_kernel:
            from tinylm import cuda

            return cuda.attention_forward, cuda.attention_backward
        return layers.attention_forward, layers.attention_backward

    def _bias(self, name, C):
        """A LayerNorm bias, or zeros when the model has none (bias=False)."""
        if name in self.params:
            return self.params[name]
        xp = get_array_module(self.params["wte.weight"])
        return xp.zeros(C, dtype=self.dtype)

    def _hidden(self, idx, caches, kv_caches=None, pos0=0, spent=None):
        """The residual stream after the last block (B, T, C): embeddings, then n_layer blocks.

        The one loop over the blocks, shared by training (caches kept for backward) and
        generation (kv_caches, one dict per layer, and pos0, the position of idx's first token).
        spent, when given, is the previous forward's caches: each of its layers is let go as
        soon as the new one is made (see features).
        """
        x = self._embed(idx, pos0, caches)
        for i in range(self.config.n_layer):
            x = self._block(x, i, caches, kv_caches[i] if kv_caches is not None else None)
            if spent is not None:
                spent.pop(i, None)
        return x

    def _final_norm(self, x, caches):
        """features = ln_f(x)   (B, T, C), the states the output layer reads."""
        P, C = self.params, self.config.n_embd
        xf, cache = layers.layernorm_forward(
            x, P["ln_f.weight"], self._bias("ln_f.bias", C), self.config.layer_norm_epsilon
        )
        if caches is not None:
            caches["ln_f"] = cache
        return xf

    def _head(self, xf, caches):
        """logits = xf @ W_out^T with W_out = wte (tied) or lm_head, both (V, C)."""
        P = self.params
        W_out = P["wte.weight"] if self.config.tie_weights else P["lm_head.weight"]  # (V, C)
        logits, cache = layers.linear_forward(xf, W_out.T)  # (B, T, C) @ (C, V) -> (B, T, V)
        if caches is not None:
            caches["lm_head"] = cache
        return logits

    def features(self, idx):
        """The final hidden states ln_f(x) of idx (B, T): (B, T, C), one vector per position.

        What the output layer reads, and what a head of your own (a classifier on the last real
        token, a mean for sentence embeddings) can read instead. The caches are kept, so
        ``backward_features(dfeatures)`` gives the parameter gradients of any loss of them.
        """
        self._check_idx(idx)
        # The last forward's block caches (B, T, ...) are let go one block at a time while the
        # new ones are made, so the memory each frees can hold the next block's arrays. Kept to
        # the end, a forward would hold two copies of every activation (peak memory at 6x6x384:
        # 977 MiB against 643, benchmarks/results/). The rest (embeddings, head, loss) goes now.
        spent = {i: c for i, c in (self._caches or {}).items() if isinstance(i, int)}
        self._caches = None
        caches = {}
        xf = self._final_norm(self._hidden(idx, caches, spent=spent), caches)
        self._caches = caches
        return xf

    def forward(self, idx, targets=None):
        """Run the model on idx (B, T); returns (logits (B, T, V), loss or None).

        logits = features(idx) @ W_out^T. The caches for backward() are kept; a later forward
        replaces them.
        """
        xf = self.features(idx)  # (B, T, C)
        caches = self._caches
        logits = self._head(xf, caches)  # (B, T, V)
        loss = None
        if targets is not None:
            loss, caches["loss"] = layers.cross_entropy_forward(logits, targets)
        return logits, loss

    # -- backward ---------------------------------------------------------------------------

    def backward(self):
        """The gradient of the last forward's mean loss for every parameter (dict like params)."""
        caches = self._caches
        if caches is None or "loss" not in caches:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        dlogits = layers.cross_entropy_backward(1.0, caches["loss"])  # (B, T, V)
        # forward was logits = xf @ W_out^T, so dxf = dlogits @ W_out and dW_out = dlogits^T xf
        dxf, dW_out_T, _ = layers.linear_backward(dlogits, caches["lm_head"])
        dW_out = dW_out_T.T  # (C, V) -> (V, C)
        grads = self._features_backward(dxf, caches)
        if self.config.tie_weights:
            grads["wte.weight"] = grads["wte.weight"] + dW_out  # wte is used twice: grads add
        else:
            grads["lm_head.weight"] = dW_out
        return grads

    def backward_features(self, dfeatures):
        """The parameter gradients of a loss of the last ``features(idx)`` (or forward), given
        dfeatures = dloss / dfeatures (B, T, C). A dict with every key of params: the output
        layer was not used, so wte gets only its embedding gradient and lm_head (untied) zeros.
        """
        caches = self._caches
        if caches is None:
            raise RuntimeError("backward_features() needs a features(idx) (or forward) first")
        expected = caches["ln_f"][0].shape  # the (B, T, C) that ln_f normalised
        if tuple(getattr(dfeatures, "shape", ())) != tuple(expected):
            got = getattr(dfeatures, "shape", type(dfeatures).__name__)
            raise ValueError(
                f"dfeatures must have the features' shape {tuple(expected)}, got {got}"
            )
        grads = self._features_backward(dfeatures.astype(self.dtype, copy=False), caches)
        if not self.config.tie_weights:
            grads["lm_head.weight"] = self.xp.zeros_like(self.params["lm_head.weight"])
        return grads

    def _features_backward(self, dxf, caches):
        """Backward from dfeatures (B, T, C) to every parameter but the output layer's use of
        its weights; returns a dict in the order of params (without lm_head.weight)."""
        cfg, P = self.config, self.params
        grads = {}
        dx, dg, db = layers.layernorm_backward(dxf, caches["ln_f"])
        grads["ln_f.weight"] = dg
        if "ln_f.bias" in P:
            grads["ln_f.bias"] = db

        for i in reversed(range(cfg.n_layer)):
            dx = self._block_backward(dx, i, caches[i], grads)

        dx = layers.dropout_backward(dx, caches["drop_emb"])  # (B, T, C)
        # x = s * wte[idx] + pos: the token path carries the factor s back (s = 1 by default)
        dx_tok = dx * cfg.embedding_scale if cfg.embedding_scale != 1.0 else dx
        grads["wte.weight"] = layers.embedding_backward(dx_tok, caches["wte"])
        if cfg.positions == "learned":
            # x_pos (T, C) was broadcast over the batch: its gradient sums over B.
            grads["wpe.weight"] = layers.embedding_backward(dx.sum(axis=0), caches["wpe"])
        return {k: grads[k] for k in P if k in grads}  # in the order of params

    def _block_backward(self, dx, i, c, grads):
        """Backward through one block; dx (B, T, C) is the gradient at the block's output.

        Forward:  x1 = x + attn(ln_1(x));  x2 = x1 + mlp(ln_2(x1))
        A residual x + f(x) passes its gradient both ways: dx = dout + (f's backward of dout).
        """
        cfg, h = self.config, f"h.{i}."
        B, T, C = dx.shape
        H, D = cfg.n_head, cfg.head_size
        xp = get_array_module(dx)

        def linear_back(dout, name):
            dinp, dW, db = layers.linear_backward(dout, c[name])
            grads[h + name + ".weight"] = dW
            if db is not None:
                grads[h + name + ".bias"] = db
            return dinp

        def ln_back(dout, name):
            dinp, dgamma, dbeta = layers.layernorm_backward(dout, c[name])
            grads[h + name + ".weight"] = dgamma
            if h + name + ".bias" in self.params:
                grads[h + name + ".bias"] = dbeta
            return dinp

        # --- MLP branch: x2 = x1 + c_proj(gelu(c_fc(ln_2(x1)))) ---
        dm = layers.dropout_backward(dx, c["drop_mlp"])
        dg = linear_back(dm, "mlp.c_proj")  # (B, T, 4C)
        df = layers.gelu_backward(dg, c["gelu"])
        dx = dx + ln_back(linear_back(df, "mlp.c_fc"), "ln_2")  # residual: both paths add

        # --- attention branch: x1 = x + c_proj(attention(split(c_attn(ln_1(x))))) ---
        dy = layers.dropout_backward(dx, c["drop_attn"])
        da = linear_back(dy, "attn.c_proj")  # (B, T, C)
        da = da.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # undo the head merge: (B, H, T, D)
        _, attention_backward = self._attention_pair()
        dq, dk, dv = attention_backward(da, c["attn"])
        # undo the split: 3 x (B, H, T, D) -> (B, T, 3, H, D) -> (B, T, 3C)
        dqkv = xp.empty((B, T, 3, H, D), dtype=dx.dtype)
        dqkv[:, :, 0] = dq.transpose(0, 2, 1, 3)
        dqkv[:, :, 1] = dk.transpose(0, 2, 1, 3)
        dqkv[:, :, 2] = dv.transpose(0, 2, 1, 3)
        dh = linear_back(dqkv.reshape(B, T, 3 * C), "attn.c_attn")
        return dx + ln_back(dh, "ln_1")

    # -- inference --------------------------------------------------------------------------

    def logits(self, idx):
        """The logits (B, T, V) of idx with dropout off, keeping nothing for backward.

        What evaluation needs: forward() keeps every layer's caches (for GPT-2 small and a
        1024-token window, attention probabilities alone are 12 x 50 MB per sequence); this
        keeps none, so only one layer's activations are alive at a time.
        """
        self._check_idx(idx)
        was_training, self.training = self.training, False
        try:
            return self._forward_inference(idx)
        finally:
            self.training = was_training

    # -- generation -------------------------------------------------------------------------

    def _forward_inference(self, idx, kv_caches=None, pos0=0, last_only=False):
        """Logits for the tokens idx (B, T_new) at positions pos0.., keeping nothing for backward.

        With kv_caches (one dict per layer), the keys and values of earlier tokens are reused
        and those of the new tokens appended. With last_only, only the last position's logits
        (B, 1, V) are computed: sampling needs no others, and the output layer (C x V, the
        largest matrix of GPT-2) then runs on one row instead of T_new.
        """
        x = self._hidden(idx, None, kv_caches, pos0)  # (B, T_new, C)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C); ln_f and the output layer act on each position alone
        return self._head(self._final_norm(x, None), None)

    def generate(
        self,
        idx,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        seed=None,
        rng=None,
        use_cache=True,
        stop_id=None,
    ):
        """Continue each sequence of idx (B, T) by max_new_tokens sampled tokens.

        temperature 0 is greedy (argmax); top_k keeps the k most likely tokens, top_p the
        smallest set whose probability reaches p (see tinylm/sample.py). The model always
        reads the last block_size tokens. With use_cache, each layer keeps the keys and values
        of the tokens it has read, so a new token costs one position's work (O(T)) instead of a
        forward over the whole window (O(T^2)). Once the text outgrows block_size the window
        slides; learned positions then shift under every cached key, so from then on each
        step reads the whole window afresh, as without the cache. Returns a NumPy int64 array
        (B, T + new), stopping early once every sequence has produced stop_id (those that
        produced it earlier go on sampling until then).
        """
        from tinylm.sample import check_sampling_args, sample_next

        idx = np.asarray(to_numpy(idx))
        if idx.ndim != 2:
            raise ValueError(f"idx must have shape (B, T), got shape {tuple(idx.shape)}")
        self._check_idx(idx[:, -self.config.block_size :])
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling_args(temperature, top_k, top_p)
        if rng is None:
            rng = np.random.default_rng(seed)
        was_training, self.training = self.training, False
        xp, block = self.xp, self.config.block_size
        out = idx.astype(np.int64)
        kv_caches = [{} for _ in range(self.config.n_layer)] if use_cache else None
        cached_len = 0  # how many tokens the key/value cache holds
        stopped = np.zeros(out.shape[0], dtype=bool)  # which sequences have produced stop_id
        try:
            for _ in range(int(max_new_tokens)):
                window_start = max(0, out.shape[1] - block)
                if kv_caches is not None and window_start == 0:
                    new = out[:, cached_len:]  # only the tokens the cache has not seen
                    logits = self._forward_inference(
                        xp.asarray(new), kv_caches, cached_len, last_only=True
                    )
                    cached_len += new.shape[1]
                else:
                    # No cache, or the window has slid: positions shifted under every cached
                    # key, so the whole window is read afresh (and no cache is kept).
                    logits = self._forward_inference(
                        xp.asarray(out[:, window_start:]), last_only=True
                    )
                last = to_numpy(logits[:, -1, :]).astype(np.float64)  # (B, V)
                next_ids = sample_next(last, temperature, top_k, top_p, rng)  # (B,)
                out = np.concatenate([out, next_ids[:, None]], axis=1)
                if stop_id is not None:
                    stopped |= next_ids == stop_id
                    if stopped.all():
                        break
        finally:
            self.training = was_training
        return out
