"""A text classification task built from text that ships with every Python, so it runs offline.

    examples, unlabeled = reference_or_docstring(n_per_class=1000, seed=0)
    examples.texts[0], examples.labels[0]     # an English sentence, "reference" or "docstring"

The task: is this English sentence from Python's reference documentation (``pydoc_data.topics``,
the "pydoc" corpus, label "reference") or from a docstring in the standard library's source (the
"stdlib" corpus, label "docstring")? Both sides are English prose about Python, so the model must
read style and content: the reference describes the language ("The target list is assigned
..."), docstrings describe one function's behaviour ("Return the number of ...").

What makes it fair, so that no single character or the length gives the answer away:

- One cleaning for both sides. Markup is removed, as each source marks code differently (the
  reference puts names in "double quotes" and *stars*, docstrings in 'single quotes' or
  `backticks`): curly quotes become straight ones, then every ``"``, backtick and ``*`` is
  deleted, and so is a ``'`` that is not inside a word (don't and Python's keep theirs).
  Whitespace is collapsed; a sentence is kept only if it starts with a
  capital letter, ends with ".", has 6 to 40 words, and uses only letters, digits, spaces and
  the punctuation ``, ; : ' ( ) -`` (so no code: no ``=``, ``_``, ``>>>``, backticks or
  brackets on either side). Duplicates are dropped.
- Lengths are matched: the sentences are drawn per word count, as many of each class as the
  rarer class has at that count, so the length alone is at chance.
- ``single_character_accuracy`` measures the best rule "class A if the sentence contains
  character c": the benchmark reports it next to the models' accuracies.

``unlabeled`` holds the cleaned sentences of both sources that were not drawn as examples: text
for pretraining a BERT on the same domain.

``compare_three_ways`` runs the comparison of benchmarks/finetune.py and notebook 12: a small
BERT pretrained here with the masked-LM objective (``pretrain_mlm``) on the unlabeled sentences
and the training split's texts (never the test split's), then on the test split

    scratch       the same architecture, randomly initialised, trained on the labels only
    linear probe  logistic regression on the pretrained encoder's frozen sentence features
    fine-tuned    every parameter of the pretrained encoder, plus a new classifier, trained

and, with gpt=True, the other family on the same task: a GPT of the same width and depth
pretrained as long on the same text by next-token prediction (``pretrain_gpt``, byte-level
BPE of the same vocabulary size), fine-tuned with a head on its last real token, and the same
GPT from scratch.
"""

from __future__ import annotations

import ast
import math
import re
import time
import warnings
from collections import defaultdict

import numpy as np

from tinylm.bert import Bert, BertConfig
from tinylm.finetuning import (
    Examples,
    evaluate,
    fit_logistic_regression,
    sentence_features,
    split_indices,
    train_classifier,
    with_classifier,
)
from tinylm.mlm import mask_tokens, split_sentences
from tinylm.optim import AdamW, clip_grad_norm, lr_schedule

LABELS = ("docstring", "reference")
_CURLY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,;:'()\-.]+$")


def remove_markup(text: str) -> str:
    """Quotes, backticks and stars removed the same way on both sides (module docstring)."""
    text = text.translate(_CURLY)
    text = re.sub(r'[`"*]', "", text)
    return re.sub(r"(?<![A-Za-z])'|'(?![A-Za-z])", "", text)


def clean_sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The sentences of a text that pass the task's cleaning (module docstring), in order."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in split_sentences(remove_markup(paragraph)):
            n_words = len(sentence.split())
            if not min_words <= n_words <= max_words:
                continue
            if not sentence[0].isupper() or not sentence.endswith(".") or sentence.endswith(".."):
                continue
            if _ALLOWED.match(sentence):
                out.append(sentence)
    return out


def reference_sentences() -> list[str]:
    """The cleaned sentences of the "pydoc" corpus (Python's reference documentation)."""
    from tinylm.data import load_corpus

    return _unique(clean_sentences(load_corpus("pydoc", max_bytes=None)))


