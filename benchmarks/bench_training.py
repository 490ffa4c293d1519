"""Training speed, measured side by side in one run: same machine, same model, same batch.

    python benchmarks/bench_training.py                    # everything, about 10 minutes on 2 cores
    python benchmarks/bench_training.py --rounds 3 --steps 2 --only stage1

1. Stage-1 overhead: para-train's stage-1 step (precomputed latents and frozen-LLM text features,
   the trainer's own step through the real DeepSpeed ZeRO-3 engine, world size 1, gloo) against the
   UNet's bare forward + backward + AdamW step on the same batch: the floor for stage 1.
2. Stage 1 against the usual way: a plain loop in the style of diffusers' train_text_to_image /
   LaVi-Bridge that encodes the images with the VAE and the text with the LLM at every step. The
   measured speed-up is set against the one the FLOP split predicts.
3. Stage 2: para-train's joint LoRA + UNet step against the same plain loop with peft's LoRA.
4. Loader headroom: para_train.data.loader.build_train_loader's samples/s against the trainer's.

The model is benchmarks/common.py's: small, with the real-scale FLOP split (printed first). Steps
are timed in alternating rounds (median per step), so a change in load hits every variant alike.
The trainer's step is `para_train.training.loop.Trainer.train_step`, the function `Trainer.train` calls for each step.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def plain_unet_step(unet, optimizer, schedule, batch: dict, text, gen):
    """The floor: noise, UNet forward, MSE loss, backward, AdamW step; nothing else."""
    import torch
    import torch.nn.functional as F

    latents, mask = batch["latents"], batch["attention_mask"]
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 1000, (latents.shape[0],), generator=gen)
    noisy = schedule.add_noise(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class UsualLoop:
    """diffusers' train_text_to_image / LaVi-Bridge: VAE-encode the images and run the LLM at every step.
    With `lora`, the LLM carries peft's LoRA and trains with the UNet (stage 2)."""

    def __init__(self, llm_dir: Path, vae_dir: Path, cfg, lora: bool):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import LlamaModel

        from para_train.models.paradiffusion import noise_scheduler

        torch.manual_seed(0)
        self.vae = AutoencoderKL.from_pretrained(vae_dir).requires_grad_(False).eval()
        self.llm = LlamaModel.from_pretrained(llm_dir).requires_grad_(False)
        groups = []
        if lora:
            from peft import LoraConfig, get_peft_model

            c = cfg.model.lora
            self.llm = get_peft_model(self.llm, LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout,
                                                           target_modules=list(c.target_modules)))
            groups.append({"params": [p for p in self.llm.parameters() if p.requires_grad],
                           "lr": cfg.train.lora_lr or cfg.train.lr})
        self.unet = UNet2DConditionModel(**common.BENCH_UNET)
        groups.insert(0, {"params": list(self.unet.parameters()), "lr": cfg.train.lr})
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
        self.schedule = noise_scheduler()  # SD's epsilon schedule, as a plain diffusers script has it
        self.lora = lora
        self.gen = torch.Generator().manual_seed(0)

    def encode_images(self, batch: dict):
        import torch

        with torch.no_grad():
            return self.vae.encode(batch["pixels"]).latent_dist.sample(self.gen) * self.vae.config.scaling_factor

    def encode_text(self, batch: dict):
        import torch

        with torch.set_grad_enabled(self.lora):
            return self.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    def step(self, batch: dict) -> None:
        latents, text = self.encode_images(batch), self.encode_text(batch)
        plain_unet_step(self.unet, self.optimizer, self.schedule, {**batch, "latents": latents}, text, self.gen)


def floor_step_fn(cfg, batch: dict):
    import torch
    from diffusers import UNet2DConditionModel

    from para_train.models.paradiffusion import noise_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**common.BENCH_UNET)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    schedule = noise_scheduler()
    gen = torch.Generator().manual_seed(0)
    return lambda: plain_unet_step(unet, optimizer, schedule, batch, batch["text_embeds"], gen)


