"""One training micro-step traced on fake tensors: the peak of its live tensors and its FLOPs by part."""
from __future__ import annotations

from dataclasses import dataclass

from para_train.plan.model import Architecture, build_meta_model


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


def fakeify(module, fake_mode) -> None:
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
    assert hasattr(counter, "mod_tracker"), "torch.utils.flop_counter changed: see para_train.plan.trace.flop_counter"
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
    fakeify(model, fake)
    fakeify(vae, fake)
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


def traced_step(cfg, arch: Architecture, dtype, micro_batch: int, *flags: bool) -> Trace:
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
