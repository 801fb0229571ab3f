"""``pipeline(task, model=PATH)``: a model and its tokenizer behind one call, as in Hugging Face.

    generator = pipeline("text-generation", model="gpt2")        # a Hugging Face GPT-2 directory
    generator("The quick brown fox", max_length=30, num_return_sequences=5, seed=0)
    # -> [{"generated_text": "The quick brown fox ..."}, ... 5 of them]

    unmasker = pipeline("fill-mask", model="bert-dir")           # a BERT with its MLM head
    unmasker("Paris is the [MASK] of France.")
    # -> [{"score": 0.9, "token": 3007, "token_str": "capital", "sequence": "paris is the
    #      capital of france."}, ... top_k=5 of them]

    extractor = pipeline("feature-extraction", model="bert-dir")  # a BERT or a GPT-2
    extractor("some text")        # the last hidden states as nested lists (1, T, C)

    classifier = pipeline("text-classification", model="runs/finetuned")
    classifier("some text")       # [{"label": "prose", "score": 0.97}]; top_k=None: every label

The same call works on a tinylm run directory (``model="runs/first"``, read with
tinylm.checkpoint.load_checkpoint; a ``tinylm finetune`` run for text-classification), or on a
model already in memory (``pipeline("text-generation", model=gpt, tokenizer=tok)``).

What each task returns is what transformers' pipeline of the same name returns, so the two can be
compared line by line (tests/test_pipelines.py does, on the same directory):

    fill-mask            per [MASK]: the top_k tokens, each {"score", "token", "token_str",
                         "sequence"}; score = softmax of the MLM logits at that position.
                         One [MASK]: a list of dicts; several: one such list per [MASK] (and
                         "sequence" then keeps the special tokens, as transformers does).
    feature-extraction   the encoder's last hidden states, [CLS] and [SEP] included for BERT,
                         as nested lists (1, T, C) per text (return_tensors=True: a NumPy array).
    text-classification  softmax over the classifier's logits; the best {"label", "score"} per
                         text, or with top_k given (None = all) the top_k of them, best first.

Generation settings, and how they match transformers' ``pipeline("text-generation")``:

    max_length            prompt tokens + new tokens, as in transformers; default 50
    max_new_tokens        new tokens only; wins over max_length when both are given
    num_return_sequences  continuations of each prompt, drawn together as one batch
    do_sample             True (the default): draw from the distribution shaped by temperature,
                          top_k, top_p. False: greedy, the argmax at every step
    temperature, top_k, top_p   default 1.0, 50, 1.0 (transformers' GenerationConfig defaults)
    seed                  tinylm's addition: the same seed gives the same text

transformers takes do_sample and max_length from the checkpoint's generation settings; for the
hub's "gpt2" those are do_sample=True and max_length=50, so both libraries sample from the same
kind of distribution by default (the random draws themselves differ). tinylm always uses the
defaults above, whatever the directory says. Generation of a sequence stops at
"<|endoftext|>", which is left out of the text, as transformers does with its default
skip_special_tokens=True. The text is the prompt followed by the decoded new tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinylm.files import read_json_object
from tinylm.model import GPT
from tinylm.sample import check_sampling_args

TASKS = ("text-generation", "fill-mask", "feature-extraction", "text-classification")


def pipeline(task: str, model, tokenizer=None, dtype=None):
    """A callable that runs ``task`` with ``model``.

    model: a Hugging Face model directory, a tinylm run (or checkpoint) directory (for
    text-classification, a ``tinylm finetune`` run), or a model object, in which case
    ``tokenizer`` must be given too. dtype: float32 (default) or float64, for directories.
    """
    if task == "text-generation":
        gpt, tok = _load_gpt(model, tokenizer, dtype)
        return TextGenerationPipeline(gpt, tok)
    if task == "fill-mask":
        bert, tok, _ = _load_bert(model, tokenizer, dtype, task)
        return FillMaskPipeline(bert, tok)
    if task == "feature-extraction":
        if isinstance(model, (str, Path)) and _model_type(Path(model)) == "gpt2":
            gpt, tok = _load_gpt(model, tokenizer, dtype)
            return FeatureExtractionPipeline(gpt, tok)
        if isinstance(model, GPT):
            gpt, tok = _load_gpt(model, tokenizer, dtype)
            return FeatureExtractionPipeline(gpt, tok)
        bert, tok, _ = _load_bert(model, tokenizer, dtype, task)
        return FeatureExtractionPipeline(bert, tok)
    if task == "text-classification":
        if isinstance(model, (str, Path)):
            from tinylm.finetuning import load_gpt_classifier, model_directory

            path = model_directory(Path(model))
            if _model_type(path) == "gpt2":
                gpt, tok, labels = load_gpt_classifier(path, dtype or np.float32)
                return TextClassificationPipeline(gpt, tokenizer or tok, labels)
        bert, tok, labels = _load_bert(model, tokenizer, dtype, task)
        return TextClassificationPipeline(bert, tok, labels)
    raise ValueError(f"unknown task {task!r}; tinylm's pipeline has {', '.join(TASKS)}")


def _load_gpt(model, tokenizer, dtype):
    """(GPT, tokenizer) from a directory or from the objects themselves."""
    if isinstance(model, GPT):
        if tokenizer is None:
            raise ValueError("pipeline(model=<a GPT object>) needs tokenizer= too")
        return model, tokenizer
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a directory path or a GPT, got {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if _is_hugging_face_directory(path):
        from tinylm.hf.gpt2 import load_gpt2

        gpt, found = load_gpt2(path, dtype)
        tokenizer = tokenizer if tokenizer is not None else found
        if tokenizer is None:
            raise ValueError(
                f"{str(path)!r} has no tokenizer files (vocab.json, merges.txt); pass tokenizer="
            )
        return gpt, tokenizer
    from tinylm.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    gpt = ckpt.build_model()
    if dtype is not None and np.dtype(dtype) != gpt.dtype:
        gpt.params = {name: a.astype(dtype) for name, a in gpt.params.items()}
        gpt.dtype = np.dtype(dtype)
    return gpt, tokenizer if tokenizer is not None else ckpt.tokenizer


def _load_bert(model, tokenizer, dtype, task):
    """(Bert, WordPieceTokenizer, class names or None) from a directory or from the objects.

    A directory may be a Hugging Face BERT directory, a ``tinylm finetune`` run (its model/
    folder is one) or a tinylm pretraining run (read with tinylm.checkpoint.load_checkpoint).
    """
    from tinylm.bert import Bert

    if isinstance(model, Bert):
        if tokenizer is None:
            raise ValueError("pipeline(model=<a Bert object>) needs tokenizer= too")
        return model, tokenizer, None
    if not isinstance(model, (str, Path)):
        raise TypeError(
            f"model must be a directory path or a Bert, got {type(model).__name__}"
        )
    from tinylm.finetuning import model_directory

    path = model_directory(Path(model))
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    labels = None
    model_type = _model_type(path)
    if model_type is not None:
        if model_type != "bert":
            raise ValueError(
                f"pipeline({task!r}): {str(path)!r} holds a {model_type!r} model; tinylm runs "
                f"{task} with a BERT ('bert' directories)"
            )
        from tinylm.hf.bert import load_bert, read_labels

        bert, found = load_bert(path, dtype)
        if bert.config.num_labels:
            labels = read_labels(path)
    else:
        from tinylm.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        bert, found = ckpt.build_model(), ckpt.tokenizer
        if not isinstance(bert, Bert):
            raise ValueError(
                f"pipeline({task!r}): the run {str(path)!r} holds a {type(bert).__name__}; "
                f"{task} needs a BERT (a tinylm pretrain run or a BERT directory)"
            )
        if dtype is not None and np.dtype(dtype) != bert.dtype:
            bert.params = {name: a.astype(dtype) for name, a in bert.params.items()}
            bert.dtype = np.dtype(dtype)
    tokenizer = tokenizer if tokenizer is not None else found
    if tokenizer is None:
        raise ValueError(f"{str(path)!r} has no tokenizer file (vocab.txt); pass tokenizer=")
    return bert, tokenizer, labels


def _model_type(path: Path):
    """The model_type of a Hugging Face directory's config.json; None for anything else (a
    tinylm checkpoint's config.json names its model_type too, but also its "format")."""
    config = path / "config.json"
    if not config.is_file():
        return None
    hf = read_json_object(config, "model config")
    return None if "format" in hf else hf.get("model_type")


