"""Train one ParaDiffusion stage.

    deepspeed para_train/main.py --stage 1                       # embedded tiny default, all local ranks
    deepspeed --num_gpus 2 para_train/main.py --stage 2 run.dir=runs/demo
    deepspeed para_train/main.py --stage 1 --config configs/stage1_pretrain.yaml train.steps=1000
    python para_train/main.py --stage 3                          # no launcher: one process
    sbatch cluster/stage1_64nodes.sh                             # Slurm, many nodes

Stages 2 and 3 start from the previous stage's final weights in run.dir. Any config key can be
overridden as dotted key=value; see para_train/config.py for every key and its default.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script (`deepspeed para_train/main.py`): import the package, not this folder's modules.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="para_train/main.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, required=True, choices=(1, 2, 3), help="1 pretrain, 2 alignment, 3 quality")
    parser.add_argument("--config", default=None, help="a stage YAML (default: the embedded tiny model)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=100 run.dir=runs/x")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from para_train.config import ConfigError, load_config, resolve_init_from
    from para_train.training.distributed import init_process_group, read_env
    
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter from torch/transformers
    args = parse_args(argv)
    dist_env = read_env()
    logging.basicConfig(level=logging.INFO if dist_env.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {dist_env.rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:  # every config error surfaces here, before a process group exists
        cfg = load_config(args.stage, args.config, args.overrides)
        resolve_init_from(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not dist_env.use_cuda:
        import torch

        torch.set_num_threads(dist_env.cpu_threads)
    init_process_group(dist_env)

    from para_train.data.dataset import DataError
    from para_train.training.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, dist_env)
        trainer.train()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
