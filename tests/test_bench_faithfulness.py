"""benchmarks/bench_faithfulness.py runs end to end at a tiny budget: two arms (512 and 77 text tokens) trained
alike, evaluated on the same paragraphs, a table by description position, a JSON report and a bar chart. Its
figures come from the full run in the README, not from this test."""
import json
import sys

from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_the_faithfulness_experiment_runs_end_to_end(tmp_path, cache_dir, capsys):
    import bench_faithfulness

    out = tmp_path / "bench"
    assert bench_faithfulness.main(["--steps", "2", "--num-prompts", "3", "--sample-steps", "2", "--out", str(out),
                                    "--cache-dir", str(cache_dir), "data.synthetic_samples=32",
                                    "train.micro_batch_size=4"]) == 0
    printed = capsys.readouterr().out
    assert "described before token 77" in printed and "described after token 77" in printed and "budget: 2 steps" in printed
    report = json.loads((out / "faithfulness.json").read_text())
    assert set(report["summaries"]) == {"512 tokens", "77 tokens"} and report["steps_per_arm"] == 2
    assert report["guidance_scale"] == {"512 tokens": 3.0, "77 tokens": 3.0}  # the models' own (sample.guidance_scale)
    for summary in report["summaries"].values():
        # the third paragraph (a long one) describes objects after token 77
        assert summary["position_before77"]["objects"] > 0 and summary["position_after77"]["objects"] > 0
    for length in (512, 77):  # each arm trained with its own text length
        saved = (out / f"max_length_{length}" / "stage1" / "config.yaml").read_text()
        assert f"max_length: {length}" in saved
    assert Image.open(out / "faithfulness.png").size[0] > 300
