"""Everything a stage needs decided before a process group exists: the config's folders, precision and
DeepSpeed settings, where the weights start from and which checkpoint it resumes. Every config error of a
run is raised here (as ConfigError), on every rank alike, before any rank waits for another."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from para_train.config import Config, ConfigError
from para_train.files import complete
from para_train.files.layout import RunLayout, StageLayout, rank_state
from para_train.models import build
from para_train.models.pretrained import InitSource, check_model_paths, resolve_init_from
from para_train.training.distributed import DistEnv
from para_train.training.engine import deepspeed_config


@dataclass(frozen=True)
class Resume:
    """The checkpoint a stage continues from."""
    path: Path
    step: int
    world_size: int  # ranks that wrote it (another number: resumed through DeepSpeed's universal format)
    run_id: str | None  # the MLflow run it logged into


@dataclass
class Resolved:
    cfg: Config
    env: DistEnv
    layout: RunLayout  # every path of the run (files.layout)
    ds_config: dict  # the DeepSpeed JSON of this stage and world size
    precision: str  # bf16 | fp32 (train.precision=auto resolved for this machine)
    init: InitSource | None  # the weights the stage starts from (None: fresh, or stage 1's pretrained parts)
    resume: Resume | None
    parent_run_id: str | None  # stage 1's MLflow run: stages 2-3 nest under it

    @property
    def stage(self) -> StageLayout:
        return self.layout.stage(self.cfg.run.stage)


def resolve(cfg: Config, env: DistEnv) -> Resolved:
    check_model_paths(cfg)
    build.check_architecture(cfg)
    layout = RunLayout.of(cfg.run.dir)
    ds_config = deepspeed_config(cfg, env)
    first = layout.stage(1).final.mlflow_run_id
    parent = first.read_text().strip() if cfg.run.stage > 1 and first.is_file() else None
    return Resolved(cfg, env, layout, ds_config, "bf16" if ds_config["bf16"]["enabled"] else "fp32",
                    resolve_init_from(cfg), find_resume(cfg, layout.stage(cfg.run.stage)), parent)


def find_resume(cfg: Config, stage: StageLayout) -> Resume | None:
    """checkpoint.resume: auto = the newest complete, undamaged checkpoint of the stage (if any), never, or a
    checkpoint folder (which must be complete and undamaged)."""
    value = cfg.checkpoint.resume
    if value == "never":
        return None
    path = complete.latest_checkpoint(stage.checkpoints) if value == "auto" else Path(value).expanduser()
    if path is None:
        return None
    if not complete.is_complete(path):
        raise ConfigError(f"checkpoint.resume: {path} is not a complete checkpoint (no {complete.COMPLETE} marker); "
                          "name a complete one or use checkpoint.resume=auto")
    problem = complete.damage(path)
    if problem is not None:
        raise ConfigError(f"checkpoint.resume: {path} is damaged: {problem}; name another checkpoint or use "
                          "checkpoint.resume=auto (the newest undamaged one)")
    meta = complete.read_meta(path)
    # Rank 0's own state holds the run id; memory-mapped, so its EMA shard is not read.
    saved = torch.load(rank_state(path, 0), map_location="cpu", weights_only=True, mmap=True)
    return Resume(path, int(meta.get("step", saved["step"])), int(meta["world_size"]), saved.get("run_id"))
