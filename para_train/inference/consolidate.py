"""A run's trained weights, read in one process from either

- a stage's `final/` folder (files.model_weights.save_final: unet/, lora/, projection.safetensors,
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
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from para_train.config import Config, ConfigError, config_from_dict
from para_train.inference import ExportError
from para_train.files import complete, layout, names, zero3
from para_train.files.safetensors_io import read_weights

log = logging.getLogger(__name__)

_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass
class TrainedWeights:
    source: Path  # the final/ or checkpoint folder read
    kind: str  # "final" | "checkpoint"
    cfg: Config  # the stage's resolved config
    raw: dict[str, torch.Tensor]  # the trainable tensors as trained (what the trainer samples with)
    ema: dict[str, torch.Tensor] | None  # their EMA, if asked for and the run kept one


def split_parts(weights: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Trained tensors by module name -> the UNet's state dict, the projection's, and the peft adapter's."""
    unet = {k[len(names.UNET_PREFIX):]: v for k, v in weights.items() if k.startswith(names.UNET_PREFIX)}
    projection = {k[len(names.PROJECTION_PREFIX):]: v for k, v in weights.items()
                  if k.startswith(names.PROJECTION_PREFIX)}
    adapter = {names.adapter_name(k): v for k, v in weights.items() if k.startswith(names.LLM_PREFIX)}
    assert len(unet) + len(projection) + len(adapter) == len(weights), "a trained tensor of an unknown part"
    return unet, projection, adapter


# ------------------------------------------------------------------ where the weights are


def locate(path: Path) -> tuple[str, Path]:
    """("final" | "checkpoint", folder) for a final/ folder, a checkpoint folder or a stage folder."""
    try:
        return layout.locate(path)
    except layout.LayoutError as e:
        raise ExportError(str(e)) from None


def stage_config(kind: str, folder: Path) -> Config:
    path = layout.stage_of(kind, folder).config
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
    final = layout.FinalLayout(folder)
    with read_weights(str(final.unet)) as reader:
        raw = {names.UNET_PREFIX + k: reader.get(k) for k in reader.keys()}
    if final.projection.is_file():
        raw.update({names.PROJECTION_PREFIX + k: v for k, v in load_file(str(final.projection)).items()})
    if final.adapter.is_file():
        raw.update({names.live_name(k): v for k, v in load_file(str(final.adapter)).items()})
    return raw, (load_file(str(final.ema)) if with_ema and final.ema.is_file() else None)


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
    world_size = complete.read_meta(folder)["world_size"]
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
        part = zero3.partition_numel(shape.numel(), world_size)
        weights[name] = zero3.join_partitions([flat[offset:offset + part] for flat in flats], shape).clone()
        offset += part
    if offset != flats[0].numel():
        raise ExportError(f"{folder}: the parameter shapes account for {offset} of {flats[0].numel()} elements per "
                          "rank; the checkpoint was not written by para-train's ZeRO-3 engine")
    return shapes, weights


def _zero3_ema(folder: Path, shapes: dict[str, torch.Size], world_size: int) -> dict[str, torch.Tensor] | None:
    """The EMA from each rank's `rank%05d.pt`: every rank holds its ZeRO-3 partition of every trainable tensor."""
    files = [layout.rank_state(folder, r) for r in range(world_size)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"{folder}: missing per-rank state {missing}; the checkpoint is incomplete")
    states = [_load(f)["ema"] for f in files]
    if states[0] is None:
        return None
    ema = {}
    for i, name in enumerate(states[0]["names"]):
        numel = shapes[name].numel()
        shards = [s["shadow"][i] for s in states]
        assert all(s["names"][i] == name for s in states), f"ranks disagree on EMA tensor {i}"
        assert all(t.numel() == zero3.partition_numel(numel, world_size) for t in shards), \
            f"{name}: EMA shards are not ZeRO-3 partitions of {numel}"
        ema[name] = zero3.join_partitions(shards, shapes[name]).clone()
    return ema
