"""Paragraphs -> images with an exported model (`para-train export`).

examples:
  para-train generate runs/demo/export prompts.txt --out samples
  para-train generate runs/demo/export ParaPrompts-400.csv --out paraprompts --steps 30 --batch-size 8
  para-train generate exported prompts.jsonl --out s --seed 42 --resolution 1024 --guidance-scale 7.5

Prompt files: .txt (one paragraph per line), .jsonl ({"prompt": ...} per line, optional "id", "category")
or the ParaPrompts-400 CSV (Image,Prompt,Category,Prompt_Chinese). Writes OUT/images/00000.png ...,
OUT/grid.png (the first 64, as thumbnails) and OUT/generation.json (settings, and per image its prompt,
seed and file). Image i uses seed + i, whatever the batch size, so it can be made again on its own
(other batch sizes change only floating-point rounding).
DPM-Solver++ with classifier-free guidance (the unconditional branch is the empty string); bf16 on a
GPU, fp32 on the CPU, unless --dtype says otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)

GRID_IMAGES, GRID_THUMB = 64, 256


def generate_images(pipe, prompts: list[str], *, seed: int, steps: int, guidance_scale: float | None, batch_size: int,
                    resolution: int | None = None, progress: bool = True) -> list:
    from tqdm import tqdm

    images = []
    with tqdm(total=len(prompts), unit="image", desc="generating", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            images += pipe(batch, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed + start,
                           height=resolution, width=resolution).images
            bar.update(len(batch))
    return images


def save_images(images: list, folder: Path) -> list[str]:
    """images/00000.png ... (replacing earlier ones) under `folder`, and grid.png; returns the image paths
    relative to `folder`."""
    from para_train.sampling import grid

    shutil.rmtree(folder / "images", ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    names = []
    for i, image in enumerate(images):
        names.append(f"images/{i:05d}.png")
        image.save(folder / names[-1])
    thumbs = [im if max(im.size) <= GRID_THUMB else im.resize((GRID_THUMB, GRID_THUMB)) for im in images[:GRID_IMAGES]]
    grid(thumbs).save(folder / "grid.png")
    return names


def settings(pipe, args: argparse.Namespace) -> dict:
    return {"steps": args.steps, "guidance_scale": pipe.resolved_guidance(args.guidance_scale), "seed": args.seed,
            "batch_size": args.batch_size, "resolution": args.resolution or pipe.config.resolution,
            "scheduler": type(pipe.scheduler).__name__, "max_length": pipe.config.max_length,
            "device": str(pipe.device), "dtype": str(pipe.unet.dtype).replace("torch.", "")}


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate and evaluate."""
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default: 20)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the model's, its run's sample.guidance_scale)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the trained resolution)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--llm-path", default=None,
                        help="a local copy of the base LLM, if the one the export names is not on this machine")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="an exported folder (para-train export)")
    parser.add_argument("prompts", help=".txt, .jsonl or ParaPrompts-400 .csv file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--overwrite", action="store_true", help="replace the images of an earlier run in --out")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from para_train.inference.prompts import PromptFileError, read_prompts

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    try:
        prompts = read_prompts(args.prompts)[:args.limit]  # a bad file fails before the model loads
        if (out / "generation.json").exists() and not args.overwrite:
            raise FileExistsError(f"{out} holds an earlier generation; pass --overwrite or choose another --out")
        from para_train.inference.pipeline import load_pipeline

        pipe = load_pipeline(args.model, args.device, args.dtype, args.llm_path)
    except (PromptFileError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"generate error: {e}", file=sys.stderr)
        return 2
    images = generate_images(pipe, [p.text for p in prompts], seed=args.seed, steps=args.steps,
                             guidance_scale=args.guidance_scale, batch_size=args.batch_size, resolution=args.resolution)
    names = save_images(images, out)
    record = {"model": str(Path(args.model).resolve()), "prompt_file": str(Path(args.prompts).resolve()),
              "settings": settings(pipe, args),
              "images": [{"file": name, "seed": args.seed + i, "prompt": p.text, "line": p.line, "id": p.id,
                          "category": p.category} for i, (name, p) in enumerate(zip(names, prompts))]}
    (out / "generation.json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(images)} images in {out / 'images'}; grid {out / 'grid.png'}; prompts, seeds and settings in "
          f"{out / 'generation.json'}")
    return 0
