"""Paragraphs -> images: DPM-Solver++ with classifier-free guidance, the unconditional branch being
the empty string through the same (LoRA-adapted) text encoder, as ParaDiffusion does.

Used for sample grids during training and by `para-train generate`. Under ZeRO-3 every rank must
call it with the same arguments (the forward passes gather sharded weights collectively).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def make_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    """DPM-Solver++ on the training schedule (models.paradiffusion.noise_scheduler's config). With zero terminal SNR:
    sampling steps that start at the last (pure-noise) timestep and a final step to sigma 0, as Lin et al. prescribe."""
    from diffusers import DPMSolverMultistepScheduler

    from para_train.models.paradiffusion import noise_scheduler

    train = noise_scheduler(num_train_timesteps, prediction_type, zero_terminal_snr).config
    keep = {k: train[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                                  "rescale_betas_zero_snr")}  # DDPM's sampling options (clip_sample, ...) stay behind
    zsnr = dict(timestep_spacing="trailing", final_sigmas_type="zero")
    return DPMSolverMultistepScheduler(**keep, algorithm_type="dpmsolver++", solver_order=2,
                                       **(zsnr if zero_terminal_snr else {}))


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def sample_latents(text_encoder, unet, tokenizer, prompts: list[str], *, max_length: int, latent_shape: tuple,
                   seed: int, steps: int = 20, guidance_scale: float = 7.5, prediction_type: str = "epsilon",
                   num_train_timesteps: int = 1000, zero_terminal_snr: bool = False, device="cpu", dtype=torch.float32,
                   scheduler=None, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """`scheduler`: a diffusers scheduler to use instead of `make_scheduler(num_train_timesteps, prediction_type,
    zero_terminal_snr)`.
    `image_size`: (height, width) in pixels, for a UNet with SDXL's size ids (default: 8x the latent size)."""
    from para_train.models.paradiffusion import micro_conditions

    scheduler = scheduler if scheduler is not None else make_scheduler(num_train_timesteps, prediction_type,
                                                                       zero_terminal_snr)
    scheduler.set_timesteps(steps, device=device)
    ids, mask = tokenize(tokenizer, list(prompts), max_length)
    uids, umask = tokenize(tokenizer, [""] * len(prompts), max_length)
    ids, mask = torch.cat([uids, ids]).to(device), torch.cat([umask, mask]).to(device)
    text = text_encoder(ids, mask)
    added = micro_conditions(unet, text, mask, image_size or (8 * latent_shape[1], 8 * latent_shape[2]))
    # One generator per image: image i depends only on (seed, i), not on the batch it is in.
    latents = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed + i))
                           for i in range(len(prompts))]).to(device, torch.float32)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        pred = unet(model_in.to(dtype), t, encoder_hidden_states=text, encoder_attention_mask=mask,
                    added_cond_kwargs=added).sample.float()
        uncond, cond = pred.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        out.paste(img, ((i % cols) * w, (i // cols) * h))
    return out
