"""Will a stage fit on your GPUs, and how long will it take? Answered before you spend a GPU-hour.

    para-train plan --stage 1 --config configs/stage1_pretrain.yaml --nodes 64 --gpus-per-node 8 --gpu h100-80gb
    para-train plan --stage 2 --config configs/stage2_alignment.yaml --nodes 8 --gpus-per-node 8 --gpu a100-40gb \\
        train.micro_batch_size=1 --samples 2e7

Per GPU it prints: memory for model states under ZeRO-3 (DeepSpeed's own estimator for the trained
parameters, plus only the bf16 copy of the frozen ones), activation memory at the configured micro
batch, resolution and text length with and without gradient checkpointing, communication volume per
step, and step and total time at a stated utilisation. Activations and FLOPs come from one real
forward+backward per setting traced on fake tensors (no GPU and no weights needed): the peak of the
live tensors, and what torch.utils.flop_counter counts (matmuls, convolutions, attention; 2 per
multiply-add). When the stage does not fit it says so, names the change that makes it fit, and exits
with status 1. --stage is required, as for training: the stage decides the defaults and what trains.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path


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

# SDXL's VAE (madebyollin/sdxl-vae-fp16-fix has the same architecture): used when model.vae.path has
# no config.json on this machine, e.g. planning before the weights are copied.
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, sample_size=1024)


# ====================================================================== the model, built without memory


@dataclass
class Architecture:
    llm: dict  # the LLM's transformers config as a dict
    unet: dict  # UNet2DConditionModel kwargs
    vae: dict  # AutoencoderKL kwargs
    notes: list[str]


def architecture(cfg) -> Architecture:
    """The three architectures, from local config.json files where they exist, else from the YAML."""
    import json

    from para_train.config import ConfigError
    from para_train.models import build
    from para_train.models.tiny import TINY_VAE

    m, notes = cfg.model, []
    llm_path = build.resolve_llm_path(m.llm, cfg.cache_dir)  # "tiny" is generated into the cache on first use
    if llm_path is not None and (Path(llm_path) / "config.json").is_file():
        llm = build.llm_config(m.llm, llm_path).to_dict()
    elif m.llm.config is not None:
        llm = build.llm_config(m.llm, None).to_dict()
        if llm_path is not None:
            notes.append(f"LLM: no config.json at {llm_path} here; using model.llm.config")
    else:
        raise ConfigError(f"model.llm.config: no config.json at {llm_path}; set model.llm.config to the LLM's "
                          "architecture "
                          "(hidden_size, intermediate_size, num_hidden_layers, ...) to plan without the weights")
    vae_path = Path(m.vae.path).expanduser()
    if m.vae.path == "tiny":
        vae = dict(TINY_VAE)
    elif (vae_path / "config.json").is_file():
        vae = {k: v for k, v in json.loads((vae_path / "config.json").read_text()).items() if not k.startswith("_")}
    else:
        vae = dict(SDXL_VAE)
        notes.append(f"VAE: no config.json at {m.vae.path} here; assuming SDXL's VAE architecture")
    return Architecture(llm, build.unet_config(m.unet), vae, notes)


def build_meta_model(cfg, arch: Architecture, dtype):
    """The ParaDiffusion module on the meta device, from the builders and the freezing rule the engine uses.

    training.engine.build_model itself cannot run here: it needs a process group (deepspeed.zero.Init), the
    tokenizer and the weight files on this machine, and a real-scale model would need its memory. So this makes
    the same parts with the same models/build.py builders, in the engine's order (LoRA after the base LLM),
    and freezes them with the engine's rule (files.names.trains)."""
    import torch
    from transformers import AutoConfig

    from para_train.files import names
    from para_train.models import build
    from para_train.models.paradiffusion import ParaDiffusion, TextEncoder

    m = cfg.model
    with torch.device("meta"):  # the parts with parameters; the wrapper's noise schedule is small and stays real
        llm = build.build_llm(AutoConfig.for_model(**arch.llm))
        width, cross = arch.llm["hidden_size"], arch.unet.get("cross_attention_dim", 1280)
        projection = build.build_projection(width, cross) if m.projection else None
        if m.lora.enabled:
            llm = build.add_lora(llm, m.lora)
        unet = build.build_unet(arch.unet)
    model = ParaDiffusion(TextEncoder(llm, m.llm.layer, projection), unet, m.prediction_type, m.min_snr_gamma,
                          m.num_train_timesteps, image_size=cfg.data.resolution,
                          zero_terminal_snr=m.zero_terminal_snr).to(dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(names.trains(name))
    return model


@dataclass
class Inventory:
    trainable: int
    frozen: int
    frozen_llm_embedding: int  # never gathered for a backward pass
    largest_layer: int  # most parameters held directly by one module (DeepSpeed's `largest_layer_params`)
    persistent: int  # parameters small enough that ZeRO-3 keeps them whole on every GPU
    llm: int
    unet: int
    lora: int
    vae: int


def inventory(model, vae_config: dict, persistence_threshold: int) -> Inventory:
    import torch
    from diffusers import AutoencoderKL

    from para_train.files import names

    params = [(n, p.numel(), p.requires_grad) for n, p in model.named_parameters()]
    with torch.device("meta"):
        vae = sum(p.numel() for p in AutoencoderKL(**vae_config).parameters())
    return Inventory(trainable=sum(k for _, k, g in params if g), frozen=sum(k for _, k, g in params if not g),
                     frozen_llm_embedding=model.text_encoder.llm.get_input_embeddings().weight.numel(),
                     largest_layer=max(sum(p.numel() for p in mod.parameters(recurse=False))
                                       for mod in model.modules()),
                     persistent=sum(k for _, k, _ in params if k <= persistence_threshold),
                     llm=sum(k for n, k, _ in params if n.startswith(names.LLM_PREFIX) and not names.is_lora(n)),
                     unet=sum(k for n, k, _ in params if n.startswith(names.UNET_PREFIX)),
                     lora=sum(k for n, k, _ in params if names.is_lora(n)), vae=vae)


# ====================================================================== one training step, traced


class _LiveBytes:
    """A dispatch mode that tracks the bytes of live tensor storages and their peak.

    Storages are checked for release (through weak references) only when a new allocation would
    set a new peak, which keeps the peak exact and the bookkeeping cheap."""

    def __init__(self, exclude: set[int]):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self.mode = Mode()
        self.exclude = exclude
        self.refs: dict[int, tuple[object, int]] = {}
        self.live = self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
            self.live -= self.refs.pop(key)[1]

    def _record(self, out) -> None:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.exclude or key in self.refs:
                continue
            size = storage.nbytes()
            if self.live + size > self.peak:
                self._sweep()
            self.refs[key] = (StorageWeakRef(storage), size)
            self.live += size
            self.peak = max(self.peak, self.live)


def _fakeify(module, fake_mode) -> None:
    """Replace meta parameters and buffers by fake CPU tensors (shapes and dtypes only, no memory)."""
    import torch

    with fake_mode:
        for mod in module.modules():
            for key, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[key] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                              requires_grad=p.requires_grad)
            for key, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[key] = torch.empty(b.shape, dtype=b.dtype)


