"""The one place that chooses kernels: fused Triton LoRA in the LLM, fused cross-attention in the UNet.

    choice = apply_kernels(llm, unet, lora="auto", cross_attention="auto")
    # e.g. {"lora": "triton", "cross_attention": "triton"} on a GPU, {"lora": "torch", "cross_attention": "sdpa"}
    # on a CPU

LoRA: every peft `lora.Linear` in `llm` becomes a `FusedLoraLinear` (same module, same parameters and
state-dict keys, only `forward` differs). It runs `para_train.kernels.lora_linear` when exactly one plain
LoRA adapter is active, unmerged, with lora_dropout 0, on a frozen nn.Linear; otherwise (dropout > 0, merged,
several adapters, DoRA, lora_bias, disabled adapters, trainable base layer) it runs peft's own forward.

Cross-attention: the `attn2` of every diffusers BasicTransformerBlock in `unet` gets a processor that turns
the padding mask into key lengths and runs the Triton kernel (or flash-attn's varlen function). What
reaches the processor from UNet2DConditionModel is not the [B, L] 1/0 mask but the bias
(1 - mask) * -10000 of shape [B, 1, L] in the UNet's dtype; a boolean [B, L] / [B, 1, L] mask is accepted
too. Masks that are not right-padding prefixes, or other additive biases, run diffusers' SDPA processor.
A sample with no valid key (length 0) gets zeros here, where SDPA with the -10000 bias would average
over the padding; a tokenizer that adds BOS never produces length 0.
"""
import logging
import typing

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from peft.tuners.lora import Linear as LoraLinear

from para_train.config import CrossAttentionKernel, LoraKernel
from para_train.kernels import MAX_LORA_RANK, cross_attention as triton_cross_attention, interpreter_active
from para_train.kernels import lora_linear

logger = logging.getLogger(__name__)

# diffusers writes padding as a -10000 bias; anything at or below this counts as padding.
_PADDING_BIAS = -1000.0


def apply_kernels(
    llm: torch.nn.Module | None,
    unet: torch.nn.Module | None,
    lora: LoraKernel = "auto",
    cross_attention: CrossAttentionKernel = "auto",
) -> dict:
    """Install the chosen kernels in place and return them, e.g. {"lora": "torch", "cross_attention": "sdpa"}.

    lora: auto | triton | torch; cross_attention: auto | triton | flash_attn | sdpa. "auto" means Triton
    when CUDA is available, PyTorch (peft's forward, diffusers' SDPA processor) otherwise. Call it again
    with other choices to switch; `remove_kernels` restores the PyTorch paths.
    """
    cuda = torch.cuda.is_available()
    lora_choice = _resolve("lora", lora, LoraKernel, "triton" if cuda else "torch")
    attn_choice = _resolve("cross_attention", cross_attention, CrossAttentionKernel, "triton" if cuda else "sdpa")
    for key, choice in (("lora", lora_choice), ("cross_attention", attn_choice)):
        if choice == "triton" and not cuda and not interpreter_active():
            raise ValueError(
                f"kernels.{key}=triton needs a CUDA GPU and none is available; use kernels.{key}=auto. "
                "(Tests may run the kernels through Triton's CPU interpreter: set TRITON_INTERPRET=1 before "
                "para_train.kernels is first imported.)")
    if attn_choice == "flash_attn":
        if not cuda:
            raise ValueError("kernels.cross_attention=flash_attn needs a CUDA GPU; use kernels.cross_attention=auto")
        _flash_attn_varlen_func()  # fail now, not in the first forward, if flash-attn is missing

    num_lora = _set_lora(llm, fused=lora_choice == "triton")
    processor = {"triton": TritonCrossAttnProcessor, "flash_attn": FlashAttnVarlenProcessor}.get(attn_choice)
    num_attn = _set_cross_attention(unet, processor() if processor else None)
    logger.info("kernels: lora=%s (%d LoRA layers), cross_attention=%s (%d cross-attention layers)",
                lora_choice, num_lora, attn_choice, num_attn)
    return {"lora": lora_choice, "cross_attention": attn_choice}


