"""Three ways to a text classifier on a task built from Python's own text (tinylm.tasks):
training from scratch, a linear classifier on frozen pretrained features, full fine-tuning.

The task: is an English sentence from Python's reference documentation or from a docstring of
the standard library (length-matched, markup removed; see tinylm/tasks.py for what makes it
fair). The pretrained BERT is a small one pretrained here, in this process, with the masked-LM
objective on the unlabeled sentences and the training split's texts (never the test split's).
Every accuracy is on the same held-out test split; beside them the majority class and the best
rule "class A if the sentence contains character c", and the other family: a GPT of the same
size pretrained as long by next-token prediction, fine-tuned with a head on its last real token
(and from scratch).

    python benchmarks/finetune.py                      # about 6 minutes on 2 quiet cores
    python benchmarks/finetune.py --quick --json /tmp/finetune.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

from report import machine_info, write_report  # benchmarks/report.py

from tinylm.backend import keep_freed_memory
from tinylm.tasks import compare_three_ways, reference_or_docstring


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="benchmarks/results/finetune.json")
    parser.add_argument("--per-class", type=int, default=1500, help="examples of each class")
    parser.add_argument("--pretrain-steps", type=int, default=600,
                        help="MLM steps of 32 sentences (about 2 minutes on a quiet 2-core "
                        "machine)")
    parser.add_argument("--pretrain-seconds", type=float, default=None,
                        help="stop pretraining after this long even before --pretrain-steps "
                        "(the accuracies then depend on the machine's speed)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="peak learning rate, the same for scratch and fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small version (about 1 minute)")
    parser.add_argument("--no-gpt", action="store_true",
                        help="leave out the GPT family (pretrained by next-token prediction)")
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. machine load)")
    args = parser.parse_args()
    keep_freed_memory()
    if args.quick:
        args.per_class, args.pretrain_steps, args.epochs = 500, 150, 3

    t0 = time.perf_counter()
    examples, unlabeled = reference_or_docstring(args.per_class, seed=args.seed)
    t_data = time.perf_counter() - t0
    report, _ = compare_three_ways(examples, unlabeled, pretrain_steps=args.pretrain_steps,
                                   pretrain_seconds=args.pretrain_seconds, epochs=args.epochs,
                                   lr_scratch=args.lr, lr_finetune=args.lr, seed=args.seed,
                                   gpt=not args.no_gpt)
    report["data_seconds"] = round(t_data, 1)
    report["n_unlabeled"] = len(unlabeled)
    report["machine"] = machine_info()
    report["date"] = datetime.date.today().isoformat()
    report["note"] = args.note
    report["command"] = "python benchmarks/finetune.py" + (" --quick" if args.quick else "")
    report["load_average_at_end"] = list(os.getloadavg())
    acc = report["accuracy"]
    print(json.dumps(acc, indent=1))
    width = max(len(k) for k in acc)
    for name, value in acc.items():
        print(f"{name:{width}s} | {value:.3f}")
    write_report(args.json, report)


if __name__ == "__main__":
    main()
