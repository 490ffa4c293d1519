"""`para-train` (also `python -m para_train`): one console script, one sub-command per tool."""
from __future__ import annotations

import argparse
import sys


def _train(argv: list[str]) -> int:
    from para_train.main import main as train_main

    return train_main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="para-train", description="para-train: ParaDiffusion training on DeepSpeed.",
        epilog="example: para-train train --stage 1 train.steps=50")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train one stage (same as para_train/main.py)", add_help=False)
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
