"""The plan as the text `para-train plan` prints."""
from __future__ import annotations

from para_train.plan.budget import GiB, StagePlan, bytes_per_param, suggest_fix


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def format_plan(plan: StagePlan, config_name: str) -> str:
    s, g, inv, mem = plan.setup, plan.gpu, plan.inv, plan.memory
    n = s.world_size
    lines = [f"para-train plan: {config_name}, stage {plan.stage}, {s.nodes} node(s) x {s.gpus_per_node} {s.gpu} "
             f"({g.note}: {g.memory_gib:g} GiB, {g.bf16_tflops:g} bf16 TFLOP/s dense) = {n} GPUs, {plan.precision}, "
             "ZeRO-3"]
    lines += [f"  note: {x}" for x in plan.arch.notes]
    lora = f" + LoRA {_params(inv.lora)} trained" if inv.lora else ""
    lines += ["", "model",
              f"  LLM {_params(inv.llm)} frozen{lora}; UNet {_params(inv.unet)} trained; "
              f"VAE {_params(inv.vae)} frozen (outside DeepSpeed, one copy per GPU)",
              f"  trained {_params(inv.trainable)}, frozen {_params(inv.frozen)}; "
              f"largest layer {_params(inv.largest_layer)}; "
              f"{_params(inv.persistent)} in tensors kept whole (stage3_param_persistence_threshold)"]
    f = plan.flops_per_sample
    inputs = {"none": "images and text encoded every step", "latents": "precomputed latents, text encoded every step",
              "latents+text": "precomputed latents and text features"}[s.precomputed]
    total_f = sum(x.train for x in f.values())
    scale, unit = (1e12, "T") if total_f >= 1e11 else (1e9, "G")  # the tiny model's are GFLOPs
    lines += ["", f"FLOPs per sample ({inputs}; traced, as torch.utils.flop_counter counts)"]
    for name, label in (("llm", "LLM"), ("vae", "VAE encode"), ("unet", "UNet"), ("projection", "projection")):
        if f[name].train:
            x = f[name]
            lines.append(f"  {label:<11} forward {x.forward / scale:8.3f} {unit}  backward {x.backward / scale:8.3f} "
                         f"{unit}  recompute {x.recompute / scale:7.3f} {unit}")
    lines.append(f"  total {total_f / scale:.3f} {unit}FLOP per sample")

    ckpt_label = {(False, False): "no checkpointing", (True, False): "UNet checkpointed",
                  (True, True): "UNet + LLM checkpointed", (False, True): "LLM checkpointed"}
    configured = (plan.unet_checkpointing, plan.llm_checkpointing)
    offload = ", ".join(x for x, on in (("optimizer", plan.offload_optimizer), ("parameters", plan.offload_params))
                        if on)
    down = 2 ** (len(plan.arch.vae["block_out_channels"]) - 1)
    lines += ["", f"memory per GPU (micro batch {plan.micro_batch}, {plan.resolution} px = {plan.resolution // down}x"
              f"{plan.resolution // down} latents, {plan.text_tokens} text tokens"
              f"{', offload: ' + offload if offload else ''})",
              f"  trained states    {_gib(mem.trainable_states):>11}   {_states_note(plan)}",
              f"  frozen shards     {_gib(mem.frozen_states):>11}   {_params(inv.frozen)} x "
              f"{bytes_per_param(plan.precision)} B / {n} (no gradients, no optimizer state)",
              f"  kept whole        {_gib(mem.persistent):>11}   small tensors ZeRO-3 does not partition",
              f"  DeepSpeed buffers {_gib(mem.gather_buffers):>11}   4 x largest layer (DeepSpeed's estimate) + "
              "reduce and prefetch buckets",
              f"  VAE               {_gib(mem.vae):>11}",
              f"  activations       {_gib(mem.activations):>11}   {ckpt_label[configured]}: peak of one "
              "forward+backward, traced on fake tensors"]
    for key, per in plan.activations_per_sample.items():
        if key != configured:
            lines.append(f"    ({ckpt_label[key]}: {_gib(per * plan.micro_batch)})")
    lines += [f"  reserve           {_gib(mem.reserve):>11}   {s.headroom:.0%} for CUDA context, NCCL, fragmentation "
              "(--headroom)",
              f"  total             {_gib(mem.total):>11}   of {g.memory_gib:g} GiB"]
    if mem.cpu_per_node and offload:
        lines.append(f"  CPU memory per node for offloaded states: {_gib(mem.cpu_per_node)} (DeepSpeed's estimate)")
    spare = g.memory_gib * GiB - (mem.total - mem.activations)
    per = plan.activations_per_sample[configured]
    if spare > 0 and per > 0:
        lines.append(f"  largest micro batch that fits as configured: {int(spare // per)}")

    comm = plan.comm_bytes_per_step
    lines += ["", f"communication per step per GPU (x{plan.grad_accum} micro-steps, {plan.precision} collectives)"]
    lines += [f"  {k:<25} {v / 1e9:8.2f} GB" for k, v in comm.items()]
    lines.append(f"  total {sum(comm.values()) / 1e9:.2f} GB: {plan.comm_s:.2f} s at {s.net_gbps:g} Gbit/s per GPU "
                 "(--net-gbps)" + ("; one node talks over NVLink/PCIe, usually faster" if s.nodes == 1 else ""))

    lines += ["", f"time at {s.mfu:.0%} of peak (--mfu, an assumption: measure yours)",
              f"  compute {plan.flops_per_step_per_gpu / 1e12:.1f} TFLOP per GPU per step: {plan.compute_s:.2f} s; "
              f"communication {plan.comm_s:.2f} s; "
              + ("overlapped (overlap_comm)" if plan.overlap else "not overlapped"),
              f"  step {plan.step_s:.2f} s, global batch {plan.global_batch}: "
              f"{plan.global_batch / plan.step_s:.0f} samples/s",
              f"  {plan.samples:.3g} samples = {plan.steps} steps: {_duration(plan.steps * plan.step_s)} on {n} GPUs "
              f"({plan.steps * plan.step_s * n / 3600:,.0f} GPU-hours)"]
    if plan.comm_s > plan.compute_s:
        hint = "a larger micro batch (ZeRO-3 gathers the weights once per micro-step)"
        if plan.stage == 1 and s.precomputed != "latents+text":
            hint += ", precomputed text features (no LLM to gather)"
        lines.append(f"  communication-bound: {hint} or a faster network would shorten the step")

    lines.append("")
    if plan.fits:
        lines.append(f"verdict: fits ({_gib(mem.total)} of {g.memory_gib:g} GiB per GPU)")
    else:
        fix = suggest_fix(plan)
        lines.append(f"verdict: DOES NOT FIT: needs {_gib(mem.total)} per GPU, the {s.gpu} has {g.memory_gib:g} GiB")
        if fix is None:
            lines.append("  not even with micro batch 1, checkpointing and full CPU offload: use more GPUs "
                         "(model states "
                         "shrink with their number) or GPUs with more memory")
        else:
            changes, fixed = fix
            lines.append(f"  change: {' '.join(changes)}  -> {_gib(fixed.total)} per GPU, same global batch")
    return "\n".join(lines)


def _states_note(plan: StagePlan) -> str:
    n = plan.setup.world_size
    ema = " + 4 B EMA" if plan.ema else ""
    if plan.offload_params:
        return f"optimizer and parameters offloaded to the CPU{ema and ' (EMA shard stays)'}"
    if plan.precision == "bf16":
        per = "2 B (offloaded optimizer)" if plan.offload_optimizer else "18 B"
        return f"{_params(plan.inv.trainable)} x ({per}, DeepSpeed's estimator{ema}) / {n}"
    per = "4 B (offloaded optimizer)" if plan.offload_optimizer else "20 B (4 weight + 4 grad + 4 master + 8 Adam)"
    return f"{_params(plan.inv.trainable)} x ({per}{ema}) / {n}"
