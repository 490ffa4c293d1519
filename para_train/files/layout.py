"""Where every file of a run lives. Every path of a run comes from here.

    <run.dir>/                         one training: its stages, and MLflow's local store when no server is set
      stage<N>/                        StageLayout
        config.yaml                    the stage's resolved config
        metrics.jsonl                  one line per step (validation metrics on their steps)
        ranks/rank<r>.json             what rank r holds under ZeRO-3
        samples/                       sample images and grids, prompts.json
        checkpoints/step_<8 digits>/   DeepSpeed's shards, rank<5 digits>.pt (our per-rank state), COMPLETE
        checkpoints/latest             the newest complete checkpoint's name (for people and tools)
        checkpoints/universal_step_*/  a checkpoint converted for resuming on another number of ranks
        final/                         FinalLayout: the stage's final weights
        export/                        the diffusers export of final/
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from para_train.files.complete import COMPLETE, is_complete, latest_checkpoint


class LayoutError(ValueError):
    """A folder is not what the caller needs (message names the folder and what to pass instead)."""


def checkpoint_tag(step: int) -> str:
    return f"step_{step:08d}"


def rank_state(checkpoint: Path, rank: int) -> Path:
    """para-train's own per-rank state in a checkpoint (RNGs, EMA shard, data position, counters)."""
    return checkpoint / f"rank{rank:05d}.pt"


def universal_of(checkpoint: Path) -> Path:
    return checkpoint.parent / f"universal_{checkpoint.name}"


@dataclass(frozen=True)
class FinalLayout:
    """A stage's final weights (files.model_weights.save_final writes them)."""
    root: Path

    marker = property(lambda self: self.root / "final.json")  # written last: the folder is whole
    unet = property(lambda self: self.root / "unet")  # a diffusers UNet2DConditionModel folder
    lora = property(lambda self: self.root / "lora")  # a peft adapter folder (stages 2-3)
    adapter = property(lambda self: self.root / "lora" / "adapter_model.safetensors")
    projection = property(lambda self: self.root / "projection.safetensors")  # LLM width -> cross-attention
    ema = property(lambda self: self.root / "ema.safetensors")  # named like the model's parameters
    mlflow_run_id = property(lambda self: self.root / "mlflow_run_id")  # the stage's MLflow run (stages nest)

    def exists(self) -> bool:
        return self.marker.is_file()


@dataclass(frozen=True)
class StageLayout:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    ranks = property(lambda self: self.root / "ranks")
    samples = property(lambda self: self.root / "samples")
    checkpoints = property(lambda self: self.root / "checkpoints")
    export = property(lambda self: self.root / "export")
    final = property(lambda self: FinalLayout(self.root / "final"))

    def rank_report(self, rank: int) -> Path:
        return self.ranks / f"rank{rank}.json"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_tag(step)

    def crash_marker(self, step: int) -> Path:
        """debug.crash_at_step's marker: the requeued attempt passes the step."""
        return self.root / f"debug_crashed_at_step_{step}"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunLayout":
        return cls(Path(run_dir).expanduser())

    def stage(self, n: int) -> StageLayout:
        return StageLayout(self.root / f"stage{n}")


# ------------------------------------------------------------------ what a folder is


def locate(path: Path) -> tuple[str, Path]:
    """("final" | "checkpoint", folder) for a final/ folder, a checkpoint folder or a stage folder."""
    path = Path(path).expanduser()
    if path.name.startswith("universal_"):
        raise LayoutError(f"{path} is a universal checkpoint made for resuming on another number of ranks; export "
                          f"{path.parent / path.name[len('universal_'):]}, the checkpoint it was made from")
    if FinalLayout(path).exists():
        return "final", path
    if is_complete(path):
        return "checkpoint", path
    if path.name.startswith("step_") and path.is_dir():
        raise LayoutError(f"{path} is not a complete checkpoint (no {COMPLETE} marker: the run stopped while writing "
                          f"it); export an earlier one from {path.parent}")
    stage = StageLayout(path)
    if stage.config.is_file():  # a stage folder: its final weights, else its newest checkpoint
        if stage.final.exists():
            return "final", stage.final.root
        latest = latest_checkpoint(stage.checkpoints)
        if latest is not None:
            return "checkpoint", latest
        raise LayoutError(f"{path} holds neither final weights (final/) nor a complete checkpoint yet")
    raise LayoutError(f"{path} is not a stage folder (runs/<name>/stageN), a final/ folder or a complete checkpoint "
                      "folder (stageN/checkpoints/step_N)")


def stage_of(kind: str, folder: Path) -> StageLayout:
    """The stage a located final/ or checkpoint folder belongs to."""
    return StageLayout(folder.parent if kind == "final" else folder.parent.parent)