def _resolve(key: str, choice: str, choices, auto: str) -> str:
    """`choice`, "auto" resolved for this machine. A config's values were checked when it was built
    (para_train.config); this only stops a direct caller's misspelt name from quietly running PyTorch."""
    if choice not in typing.get_args(choices):
        raise ValueError(f"kernels.{key}={choice!r}: choose one of {', '.join(typing.get_args(choices))}")
    return auto if choice == "auto" else choice


def remove_kernels(llm: torch.nn.Module | None, unet: torch.nn.Module | None) -> None:
    """Undo `apply_kernels`: peft's LoRA forward and diffusers' SDPA cross-attention processor."""
    _set_lora(llm, fused=False)
    _set_cross_attention(unet, None)


# ---------------------------------------------------------------------------------------------- LoRA


class FusedLoraLinear(LoraLinear):
    """peft's lora.Linear running the fused Triton op when it computes the same thing as peft would.

    Only the class of existing modules is swapped (never constructed directly), so parameters, hooks and
    state-dict keys stay peft's. The weights are read inside this module's forward, where DeepSpeed
    ZeRO-3 gathers parameters accessed during the engine's forward.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if (args or kwargs) else self._fusable_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        return lora_linear(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                           self.scaling[adapter])

    def _fusable_adapter(self, x: torch.Tensor) -> str | None:
        """The one active plain LoRA adapter the fused op can run, or None to use peft's forward."""
        if self.disable_adapters or self.merged:
            return None
        active = [name for name in self.active_adapters if name in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        base = self.get_base_layer()
        # DoRA and other variants live in lora_variant (peft >= 0.15) or use_dora (older peft).
        plain = (name not in getattr(self, "lora_variant", {}) and not self.use_dora.get(name, False)
                 and self.lora_B[name].bias is None and isinstance(self.lora_dropout[name], torch.nn.Identity))
        runnable = x.device.type == "cuda" or interpreter_active()
        dtype_ok = x.dtype == base.weight.dtype or torch.is_autocast_enabled(x.device.type)
        frozen = not any(p.requires_grad for p in base.parameters())
        if (plain and runnable and dtype_ok and frozen and type(base) is torch.nn.Linear and not self.fan_in_fan_out
                and self.r[name] <= MAX_LORA_RANK):
            return name
        return None


def _set_lora(llm: torch.nn.Module | None, fused: bool) -> int:
    if llm is None:
        return 0
    old, new = (LoraLinear, FusedLoraLinear) if fused else (FusedLoraLinear, LoraLinear)
    count = 0
    for module in llm.modules():
        if type(module) is old:
            module.__class__ = new
        count += type(module) is new
    return count


# ----------------------------------------------------------------------------------- cross-attention


class _LengthsCrossAttnProcessor:
    """Shared part of the masked cross-attention processors (mirrors diffusers' AttnProcessor2_0).

    Subclasses implement `_attend(q, k, v, lengths, scale)` on (B, N, H, D) tensors. One instance serves
    every layer: diffusers passes the same mask tensor to each of them, so lengths are derived (with one
    host sync for the prefix check) once per mask.
    """

    def __init__(self):
        self._sdpa = AttnProcessor2_0()
        self._mask = None
        self._mask_version = None
        self._lengths = None
        self._warned = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None or not self._can_run(hidden_states):
            return self._sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch_size, num_keys = encoder_hidden_states.shape[:2]
        lengths = self._key_lengths(attention_mask, batch_size, num_keys, encoder_hidden_states.device)
        if lengths is None:
            return self._sdpa(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            _, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim)
        if attn.norm_q is not None:  # over the head dim: the same in (B, N, H, D) as in diffusers' layout
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self._attend(query, key, value, lengths, attn.scale)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _can_run(self, hidden_states: torch.Tensor) -> bool:
        return True

    def _attend(self, q, k, v, lengths, scale):
        raise NotImplementedError

    def _key_lengths(self, mask, batch_size, num_keys, device) -> torch.Tensor | None:
        """int32 (B,) key lengths for a right-padding mask; None if the mask is something else."""
        if mask is None:
            return torch.full((batch_size,), num_keys, dtype=torch.int32, device=device)
        if mask is not self._mask or mask._version != self._mask_version:
            self._mask, self._mask_version = mask, mask._version
            self._lengths = self._prefix_lengths(mask, batch_size, num_keys)
            if self._lengths is None and not self._warned:
                logger.warning("cross-attention mask %s is not a right-padding mask (bool, or 0/-10000 bias); "
                               "such masks run diffusers' SDPA processor", tuple(mask.shape))
                self._warned = True
        return self._lengths

    @staticmethod
    def _prefix_lengths(mask, batch_size, num_keys) -> torch.Tensor | None:
        if mask.dim() == 3 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.shape != (batch_size, num_keys):
            return None
        if mask.dtype == torch.bool:
            keep, known = mask, True
        else:  # additive bias: 0 keeps a key, diffusers' -10000 drops it
            keep = mask == 0
            known = bool((keep | (mask <= _PADDING_BIAS)).all())
        lengths = keep.sum(dim=-1, dtype=torch.int32)
        prefix = torch.arange(num_keys, device=mask.device)[None, :] < lengths[:, None]
        if not known or not bool((keep == prefix).all()):
            return None
        return lengths


class TritonCrossAttnProcessor(_LengthsCrossAttnProcessor):
    """Cross-attention through the fused Triton kernel (para_train.kernels.cross_attention)."""

    def _can_run(self, hidden_states):
        return hidden_states.device.type == "cuda" or interpreter_active()

    def _attend(self, q, k, v, lengths, scale):
        out = triton_cross_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lengths, scale)
        return out.transpose(1, 2)


