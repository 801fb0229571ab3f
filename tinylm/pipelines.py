"""``pipeline(task, model=PATH)``: a model and its tokenizer behind one call, as in Hugging Face.

    generator = pipeline("text-generation", model="gpt2")        # a Hugging Face GPT-2 directory
    generator("The quick brown fox", max_length=30, num_return_sequences=5, seed=0)
    # -> [{"generated_text": "The quick brown fox ..."}, ... 5 of them]

The same call works on a tinylm run directory (``model="runs/first"``, read with
tinylm.checkpoint.load_checkpoint), or on a model already in memory
(``pipeline("text-generation", model=gpt, tokenizer=tok)``).

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

TASKS = ("text-generation",)


def pipeline(task: str, model, tokenizer=None, dtype=None):
    """A callable that runs ``task`` with ``model``.

    model: a Hugging Face model directory, a tinylm run (or checkpoint) directory, or a model
    object, in which case ``tokenizer`` must be given too. dtype: float32 (default) or float64,
    for directories.
    """
    if task == "text-generation":
        gpt, tok = _load_gpt(model, tokenizer, dtype)
        return TextGenerationPipeline(gpt, tok)
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


def _is_hugging_face_directory(path: Path) -> bool:
    """A Hugging Face directory's config.json names a model_type; a tinylm checkpoint's does not."""
    config = path / "config.json"
    return config.is_file() and "model_type" in read_json_object(config, "model config")


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