def _is_hugging_face_directory(path: Path) -> bool:
    """A Hugging Face directory's config.json names a model_type; a tinylm checkpoint's does not."""
    return _model_type(path) is not None


class TextGenerationPipeline:
    """Continue prompts with a GPT; ``__call__`` takes transformers' arguments (module docstring).

    Attributes: model (tinylm.GPT, in eval mode while generating) and tokenizer.
    """

    def __init__(self, model: GPT, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def __call__(
        self,
        text_inputs,
        max_length=None,
        max_new_tokens=None,
        num_return_sequences=1,
        do_sample=True,
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        seed=None,
        return_full_text=True,
    ):
        """Returns [{"generated_text": ...}] * num_return_sequences for a prompt (str), or one
        such list per prompt for a list of prompts. Arguments as in the module docstring."""
        if isinstance(text_inputs, (list, tuple)):
            rng = np.random.default_rng(seed)  # one stream through all prompts
            return [
                self._generate(t, max_length, max_new_tokens, num_return_sequences, do_sample,
                               temperature, top_k, top_p, rng, return_full_text)
                for t in text_inputs
            ]  # fmt: skip
        return self._generate(
            text_inputs, max_length, max_new_tokens, num_return_sequences, do_sample,
            temperature, top_k, top_p, np.random.default_rng(seed), return_full_text,
        )  # fmt: skip

    def _generate(self, prompt, max_length, max_new_tokens, num_return_sequences, do_sample,
                  temperature, top_k, top_p, rng, return_full_text):  # fmt: skip
        if not isinstance(prompt, str):
            raise TypeError(f"the prompt must be a string, got {type(prompt).__name__}")
        _check_count("num_return_sequences", num_return_sequences, minimum=1)
        if not do_sample and num_return_sequences > 1:
            raise ValueError(
                "greedy decoding (do_sample=False) gives one continuation; "
                f"num_return_sequences={num_return_sequences} needs do_sample=True"
            )
        if do_sample:
            check_sampling_args(temperature, top_k, top_p)
            if temperature == 0:
                raise ValueError("temperature must be > 0 when sampling; do_sample=False is greedy")
        tok = self.tokenizer
        prompt_ids = tok.encode(prompt)
        # An empty prompt starts from "<|endoftext|>", the start of a document.
        context = prompt_ids if prompt_ids else [tok.eot_id]
        if max_new_tokens is not None:
            _check_count("max_new_tokens", max_new_tokens, minimum=0)
            new = max_new_tokens
        else:
            max_length = 50 if max_length is None else max_length
            _check_count("max_length", max_length, minimum=1)
            new = max(0, max_length - len(prompt_ids))  # max_length counts the prompt's tokens
        idx = np.tile(np.asarray(context, dtype=np.int64), (num_return_sequences, 1))  # (N, T)
        out = self.model.generate(
            idx,
            new,
            temperature=temperature if do_sample else 0.0,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample and top_p < 1.0 else None,
            rng=rng,
            stop_id=tok.eot_id,
        )
        results = []
        for row in out[:, idx.shape[1] :].tolist():
            if tok.eot_id in row:
                row = row[: row.index(tok.eot_id)]  # the sequence ended there
            text = tok.decode(row)
            results.append({"generated_text": prompt + text if return_full_text else text})
        return results

    def __repr__(self):
        return f"TextGenerationPipeline(model={self.model.config}, tokenizer={self.tokenizer!r})"


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# The encoder's pipelines: fill-mask, feature-extraction, text-classification


def _texts(inputs, what="text"):
    """(list of inputs, whether one was given rather than a list)."""
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError(f"the {what}s must be a non-empty list")
        return list(inputs), False
    return [inputs], True


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"each input must be a string, got {type(text).__name__}")
    return text