def trainer_step_fn(trainer, batch: dict):
    batches = itertools.repeat(batch)
    return lambda: trainer.train_step(batches)


def precompute(trainer, batch: dict, text: bool) -> dict:
    """The batch as `para-train data precompute` shards would give it: latents (and frozen-LLM features)."""
    import torch

    out = {k: v for k, v in batch.items() if k != "pixels"}
    with torch.no_grad():
        out["latents"] = trainer.stage.latent_encoder.encode(batch["pixels"])
        if text:
            out["text_embeds"] = trainer.stage.model.text_encoder(batch["input_ids"], batch["attention_mask"]).clone()
    return out


def line(name: str, seconds: float, batch: int) -> str:
    return f"  {name:<68} {seconds * 1000:7.0f} ms/step {batch / seconds:7.1f} samples/s"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def setup_stage(stage: int, env, cache, assets, run_dir, extra: list[str] = ()):
    """The trainer of `stage` on the benchmark model, one batch of pixels, the same batch precomputed
    (latents, and text features for the frozen-LLM stage 1), and the usual loop on the same model."""
    from para_train.config import load_config

    cfg = load_config(stage, None, common.bench_overrides(cache, run_dir, *assets) + list(extra))
    trainer = common.open_trainer(cfg, env)
    pixels = next(iter(trainer.stage.loader))
    pre = precompute(trainer, pixels, text=stage == 1)
    return cfg, trainer, pixels, pre, UsualLoop(*assets, cfg, lora=stage > 1)


def bench_stage1(env, cache, assets, run_dir, args, results: dict) -> None:
    cfg, trainer, pixels, pre, usual = setup_stage(1, env, cache, assets, run_dir)
    times = common.interleaved({
        "floor": floor_step_fn(cfg, pre),
        "para_pre": trainer_step_fn(trainer, pre),
        "para_px": trainer_step_fn(trainer, pixels),
        "usual": lambda: usual.step(pixels),
        "vae": lambda: usual.encode_images(pixels),
        "llm": lambda: usual.encode_text(pixels),
    }, args.rounds, args.steps)
    b = cfg.train.micro_batch_size
    split = common.bench_split(len(trainer.stage.tokenizer))
    real = common.real_scale_split()
    predicted = sum(split.values()) / split["unet"]
    predicted_real = sum(real.values()) / real["unet"]
    overhead = times["para_pre"] / times["floor"]
    speedup = times["usual"] / times["para_pre"]
    print(f"\nstage 1: micro batch {b}, {common.RESOLUTION} px ({common.RESOLUTION // 8}x{common.RESOLUTION // 8} latents), "
          f"{common.TEXT_TOKENS} text tokens, fp32 (median of {args.rounds} rounds x {args.steps} steps)")
    print(line("floor: bare UNet forward+backward+AdamW (plain torch)", times["floor"], b))
    print(line("para-train stage 1, precomputed latents + text (DeepSpeed ZeRO-3)", times["para_pre"], b))
    print(line("para-train stage 1, images + text encoded every step", times["para_px"], b))
    print(line("usual loop: VAE + LLM every step (train_text_to_image style)", times["usual"], b))
    print(f"  overhead: para-train stage-1 step / floor = {overhead:.3f}x (goal <= 1.15): {verdict(overhead <= 1.15)}")
    print(f"  same work: para-train (encoding every step) / usual loop = {times['para_px'] / times['usual']:.3f}x")
    print(f"  speed-up over the usual loop: measured {speedup:.2f}x; the FLOP split predicts {predicted:.2f}x "
          f"(real scale: {predicted_real:.2f}x); measured / predicted = {speedup / predicted:.2f} (goal >= 0.9): "
          f"{verdict(speedup / predicted >= 0.9)}")
    parts = {"LLM forward": times["llm"], "VAE encode": times["vae"], "UNet step (floor)": times["floor"]}
    total = sum(parts.values())
    flops = {"LLM forward": split["llm"], "VAE encode": split["vae"], "UNet step (floor)": split["unet"]}
    print("  time split on this CPU vs FLOP split: " + ", ".join(
        f"{k} {v / total:.1%} vs {flops[k] / sum(flops.values()):.1%}" for k, v in parts.items()))
    print(f"  a loop with no overhead at all would gain (LLM + VAE + floor) / floor = {total / times['floor']:.2f}x "
          f"here, {total / times['floor'] / predicted:.2f} of the FLOP prediction")
    results["stage1_pixels_s"] = times["para_px"]
    results["trainer1"] = trainer
    if args.breakdown:
        breakdown(env, cache, assets, run_dir, args, cfg, pre, times)


