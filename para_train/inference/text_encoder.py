"""The exported text encoder, `text_encoder/` in an exported folder:

    text_encoder.json        {"llm": ..., "lora": "lora" | null, "projection": "projection.safetensors" | null,
                              "layer": -1}
    llm/                     the LLM (config + safetensors) when it is copied in (the tiny model, --copy-llm)
                             or holds the merged LoRA weights (--merge-lora)
    lora/                    the peft LoRA adapter (adapter_config.json + adapter_model.safetensors)
    projection.safetensors   LLM width -> cross_attention_dim: "weight", "bias"

"llm" is "llm" (the folder above), or a reference to the frozen base LLM the run trained with: an
absolute local path or a hub id, never copied (Llama-2-7B is 13 GB). Plain transformers + peft load it:

    llm = PeftModel.from_pretrained(AutoModel.from_pretrained(<llm>), "<export>/text_encoder/lora")
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from para_train.config import LoRAConfig
from para_train.files.safetensors_io import safetensors_files
from para_train.models.paradiffusion import TextEncoder

log = logging.getLogger(__name__)

META_FILE = "text_encoder.json"
LLM_DIR, LORA_DIR, PROJECTION_FILE = "llm", "lora", "projection.safetensors"
_MODEL_FILES = ("config.json", "generation_config.json")


def llm_reference(path: str) -> str:
    """How an exported folder names the base LLM: an absolute path if it is local, else the hub id."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def save_text_encoder(out: Path, *, llm_path: str, layer: int, adapter: dict[str, torch.Tensor] | None,
                      lora: LoRAConfig | None, projection: dict[str, torch.Tensor] | None, copy_llm: bool,
                      merge_lora: bool) -> None:
    """Write `text_encoder/`. `adapter` holds peft-format names (`base_model.model.X.lora_A.weight`)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"llm": llm_reference(llm_path), "lora": None, "projection": None, "layer": layer}
    if adapter:
        assert lora is not None, "LoRA weights without a LoRA config"
        _save_adapter(out / LORA_DIR, adapter, lora, meta["llm"])
        meta["lora"] = LORA_DIR
    if adapter and merge_lora:
        _save_merged(llm_path, out / LORA_DIR, out / LLM_DIR)
        shutil.rmtree(out / LORA_DIR)
        meta["llm"], meta["lora"] = LLM_DIR, None
    elif copy_llm:
        copy_weights_folder(Path(llm_path), out / LLM_DIR)
        meta["llm"] = LLM_DIR
    if projection:
        save_file({k: v.contiguous() for k, v in projection.items()}, out / PROJECTION_FILE)
        meta["projection"] = PROJECTION_FILE
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def _save_adapter(out: Path, adapter: dict[str, torch.Tensor], lora: LoRAConfig, base_ref: str) -> None:
    from peft import LoraConfig

    # The same LoraConfig as para_train.models.build.add_lora made for training.
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none", base_model_name_or_path=base_ref)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in adapter.items()}, out / "adapter_model.safetensors")


def _save_merged(llm_path: str, adapter_dir: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    log.info("merging the LoRA adapter into %s", llm_path)
    base = AutoModel.from_pretrained(llm_path, dtype="auto", use_safetensors=True)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)


def copy_weights_folder(src: Path, dst: Path) -> None:
    """Copy a Hugging Face model folder's config and safetensors weights (nothing else, nothing pickled)."""
    if not src.is_dir():
        raise FileNotFoundError(f"cannot copy {src}: not a local folder (export without --copy-llm to store a "
                                "reference to the LLM instead)")
    dst.mkdir(parents=True, exist_ok=True)
    files = [src / n for n in _MODEL_FILES if (src / n).is_file()] + safetensors_files(str(src))
    files += sorted(src.glob("*.safetensors.index.json"))
    for f in files:
        shutil.copy2(f, dst / f.name)


class ExportedTextEncoder(TextEncoder):
    """The training TextEncoder plus the `device` and `dtype` that diffusers asks of pipeline modules."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {Path(folder).parent} is not a folder written by "
                                "`para-train export`")
    return json.loads(path.read_text())


def resolve_llm(folder: Path, ref: str) -> str:
    """A relative reference points inside the text_encoder folder; anything else is used as given."""
    inside = Path(folder) / ref
    return str(inside) if not Path(ref).is_absolute() and inside.is_dir() else ref


def load_text_encoder(folder: Path, dtype: torch.dtype | None = None,
                      llm_path: str | None = None) -> ExportedTextEncoder:
    """The exported text encoder as the module training used (LLM [+ peft LoRA] [+ projection]).

    `llm_path` replaces the base-LLM reference, e.g. when the export moved to a machine where the
    LLM lives elsewhere. Only safetensors are read.
    """
    from transformers import AutoModel

    folder = Path(folder)
    meta = read_meta(folder)
    dtype = dtype or torch.float32
    ref = llm_path or resolve_llm(folder, meta["llm"])
    try:
        llm = AutoModel.from_pretrained(ref, dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise FileNotFoundError(f"the base LLM {ref!r} named in {folder / META_FILE} cannot be loaded here ({e}); "
                                "pass llm_path= (para-train generate/evaluate --llm-path DIR) with a local copy of "
                                "it") from None
    if meta["lora"]:
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, str(folder / meta["lora"]))
    projection = None
    if meta["projection"]:
        state = load_file(str(folder / meta["projection"]))
        out_dim, in_dim = state["weight"].shape
        projection = nn.Linear(in_dim, out_dim)
        projection.load_state_dict(state)
        projection.to(dtype)
    return ExportedTextEncoder(llm, meta["layer"], projection).eval().requires_grad_(False)