PARTS = ("llm", "vae", "projection", "unet")


@dataclass
class Flops:
    """FLOPs of one part of a training step, per sample, as torch.utils.flop_counter counts them."""
    forward: int = 0
    backward: int = 0  # without checkpointing
    recompute: int = 0  # what checkpointing adds to the backward: the forward it runs again (PyTorch stops early)

    @property
    def train(self) -> int:
        return self.forward + self.backward + self.recompute


class _Totals:
    """FlopCounterMode's module tracker reduced to what its totals need: every op counted under "Global"."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def flop_counter():
    """torch.utils.flop_counter.FlopCounterMode as the trace needs it. Two changes, both because of the trace:
    - torch's table knows the GPU attention kernels (flash, memory-efficient, cuDNN), not the fused CPU one the
      fake trace runs: that one gets the same formulas (torch's own);
    - its ModuleTracker (per-module figures, unused here) holds on to every module's inputs and outputs, which
      checkpointing would free: the traced stage-1 peak with UNet checkpointing rose from 5.0 to 12.5 GiB."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v)})
    assert hasattr(counter, "mod_tracker"), "torch.utils.flop_counter changed: see para_train.plan.flop_counter"
    counter.mod_tracker = _Totals()
    return counter


class _FlopParts:
    """Splits a flop counter's running total between the parts of a step: read where one part ends and the next
    begins, and in the backward when the gradient of a part's input is complete. Autograd on the CPU runs the
    nodes made later in the forward first, so by then that part's backward has run whole and no earlier part's."""

    def __init__(self, counter):
        self.counter, self.seen = counter, 0
        self.forward, self.backward = dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 0)

    def end(self, into: dict, part: str) -> None:
        total = self.counter.get_total_flops()
        into[part] += total - self.seen
        self.seen = total

    def backward_ends(self, inputs: list) -> str:
        """Marks the end of each part's backward at its input, in backward order: [(part, input), ...]. Returns the
        part the backward ends in (the first whose input needs no gradient)."""
        for part, x in inputs:
            if not x.requires_grad:
                return part
            x.register_hook(lambda grad, part=part: self.end(self.backward, part))
        return inputs[-1][0]