class FlashAttnVarlenProcessor(_LengthsCrossAttnProcessor):
    """Cross-attention through flash-attn's `flash_attn_varlen_func` on the unpadded keys (fp16/bf16 only)."""

    def __init__(self):
        super().__init__()
        self._flash = _flash_attn_varlen_func()
        self._unpad_for = None
        self._unpad = None

    def _attend(self, q, k, v, lengths, scale):
        batch_size, num_queries, heads, head_dim = q.shape
        num_keys = k.shape[1]
        if self._unpad_for is not lengths:  # indices and max length need a host sync: once per mask
            keep = torch.arange(num_keys, device=lengths.device)[None, :] < lengths[:, None]
            cu_seqlens_k = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            self._unpad = (keep.flatten().nonzero().flatten(), cu_seqlens_k, int(lengths.max()))
            self._unpad_for = lengths
        indices, cu_seqlens_k, max_seqlen_k = self._unpad
        cu_seqlens_q = torch.arange(0, (batch_size + 1) * num_queries, num_queries, dtype=torch.int32,
                                    device=q.device)
        out = self._flash(
            q.reshape(batch_size * num_queries, heads, head_dim),
            k.reshape(batch_size * num_keys, heads, head_dim).index_select(0, indices),
            v.reshape(batch_size * num_keys, heads, head_dim).index_select(0, indices),
            cu_seqlens_q, cu_seqlens_k, num_queries, max_seqlen_k,
            dropout_p=0.0, softmax_scale=scale, causal=False,
        )
        return out.view(batch_size, num_queries, heads, head_dim)


def _flash_attn_varlen_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError("kernels.cross_attention=flash_attn needs the flash-attn package: "
                          "pip install .[gpu] (or choose kernels.cross_attention=triton or sdpa)") from err
    return flash_attn_varlen_func


def _set_cross_attention(unet: torch.nn.Module | None, processor) -> int:
    """Give each BasicTransformerBlock's attn2 `processor`; None restores SDPA where ours was set."""
    if unet is None:
        return 0
    count = 0
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
            if processor is not None:
                module.attn2.set_processor(processor)
                count += 1
            elif isinstance(module.attn2.processor, _LengthsCrossAttnProcessor):
                module.attn2.set_processor(AttnProcessor2_0())
    return count
