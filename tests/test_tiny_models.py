"""The tiny VAE is trained when first built: it reconstructs scenes it never saw (PSNR), and the faithfulness
scorer reads its reconstructions as it reads the true renderings."""
import random

import numpy as np
import torch

from para_train.scenes.eval_set import eval_set, ground_truth, score_items, summarize
from para_train.models.build import load_tokenizer, load_vae
from para_train.models.tiny import _scene_pixels, reconstruction_psnr, tiny_llama_dir, tiny_vae_dir
from para_train.sampling import to_pil


def test_the_tiny_vae_reconstructs_unseen_scenes(cache_dir):
    vae = load_vae(str(tiny_vae_dir(cache_dir)))  # the code path that loads SDXL's VAE
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 2  # 32 px -> 16x16 latents
    unseen = _scene_pixels(random.Random("test-vae-unseen"), 64, 32)
    assert reconstruction_psnr(vae, unseen) >= 25.0

    items = eval_set(64, seed=7)
    truth = [ground_truth(it, 32) for it in items]
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in truth]) / 127.5 - 1
    with torch.no_grad():
        recon = to_pil(vae.decode(vae.encode(pixels).latent_dist.sample()).sample)  # as training draws latents
    tok = load_tokenizer(str(tiny_llama_dir(cache_dir)), 512)
    true_scores = summarize(score_items(items, truth, tok))["overall"]
    recon_scores = summarize(score_items(items, recon, tok))["overall"]
    assert true_scores["colour_region"] >= 0.95
    assert recon_scores["colour_region"] >= true_scores["colour_region"] - 0.05, (recon_scores, true_scores)
    assert recon_scores["background"] >= true_scores["background"] - 0.05

