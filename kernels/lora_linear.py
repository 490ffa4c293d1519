"""Fused LoRA linear: y = x W^T + b + s * (x A^T) B^T with W, b frozen and A, B trained.

x (..., K), W (N, K), b (N,) or None, A (R, K), B (N, R), s = lora_alpha / r. Everything is computed in
x's dtype with fp32 accumulation; A and B may be stored in another dtype (peft keeps adapters in fp32)
and get their gradients in their own dtype. W and b get no gradients.

Passes over memory (peft's unfused path in brackets):
  forward   one pass over x for x W^T and x A^T, low-rank product in the epilogue   [x read twice]
  backward  kernel 1: one pass over dY for dS = s dY B and dB = s dY^T (x A^T)       [dY read 3 times]
            kernel 2: one pass over dY and x for dX = dY W + dS A and dA = dS^T x
"""
import torch
import triton
import triton.language as tl

from ._runtime import check_devices, dot_precision, interpreter_active, num_sms

MAX_RANK = 256


# Y[m, n] = sum_k X[m, k] W[n, k] + b[n] + s * sum_r XA[m, r] B[n, r],   XA[m, r] = sum_k X[m, k] A[r, k]
# A program owns BLOCK_M rows and GROUP_N consecutive column blocks. x A^T is accumulated from the same
# x tiles as the first column block's x W^T, then reused by the group's other blocks: a larger group
# means less recomputation of x A^T (R / (BLOCK_N * GROUP_N) extra flops) but fewer programs.
@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr,
    M, N, K, R, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_xam, stride_xar,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    dtype = x_ptr.dtype.element_ty

    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in tl.static_range(GROUP_N):
        offs_n = (pid_g * GROUP_N + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w_t = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                          mask=mask_n[None, :] & mask_k[:, None], other=0.0)
            acc = tl.dot(x, w_t, acc, input_precision=PRECISION)
            if j == 0:
                a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                              mask=mask_r[None, :] & mask_k[:, None], other=0.0)
                xa = tl.dot(x, a_t, xa, input_precision=PRECISION)
        b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                      mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc += scale * tl.dot(xa.to(dtype), b_t, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(dtype),
                 mask=mask_m[:, None] & mask_n[None, :])
    if pid_g == 0:
        tl.store(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar, xa.to(dtype),
                 mask=mask_m[:, None] & mask_r[None, :])


# dS[m, r] = s * sum_n dY[m, n] B[n, r]        dB[n, r] = s * sum_m dY[m, n] XA[m, r]
# Each dY tile is read once and feeds both products. A program owns BLOCK_M rows and a contiguous
# range of column blocks; partial sums are atomically added into fp32 dS and dB.
@triton.jit
def _lora_bwd_ds_db_kernel(
    dy_ptr, b_ptr, xa_ptr, ds_ptr, db_ptr,
    M, N, R, scale, blocks_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
    COMPUTE_DB: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    dtype = dy_ptr.dtype.element_ty

    if COMPUTE_DB:
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_start = pid_s * blocks_per_split * BLOCK_N
    n_end = tl.minimum(n_start + blocks_per_split * BLOCK_N, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        ds = tl.dot(dy, b, ds, input_precision=PRECISION)
        if COMPUTE_DB:
            db = tl.dot(tl.trans(dy), xa, input_precision=PRECISION)
            tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], db * scale,
                          mask=mask_n[:, None] & mask_r[None, :])
    tl.atomic_add(ds_ptr + offs_m[:, None] * R + offs_r[None, :], ds * scale,
                  mask=mask_m[:, None] & mask_r[None, :])


# dX[m, k] = sum_n dY[m, n] W[n, k] + sum_r dS[m, r] A[r, k]        dA[r, k] = sum_m dS[m, r] X[m, k]
# A program owns a BLOCK_M x BLOCK_K tile of dX; its x tile gives that row block's share of dA,
# atomically added into fp32 dA.
@triton.jit
def _lora_bwd_dx_da_kernel(
    dy_ptr, w_ptr, a_ptr, x_ptr, ds_ptr, dx_ptr, da_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_xm, stride_xk,
    stride_dxm, stride_dxk,
    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask_r = offs_r < R
    dtype = dy_ptr.dtype.element_ty

    ds = tl.load(ds_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                 other=0.0).to(dtype)
    if COMPUTE_DX:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(ds, a, acc, input_precision=PRECISION)
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, acc.to(dtype),
                 mask=mask_m[:, None] & mask_k[None, :])
    if COMPUTE_DA:
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        da = tl.dot(tl.trans(ds), x, input_precision=PRECISION)
        tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da, mask=mask_r[:, None] & mask_k[None, :])


def _config(device: torch.device) -> dict:
    if interpreter_active() and device.type == "cpu":
        # The interpreter runs programs one by one through numpy: small blocks keep odd test shapes
        # spread over several programs (masking, grouping and atomics all exercised).
        return dict(fwd=(32, 32, 32), ds=(32, 32), dx=(32, 32, 32), warps=4, stages=1)
    return dict(fwd=(128, 128, 32), ds=(64, 64), dx=(64, 64, 64), warps=8, stages=3)


