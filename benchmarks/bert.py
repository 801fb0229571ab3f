"""How fast is one BERT pretraining step (forward + backward) in tinylm, against PyTorch eager?

For each size, the same weights (tinylm's, copied into transformers' BertForPreTraining) and
the same padded batch of MLM + NSP labels run in both, float32, dropout off, on the same
threads (torch.set_num_threads(2)); the two are timed alternately, step after step, so a
neighbour's load on the shared machine falls on both, and each figure is a median. The ratio
tinylm / torch is measured in this one run. Also: fine-tuning examples/s, the classification
forward + backward (tinylm.Bert.classify) at each size.

Skipped (the script says so and writes nothing) without torch and transformers.

    python benchmarks/bert.py                        # both sizes, JSON to benchmarks/results/
    python benchmarks/bert.py --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import numpy as np
from report import machine_info, write_report  # benchmarks/report.py

from tinylm.backend import keep_freed_memory
from tinylm.bert import Bert, BertConfig

SIZES = {
    # name: (num_hidden_layers, num_attention_heads, hidden_size, seq_len, batch_size)
    "2x128 (BERT-tiny) T128 B16": (2, 2, 128, 128, 16),
    "4x256 (BERT-mini) T128 B16": (4, 4, 256, 128, 16),
}
VOCAB = 8192  # a WordPiece vocabulary of the size tinylm trains on its corpora
THREADS = 2


def make_batch(T, B, rng):
    """Token ids with [CLS]/[SEP], a quarter of the rows right-padded, 15% MLM labels."""
    idx = rng.integers(5, VOCAB, size=(B, T))
    lengths = np.where(np.arange(B) % 4 == 0, T * 3 // 4, T)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    idx[:, 0] = 2
    idx[mask == 0] = 0
    types = np.zeros((B, T), dtype=np.int64)
    types[:, T // 2:] = 1
    mlm = np.where((rng.random((B, T)) < 0.15) & (mask == 1), idx, -100)
    nsp = rng.integers(0, 2, size=B)
    labels = rng.integers(0, 2, size=B)
    return idx, types, mask, mlm, nsp, labels


def time_size(L, H, C, T, B, repeats):
    import torch
    import transformers

    config = BertConfig(vocab_size=VOCAB, hidden_size=C, num_hidden_layers=L,
                        num_attention_heads=H, intermediate_size=4 * C,
                        max_position_embeddings=T, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    model = Bert(config, seed=0, dtype=np.float32).eval()
    hf_config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=C, num_hidden_layers=L, num_attention_heads=H,
        intermediate_size=4 * C, max_position_embeddings=T, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf = transformers.BertForPreTraining(hf_config).train()  # dropout 0: train() is eval
    state = {name: torch.from_numpy(np.ascontiguousarray(a))
             for name, a in model.params.items() if not name.startswith("classifier")}
    hf.load_state_dict(state, strict=False)
    rng = np.random.default_rng(0)
    idx, types, mask, mlm, nsp, labels = make_batch(T, B, rng)
    t_idx, t_types, t_mask, t_mlm, t_nsp = (torch.from_numpy(a) for a in (idx, types, mask,
                                                                         mlm, nsp))

    def tinylm_step():
        model.forward(idx, types, mask, mlm, nsp)
        model.backward()

    def torch_step():
        hf.zero_grad(set_to_none=True)
        out = hf(t_idx, attention_mask=t_mask, token_type_ids=t_types, labels=t_mlm,
                 next_sentence_label=t_nsp)
        out.loss.backward()

    def tinylm_finetune_step():
        model.classify(idx, types, mask, labels)
        model.backward()

    # Same loss from both (a check that the two compute the same thing before timing them).
    _, _, loss = model.forward(idx, types, mask, mlm, nsp)
    with torch.no_grad():
        their_loss = hf(t_idx, attention_mask=t_mask, token_type_ids=t_types, labels=t_mlm,
                        next_sentence_label=t_nsp).loss.item()
    if abs(float(loss) - their_loss) > 1e-3 * abs(their_loss):
        raise RuntimeError(f"tinylm and torch disagree: loss {float(loss)} vs {their_loss}")

    for f in (tinylm_step, torch_step, tinylm_finetune_step):
        f()  # warm up
    times = {"tinylm": [], "torch": [], "finetune": []}
    for _ in range(repeats):
        for key, f in (("tinylm", tinylm_step), ("torch", torch_step),
                       ("finetune", tinylm_finetune_step)):
            t0 = time.perf_counter()
            f()
            times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "params": model.num_params(),
        "tinylm_ms_per_step": 1e3 * med["tinylm"],
        "torch_ms_per_step": 1e3 * med["torch"],
        "ratio_tinylm_over_torch": med["tinylm"] / med["torch"],
        "tinylm_tokens_per_s": B * T / med["tinylm"],
        "finetune_ms_per_step": 1e3 * med["finetune"],
        "finetune_examples_per_s": B / med["finetune"],
        "loss_tinylm": float(loss),
        "loss_torch": their_loss,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per size (median)")
    parser.add_argument("--json", default="benchmarks/results/bert.json", help="output file")
    parser.add_argument("--note", default="", help="how loaded the machine was, for the record")
    args = parser.parse_args()
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        print("skipped: benchmarks/bert.py compares with torch and transformers; install them")
        return
    torch.set_num_threads(THREADS)
    malloc_tuned = keep_freed_memory()
    results = []
    for name, (L, H, C, T, B) in SIZES.items():
        row = {"size": name, "num_hidden_layers": L, "num_attention_heads": H,
               "hidden_size": C, "intermediate_size": 4 * C, "seq_len": T, "batch_size": B,
               "vocab_size": VOCAB, **time_size(L, H, C, T, B, args.repeats)}
        results.append(row)
        print(f"{name:28s} tinylm {row['tinylm_ms_per_step']:8.1f} ms  torch "
              f"{row['torch_ms_per_step']:8.1f} ms  ratio {row['ratio_tinylm_over_torch']:.2f}  "
              f"fine-tuning {row['finetune_examples_per_s']:.0f} examples/s")
    report = {
        "benchmark": "bert pretraining step (MLM + NSP forward + backward, float32, median), "
                     "tinylm vs torch eager on the same threads",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "threads": THREADS,
        "torch": torch.__version__,
        "malloc_keeps_freed_memory": malloc_tuned,
        "note": args.note or "the two libraries were timed alternately, so any load from other "
                             "jobs falls on both",
        "target_ratio": 1.3,
        "results": results,
    }
    write_report(args.json, report)


if __name__ == "__main__":
    main()
