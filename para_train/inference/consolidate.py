"""A run's trained weights, read in one process from either

- a stage's `final/` folder (training.weights.save_final: unet/, lora/, projection.safetensors,
  ema.safetensors), or
- a complete ZeRO-3 checkpoint `checkpoints/step_N/` written by any number of ranks: the fp32 master
  weights of the trainable parameters from DeepSpeed's per-rank optimizer files, and the EMA from
  para-train's per-rank `rank%05d.pt` files.

Either way the tensors are named like the ParaDiffusion module's parameters (`unet.conv_in.weight`,
`text_encoder.projection.weight`, `text_encoder.llm.base_model.model.<...>.lora_A.default.weight`).
The frozen LLM base is in neither: it comes from the config's model.llm.path.

Checkpoint files are read with `torch.load(weights_only=True)`: tensors and plain containers only
(plus DeepSpeed's stage enum and loss-scaler classes, allowed by name), so nothing in a checkpoint
can run code.
"""
from __future__ import annotations

import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from para_train.config import Config, ConfigError, config_from_dict
from para_train.inference import ExportError
from para_train.models.build import read_weights
from para_train.training import checkpoint

log = logging.getLogger(__name__)

LLM_PREFIX = "text_encoder.llm."
PROJECTION_PREFIX = "text_encoder.projection."
UNET_PREFIX = "unet."
_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass
class TrainedWeights:
    source: Path  # the final/ or checkpoint folder read
    kind: str  # "final" | "checkpoint"
    cfg: Config  # the stage's resolved config
    raw: dict[str, torch.Tensor]  # the trainable tensors as trained (what the trainer samples with)
    ema: dict[str, torch.Tensor] | None  # their EMA, if asked for and the run kept one


def live_name(adapter_key: str) -> str:
    """peft's saved name (`base_model.model.X.lora_A.weight`) -> the training module's parameter name."""
    return LLM_PREFIX + re.sub(r"\.(lora_[AB])\.", r".\1.default.", adapter_key)


def adapter_name(live: str) -> str:
    assert live.startswith(LLM_PREFIX), live
    return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", live[len(LLM_PREFIX):])


