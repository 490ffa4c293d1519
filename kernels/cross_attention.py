"""Fused cross-attention with a key padding mask given as lengths (FlashAttention-2 style).

Queries are image tokens, keys/values text tokens padded on the right: for sample b only keys
j < kv_lengths[b] take part. Layout (B, H, N, D), the layout of F.scaled_dot_product_attention; any
strides work, so (B, N, H, D) storage passed as `.transpose(1, 2)` views needs no copy. Head dims up to
256 (padded to a power of two >= 16 inside the kernels). Nothing of size N_q x N_k is kept in memory:
the forward stores the per-row logsumexp, the backward recomputes the probabilities from it.

A query row whose sample has length 0 attends to nothing: its output is 0 and it gets zero gradients.
"""
import math

import torch
import triton
import triton.language as tl

from ._runtime import check_devices, dot_precision, interpreter_active

LOG2E = 1.4426950408889634


# For one (b, h) and a block of query rows, with c = softmax_scale * log2(e) and L = kv_lengths[b]:
#   s_ij = c * q_i . k_j  (j < L)       m_i = max_j s_ij     l_i = sum_j 2^(s_ij - m_i)
#   o_i = sum_j 2^(s_ij - m_i) v_j / l_i                     lse_i = m_i + log2(l_i)   (base 2)
# computed online over key blocks (running max m, rescaling the partial sums by 2^(m_old - m_new)).
# Only key blocks below L are visited, so padding costs nothing; with L = 0 no block is visited and o = 0.
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, o_ptr, lse_ptr,
    H, NQ, NK, HEAD_DIM, qk_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh - b * H
    kv_len = tl.load(lens_ptr + b)  # in [0, NK]: clamped by the launcher
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_md = (offs_m < NQ)[:, None] & mask_d[None, :]

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)
    k_t_ptrs = k_ptr + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        valid = offs_n < kv_len - start_n
        k_t = tl.load(k_t_ptrs, mask=mask_d[:, None] & valid[None, :], other=0.0)
        s = tl.where(valid[None, :], tl.dot(q, k_t, input_precision=PRECISION) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every visited block holds a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptrs, mask=valid[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        k_t_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=mask_md)
    tl.store(lse_ptr + pid_bh * NQ + offs_m, tl.where(has_keys, m_i + tl.log2(l_safe), 0.0), mask=offs_m < NQ)


# For one (b, h) and a block of query rows, looping over key blocks j < L:
#   delta_i = sum_d dO_id O_id   (= sum_j P_ij dP_ij, the softmax backward's row term; stored for dK/dV)
#   P_ij = 2^(s_ij - lse_i)      dP_ij = dO_i . v_j      dQ_i = softmax_scale * sum_j P_ij (dP_ij - delta_i) k_j
# A separate pass (rather than atomics from the dK/dV kernel) keeps dQ deterministic and in q's dtype.
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lens_ptr, lse_ptr, delta_ptr, dq_ptr,
    H, NQ, NK, HEAD_DIM, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh - b * H
    kv_len = tl.load(lens_ptr + b)  # in [0, NK]: clamped by the launcher
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < NQ
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
                 + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask_md, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh * NQ + offs_m, delta, mask=mask_m)
    lse = tl.load(lse_ptr + pid_bh * NQ + offs_m, mask=mask_m, other=0.0)
    k_ptrs = k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        valid = offs_n < kv_len - start_n
        mask_nd = valid[:, None] & mask_d[None, :]
        k = tl.load(k_ptrs, mask=mask_nd, other=0.0)
        v = tl.load(v_ptrs, mask=mask_nd, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq = tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, dq, input_precision=PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask_md)


