"""Train one ParaDiffusion stage.

    deepspeed para_train/main.py --stage 1                       # embedded tiny default, all local ranks
    deepspeed --num_gpus 2 para_train/main.py --stage 2 run.dir=runs/demo
    deepspeed para_train/main.py --stage 1 --config configs/stage1_pretrain.yaml train.steps=1000
    python para_train/main.py --stage 3                          # no launcher: one process
    sbatch cluster/stage1_64nodes.sh                             # Slurm, many nodes

Stages 2 and 3 start from the previous stage's final weights in run.dir. Any config key can be
overridden as dotted key=value; see para_train/config/keys.py for every key and its default.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("para_train.main")

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
    """load config -> resolve -> start the process group -> run the stage. Exit codes: 0 done, 2 a config or
    data error (named on stderr), 75 stopped by a signal after a checkpoint (requeue it)."""
    from para_train.config import ConfigError, load_config
    from para_train.training.distributed import init_process_group, read_env
    from para_train.training.resolve import resolve

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
        run = resolve(load_config(args.stage, args.config, args.overrides), dist_env)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    set_torch_modes(run.cfg, dist_env)
    init_process_group(dist_env)

    from para_train.data.dataset import DataError

    try:
        run_stage(run)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # training.loop.StopRequested: checkpoint saved, requeue
        return int(e.code or 0)
    return 0


def run_stage(run) -> None:
    """One stage's life cycle on every rank, after `training.resolve.resolve` and with a process group."""
    from para_train.training.loop import Trainer
    from para_train.training.stage import build, restore

    stage = build(run)  # data, the model in its DeepSpeed engine, EMA, validator, tracker
    try:
        state = restore(stage, run.resume)  # a fresh TrainState, or the checkpoint's
        Trainer(stage, state).train()  # the loop: training/loop.py
        finish(stage, state)  # final weights -> export -> registered model
    finally:
        stage.close()


def open_stage(cfg, dist_env):
    """resolve -> build -> restore, for code that drives the loop itself (tests, benchmarks); needs a process group.
    Returns (stage, state): `Trainer(stage, state).train()` then `finish(stage, state)` complete the stage."""
    from para_train.training.resolve import resolve
    from para_train.training.stage import build, restore

    run = resolve(cfg, dist_env)
    stage = build(run)
    return stage, restore(stage, run.resume)


def finish(stage, state) -> None:
    """The stage's final weights (collective), its last samples, then rank 0 exports and registers them."""
    import shutil
    import time

    from para_train.files.model_weights import save_final
    from para_train.inference.export import export_model
    from para_train.training.distributed import barrier, wait_for_all
    from para_train.training.samples import log_samples

    cfg, rank, layout, tracker = stage.cfg, stage.rank, stage.layout, stage.tracker
    final = layout.final
    ema_state = stage.ema.full_tensors(rank) if stage.ema is not None else None
    if rank == 0 and final.root.exists():
        shutil.rmtree(final.root)
    save_final(stage.model, final.root, rank, ema_state)
    log_samples(stage, state.step)
    barrier()
    if rank == 0:
        if cfg.debug.slow_finish_s > 0:
            log.warning("debug.slow_finish_s: the export starts in %.0f s", cfg.debug.slow_finish_s)
            time.sleep(cfg.debug.slow_finish_s)
        if tracker.run_id:
            final.mlflow_run_id.write_text(tracker.run_id + "\n")
        tracker.log_artifact(str(layout.config))
        export = export_model(final.root, layout.export, cfg)  # raw weights, the ones the samples show
        if cfg.tracking.registered_model_name:
            tracker.log_model(str(export), cfg.tracking.registered_model_name,
                              tags={"stage": cfg.run.stage, "run_dir": cfg.run.dir})
        nxt = cfg.run.stage + 1
        log.info("stage %d done: diffusers export in %s, final weights in %s, checkpoints in %s, samples in %s, "
                 "metrics in %s%s", cfg.run.stage, layout.export, final.root, layout.checkpoints, layout.samples,
                 layout.metrics, f"; next: deepspeed para_train/main.py --stage {nxt} run.dir={cfg.run.dir}"
                 if nxt <= 3 else "")
        log.info("to go bigger: --config configs/stage%d_*.yaml (real-scale weights you supply), "
                 "or sbatch cluster/stage1_64nodes.sh", cfg.run.stage)
        tracker.close()  # the upload of the export to MLflow ends here (tracking.shutdown_timeout_s)
    # No rank leaves before rank 0's export and upload are done: under Slurm, the first task to exit starts
    # srun's --wait countdown, which would kill rank 0 in the middle of a long upload.
    wait_for_all()


def set_torch_modes(cfg, dist_env) -> None:
    import torch

    if not dist_env.use_cuda:
        torch.set_num_threads(dist_env.cpu_threads)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, i.e. after this
        torch.use_deterministic_algorithms(True, warn_only=True)  # ops without a deterministic kernel warn once
        torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    sys.exit(main())
