"""The evaluator measures what it claims: ground-truth renderings (also softened ones) score about 1.0, noise
and blank images 0 and other scenes' images the chance of a coincidence, computed and simulated; each check
fails exactly when its attribute is wrong, and stray pixels are no object; the headline faithfulness needs all
checks at once; the evaluation set fills every length and position bucket; `para-train evaluate` compares two
models on the same paragraphs and seeds and logs to MLflow."""
import dataclasses
import json
import random
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import load_file, save_file

from para_train.cli import main
from para_train.scenes.synthetic import BACKGROUNDS, COLORS, Scene, SceneObject, make_scene, render
from para_train.scenes.eval_set import (description_starts, eval_set, ground_truth, metrics, num_tokens,
                                       score_items, summarize)
from para_train.scenes.faithfulness import CHECKS, _draw, chance_colour_region, coincides, score_image
from test_generate import tiny_export


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    from para_train.models.build import load_tokenizer
    from para_train.models.tiny import tiny_llama_dir

    return load_tokenizer(str(tiny_llama_dir(cache_dir)), 512)


@pytest.fixture(scope="module")
def items():
    return eval_set(45)  # 15 paragraphs per length profile


def test_ground_truth_scores_near_one_blank_noise_and_other_scenes_near_chance(items, tokenizer):
    for side in (32, 64):  # 32: the tiny model's resolution, small shapes 5 pixels wide
        truth = [ground_truth(it, side) for it in items]
        gt = summarize(score_items(items, truth, tokenizer))
        for group, rates in gt.items():
            assert rates["objects"] > 0 and rates["faithfulness"] >= 0.95, (side, group, rates)
            assert rates["faithfulness"] == rates["correct"] and rates["colour_region"] >= rates["correct"]
        assert gt["overall"]["background"] == 1.0

    truth = [ground_truth(it, 32) for it in items]
    blurred = summarize(score_items(items, [im.filter(ImageFilter.GaussianBlur(0.7)) for im in truth], tokenizer))
    assert blurred["overall"]["colour_region"] >= 0.95 and blurred["overall"]["faithfulness"] >= 0.9  # a soft VAE
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(im, float) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))
             .filter(ImageFilter.GaussianBlur(0.6)) for im in truth]  # generated images are never this clean
    assert summarize(score_items(items, noisy, tokenizer))["overall"]["faithfulness"] >= 0.9

    # no object is ever found on a blank image; its background is right for the scenes of its colour: 1 in 4
    backgrounds = []
    for rgb in BACKGROUNDS.values():
        blank = summarize(score_items(items, [Image.new("RGB", (32, 32), rgb)] * len(items), tokenizer))
        assert all(blank[group][c] == 0 for group in blank if blank[group]["objects"]
                   for c in (*CHECKS, "faithfulness"))
        backgrounds.append(blank["overall"]["background"])
    assert np.mean(backgrounds) == pytest.approx(0.25)

    for side in (32, 64):  # uniform random RGB: a few same-coloured pixels near a cell are no object
        noise = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in items]
        scored = summarize(score_items(items, noise, tokenizer))["overall"]
        assert scored["colour_region"] <= 0.01 and scored["faithfulness"] <= 0.01 and scored["present"] <= 0.02, scored
        assert scored["background"] == 0  # its median may be grey, but it is not a flat grey background

    shuffled = summarize(score_items(items, truth[1:] + truth[:1], tokenizer))["overall"]  # image i + 1, record i
    records = [it.scene for it in items]
    assert shuffled["background"] == np.mean([a["background"] == b["background"]
                                              for a, b in zip(records[1:] + records[:1], records)])
    # chance: an object of the described colour in the described cell about 1 time in 45, then 1 shape in 3
    assert shuffled["colour_region"] <= 0.06 and shuffled["faithfulness"] <= 0.03
    assert 0.1 < shuffled["present"] < 0.4 and shuffled["shape"] < 0.2  # something of a plausible size near the cell


def test_other_scenes_score_the_chance_of_a_coincidence():
    """Scene i's rendering against scene i + 1's record: colour_region is met exactly where scene i happens to have
    an object of the described colour in the described cell (of a size within a size class), which the scenes'
    draws make a 0.021 chance (faithfulness.chance_colour_region); correct adds a shape in 3; background 1 in 4."""
    items = eval_set(200)
    records = [it.scene for it in items]
    shifted = records[1:] + records[:1]
    expected = chance_colour_region(records, shifted)
    assert expected == pytest.approx(0.0214, abs=0.001)
    matches = np.mean([coincides(image, o) for image, described in zip(records, shifted) for o in described["objects"]])
    assert abs(matches - expected) < 0.01  # these 200 pairs are a fair sample of the draws
    same_background = np.mean([a["background"] == b["background"] for a, b in zip(records, shifted)])
    for side in (32, 64):
        scored = [score_image(ground_truth(it, side), rec) for it, rec in zip(items, shifted)]
        objects = [o for s in scored for o in s["objects"]]
        rate = {c: np.mean([o[c] for o in objects]) for c in CHECKS}
        assert abs(rate["colour_region"] - matches) <= 0.005, (side, rate, matches)  # 518 objects: within 2
        assert rate["correct"] <= rate["colour_region"] / 2 + 0.005 and rate["shape"] < rate["present"] / 2
        assert np.mean([s["background"] for s in scored]) == same_background


