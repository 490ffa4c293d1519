"""Export: the shared 2-rank ZeRO-3 run's stage 2 (LoRA, projection, EMA; conftest's `three_stages`), exported from
its checkpoint and from its final/ folder, loads in a fresh process with plain diffusers/transformers/peft calls and
with ParaDiffusionPipeline, and reproduces the trainer's own sample images: bit for bit with the arithmetic of the
trainer's forward (DeepSpeed's ZeRO-3 F.linear), within a rounding step with PyTorch's."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import STAGE2_STEPS as STEPS
from conftest import rank_env


@pytest.fixture(scope="module")
def stage_dir(three_stages):
    run_dir, _ = three_stages
    return run_dir / "stage2"


def checkpoint_dir(stage_dir):
    return stage_dir / "checkpoints" / f"step_{STEPS:08d}"


def test_a_two_rank_checkpoint_consolidates_to_the_final_weights_and_ema(stage_dir):
    from para_train.inference.consolidate import read_trained

    ckpt = read_trained(checkpoint_dir(stage_dir), with_ema=True)
    final = read_trained(stage_dir / "final", with_ema=True)
    assert json.loads((checkpoint_dir(stage_dir) / "COMPLETE").read_text())["world_size"] == 2
    assert ckpt.kind == "checkpoint" and final.kind == "final"
    assert set(ckpt.raw) == set(final.raw) == set(ckpt.ema) == set(final.ema)
    names = set(ckpt.raw)
    assert any(".lora_B.default." in n for n in names) and "text_encoder.projection.weight" in names
    for name in names:  # exact: the same fp32 values, reassembled from two ranks' shards
        assert torch.equal(ckpt.raw[name], final.raw[name]), name
        assert torch.equal(ckpt.ema[name], final.ema[name]), name
    moved = [n for n in names if not torch.equal(ckpt.ema[n], ckpt.raw[n])]
    assert len(moved) > len(names) // 2  # the EMA is its own set of weights, not a copy


def test_checkpoint_and_final_exports_write_the_same_folder(stage_dir, tmp_path):
    from para_train.inference.export import export_model

    a = export_model(checkpoint_dir(stage_dir), tmp_path / "from_checkpoint")
    b = export_model(stage_dir / "final", tmp_path / "from_final")
    weight_files = ["unet/diffusion_pytorch_model.safetensors", "text_encoder/lora/adapter_model.safetensors",
                    "text_encoder/projection.safetensors", "text_encoder/llm/model.safetensors",
                    "vae/diffusion_pytorch_model.safetensors"]
    for rel in weight_files:
        sa, sb = load_file(str(a / rel)), load_file(str(b / rel))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), rel
    # the adapter is peft's own format, as training's save_final wrote it
    trained = load_file(str(stage_dir / "final" / "lora" / "adapter_model.safetensors"))
    exported = load_file(str(a / "text_encoder/lora/adapter_model.safetensors"))
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    conf_a = json.loads((a / "text_encoder/lora/adapter_config.json").read_text())
    conf_t = json.loads((stage_dir / "final/lora/adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora", "peft_type"):
        assert conf_a[key] == conf_t[key], key
    assert sorted(conf_a["target_modules"]) == sorted(conf_t["target_modules"])
    unet_config = json.loads((stage_dir / "final/unet/config.json").read_text())
    assert json.loads((a / "unet/config.json").read_text()) == unet_config
    files = [p for p in a.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]  # safetensors only


LOAD_AND_SAMPLE = r"""
import json, sys
from pathlib import Path
import torch

def refuse(*args, **kwargs):
    raise AssertionError("loading an export must not unpickle anything (torch.load was called)")
torch.load = refuse

out, samples, dest = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
s = json.loads((samples / "prompts.json").read_text())

# 1. plain diffusers / transformers / peft calls
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
unet = UNet2DConditionModel.from_pretrained(out / "unet", use_safetensors=True)
vae = AutoencoderKL.from_pretrained(out / "vae", use_safetensors=True)
scheduler = DPMSolverMultistepScheduler.from_pretrained(out / "scheduler")
tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
llm = PeftModel.from_pretrained(AutoModel.from_pretrained(out / "text_encoder" / "llm", use_safetensors=True),
                                out / "text_encoder" / "lora")
proj_state = load_file(out / "text_encoder" / "projection.safetensors")
projection = torch.nn.Linear(proj_state["weight"].shape[1], proj_state["weight"].shape[0])
projection.load_state_dict(proj_state)
index = json.loads((out / "model_index.json").read_text())
te = json.loads((out / "text_encoder" / "text_encoder.json").read_text())

from para_train.models.paradiffusion import LatentEncoder, TextEncoder
from para_train.sampling import sample_latents, to_pil
text_encoder = TextEncoder(llm, te["layer"], projection).eval()
side = index["resolution"] // 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling
latents = sample_latents(text_encoder, unet, tokenizer, s["prompts"], max_length=index["max_length"],
                         latent_shape=(unet.config.in_channels, side, side), seed=s["seed"], steps=s["steps"],
                         guidance_scale=s["guidance_scale"], scheduler=scheduler)
