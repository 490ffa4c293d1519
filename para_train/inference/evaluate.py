"""Does the model follow long paragraphs? Faithfulness on synthetic scenes, by paragraph length and by
where in the paragraph each object is described.

examples:
  para-train evaluate runs/demo/export --out eval/stage3
  para-train evaluate runs/demo/stage3/export --compare runs/demo/stage2/export --out eval/2v3 --num-prompts 90
  para-train evaluate exported --out eval/x --mlflow --tracking-uri http://127.0.0.1:5000

The evaluation set is fixed by --eval-seed: synthetic scenes (coloured shapes in a 3x3 grid) whose
paragraphs come in three lengths, so that every length bucket fills: one object in 40-55 words, up to
five objects in 110-200 words, up to five in 260-400 words. Each image is generated from its paragraph
(image i with seed + i) and scored against the scene record (para_train/scenes/faithfulness.py),
per object:

    faithfulness   the rate of `correct`: a solid patch of the object's colour, of a size plausible for its
                   size, is centred inside its cell of the 3x3 grid and its outline fits its shape best; all
                   of it at once, not a mean of separate checks (noise, blank images: 0; another scene's
                   image: about 0.01; ground-truth renderings: about 0.98)
    colour_region  the rate of the patch of the right colour in the right cell, whatever its shape
                   ("drawn in the right colour in the right place"; chance for another scene's image ~0.02)
    shape          the rate of the object's patch having the described shape (the colour_region patch,
                   else any object-coloured patch near the cell)
    present        the rate of some solid object-coloured patch centred in or near the cell (a diagnostic)

and per image `background` (overall only): the rate of images whose background is flat and of the
described colour (chance 1/4). Scores are reported overall, by paragraph length in tokens of the
model's tokenizer (<= 77, 78-256, > 256) and by the token at which the object's description starts
(before token 77, the most a CLIP text encoder reads, or after it); a summary group holds "objects"
(its count), "faithfulness" and each of faithfulness.CHECKS (present, colour_region, shape, correct),
overall also "background" and "images"; MLflow gets them as eval/<group>/<key>. With --compare both
models get the same paragraphs and seeds.

Writes OUT/scores.json (summaries, per-prompt details and settings), OUT/<label>/images/, and
OUT/side_by_side.png (ground truth | model | compared model, first 16 paragraphs). --mlflow logs each
model's scores as an MLflow run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from PIL import Image

from para_train.scenes.eval_set import EvalPrompt, eval_set, ground_truth, metrics, score_items, summarize
from para_train.scenes.faithfulness import CHECKS

log = logging.getLogger(__name__)

SHOW_SIDE = 128
# printed per group: the headline, the checks it is made of and the diagnostic (correct is faithfulness itself)
TABLE_KEYS = ("faithfulness", *(c for c in CHECKS if c != "correct"), "background")


def evaluate(pipe, items: list[EvalPrompt], *, seed: int, steps: int, guidance_scale: float | None, batch_size: int,
             resolution: int | None = None, tokenizer=None, progress: bool = True) -> tuple[list, list[dict], dict]:
    """Generate every paragraph's image with `pipe` and score it: (images, per-prompt rows, summary).
    Token counts use `tokenizer` (default: the pipeline's), so two models can be bucketed alike."""
    from para_train.inference.generate import generate_images

    images = generate_images(pipe, [it.prompt for it in items], seed=seed, steps=steps, guidance_scale=guidance_scale,
                             batch_size=batch_size, resolution=resolution, progress=progress)
    rows = score_items(items, images, tokenizer or pipe.tokenizer)
    return images, rows, summarize(rows)


# ------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from para_train.inference.generate import add_sampling_arguments

    parser.add_argument("model", help="an exported folder (para-train export)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--compare", default=None, metavar="MODEL", help="a second exported folder to evaluate on the "
                                                                          "same paragraphs and seeds")
    parser.add_argument("--num-prompts", type=int, default=60, help="paragraphs (default: 60, 20 per length profile)")
    parser.add_argument("--eval-seed", type=int, default=0, help="which evaluation set (default: 0)")
    parser.add_argument("--mlflow", action="store_true", help="log each model's scores as an MLflow run")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server or store (default: $MLFLOW_TRACKING_URI, "
                                                             "else sqlite in --out)")
    parser.add_argument("--experiment", default="para-train-eval", help="MLflow experiment (default: para-train-eval)")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from para_train.inference.generate import save_images, settings
    from para_train.inference.pipeline import load_pipeline
    from para_train.sampling import grid

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    models = {"a": args.model, **({"b": args.compare} if args.compare else {})}
    items = eval_set(args.num_prompts, args.eval_seed)
    results, images, tokenizer = {}, {}, None
    for label, model in models.items():
        try:
            pipe = load_pipeline(model, args.device, args.dtype, args.llm_path)
        except (FileNotFoundError, ValueError) as e:
            print(f"evaluate error: {e}", file=sys.stderr)
            return 2
        log.info("model %s: %s", label, model)
        tokenizer = tokenizer or pipe.tokenizer  # both models' paragraphs are bucketed by model a's tokenizer
        images[label], rows, summary = evaluate(pipe, items, seed=args.seed, steps=args.steps,
                                                guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                                                resolution=args.resolution, tokenizer=tokenizer)
        files = save_images(images[label], out / label)
        results[label] = {"model": str(Path(model).resolve()), "settings": settings(pipe, args), "summary": summary,
                          "prompts": [{**row, "image": f"{label}/{f}", "seed": args.seed + row["index"]}
                                      for row, f in zip(rows, files)]}
        del pipe
    report = {"eval_set": {"num_prompts": args.num_prompts, "eval_seed": args.eval_seed,
                           "paragraphs": [it.prompt for it in items], "scenes": [it.scene for it in items]},
              "models": results}
    if "b" in results:
        report["delta_b_minus_a"] = _delta(results["a"]["summary"], results["b"]["summary"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(report, indent=1) + "\n")
    side = max(SHOW_SIDE, *images["a"][0].size)  # small images are shown enlarged, pixels kept sharp
    rows = [[ground_truth(it, side)] + [images[label][it.index].resize((side, side), Image.NEAREST)
                                        for label in results] for it in items[:16]]
    grid([im for row in rows for im in row], cols=len(rows[0])).save(out / "side_by_side.png")
    if args.mlflow:
        _log_mlflow(args, out, results)
    print(_table(results))
    print(f"scores in {out / 'scores.json'}; images in {out}/<model>/images; ground truth | model(s): "
          f"{out / 'side_by_side.png'}")
    return 0


def _delta(a: dict, b: dict) -> dict:
    return {group: {k: b[group][k] - a[group][k] for k in a[group] if k in b[group] and k not in ("objects", "images")}
            for group in a}


def _table(results: dict) -> str:
    labels = list(results)
    lines = [f"{'':32}" + "".join(f"{label:>10}" for label in labels) + ("     delta" if len(labels) == 2 else "")]
    for group in results[labels[0]]["summary"]:
        for key in TABLE_KEYS:
            values = [results[label]["summary"][group].get(key) for label in labels]
            if values[0] is None:
                continue
            line = f"{group + ' ' + key:32}" + "".join(f"{v:10.3f}" for v in values)
            lines.append(line + (f"{values[1] - values[0]:+10.3f}" if len(values) == 2 else ""))
    return "\n".join(lines + [f"{label}: {results[label]['model']}" for label in labels])


def _log_mlflow(args: argparse.Namespace, out: Path, results: dict) -> None:
    import os

    from para_train.config import TrackingConfig
    from para_train.tracking import create_tracker

    for label, result in results.items():
        cfg = TrackingConfig(enabled=True, uri=args.tracking_uri, experiment=args.experiment,
                             run_name=f"eval {label}: {Path(result['model']).name}",
                             shutdown_timeout_s=120.0)  # nothing runs after this: wait for MLflow to take it all
        tracker = create_tracker(cfg, str(out), rank=0, env_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
                                 tags={"para_train.eval_model": result["model"], "para_train.eval_label": label})
        try:
            tracker.log_params({**result["settings"], "model": result["model"], "num_prompts": args.num_prompts,
                                "eval_seed": args.eval_seed})
            tracker.log_metrics(metrics(result["summary"]), step=0)
            tracker.log_artifact(str(out / "scores.json"))
            tracker.log_artifact(str(out / "side_by_side.png"))
        finally:
            tracker.close()
