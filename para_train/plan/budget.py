"""The plan as numbers: per-GPU memory under ZeRO-3, communication per step and step time, and the least
costly change that makes a stage fit."""
from __future__ import annotations

import math
from dataclasses import dataclass

from para_train.plan.model import Architecture, Inventory, architecture, build_meta_model, inventory
from para_train.plan.trace import PARTS, Flops, traced_step


@dataclass(frozen=True)
class GPU:
    memory_gib: float  # as marketed; the driver reports a little less (one reason for --headroom)
    bf16_tflops: float  # dense (no sparsity) tensor-core peak, from the vendor's datasheet
    note: str


GPUS = {
    "h100-80gb": GPU(80, 989.0, "H100 SXM5 80GB"),
    "a100-80gb": GPU(80, 312.0, "A100 SXM4 80GB"),
    "a100-40gb": GPU(40, 312.0, "A100 SXM4 40GB"),
    "l40s-48gb": GPU(48, 362.0, "L40S 48GB"),
}

GiB = 2 ** 30


@dataclass
class Setup:
    nodes: int
    gpus_per_node: int
    gpu: str
    mfu: float = 0.4
    net_gbps: float = 400.0  # inter-node bandwidth per GPU, Gbit/s
    headroom: float = 0.1  # fraction of GPU memory kept free for the CUDA context, NCCL and fragmentation
    samples: float | None = None  # None: train.steps x global batch
    precomputed: str = "none"  # none | latents | latents+text

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Memory:
    """Bytes per GPU."""
    trainable_states: int  # parameters, gradients and optimizer state of the trained parameters (+ EMA shard)
    frozen_states: int  # the frozen parameters' shards (no gradients, no optimizer state)
    persistent: int  # small parameters ZeRO-3 keeps whole
    gather_buffers: int  # DeepSpeed: gathered largest layer, prefetch and reduce buckets
    vae: int  # the frozen VAE, replicated
    activations: int  # traced peak of one micro-step at the configured checkpointing
    reserve: int
    cpu_per_node: int  # offloaded optimizer state / parameters (DeepSpeed's estimate)

    @property
    def total(self) -> int:
        return (self.trainable_states + self.frozen_states + self.persistent + self.gather_buffers + self.vae
                + self.activations + self.reserve)


@dataclass
class StagePlan:
    stage: int
    setup: Setup
    gpu: GPU
    arch: Architecture
    inv: Inventory
    precision: str
    micro_batch: int
    grad_accum: int
    offload_optimizer: bool
    offload_params: bool
    unet_checkpointing: bool
    llm_checkpointing: bool
    lora_trains: bool
    ema: bool
    activations_per_sample: dict[tuple[bool, bool], int]  # (UNet, LLM checkpointing) -> traced peak / micro batch
    flops_per_sample: dict[str, Flops]  # PARTS -> FLOPs
    memory: Memory | None  # set by make_plan once the rest is known
    comm_bytes_per_step: dict[str, int]
    ds_config: dict
    samples: float
    resolution: int
    text_tokens: int

    @property
    def steps(self) -> int:
        return math.ceil(self.samples / self.global_batch)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.setup.world_size

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.gpu.memory_gib * GiB

    @property
    def flops_per_step_per_gpu(self) -> int:
        return self.micro_batch * self.grad_accum * sum(f.train for f in self.flops_per_sample.values())

    @property
    def compute_s(self) -> float:
        return self.flops_per_step_per_gpu / (self.gpu.bf16_tflops * 1e12 * self.setup.mfu)

    @property
    def comm_s(self) -> float:
        return sum(self.comm_bytes_per_step.values()) / (self.setup.net_gbps / 8 * 1e9)

    @property
    def overlap(self) -> bool:
        return bool(self.ds_config["zero_optimization"].get("overlap_comm", False))

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.comm_s) if self.overlap else self.compute_s + self.comm_s


