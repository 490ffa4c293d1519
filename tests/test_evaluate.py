"""The evaluator measures what it claims: ground-truth renderings score about 1.0, blank images 0 and other
scenes' images chance level; each check fails exactly when its attribute is wrong; the evaluation set fills
every length and position bucket; `para-train evaluate` compares two models on the same paragraphs and seeds
and logs to MLflow."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file

from para_train.cli import main
from para_train.data.synthetic import Scene, SceneObject, render
from para_train.inference.evaluate import (description_starts, eval_set, ground_truth, num_tokens, score_items,
                                           summarize)
from para_train.inference.faithfulness import CHECKS, score_image
from test_generate import tiny_export


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    from para_train.models.build import load_tokenizer
    from para_train.models.tiny import tiny_llama_dir

    return load_tokenizer(str(tiny_llama_dir(cache_dir)), 512)


@pytest.fixture(scope="module")
def items():
    return eval_set(45)  # 15 paragraphs per length profile


def test_ground_truth_scores_near_one_blank_and_shuffled_images_near_chance(items, tokenizer):
    truth = [ground_truth(it, 32) for it in items]  # the tiny model's resolution: small shapes are 5 pixels wide
    gt = summarize(score_items(items, truth, tokenizer))
    for group, rates in gt.items():
        assert rates["objects"] > 0 and rates["faithfulness"] >= 0.95, (group, rates)
    assert gt["overall"]["background"] == 1.0

    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(im, float) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8))
             .filter(ImageFilter.GaussianBlur(0.6)) for im in truth]  # generated images are never this clean
    assert summarize(score_items(items, noisy, tokenizer))["overall"]["faithfulness"] >= 0.9

    blank = summarize(score_items(items, [Image.new("RGB", (32, 32), (110, 110, 115))] * len(items), tokenizer))
    assert all(blank[group][c] == 0 for group in blank if blank[group]["objects"] for c in CHECKS)

    shuffled = summarize(score_items(items, truth[1:] + truth[:1], tokenizer))["overall"]
    # chance: some shape near the region about 40% of the time, then 1 colour in 8 and 1 shape in 3
    assert 0.2 < shuffled["present"] < 0.6 and shuffled["colour"] < 0.15 and shuffled["shape"] < 0.3
    assert shuffled["faithfulness"] < 0.4


def test_each_check_fails_exactly_when_its_attribute_is_wrong():
    square = SceneObject("square", "red", "large", "top left", 0.17, 0.17, 0.17)
    circle = SceneObject("circle", "yellow", "medium", "bottom right", 0.83, 0.83, 0.12)
    record = Scene("navy", [square, circle]).to_record()

    def score(background="navy", *objects):
        scored = score_image(render(Scene(background, list(objects)), 64), record)
        return scored["background"], [{c: o[c] for c in CHECKS} for o in scored["objects"]]

    right = dict.fromkeys(CHECKS, True)
    assert score("navy", square, circle) == (True, [right, right])
    assert score("black", square, circle) == (False, [right, right])
    assert score("navy", dataclasses.replace(square, color="green"), circle)[1][0] == {**right, "colour": False}
    assert score("navy", dataclasses.replace(square, shape="triangle"), circle)[1][0] == {**right, "shape": False}
    beside = dataclasses.replace(circle, cx=0.62)  # drawn just across the border into the bottom-centre cell
    assert score("navy", square, beside)[1][1] == {**right, "region": False}
    elsewhere = dataclasses.replace(circle, cx=0.83, cy=0.17)  # in the top right
    assert score("navy", square, elsewhere)[1][1] == dict.fromkeys(CHECKS, False)
    assert score("navy", square)[1] == [right, dict.fromkeys(CHECKS, False)]


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
        after = summary["position_after77"]["present"]
        assert run.data.metrics["eval/position_after77/present"] == pytest.approx(after)


def tokenizer_of(export):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export / "tokenizer")
