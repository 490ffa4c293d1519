"""The GPU acceptance check: what no CPU machine can prove, in one short run on one CUDA GPU.

    bash benchmarks/gpu_check.sh                 # on the GPU machine: installs .whl/, then runs this
    python benchmarks/gpu_check.py --out DIR     # with the project's packages already importable

(a) kernels: both Triton kernels compiled for this GPU against their PyTorch references, forward and
    backward, in bf16 and fp32, at Llama-2-7B LoRA shapes (M = 2x512 and 8x512 tokens, K = N = 4096,
    r = 64) and SDXL cross-attention shapes (4096 and 1024 queries, 512 keys with real padding, head
    dim 64); timed against peft's LoRA layer and masked SDPA (and flash-attn's varlen kernel if present).
(b) training: stages 1, 2 and 3 of a mid-size model (tens of millions of parameters) on this GPU through
    the real `deepspeed` launcher (NCCL, bf16, fused AdamW, ZeRO-3), a few dozen steps each; stage 1
    is run twice, once SIGKILLed mid-way and resumed, and its losses must equal the uninterrupted run's
    (deterministic kernels: run.deterministic=true).
(c) throughput: benchmarks/bench_training.py at a micro batch that keeps the GPU busy.

Prints one table at the end and writes it to DIR/gpu_check.md (the full log is the caller's tee).
Each check is a row: a failure is recorded and the next check still runs; the exit code is 1 if any
failed. Without a GPU it says so and exits 0 (nothing measured), unless --cpu-smoke: then (b) runs on
the CPU with the tiny default model, to prove the script itself (launches, kill, resume, table).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

ROWS: list[tuple[str, str, str, str]] = []  # (part, check, PASS/FAIL, figures)


def row(part: str, check: str, ok: bool, figures: str = "") -> None:
    ROWS.append((part, check, "PASS" if ok else "FAIL", figures))
    print(f"[gpu_check] {part} | {check} | {'PASS' if ok else 'FAIL'} | {figures}", flush=True)


def guarded(part: str, check: str):
    """Run a check; an exception becomes a FAIL row with its last line."""
    def wrap(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            traceback.print_exc()
            row(part, check, False, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    return wrap


# ------------------------------------------------------------------ (a) kernels


def _against_reference(ref, fused, inputs, grad_out, atol, rtol) -> tuple[bool, list[float]]:
    """Forward + backward of both functions; max error of the output and of each input's gradient, and
    whether each is within atol + rtol * (the reference's largest magnitude)."""
    results = {}
    for label, fn in (("ref", ref), ("fused", fused)):
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(grad_out)
        results[label] = (out.detach(), *(t.grad.clone() for t in inputs))
    errs = [float((f.float() - r.float()).abs().max()) for f, r in zip(results["fused"], results["ref"])]
    ok = all(e <= atol + rtol * float(r.float().abs().max()) for e, r in zip(errs, results["ref"]))
    return ok, errs


def check_kernels(do_bench) -> None:
    import torch
    import torch.nn.functional as F

    from para_train.kernels import cross_attention, lora_linear
    from para_train.kernels.reference import cross_attention_reference, lengths_to_mask, lora_linear_reference

    dev = "cuda"
    tol = {torch.bfloat16: (6e-2, 2e-2), torch.float32: (2e-3, 2e-3)}  # (atol, rtol); fp32 matmuls may use TF32
    for dtype in (torch.bfloat16, torch.float32):
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        atol, rtol = tol[dtype]
        for m in (2 * 512, 8 * 512):
            @guarded("a kernels", f"LoRA {name} M={m} K=N=4096 r=64")
            def _():
                from peft import LoraConfig, inject_adapter_in_model

                g = torch.Generator(device=dev).manual_seed(0)
                k = n = 4096
                r, scale = 64, 2.0
                holder = torch.nn.ModuleDict({"proj": torch.nn.Linear(k, n, bias=False, device=dev, dtype=dtype)})
                layer = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r * scale, target_modules=["proj"]),
                                                holder)["proj"].to(dev, dtype)
                w = layer.get_base_layer().weight.requires_grad_(False)
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                with torch.no_grad():
                    b.normal_(std=0.02, generator=g)
                x = torch.randn(m, k, device=dev, dtype=dtype, generator=g, requires_grad=True)
                dy = torch.randn(m, n, device=dev, dtype=dtype, generator=g)
                ok, errs = _against_reference(lambda: lora_linear_reference(x, w, None, a, b, scale),
                                              lambda: lora_linear(x, w, None, a, b, scale), (x, a, b), dy, atol, rtol)
                t_peft = do_bench(lambda: layer(x).backward(dy), grad_to_none=[x, a, b])
                t_fused = do_bench(lambda: lora_linear(x, w, None, a, b, scale).backward(dy), grad_to_none=[x, a, b])
                row("a kernels", f"LoRA {name} M={m} K=N=4096 r=64", ok,
                    f"max err y/dx/dA/dB {'/'.join(f'{e:.1e}' for e in errs)}; fwd+bwd peft {t_peft:.3f} ms, "
                    f"fused {t_fused:.3f} ms ({t_peft / t_fused:.2f}x)")

        for n_img, heads in ((4096, 10), (1024, 20)):
            @guarded("a kernels", f"cross-attn {name} {n_img}q x 512k, {heads} heads, d=64")
            def _():
                g = torch.Generator(device=dev).manual_seed(1)
                batch, n_txt, d = 4, 512, 64
                lengths = torch.tensor([512, 301, 77, 190], device=dev)  # real padding: 3 of 4 captions padded
                q, k, v = (torch.randn(batch, n, heads, d, device=dev, dtype=dtype, generator=g)
                           .transpose(1, 2).requires_grad_() for n in (n_img, n_txt, n_txt))
                do = torch.randn(batch, heads, n_img, d, device=dev, dtype=dtype, generator=g)
                ok, errs = _against_reference(lambda: cross_attention_reference(q, k, v, lengths),
                                              lambda: cross_attention(q, k, v, lengths), (q, k, v), do, atol, rtol)
                keep = lengths_to_mask(lengths, n_txt)
                bias = ((~keep).to(dtype) * -10000.0)[:, None, None, :].expand(batch, heads, 1, n_txt).contiguous()
                t_sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias).backward(do),
                                  grad_to_none=[q, k, v])
                t_fused = do_bench(lambda: cross_attention(q, k, v, lengths).backward(do), grad_to_none=[q, k, v])
                figures = (f"max err o/dq/dk/dv {'/'.join(f'{e:.1e}' for e in errs)}; fwd+bwd masked SDPA "
                           f"{t_sdpa:.3f} ms, fused {t_fused:.3f} ms ({t_sdpa / t_fused:.2f}x)")
                flash = _flash_varlen_ms(q, k, v, lengths, do, do_bench) if dtype == torch.bfloat16 else None
                if flash is not None:
                    figures += f", flash-attn varlen {flash:.3f} ms"
                row("a kernels", f"cross-attn {name} {n_img}q x 512k, {heads} heads, d=64", ok, figures)


