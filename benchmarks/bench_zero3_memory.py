"""ZeRO-3 memory per rank: bytes of parameters, gradients, optimizer state (and para-train's EMA) that
each rank holds after a training step, at world size 1 and 2, against the unsharded total.

    python benchmarks/bench_zero3_memory.py                     # world sizes 1 and 2, the benchmark model
    python benchmarks/bench_zero3_memory.py --model tiny        # the embedded tiny model
    deepspeed --num_gpus 2 benchmarks/bench_zero3_memory.py --worker --out DIR [--model tiny] [key=value ...]

The model and engine are built exactly as the trainer builds them (para_train.training.engine:
deepspeed_config, build_model under zero.Init, initialize); the bytes are read by
para_train.training.memory, as the trainer itself writes them into ranks/rank<r>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def measure_engine(cfg, env) -> dict:
    """Build the engine as the trainer does, take one step (Adam allocates its state lazily), measure."""
    import torch

    from para_train.training import engine as engine_mod
    from para_train.training.ema import ShardedEMA
    from para_train.training.memory import model_state_bytes
    from para_train.training.resolve import resolve

    run = resolve(cfg, env)
    ds = run.ds_config
    built = engine_mod.build_model(cfg, env, ds, run.init)
    engine, _, _ = engine_mod.initialize(cfg, built, ds)
    model = engine.module
    ema = ShardedEMA([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg.train.ema_decay) \
        if cfg.train.ema_decay > 0 else None
    b, L, lat = cfg.train.micro_batch_size, cfg.model.llm.max_length, cfg.data.resolution // built.latent_encoder.downsample
    g = torch.Generator().manual_seed(env.rank)
    latents = torch.randn(b, model.unet.config.in_channels, lat, lat, generator=g)
    ids = torch.randint(0, 100, (b, L), generator=g)
    loss = engine(latents, ids, torch.ones(b, L, dtype=torch.long), torch.randn(latents.shape, generator=g),
                  torch.randint(0, 1000, (b,), generator=g))
    engine.backward(loss)
    engine.step()
    state = model_state_bytes(engine, model, ema)
    if state is None:
        raise RuntimeError(f"{type(engine.optimizer).__name__} is not DeepSpeed's ZeRO-3 optimizer; set deepspeed.zero_stage=3")
    result = {"rank": env.rank, "world_size": env.world_size, "precision": "bf16" if ds["bf16"]["enabled"] else "fp32",
              **state}
    engine.destroy()
    return result


def worker(args) -> None:
    import torch

    from para_train.config import load_config
    from para_train.training.distributed import barrier, init_process_group, read_env

    env = read_env()
    torch.set_num_threads(env.cpu_threads)
    init_process_group(env)
    cache = Path(args.cache_dir).expanduser()
    overrides = [f"data.cache_dir={cache}", f"run.dir={args.out}", "tracking.enabled=false"]
    if args.model == "bench":
        if env.rank == 0:
            common.build_assets(cache)
        barrier()
        llm_dir, vae_dir = common.build_assets(cache)
        overrides = common.bench_overrides(cache, Path(args.out), llm_dir, vae_dir)
    results = [measure_engine(load_config(1, None, [*overrides, f"train.precision={precision}", *args.overrides]), env)
               for precision in args.precisions.split(",")]
    (Path(args.out) / f"memory_rank{env.rank}.json").write_text(json.dumps(results))


def launch(num_ranks: int, out: Path, model: str, cache_dir: str, precisions: str, overrides: list[str],
           extensions_dir: str | None = None) -> list[list[dict]]:
    """Run the worker on `num_ranks` local gloo ranks under the deepspeed launcher: per rank, one dict per precision.
    `extensions_dir`: where DeepSpeed JIT-builds its CPU comm op (default: torch's shared cache)."""
    from para_train.training.distributed import free_port

    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    if extensions_dir is not None:
        env["TORCH_EXTENSIONS_DIR"] = extensions_dir
    cmd = [launcher, "--num_gpus", str(num_ranks), "--master_port", str(port), __file__, "--worker", "--out", str(out),
           "--model", model, "--cache-dir", cache_dir, "--precisions", precisions, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return [json.loads((out / f"memory_rank{r}.json").read_text()) for r in range(num_ranks)]


def report(results: dict[int, list[dict]]) -> None:
    """`results`: world size -> one dict per rank (one precision)."""
    kinds = ("params_trainable", "params_frozen", "grads", "master", "optimizer_state", "ema", "total")
    print(f"  {'world size/rank':<16}" + "".join(f"{k:>17}" for k in kinds))
    for ws, ranks in results.items():
        for r in ranks:
            label = f"{ws} / {r['rank']}"
            print(f"  {label:<16}" + "".join(f"{r[k] / 2 ** 20:13.3f} MiB" for k in kinds))
    if 1 not in results:
        return  # no unsharded run to compare with
    total = results[1][0]["total"]
    for ws, ranks in results.items():
        if ws == 1:
            continue
        worst = max(abs(r["total"] - total / ws) / (total / ws) for r in ranks)
        print(f"  world size {ws}: per rank {max(r['total'] for r in ranks) / 2 ** 20:.3f} MiB = "
              f"{max(r['total'] for r in ranks) / total:.3f} of the unsharded total ({total / 2 ** 20:.3f} MiB, world "
              f"size 1); off total/{ws} by {worst:.1%} (goal: within 10%): {'met' if worst <= 0.10 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="folder for the per-rank JSON files")
    parser.add_argument("--model", choices=("bench", "tiny"), default="bench")
    parser.add_argument("--cache-dir", default="~/.cache/para-train")
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--precisions", default="fp32,bf16", help="measured one after the other in each launch")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    common.header("ZeRO-3 per-rank model-state memory")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-zero3-"))
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or common.extensions_dir()
    runs = {ws: launch(ws, out / f"ws{ws}", args.model, args.cache_dir, args.precisions, args.overrides, ext)
            for ws in (int(x) for x in args.world_sizes.split(","))}
    for i, precision in enumerate(args.precisions.split(",")):
        first = runs[min(runs)][0][i]
        print(f"model: {args.model}, {precision}; parameters trained {first['numel_trainable'] / 1e6:.2f}M, "
              f"frozen {first['numel_frozen'] / 1e6:.2f}M")
        report({ws: [per_rank[i] for per_rank in ranks] for ws, ranks in runs.items()})
    print(f"load average at end (1/5/15 min): {common.load_average()}")


if __name__ == "__main__":
    main()
