"""The experiment ParaDiffusion's claim implies: does reading the whole paragraph (512 tokens) draw the objects
described late in it, which a 77-token (CLIP-length) text encoder never sees?

Trains the same model twice on the same synthetic scenes with the same budget (stage 1 of the tiny default,
one rank, same seed), once with model.llm.max_length=512 and once with 77, then evaluates both with
`para-train evaluate`'s code on the same held-out paragraphs and seeds, and reports, for objects whose
description starts before token 77 and for those after it, the rate drawn with the right colour in the right
region (and the full check: colour, region and shape). Prints the table, writes OUT/faithfulness.json and a bar
chart OUT/faithfulness.png, and states the budget and the machine.

    python benchmarks/bench_faithfulness.py --steps 1500 --out bench-out/faithfulness     # ~25 min per arm, 2 CPUs
    python benchmarks/bench_faithfulness.py --steps 2 --num-prompts 6 --sample-steps 2   # smoke (tests)

Extra `key=value` arguments are config overrides applied to both arms (e.g. train.lr=5e-4). Run again with the
same --out, an arm resumes from its last checkpoint (a finished arm is only exported and evaluated again).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = {"512 tokens": 512, "77 tokens": 77}
GROUPS = {"position_before77": "described before token 77", "position_after77": "described after token 77"}


def train_arm(out: Path, max_length: int, args) -> tuple[Path, float]:
    """Stage 1 of the default with this text length; returns its export and the training wall time."""
    from para_train.config import load_config
    from para_train.main import run_stage
    from para_train.training.resolve import resolve

    cfg = load_config(1, overrides=[f"run.dir={out}", f"data.cache_dir={args.cache_dir}", f"train.steps={args.steps}",
                                    f"model.llm.max_length={max_length}", "data.synthetic_captions=paragraph",
                                    "tracking.enabled=false",
                                    f"checkpoint.every={max(args.steps, 1)}",
                                    "eval.every=0", *args.overrides])
    t0 = time.perf_counter()
    run_stage(resolve(cfg, _env()))
    return out / "stage1" / "export", time.perf_counter() - t0


def evaluate_arm(export: Path, items, tokenizer, args) -> dict:
    from para_train.inference.evaluate import evaluate
    from para_train.inference.pipeline import load_pipeline

    pipe = load_pipeline(export, "cpu", "fp32")
    _, rows, summary = evaluate(pipe, items, seed=0, steps=args.sample_steps, guidance_scale=args.guidance_scale,
                                batch_size=8, tokenizer=tokenizer, progress=False)
    return {"summary": summary, "rows": rows, "guidance_scale": pipe.resolved_guidance(args.guidance_scale)}


def _env():
    import torch

    from para_train.training.distributed import init_process_group, read_env

    env = read_env()
    if not torch.distributed.is_initialized():
        init_process_group(env)
    return env


def table(results: dict) -> str:
    arms = list(results)
    head = f"{'objects':30}{'n':>5}" + "".join(f"{a + ' c+r':>16}{a + ' all':>16}" for a in arms)
    lines = [head]
    for group, label in GROUPS.items():
        n = results[arms[0]]["summary"][group]["objects"]
        cells = "".join(f"{results[a]['summary'][group].get('colour_region', 0):16.3f}"
                        f"{results[a]['summary'][group].get('correct', 0):16.3f}" for a in arms)
        lines.append(f"{label:30}{n:5d}{cells}")
    bg = "".join(f"{results[a]['summary']['overall']['background']:16.3f}{'':16}" for a in arms)
    lines.append(f"{'background (per image)':30}{results[arms[0]]['summary']['overall']['images']:5d}{bg}")
    return "\n".join(lines)


def chart(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        values = [results[arm]["summary"][g].get("colour_region", 0.0) for g in GROUPS]
        bars = ax.bar([x + i * width for x in range(len(GROUPS))], values, width, label=arm)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([x + width * (len(arms) - 1) / 2 for x in range(len(GROUPS))], list(GROUPS.values()))
    ax.set_ylabel("right colour in the right region")
    ax.set_ylim(0, 1)
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="training steps per arm (default: 1500)")
    p.add_argument("--num-prompts", type=int, default=90, help="held-out paragraphs (default: 90)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps (default: 20)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default: the trained model's (its sample.guidance_scale)")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-out/faithfulness"))
    p.add_argument("--cache-dir", default="~/.cache/para-train")
    p.add_argument("overrides", nargs="*", help="config overrides for both arms, key=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    from para_train.scenes.eval_set import eval_set

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    args.out.mkdir(parents=True, exist_ok=True)
    items = eval_set(args.num_prompts, args.eval_seed)
    results, budget, tokenizer = {}, {}, None
    for arm, length in ARMS.items():
        export, seconds = train_arm(args.out / f"max_length_{length}", length, args)
        budget[arm] = seconds
        if tokenizer is None:
            from para_train.inference.pipeline import load_pipeline

            tokenizer = load_pipeline(export, "cpu", "fp32").tokenizer  # positions counted alike for both
        results[arm] = evaluate_arm(export, items, tokenizer, args)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, CPU"
    title = (f"{args.steps} steps per arm (micro batch from the default config), {args.num_prompts} held-out paragraphs, "
             f"{machine}")
    report = {"steps_per_arm": args.steps, "train_seconds": budget, "machine": machine,
              "num_prompts": args.num_prompts, "sample_steps": args.sample_steps, "overrides": args.overrides,
              "guidance_scale": {arm: r["guidance_scale"] for arm, r in results.items()},
              "summaries": {arm: r["summary"] for arm, r in results.items()}}
    (args.out / "faithfulness.json").write_text(json.dumps(report, indent=1) + "\n")
    chart(results, args.out / "faithfulness.png", title)
    print(table(results))
    print(f"budget: {args.steps} steps per arm; training took " + ", ".join(f"{a} {s:.0f} s" for a, s in budget.items())
          + f"; machine: {machine}")
    after = {a: results[a]["summary"]["position_after77"].get("colour_region", 0.0) for a in ARMS}
    before = {a: results[a]["summary"]["position_before77"].get("colour_region", 0.0) for a in ARMS}
    long_arm, short_arm = ARMS
    met = after[long_arm] >= 2 * after[short_arm] and after[long_arm] > 0 and \
        abs(before[long_arm] - before[short_arm]) <= 0.1 * max(before.values())
    print(f"goal (after-77 objects at least twice as often with 512 tokens, before-77 within 10%): "
          f"{'met' if met else 'not met'} at this budget")
    print(f"table and chart: {args.out / 'faithfulness.json'}, {args.out / 'faithfulness.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
