"""How faithfully an image shows a synthetic scene (para_train.scenes.synthetic), scored from its pixels.

Each pixel is given the nearest of the eight object colours or the image's own background colour
(the median colour away from where the scene puts its objects); 4-connected patches of one object
colour, of which at least COLOUR_QUANTILE of the pixels lie within COLOUR_TOLERANCE of that colour
(a rust-brown blob is not red because red is the nearest of the eight), are the image's candidate
shapes. A patch is a *solid patch* for an object only if it could be a drawing of that object's size
and is compact:

    area     MIN_AREA .. MAX_AREA times S, the area of the described size's bounding square (2r)^2; a drawn
             triangle covers about S / 2, a circle 0.8 S, a square S (up to 1.6 S at 32 px, where the
             renderer's pixel edges count); the few same-coloured pixels of noise never reach it
    side     its bounding box's longer side MIN_SIDE .. MAX_SIDE times the described size's side 2r
             (with the area: a size class either way passes, small for large and large for small do not)
    fill     it covers at least MIN_FILL of its bounding box (a triangle covers half of it)
    aspect   its bounding box's shorter side is at least MIN_ASPECT of its longer side

For every object of the scene, with the solid patches for its size:

    present        some solid patch of any object colour is centred within the object's region cell widened
                   by PRESENT_MARGIN of the image: a diagnostic, "something of that size is there or nearby"
    colour_region  a solid patch of the described colour is centred inside the region cell itself (the
                   paragraph's 3x3 grid: top left ... bottom right): "drawn in the right colour in the right
                   place"
    shape          the outline of the object's patch fits the described shape best of circle / square /
                   triangle (IoU with each, drawn with the scene renderer's calls; _shape_of). The object's patch
                   is the colour_region patch when there is one (the largest, of several), else the present
                   patch (centred in the cell first, then the largest), so that the right shape in a wrong
                   colour still reads as the right shape; without a present patch, False
    correct        colour_region and shape: drawn in its colour, in its cell, with its outline, all at once.
                   The headline faithfulness of para_train.inference.evaluate is the rate of correct

and for the image, `background`: the colour away from the objects is nearest the described one of the
four backgrounds, and at least BG_FLAT of those pixels lie within BG_TOLERANCE of it (flat, not noise
whose median happens to be grey). There are no separate colour and region checks any more: "a patch of
the colour somewhere near" and "a patch of some colour in the cell" are each met by chance far more
often than the pair, and neither says that the object was drawn; present and colour_region tell them
apart. A paragraph states regions, colours, shapes and sizes, never exact positions; the score asks
for no more. Images larger than MAX_PIXELS pixels are scored downscaled.

Levels, from benchmarks/scorer_levels.py on the 200 scenes (518 objects) of eval_set(200) and pinned,
with tolerances, by tests/test_evaluate.py:

    image                                       background  present  colour_region  shape  correct
    ground truth, 32 px / 64 px                 1           0.98     0.98           0.98   0.98
    ground truth, GaussianBlur 0.7 at 32 px     1           0.98     0.98           0.98   0.98
    ground truth, 64 -> 32 -> 64 px bilinear    1           0.97     0.97           0.96   0.96
    uniform random RGB noise, 32 / 64 px        0           0.002/0  0              0      0
    blank, each background colour               1/4         0        0              0      0
    scene i's rendering, scene i + 1's record   0.21        0.22     0.017          0.08   0.008

Ground truth misses 1 object in 60: two objects of one colour drawn touching across a cell border merge
into one patch too big for either. Softer images than a VAE's lose shape first (32 -> 16 -> 32 px: shape
0.71). Chance for another scene's rendering: colour_region needs an object of the described colour
centred in the described cell, P = (objects in the rendered scene) / 9 * 1/8, whose size and shape make
a solid patch for the described size (2 draws in 3); chance_colour_region computes it exactly from the
records. For eval_set's pairing (every 1-object short scene's image is scored against a 2-5 object
record) it is 0.032 before the size condition and 0.021 with it, and these 200 pairs hold 0.019 such
coincidences (coincides), which the scorer finds (0.017: one of them merged); for two independent 2-5
object scenes it is 3.5 / 72 = 0.049 and 0.032. correct adds 1 shape in 3; background is 1 in 4 (the
pairs with the same background: 0.21 here). The checks are per described object and do not penalise
extra drawn objects: a mosaic of random 4-pixel tiles at 32 px scores colour_region 0.06, correct 0.01.
Scoring takes a few ms per 32 px image (scorer_levels prints it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from para_train.scenes.synthetic import BACKGROUNDS, COLORS, REGIONS, SHAPES, SIZES, SceneObject

CHECKS = ("present", "colour_region", "shape", "correct")
MAX_PIXELS = 128
MIN_AREA, MAX_AREA = 0.35, 2.5  # times the described size's bounding square
MIN_SIDE, MAX_SIDE = 0.6, 1.8  # the bounding box's longer side, times the described size's side
MIN_FILL = 0.4
MIN_ASPECT = 0.55
PRESENT_MARGIN = 1 / 12
COLOUR_TOLERANCE, COLOUR_QUANTILE = 60.0, 0.25  # a quarter of a patch's pixels lie this near its colour (RGB)
BG_TOLERANCE = 50.0  # RGB distance; the closest two backgrounds (black, navy) are 52 apart
BG_FLAT = 0.5
_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float32)
_BG_NAMES = list(BACKGROUNDS)
_BG_PALETTE = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)


@dataclass
class Patch:
    """A connected patch of one object colour. Centre and half-side are fractions of the image side; w and h
    are its bounding box in pixels (not completed at the image edge)."""
    colour: str
    ys: np.ndarray
    xs: np.ndarray
    cx: float
    cy: float
    radius: float
    w: int
    h: int

    @property
    def area(self) -> int:
        return len(self.xs)


def score_image(image: Image.Image, record: dict) -> dict:
    """{"background": bool, "objects": [{"present": bool, "colour_region": ..., "shape": ..., "correct": ...}, ...]}"""
    pixels = _pixels(image)
    side = pixels.shape[0]
    objects = [SceneObject(**o) for o in record["objects"]]
    free = _free(side, objects)
    background = np.median(free(pixels), axis=0)
    smallest = min((MIN_AREA * (2 * o.radius * side) ** 2 for o in objects), default=1.0)
    labels = _classify(pixels, background)
    patches = _patches(labels, pixels, max(1, int(smallest)))
    return {"background": _background_ok(free(pixels), background, record["background"]),
            "objects": [_check(o, patches, labels) for o in objects]}


def _pixels(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    side = min(MAX_PIXELS, max(image.size))
    if image.size != (side, side):
        image = image.resize((side, side), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _free(side: int, objects: list[SceneObject]):
    """Selects the pixels away from where the scene puts its objects (all pixels if that leaves too few)."""
    free = np.ones((side, side), bool)
    for o in objects:
        lo_x, hi_x = int((o.cx - o.radius) * side) - 1, int(np.ceil((o.cx + o.radius) * side)) + 1
        lo_y, hi_y = int((o.cy - o.radius) * side) - 1, int(np.ceil((o.cy + o.radius) * side)) + 1
        free[max(lo_y, 0):hi_y, max(lo_x, 0):hi_x] = False
    if free.mean() <= 0.05:
        return lambda pixels: pixels.reshape(-1, 3)
    return lambda pixels: pixels[free]


def _background_ok(free_pixels: np.ndarray, background: np.ndarray, described: str) -> bool:
    """The background is nearest the described one of the four, and flat: most free pixels lie near it."""
    nearest = _BG_NAMES[int(np.linalg.norm(_BG_PALETTE - background, axis=-1).argmin())]
    if nearest != described:
        return False
    near = np.linalg.norm(free_pixels - np.array(BACKGROUNDS[described], np.float32), axis=-1) <= BG_TOLERANCE
    return bool(near.mean() >= BG_FLAT)


def _classify(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per pixel: 0 for the background, i + 1 for the i-th object colour, whichever is nearest."""
    candidates = np.concatenate([background[None], _PALETTE])
    flat = pixels.reshape(-1, 3)
    # squared distances via |p|^2 - 2 p.c + |c|^2, the |p|^2 term being common to all candidates
    dist = (candidates ** 2).sum(-1)[None] - 2 * flat @ candidates.T
    return dist.argmin(-1).reshape(pixels.shape[:2])


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


