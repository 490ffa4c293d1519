"""`para-train` (also `python -m para_train`): one console script, one sub-command per tool.

Each tool module exposes `add_arguments(parser)` and `run(args) -> int` and keeps heavy imports
(torch, diffusers, ...) inside `run`, so `para-train --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Two-word names ("data convert") become sub-sub-commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "data convert": ("para_train.data.convert_command", "image-paragraph pairs (TSV/JSONL/folder/synthetic) -> MDS shards"),
    "data precompute": ("para_train.data.precompute_command", "shards -> shards with VAE latents / text embeddings"),
    "export": ("para_train.inference.export", "a stage's final weights or a ZeRO-3 checkpoint -> a diffusers folder"),
    "generate": ("para_train.inference.generate", "paragraphs (txt/JSONL/ParaPrompts CSV) -> images, with an export"),
    "evaluate": ("para_train.inference.evaluate", "faithfulness on synthetic scenes by paragraph length; --compare"),
    "plan": ("para_train.plan", "will a stage fit on your GPUs, and how long will it take"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="para-train", description="para-train: ParaDiffusion training on DeepSpeed.",
                                     epilog="examples:\n  para-train train --stage 1 train.steps=50\n"
                                            "  deepspeed para_train/main.py --stage 2",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("train", help="train one stage (same as para_train/main.py; see `para-train train --help`)",
                   add_help=False)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        words = name.split()
        target = sub
        if len(words) == 2:
            if words[0] not in groups:
                groups[words[0]] = sub.add_parser(words[0], help=f"{words[0]} tools").add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True)
            target = groups[words[0]]
        module = importlib.import_module(module_name)
        p = target.add_parser(words[-1], help=help_text, description=(module.__doc__ or help_text),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the trainer parses its own arguments (it is also para_train/main.py)
        from para_train.main import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
