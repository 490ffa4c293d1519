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
    from para_train.training.distributed import free_port

    return free_port()


def deepspeed_cmd(stage: int, overrides: list[str], num_procs: int = 2, cli: bool = False) -> list[str]:
    """The ranks of main.py: through the real `deepspeed` CLI with `cli`, else through tests/launch_ranks.py,
    which starts the same ranks with the same environment ~15 s sooner here (it imports neither torch nor DeepSpeed)."""
    if cli:
        launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(num_procs)]
    else:
        launcher = [sys.executable, str(REPO / "tests" / "launch_ranks.py"), "--nproc", str(num_procs)]
    return [*launcher, "--master_port", str(free_port()), str(MAIN), "--stage", str(stage), *overrides]


def run_deepspeed(stage: int, overrides: list[str], num_procs: int = 2, timeout: float = 300,
                  check: bool = True, cli: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(deepspeed_cmd(stage, overrides, num_procs, cli), env=rank_env(), capture_output=True,
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


# ---------------------------------------------------------------- the shared two-rank run
# The multi-process runs are what the suite's time goes to, so one three-stage run on two ranks serves
# every test that needs a real 2-rank ZeRO-3 result (sharding, NaN skip, tracking, resume, the planner's
# memory check, the export of a 2-rank stage, the Slurm job's losses). Tests copy what they change; none writes
# into it.

STEPS = 10
STAGE2_STEPS = 3


def common_args(run_dir, cache_dir, tracking_uri: str | None):
    """`tracking_uri` None: tracking off."""
    tracking = [f"tracking.uri={tracking_uri}", "tracking.log_every=1"] if tracking_uri else ["tracking.enabled=false"]
    return [f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "data.synthetic_samples=96", "train.log_every=1",
            "sample.num_images=2", "sample.steps=3", "eval.every=0", *tracking]


STAGE1_TRAINING = [f"train.steps={STEPS}", "checkpoint.every=3",
                   # rank 1 produces a NaN loss at step 4: every rank must skip that update
                   "debug.nan_loss_at_step=4", "debug.nan_loss_rank=1"]


def stage1_args(run_dir, cache_dir, tracking_uri):
    return common_args(run_dir, cache_dir, tracking_uri) + STAGE1_TRAINING + ["tracking.sample_every=5", *VALIDATION]


# Validation in the shared run's stage 1, at steps 5 and 10: sharded over both ranks, and (test_distributed) the same
# after a SIGKILL and resume
VALIDATION = ["eval.every=5", "eval.num_samples=6", "eval.num_images=2", "eval.sample_steps=3"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    from mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def three_stages(tmp_path_factory, cache_dir, mlflow_server):
    """Stages 1-3 on two ranks: stage 1 tracked in MLflow with a NaN on rank 1, stage 2 tracked (with a
    projection), stage 3 in bf16 against an unreachable server."""
    run_dir = tmp_path_factory.mktemp("run")
    # the server starts while stage 1 launches; the tracker waits for it without holding up training
    # stage 1 through the real `deepspeed` CLI (the README's command); the tests that compare losses with it
    # (SIGKILL + resume, Slurm) launch their ranks otherwise, so equal losses also show the launchers agree
    outputs = {1: run_deepspeed(1, stage1_args(run_dir, cache_dir, mlflow_server.uri), cli=True)}
    mlflow_server.wait_ready()
    # stage 2 with a trained projection (LLM width -> cross-attention width): tests/test_export.py exports it
    outputs[2] = run_deepspeed(2, common_args(run_dir, cache_dir, mlflow_server.uri) + [
        f"train.steps={STAGE2_STEPS}", f"checkpoint.every={STAGE2_STEPS}", "model.projection=true"])
    # stage 3 logs to a server that is not there: training must finish anyway, metrics go to the fallback file
    dead = f"http://127.0.0.1:{free_port()}"
    outputs[3] = run_deepspeed(3, common_args(run_dir, cache_dir, dead) + ["train.steps=2", "checkpoint.every=2",
                                                                            "train.precision=bf16", "model.projection=true"])
    return run_dir, outputs

