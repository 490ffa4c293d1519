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


def tee_output(path: str) -> None:
    """Copy everything this process writes to stdout and stderr into `path` as well (appending: a requeued
    attempt continues the file). `tee` ignores the signals Slurm sends the whole job step (USR1 before the
    time limit, TERM on scancel): it ends when this process does and its pipe closes."""
    import shutil
    import signal
    import subprocess

    if shutil.which("tee") is None:
        print(f"para_train/main.py: no `tee` on PATH: not writing the rank log {path}", file=sys.stderr)
        return

    def ignore_step_signals():
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)

    sys.stdout.flush()
    sys.stderr.flush()
    tee = subprocess.Popen(["tee", "-a", path], stdin=subprocess.PIPE, stdout=sys.__stdout__.fileno(),
                           preexec_fn=ignore_step_signals)
    os.dup2(tee.stdin.fileno(), 1)
    os.dup2(tee.stdin.fileno(), 2)
    tee.stdin.close()
    _children.append(tee)


_children: list = []  # kept referenced for the life of the process


def main(argv=None) -> int:
    from para_train.config import ConfigError, load_config
    from para_train.models.pretrained import check_model_paths, resolve_init_from
    from para_train.training.distributed import init_process_group, read_env
    
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation chatter from torch/transformers
    args = parse_args(argv)
    dist_env = read_env()
    if os.environ.get("PARA_TRAIN_RANK_LOG"):  # set by cluster/launch.sh: one log per rank
        tee_output(f"{os.environ['PARA_TRAIN_RANK_LOG']}{dist_env.rank}.log")
    logging.basicConfig(level=logging.INFO if dist_env.rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {dist_env.rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:  # every config error surfaces here, before a process group exists
        cfg = load_config(args.stage, args.config, args.overrides)
        check_model_paths(cfg)
        resolve_init_from(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    import torch

    if not dist_env.use_cuda:
        torch.set_num_threads(dist_env.cpu_threads)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, i.e. after this
        torch.use_deterministic_algorithms(True, warn_only=True)  # ops without a deterministic kernel warn once
        torch.backends.cudnn.benchmark = False
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