def breakdown(env, cache, assets, run_dir, args, cfg, pre: dict, base: dict) -> None:
    """Where the stage-1 overhead comes from: the same step with lighter DeepSpeed set-ups, and at a
    4x larger micro batch (a fixed cost per step stays, the compute grows)."""
    from para_train.config import load_config

    b = cfg.train.micro_batch_size
    print(f"\nstage-1 overhead breakdown (same model; median of {args.rounds} rounds x {args.steps} steps)")
    print(line(f"floor at micro batch {b}", base["floor"], b))
    print(line(f"para-train, ZeRO-3 (as configured), micro batch {b}", base["para_pre"], b) +
          f"  {base['para_pre'] / base['floor']:.2f}x floor")
    variants = [("ZeRO-3, a hook per layer (deepspeed.leaf_modules=[])", ["deepspeed.leaf_modules=[]"]),
                ("ZeRO-2", ["deepspeed.zero_stage=2"]), ("ZeRO-0 (no partitioning)", ["deepspeed.zero_stage=0"]),
                ("ZeRO-0, no EMA, no gradient clipping", ["deepspeed.zero_stage=0", "train.ema_decay=0",
                                                          "train.grad_clip=0"])]
    for i, (name, extra) in enumerate(variants):
        vcfg = load_config(1, None, common.bench_overrides(cache, run_dir / f"breakdown{i}", *assets) + extra)
        trainer = common.open_trainer(vcfg, env)
        t = common.interleaved({"floor": floor_step_fn(vcfg, pre), "para": trainer_step_fn(trainer, pre)},
                               args.rounds, args.steps)
        print(line(f"para-train, {name}, micro batch {b}", t["para"], b) +
              f"  {t['para'] / t['floor']:.2f}x its floor ({t['floor'] * 1000:.0f} ms)")
    big = 4 * b
    vcfg = load_config(1, None, common.bench_overrides(cache, run_dir / "breakdown_big", *assets)
                       + [f"train.micro_batch_size={big}"])
    trainer = common.open_trainer(vcfg, env)
    big_pre = precompute(trainer, next(iter(trainer.stage.loader)), text=True)
    t = common.interleaved({"floor": floor_step_fn(vcfg, big_pre), "para": trainer_step_fn(trainer, big_pre)},
                           args.rounds, args.steps)
    print(line(f"floor at micro batch {big}", t["floor"], big))
    print(line(f"para-train, ZeRO-3, micro batch {big}", t["para"], big) + f"  {t['para'] / t['floor']:.2f}x its floor")
    print(f"  extra time per step over the floor: {(base['para_pre'] - base['floor']) * 1000:.0f} ms at micro batch {b}, "
          f"{(t['para'] - t['floor']) * 1000:.0f} ms at {big}")


