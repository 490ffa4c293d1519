"""Benchmark the fused kernels against what they replace, at ParaDiffusion's real shapes.

    python kernels/bench_kernels.py [--dtype bf16|fp16]

LoRA linear (forward + backward, r=64, 4 x 512 tokens): Llama-2-7B's 4096->4096 and 4096->11008
projections, fused op vs peft's lora.Linear (base nn.Linear + lora_A/lora_B, dropout 0).
Cross-attention (forward + backward, head dim 64, 512 text tokens with random lengths, batch 4): SDXL's
4096 image tokens x 10 heads and 1024 x 20 heads, fused op vs F.scaled_dot_product_attention with the
additive padding mask diffusers' AttnProcessor2_0 builds. Each case is first checked against its
baseline. Targets: LoRA >= 1.25x peft, cross-attention >= 1.5x masked SDPA. Needs a CUDA GPU; without
one it reports that nothing was measured and exits 0.
"""
import argparse

import torch
import torch.nn.functional as F

BATCH = 4
LORA_TOKENS, LORA_RANK, LORA_ALPHA = 512, 64, 128
LORA_SHAPES = [(4096, 4096), (4096, 11008)]  # (in, out): q/k/v/o and gate/up projections
TEXT_TOKENS, HEAD_DIM = 512, 64
ATTENTION_SHAPES = [(4096, 10), (1024, 20)]  # (image tokens, heads)


def bench_lora(dtype, do_bench, device="cuda"):
    from peft import LoraConfig, inject_adapter_in_model

    from para_train.kernels import lora_linear
    from para_train.kernels.reference import assert_close

    print(f"LoRA linear, r={LORA_RANK}, {BATCH}x{LORA_TOKENS} tokens, {dtype}, forward+backward")
    print(f"{'in->out':>14} {'peft ms':>9} {'fused ms':>9} {'peft TF/s':>10} {'fused TF/s':>11} {'speedup':>8}")
    for k, n in LORA_SHAPES:
        holder = torch.nn.ModuleDict({"proj": torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)})
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["proj"])
        layer = inject_adapter_in_model(config, holder)["proj"].to(device, dtype)
        base = layer.get_base_layer().requires_grad_(False)
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        x = torch.randn(BATCH, LORA_TOKENS, k, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(BATCH, LORA_TOKENS, n, device=device, dtype=dtype)

        def peft():
            return layer(x)

        def fused():
            return lora_linear(x, base.weight, None, a, b, layer.scaling["default"])

        assert_close(fused(), peft(), atol=5e-2, rtol=2e-2, name=f"lora {k}->{n} output")
        m = BATCH * LORA_TOKENS
        flops = 2 * m * (2 * n * k + 3 * LORA_RANK * (k + n))  # x W^T, dY W and the six low-rank products
        times = [do_bench(lambda f=f: f().backward(dy), grad_to_none=[x, a, b]) for f in (peft, fused)]
        _report(f"{k}->{n}", times, flops)


def bench_cross_attention(dtype, do_bench, device="cuda"):
    from para_train.kernels import cross_attention
    from para_train.kernels.reference import assert_close, lengths_to_mask

    print(f"\ncross-attention, head dim {HEAD_DIM}, {TEXT_TOKENS} text tokens (random lengths), batch {BATCH}, "
          f"{dtype}, forward+backward; TF/s count all {TEXT_TOKENS} keys")
    print(f"{'tokens x heads':>14} {'sdpa ms':>9} {'fused ms':>9} {'sdpa TF/s':>10} {'fused TF/s':>11} {'speedup':>8}")
    g = torch.Generator(device=device).manual_seed(0)
    for n_img, heads in ATTENTION_SHAPES:
        lengths = torch.randint(1, TEXT_TOKENS + 1, (BATCH,), device=device, generator=g)
        # (B, N, H, D) storage seen as (B, H, N, D), as the diffusers processors produce it
        q, k, v = (torch.randn(BATCH, n, heads, HEAD_DIM, device=device, dtype=dtype, generator=g)
                   .transpose(1, 2).requires_grad_() for n in (n_img, TEXT_TOKENS, TEXT_TOKENS))
        keep = lengths_to_mask(lengths, TEXT_TOKENS)
        bias = ((~keep).to(dtype) * -10000.0)[:, None, None, :].expand(BATCH, heads, 1, TEXT_TOKENS).contiguous()
        do = torch.randn(BATCH, heads, n_img, HEAD_DIM, device=device, dtype=dtype, generator=g)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

        def fused():
            return cross_attention(q, k, v, lengths)

        assert_close(fused(), sdpa(), atol=2e-2, rtol=2e-2, name=f"attention {n_img}x{heads} output")
        flops = 3.5 * 4 * BATCH * heads * n_img * TEXT_TOKENS * HEAD_DIM  # forward 2 matmuls, backward 5
        times = [do_bench(lambda f=f: f().backward(do), grad_to_none=[q, k, v]) for f in (sdpa, fused)]
        _report(f"{n_img}x{heads}", times, flops)


def _report(label, times, flops):
    (base_ms, fused_ms) = times
    print(f"{label:>14} {base_ms:9.3f} {fused_ms:9.3f} {flops / base_ms / 1e9:10.1f} {flops / fused_ms / 1e9:11.1f} "
          f"{base_ms / fused_ms:7.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: not measured (no GPU): the kernels' speed can only be measured on a CUDA GPU.")
        return
    from triton.testing import do_bench

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"GPU: {torch.cuda.get_device_name()}")
    bench_lora(dtype, do_bench)
    bench_cross_attention(dtype, do_bench)


if __name__ == "__main__":
    main()
