"""The ParaDiffusion module: LLM text encoder (+LoRA, +projection) conditioning a UNet, and the
DDPM training objective. Free of distributed code: DeepSpeed wraps it from outside.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextEncoder(nn.Module):
    """Paragraph -> per-token features for cross-attention.

    ParaDiffusion feeds the LLM's last hidden state (with the padding mask) straight to the UNet;
    `layer=-2` takes the penultimate layer as Kolors does. An optional linear projection maps the
    LLM width to the UNet's cross_attention_dim.
    """

    def __init__(self, llm: nn.Module, layer: int = -1, projection: nn.Linear | None = None):
        super().__init__()
        self.llm = llm
        self.layer = layer
        self.projection = projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # A frozen LLM (stage 1) runs without autograd: no activations kept for it.
        llm_trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.llm.parameters())
        with torch.set_grad_enabled(llm_trains):
            out = self.llm(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=self.layer != -1, use_cache=False)
        hidden_BLD = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        if self.projection is not None:
            hidden_BLD = self.projection(hidden_BLD)
        return hidden_BLD


def noise_scheduler(num_train_timesteps: int = 1000, prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    """The forward process: diffusers' DDPMScheduler with SD's scaled-linear betas, optionally rescaled to zero
    terminal SNR. Training draws its noisy latents, targets and SNR from it, and the sampler (sampling.make_scheduler,
    the one exported) is built from its config, so the two cannot drift apart."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type=prediction_type,
                         rescale_betas_zero_snr=zero_terminal_snr)


def micro_conditions(unet: nn.Module, text_BLD: torch.Tensor, attention_mask: torch.Tensor,
                     image_size: tuple[int, int]) -> dict | None:
    """SDXL's added conditions, for a UNet that takes them (addition_embed_type "text_time", kept with
    model.unet.micro_conditioning); None otherwise. The pooled text vector is each paragraph's text feature at
    its last real token (a left-to-right LLM has read the whole paragraph there, as Kolors pools its LLM); the
    size and crop ids say original size = target size = the image size, no crop."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return None
    b = text_BLD.shape[0]
    last = attention_mask.long().sum(1).clamp(min=1) - 1
    pooled_BD = text_BLD[torch.arange(b, device=text_BLD.device), last.to(text_BLD.device)]
    h, w = image_size
    time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=text_BLD.dtype, device=text_BLD.device).expand(b, 6)
    return {"text_embeds": pooled_BD, "time_ids": time_ids}


class ParaDiffusion(nn.Module):
    """Everything DeepSpeed trains or shards: text encoder and UNet. The frozen VAE stays outside.
    `image_size`: the training images' side in pixels (for SDXL's size ids; default 8x the latent side)."""

    def __init__(self, text_encoder: TextEncoder, unet: nn.Module, prediction_type: str = "epsilon",
                 min_snr_gamma: float | None = None, num_train_timesteps: int = 1000, image_size: int | None = None,
                 zero_terminal_snr: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet
        self.scheduler = noise_scheduler(num_train_timesteps, prediction_type, zero_terminal_snr)
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.image_size = image_size

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                noise: torch.Tensor, timesteps: torch.Tensor, text_BLD: torch.Tensor | None = None) -> torch.Tensor:
        """Mean diffusion loss of one batch. Noise and timesteps come from the caller's seeded generators;
        `text_BLD` may hold precomputed text features (frozen LLM), else the text encoder runs."""
        if text_BLD is None:
            text_BLD = self.text_encoder(input_ids, attention_mask)
        elif self.text_encoder.projection is not None:
            text_BLD = self.text_encoder.projection(text_BLD)
        return self.denoising_loss(latents, attention_mask, noise, timesteps, text_BLD).mean()

    def denoising_loss(self, latents: torch.Tensor, attention_mask: torch.Tensor, noise: torch.Tensor,
                       timesteps: torch.Tensor, text_BLD: torch.Tensor, weighted: bool = True) -> torch.Tensor:
        """Per-sample loss given the text features; `weighted=False` leaves out min-SNR weighting (validation)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        side = self.image_size or 8 * latents.shape[-1]
        pred = self.unet(noisy.to(text_BLD.dtype), timesteps, encoder_hidden_states=text_BLD,
                         encoder_attention_mask=attention_mask,
                         added_cond_kwargs=micro_conditions(self.unet, text_BLD, attention_mask, (side, side))
                         ).sample.float()
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, timesteps)
        loss_B = F.mse_loss(pred, target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        if weighted and self.min_snr_gamma is not None:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, timesteps)
            clipped = torch.clamp(snr, max=self.min_snr_gamma)
            weight = clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)
            loss_B = loss_B * weight
        return loss_B


class LatentEncoder(nn.Module):
    """The frozen VAE: pixels in [-1, 1] -> scaled latents (and back for samples)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent, along each side

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return ((dist.sample(generator) - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((latents / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample.float()
