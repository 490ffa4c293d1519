"""Export a training run as a folder that diffusers, transformers and peft load (safetensors only).

examples:
  para-train export runs/demo/stage3 runs/demo/export              # the stage's final weights (raw)
  para-train export runs/demo/stage3/final exported --ema          # their EMA instead
  para-train export runs/demo/stage2/checkpoints/step_00000100 ckpt100   # any complete ZeRO-3 checkpoint
  para-train export runs/demo/stage3 merged --merge-lora           # LoRA merged into a full copy of the LLM

The folder holds unet/, vae/, scheduler/, tokenizer/, text_encoder/ (a reference to the frozen base LLM,
or a copy of it for the tiny model or with --copy-llm, plus the peft LoRA adapter and the projection),
model_index.json, and export.json (where it came from). Load it with

  ParaDiffusionPipeline.from_pretrained(OUT)                       # para_train.inference
  UNet2DConditionModel.from_pretrained(OUT/unet); AutoencoderKL.from_pretrained(OUT/vae)
  PeftModel.from_pretrained(AutoModel.from_pretrained(LLM), OUT/text_encoder/lora)

A checkpoint is consolidated in this one process, whatever number of ranks wrote it; its files are read
without unpickling anything. The stage's config.yaml (next to final/ and checkpoints/) says which LLM,
VAE, layer and max length the run used.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from para_train.inference import ExportError

log = logging.getLogger(__name__)


def export_model(source: str | Path, out_dir: str | Path, cfg=None, use_ema: bool = False, merge_lora: bool = False,
                 copy_llm: bool = False) -> Path:
    """Write an exported folder at `out_dir` from a stage folder, its final/ folder or a complete checkpoint.

    `cfg`: the stage's resolved Config (default: read from the stage's config.yaml). The folder is
    written next to `out_dir` and moved into place at the end; an earlier export there is replaced.
    """
    from para_train.config import TINY, save_config
    from para_train.inference.consolidate import read_trained, split_parts
    from para_train.inference.pipeline import model_index
    from para_train.inference.text_encoder import copy_weights_folder, llm_reference, save_text_encoder
    from para_train.models import build
    from para_train.sampling import make_scheduler

    out = Path(out_dir).expanduser()
    _check_replaceable(out)
    trained = read_trained(Path(source), cfg, with_ema=use_ema)
    cfg, m = trained.cfg, trained.cfg.model
    if use_ema and trained.ema is None:
        raise ExportError(f"{trained.source} holds no EMA (train.ema_decay was 0); export the raw weights (no --ema)")
    unet, projection, adapter = split_parts(_with_ema(trained.raw, trained.ema) if use_ema else trained.raw)
    llm_path = build.resolve_llm_path(m.llm, cfg.cache_dir)
    if llm_path is None:
        raise ExportError("model.llm.path is null: the run used a randomly initialised LLM, which an export cannot "
                          "reference; train with model.llm.path set to saved weights")
    if merge_lora and not adapter:
        log.warning("--merge-lora: this stage has no LoRA adapter (stage 1); exporting the LLM reference as is")

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_unet(tmp / "unet", build.unet_config(m.unet), unet)
    copy_weights_folder(Path(build.resolve_vae_path(m.vae.path, cfg.cache_dir)), tmp / "vae")
    scheduler = make_scheduler(m.num_train_timesteps, m.prediction_type, m.zero_terminal_snr)
    scheduler.save_pretrained(str(tmp / "scheduler"))
    tokenizer = build.load_tokenizer(llm_path, m.llm.max_length)
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    save_text_encoder(tmp / "text_encoder", llm_path=llm_path, layer=m.llm.layer, adapter=adapter,
                      lora=m.lora if adapter else None, projection=projection, merge_lora=merge_lora,
                      copy_llm=copy_llm or m.llm.path == TINY)  # the tiny LLM lives in a cache: make it portable
    index = model_index(type(tokenizer).__name__, m.llm.max_length, cfg.data.resolution, cfg.sample.guidance_scale)
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_config(cfg, tmp / "training_config.yaml")
    provenance = {"source": str(trained.source.resolve()), "source_kind": trained.kind, "stage": cfg.run.stage,
                  "weights": "ema" if use_ema else "raw",
                  "lora": ("merged" if merge_lora else "adapter") if adapter else "none",
                  "llm": llm_reference(llm_path) if m.llm.path != TINY else "tiny (copied)"}
    (tmp / "export.json").write_text(json.dumps(provenance, indent=1) + "\n")
    _move_into_place(tmp, out)
    log.info("exported %s (%s weights) to %s", trained.source, provenance["weights"], out)
    return out


def _check_replaceable(out: Path) -> None:
    if out.exists() and not (out / "model_index.json").is_file():
        raise ExportError(f"{out} exists and is not an earlier export; choose a new output folder or remove it")


def _move_into_place(tmp: Path, out: Path) -> None:
    _check_replaceable(out)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _with_ema(raw: dict, ema: dict) -> dict:
    if set(raw) != set(ema):
        missing = sorted(set(raw) ^ set(ema))
        raise ExportError(f"the EMA does not cover the trained tensors (e.g. {missing[:3]}); export the raw weights")
    return ema


def _write_unet(out: Path, config: dict, state: dict) -> None:
    """A diffusers UNet folder: the full config as UNet2DConditionModel writes it, and the weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):  # the architecture only: no memory, no init
        unet = UNet2DConditionModel(**config)
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        raise ExportError(f"the trained UNet weights do not fit the config's UNet ({len(diff)} differ, e.g. "
                          f"{diff[:3]}); pass the config.yaml of the stage that wrote them (--config)")
    out.mkdir(parents=True)
    unet.save_config(str(out))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "diffusion_pytorch_model.safetensors"))


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a stage folder (runs/NAME/stageN: its final/ weights, else its newest complete "
                                       "checkpoint), a final/ folder, or a checkpoint folder (.../checkpoints/step_N)")
    parser.add_argument("out", help="the folder to write (an earlier export there is replaced)")
    parser.add_argument("--ema", action="store_true", help="export the EMA of the weights instead of the raw weights")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge the LoRA adapter into a full copy of the LLM instead of exporting the adapter")
    parser.add_argument("--copy-llm", action="store_true",
                        help="copy the base LLM into the export instead of referencing its path (always for 'tiny')")
    parser.add_argument("--config", default=None, help="the stage's config.yaml, if it is not next to SOURCE")
    parser.add_argument("--cache-dir", default=None,
                        help="where the tiny model lives (default: the config's data.cache_dir)")


def run(args: argparse.Namespace) -> int:
    from para_train.config import ConfigError
    from para_train.inference.consolidate import load_stage_config, locate, stage_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_stage_config(Path(args.config)) if args.config else stage_config(*locate(Path(args.source)))
        if args.cache_dir:
            cfg.data.cache_dir = args.cache_dir
        out = export_model(args.source, args.out, cfg, use_ema=args.ema, merge_lora=args.merge_lora,
                           copy_llm=args.copy_llm)
    except (ExportError, ConfigError, FileNotFoundError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}\n  para-train generate {out} prompts.txt --out samples\n"
          f"  python -c \"from para_train.inference import ParaDiffusionPipeline; "
          f"ParaDiffusionPipeline.from_pretrained('{out}')\"")
    return 0
