"""Will a stage fit on your GPUs, and how long will it take? Answered before you spend a GPU-hour.

    para-train plan --stage 1 --config configs/stage1_pretrain.yaml --nodes 64 --gpus-per-node 8 --gpu h100-80gb
    para-train plan --stage 2 --config configs/stage2_alignment.yaml --nodes 8 --gpus-per-node 8 --gpu a100-40gb \\
        train.micro_batch_size=1 --samples 2e7

Per GPU it prints: memory for model states under ZeRO-3 (DeepSpeed's own estimator for the trained
parameters, plus only the bf16 copy of the frozen ones), activation memory at the configured micro
batch, resolution and text length with and without gradient checkpointing, communication volume per
step, and step and total time at a stated utilisation. Activations and FLOPs come from one real
forward+backward per setting traced on fake tensors (no GPU and no weights needed): the peak of the
live tensors, and what torch.utils.flop_counter counts (matmuls, convolutions, attention; 2 per
multiply-add). When the stage does not fit it says so, names the change that makes it fit, and exits
with status 1. --stage is required, as for training: the stage decides the defaults and what trains.
"""
from __future__ import annotations

import argparse

from para_train.plan.budget import GPUS, Setup, StagePlan, make_plan, memory_for, suggest_fix
from para_train.plan.model import SDXL_VAE, Architecture, architecture, build_meta_model, inventory
from para_train.plan.report import format_plan
from para_train.plan.trace import PARTS, fakeify, flop_counter, trace_step

__all__ = ["GPUS", "PARTS", "SDXL_VAE", "Architecture", "Setup", "StagePlan", "add_arguments", "architecture",
           "build_meta_model", "fakeify", "flop_counter", "format_plan", "inventory", "make_plan", "memory_for",
           "run", "suggest_fix", "trace_step"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), required=True,
                        help="1 pretrain, 2 alignment, 3 quality (as for para_train/main.py)")
    parser.add_argument("--config", default=None, help="a stage YAML, e.g. configs/stage1_pretrain.yaml "
                        "(default: the embedded tiny model)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", required=True, choices=sorted(GPUS))
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="fraction of the GPU's peak bf16 FLOP/s the step achieves (an assumption; default 0.4)")
    parser.add_argument("--net-gbps", type=float, default=400.0,
                        help="inter-node bandwidth per GPU in Gbit/s for ZeRO-3's collectives (default 400)")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of GPU memory kept free for CUDA context, NCCL buffers, fragmentation (0.1)")
    parser.add_argument("--samples", type=float, default=None,
                        help="samples to train on, e.g. 3e8 (default: train.steps x the global batch)")
    parser.add_argument("--precomputed", choices=("none", "latents", "latents+text"), default="none",
                        help="what the shards hold already (para-train data precompute); text: stage 1 only")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. train.micro_batch_size=2")


def run(args: argparse.Namespace) -> int:
    import logging
    import sys
    import warnings

    from para_train.config import ConfigError, load_config

    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    diffusers.utils.logging.set_verbosity_error()  # e.g. "modules that should be kept in float32" on meta builds
    transformers.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError("--nodes and --gpus-per-node must be >= 1")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu {args.mfu}: give a fraction in (0, 1], e.g. 0.4")
        cfg = load_config(args.stage, args.config, args.overrides)
        setup = Setup(args.nodes, args.gpus_per_node, args.gpu, args.mfu, args.net_gbps, args.headroom, args.samples,
                      args.precomputed)
        plan = make_plan(cfg, setup)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.config or "the embedded tiny default"))
    return 0 if plan.fits else 1