@dataclass
class Trace:
    peak: int  # bytes of activations and other temporaries
    forward: dict[str, int]  # part -> FLOPs of the micro batch
    backward: dict[str, int]  # with the recomputation of checkpointed parts


def trace_step(cfg, arch: Architecture, dtype, micro_batch: int, encode_images: bool, encode_text: bool,
               unet_checkpointing: bool, llm_checkpointing: bool) -> Trace:
    """One training micro-step traced on fake tensors: its peak memory and its FLOPs by part.

    Runs the trainer's forward (VAE encode under no_grad, the LLM, the UNet and the loss) and the
    backward pass with the real modules, dtypes and checkpointing. Parameter gradients are dropped
    as soon as they are produced, as ZeRO-3 moves them into its reduce buckets (counted separately).
    Attention runs PyTorch's fused CPU kernel, which like flash/memory-efficient attention on a GPU
    keeps no L x L matrix."""
    import torch
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = build_meta_model(cfg, arch, dtype)
    if llm_checkpointing:  # as the engine enables them
        model.text_encoder.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if unet_checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.train()
    with torch.device("meta"):
        vae = AutoencoderKL(**arch.vae).to(dtype).eval()
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # the noise schedule's real tensors become fake where used
    _fakeify(model, fake)
    _fakeify(vae, fake)
    m, b, res = cfg.model, micro_batch, cfg.data.resolution
    down = 2 ** (len(arch.vae["block_out_channels"]) - 1)
    latent_shape = (b, arch.unet.get("in_channels", 4), res // down, res // down)
    with fake:
        held = [*model.parameters(), *model.buffers(), *vae.parameters(), *vae.buffers()]
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        live = _LiveBytes({t.untyped_storage()._cdata for t in held})
        ids = torch.zeros(b, m.llm.max_length, dtype=torch.long)
        mask = torch.ones(b, m.llm.max_length, dtype=torch.long)
        noise, t = torch.empty(latent_shape), torch.zeros(b, dtype=torch.long)
        with live.mode, flop_counter() as counter:
            parts, last = _FlopParts(counter), []
            if encode_images:
                with torch.no_grad():
                    pixels = torch.empty(b, 3, res, res, dtype=dtype)
                    latents = vae.encode(pixels).latent_dist.sample().float()
                del pixels
            else:
                latents = torch.empty(latent_shape)
            parts.end(parts.forward, "vae")
            if encode_text:
                # The LLM runs without the padding mask here: transformers inspects the mask's values, which
                # fake tensors do not have; the memory differs by the mask itself.
                llm_trains = any(p.requires_grad for p in model.text_encoder.llm.parameters())
                with torch.set_grad_enabled(llm_trains):
                    out = model.text_encoder.llm(input_ids=ids, output_hidden_states=m.llm.layer != -1, use_cache=False)
                text = out.last_hidden_state if m.llm.layer == -1 else out.hidden_states[m.llm.layer]
                del out
            else:
                text = torch.empty(b, m.llm.max_length, arch.llm["hidden_size"], dtype=dtype)
            parts.end(parts.forward, "llm")

            def unet_starts(unet, args, kwargs):  # the projection (if any) has run
                parts.end(parts.forward, "projection")
                inputs = [("unet", kwargs["encoder_hidden_states"])] + ([("projection", text)] if m.projection else [])
                last.append(parts.backward_ends(inputs + [("llm", ids)]))

            hook = model.unet.register_forward_pre_hook(unet_starts, with_kwargs=True)
            loss = model(latents, ids, mask, noise, t, text_BLD=text)
            hook.remove()
            parts.end(parts.forward, "unet")
            del latents, text
            loss.backward()
            parts.end(parts.backward, last[0])
    return Trace(live.peak, parts.forward, parts.backward)


_TRACES: dict[str, Trace] = {}


def _traced_step(cfg, arch: Architecture, dtype, micro_batch: int, *flags: bool) -> Trace:
    """trace_step, once per process for each model, batch and set of flags (a trace of a real-scale model takes
    tens of seconds; a fix is checked with the same traces)."""
    import json

    model = cfg.to_dict()["model"]
    for part in ("llm", "unet"):
        model[part].pop("gradient_checkpointing", None)  # a trace argument instead
    key = json.dumps([model, cfg.data.resolution, arch.llm, arch.unet, arch.vae, str(dtype), micro_batch, flags],
                     sort_keys=True, default=str)
    if key not in _TRACES:
        _TRACES[key] = trace_step(cfg, arch, dtype, micro_batch, *flags)
    return _TRACES[key]


# ====================================================================== the plan


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


def _bytes_per_param(precision: str) -> int:
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
    frozen = 0 if offload_params else math.ceil(inv.frozen * _bytes_per_param(precision) / n)
    cpu_per_node = cpu + (inv.frozen * _bytes_per_param(precision) // setup.nodes if offload_params else 0)
    return trainable, frozen, largest, cpu_per_node


def comm_per_step(inv: Inventory, setup: Setup, precision: str, grad_accum: int, encode_text: bool,
                  lora_trains: bool) -> dict[str, int]:
    """Bytes each GPU sends (= receives) per optimizer step in ZeRO-3's collectives (ring algorithms)."""
    n = setup.world_size
    share = (n - 1) / n
    size = _bytes_per_param(precision)
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
    traces = {ckpt: _traced_step(cfg, arch, dtype, b, encode_images, encode_text, *ckpt)
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
    size = _bytes_per_param(plan.precision)
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
              f"{_bytes_per_param(plan.precision)} B / {n} (no gradients, no optimizer state)",
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


# ====================================================================== command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), required=True,
                        help="1 pretrain, 2 alignment, 3 quality (as for para_train/main.py)")
    parser.add_argument("--config", default=None, help="a stage YAML, e.g. configs/stage1_pretrain.yaml "
                        "(default: the embedded tiny model)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", required=True, choices=sorted(GPUS))
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="fraction of the GPU's peak bf16 FLOP/s the step achieves (an assumption; default 0.4)")
    parser.add_argument("--net-gbps", type=float, default=400.0,
                        help="inter-node bandwidth per GPU in Gbit/s for ZeRO-3's collectives (default 400)")
    parser.add_argument("--headroom", type=float, default=0.1,
                        help="fraction of GPU memory kept free for CUDA context, NCCL buffers, fragmentation (0.1)")
    parser.add_argument("--samples", type=float, default=None,
                        help="samples to train on, e.g. 3e8 (default: train.steps x the global batch)")
    parser.add_argument("--precomputed", choices=("none", "latents", "latents+text"), default="none",
                        help="what the shards hold already (para-train data precompute); text: stage 1 only")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. train.micro_batch_size=2")


def run(args: argparse.Namespace) -> int:
    import logging
    import sys
    import warnings

    from para_train.config import ConfigError, load_config

    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    diffusers.utils.logging.set_verbosity_error()  # e.g. "modules that should be kept in float32" on meta builds
    transformers.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError("--nodes and --gpus-per-node must be >= 1")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu {args.mfu}: give a fraction in (0, 1], e.g. 0.4")
        cfg = load_config(args.stage, args.config, args.overrides)
        setup = Setup(args.nodes, args.gpus_per_node, args.gpu, args.mfu, args.net_gbps, args.headroom, args.samples,
                      args.precomputed)
        plan = make_plan(cfg, setup)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.config or "the embedded tiny default"))
    return 0 if plan.fits else 1
