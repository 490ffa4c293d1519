"""The faithfulness scorer's levels: what it gives true renderings, softened ones (as a VAE's reconstructions
are), and images that show nothing of the scene (noise, blank, a tile mosaic, another scene's rendering).

    python benchmarks/scorer_levels.py                  # the 200 scenes of eval_set(200)
    python benchmarks/scorer_levels.py --scenes 60 --seed 1

Per image kind: the image-level background rate and the per-object rates of the checks of
para_train/scenes/faithfulness.py (correct is the headline faithfulness of `para-train evaluate`),
over the scene records and ground truth of para_train.inference.evaluate.eval_set, and the mean wall time
to score one image. "other scene" scores scene i's rendering against scene i + 1's record; its chance
levels are printed below the table: background, the pairs with the same background; colour_region, the
rate expected over the scenes' draws (faithfulness.chance_colour_region) and the rate of coincidences
these pairs hold (faithfulness.coincides: an object of the described colour in the described cell, of a
size within a size class).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from para_train.scenes.synthetic import BACKGROUNDS  # noqa: E402
from para_train.scenes.eval_set import eval_set, ground_truth  # noqa: E402
from para_train.scenes.faithfulness import CHECKS, chance_colour_region, coincides, score_image  # noqa: E402


def levels(images: list, records: list[dict]) -> dict:
    start = time.perf_counter()
    scored = [score_image(im, rec) for im, rec in zip(images, records, strict=True)]
    ms = (time.perf_counter() - start) / len(images) * 1000
    objects = [o for s in scored for o in s["objects"]]
    return {"background": np.mean([s["background"] for s in scored]),
            **{c: np.mean([o[c] for o in objects]) for c in CHECKS}, "ms": ms}


def kinds(items, seed: int):
    """(name, images, records) per image kind."""
    rng = np.random.default_rng(seed)
    records = [it.scene for it in items]
    shifted = records[1:] + records[:1]  # image i against record i + 1
    truth = {side: [ground_truth(it, side) for it in items] for side in (32, 64)}

    def noise(side):
        return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in items]

    yield "truth 32 px", truth[32], records
    yield "truth 64 px", truth[64], records
    yield "truth 32 px, GaussianBlur 0.7", [im.filter(ImageFilter.GaussianBlur(0.7)) for im in truth[32]], records
    yield "truth 64 px, GaussianBlur 1.4", [im.filter(ImageFilter.GaussianBlur(1.4)) for im in truth[64]], records
    yield "truth 64 -> 32 -> 64 px bilinear", [im.resize((32, 32), Image.BILINEAR).resize((64, 64), Image.BILINEAR)
                                               for im in truth[64]], records
    yield "truth 32 -> 24 -> 32 px bilinear", [im.resize((24, 24), Image.BILINEAR).resize((32, 32), Image.BILINEAR)
                                               for im in truth[32]], records
    yield "truth 32 -> 16 -> 32 px (too soft)", [im.resize((16, 16), Image.BILINEAR).resize((32, 32), Image.BILINEAR)
                                                 for im in truth[32]], records
    yield "truth 32 px + N(0, 20) + blur 0.6", [
        Image.fromarray(np.clip(np.asarray(im, float) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))
        .filter(ImageFilter.GaussianBlur(0.6)) for im in truth[32]], records
    yield "noise 32 px (uniform RGB)", noise(32), records
    yield "noise 64 px (uniform RGB)", noise(64), records
    yield "mosaic 32 px (random RGB 4 px tiles)", [
        Image.fromarray(np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((4, 4, 1), np.uint8)))
        for _ in items], records
    for name, rgb in BACKGROUNDS.items():
        yield f"blank {name} 32 px", [Image.new("RGB", (32, 32), rgb)] * len(items), records
    yield "blank white 32 px (no background's)", [Image.new("RGB", (32, 32), (245, 245, 245))] * len(items), records
    yield "other scene 32 px", truth[32], shifted
    yield "other scene 64 px", truth[64], shifted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="eval_set seed (and the noise's)")
    args = parser.parse_args(argv)
    items = eval_set(args.scenes, args.seed)
    print(f"{args.scenes} scenes of eval_set({args.scenes}, seed={args.seed}), "
          f"{sum(len(it.scene['objects']) for it in items)} objects")
    header = f"{'image':40}" + "".join(f"{k:>14}" for k in ("background", *CHECKS)) + f"{'ms/image':>10}"
    print(header)
    blank_bg = []
    for name, images, records in kinds(items, args.seed):
        row = levels(images, records)
        if name.startswith("blank") and "white" not in name:
            blank_bg.append(row["background"])
        print(f"{name:40}" + "".join(f"{row[k]:14.3f}" for k in ("background", *CHECKS)) + f"{row['ms']:10.2f}")
    records = [it.scene for it in items]
    shifted = records[1:] + records[:1]
    matches = [coincides(image, o) for image, described in zip(records, shifted) for o in described["objects"]]
    print(f"blank, mean over the four background colours: background {np.mean(blank_bg):.3f} (chance 0.250)")
    same_background = np.mean([a["background"] == b["background"] for a, b in zip(records, shifted)])
    print(f"other scene: background chance {same_background:.3f} (pairs with the same background); "
          f"colour_region chance {chance_colour_region(records, shifted):.3f} "
          f"(expected over the scenes' draws), {np.mean(matches):.3f} in these pairs (an object of the described "
          f"colour, of a size within a size class, in the described cell)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
