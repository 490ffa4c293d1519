"""How faithfully an image shows a synthetic scene (para_train.data.synthetic), scored from its pixels.

Each pixel is given the nearest of the eight object colours or the image's own background colour;
connected patches of one object colour are the image's shapes. For every object of the scene:

    present  a shape covering at least MIN_AREA of the described size's smallest area (a triangle's)
             is centred within the object's region cell, widened by PRESENT_MARGIN of the image
             (of several, the one centred inside the cell, then the largest)
    colour   that shape has the described colour
    shape    its outline fits the described shape best of circle / square / triangle (IoU with each,
             drawn into its bounding box by the scene renderer itself)
    region   it is centred inside the region cell itself (the paragraph's 3x3 grid: top left ... bottom right)

and for the image, whether its background is nearest the described background colour. A paragraph
states regions, colours, shapes and sizes, never exact positions; the score asks for no more.
Ground-truth renderings score about 1.0, blank images 0 and other scenes' images chance level
(tests/test_evaluate.py). Images larger than MAX_SIDE pixels are scored downscaled.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from para_train.data.synthetic import BACKGROUNDS, COLORS, REGIONS, SHAPES, Scene, SceneObject, render

CHECKS = ("present", "colour", "shape", "region")
MAX_SIDE = 128
MIN_AREA = 0.35
PRESENT_MARGIN = 1 / 12
_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float32)


@dataclass
class Patch:
    """A connected patch of one object colour. Centre and half-side are fractions of the image side."""
    colour: str
    ys: np.ndarray
    xs: np.ndarray
    cx: float
    cy: float
    radius: float

    @property
    def area(self) -> int:
        return len(self.xs)


def score_image(image: Image.Image, record: dict) -> dict:
    """{"background": bool, "objects": [{"present": bool, "colour": ..., "shape": ..., "region": ...}, ...]}"""
    pixels = _pixels(image)
    side = pixels.shape[0]
    objects = [SceneObject(**o) for o in record["objects"]]
    background = _background(pixels, objects)
    min_area = min((_min_area(o, side) for o in objects), default=1.0)
    patches = _patches(_classify(pixels, background), max(1, int(min_area)))
    bg_name = min(BACKGROUNDS, key=lambda b: np.linalg.norm(background - np.array(BACKGROUNDS[b], np.float32)))
    return {"background": bg_name == record["background"],
            "objects": [_check(o, patches, side) for o in objects]}


def _pixels(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    side = min(MAX_SIDE, max(image.size))
    if image.size != (side, side):
        image = image.resize((side, side), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _min_area(o: SceneObject, side: int) -> float:
    return MIN_AREA * 2 * (o.radius * side) ** 2


def _background(pixels: np.ndarray, objects: list[SceneObject]) -> np.ndarray:
    """The median colour away from where the scene puts its objects (all pixels if that leaves too few)."""
    side = pixels.shape[0]
    free = np.ones((side, side), bool)
    for o in objects:
        lo_x, hi_x = int((o.cx - o.radius) * side) - 1, int(np.ceil((o.cx + o.radius) * side)) + 1
        lo_y, hi_y = int((o.cy - o.radius) * side) - 1, int(np.ceil((o.cy + o.radius) * side)) + 1
        free[max(lo_y, 0):hi_y, max(lo_x, 0):hi_x] = False
    chosen = pixels[free] if free.mean() > 0.05 else pixels.reshape(-1, 3)
    return np.median(chosen, axis=0)


def _classify(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per pixel: 0 for the background, i + 1 for the i-th object colour, whichever is nearest."""
    candidates = np.concatenate([background[None], _PALETTE])
    dist = np.linalg.norm(pixels[:, :, None, :] - candidates[None, None], axis=-1)
    return dist.argmin(-1)


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected patches of equal non-zero labels: each pixel gets its patch's smallest flat index
    (h * w for the background), by propagating minima until nothing changes."""
    h, w = labels.shape
    none = h * w
    fg = labels > 0
    down = fg[1:] & (labels[1:] == labels[:-1])  # pixel (i + 1, j) joins (i, j)
    right = fg[:, 1:] & (labels[:, 1:] == labels[:, :-1])  # pixel (i, j + 1) joins (i, j)
    ids = np.where(fg, np.arange(h * w).reshape(h, w), none)
    while True:
        new = ids.copy()
        new[1:] = np.minimum(new[1:], np.where(down, ids[:-1], none))
        new[:-1] = np.minimum(new[:-1], np.where(down, ids[1:], none))
        new[:, 1:] = np.minimum(new[:, 1:], np.where(right, ids[:, :-1], none))
        new[:, :-1] = np.minimum(new[:, :-1], np.where(right, ids[:, 1:], none))
        if np.array_equal(new, ids):
            return ids
        ids = new


def _patches(labels: np.ndarray, min_area: int) -> list[Patch]:
    side = labels.shape[0]
    ids = _components(labels).ravel()
    fg = np.nonzero(ids < side * side)[0]
    if len(fg) == 0:
        return []
    roots, inverse, counts = np.unique(ids[fg], return_inverse=True, return_counts=True)
    ys, xs = np.divmod(fg, side)
    patches = []
    for k in np.nonzero(counts >= min_area)[0]:
        sel = inverse == k
        patches.append(_patch(_NAMES[labels.flat[roots[k]] - 1], ys[sel], xs[sel], side))
    return patches


def _patch(colour: str, ys: np.ndarray, xs: np.ndarray, side: int) -> Patch:
    """Centre and half-side from the bounding box; a box cut by the image edge is completed to a square."""
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    half = max(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if x1 - x0 < 2 * half:
        cx = x1 - half if x0 == 0 else x0 + half if x1 == side else cx
    if y1 - y0 < 2 * half:
        cy = y1 - half if y0 == 0 else y0 + half if y1 == side else cy
    return Patch(colour, ys, xs, float(cx / side), float(cy / side), float(half / side))


def _in_cell(p: Patch, region: str, margin: float) -> bool:
    col, row = REGIONS[region]
    return bool(col / 3 - margin <= p.cx < (col + 1) / 3 + margin and row / 3 - margin <= p.cy < (row + 1) / 3 + margin)


def _check(o: SceneObject, patches: list[Patch], side: int) -> dict:
    near = [p for p in patches if p.area >= _min_area(o, side) and _in_cell(p, o.region, PRESENT_MARGIN)]
    if not near:
        return dict.fromkeys(CHECKS, False)
    p = max(near, key=lambda p: (_in_cell(p, o.region, 0.0), p.area))
    return {"present": True, "colour": p.colour == o.color, "shape": _shape_of(p, side) == o.shape,
            "region": _in_cell(p, o.region, 0.0)}


def _shape_of(p: Patch, side: int) -> str:
    """The shape whose drawing fits the patch best. A drawn box spans about 2r + 1 pixels for some shapes
    and 2r for others, so each is drawn at the box's half-side and half a pixel less."""
    mask = np.zeros((side, side), bool)
    mask[p.ys, p.xs] = True

    def iou(shape: str, radius: float) -> float:
        probe = SceneObject(shape, "white", "small", "center", p.cx, p.cy, radius)
        drawn = (np.asarray(render(Scene("black", [probe]), side)) == COLORS["white"]).all(-1)
        return (mask & drawn).sum() / max(1, (mask | drawn).sum())

    return max(SHAPES, key=lambda shape: max(iou(shape, p.radius), iou(shape, p.radius - 0.5 / side)))