for i, image in enumerate(to_pil(LatentEncoder(vae).decode(latents))):
    image.save(dest / f"plain_{i}.png")

# 2. the package's DiffusionPipeline
from para_train.inference import ParaDiffusionPipeline
pipe = ParaDiffusionPipeline.from_pretrained(out)
images = pipe(s["prompts"], num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"], seed=s["seed"]).images
for i, image in enumerate(images):
    image.save(dest / f"pipeline_{i}.png")

# 3. with the trainer's arithmetic: DeepSpeed swaps F.linear for its own under ZeRO-3 (matmul, then + bias)
from deepspeed.runtime.zero.linear import zero3_linear_wrap
torch.nn.functional.linear = zero3_linear_wrap
images = pipe(s["prompts"], num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"], seed=s["seed"]).images
for i, image in enumerate(images):
    image.save(dest / f"zero3_linear_{i}.png")
print("ok")
"""


def test_export_loads_in_a_fresh_process_and_reproduces_the_training_samples(stage_dir, tmp_path):
    from para_train.inference.export import export_model

    out = export_model(checkpoint_dir(stage_dir), tmp_path / "export")  # raw weights: what the trainer samples with
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, str(out), str(stage_dir / "samples"), str(tmp_path)],
                          env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for i in range(2):
        trained = np.asarray(Image.open(stage_dir / "samples" / f"step{STEPS:08d}_{i}.png")).astype(int)
        # bit for bit, given the same arithmetic as the trainer's forward
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"zero3_linear_{i}.png")), trained), i
        # with PyTorch's own F.linear, at most a rounding step in a few pixels
        for way in ("plain", "pipeline"):
            got = np.asarray(Image.open(tmp_path / f"{way}_{i}.png")).astype(int)
            assert got.shape == trained.shape == (32, 32, 3)
            assert np.abs(got - trained).max() <= 1 and (got != trained).any(-1).mean() <= 0.01, (way, i)


def test_ema_and_merged_lora_exports(stage_dir, tmp_path):
    from transformers import AutoTokenizer

    from para_train.inference.export import export_model
    from para_train.inference.text_encoder import load_text_encoder
    from para_train.sampling import tokenize

    ema = export_model(stage_dir / "final", tmp_path / "ema", use_ema=True)
    unet = load_file(str(ema / "unet/diffusion_pytorch_model.safetensors"))
    final_ema = load_file(str(stage_dir / "final/ema.safetensors"))
    assert all(torch.equal(unet[k], final_ema[f"unet.{k}"]) for k in unet)
    assert json.loads((ema / "export.json").read_text())["weights"] == "ema"

    raw = export_model(stage_dir, tmp_path / "raw")  # a stage folder: its final/ weights
    merged = export_model(stage_dir, tmp_path / "merged", merge_lora=True)
    assert not (merged / "text_encoder/lora").exists()
    assert json.loads((merged / "text_encoder/text_encoder.json").read_text())["lora"] is None
    base = load_file(str(raw / "text_encoder/llm/model.safetensors"))
    folded = load_file(str(merged / "text_encoder/llm/model.safetensors"))
    assert not torch.equal(base["layers.0.self_attn.q_proj.weight"], folded["layers.0.self_attn.q_proj.weight"])
    te_raw, te_merged = load_text_encoder(raw / "text_encoder"), load_text_encoder(merged / "text_encoder")
    tok = AutoTokenizer.from_pretrained(raw / "tokenizer")
    ids, mask = tokenize(tok, ["A large red circle in the center.", ""], 96)
    with torch.no_grad():
        torch.testing.assert_close(te_merged(ids, mask), te_raw(ids, mask), rtol=1e-4, atol=1e-5)


def test_export_errors_name_the_problem_and_the_fix(stage_dir, tmp_path):
    from para_train.cli import main
    from para_train.inference import ExportError
    from para_train.inference.export import export_model

    partial = tmp_path / "checkpoints" / f"step_{STEPS:08d}"
    shutil.copytree(checkpoint_dir(stage_dir), partial)
    (partial / "COMPLETE").unlink()
    with pytest.raises(ExportError, match="not a complete checkpoint"):
        export_model(partial, tmp_path / "out")
    (partial / "COMPLETE").write_text(json.dumps({"world_size": 2, "step": STEPS}))
    next(partial.glob("*rank_1_*optim_states.pt")).unlink()
    with pytest.raises(ExportError, match="incomplete"):
        export_model(partial, tmp_path / "out", config_for(stage_dir))
    no_ema = tmp_path / "stage2" / "final"
    shutil.copytree(stage_dir / "final", no_ema)
    shutil.copy(stage_dir / "config.yaml", no_ema.parent)
    (no_ema / "ema.safetensors").unlink()
    with pytest.raises(ExportError, match="no EMA"):
        export_model(no_ema, tmp_path / "out", use_ema=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["export", str(stage_dir), str(tmp_path / "taken")]) == 2  # never replaces what is not an export
    assert (tmp_path / "taken" / "notes.txt").exists()


def config_for(stage_dir):
    from para_train.inference.consolidate import load_stage_config

    return load_stage_config(stage_dir / "config.yaml")
