"""The fixed evaluation set of synthetic scenes and its scoring: paragraphs in three lengths, each object's
checks (scenes.faithfulness), grouped by paragraph length and by where each object's description starts.
Used by `para-train evaluate` (inference.evaluate) and by validation during training."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from para_train.scenes.faithfulness import CHECKS, score_image
from para_train.scenes.synthetic import Scene, SceneObject, describe, make_scene, render

CLIP_TOKENS = 77


@dataclass(frozen=True)
class Profile:
    name: str
    max_objects: int
    min_words: int
    max_words: int
    keep_objects: int | None = None  # short paragraphs describe one object in full rather than cut two off


PROFILES = (Profile("short", 2, 40, 55, keep_objects=1), Profile("medium", 5, 110, 200), Profile("long", 5, 260, 400))
LENGTH_GROUPS = {"length_le77": (0, CLIP_TOKENS), "length_78_256": (CLIP_TOKENS + 1, 256),
                 "length_gt256": (257, math.inf)}
POSITION_GROUPS = {"position_before77": (0, CLIP_TOKENS - 1), "position_after77": (CLIP_TOKENS, math.inf)}


@dataclass
class EvalPrompt:
    index: int
    prompt: str
    scene: dict  # the scene record the image is scored against
    profile: str


def eval_set(num_prompts: int, seed: int = 0) -> list[EvalPrompt]:
    """A fixed set of scenes and paragraphs, cycling through the length profiles."""
    items = []
    for i in range(num_prompts):
        profile = PROFILES[i % len(PROFILES)]
        rng = random.Random(f"para-train-eval/{seed}/{i}")
        scene = make_scene(rng, profile.max_objects)
        if profile.keep_objects:
            scene = Scene(scene.background, scene.objects[:profile.keep_objects])
        items.append(EvalPrompt(i, describe(scene, rng, profile.min_words, profile.max_words), scene.to_record(),
                                profile.name))
    return items


def ground_truth(item: EvalPrompt, size: int):
    scene = Scene(item.scene["background"], [SceneObject(**o) for o in item.scene["objects"]])
    return render(scene, size)


def num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, verbose=False)["input_ids"])  # counted, not truncated: no length warning


def description_starts(tokenizer, item: EvalPrompt) -> list[int]:
    """For each object, the index of the token where its description ("The second object is a ...") starts."""
    starts, cursor = [], 0
    for o in item.scene["objects"]:
        at = item.prompt.find(f"object is a {o['size']} {o['color']} {o['shape']}", cursor)
        assert at >= 0, f"prompt {item.index} does not describe its {o['color']} {o['shape']}"
        sentence = item.prompt.rfind("The ", 0, at)
        starts.append(num_tokens(tokenizer, item.prompt[:sentence].rstrip()))
        cursor = at + 1
    return starts


def score_items(items: list[EvalPrompt], images: list, tokenizer) -> list[dict]:
    """Per prompt: its token count and background check, and per object its attributes, its checks
    (faithfulness.CHECKS) and where its description starts."""
    rows = []
    for item, image in zip(items, images, strict=True):
        scored = score_image(image, item.scene)
        starts = description_starts(tokenizer, item)
        objects = [{**o, "starts_at_token": s, "checks": checks}
                   for o, s, checks in zip(item.scene["objects"], starts, scored["objects"])]
        rows.append({"index": item.index, "profile": item.profile, "tokens": num_tokens(tokenizer, item.prompt),
                     "background": scored["background"], "objects": objects})
    return rows


def _rates(objects: list[dict]) -> dict:
    if not objects:
        return {"objects": 0}
    rates = {c: sum(o["checks"][c] for o in objects) / len(objects) for c in CHECKS}
    return {"objects": len(objects), "faithfulness": rates["correct"], **rates}


def summarize(rows: list[dict]) -> dict:
    """Per group (overall, by paragraph length, by description position): the number of objects, faithfulness
    (the rate of `correct`) and each check's rate; overall also the background rate and the number of images."""
    every = [(row, o) for row in rows for o in row["objects"]]
    groups = {"overall": [o for _, o in every]}
    for name, (lo, hi) in LENGTH_GROUPS.items():
        groups[name] = [o for row, o in every if lo <= row["tokens"] <= hi]
    for name, (lo, hi) in POSITION_GROUPS.items():
        groups[name] = [o for _, o in every if lo <= o["starts_at_token"] <= hi]
    summary = {name: _rates(objects) for name, objects in groups.items()}
    summary["overall"]["background"] = sum(r["background"] for r in rows) / max(1, len(rows))
    summary["overall"]["images"] = len(rows)
    return summary


def metrics(summary: dict) -> dict[str, float]:
    """The summary flattened for MLflow: eval/<group>/<check>."""
    return {f"eval/{group}/{key}": float(value) for group, rates in summary.items() for key, value in rates.items()}