def _patches(labels: np.ndarray, pixels: np.ndarray, min_area: int) -> list[Patch]:
    """The patches of at least min_area pixels of which COLOUR_QUANTILE lie within COLOUR_TOLERANCE of their colour."""
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
        label = labels.flat[roots[k]]
        dist = np.linalg.norm(pixels.reshape(-1, 3)[fg[sel]] - _PALETTE[label - 1], axis=-1)
        if np.quantile(dist, COLOUR_QUANTILE) > COLOUR_TOLERANCE:
            continue
        patches.append(_patch(_NAMES[label - 1], ys[sel], xs[sel], side))
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
    return Patch(colour, ys, xs, float(cx / side), float(cy / side), float(half / side), int(x1 - x0), int(y1 - y0))


def _solid(p: Patch, o: SceneObject, side: int) -> bool:
    """Could the patch be a drawing of the described object's size: area, extent, fill and aspect (module doc)."""
    extent = 2 * o.radius * side  # the described size's side, in pixels
    return bool(_plausible(p.area, max(p.w, p.h), extent) and p.area >= MIN_FILL * p.w * p.h
                and min(p.w, p.h) >= MIN_ASPECT * max(p.w, p.h))


def _plausible(area: float, longer: float, extent: float) -> bool:
    """Area and bounding-box side fit a drawing whose size's bounding square has side `extent` (any unit)."""
    return MIN_AREA * extent ** 2 <= area <= MAX_AREA * extent ** 2 and MIN_SIDE * extent <= longer <= MAX_SIDE * extent