def bytes_per_param(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def model_state_memory(inv: Inventory, setup: Setup, precision: str, offload_optimizer: bool, offload_params: bool,
                       ema: bool) -> tuple[int, int, int, int]:
    """(trainable states, frozen shards, gathered-layer working set, CPU bytes per node) per GPU under ZeRO-3."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    n = setup.world_size
    offload_optimizer = offload_optimizer or offload_params  # DeepSpeed offloads parameters only with the optimizer
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        inv.trainable, inv.largest_layer, setup.gpus_per_node, setup.nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_params, zero_init=True)
    if precision == "bf16":  # DeepSpeed's estimator assumes mixed precision (bf16/fp16 weights, fp32 master + Adam)
        trainable = gpu - largest
    else:  # fp32 (measured by benchmarks/bench_zero3_memory.py): 4 weight + 4 grad + 4 fp32 master copy + 8 Adam
        trainable = 0 if offload_params else math.ceil(inv.trainable * (4 if offload_optimizer else 20) / n)
    if ema:  # para-train's EMA: an fp32 shadow of this GPU's shard of every trained parameter
        trainable += math.ceil(inv.trainable * 4 / n)
    frozen = 0 if offload_params else math.ceil(inv.frozen * bytes_per_param(precision) / n)
    cpu_per_node = cpu + (inv.frozen * bytes_per_param(precision) // setup.nodes if offload_params else 0)
    return trainable, frozen, largest, cpu_per_node


def comm_per_step(inv: Inventory, setup: Setup, precision: str, grad_accum: int, encode_text: bool,
                  lora_trains: bool) -> dict[str, int]:
    """Bytes each GPU sends (= receives) per optimizer step in ZeRO-3's collectives (ring algorithms)."""
    n = setup.world_size
    share = (n - 1) / n
    size = bytes_per_param(precision)
    unet_proj = inv.trainable - inv.lora  # the UNet (+ projection): gathered forward and backward
    llm = inv.llm + inv.lora
    forward = unet_proj + (llm if encode_text else 0)
    backward = unet_proj + (llm - inv.frozen_llm_embedding if lora_trains else 0)
    return {"all-gather forward": int(grad_accum * forward * size * share),
            "all-gather backward": int(grad_accum * backward * size * share),
            "reduce-scatter gradients": int(grad_accum * inv.trainable * size * share)}


def make_plan(cfg, setup: Setup) -> StagePlan:
    """Everything `para-train plan` prints, as numbers."""
    import torch

    from para_train.config import ConfigError
    from para_train.training.distributed import DistEnv
    from para_train.training.engine import deepspeed_config

    if setup.gpu not in GPUS:
        raise ConfigError(f"--gpu {setup.gpu}: unknown; choose one of {', '.join(GPUS)}")
    if setup.precomputed == "latents+text" and cfg.run.stage != 1:
        raise ConfigError(f"--precomputed latents+text: stage {cfg.run.stage} trains LoRA on the LLM, so its text "
                          "features change every step; only stage 1 can use precomputed text features")
    cluster = DistEnv(rank=0, world_size=setup.world_size, local_rank=0, local_world_size=setup.gpus_per_node,
                      use_cuda=True, mlflow_tracking_uri=None, slurm_job_id=None, cpu_threads=1)
    ds = deepspeed_config(cfg, cluster)  # exactly what the trainer would hand DeepSpeed on those GPUs
    precision = "bf16" if ds["bf16"]["enabled"] else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    zero = ds["zero_optimization"]
    if zero.get("stage") != 3:
        raise ConfigError(f"deepspeed.zero_stage={zero.get('stage')}: `para-train plan` models ZeRO-3 only")
    arch = architecture(cfg)
    m, t = cfg.model, cfg.train
    b = t.micro_batch_size
    model = build_meta_model(cfg, arch, dtype)
    inv = inventory(model, arch.vae, int(zero.get("stage3_param_persistence_threshold", 100_000)))
    del model
    encode_images = setup.precomputed == "none"
    encode_text = setup.precomputed != "latents+text"
    lora_trains = m.lora.enabled
    configured = (m.unet.gradient_checkpointing, m.llm.gradient_checkpointing and lora_trains)
    traces = {ckpt: traced_step(cfg, arch, dtype, b, encode_images, encode_text, *ckpt)
              for ckpt in dict.fromkeys([configured, (False, False), (True, lora_trains)])}
    run, plain = traces[configured], traces[(False, False)]  # the recomputation: their backwards' difference
    flops = {p: Flops(run.forward[p] // b, plain.backward[p] // b, (run.backward[p] - plain.backward[p]) // b)
             for p in PARTS}
    per_sample = {ckpt: trace.peak // b for ckpt, trace in traces.items()}
    res, tokens = cfg.data.resolution, m.llm.max_length
    plan = StagePlan(stage=cfg.run.stage, setup=setup, gpu=GPUS[setup.gpu], arch=arch, inv=inv, precision=precision,
                     micro_batch=b, grad_accum=t.grad_accum, offload_optimizer="offload_optimizer" in zero,
                     offload_params="offload_param" in zero, unet_checkpointing=configured[0],
                     llm_checkpointing=configured[1], lora_trains=lora_trains, ema=t.ema_decay > 0,
                     activations_per_sample=per_sample, flops_per_sample=flops, memory=None,
                     comm_bytes_per_step=comm_per_step(inv, setup, precision, t.grad_accum, encode_text, lora_trains),
                     ds_config=ds, samples=setup.samples or t.steps * b * t.grad_accum * setup.world_size,
                     resolution=res, text_tokens=tokens)
    plan.memory = memory_for(plan, configured, b, plan.offload_optimizer, plan.offload_params)
    return plan


def memory_for(plan: StagePlan, checkpointing: tuple[bool, bool], micro_batch: int, offload_optimizer: bool,
               offload_params: bool) -> Memory:
    """The per-GPU memory of `plan` with other settings (activations scale with the micro batch)."""
    inv, setup = plan.inv, plan.setup
    zero = plan.ds_config["zero_optimization"]
    size = bytes_per_param(plan.precision)
    trainable, frozen, largest, cpu = model_state_memory(inv, setup, plan.precision, offload_optimizer, offload_params,
                                                         ema=plan.ema)
    buckets = int(zero.get("reduce_bucket_size", 5e8)) * size + int(zero.get("stage3_prefetch_bucket_size", 5e7)) * size
    return Memory(trainable_states=trainable, frozen_states=frozen, persistent=inv.persistent * size,
                  gather_buffers=largest + buckets, vae=inv.vae * size,
                  activations=plan.activations_per_sample[checkpointing] * micro_batch,
                  reserve=int(plan.gpu.memory_gib * GiB * setup.headroom), cpu_per_node=cpu)


def suggest_fix(plan: StagePlan) -> tuple[list[str], Memory] | None:
    """The least costly change (as key=value overrides) that makes `plan` fit, and the memory it then needs:
    checkpointing, then smaller micro batches at the same global batch, then CPU offload."""
    b, all_on = plan.micro_batch, (True, plan.lora_trains)
    configured = (plan.unet_checkpointing, plan.llm_checkpointing)
    batches = [m for m in range(b, 0, -1) if b % m == 0]  # divisors: grad_accum keeps the global batch
    candidates = [(all_on, b, False, False)]
    candidates += [(configured, m, False, False) for m in batches[1:]]
    candidates += [(all_on, m, False, False) for m in batches[1:]]
    candidates += [(all_on, m, True, False) for m in batches]
    candidates += [(all_on, m, True, True) for m in batches]
    for ckpt, m, off_opt, off_par in candidates:
        if (ckpt, m, off_opt, off_par) == (configured, b, plan.offload_optimizer, plan.offload_params):
            continue
        mem = memory_for(plan, ckpt, m, off_opt or plan.offload_optimizer, off_par or plan.offload_params)
        if mem.total > plan.gpu.memory_gib * GiB:
            continue
        changes = []
        if ckpt != configured:
            changes.append("model.unet.gradient_checkpointing=true")
            if plan.lora_trains:
                changes.append("model.llm.gradient_checkpointing=true")
        if m != b:
            accum = plan.grad_accum * b // m
            changes += [f"train.micro_batch_size={m}", f"train.grad_accum={accum}"]
        if off_opt and not plan.offload_optimizer:
            changes.append("deepspeed.offload_optimizer=true")
        if off_par and not plan.offload_params:
            changes.append("deepspeed.offload_params=true")
        return changes, mem
    return None
