"""Parameter names of the ParaDiffusion module and of the files its parts are saved in.

Live names are the module's own (`unet.conv_in.weight`, `text_encoder.projection.weight`,
`text_encoder.llm.base_model.model.<...>.lora_A.default.weight`); peft saves an adapter without the
adapter name (`base_model.model.<...>.lora_A.weight`), and a causal-LM adapter (ParaDiffusion's
release) has one more `model.` (`base_model.model.model.<...>`).
"""
from __future__ import annotations

import re

UNET_PREFIX = "unet."
PROJECTION_PREFIX = "text_encoder.projection."
LLM_PREFIX = "text_encoder.llm."
_LIVE_LORA = re.compile(r"\.(lora_[AB])\.default\.")
_SAVED_LORA = re.compile(r"\.(lora_[AB])\.")


def is_lora(name: str) -> bool:
    """A LoRA tensor (peft's lora_A / lora_B / lora_embedding_*), whatever the prefix."""
    return "lora_" in name


def trains(name: str) -> bool:
    """The freezing rule of every stage: the LLM base is frozen; its LoRA, the UNet and the projection train."""
    return not name.startswith(LLM_PREFIX) or is_lora(name)


def saved_lora_name(llm_param: str) -> str:
    """An LLM parameter's name (no `text_encoder.llm.` prefix) -> the key peft saves it under."""
    return _LIVE_LORA.sub(r".\1.", llm_param)


def live_name(adapter_key: str) -> str:
    """peft's saved name -> the training module's parameter name."""
    return LLM_PREFIX + _SAVED_LORA.sub(r".\1.default.", adapter_key)


def adapter_name(live: str) -> str:
    assert live.startswith(LLM_PREFIX), live
    return saved_lora_name(live[len(LLM_PREFIX):])


def causal_lm_variant(adapter_key: str) -> str:
    """The same key as a causal-LM adapter names it (one more `model.`)."""
    return adapter_key.replace("base_model.model.", "base_model.model.model.", 1)