def bench_stage2(env, cache, assets, run_dir, args, results: dict) -> None:
    cfg, trainer, pixels, pre, usual = setup_stage(2, env, cache, assets, run_dir, ["checkpoint.init_from=none"])
    times = common.interleaved({
        "para_px": trainer_step_fn(trainer, pixels),
        "para_pre": trainer_step_fn(trainer, pre),
        "usual": lambda: usual.step(pixels),
    }, args.rounds, args.steps)
    b = cfg.train.micro_batch_size
    lora = cfg.model.lora
    split = common.bench_split(len(trainer.stage.tokenizer), stage=2)  # LoRA's backward through the LLM included
    predicted = sum(split.values()) / (split["llm"] + split["unet"])
    speedup = times["usual"] / times["para_pre"]
    print(f"\nstage 2: LoRA r={lora.rank} on {', '.join(lora.target_modules)} + UNet, micro batch {b} "
          f"(median of {args.rounds} rounds x {args.steps} steps)")
    print(line("para-train stage 2, images encoded every step (DeepSpeed ZeRO-3)", times["para_px"], b))
    print(line("para-train stage 2, precomputed latents", times["para_pre"], b))
    print(line("plain loop with peft LoRA: VAE + LLM every step", times["usual"], b))
    print(f"  same work: para-train stage 2 / plain peft loop = {times['para_px'] / times['usual']:.3f}x")
    print(f"  speed-up with precomputed latents: measured {speedup:.2f}x; the FLOP split predicts {predicted:.2f}x; "
          f"measured / predicted = {speedup / predicted:.2f}")
    results["stage2_pixels_s"] = times["para_px"]


def bench_loader(cfg_trainer, args, results: dict) -> None:
    from para_train.data.loader import build_train_loader

    trainer = cfg_trainer
    loader = build_train_loader(trainer.cfg, trainer.stage.tokenizer)
    b = trainer.cfg.train.micro_batch_size
    batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch, as the trainer reads
    next(batches)  # start-up: shard index, worker start
    n = args.loader_batches
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    loader_rate = n * b / (time.perf_counter() - t0)
    print(f"\nloader: build_train_loader, {common.RESOLUTION} px, {common.TEXT_TOKENS} tokens, "
          f"num_workers={trainer.cfg.data.num_workers}, {n} batches of {b} after one warm-up batch")
    print(f"  decode + resize + tokenize: {loader_rate:.1f} samples/s")
    for key, name in (("stage1_pixels_s", "stage 1, images encoded every step"),
                      ("stage2_pixels_s", "stage 2, images encoded every step")):
        if key in results:
            step_rate = b / results[key]
            print(f"  trainer {name}: {step_rate:.1f} samples/s -> loader headroom {loader_rate / step_rate:.1f}x")
    print("  (loader and step measured one after the other on the same cores; in training they share them)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--only", default="stage1,stage2,loader")
    parser.add_argument("--cache-dir", default="~/.cache/para-train")
    parser.add_argument("--micro-batch", type=int, default=common.MICRO_BATCH,
                        help=f"samples per step (default {common.MICRO_BATCH}; raise it to keep a GPU busy)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the stage-1 step with ZeRO-2 / ZeRO-0 and at a 4x micro batch")
    args = parser.parse_args()
    common.MICRO_BATCH = args.micro_batch
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", common.extensions_dir())
    import logging
    import warnings

    import torch

    from para_train.training.distributed import init_process_group, read_env

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    common.header("para-train training throughput")
    common.print_splits()
    env = read_env()
    torch.set_num_threads(env.cpu_threads)
    init_process_group(env)
    cache = Path(args.cache_dir).expanduser()
    assets = common.build_assets(cache)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-training-"))
    only = set(args.only.split(","))
    results: dict = {}
    if "stage1" in only or "loader" in only:
        bench_stage1(env, cache, assets, run_dir, args, results)
    if "stage2" in only:
        bench_stage2(env, cache, assets, run_dir, args, results)
    if "loader" in only:
        bench_loader(results["trainer1"], args, results)
    print(f"\nload average at end (1/5/15 min): {common.load_average()}")


if __name__ == "__main__":
    main()
