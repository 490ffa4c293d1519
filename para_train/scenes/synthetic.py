"""Synthetic paragraph scenes: coloured shapes at positions, a long paragraph describing every
object (or, for stage 1, a short alt-text-like caption naming them), and a machine-readable scene record
per image.

Deterministic in (seed, index): sample i of a set is the same on every machine and every run, so
the embedded default needs no download and the evaluator can score images against the record.
"""
from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from para_train.config import CAPTION_STYLES

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "cyan": (40, 200, 210),
}
BACKGROUNDS = {"black": (15, 15, 20), "grey": (110, 110, 115), "brown": (95, 70, 45), "navy": (20, 30, 70)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "medium": 0.24, "large": 0.34}  # fraction of the image side
# 3x3 regions: name -> (column, row)
REGIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
_FILLER = [
    "The lighting is soft and even, with no strong shadows falling across the scene.",
    "Every edge is crisp and clean, as if the shapes were cut from coloured paper.",
    "There is no text, no people and no other objects anywhere in the picture.",
    "The composition feels calm and orderly, like an illustration from a children's book about geometry.",
    "Each shape is painted in a single flat colour without gradients or texture.",
    "The camera looks straight at the scene from the front, so nothing is distorted by perspective.",
    "The background is completely plain and fills the whole frame from corner to corner.",
    "Seen from a distance, the picture reads as a simple arrangement of bold coloured forms.",
    "Nothing overlaps in a confusing way, and each object can be told apart at a glance.",
    "The image is square, and the space between the objects is left empty.",
]
_OPENERS = [
    "This picture shows a simple scene made of {n} flat geometric shapes resting on a plain {bg} background.",
    "The image is a minimal composition: {n} coloured shapes placed on an even {bg} background.",
    "In this square illustration, {n} geometric objects are arranged over a uniform {bg} background.",
]


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    region: str
    cx: float  # centre, fraction of width
    cy: float  # centre, fraction of height
    radius: float  # half the side, fraction of the image side


@dataclass
class Scene:
    background: str
    objects: list[SceneObject]

    def to_record(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}


def make_scene(rng: random.Random, max_objects: int = 5) -> Scene:
    num = rng.randint(2, max_objects)
    regions = rng.sample(list(REGIONS), num)
    objects = []
    for region in regions:
        col, row = REGIONS[region]
        size = rng.choice(list(SIZES))
        radius = SIZES[size] / 2
        jitter = 1 / 3 / 2 - radius / 1.6
        cx = (col + 0.5) / 3 + rng.uniform(-1, 1) * max(jitter, 0.0)
        cy = (row + 0.5) / 3 + rng.uniform(-1, 1) * max(jitter, 0.0)
        objects.append(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), size, region, round(cx, 4),
                                   round(cy, 4), radius))
    return Scene(rng.choice(list(BACKGROUNDS)), objects)


def render(scene: Scene, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.cx * size, o.cy * size, o.radius * size
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _where(region: str) -> str:
    return "in the center" if region == "center" else f"in the {region} part of the image"


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        side = "to the left of" if dx > 0 else "to the right of"
    else:
        side = "above" if dy > 0 else "below"
    return f"The {a.color} {a.shape} is {side} the {b.color} {b.shape}."


def describe(scene: Scene, rng: random.Random, min_words: int = 100, max_words: int = 400) -> str:
    """A paragraph describing every object, its attributes and relations, padded to a target length."""
    target = rng.randint(min_words, max_words)
    n = len(scene.objects)
    parts = [rng.choice(_OPENERS).format(n=n, bg=scene.background)]
    for i, o in enumerate(scene.objects):
        ordinal = ["The first", "The second", "The third", "The fourth", "The fifth"][i]
        parts.append(f"{ordinal} object is a {o.size} {o.color} {o.shape} {_where(o.region)}. "
                     f"Its colour is a clear, saturated {o.color}, and its outline is that of a {o.shape}.")
    for a, b in zip(scene.objects, scene.objects[1:]):
        parts.append(_relation(a, b))
    filler = list(_FILLER)
    rng.shuffle(filler)
    k = 0
    while len(" ".join(parts).split()) < target:
        o = scene.objects[k % n]
        if k < len(filler):
            parts.append(filler[k])
        else:
            parts.append(f"Looking again at the {o.region}, the {o.size} {o.color} {o.shape} stands out clearly "
                         f"against the {scene.background} background.")
        k += 1
    words = " ".join(parts).split()
    if len(words) > max_words:
        words = words[:max_words]
    text = " ".join(words)
    return text if text.endswith(".") else text + "."


def describe_short(scene: Scene) -> str:
    """A caption as short as web alt-text (15-50 words) that still names the background and every object, in the
    paragraphs' own words: what stage 1 pretrains on, as ParaDiffusion pretrains on ordinary captions before
    aligning with long paragraphs."""
    objects = "; ".join(f"a {o.size} {o.color} {o.shape} {_where(o.region)}" for o in scene.objects)
    return f"{len(scene.objects)} shapes on a plain {scene.background} background: {objects}."


@dataclass
class SyntheticSample:
    sample_id: str
    image_png: bytes
    caption: str
    scene: dict
    width: int
    height: int


def synthetic_sample(seed: int, index: int, image_size: int = 64, min_words: int = 100,
                     max_words: int = 400, captions: str = "paragraph") -> SyntheticSample:
    """`captions`: paragraph (min_words..max_words, describing every object at length) or short (describe_short);
    the scene of (seed, index) is the same either way."""
    if captions not in CAPTION_STYLES:
        raise ValueError(f"captions={captions!r}: choose one of {', '.join(CAPTION_STYLES)}")
    rng = random.Random(f"para-train-synthetic/{seed}/{index}")
    scene = make_scene(rng)
    caption = describe(scene, rng, min_words, max_words) if captions == "paragraph" else describe_short(scene)
    buf = io.BytesIO()
    render(scene, image_size).save(buf, format="PNG")
    return SyntheticSample(f"synthetic-{seed}-{index:08d}", buf.getvalue(), caption, scene.to_record(),
                           image_size, image_size)
