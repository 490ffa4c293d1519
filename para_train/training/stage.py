"""A stage's parts, built once on every rank (collective under ZeRO-3): data, the model in its DeepSpeed
engine, the EMA, the validator and the tracker; and the TrainState restored into them."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from para_train.config import REPO_ROOT, save_config
from para_train.data.loader import build_train_loader, clean_shared_memory, prepare_data
from para_train.files.layout import StageLayout
from para_train.tracking import code_params, create_tracker
from para_train.training import checkpoint, engine as engine_mod, state as state_mod
from para_train.training.distributed import barrier
from para_train.training.ema import ShardedEMA
from para_train.training.resolve import Resolved, Resume
from para_train.training.state import TrainState
from para_train.training.validation import Validator, held_out_set

log = logging.getLogger(__name__)


@dataclass
class Stage:
    run: Resolved
    engine: object  # deepspeed.DeepSpeedEngine; .module is the ParaDiffusion model
    scheduler: object  # the LR schedule DeepSpeed steps
    ema: ShardedEMA | None
    loader: object  # the rank's streaming data loader (resumable: state_dict / load_state_dict)
    tokenizer: object
    latent_encoder: object  # the frozen VAE (models.paradiffusion.LatentEncoder)
    validator: Validator | None
    tracker: object  # para_train.tracking
    gen: torch.Generator  # training noise, timesteps, VAE sampling, caption dropout (state.generator)
    num_params: dict
    init_report: dict  # what the weights were initialised from (engine.Built.init_report)
    universal: Path | None  # the universal checkpoint a resume on another number of ranks loads

    cfg = property(lambda self: self.run.cfg)
    env = property(lambda self: self.run.env)
    layout = property(lambda self: self.run.stage)  # files.layout.StageLayout
    rank = property(lambda self: self.run.env.rank)
    model = property(lambda self: self.engine.module)
    device = property(lambda self: self.env.device)

    def close(self) -> None:
        self.tracker.close()


def build(run: Resolved) -> Stage:
    cfg, env = run.cfg, run.env
    if env.rank == 0:
        run.stage.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.stage.config)
    barrier()
    ds_config, universal = dict(run.ds_config), None
    if run.resume is not None and run.resume.world_size != env.world_size:
        universal = checkpoint.to_universal(run.resume.path, env.rank)  # DeepSpeed's format for a new world size
        ds_config["checkpoint"] = {"load_universal": True}
    prepare_data(cfg)  # e.g. generate the synthetic set once, before the model takes memory
    built = engine_mod.build_model(cfg, env, ds_config, run.init)
    engine, _, scheduler = engine_mod.initialize(cfg, built, ds_config)
    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    ema = (ShardedEMA(trainable, cfg.train.ema_decay, engine_mod.fp32_master_views(engine.module, cfg))
           if cfg.train.ema_decay > 0 else None)
    gen = state_mod.generator(cfg, env.rank)
    clean_shared_memory(cfg)
    loader = build_train_loader(cfg, built.tokenizer, cfg.data.resolution // built.latent_encoder.downsample)
    write_shard_report(run, engine.module)
    validator = _validator(run, built)
    tracker = _tracker(run, built)
    return Stage(run, engine, scheduler, ema, loader, built.tokenizer, built.latent_encoder, validator, tracker, gen,
                 built.num_params, built.init_report, universal)


def _validator(run: Resolved, built) -> Validator | None:
    cfg, env = run.cfg, run.env
    if cfg.eval.every == 0:
        return None
    held = held_out_set(cfg)
    if held is None:
        if env.rank == 0:
            log.warning("no validation: the data are not the synthetic default and eval.remote is not set; point "
                        "eval.remote at held-out MDS shards for val/loss, or set eval.every=0 to say so")
        return None
    return Validator(cfg, held, built.tokenizer, built.latent_encoder, env.device, env.rank, env.world_size)


def _tracker(run: Resolved, built):
    """One MLflow store per training (run.dir); stages 2-3 nest under stage 1's run; a resume continues its run."""
    cfg, env = run.cfg, run.env
    code = code_params(REPO_ROOT) if env.rank == 0 and cfg.tracking.enabled else {}
    tags = {"stage": str(cfg.run.stage), "slurm_job_id": env.slurm_job_id or ""}
    if "git" in code:
        tags["mlflow.source.git.commit"] = code["git"]["revision"]
    tracker = create_tracker(cfg.tracking, str(run.layout.root), env.rank, env_tracking_uri=env.mlflow_tracking_uri,
                             resume_run_id=run.resume.run_id if run.resume else None,
                             parent_run_id=run.parent_run_id, tags=tags)
    if run.resume is None:
        tracker.log_params({**cfg.to_dict(), **code, **built.init_report, "world_size": env.world_size,
                            "num_nodes": env.num_nodes, **{f"params.{k}": v for k, v in built.num_params.items()}})
    return tracker


