"""Shared test set-up: CPU only, one tiny-asset cache per session, helpers to launch real ranks."""
import os

# Triton kernels run through the interpreter on the CPU; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # tests talk to loopback only

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "para_train" / "main.py"
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Tiny Llama/VAE/tokenizer and synthetic shards are generated once per test session."""
    return tmp_path_factory.mktemp("para-train-cache")


def rank_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(stage: int, overrides: list[str], num_procs: int = 2) -> list[str]:
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(num_procs), "--master_port", str(free_port()), str(MAIN), "--stage",
            str(stage), *overrides]


def run_deepspeed(stage: int, overrides: list[str], num_procs: int = 2, timeout: float = 300,
                  check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(deepspeed_cmd(stage, overrides, num_procs), env=rank_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"deepspeed stage {stage} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def start_deepspeed(stage: int, overrides: list[str], log_path: Path, num_procs: int = 2) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(deepspeed_cmd(stage, overrides, num_procs), env=rank_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def read_metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def wait_for_step(stage_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(stage_dir)
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before step {step}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")
