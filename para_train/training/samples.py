"""Sample images of the fixed prompts during training (every tracking.sample_every steps and at the end)."""
from __future__ import annotations

import json

from para_train.scenes.synthetic import synthetic_sample
from para_train.sampling import grid, sample_latents, to_pil


def log_samples(stage, step: int) -> None:
    """Sample on every rank (ZeRO-3 gathers the weights collectively); rank 0 saves the images under samples/
    and logs the grid."""
    g = _sample_grid(stage, step)
    if g is not None:
        stage.tracker.log_image(g, f"samples/step_{step:08d}.png")


def _sample_grid(stage, step: int):
    cfg = stage.cfg
    s, d = cfg.sample, cfg.data
    if s.num_images <= 0:
        return None
    prompts = s.prompts or [synthetic_sample(10_000 + d.synthetic_seed, i, captions=d.synthetic_captions).caption
                            for i in range(s.num_images)]  # unseen scenes, captioned as this stage trains
    model = stage.model
    model.eval()
    unet = model.unet
    lat = d.resolution // stage.latent_encoder.downsample
    latents = sample_latents(model.text_encoder, unet, stage.tokenizer, prompts, max_length=cfg.model.llm.max_length,
                             latent_shape=(unet.config.in_channels, lat, lat), seed=s.seed, steps=s.steps,
                             guidance_scale=s.guidance_scale, prediction_type=cfg.model.prediction_type,
                             num_train_timesteps=cfg.model.num_train_timesteps,
                             zero_terminal_snr=cfg.model.zero_terminal_snr, device=stage.device,
                             dtype=unet.dtype,  # bf16 when DeepSpeed trains in bf16
                             image_size=(d.resolution, d.resolution))
    model.train()
    if stage.rank != 0:
        return None
    images = to_pil(stage.latent_encoder.decode(latents))
    out = stage.layout.samples
    out.mkdir(exist_ok=True)
    for i, img in enumerate(images):
        img.save(out / f"step{step:08d}_{i}.png")
    g = grid(images)
    g.save(out / f"grid_step{step:08d}.png")
    (out / "prompts.json").write_text(json.dumps({"prompts": prompts, "seed": s.seed, "steps": s.steps,
                                                  "guidance_scale": s.guidance_scale}, indent=1))
    return g
