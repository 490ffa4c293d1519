"""The folders a stage's weights come from, checked before any process group starts.

- `model.llm.path`: a local transformers folder (config.json, tokenizer, safetensors, sharded with an
  index or not), e.g. Llama-2-7b-hf as downloaded by you; "tiny" for the generated stand-in.
- `model.unet.path`: a diffusers UNet2DConditionModel folder, e.g. SDXL's `unet/`; keys under
  `model.unet.config` override its config.json (see `build.unet_config`).
- `model.vae.path`: a diffusers AutoencoderKL folder.
- `checkpoint.init_from`: where stages 2-3 (or a fine-tune) start, in any of three layouts:
    final          a para-train stage's final/ (final.json, unet/, lora/, projection.safetensors, ema.safetensors)
    export         a `para-train export` folder (model_index.json, unet/, text_encoder/{lora/,projection.safetensors})
    paradiffusion  a diffusers folder as ParaDiffusion released it (unet/, text_encoder_lora/ = a peft adapter)

Nothing here downloads: every path is a local folder, and a wrong one is a ConfigError that names the
folder and what is missing in it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from para_train.config import TINY, Config, ConfigError
from para_train.files.layout import FinalLayout, RunLayout

TEXT_ENCODER_LORA = "text_encoder_lora"  # ParaDiffusion's release: the LLM's peft adapter next to unet/


@dataclass(frozen=True)
class InitSource:
    folder: Path
    kind: str  # final | export | paradiffusion
    unet: Path  # a UNet2DConditionModel folder
    lora: Path | None  # a peft adapter folder (adapter_config.json + adapter_model.safetensors)
    projection: Path | None  # the LLM-width -> cross-attention projection (safetensors)
    ema: Path | None  # EMA of the trainable tensors, named like the model's parameters (final/ only)


def _weights_in(folder: Path, what: str, key: str) -> None:
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {folder} is not a {what} folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in (*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.ckpt")))
        hint = f" (it has {pickled}: convert them to safetensors; para-train never unpickles weights)" if pickled else ""
        raise ConfigError(f"{key}: {folder} holds no .safetensors weights{hint}")


def _adapter_in(folder: Path, key: str) -> Path:
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{key}: {folder} is not a peft LoRA adapter folder (no adapter_config.json)")
    if not (folder / "adapter_model.safetensors").is_file():
        hint = " (it has adapter_model.bin: convert it to safetensors)" if (folder / "adapter_model.bin").is_file() else ""
        raise ConfigError(f"{key}: {folder} holds no adapter_model.safetensors{hint}")
    return folder


def init_source(folder: Path, key: str = "checkpoint.init_from") -> InitSource:
    """Recognise the layout of a weights folder (see the module docstring)."""
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} does not exist")
    final = FinalLayout(folder)
    if final.exists():
        _weights_in(final.unet, "UNet", key)
        return InitSource(folder, "final", final.unet, _adapter_in(final.lora, key) if final.lora.is_dir() else None,
                          _file(final.projection), _file(final.ema))
    if (folder / "model_index.json").is_file() and (folder / "text_encoder").is_dir():
        _weights_in(folder / "unet", "UNet", key)
        lora = folder / "text_encoder" / "lora"
        return InitSource(folder, "export", folder / "unet", _adapter_in(lora, key) if lora.is_dir() else None,
                          _file(folder / "text_encoder" / "projection.safetensors"), None)
    if (folder / "unet").is_dir() and (folder / TEXT_ENCODER_LORA).is_dir():
        _weights_in(folder / "unet", "UNet", key)
        return InitSource(folder, "paradiffusion", folder / "unet", _adapter_in(folder / TEXT_ENCODER_LORA, key),
                          None, None)
    raise ConfigError(f"{key}: no weights at {folder}: expected a para-train stage's final/ (final.json), a para-train "
                      f"export (model_index.json, unet/, text_encoder/) or ParaDiffusion's layout (unet/, "
                      f"{TEXT_ENCODER_LORA}/)")


def _file(path: Path) -> Path | None:
    return path if path.is_file() else None


def resolve_init_from(cfg: Config) -> InitSource | None:
    """The weights this stage starts from: "auto" = the previous stage's final/ in run.dir (stage 1: none)."""
    value = cfg.checkpoint.init_from
    if value == "none" or (value == "auto" and cfg.run.stage == 1):
        return None
    if value == "auto":
        folder = RunLayout.of(cfg.run.dir).stage(cfg.run.stage - 1).final.root
        if not FinalLayout(folder).exists():
            prev = cfg.run.stage - 1
            raise ConfigError(f"checkpoint.init_from: no complete final weights at {folder}. Run stage {prev} first "
                              f"(deepspeed para_train/main.py --stage {prev} run.dir={cfg.run.dir}), or set "
                              "checkpoint.init_from=<a weights folder> (or none to start fresh)")
    else:
        folder = Path(value).expanduser()
    source = init_source(folder)
    _check_unet_matches(source, cfg)
    if source.lora is not None and cfg.model.lora.enabled:
        _check_adapter_matches(source.lora, cfg)
    return source


def _check_unet_matches(source: InitSource, cfg: Config) -> None:
    """The source UNet's architecture is this config's (every key both name, the sample size aside)."""
    from para_train.models.build import unet_config

    saved = {k: v for k, v in json.loads((source.unet / "config.json").read_text()).items() if not k.startswith("_")}
    ours = unet_config(cfg.model.unet)
    differ = [k for k in sorted(saved.keys() & ours.keys()) if k != "sample_size" and saved[k] != ours[k]]
    if differ:
        shown = ", ".join(f"{k}: {json.dumps(saved[k])} there, {json.dumps(ours[k])} here" for k in differ[:4])
        raise ConfigError(f"checkpoint.init_from: the UNet in {source.unet} has another architecture ({shown}); set "
                          f"model.unet.config to the one it was trained with (its config.json)")


def _check_adapter_matches(adapter: Path, cfg: Config) -> None:
    saved = json.loads((adapter / "adapter_config.json").read_text())
    lora = cfg.model.lora
    targets = saved.get("target_modules") or []
    targets = sorted(targets) if isinstance(targets, list) else targets
    problems = []
    if saved.get("r") != lora.rank:
        problems.append(f"model.lora.rank={saved.get('r')}")
    if targets != sorted(lora.target_modules):
        problems.append(f"model.lora.target_modules={json.dumps(targets)}")
    if problems:
        raise ConfigError(f"checkpoint.init_from: the LoRA adapter in {adapter} was trained with other settings; set "
                          + " ".join(problems) + " to continue from it")


def check_model_paths(cfg: Config) -> None:
    """Every local weights folder the config names exists and holds what is needed (before any rank starts)."""
    m = cfg.model
    if m.llm.path not in (None, TINY):
        folder = Path(m.llm.path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"model.llm.path: {m.llm.path} is not a folder on this machine; para-train reads local "
                              "folders only (no downloads): fetch the weights first (e.g. `huggingface-cli download "
                              "meta-llama/Llama-2-7b-hf --local-dir /models/llama-2-7b`) and point model.llm.path there")
        _weights_in(folder, "transformers model", "model.llm.path")
        if not any(folder.glob("tokenizer*")):
            raise ConfigError(f"model.llm.path: {folder} holds no tokenizer files (tokenizer.json or tokenizer.model)")
    if m.unet.path is not None:
        _weights_in(Path(m.unet.path).expanduser(), "UNet2DConditionModel", "model.unet.path")
    if m.vae.path != TINY:
        _weights_in(Path(m.vae.path).expanduser(), "AutoencoderKL", "model.vae.path")
