"""ParaDiffusionPipeline: an exported folder as a diffusers `DiffusionPipeline`.

    from para_train.inference import ParaDiffusionPipeline
    pipe = ParaDiffusionPipeline.from_pretrained("runs/x/stage3/export", torch_dtype=torch.bfloat16).to("cuda")
    images = pipe(["A long paragraph ...", ...], num_inference_steps=20, guidance_scale=7.5, seed=0).images

The folder, as `para-train export` writes it:

    model_index.json                  this class, its components, max_length and the trained resolution
    unet/ vae/ scheduler/ tokenizer/  ordinary diffusers / transformers folders
    text_encoder/                     the LLM (reference or copy), its peft LoRA adapter, the projection
                                      (see para_train/inference/text_encoder.py)

Sampling is para_train.sampling.sample_latents, the code the trainer samples with: the pipeline's
scheduler (DPM-Solver++ as exported) and classifier-free guidance whose unconditional branch is the
empty string through the same LoRA-adapted LLM, as ParaDiffusion does. Image i of a call uses the
noise of seed + i, whatever the batch.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from para_train.inference.text_encoder import load_text_encoder
from para_train.models.paradiffusion import LatentEncoder, TextEncoder
from para_train.sampling import sample_latents, to_pil

log = logging.getLogger(__name__)


class ParaDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, text_encoder: TextEncoder, tokenizer, unet: UNet2DConditionModel, vae: AutoencoderKL,
                 scheduler, max_length: int = 512, resolution: int = 1024, guidance_scale: float = 7.5):
        super().__init__()
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, vae=vae, scheduler=scheduler)
        # guidance_scale: the run's sample.guidance_scale, the default of __call__ (older exports: 7.5)
        self.register_to_config(max_length=max_length, resolution=resolution, guidance_scale=guidance_scale)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, llm_path: str | None = None, **kwargs):
        """Load an exported folder. `llm_path` replaces the base-LLM reference stored in it; other
        keyword arguments go to DiffusionPipeline.from_pretrained (e.g. torch_dtype)."""
        folder = Path(pretrained_model_name_or_path).expanduser()
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder} is not an exported ParaDiffusion folder (no model_index.json); "
                                    "make one with `para-train export`")
        if "text_encoder" not in kwargs:
            dtype = kwargs.get("torch_dtype")
            if isinstance(dtype, dict):
                dtype = dtype.get("text_encoder", dtype.get("default"))
            kwargs["text_encoder"] = load_text_encoder(folder / "text_encoder", dtype, llm_path)
        kwargs.setdefault("use_safetensors", True)  # never fall back to pickled weights
        return super().from_pretrained(str(folder), **kwargs)

    def resolved_guidance(self, requested: float | None = None) -> float:
        """The classifier-free guidance a call uses: `requested`, else the model's own."""
        return self.config.guidance_scale if requested is None else requested

    def save_pretrained(self, *args, **kwargs):
        raise RuntimeError("a ParaDiffusionPipeline folder is written by `para-train export` (from a training run); "
                           "copy an exported folder instead of saving a loaded pipeline")

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 20, guidance_scale: float | None = None,
                 seed: int = 0, height: int | None = None, width: int | None = None) -> ImagePipelineOutput:
        """guidance_scale None: the one the model was trained to sample with (config.guidance_scale)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        guidance_scale = self.resolved_guidance(guidance_scale)
        height, width = height or self.config.resolution, width or self.config.resolution
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), got "
                             f"{height}x{width}")
        latents = sample_latents(self.text_encoder, self.unet, self.tokenizer, prompts,
                                 max_length=self.config.max_length,
                                 latent_shape=(self.unet.config.in_channels, height // f, width // f), seed=seed,
                                 steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=self.scheduler,
                                 device=self._execution_device, dtype=self.unet.dtype, image_size=(height, width))
        images = LatentEncoder(self.vae).decode(latents)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=to_pil(images))


def model_index(tokenizer_class: str, max_length: int, resolution: int, guidance_scale: float) -> dict:
    """model_index.json of an exported folder. The text encoder is not a diffusers or transformers class:
    `ParaDiffusionPipeline.from_pretrained` loads it from text_encoder/ and passes it in."""
    import diffusers

    return {"_class_name": ParaDiffusionPipeline.__name__, "_diffusers_version": diffusers.__version__,
            "text_encoder": [None, None], "tokenizer": ["transformers", tokenizer_class],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "max_length": max_length,
            "resolution": resolution, "guidance_scale": guidance_scale}


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """"auto": the GPU in bf16 when there is one, else the CPU in fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype {dtype}: choose auto, fp32, bf16 or fp16")
    return torch.device(device), dtypes[dtype]


def load_pipeline(folder: str | Path, device: str = "auto", dtype: str = "auto",
                  llm_path: str | None = None) -> ParaDiffusionPipeline:
    dev, torch_dtype = resolve_device(device, dtype)
    pipe = ParaDiffusionPipeline.from_pretrained(folder, llm_path=llm_path, torch_dtype=torch_dtype)
    log.info("loaded %s on %s in %s", folder, dev, torch_dtype)
    return pipe.to(dev)