def docstring_sentences(max_files: int = 250) -> list[str]:
    """The cleaned sentences of the docstrings (module, class, function) of the first max_files
    files of the "stdlib" corpus (in its sorted order, so the same on every machine with the same
    Python)."""
    from tinylm.data import stdlib_files

    sentences = []
    for path in stdlib_files()[:max_files]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old files
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    sentences += clean_sentences(doc)
    return _unique(sentences)


def _unique(sentences):
    seen, out = set(), []
    for s in sentences:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def reference_or_docstring(n_per_class: int = 1000, seed: int = 0, max_files: int = 250):
    """(Examples, unlabeled sentences) of the task: n_per_class length-matched sentences of each
    class (fewer when the sources run out), shuffled with seed; and every other cleaned sentence
    of both sources, shuffled, for pretraining. max_files: stdlib files read for docstrings."""
    rng = np.random.default_rng(seed)
    sources = {"reference": reference_sentences(),
               "docstring": docstring_sentences(max_files)}
    by_length = {label: defaultdict(list) for label in sources}
    for label, sentences in sources.items():
        for s in rng.permutation(np.array(sentences, dtype=object)).tolist():
            by_length[label][len(s.split())].append(s)
    # Slots (n, j): the j-th sentence of n words of *each* class. Drawing slots, not sentences,
    # gives both classes exactly the same word counts: the length is at chance.
    slots = [(n, j) for n in sorted(set(by_length["reference"]) & set(by_length["docstring"]))
             for j in range(min(len(by_length["reference"][n]), len(by_length["docstring"][n])))]
    k = min(n_per_class, len(slots))
    picks = sorted(rng.choice(len(slots), size=k, replace=False).tolist())
    chosen = {label: [by_length[label][slots[i][0]][slots[i][1]] for i in picks]
              for label in sources}
    texts = chosen["reference"][:k] + chosen["docstring"][:k]
    labels = ["reference"] * k + ["docstring"] * k
    order = rng.permutation(len(texts))
    examples = Examples([texts[i] for i in order], [labels[i] for i in order])
    used = set(texts)
    unlabeled = [s for label in sources for s in sources[label] if s not in used]
    unlabeled = [unlabeled[i] for i in rng.permutation(len(unlabeled))]
    return examples, unlabeled


def single_character_accuracy(examples: Examples) -> tuple[float, str]:
    """The best accuracy of a rule "label A if the text contains character c, else label B",
    over every character c and both ways round; returns (accuracy, c). A fair task keeps this
    well below what a model reaches."""
    labels = sorted(set(examples.labels))
    if len(labels) != 2:
        raise ValueError(f"single_character_accuracy needs 2 classes, got {labels}")
    y = np.array([lab == labels[0] for lab in examples.labels])
    best = (0.0, "")
    for c in sorted(set("".join(examples.texts).lower())):
        has = np.array([c in t.lower() for t in examples.texts])
        accuracy = float(max((has == y).mean(), (has != y).mean()))
        if accuracy > best[0]:
            best = (accuracy, c)
    return best


# ----------------------------------------------------------------------------------------------
# Pretraining in-process, and the three ways compared


