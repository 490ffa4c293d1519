"""`para-train generate`: every prompt format gives images, a grid and a JSON of prompts, seeds and settings;
image i depends only on its prompt and seed + i; a malformed prompt file fails before the model loads, naming
the line."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from para_train.cli import main
from para_train.inference.prompts import PromptFileError, read_prompts


def tiny_export(cache_dir: Path) -> Path:
    """A stage-2 export of the tiny model with fresh UNet and LoRA weights (the training module, written by the
    trainer's save_final), made once per test session in the session's cache."""
    out = cache_dir / "test-exports" / "tiny-stage2"
    if (out / "model_index.json").is_file():
        return out
    import torch

    from para_train.config import load_config, save_config
    from para_train.inference.export import export_model
    from para_train.models import build
    from para_train.models.paradiffusion import ParaDiffusion, TextEncoder
    from para_train.files import model_weights as weights

    stage = cache_dir / "test-exports" / "run" / "stage2"
    cfg = load_config(2, overrides=[f"run.dir={stage.parent}", f"data.cache_dir={cache_dir}",
                                    "checkpoint.init_from=none", "model.llm.max_length=64",
                                    "sample.guidance_scale=2.5"])
    torch.manual_seed(0)
    llm_path = build.resolve_llm_path(cfg.model.llm, cache_dir)
    llm = build.build_llm(build.llm_config(cfg.model.llm, llm_path))
    with build.read_weights(llm_path, strip_prefixes=("model.",)) as reader:
        weights.copy_into(llm, reader, rank=0)
    llm = build.add_lora(llm, cfg.model.lora)
    model = ParaDiffusion(TextEncoder(llm), build.build_unet(build.unet_config(cfg.model.unet)))
    weights.save_final(model, stage / "final", rank=0)
    save_config(cfg, stage / "config.yaml")
    return export_model(stage, out)


@pytest.fixture(scope="module")
def exported(cache_dir):
    return tiny_export(cache_dir)


PARAGRAPHS = [
    "The image is a minimal composition: 2 coloured shapes placed on an even navy background. The first object "
    "is a large red circle in the top left part of the image.",
    "In this square illustration, 1 geometric objects are arranged over a uniform black background. The first "
    "object is a small yellow triangle in the center.",
    "This picture shows a simple scene made of 2 flat geometric shapes resting on a plain grey background, with "
    "a blue square at the bottom.",
]


def write_formats(folder: Path) -> dict[str, tuple[Path, list[dict]]]:
    """Each format with the same three paragraphs, and what generation.json should say about them."""
    txt = folder / "prompts.txt"
    txt.write_text(f"{PARAGRAPHS[0]}\n\n{PARAGRAPHS[1]}\n{PARAGRAPHS[2]}\n")
    jsonl = folder / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p, "id": f"p{i}", "category": "shapes"})
                               for i, p in enumerate(PARAGRAPHS)) + "\n")
    csv = folder / "ParaPrompts-400.csv"
    first = PARAGRAPHS[0].replace("navy background. ", "navy background.\n")  # a quoted field across two lines
    csv.write_text("Image,Prompt,Category,Prompt_Chinese\n"
                   f'1.jpg,"{first}",Scene,"场景"\n2.jpg,"{PARAGRAPHS[1]}",Object,\n3.jpg,"{PARAGRAPHS[2]}",Scene,\n')
    return {
        "txt": (txt, [{"line": 1, "id": None, "category": None}, {"line": 3, "id": None, "category": None},
                      {"line": 4, "id": None, "category": None}]),
        "jsonl": (jsonl, [{"line": i + 1, "id": f"p{i}", "category": "shapes"} for i in range(3)]),
        "csv": (csv, [{"line": 2, "id": "1.jpg", "category": "Scene"}, {"line": 4, "id": "2.jpg", "category": "Object"},
                      {"line": 5, "id": "3.jpg", "category": "Scene"}]),
    }


def test_generate_writes_images_grid_and_json_for_every_prompt_format(exported, tmp_path):
    for fmt, (path, expected) in write_formats(tmp_path).items():
        out = tmp_path / f"out_{fmt}"
        assert main(["generate", str(exported), str(path), "--out", str(out), "--steps", "2", "--batch-size", "2",
                     "--seed", "5"]) == 0
        record = json.loads((out / "generation.json").read_text())
        assert record["settings"]["steps"] == 2 and record["settings"]["resolution"] == 32
        assert record["settings"]["scheduler"] == "DPMSolverMultistepScheduler"
        assert [im["seed"] for im in record["images"]] == [5, 6, 7]
        got_text = [im["prompt"] for im in record["images"]]
        assert got_text[1:] == PARAGRAPHS[1:] and got_text[0].split() == PARAGRAPHS[0].split(), fmt
        assert [{k: im[k] for k in ("line", "id", "category")} for im in record["images"]] == expected, fmt
        for im in record["images"]:
            assert Image.open(out / im["file"]).size == (32, 32)
        assert Image.open(out / "grid.png").size == (64, 64)  # 2 x 2 cells for 3 images
    # the same prompt and seed give the same image, whichever format, batch or position it came in
    second = [np.asarray(Image.open(tmp_path / f"out_{fmt}" / "images" / "00001.png")) for fmt in ("txt", "jsonl")]
    assert np.array_equal(*second)
    alone = tmp_path / "alone.txt"
    alone.write_text(PARAGRAPHS[1] + "\n")
    assert main(["generate", str(exported), str(alone), "--out", str(tmp_path / "alone"), "--steps", "2",
                 "--seed", "6"]) == 0
    alone_image = np.asarray(Image.open(tmp_path / "alone" / "images" / "00000.png")).astype(int)
    assert np.abs(alone_image - second[0]).max() <= 2  # another batch size changes float rounding, nothing else
    # without --guidance-scale the model samples with its run's sample.guidance_scale, and says so
    assert json.loads((tmp_path / "alone" / "generation.json").read_text())["settings"]["guidance_scale"] == 2.5
    for scale in (2.5, 7.5):
        assert main(["generate", str(exported), str(alone), "--out", str(tmp_path / f"cfg{scale}"), "--steps", "2",
                     "--seed", "6", "--guidance-scale", str(scale)]) == 0
    same, other = (np.asarray(Image.open(tmp_path / f"cfg{s}" / "images" / "00000.png")).astype(int)
                   for s in (2.5, 7.5))
    assert np.abs(same - alone_image).max() == 0 and np.abs(other - alone_image).max() > 2
    # an earlier generation is not overwritten by accident
    assert main(["generate", str(exported), str(alone), "--out", str(tmp_path / "alone")]) == 2


@pytest.mark.parametrize("name, content, message", [
    ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n', r"p\.jsonl:3: not valid JSON"),
    ("p.jsonl", '{"prompt": "a"}\n{"text_zh": "b"}\n', r"p\.jsonl:2: no non-empty \"prompt\" string .*text_zh"),
    ("p.jsonl", '["a list"]\n', r"p\.jsonl:1: expected a JSON object"),
    ("p.csv", "Caption,Text\nx,y\n", r"p\.csv:1: expected the ParaPrompts-400 header"),
    ("p.csv", 'Image,Prompt,Category,Prompt_Chinese\n1.jpg,"two\nlines",S,\n2.jpg,,S,\n',
     r"p\.csv:4: the Prompt field is empty"),
    ("p.csv", "Image,Prompt,Category,Prompt_Chinese\n1.jpg,a,b,c\n2.jpg,one, two,S,\n", r"p\.csv:3: 5 fields"),
    ("p.txt", b"fine\n\xff\xfe broken\n", r"p\.txt:2: not UTF-8"),
    ("p.md", "a paragraph\n", r"unknown prompt file type '\.md'"),
    ("p.txt", "\n\n", r"p\.txt: holds no prompts"),
])
def test_malformed_prompt_files_name_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PromptFileError, match=message):
        read_prompts(path)


def test_a_malformed_prompt_file_fails_before_the_model_loads(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    assert main(["generate", str(tmp_path / "no-such-export"), str(path), "--out", str(tmp_path / "o")]) == 2
    assert "p.jsonl:2:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