_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}  # a drawn shape's nominal area, times r^2
_CENTROID = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3}  # its centroid below its centre, times r


def chance_colour_region(image_records: list[dict], described_records: list[dict]) -> float:
    """The colour_region rate expected by chance of renderings of scenes drawn like image_records (their object
    counts; each object's region, colour, size and shape drawn uniformly, as make_scene draws them) scored against
    described_records, pair by pair. Per described object: P(the image has an object of its colour centred in
    its cell) = objects / 9 * 1/8, times P(that object's size and shape make a solid patch for the described
    size), taken at the shapes' nominal areas (2r^2, pi r^2, 4r^2) and sides (2r)."""
    def fits(size: str) -> float:
        drawn = [(_AREA[shape] * (SIZES[s] / 2) ** 2, SIZES[s]) for s in SIZES for shape in SHAPES]
        return sum(_plausible(area, longer, SIZES[size]) for area, longer in drawn) / len(drawn)

    rates = [len(image["objects"]) / len(REGIONS) / len(COLORS) * fits(o["size"])
             for image, described in zip(image_records, described_records, strict=True) for o in described["objects"]]
    return sum(rates) / len(rates) if rates else 0.0


def coincides(image_record: dict, described: dict) -> bool:
    """Does the scene `image_record` have an object of the described object's (a record's object dict) colour in
    its cell, of a size and shape whose nominal drawing makes a solid patch for the described size? Its rendering
    then meets colour_region for that object by coincidence."""
    return any(q["color"] == described["color"] and q["region"] == described["region"]
               and _plausible(_AREA[q["shape"]] * q["radius"] ** 2, 2 * q["radius"], 2 * described["radius"])
               for q in image_record["objects"])


def _in_cell(p: Patch, region: str, margin: float) -> bool:
    col, row = REGIONS[region]
    return bool(col / 3 - margin <= p.cx < (col + 1) / 3 + margin and row / 3 - margin <= p.cy < (row + 1) / 3 + margin)


