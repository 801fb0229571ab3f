"""The `tinylm` command: one subcommand per task, each a thin layer over the library.

    tinylm gradcheck      check every layer and a tiny GPT against central differences

Errors in the user's input are printed as one line, `tinylm: error: ...`, and the command
exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys


def cmd_gradcheck(args) -> int:
    from tinylm import gradcheck

    rows = gradcheck.layer_checks(seed=args.seed)
    if not args.layers_only:
        rows += gradcheck.model_checks(seed=args.seed)
    print(gradcheck.format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} gradients agree with central differences "
        f"(float64; tolerance {gradcheck.SMOOTH_TOL:g} for layers, "
        f"{gradcheck.KINK_TOL:g} for ReLU, {gradcheck.MODEL_TOL:g} for the model)"
    )
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm",
        description="A GPT in NumPy with hand-written backward passes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "gradcheck",
        help="check every backward pass against central differences",
        description="Check every layer's backward and a tiny GPT's gradients against central "
        "differences in float64, and print the table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the random test inputs")
    p.add_argument("--layers-only", action="store_true", help="skip the whole-model check")
    p.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"tinylm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