def split_parts(weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Trained tensors by module name -> the UNet's state dict, the projection's, and the peft adapter's."""
    unet = {k[len(UNET_PREFIX):]: v for k, v in weights.items() if k.startswith(UNET_PREFIX)}
    projection = {k[len(PROJECTION_PREFIX):]: v for k, v in weights.items() if k.startswith(PROJECTION_PREFIX)}
    adapter = {adapter_name(k): v for k, v in weights.items() if k.startswith(LLM_PREFIX)}
    assert len(unet) + len(projection) + len(adapter) == len(weights), "a trained tensor of an unknown part"
    return unet, projection, adapter


# ------------------------------------------------------------------ where the weights are


def locate(path: Path) -> tuple[str, Path]:
    """("final" | "checkpoint", folder) for a final/ folder, a checkpoint folder or a stage folder."""
    path = Path(path).expanduser()
    if path.name.startswith("universal_"):
        raise ExportError(f"{path} is a universal checkpoint made for resuming on another number of ranks; export "
                          f"{path.parent / path.name[len('universal_'):]}, the checkpoint it was made from")
    if (path / "final.json").is_file():
        return "final", path
    if (path / checkpoint.COMPLETE).is_file():
        return "checkpoint", path
    if path.name.startswith("step_") and path.is_dir():
        raise ExportError(f"{path} is not a complete checkpoint (no {checkpoint.COMPLETE} marker: the run stopped "
                          f"while writing it); export an earlier one from {path.parent}")
    if (path / "config.yaml").is_file():  # a stage folder: its final weights, else its newest checkpoint
        if (path / "final" / "final.json").is_file():
            return "final", path / "final"
        latest = checkpoint.latest_checkpoint(path / "checkpoints")
        if latest is not None:
            return "checkpoint", latest
        raise ExportError(f"{path} holds neither final weights (final/) nor a complete checkpoint yet")
    raise ExportError(f"{path} is not a stage folder (runs/<name>/stageN), a final/ folder or a complete checkpoint "
                      "folder (stageN/checkpoints/step_N)")


def stage_config(kind: str, folder: Path) -> Config:
    stage_dir = folder.parent if kind == "final" else folder.parent.parent
    path = stage_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{path} does not exist; pass the stage's config.yaml (written by the trainer) with --config")
    return load_stage_config(path)


def load_stage_config(path: Path) -> Config:
    try:
        return config_from_dict(yaml.safe_load(Path(path).read_text()))
    except (ConfigError, yaml.YAMLError) as e:
        raise ExportError(f"{path}: not a config written by this version of the trainer ({e})") from None


def read_trained(path: Path, cfg: Config | None = None, with_ema: bool = False) -> TrainedWeights:
    kind, folder = locate(path)
    cfg = cfg if cfg is not None else stage_config(kind, folder)
    raw, ema = _read_final(folder, with_ema) if kind == "final" else _read_checkpoint(folder, with_ema)
    log.info("read %d trained tensors%s from %s", len(raw), " and their EMA" if ema else "", folder)
    return TrainedWeights(folder, kind, cfg, raw, ema)


# ------------------------------------------------------------------ final/


def _read_final(folder: Path, with_ema: bool) -> tuple[dict, dict | None]:
    with read_weights(str(folder / "unet")) as reader:
        raw = {UNET_PREFIX + k: reader.get(k) for k in reader.keys()}
    if (folder / "projection.safetensors").is_file():
        raw.update({PROJECTION_PREFIX + k: v for k, v in load_file(str(folder / "projection.safetensors")).items()})
    adapter = folder / "lora" / "adapter_model.safetensors"
    if adapter.is_file():
        raw.update({live_name(k): v for k, v in load_file(str(adapter)).items()})
    ema_file = folder / "ema.safetensors"
    return raw, (load_file(str(ema_file)) if with_ema and ema_file.is_file() else None)


# ------------------------------------------------------------------ ZeRO-3 checkpoints


def _load(path: Path) -> dict:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[-1][:300]
            raise ExportError(f"{path} holds objects other than tensors, which para-train does not unpickle ({first}); "
                              "export the stage's final/ folder instead") from None


def _read_checkpoint(folder: Path, with_ema: bool) -> tuple[dict, dict | None]:
    world_size = checkpoint.read_meta(folder)["world_size"]
    shapes, raw = _zero3_fp32_weights(folder, world_size)
    return raw, (_zero3_ema(folder, shapes, world_size) if with_ema else None)


def _zero3_fp32_weights(folder: Path, world_size: int) -> tuple[dict[str, torch.Size], dict[str, torch.Tensor]]:
    """Re-assemble every trainable parameter from the ranks' flat fp32 partitions.

    ZeRO-3 gives each parameter ceil(numel / world_size) elements per rank (the last rank padded), and
    each rank's flat groups hold its partitions of all parameters back to back, in `param_shapes` order.
    """
    files = {int(m.group(1)): f for f in folder.iterdir() if (m := _OPTIM_FILE.search(f.name))}
    if sorted(files) != list(range(world_size)):
        raise ExportError(f"{folder}: expected optimizer files of ranks 0..{world_size - 1}, found ranks "
                          f"{sorted(files)}; the checkpoint is incomplete")
    states = [_load(files[r])["optimizer_state_dict"] for r in range(world_size)]
    stage = int(states[0]["zero_stage"])
    if stage != 3:
        raise ExportError(f"{folder} is a ZeRO-{stage} checkpoint; export reads ZeRO-3 checkpoints. Export the stage's "
                          "final/ folder instead")
    model_file = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"  # no bf16_ prefix, unlike the optimizer's
    if not model_file.is_file():
        raise ExportError(f"{folder}: no {model_file.name}; the checkpoint is incomplete")
    groups = _load(model_file)["param_shapes"]
    shapes = {name: torch.Size(shape) for group in groups for name, shape in group.items()}
    flats = [torch.cat([g.reshape(-1) for g in s["fp32_flat_groups"]]) for s in states]
    weights, offset = {}, 0
    for name, shape in shapes.items():
        part = math.ceil(shape.numel() / world_size)
        pieces = [flat[offset:offset + part] for flat in flats]
        weights[name] = torch.cat(pieces)[:shape.numel()].view(shape).clone()
        offset += part
    if offset != flats[0].numel():
        raise ExportError(f"{folder}: the parameter shapes account for {offset} of {flats[0].numel()} elements per "
                          "rank; the checkpoint was not written by para-train's ZeRO-3 engine")
    return shapes, weights


def _zero3_ema(folder: Path, shapes: dict[str, torch.Size], world_size: int) -> dict[str, torch.Tensor] | None:
    """The EMA from each rank's `rank%05d.pt`: every rank holds its ZeRO-3 partition of every trainable tensor."""
    files = [folder / f"rank{r:05d}.pt" for r in range(world_size)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"{folder}: missing per-rank state {missing}; the checkpoint is incomplete")
    states = [_load(f)["ema"] for f in files]
    if states[0] is None:
        return None
    ema = {}
    for i, name in enumerate(states[0]["names"]):
        numel, part = shapes[name].numel(), math.ceil(shapes[name].numel() / world_size)
        shards = [s["shadow"][i] for s in states]
        assert all(s["names"][i] == name for s in states), f"ranks disagree on EMA tensor {i}"
        assert all(t.numel() == part for t in shards), f"{name}: EMA shards are not ZeRO-3 partitions of {numel}"
        ema[name] = torch.cat(shards)[:numel].view(shapes[name]).clone()
    return ema
