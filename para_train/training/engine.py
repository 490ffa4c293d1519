"""Building the ParaDiffusion model under ZeRO-3 and wrapping it in a DeepSpeed engine."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from torch import nn

from para_train.config import REPO_ROOT, Config, ConfigError
from para_train.files import model_weights as weights, names
from para_train.kernel_dispatch import apply_kernels
from para_train.models import build
from para_train.models.pretrained import InitSource
from para_train.models.paradiffusion import LatentEncoder, ParaDiffusion, TextEncoder
from para_train.training.distributed import DistEnv

log = logging.getLogger(__name__)


def deepspeed_config(cfg: Config, dist_env: DistEnv) -> dict:
    """The base DeepSpeed JSON merged with this stage's settings."""
    path = Path(cfg.deepspeed.config)
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"deepspeed.config: {path} does not exist; point it at a DeepSpeed JSON such as "
                          "configs/deepspeed/zero3.json")
    ds = json.loads(path.read_text())
    t = cfg.train
    bf16 = t.precision == "bf16" or (t.precision == "auto" and dist_env.use_cuda)
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.deepspeed.zero_stage
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dist_env.use_cuda}
    if cfg.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": dist_env.use_cuda}
    ds.update({
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dist_env.world_size,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay,
            **optimizer_choice(dist_env.use_cuda, cfg.deepspeed.offload_optimizer)}},
    })
    if cfg.deepspeed.offload_optimizer and not _prebuilt("cpu_adam"):
        ds["zero_force_ds_cpu_optimizer"] = False  # torch's fused AdamW on the CPU instead of a JIT-built one
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def _prebuilt(op: str) -> bool:
    """Whether this DeepSpeed install carries `op` compiled (DS_BUILD_OPS=1 / DS_BUILD_<OP>=1 at install)."""
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get(op))


def optimizer_choice(use_cuda: bool, offload_optimizer: bool) -> dict:
    """AdamW without a compiler at run time. DeepSpeed's own FusedAdam / DeepSpeedCPUAdam are JIT-built on first
    use by every rank (nvcc and CUDA_HOME on the compute node, one lock in a shared $HOME, a stale lock after a
    killed build), so torch's AdamW is used unless the op came prebuilt with DeepSpeed: fused (one kernel per
    parameter group) on GPU tensors and for an optimizer offloaded to the CPU, torch's default on the CPU."""
    if offload_optimizer:
        return {} if _prebuilt("cpu_adam") else {"torch_adam": True, "fused": True}
    if use_cuda:
        return {} if _prebuilt("fused_adam") else {"torch_adam": True, "fused": True}
    return {"torch_adam": True}