def _softmax(z):
    """softmax over the last axis, in float64: exp(z - max) / sum exp(z - max)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _to_numpy(a):
    from tinylm.backend import to_numpy

    return to_numpy(a)


class FillMaskPipeline:
    """Predict the tokens hidden behind [MASK] with a BERT's MLM head (module docstring).

    Attributes: model (tinylm.Bert with mlm_head, set to eval mode) and tokenizer.
    """

    def __init__(self, model, tokenizer):
        if not model.config.mlm_head:
            raise ValueError(
                "fill-mask needs a BERT with its MLM head (cls.predictions.*: a BertForMaskedLM "
                "or BertForPreTraining directory); this model has none"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer

    def __call__(self, inputs, top_k=5):
        """[{"score", "token", "token_str", "sequence"}] * top_k for a text with one [MASK];
        a list of such lists for several masks; a list of results for a list of texts."""
        _check_count("top_k", top_k, minimum=1)
        texts, single = _texts(inputs)
        results = [self._fill(_check_text(t), top_k) for t in texts]
        return results[0] if single else results

    def _fill(self, text, top_k):
        tok = self.tokenizer
        enc = tok.encode(text)
        ids = np.array([enc["input_ids"]], dtype=np.int64)  # (1, T)
        positions = np.flatnonzero(ids[0] == tok.mask_id)
        if positions.size == 0:
            raise ValueError(
                f"fill-mask: the text holds no {tok.mask_token} token to fill: {text!r}"
            )
        types = np.array([enc["token_type_ids"]], dtype=np.int64)
        mlm_logits, _, _ = self.model.forward(ids, types)  # (1, T, V)
        probs = _softmax(_to_numpy(mlm_logits)[0, positions])  # (M, V), one row per [MASK]
        k = min(top_k, probs.shape[1])
        single = positions.size == 1
        out = []
        for row, position in zip(probs, positions, strict=True):
            best = np.argsort(-row, kind="stable")[:k]
            records = []
            for token in best.tolist():
                filled = ids[0].copy()
                filled[position] = token
                records.append({
                    "score": float(row[token]),
                    "token": int(token),
                    "token_str": tok.decode([token]),
                    # transformers keeps the special tokens (the other masks) when there are
                    # several masks, and drops them for one
                    "sequence": tok.decode(filled.tolist(), skip_special_tokens=single),
                })
            out.append(records)
        return out[0] if single else out

    def __repr__(self):
        return f"FillMaskPipeline(model={self.model.config}, tokenizer={self.tokenizer!r})"


class FeatureExtractionPipeline:
    """The last hidden states of a BERT (or a GPT, after its final LayerNorm), per text.

    Attributes: model (tinylm.Bert or tinylm.GPT, set to eval mode) and tokenizer.
    """

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer

    def __call__(self, inputs, return_tensors=False):
        """Nested lists (1, T, C) for a text (a NumPy array with return_tensors=True); a list of
        them for a list of texts. Each text runs alone, so T is its own length."""
        texts, single = _texts(inputs)
        results = [self._extract(_check_text(t), return_tensors) for t in texts]
        return results[0] if single else results

    def _extract(self, text, return_tensors):
        if isinstance(self.model, GPT):
            ids = self.tokenizer.encode(text)
            if not ids:
                raise ValueError("feature-extraction: the text has no tokens")
            hidden = self.model.features(np.array([ids], dtype=np.int64))  # (1, T, C)
        else:
            enc = self.tokenizer.encode(text)
            hidden = self.model.features(
                np.array([enc["input_ids"]], dtype=np.int64),
                np.array([enc["token_type_ids"]], dtype=np.int64),
            )  # (1, T, C)
        hidden = _to_numpy(hidden)
        return hidden if return_tensors else hidden.tolist()

    def __repr__(self):
        return (f"FeatureExtractionPipeline(model={self.model.config}, "
                f"tokenizer={self.tokenizer!r})")


class TextClassificationPipeline:
    """Classify texts (or text pairs) with a BERT's classifier head; softmax over its logits.

    Attributes: model (tinylm.Bert with num_labels >= 2, set to eval mode), tokenizer, labels
    (the class names in id order; LABEL_0, LABEL_1, ... when none are given).
    """

    def __init__(self, model, tokenizer, labels=None):
        from tinylm.finetuning import GPTClassifier
        from tinylm.hf.bert import check_labels

        if isinstance(model, GPTClassifier):  # GPT-2 with a head on its last real token
            self.model, self.tokenizer = model.eval(), tokenizer
            self.labels = check_labels(labels, model.num_labels)
            return
        if not model.config.num_labels:
            raise ValueError(
                "text-classification needs a BERT with a classifier (classifier.*: a "
                "BertForSequenceClassification directory or a tinylm finetune run); this model "
                "has none"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = check_labels(labels, model.config.num_labels)

    def probabilities(self, texts, text_pairs=None, batch_size=32, max_length=None):
        """softmax(logits) (N, K) for a list of texts (and of second texts), in float64.

        Batches of batch_size, right-padded with an attention mask (padding changes nothing).
        max_length: truncate longer inputs (None: the model's max_position_embeddings, and a
        longer text is an error as in transformers).
        """
        _check_count("batch_size", batch_size, minimum=1)
        texts = [_check_text(t) for t in texts]
        pairs = None if text_pairs is None else [_check_text(t) for t in text_pairs]
        from tinylm.finetuning import GPTClassifier, gpt_batch, model_max_length

        out = []
        for i in range(0, len(texts), batch_size):
            if isinstance(self.model, GPTClassifier):  # the last max_length tokens are kept
                idx, mask = gpt_batch(self.tokenizer, texts[i : i + batch_size],
                                      None if pairs is None else pairs[i : i + batch_size],
                                      max_length or self.model.gpt.config.block_size)
                logits, _ = self.model.classify(idx, None, mask)
                out.append(_softmax(_to_numpy(logits)))
                continue
            enc = self.tokenizer.encode_batch(
                texts[i : i + batch_size],
                None if pairs is None else pairs[i : i + batch_size],
                max_length=max_length, truncation=max_length is not None,
            )
            longest = enc["input_ids"].shape[1]
            limit = model_max_length(self.model, longest)
            if max_length is None and longest > limit:
                raise ValueError(
                    f"an input of {longest} tokens is longer than the {limit} the model reads; "
                    "pass truncation=True to the classifier (or max_length= to probabilities) "
                    "to cut it, as in transformers"
                )
            logits, _ = self.model.classify(
                enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]
            )  # (B, K)
            out.append(_softmax(_to_numpy(logits)))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))

    def __call__(self, inputs, top_k="", truncation=False):
        """For a text (or {"text": a, "text_pair": b}): [{"label", "score"}] with the best
        class; with top_k (an integer, or None for every class) the top_k records, best first.
        For a list of inputs: one result per input (one record each without top_k).
        truncation=True cuts an input longer than the model reads (as transformers' does)."""
        if top_k != "" and top_k is not None:
            _check_count("top_k", top_k, minimum=1)
        items, single = _texts(inputs, "input")
        texts, pairs = [], []
        for item in items:
            if isinstance(item, dict):
                if set(item) != {"text", "text_pair"}:
                    raise ValueError(
                        "a text pair must be a dict with the keys 'text' and 'text_pair', got "
                        f"keys {sorted(item)}"
                    )
                texts.append(item["text"])
                pairs.append(item["text_pair"])
            else:
                texts.append(item)
                pairs.append(None)
        from tinylm.finetuning import model_max_length

        max_length = model_max_length(self.model, 1 << 30) if truncation else None
        probs = np.concatenate([
            self.probabilities([t], None if p is None else [p], max_length=max_length)
            for t, p in zip(texts, pairs, strict=True)
        ])  # each input alone, as transformers runs them
        results = []
        for item, row in zip(items, probs, strict=True):
            order = np.argsort(-row, kind="stable")
            records = [{"label": self.labels[j], "score": float(row[j])} for j in order]
            if top_k == "":
                # transformers: the best record, in a list for a text, alone for a pair or
                # for each element of a list
                results.append(records[0] if isinstance(item, dict) or not single
                               else [records[0]])
            else:
                results.append(records if top_k is None else records[:top_k])
        return results[0] if single else results

    def __repr__(self):
        return (f"TextClassificationPipeline(model={self.model.config}, labels={self.labels}, "
                f"tokenizer={self.tokenizer!r})")