def write_shard_report(run: Resolved, model, model_state: dict | None = None) -> None:
    """What this rank holds under ZeRO-3: ranks/rank<r>.json in the stage dir, with each parameter's
    shard and, once a step has run, the bytes of parameters, gradients, optimizer state and EMA."""
    rank = run.env.rank
    tensors = {n: [int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel(),
                   int(getattr(p, "ds_numel", p.numel()))] for n, p in model.named_parameters()}
    report = {"rank": rank, "world_size": run.env.world_size, "precision": run.precision,
              "local_numel": sum(v[0] for v in tensors.values()), "total_numel": sum(v[1] for v in tensors.values()),
              "model_state_bytes": model_state, "tensors": tensors}
    run.stage.ranks.mkdir(parents=True, exist_ok=True)
    run.stage.rank_report(rank).write_text(json.dumps(report))
    if rank != 0:
        return
    if model_state is not None:
        log.info("model state on this rank after one step: %.1f MiB (ranks/rank<r>.json)", model_state["total"] / 2 ** 20)
    else:
        log.info("ZeRO-%d: this rank holds %.2fM of %.2fM parameter elements", run.cfg.deepspeed.zero_stage,
                 report["local_numel"] / 1e6, report["total_numel"] / 1e6)


def restore(stage: Stage, resume: Resume | None) -> TrainState:
    """A fresh TrainState, or the checkpoint's, with engine, EMA, random streams and data position restored."""
    if resume is None:
        return TrainState()
    rank, cfg = stage.rank, stage.cfg
    if stage.universal is None:
        saved = checkpoint.load(stage.engine, resume.path, rank)
        ema_state = saved["ema"]
    else:  # saved by a different number of ranks: DeepSpeed's universal format, our state re-sharded
        saved = checkpoint.load_resharded(stage.engine, resume.path, stage.universal, rank, resume.world_size)
        ema_state = None
        if stage.ema is not None and saved["ema_full"] is not None:
            ema_state = checkpoint.reshard_ema(saved["ema_full"], stage.ema)
        if saved["generator"] is None:  # a rank that did not exist before: fresh, deterministic draws
            saved["generator"] = state_mod.generator(cfg, rank, saved["step"]).get_state()
    state = TrainState.from_saved(saved)
    if saved["rng"] is not None:
        checkpoint.set_rng_state(saved["rng"])
    stage.gen.set_state(saved["generator"])
    if stage.ema is not None:
        stage.ema.load_state_dict(ema_state)
    stage.loader.load_state_dict(saved["loader"])
    if rank == 0:
        _truncate_metrics(stage.layout, state.step)
        log.info("resumed from %s at step %d", resume.path, state.step)
        if stage.universal is not None:
            old, new = resume.world_size, stage.env.world_size
            mb = cfg.train.micro_batch_size * cfg.train.grad_accum
            log.warning("resumed on %d ranks from a checkpoint of %d ranks (universal checkpoint %s): weights and "
                        "optimizer state are exact; the global batch changes from %d to %d samples per step and "
                        "ranks that did not exist before draw fresh noise; the data position (sample %d of the "
                        "epoch) is kept", new, old, stage.universal, mb * old, mb * new,
                        saved["loader"].get("sample_in_epoch", -1))
    return state


def _truncate_metrics(layout: StageLayout, step: int) -> None:
    """Drop log lines from steps after the checkpoint: they will be run again."""
    path = layout.metrics
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)