def _forward(x, weight, bias, lora_a, lora_b, scale):
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    cfg = _config(x.device)
    block_m, block_n, block_k = cfg["fwd"]
    block_r = max(16, triton.next_power_of_2(R))
    if block_r > 64:  # the x A^T accumulator lives in registers next to the output tile
        block_m = min(block_m, 64)
    m_blocks, n_blocks = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    # Largest group that still leaves about two programs per SM.
    group_n = max(1, min(8, n_blocks, (m_blocks * n_blocks) // (2 * num_sms(x.device))))
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, R), device=x.device, dtype=x.dtype)
    grid = (m_blocks, triton.cdiv(n_blocks, group_n))
    _lora_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, lora_a, lora_b, y, xa,
        M, N, K, R, scale,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), xa.stride(0), xa.stride(1),
        HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_N=group_n,
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return y, xa


def _backward(dy, x, weight, lora_a, lora_b, xa, scale, need_dx, need_da, need_db):
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    cfg = _config(x.device)
    block_r = max(16, triton.next_power_of_2(R))
    precision = dot_precision(x.dtype)
    ds = torch.zeros((M, R), device=x.device, dtype=torch.float32)
    db = torch.zeros((N, R), device=x.device, dtype=torch.float32) if need_db else None
    da = torch.zeros((R, K), device=x.device, dtype=torch.float32) if need_da else None
    dx = torch.empty_like(x) if need_dx else None

    block_m, block_n = cfg["ds"]
    m_blocks, n_blocks = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
    # Split the columns so that there are about four programs per SM.
    splits = max(1, min(n_blocks, (4 * num_sms(x.device)) // m_blocks))
    blocks_per_split = triton.cdiv(n_blocks, splits)
    _lora_bwd_ds_db_kernel[(m_blocks, triton.cdiv(n_blocks, blocks_per_split))](
        dy, lora_b, xa, ds, db if need_db else ds,
        M, N, R, scale, blocks_per_split,
        dy.stride(0), dy.stride(1), lora_b.stride(0), lora_b.stride(1), xa.stride(0), xa.stride(1),
        COMPUTE_DB=need_db, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=cfg["warps"] // 2, num_stages=cfg["stages"],
    )

    if need_dx or need_da:
        block_m, block_n, block_k = cfg["dx"]
        _lora_bwd_dx_da_kernel[(triton.cdiv(M, block_m), triton.cdiv(K, block_k))](
            dy, weight, lora_a, x, ds, dx if need_dx else x, da if need_da else ds,
            M, N, K, R,
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1),
            x.stride(0), x.stride(1), (dx if need_dx else x).stride(0), (dx if need_dx else x).stride(1),
            COMPUTE_DX=need_dx, COMPUTE_DA=need_da, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
            num_warps=cfg["warps"], num_stages=cfg["stages"],
        )
    return dx, da, db


class LoRALinearFunction(torch.autograd.Function):
    """Autograd op behind `lora_linear`; x is 2-D (M, K) here, everything on one device in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        a = lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        if x.shape[0] == 0:
            y, xa = x.new_zeros((0, weight.shape[0])), x.new_zeros((0, a.shape[0]))
        else:
            y, xa = _forward(x, weight, bias, a, b, scale)
        # `weight` is saved as the parameter itself (not a copy), as F.linear does: under ZeRO-3 it is
        # gathered again before this module's backward.
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.scale = scale
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, xa = ctx.saved_tensors
        need_dx, _, _, need_da, need_db, _ = ctx.needs_input_grad
        if x.shape[0] == 0:
            dx, da, db = torch.zeros_like(x), torch.zeros_like(a), torch.zeros_like(b)
        else:
            dx, da, db = _backward(dy.to(x.dtype), x, weight, a, b, xa, ctx.scale, need_dx, need_da, need_db)
        da = da.to(ctx.lora_dtypes[0]) if need_da else None
        db = db.to(ctx.lora_dtypes[1]) if need_db else None
        return (dx if need_dx else None), None, None, da, db, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """y = x W^T + b + scale * (x A^T) B^T in one fused Triton op (forward and backward).

    x (..., K); weight (N, K) and bias (N,) frozen (they get no gradient); lora_a (R, K); lora_b (N, R);
    R <= 256. Under torch.autocast the operands are cast to the autocast dtype, as F.linear would.
    """
    check_devices("lora_linear", x, weight, lora_a, lora_b, *([bias] if bias is not None else []))
    K = x.shape[-1]
    N, R = lora_b.shape[0], lora_a.shape[0]
    if weight.shape != (N, K) or lora_a.shape != (R, K) or lora_b.shape != (N, R):
        raise ValueError(f"lora_linear: shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}; expected weight (N, K), "
                         "lora_a (R, K), lora_b (N, R)")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"lora_linear: bias has shape {tuple(bias.shape)}, expected ({N},)")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("lora_linear: weight and bias are frozen here and would get no gradient; call "
                         "requires_grad_(False) on them, or use lora='torch' to train the base layer")
    if R > MAX_RANK:
        raise ValueError(f"lora_linear: rank {R} > {MAX_RANK} is not supported by the fused kernel; use lora='torch'")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_a, lora_b = x.to(dtype), weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"lora_linear: unsupported dtype {x.dtype}; use float32, float16 or bfloat16")
    if weight.dtype != x.dtype:
        raise ValueError(f"lora_linear: x is {x.dtype} but weight is {weight.dtype}; cast one of them "
                         "(or run under torch.autocast)")
    with torch.autocast(device_type, enabled=False):
        y = LoRALinearFunction.apply(x.reshape(-1, K), weight, bias, lora_a, lora_b, float(scale))
    return y.reshape(*x.shape[:-1], N)