def pretrain_mlm(tokenizer, texts, config: BertConfig, steps: int, batch_size: int = 32,
                 max_length: int = 48, lr: float = 1e-3, seed: int = 0, max_seconds=None):
    """A BERT pretrained with the masked-LM objective on single sentences (no NSP): each step
    draws batch_size texts, masks them afresh (tinylm.mlm.mask_tokens: 15 %, 80/10/10), and
    takes an AdamW step; the rate warms up over the first 5 % and decays along a cosine.
    Stops after steps steps or max_seconds seconds. Returns (model, losses per step)."""
    model = Bert(config, seed=seed)
    opt = AdamW(model.params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    warmup = max(1, steps // 20)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        rows = rng.integers(0, len(texts), size=batch_size)
        enc = tokenizer.encode_batch([texts[i] for i in rows], max_length=max_length,
                                     truncation=True)
        inputs, labels = mask_tokens(enc["input_ids"], rng, tokenizer.vocab_size,
                                     tokenizer.mask_id, tokenizer.special_ids,
                                     enc["attention_mask"])
        if not (labels != -100).any():
            continue  # nothing chosen in this batch (possible only for tiny batches)
        _, _, loss = model.forward(inputs, enc["token_type_ids"], enc["attention_mask"], labels)
        grads = model.backward()
        clip_grad_norm(grads, 1.0)
        opt.step(grads, lr=lr_schedule(step, lr, warmup, steps, lr / 10))
        losses.append(float(loss))
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    return model.eval(), losses


def bag_of_words(tokenizer, texts, max_length: int = 512) -> np.ndarray:
    """How often each vocabulary token occurs in each text (special tokens left out): (N, V)
    counts, the features of the classic linear text classifier, for comparison."""
    enc = tokenizer.encode_batch(list(texts), max_length=max_length, truncation=True)
    keep = (enc["attention_mask"] > 0) & ~np.isin(enc["input_ids"], tokenizer.special_ids)
    counts = np.zeros((len(texts), tokenizer.vocab_size))
    rows = np.nonzero(keep)[0]
    np.add.at(counts, (rows, enc["input_ids"][keep]), 1.0)
    return counts


def unigram_entropy(tokenizer, texts, max_length: int = 512) -> float:
    """The entropy (nats) of the token frequencies of texts: the MLM loss of a model that
    ignores the context and predicts every masked token from the frequencies alone."""
    counts = bag_of_words(tokenizer, texts, max_length).sum(0)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def pretrain_gpt(tokenizer, texts, config, steps: int, batch_size: int = 32, lr: float = 2e-3,
                 seed: int = 0):
    """A GPT pretrained by next-token prediction on texts (each followed by <|endoftext|>, all
    in one token stream): windows of config.block_size tokens drawn at random
    (tinylm.data.get_batch), AdamW, warmup over 5 % then a cosine. Returns (model, losses)."""
    from tinylm.data import get_batch
    from tinylm.model import GPT

    stream = []
    for text in texts:
        stream += tokenizer.encode(text) + [tokenizer.eot_id]
    data = np.array(stream, dtype=np.int64)
    model = GPT(config, seed=seed)
    opt = AdamW(model.params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    warmup = max(1, steps // 20)
    losses = []
    for step in range(steps):
        x, y = get_batch(data, config.block_size, batch_size, rng)
        _, loss = model.forward(x, y)
        grads = model.backward()
        clip_grad_norm(grads, 1.0)
        opt.step(grads, lr=lr_schedule(step, lr, warmup, steps, lr / 10))
        losses.append(float(loss))
    return model.eval(), losses


def compare_three_ways(examples: Examples, unlabeled: list[str], *, vocab_size=2000,
                       hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
                       max_length=48, pretrain_steps=600, pretrain_seconds=None,
                       pretrain_lr=2e-3, epochs=4,
                       batch_size=32, lr_scratch=1e-3, lr_finetune=5e-4, dropout=0.1,
                       test_fraction=0.2, seed=0, gpt=False):
    """The comparison of the module docstring. Returns (report, objects): report a JSON-able
    dict of accuracies on the test split (and the majority class, the best single-character
    rule, sizes, seconds, the fine-tuning histories); objects the tokenizer, the models, the
    splits and the test predictions, for a notebook to look at."""
    from tinylm.wordpiece import WordPieceTokenizer

    t_start = time.perf_counter()
    labels = sorted(set(examples.labels))
    label_ids = {name: i for i, name in enumerate(labels)}
    train_rows, test_rows = split_indices(len(examples), test_fraction, seed,
                                         examples.labels)
    train_all, test = examples.subset(train_rows), examples.subset(test_rows)
    fit_rows, val_rows = split_indices(len(train_all), 0.1, seed + 1,
                                       train_all.labels)  # val: for the curves only
    train, val = train_all.subset(fit_rows), train_all.subset(val_rows)
    y_train = np.array([label_ids[y] for y in train_all.labels])
    y_test = np.array([label_ids[y] for y in test.labels])
    majority = float(np.bincount(y_test, minlength=len(labels)).max() / len(y_test))
    char_accuracy, char = single_character_accuracy(test)

    corpus = unlabeled + train_all.texts  # never a test sentence
    t0 = time.perf_counter()
    tokenizer = WordPieceTokenizer.train("\n".join(corpus), vocab_size=vocab_size)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size,
                        num_hidden_layers=num_layers, num_attention_heads=num_heads,
                        intermediate_size=intermediate_size, max_position_embeddings=max_length,
                        hidden_dropout_prob=dropout, nsp_head=False)
    pretrained, mlm_losses = pretrain_mlm(tokenizer, corpus, config, pretrain_steps,
                                          batch_size=batch_size, max_length=max_length,
                                          lr=pretrain_lr, seed=seed,
                                          max_seconds=pretrain_seconds)
    t_pretrain = time.perf_counter() - t0

    def finetuned_from(start, lr):
        t = time.perf_counter()
        model = with_classifier(start, len(labels), seed=seed)
        history = train_classifier(model, tokenizer, train, val, labels, epochs=epochs,
                                   batch_size=batch_size, lr=lr, max_length=max_length,
                                   seed=seed, evals_per_epoch=1)
        _, accuracy, preds, _ = evaluate(model, tokenizer, test, label_ids, max_length)
        return model, history, accuracy, preds, time.perf_counter() - t

    random_init = Bert(config, seed=seed + 100).eval()
    scratch, scratch_history, scratch_acc, _, t_scratch = finetuned_from(random_init,
                                                                        lr_scratch)
    t0 = time.perf_counter()
    probe_acc = {}
    for name, encoder in (("pretrained", pretrained), ("random", random_init)):
        f_train = sentence_features(encoder, tokenizer, train_all.texts, max_length)
        f_test = sentence_features(encoder, tokenizer, test.texts, max_length)
        predict = fit_logistic_regression(f_train, y_train, len(labels))
        probe_acc[name] = float((predict(f_test) == y_test).mean())
    t_probe = time.perf_counter() - t0
    predict = fit_logistic_regression(bag_of_words(tokenizer, train_all.texts, max_length),
                                      y_train, len(labels), l2=1e-2)
    bow_acc = float((predict(bag_of_words(tokenizer, test.texts, max_length)) == y_test).mean())
    finetuned, ft_history, ft_acc, ft_preds, t_ft = finetuned_from(pretrained, lr_finetune)

    gpt_report, gpt_objects = {}, {}
    if gpt:
        gpt_report, gpt_objects = _gpt_arms(
            corpus, train, val, test, labels, vocab_size=vocab_size, hidden_size=hidden_size,
            num_layers=num_layers, num_heads=num_heads, max_length=max_length,
            steps=len(mlm_losses), batch_size=batch_size, lr=pretrain_lr, epochs=epochs,
            lr_scratch=lr_scratch, lr_finetune=lr_finetune, dropout=dropout, seed=seed)

    report = {
        "task": "reference_or_docstring",
        "labels": labels,
        "n_train": len(train), "n_val": len(val), "n_test": len(test),
        "accuracy": {
            "majority_class": majority,
            "best_single_character_rule": char_accuracy,
            "from_scratch": scratch_acc,
            "linear_probe_random_encoder": probe_acc["random"],
            "linear_probe_pretrained": probe_acc["pretrained"],
            "fine_tuned": ft_acc,
            "bag_of_words_logistic_regression": bow_acc,
        },
        "best_single_character": char,
        "model": {"vocab_size": tokenizer.vocab_size, "hidden_size": hidden_size,
                  "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
                  "intermediate_size": intermediate_size, "max_length": max_length,
                  "parameters": pretrained.num_params()},
        "pretraining": {"steps": len(mlm_losses), "batch_size": batch_size, "lr": pretrain_lr,
                        "mlm_loss_first_10": float(np.mean(mlm_losses[:10])),
                        "mlm_loss_last_10": float(np.mean(mlm_losses[-10:])),
                        "log_vocab_size": math.log(tokenizer.vocab_size),
                        "unigram_entropy": unigram_entropy(tokenizer, corpus, max_length),
                        "sentences": len(corpus), "seconds": round(t_pretrain, 1)},
        "fine_tuning": {"epochs": epochs, "batch_size": batch_size, "lr_scratch": lr_scratch,
                        "lr_finetune": lr_finetune, "dropout": dropout,
                        "seconds_scratch": round(t_scratch, 1),
                        "seconds_fine_tuned": round(t_ft, 1),
                        "seconds_linear_probes": round(t_probe, 1),
                        "history_scratch": scratch_history,
                        "history_fine_tuned": ft_history},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if gpt:
        report["accuracy"].update(gpt_report.pop("accuracy"))
        report["gpt"] = gpt_report
    objects = {"tokenizer": tokenizer, "pretrained": pretrained, "random_init": random_init,
               "scratch": scratch, "finetuned": finetuned, "train": train, "val": val,
               "test": test, "labels": labels, "mlm_losses": mlm_losses,
               "test_predictions": ft_preds, "test_truth": y_test, **gpt_objects}
    return report, objects


def _gpt_arms(corpus, train, val, test, labels, *, vocab_size, hidden_size, num_layers,
              num_heads, max_length, steps, batch_size, lr, epochs, lr_scratch, lr_finetune,
              dropout, seed):
    """The GPT family on the same task: pretrained by next-token prediction as many steps as
    the BERT, then fine-tuned; and from scratch. Returns (report, objects)."""
    from tinylm.finetuning import GPTClassifier
    from tinylm.model import GPT, GPTConfig
    from tinylm.tokenizer import BPETokenizer

    label_ids = {name: i for i, name in enumerate(labels)}
    t0 = time.perf_counter()
    bpe = BPETokenizer.train("\n".join(corpus), vocab_size=vocab_size)
    config = GPTConfig(vocab_size=bpe.vocab_size, block_size=max_length, n_layer=num_layers,
                       n_head=num_heads, n_embd=hidden_size, dropout=dropout)
    pretrained, losses = pretrain_gpt(bpe, corpus, config, steps, batch_size, lr, seed)
    t_pretrain = time.perf_counter() - t0
    results, seconds, models = {}, {}, {}
    for name, start, rate in (("gpt_from_scratch", GPT(config, seed=seed + 100), lr_scratch),
                              ("gpt_fine_tuned", pretrained, lr_finetune)):
        t = time.perf_counter()
        model = GPTClassifier(start, len(labels), seed=seed)
        train_classifier(model, bpe, train, val, labels, epochs=epochs, batch_size=batch_size,
                         lr=rate, max_length=max_length, seed=seed, evals_per_epoch=1)
        _, results[name], _, _ = evaluate(model, bpe, test, label_ids, max_length)
        seconds[name] = round(time.perf_counter() - t, 1)
        models[name] = model
    report = {
        "accuracy": results,
        "pretraining": {"steps": len(losses), "lr": lr, "vocab_size": bpe.vocab_size,
                        "next_token_loss_first_10": float(np.mean(losses[:10])),
                        "next_token_loss_last_10": float(np.mean(losses[-10:])),
                        "seconds": round(t_pretrain, 1)},
        "parameters": int(sum(a.size for a in pretrained.params.values())),
        "seconds": seconds,
    }
    return report, {"gpt_tokenizer": bpe, "gpt_pretrained": pretrained, **models}
