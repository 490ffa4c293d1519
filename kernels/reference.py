"""Pure-PyTorch references for the fused kernels, shared by the tests and the benchmark."""
import math

import torch
import torch.nn.functional as F


def lora_linear_reference(x, weight, bias, lora_a, lora_b, scale):
    """y = x W^T + b + scale * (x A^T) B^T, unfused, in x's dtype."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a.to(x.dtype)), lora_b.to(x.dtype))


def lengths_to_mask(kv_lengths: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean key mask (B, N_k): True where key j < kv_lengths[b]."""
    return torch.arange(num_keys, device=kv_lengths.device)[None, :] < kv_lengths[:, None]


def cross_attention_reference(q, k, v, kv_lengths, softmax_scale=None):
    """Masked softmax attention over (B, H, N, D) tensors; rows with no valid key give zeros.

    Padding scores get the most negative finite value instead of -inf, and rows without keys are
    multiplied by 0, so such rows get zero (not NaN) gradients through autograd.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    keep = lengths_to_mask(kv_lengths, k.shape[2])[:, None, None, :]  # (B, 1, 1, N_k)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * keep.any(dim=-1, keepdim=True)
    return torch.matmul(probs, v)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "tensor"):
    """Like torch.testing.assert_close, but reports how many elements differ and where the first ones are."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~((a - e).abs() <= atol + rtol * e.abs()) & ~(a.isnan() & e.isnan())
    if bad.any():
        first = bad.nonzero()[:5].tolist()
        detail = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in first)
        diff = (a - e).abs()
        nans = int((a.isnan() ^ e.isnan()).sum())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={atol:g} rtol={rtol:g} "
            f"(max abs diff {diff.nan_to_num(0.0).max().item():.3g}, {nans} NaN on one side only); first at {detail}")