# For one (b, h) and a block of keys j < L, looping over all query rows i (delta from the dQ pass):
#   P_ij = 2^(s_ij - lse_i)      dV_j = sum_i P_ij dO_i      dP_ij = dO_i . v_j
#   dK_j = softmax_scale * sum_i P_ij (dP_ij - delta_i) q_i
# Key blocks at or beyond L skip the loop and store zeros.
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lens_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    H, NQ, NK, HEAD_DIM, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh - b * H
    kv_len = tl.load(lens_ptr + b)  # in [0, NK]: clamped by the launcher
    start_n = tl.program_id(0).to(tl.int64) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_n < kv_len
    mask_d = offs_d < HEAD_DIM
    mask_nd = valid[:, None] & mask_d[None, :]

    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_nd, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_nd, other=0.0)
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    row_ptrs = pid_bh * NQ + offs_m
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, tl.where(start_n < kv_len, NQ, 0), BLOCK_M):
        mask_m = offs_m < NQ - start_m
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptrs, mask=mask_md, other=0.0)
        do = tl.load(do_ptrs, mask=mask_md, other=0.0)
        lse = tl.load(lse_ptr + row_ptrs, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + row_ptrs, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.where(valid[:, None] & mask_m[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dk = tl.dot((p_t * (dp_t - delta[None, :])).to(q.dtype), q, dk, input_precision=PRECISION)
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
        row_ptrs += BLOCK_M
    mask_nd = (offs_n < NK)[:, None] & mask_d[None, :]
    tl.store(dk_ptr + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(dv_ptr.dtype.element_ty), mask=mask_nd)


def _config(device: torch.device, head_dim: int) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreter_active() and device.type == "cpu":
        # The interpreter pays per program and per op, not per element: few programs, but small enough
        # key blocks that odd test shapes span several.
        return dict(fwd=(64, 16), bwd=(64, 16), block_d=block_d, warps=4, stages=1)
    if block_d <= 64:
        return dict(fwd=(128, 64), bwd=(64, 64), block_d=block_d, warps=4, stages=3)
    return dict(fwd=(128, 32), bwd=(64, 32), block_d=block_d, warps=8, stages=2)


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def _launch(kernel, grid, *args, **kwargs):
    if all(grid):  # empty inputs: nothing to compute, and Triton rejects empty grids
        kernel[grid](*args, **kwargs)


def _forward(q, k, v, lengths, sm_scale):
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    cfg = _config(q.device, D)
    block_m, block_n = cfg["fwd"]
    # (B, N, H, D) storage: the output reshapes to (B, N, H * D) without a copy.
    o = torch.empty((B, NQ, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    _launch(
        _attn_fwd_kernel, (triton.cdiv(NQ, block_m), B * H),
        q, k, v, lengths, o, lse,
        H, NQ, NK, D, sm_scale * LOG2E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg["block_d"],
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return o, lse


def _backward(do, q, k, v, o, lse, lengths, sm_scale):
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    cfg = _config(q.device, D)
    block_m, block_n = cfg["bwd"]
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg["block_d"],
                  num_warps=cfg["warps"], num_stages=cfg["stages"])
    _launch(  # first: it also writes delta
        _attn_bwd_dq_kernel, (triton.cdiv(NQ, block_m), B * H),
        q, k, v, o, do, lengths, lse, delta, dq,
        H, NQ, NK, D, sm_scale * LOG2E, sm_scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *_strides(do), *_strides(dq), **common,
    )
    _launch(
        _attn_bwd_dkdv_kernel, (triton.cdiv(NK, block_n), B * H),
        q, k, v, do, lengths, lse, delta, dk, dv,
        H, NQ, NK, D, sm_scale * LOG2E, sm_scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), **common,
    )
    return dq, dk, dv


class CrossAttentionFunction(torch.autograd.Function):
    """Autograd op behind `cross_attention`; inputs already validated, layout (B, H, N, D)."""

    @staticmethod
    def forward(ctx, q, k, v, kv_lengths, sm_scale):
        o, lse = _forward(q, k, v, kv_lengths, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, kv_lengths)
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_lengths = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, kv_lengths, ctx.sm_scale)
        return dq, dk, dv, None, None


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lengths: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, keys j >= kv_lengths[b] masked) v, fused in Triton (forward and backward).

    q (B, H, N_q, D); k, v (B, H, N_k, D); kv_lengths integer (B,) on the same device (values above N_k
    count as N_k, values <= 0 give zero rows); softmax_scale defaults to 1/sqrt(D). Returns (B, H, N_q, D)
    in q's dtype. fp32, fp16 and bf16 are supported; D <= 256.
    """
    check_devices("cross_attention", q, k, v, kv_lengths)
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"cross_attention: expected q (B, H, N_q, D) and k, v (B, H, N_k, D), got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"cross_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or "
                         "head dim")
    if kv_lengths.shape != (B,) or kv_lengths.is_floating_point() or kv_lengths.dtype == torch.bool:
        raise ValueError(f"cross_attention: kv_lengths must be an integer tensor of shape ({B},), got "
                         f"{kv_lengths.dtype} {tuple(kv_lengths.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"cross_attention: q, k, v must share one of float32/float16/bfloat16, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if D > 256:
        raise ValueError(f"cross_attention: head dim {D} > 256 is not supported; use cross_attention='sdpa'")
    sm_scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    lengths = kv_lengths.clamp(0, k.shape[2]).to(torch.int32)
    return CrossAttentionFunction.apply(q, k, v, lengths, sm_scale)
