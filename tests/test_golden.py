"""The tiny default's first 20 steps give the pinned losses, gradient norms and validation metrics
(tests/golden.py says how the file is made), and validation runs at exactly the configured steps."""
import json

import pytest

import golden


def test_the_tiny_default_reproduces_its_golden_losses(tmp_path, cache_dir):
    pinned = json.loads(golden.FILE.read_text())
    assert pinned["overrides"] == golden.OVERRIDES, "the run's settings changed: regenerate with python tests/golden.py"
    rows = golden.run(tmp_path, cache_dir)
    assert [r["step"] for r in rows] == list(range(1, golden.STEPS + 1))
    validated = [r["step"] for r in rows if "val/loss" in r]
    assert validated == [10, 20]  # eval.every=10, and the stage's end
    assert {"val/loss_t100", "val/loss_t500", "val/loss_t900", "val/faithfulness/correct"} <= set(rows[-1])
    for got, want in zip(rows, pinned["rows"], strict=True):
        assert set(got) == set(want), f"step {got['step']}: metrics {sorted(set(got) ^ set(want))} appeared or went"
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=golden.RTOL, abs=1e-7), (
                f"step {got['step']} {key}: {got[key]} != pinned {value}; if the change is meant to alter training, "
                "regenerate tests/golden/stage1.json with `python tests/golden.py` and say so in the change")