def test_the_chance_of_a_coincidence_is_what_random_scenes_give():
    """chance_colour_region, computed from the draws, agrees with simulated pairs of random scenes
    (two independent 2-5 object scenes: 3.5 / 9 * 1/8 = 0.049 before the size condition, 0.033 with it)."""
    scenes = [make_scene(random.Random(f"chance/{i}")).to_record() for i in range(6000)]
    images, described = scenes[::2], scenes[1::2]
    expected = chance_colour_region(images, described)
    assert expected == pytest.approx(3.5 / 9 / 8 * 2 / 3, abs=0.001)  # a size within a size class: 2 draws in 3
    simulated = [coincides(image, o) for image, d in zip(images, described) for o in d["objects"]]
    assert abs(np.mean(simulated) - expected) < 3 * np.sqrt(expected / len(simulated)), (np.mean(simulated), expected)


def test_each_check_fails_exactly_when_its_attribute_is_wrong():
    square = SceneObject("square", "red", "large", "top left", 0.17, 0.17, 0.17)
    circle = SceneObject("circle", "yellow", "medium", "bottom right", 0.83, 0.83, 0.12)
    record = Scene("navy", [square, circle]).to_record()

    def score(background="navy", *objects):
        scored = score_image(render(Scene(background, list(objects)), 64), record)
        return scored["background"], [{c: o[c] for c in CHECKS} for o in scored["objects"]]

    right, wrong = dict.fromkeys(CHECKS, True), dict.fromkeys(CHECKS, False)
    assert score("navy", square, circle) == (True, [right, right])
    assert score("black", square, circle) == (False, [right, right])
    recoloured = dataclasses.replace(square, color="green")  # the right shape in the right place, but green
    assert score("navy", recoloured, circle)[1][0] == {**right, "colour_region": False, "correct": False}
    reshaped = dataclasses.replace(square, shape="triangle")
    assert score("navy", reshaped, circle)[1][0] == {**right, "shape": False, "correct": False}
    assert score("navy", dataclasses.replace(reshaped, color="green"), circle)[1][0] == {**wrong, "present": True}
    beside = dataclasses.replace(circle, cx=0.62)  # drawn just across the border into the bottom-centre cell
    assert score("navy", square, beside)[1][1] == {**right, "colour_region": False, "correct": False}
    elsewhere = dataclasses.replace(circle, cx=0.83, cy=0.17)  # in the top right
    assert score("navy", square, elsewhere)[1][1] == wrong
    assert score("navy", square)[1] == [right, wrong]
    # a size class either way is still that object; two (small for large) is not
    assert score("navy", dataclasses.replace(square, size="medium", radius=0.12), circle)[1][0] == right
    assert score("navy", dataclasses.replace(square, size="small", radius=0.08), circle)[1][0] == wrong


def test_pixels_that_are_no_solid_patch_of_the_colour_do_not_count():
    """Only a compact patch of about the described size, really of the described colour, is an object."""
    square = SceneObject("square", "red", "medium", "center", 0.5, 0.5, 0.12)
    record = Scene("navy", [square]).to_record()
    navy, red = np.array(BACKGROUNDS["navy"], np.uint8), np.array(COLORS["red"], np.uint8)

    def checks(paint) -> dict:
        pixels = np.tile(navy, (64, 64, 1))
        paint(pixels)
        return score_image(Image.fromarray(pixels), record)["objects"][0]

    def speckle(px):  # as many red pixels as the square has, on every other pixel of the centre cell
        px[22:42:2, 22:42:2] = red

    def line(px):  # a red bar of the square's area, 3 pixels thick
        px[31:34, 10:54] = red

    def flood(px):  # the centre cell and much around it red
        px[14:50, 14:50] = red

    def rust(px):  # the square in a rust brown, of the palette's colours nearest red, but no red
        px[24:40, 24:40] = (150, 70, 30)

    def close(px):  # the square in a red a little off the palette's
        px[24:40, 24:40] = (200, 60, 55)

    for paint in (speckle, line, flood, rust):
        assert checks(paint) == dict.fromkeys(CHECKS, False), paint.__name__
    assert checks(close) == dict.fromkeys(CHECKS, True)


