"""Golden losses: the first 20 steps of the tiny default (stage 1, one rank, seed 0), with validation at steps 10
and 20, pinned in tests/golden/stage1.json. A change that alters them fails tests/test_golden.py, so a refactor
shows that it changed nothing. A change that is meant to alter them regenerates the file, and says so:

    python tests/golden.py        # about a minute on 2 CPU cores (the tiny VAE is built first if not cached)
"""
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
FILE = Path(__file__).with_name("golden") / "stage1.json"
STEPS = 20
OVERRIDES = [f"train.steps={STEPS}", "eval.every=10", "sample.num_images=0", "tracking.enabled=false",
             "checkpoint.every=1000"]
KEYS = ("loss", "grad_norm", "lr")  # per step; plus every val/ metric where validation ran
RTOL = 2e-4  # float noise between CPUs of one kind is far below this; any change in what is computed is far above


def run(run_dir: Path, cache_dir: Path) -> list[dict]:
    """The pinned quantities of a fresh run, step by step (this process must have a process group)."""
    import torch

    from para_train.config import load_config
    from para_train.main import run_stage
    from para_train.training.resolve import resolve

    torch.set_num_threads(2)  # the reduction order of the run that made the file
    cfg = load_config(1, overrides=[f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", *OVERRIDES])
    run_stage(resolve(cfg, _env()))
    rows = [json.loads(x) for x in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines() if x]
    return [{k: v for k, v in r.items() if k == "step" or k in KEYS or k.startswith("val/")} for r in rows]


def _env():
    from para_train.training.distributed import init_process_group, read_env

    env = read_env()
    if not __import__("torch").distributed.is_initialized():
        init_process_group(env)
    return env


if __name__ == "__main__":
    cache = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("~/.cache/para-train").expanduser()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(Path(tmp), cache)
    FILE.parent.mkdir(exist_ok=True)
    FILE.write_text(json.dumps({"command": "python tests/golden.py", "overrides": OVERRIDES, "rows": rows}, indent=1) + "\n")
    print(f"wrote {FILE}: {len(rows)} steps, losses {[round(r['loss'], 4) for r in rows]}")