def _check(o: SceneObject, patches: list[Patch], labels: np.ndarray) -> dict:
    side = labels.shape[0]
    near = [p for p in patches if _in_cell(p, o.region, PRESENT_MARGIN) and _solid(p, o, side)]
    if not near:
        return dict.fromkeys(CHECKS, False)
    # the colour_region patch if there is one, else the present patch centred in the cell, else any; the largest
    p = max(near, key=lambda p: (p.colour == o.color and _in_cell(p, o.region, 0.0), _in_cell(p, o.region, 0.0),
                                 p.area))
    colour_region = p.colour == o.color and _in_cell(p, o.region, 0.0)
    shape = _shape_of(p, labels) == o.shape
    return {"present": True, "colour_region": colour_region, "shape": shape, "correct": colour_region and shape}


def _shape_of(p: Patch, labels: np.ndarray) -> str:
    """The shape whose drawing fits the patch best (IoU), each shape drawn with the scene renderer's own calls
    (_draw) in several placements, the best counting:
      - into the patch's bounding box, at its half-side and half a pixel less (a drawn box spans about 2r + 1
        pixels for some shapes and 2r for others);
      - a bounding box that is not square completed to a square across an end of its shorter side where pixels
        of another object colour adjoin it (an object partly hidden under another; _patch has already completed
        a box cut by the image edge);
      - at the patch's centroid with the patch's area and half a pixel either way (blur wears a triangle's
        apex or a square's corners off and shrinks the bounding box).
    Pixels nearest another object colour do not count against a drawing: the object may be hidden under another
    there, or blur may have blended its edge into another colour (red over navy reads purple)."""
    side = labels.shape[0]
    pad = max(p.w, p.h) + 2
    x0, y0 = max(0, int(p.xs.min()) - pad), max(0, int(p.ys.min()) - pad)
    x1, y1 = min(side, int(p.xs.max()) + 1 + pad), min(side, int(p.ys.max()) + 1 + pad)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    mask[p.ys - y0, p.xs - x0] = True
    other = (labels[y0:y1, x0:x1] > 0) & ~mask
    mx, my = float(p.xs.mean()) + 0.5 - x0, float(p.ys.mean()) + 0.5 - y0  # the centroid, in render's coordinates
    half = p.radius * side
    lo_x, hi_x, lo_y, hi_y = p.xs.min() - x0, p.xs.max() + 1 - x0, p.ys.min() - y0, p.ys.max() + 1 - y0
    bx, by = p.cx * side - x0, p.cy * side - y0
    boxes = {(bx, by)}  # and the box completed towards another object's pixels along its shorter side
    if p.w < p.h:
        boxes |= {(x, by) for x, edge in ((hi_x - half, lo_x - 1), (lo_x + half, hi_x))
                  if 0 <= edge < other.shape[1] and other[lo_y:hi_y, edge].any()}
    elif p.h < p.w:
        boxes |= {(bx, y) for y, edge in ((hi_y - half, lo_y - 1), (lo_y + half, hi_y))
                  if 0 <= edge < other.shape[0] and other[edge, lo_x:hi_x].any()}
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)

    def iou(shape: str, cx: float, cy: float, r: float) -> float:
        drawn = _draw(canvas, draw, shape, cx, cy, r)
        return (mask & drawn).sum() / max(1, (mask | (drawn & ~other)).sum())

    def fit(shape: str) -> float:
        r = np.sqrt(p.area / _AREA[shape])
        return max([iou(shape, cx, cy, q) for cx, cy in boxes for q in (half, half - 0.5)]
                   + [iou(shape, mx, my - _CENTROID[shape] * q, q) for q in (r - 0.5, r, r + 0.5) if q > 0])

    return max(SHAPES, key=fit)


def _draw(canvas: Image.Image, draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """The mask of `shape` drawn onto the L image `canvas` (cleared first; `draw` draws on it) with the calls of
    para_train.scenes.synthetic.render: centre cx, cy and half-side r in pixels. On a whole image it matches render
    pixel for pixel (tests/test_evaluate.py); on a crop, to within a pixel's rounding."""
    draw.rectangle([0, 0, canvas.width, canvas.height], fill=0)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    return np.frombuffer(canvas.tobytes(), np.uint8).reshape(canvas.height, canvas.width) > 0