def test_headline_faithfulness_is_all_checks_at_once_not_their_mean():
    def row(*objects):
        return {"index": 0, "profile": "medium", "tokens": 120, "background": True,
                "objects": [{"starts_at_token": 10, "checks": dict(zip(CHECKS, o))} for o in objects]}

    # one object in the right colour and place but the wrong shape, one the right shape in the wrong colour
    summary = summarize([row((True, True, False, False), (True, False, True, False)), row((True, True, True, True))])
    overall = summary["overall"]
    assert overall["faithfulness"] == overall["correct"] == pytest.approx(1 / 3)
    assert overall["colour_region"] == overall["shape"] == pytest.approx(2 / 3) and overall["present"] == 1.0
    assert overall["background"] == 1.0 and overall["images"] == 2 and overall["objects"] == 3
    assert metrics(summary)["eval/overall/faithfulness"] == pytest.approx(1 / 3)
    assert metrics(summary)["eval/position_before77/colour_region"] == pytest.approx(2 / 3)


def test_the_shape_templates_are_drawn_as_the_renderer_draws():
    for i in range(100):
        scene = make_scene(random.Random(f"templates/{i}"))
        side = (32, 64, 128)[i % 3]
        for o in scene.objects:
            rendered = np.asarray(render(Scene("black", [dataclasses.replace(o, color="white")]), side))
            canvas = Image.new("L", (side, side))
            drawn = _draw(canvas, ImageDraw.Draw(canvas), o.shape, o.cx * side, o.cy * side, o.radius * side)
            assert np.array_equal(drawn, (rendered == COLORS["white"]).all(-1)), (i, o)


def test_scoring_is_fast(items):
    truth = [ground_truth(it, 32) for it in items]
    start = time.perf_counter()
    for it, im in zip(items, truth):
        score_image(im, it.scene)
    assert (time.perf_counter() - start) / len(items) < 0.03  # about 3 ms here; evaluate scores 60, validation a few


def test_the_eval_set_fills_every_length_and_position_bucket(items, tokenizer):
    assert [it.prompt for it in eval_set(45)] == [it.prompt for it in items]  # fixed by the seed
    assert [it.prompt for it in eval_set(45, seed=1)] != [it.prompt for it in items]
    bounds = {"short": (1, 77), "medium": (78, 256), "long": (257, 10_000)}
    after_77 = 0
    for it in items:
        lo, hi = bounds[it.profile]
        assert lo <= num_tokens(tokenizer, it.prompt) <= hi, (it.profile, num_tokens(tokenizer, it.prompt))
        starts = description_starts(tokenizer, it)
        assert starts == sorted(starts) and len(set(starts)) == len(starts) and starts[0] < 77
        after_77 += sum(s >= 77 for s in starts)
    assert after_77 >= 20


def test_evaluate_compares_two_models_on_the_same_paragraphs_and_logs_to_mlflow(cache_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    a = tiny_export(cache_dir)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    unet_file = b / "unet" / "diffusion_pytorch_model.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in load_file(str(unet_file)).items()},
              str(unet_file))
    out, uri = tmp_path / "eval", f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["evaluate", str(a), "--compare", str(b), "--out", str(out), "--num-prompts", "3", "--steps", "2",
                 "--batch-size", "3", "--mlflow", "--tracking-uri", uri]) == 0

    report = json.loads((out / "scores.json").read_text())
    ra, rb = report["models"]["a"], report["models"]["b"]
    assert [(p["index"], p["seed"], p["tokens"]) for p in ra["prompts"]] == \
           [(p["index"], p["seed"], p["tokens"]) for p in rb["prompts"]]
    assert [p["seed"] for p in ra["prompts"]] == [0, 1, 2]
    images = {label: [Image.open(out / p["image"]) for p in report["models"][label]["prompts"]] for label in "ab"}
    assert not np.array_equal(np.asarray(images["a"][0]), np.asarray(images["b"][0]))
    items = eval_set(3)
    assert report["eval_set"]["paragraphs"] == [it.prompt for it in items]
    for label, result in report["models"].items():  # the scores are those of the saved images
        assert summarize(score_items(items, images[label], tokenizer_of(a))) == result["summary"]
    delta = report["delta_b_minus_a"]["overall"]["faithfulness"]
    assert delta == pytest.approx(rb["summary"]["overall"]["faithfulness"] - ra["summary"]["overall"]["faithfulness"])
    assert Image.open(out / "side_by_side.png").size == (3 * 128, 3 * 128)  # ground truth | a | b

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("para-train-eval").experiment_id])
    assert sorted(r.data.tags["para_train.eval_label"] for r in runs) == ["a", "b"]
    for run in runs:
        summary = report["models"][run.data.tags["para_train.eval_label"]]["summary"]
        assert run.data.metrics["eval/overall/faithfulness"] == pytest.approx(summary["overall"]["faithfulness"])
        assert summary["overall"]["faithfulness"] == summary["overall"]["correct"]
        for key in ("colour_region", "background"):
            assert run.data.metrics[f"eval/overall/{key}"] == pytest.approx(summary["overall"][key])
        after = summary["position_after77"]["present"]
        assert run.data.metrics["eval/position_after77/present"] == pytest.approx(after)


def tokenizer_of(export):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export / "tokenizer")