def lr_lambda(cfg: Config):
    """Linear warm-up from lr / warmup_steps, then cosine, linear or constant down to lr * min_lr_ratio.

    Hand-written rather than transformers' schedules because none of them is this one: their warm-ups start at
    lr 0 (a first step that changes nothing), except get_cosine_with_min_lr_schedule_with_warmup_lr_rate, whose
    decay runs one step ahead of this one; and their linear and constant schedules have no floor. Moving to one
    would change every run's learning rates (and the pinned golden losses)."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape

    return factor


@dataclass
class Built:
    model: ParaDiffusion
    latent_encoder: LatentEncoder
    tokenizer: object
    num_params: dict
    init_report: dict  # what was copied from which folder, re-initialised or dropped (logged and tracked)
    provenance: weights.Provenance  # trainable parameter -> the file its value came from


def build_model(cfg: Config, dist_env: DistEnv, ds_config: dict, source: InitSource | None) -> Built:
    """Build every part, load pretrained weights and `source`'s (the previous stage's, resolved before the process
    group started: training.resolve), freeze per stage. Collective."""
    m = cfg.model
    cache = cfg.cache_dir
    llm_path = build.resolve_llm_path(m.llm, cache)
    tokenizer = build.load_tokenizer(llm_path, m.llm.max_length)  # the parts fit: build.check_architecture
    llm_conf = build.llm_config(m.llm, llm_path)
    unet_conf = build.unet_config(m.unet)
    width, cross = llm_conf.hidden_size, unet_conf.get("cross_attention_dim", 1280)

    torch.manual_seed(cfg.run.seed)  # identical fresh weights on every rank
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3):
        llm = build.build_llm(llm_conf)
        unet = build.build_unet(unet_conf)
        projection = build.build_projection(width, cross) if m.projection else None
    if llm_path is not None:
        with build.read_weights(llm_path, strip_prefixes=("model.",)) as reader:
            weights.copy_into(llm, reader, dist_env.rank)
    provenance: weights.Provenance = {}
    init_report: dict[str, str] = {}
    if m.unet.path is not None:  # e.g. SDXL's unet/, with model.unet.config's keys over its config.json
        with build.read_weights(m.unet.path) as reader:
            report = weights.copy_matching(unet, reader, dist_env.rank, record=provenance, prefix="unet.")
        init_report.update({f"init.unet.{k}": v for k, v in weights.summarize(report).items()})
        log.info("UNet from %s: %d tensors copied", m.unet.path, len(report["copied"]))
        for outcome, what in (("reinitialised", "re-initialised (another shape here)"),
                              ("fresh", "initialised fresh (not in the folder)"),
                              ("dropped", "dropped (not in this model)")):
            if report[outcome]:
                log.info("  %s: %s", what, init_report[f"init.unet.{outcome}"])
                log.debug("  %s: %s", outcome, report[outcome])
    if m.lora.enabled:
        llm = build.add_lora(llm, m.lora)
        if zero3 and ds_config["bf16"]["enabled"]:
            # peft makes its adapters in fp32, outside zero.Init; DeepSpeed casts no zero.Init model, and
            # its ZeRO-3 optimizer needs one dtype per parameter group.
            for name, p in llm.named_parameters():
                if names.is_lora(name):
                    p.data = p.data.to(torch.bfloat16)
    if m.llm.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.unet.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    chosen = apply_kernels(llm if m.lora.enabled else None, unet, cfg.kernels.lora, cfg.kernels.cross_attention)
    log.info("kernels: %s", chosen)
    model = ParaDiffusion(TextEncoder(llm, m.llm.layer, projection), unet, m.prediction_type, m.min_snr_gamma,
                          m.num_train_timesteps, image_size=cfg.data.resolution, zero_terminal_snr=m.zero_terminal_snr)

    if source is not None:
        use_ema = cfg.checkpoint.init_weights == "ema"
        counts = weights.load_init(model, source, dist_env.rank, with_lora=m.lora.enabled, use_ema=use_ema,
                                   record=provenance)
        which = "EMA" if use_ema and source.ema is not None else "raw"
        if use_ema and source.ema is None:
            log.info("checkpoint.init_weights=ema: %s (%s layout) holds one set of weights; starting from those",
                     source.folder, source.kind)
        log.info("initialised from %s (%s layout, %s weights): %s", source.folder, source.kind, which, counts)
        init_report.update({"init.from": str(source.folder), "init.layout": source.kind, "init.weights": which})

    # Freeze per stage: the LLM base is always frozen; LoRA (stages 2-3), UNet and projection train.
    for name, p in model.named_parameters():
        p.requires_grad_(names.trains(name))
    if zero3 and cfg.deepspeed.leaf_modules:
        # none inside an LLM that LoRA trains (build.check_architecture)
        leaves = deepspeed.utils.set_z3_leaf_modules(model, list(cfg.deepspeed.leaf_modules), raise_if_not_found=False)
        log.info("ZeRO-3 gathers %d blocks whole (deepspeed.leaf_modules)", len(leaves))

    vae = build.load_vae(build.resolve_vae_path(m.vae.path, cache))
    if dist_env.use_cuda:
        vae = vae.to(dist_env.device, torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32)
    counts = {"trainable": sum(_numel(p) for p in model.parameters() if p.requires_grad),
              "total": sum(_numel(p) for p in model.parameters())}
    return Built(model, LatentEncoder(vae), tokenizer, counts, init_report, provenance)


def _numel(p: torch.Tensor) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    lora, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lora if names.is_lora(name) else rest).append(p)
    groups = [{"params": rest, "lr": cfg.train.lr, "name": "unet"}]
    if lora:
        groups.append({"params": lora, "lr": cfg.train.lora_lr or cfg.train.lr, "name": "lora"})
    return groups


def initialize(cfg: Config, built: Built, ds_config: dict):
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=built.model, model_parameters=param_groups(built.model, cfg), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    if ds_config["bf16"]["enabled"] and built.provenance:
        # DeepSpeed made the fp32 master copy from the bf16 parameters: put the exact source values back.
        n = weights.set_fp32_masters(engine.module, built.provenance)
        log.info("fp32 master weights of %d trainable tensors set from their source files", n)
    return engine, optimizer, scheduler


def fp32_master_views(model: nn.Module, cfg: Config) -> list[torch.Tensor] | None:
    """This rank's part of the optimizer's fp32 master copy of every trainable parameter, as views the optimizer
    updates in place (ZeRO-3 without offload); None where there is no such view (the EMA then follows the
    parameter shards)."""
    if cfg.deepspeed.zero_stage != 3 or cfg.deepspeed.offload_optimizer:
        return None
    from deepspeed.utils import safe_get_local_fp32_param

    params = [p for p in model.parameters() if p.requires_grad]
    if not all(hasattr(p, "_z3_optimizer") for p in params):
        return None
    return [safe_get_local_fp32_param(p) for p in params]
