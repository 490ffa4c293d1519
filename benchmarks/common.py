"""What the benchmarks share: a small model proportioned like the real one, its weights on disk, the
machine, and interleaved timing.

The benchmark model keeps the real-scale FLOP split between the LLM forward, the VAE encode and the
UNet forward+backward (Llama-2-7B at 512 tokens, SDXL's VAE at 1024 px, the SDXL-class UNet of
configs/stage1_pretrain.yaml at 128x128 latents; counted by para_train.plan, whose counts the tests
check against torch.utils.flop_counter), so the ratios measured on it carry over to real scale.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from para_train.plan import SDXL_VAE  # noqa: E402

# Real scale: 512 text tokens, 1024 px images, 128x128 latents. Benchmark: 128 tokens, 128 px, 16x16.
TEXT_TOKENS = 128
RESOLUTION = 128
MICRO_BATCH = 8
BENCH_LLM = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5)
BENCH_VAE = dict(SDXL_VAE, block_out_channels=[12, 24, 48, 48], norm_num_groups=4, sample_size=RESOLUTION)
BENCH_UNET = dict(sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, block_out_channels=[32, 64, 128],
                  layers_per_block=2, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  transformer_layers_per_block=[1, 2, 4], attention_head_dim=[2, 4, 8],
                  cross_attention_dim=BENCH_LLM["hidden_size"], use_linear_projection=True, norm_num_groups=16)
ASSETS_VERSION = "v1"


def flop_split(cfg, arch) -> dict[str, float]:
    """FLOPs per sample of the LLM (forward, and backward where LoRA trains), the VAE encode and the UNet (with the
    projection) forward + backward without checkpointing: the planner's traced step, counted by torch's
    FlopCounterMode (para_train.plan.trace_step)."""
    import torch

    from para_train.plan import trace_step

    t = trace_step(cfg, arch, torch.float32, 1, True, True, False, False)
    return {"llm": t.forward["llm"] + t.backward["llm"], "vae": t.forward["vae"],
            "unet": sum(t.forward[k] + t.backward[k] for k in ("projection", "unet"))}


def _llm(config: dict) -> dict:
    from para_train.config import LLMConfig
    from para_train.models.build import llm_config

    return llm_config(LLMConfig(path=None, config=config), None).to_dict()


def real_scale_split() -> dict[str, float]:
    import yaml

    from para_train.config import load_config
    from para_train.plan import Architecture

    model = yaml.safe_load((REPO / "configs" / "stage1_pretrain.yaml").read_text())["model"]
    cfg = load_config(1, overrides=[f"model.llm.max_length={model['llm']['max_length']}", "data.resolution=1024"])
    return flop_split(cfg, Architecture(_llm(model["llm"]["config"]), model["unet"]["config"], SDXL_VAE, []))


def bench_split(vocab_size: int = 2048, stage: int = 1) -> dict[str, float]:
    from para_train.config import load_config
    from para_train.plan import Architecture

    cfg = load_config(stage, overrides=[f"model.llm.max_length={TEXT_TOKENS}", f"data.resolution={RESOLUTION}"])
    return flop_split(cfg, Architecture(_llm({**BENCH_LLM, "vocab_size": vocab_size}), BENCH_UNET, BENCH_VAE, []))


def print_splits() -> tuple[dict, dict]:
    real, bench = real_scale_split(), bench_split()
    print(f"{'FLOP split per sample (traced, para_train.plan)':<62}LLM fwd  VAE encode  UNet fwd+bwd         total")
    for name, s in (("real scale (Llama-2-7B@512, SDXL VAE@1024, SDXL UNet@128)", real),
                    ("benchmark model (this script)", bench)):
        total = sum(s.values())
        print(f"  {name:<58} {s['llm'] / total:7.1%} {s['vae'] / total:11.1%} {s['unet'] / total:13.1%} "
              f"{total / 1e9:10.2f} GFLOP")
    worst = max(max(bench[k] / sum(bench.values()), real[k] / sum(real.values()))
                / min(bench[k] / sum(bench.values()), real[k] / sum(real.values())) for k in real)
    print(f"  largest factor between the two splits: {worst:.2f} (must be <= 2)")
    assert worst <= 2.0, "the benchmark model no longer matches the real-scale FLOP split; resize it"
    return real, bench


def build_assets(cache_dir: Path) -> tuple[Path, Path]:
    """The benchmark LLM (with the tiny model's tokenizer) and VAE as Hugging Face folders, made once."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from para_train.models.tiny import tiny_llama_dir

    root = cache_dir / "models"
    llm_dir, vae_dir = root / f"bench-llama-{ASSETS_VERSION}", root / f"bench-vae-{ASSETS_VERSION}"
    if not (llm_dir / "config.json").is_file():
        tok_src = tiny_llama_dir(cache_dir)
        tok = AutoTokenizer.from_pretrained(tok_src)
        tmp = llm_dir.with_name(llm_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(0)
        LlamaModel(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               **BENCH_LLM)).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.rename(llm_dir)
    if not (vae_dir / "config.json").is_file():
        tmp = vae_dir.with_name(vae_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(0)
        AutoencoderKL(**BENCH_VAE).save_pretrained(tmp, safe_serialization=True)
        tmp.rename(vae_dir)
    return llm_dir, vae_dir


def open_trainer(cfg, env):
    """The trainer of one stage, built as para_train/main.py builds it (needs a process group): its `train_step`
    is the step being measured."""
    from para_train.main import open_stage
    from para_train.training.loop import Trainer

    return Trainer(*open_stage(cfg, env))


def bench_overrides(cache_dir: Path, run_dir: Path, llm_dir: Path, vae_dir: Path) -> list[str]:
    """key=value overrides that make the trainer's config the benchmark model on the synthetic set."""
    return [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", f"model.llm.path={llm_dir}",
            f"model.vae.path={vae_dir}", f"model.unet.config={json.dumps(BENCH_UNET)}",
            f"model.llm.max_length={TEXT_TOKENS}", f"data.resolution={RESOLUTION}",
            f"train.micro_batch_size={MICRO_BATCH}", "data.synthetic_samples=256", "tracking.enabled=false",
            "sample.num_images=0", "checkpoint.resume=never", "train.steps=1000000", "train.warmup_steps=1"]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                 if x.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return (f"{cpu}, {cores} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB, "
            f"no GPU; Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def extensions_dir() -> str:
    """A torch-extensions cache for this Python environment. DeepSpeed JIT-builds its CPU comm op into
    ~/.cache/torch_extensions; two virtualenvs sharing that folder rebuild it for each other on every
    launch (about a minute each time)."""
    import hashlib

    return str(Path.home() / ".cache" / "torch_extensions" / f"env-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]}")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def header(title: str) -> None:
    print(f"== {title}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}")
    print(f"load average at start (1/5/15 min): {load_average()}")


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, steps_per_round: int,
                warmup: int = 2) -> dict[str, float]:
    """Median seconds per step of each function, measured in alternating rounds so that a change in
    the machine's load falls on all of them alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                fn()
            times[name].append((time.perf_counter() - t0) / steps_per_round)
    return {name: statistics.median(v) for name, v in times.items()}