def _flash_varlen_ms(q, k, v, lengths, do, do_bench):
    """flash-attn's varlen kernel on the same problem (unpadded keys), when flash-attn is installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    import torch

    b, h, n_q, d = q.shape
    qf = q.detach().transpose(1, 2).reshape(b * n_q, h, d).contiguous().requires_grad_()
    ks = [k.detach()[i, :, :int(lengths[i])].transpose(0, 1) for i in range(b)]
    vs = [v.detach()[i, :, :int(lengths[i])].transpose(0, 1) for i in range(b)]
    kf, vf = torch.cat(ks).contiguous().requires_grad_(), torch.cat(vs).contiguous().requires_grad_()
    cu_q = torch.arange(0, (b + 1) * n_q, n_q, device=q.device, dtype=torch.int32)
    cu_k = torch.cat([torch.zeros(1, device=q.device, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    dof = do.transpose(1, 2).reshape(b * n_q, h, d).contiguous()
    return do_bench(lambda: flash_attn_varlen_func(qf, kf, vf, cu_q, cu_k, n_q, int(lengths.max())).backward(dof),
                    grad_to_none=[qf, kf, vf])


# ------------------------------------------------------------------ (b) three stages through the launcher

GPU_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[64, 128, 256], layers_per_block=2,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 8], cross_attention_dim=256,
                use_linear_projection=True, norm_num_groups=32)


def _launch(stage: int, overrides: list[str], log: Path, gpus: int = 1) -> subprocess.Popen:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    launcher = [str(deepspeed)] if deepspeed.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd = [*launcher, "--num_gpus", str(gpus), str(REPO / "para_train" / "main.py"), "--stage", str(stage), *overrides]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


def _losses(stage_dir: Path) -> dict[int, float]:
    path = stage_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows}


def _wait(proc: subprocess.Popen, log: Path, timeout: float) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"timed out after {timeout:.0f} s; see {log}") from None
    if rc != 0:
        tail = log.read_text()[-1500:]
        raise RuntimeError(f"exit code {rc}; see {log}: ...{tail.splitlines()[-1] if tail else ''}")


def check_training(work: Path, steps: int, cache: Path, cpu_smoke: bool = False) -> None:
    from common import build_assets

    if cpu_smoke:  # the tiny default model on the CPU: proves the script, measures nothing about GPUs
        common = [f"data.cache_dir={cache}", "data.synthetic_samples=64", "train.log_every=5", "tracking.enabled=false",
                  "sample.num_images=1", "sample.steps=2", "run.deterministic=true", "train.precision=bf16"]
    else:
        llm_dir, vae_dir = build_assets(cache)
        common = [f"data.cache_dir={cache}", f"model.llm.path={llm_dir}", f"model.vae.path={vae_dir}",
                  f"model.unet.config={json.dumps(GPU_UNET)}", "model.llm.max_length=128", "data.resolution=64",
                  "train.micro_batch_size=16", "data.synthetic_samples=512", "train.log_every=5",
                  "tracking.enabled=false", "sample.num_images=2", "sample.steps=4", "run.deterministic=true",
                  "train.precision=bf16"]
    ref, killed = work / "ref", work / "killed"
    s1 = [f"train.steps={steps}", f"checkpoint.every={steps // 3}"]

    @guarded("b training", f"stage 1, {steps} steps, 1 rank via deepspeed")
    def _():
        t0 = time.monotonic()
        log = work / "stage1_ref.log"
        _wait(_launch(1, common + s1 + [f"run.dir={ref}"], log), log, 300)
        text = log.read_text()
        params = json.loads((ref / "stage1" / "ranks" / "rank0.json").read_text())["total_numel"]
        ok = len(_losses(ref / "stage1")) == steps and "bf16" in (ref / "stage1" / "ranks" / "rank0.json").read_text()
        row("b training", f"stage 1, {steps} steps, 1 rank via deepspeed", ok and "stage 1 done" in text,
            f"{params / 1e6:.1f}M params; {time.monotonic() - t0:.0f} s incl. start-up; last loss "
            f"{_losses(ref / 'stage1')[steps]:.4f}")

    @guarded("b training", "stage 1 SIGKILL + resume: same losses")
    def _():
        log = work / "stage1_killed.log"
        proc = _launch(1, common + s1 + [f"run.dir={killed}"], log)
        kill_after = steps // 3 * 2 + 1  # past the second checkpoint
        deadline = time.monotonic() + 300
        while max(_losses(killed / "stage1"), default=0) < kill_after:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run to kill ended or stalled before step {kill_after}; see {log}")
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log2 = work / "stage1_resumed.log"
        _wait(_launch(1, common + s1 + [f"run.dir={killed}"], log2), log2, 300)
        a, b = _losses(ref / "stage1"), _losses(killed / "stage1")
        diff = max(abs(a[s] - b[s]) for s in a) if a.keys() == b.keys() else float("inf")
        row("b training", "stage 1 SIGKILL + resume: same losses", a == b and "resumed from" in log2.read_text(),
            f"killed after step {kill_after} of {steps}; max |loss diff| {diff:.2e} over {len(a)} steps")

    for stage in (2, 3):
        @guarded("b training", f"stage {stage}, {steps} steps (LoRA + UNet), from stage {stage - 1}")
        def _():
            t0 = time.monotonic()
            log = work / f"stage{stage}.log"
            _wait(_launch(stage, common + [f"train.steps={steps}", f"checkpoint.every={steps}", f"run.dir={ref}"],
                          log), log, 300)
            text = log.read_text()
            ok = (len(_losses(ref / f"stage{stage}")) == steps and "fp32 master weights" in text
                  and (ref / f"stage{stage}" / "export" / "model_index.json").is_file())
            row("b training", f"stage {stage}, {steps} steps (LoRA + UNet), from stage {stage - 1}", ok,
                f"{time.monotonic() - t0:.0f} s incl. start-up; last loss {_losses(ref / f'stage{stage}')[steps]:.4f}")


# ------------------------------------------------------------------ (c) throughput


def check_throughput(work: Path, cache: Path, micro_batch: int) -> None:
    @guarded("c throughput", f"bench_training.py --micro-batch {micro_batch}")
    def _():
        log = work / "bench_training.log"
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench_training.py"), "--rounds", "2", "--steps", "2",
               "--only", "stage1,stage2", "--micro-batch", str(micro_batch), "--cache-dir", str(cache)]
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=240, cwd=REPO)
        text = log.read_text()
        lines = [x.strip() for x in text.splitlines() if "samples/s" in x or "x " in x and "speed" in x]
        row("c throughput", f"bench_training.py --micro-batch {micro_batch}", proc.returncode == 0,
            "; ".join(lines[-6:])[:600])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="folder for gpu_check.md")
    parser.add_argument("--steps", type=int, default=30, help="steps per stage in (b)")
    parser.add_argument("--micro-batch", type=int, default=64, help="micro batch of (c)")
    parser.add_argument("--only", default="a,b,c")
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: run (b) on the CPU, tiny, to test this script")
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cache = work / "cache"
    t0 = time.monotonic()
    if not torch.cuda.is_available():
        if not args.cpu_smoke:
            print("gpu_check: not measured (no CUDA GPU here)")
            return 0
        device = "no GPU (--cpu-smoke: the script's own check on the CPU, tiny model; no GPU figure)"
        check_training(work, args.steps, cache, cpu_smoke=True)
    else:
        from triton.testing import do_bench

        device = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB)"
        only = set(args.only.split(","))
        if "a" in only:
            check_kernels(do_bench)
        if "b" in only:
            check_training(work, args.steps, cache)
        if "c" in only:
            check_throughput(work, cache, args.micro_batch)
    import deepspeed
    import diffusers
    import transformers

    head = (f"# para-train GPU check\n\n{device}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton "
            f"{__import__('triton').__version__}, deepspeed {deepspeed.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}; {time.monotonic() - t0:.0f} s; logs in {work}\n\n")
    table = "| part | check | result | figures |\n|---|---|---|---|\n" + "".join(
        f"| {p} | {c} | {r} | {f} |\n" for p, c, r, f in ROWS)
    (out / "gpu_check.md").write_text(head + table)
    print("\n" + head + table)
    return 0 if ROWS and all(r == "PASS" for _, _, r, _ in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
