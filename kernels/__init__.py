"""Triton kernels (installed as para_train.kernels; knows nothing of para_train).

    lora_linear(x, weight, bias, lora_a, lora_b, scale)          fused LoRA linear, forward + backward
    cross_attention(q, k, v, kv_lengths, softmax_scale=None)     fused masked cross-attention, (B, H, N, D)

They run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this package was
first imported (Triton's interpreter: for tests, slow). `reference` holds the PyTorch references and
`bench_kernels` the GPU benchmark (`python kernels/bench_kernels.py`).
"""
from ._runtime import interpreter_active
from .cross_attention import CrossAttentionFunction, cross_attention
from .lora_linear import MAX_RANK as MAX_LORA_RANK
from .lora_linear import LoRALinearFunction, lora_linear

__all__ = [
    "CrossAttentionFunction",
    "LoRALinearFunction",
    "MAX_LORA_RANK",
    "cross_attention",
    "interpreter_active",
    "lora_linear",
]
