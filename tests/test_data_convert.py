"""`para-train data convert`: every source format becomes MDS shards that stream back the exact
image bytes and captions; bad pairs are skipped with reasons; the summary counts caption tokens."""
import io
import json

import pytest
from PIL import Image

from para_train.cli import main as cli_main
from para_train.data.convert import convert
from para_train.data.loader import open_shards
from para_train.scenes.synthetic import synthetic_sample
from para_train.models.build import load_tokenizer
from para_train.models.tiny import tiny_llama_dir


def _image(i: int) -> tuple[bytes, str]:
    fmt = ("PNG", "JPEG", "WEBP")[i % 3]
    buf = io.BytesIO()
    Image.new("RGB", (40 + 7 * i, 24 + 5 * i), (30 * i % 256, 90, 200 - 10 * i)).save(buf, format=fmt, quality=90)
    return buf.getvalue(), fmt.lower()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Five good pairs in several encodings and sizes; captions with inner spaces, quotes and non-ASCII."""
    root = tmp_path_factory.mktemp("pairs")
    good = []
    for i in range(5):
        data, ext = _image(i)
        rel = f"img/{i:02d}.{ext}"
        (root / "img").mkdir(exist_ok=True)
        (root / rel).write_bytes(data)
        caption = f"Picture {i}: a \"quoted\" café scene,  with two  spaces. " + "More words here. " * (0, 2, 8, 30, 45)[i]
        good.append((rel, caption.strip(), data))
    (root / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    return root, good


def read_back(out, cache_dir) -> dict[str, dict]:
    ds = open_shards(str(out), cache_dir)
    return {s["sample_id"]: s for s in (ds.get_item(i) for i in range(ds.num_samples))}


def assert_round_trip(got: dict, good, source: str):
    assert len(got) == len(good)
    by_caption = {s["caption"]: s for s in got.values()}
    for rel, caption, data in good:
        s = by_caption[caption]
        assert s["image"] == data  # the original encoded bytes, not re-encoded
        assert (s["width"], s["height"]) == Image.open(io.BytesIO(data)).size
        assert s["source"] == source


def test_tsv_converts_and_streams_back_identical_pairs_and_reports_what_it_skipped(pairs, tmp_path, cache_dir):
    root, good = pairs
    lines = ["image_path\tcaption"] + [f"{rel}\t{cap}" for rel, cap, _ in good]
    lines += ["img/missing.png\ta caption", "img/broken.png\ta broken image", "img/00.png\t   ", "no tab on this line"]
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n")
    summary_path = tmp_path / "summary.json"
    code = cli_main(["data", "convert", str(root / "pairs.tsv"), str(tmp_path / "out"), "--cache-dir", str(cache_dir),
                     "--size-limit", "1kb", "--compression", "zstd", "--summary", str(summary_path), "--quiet"])
    assert code == 0
    assert_round_trip(read_back(tmp_path / "out", cache_dir), good, "pairs")
    summary = json.loads(summary_path.read_text())
    assert summary["written"] == 5 and summary["shards"] >= 2  # the size limit splits shards
    assert summary["skipped"] == {"image file not found": 1, "not a decodable image": 1, "empty caption": 1,
                                  "line has no tab between image path and caption": 1}
    assert summary["skipped_examples"]["image file not found"] == [f"pairs.tsv:7 ({root / 'img/missing.png'})"]
    tok = load_tokenizer(str(tiny_llama_dir(cache_dir)), 512)
    lengths = sorted(len(tok(cap)["input_ids"]) for _, cap, _ in good)
    assert lengths[0] < 77 < lengths[2] and lengths[-2] < 512 < lengths[-1]  # the captions span both limits
    assert summary["caption_tokens"] == {"count": 5, "mean": round(sum(lengths) / 5, 1), "p50": lengths[2],
                                         "p90": lengths[4], "p99": lengths[4], "max": lengths[4],
                                         "over_77": sum(n > 77 for n in lengths), "over_512": 1}


def test_jsonl_folder_and_synthetic_sources_round_trip_with_the_same_stable_ids(pairs, tmp_path, cache_dir):
    root, good = pairs
    records = [json.dumps({"image": rel, "text": cap}) for rel, cap, _ in good] + ["{not json", '{"caption": "no image"}']
    (root / "pairs.jsonl").write_text("\n".join(records) + "\n")
    jsonl = convert(str(root / "pairs.jsonl"), str(tmp_path / "jsonl"), "jsonl", progress=False)
    assert jsonl.written == 5 and sum(jsonl.skipped.values()) == 2
    from_jsonl = read_back(tmp_path / "jsonl", cache_dir)
    assert_round_trip(from_jsonl, good, "pairs")

    folder = tmp_path / "folder"
    folder.mkdir()
    for rel, cap, data in good:
        name = rel.split("/")[1]
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(cap + "\n")
    (folder / "uncaptioned.png").write_bytes(good[0][2])
    summary = convert(str(folder), str(tmp_path / "from_folder"), "folder", workers=1, progress=False)
    assert summary.written == 5 and summary.skipped == {"no caption file (.txt next to the image)": 1}
    from_folder = read_back(tmp_path / "from_folder", cache_dir)
    assert_round_trip(from_folder, good, "folder")
    assert set(from_folder) == set(from_jsonl)  # ids hash the content: same pairs, same ids, whatever the format

    convert("synthetic", str(tmp_path / "synthetic"), "synthetic", synthetic_count=4, synthetic_seed=3, progress=False)
    synthetic = read_back(tmp_path / "synthetic", cache_dir)
    for i in range(4):
        expected = synthetic_sample(3, i)
        s = synthetic[expected.sample_id]
        assert s["image"] == expected.image_png and s["caption"] == expected.caption and s["scene"] == expected.scene


def test_convert_refuses_to_write_into_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code = cli_main(["data", "convert", "synthetic", str(tmp_path / "out"), "--num-samples", "2", "--tokenizer", "none",
                     "--quiet"])
    assert code == 2 and (tmp_path / "out" / "keep.txt").exists()
