"""The Slurm layer (cluster/) on a real two-node Slurm cluster on this machine.

cluster/local_slurm.sh starts slurmctld and two slurmd ("nodes" n1, n2, one CPU each). The jobs
are the real batch template with sbatch's own overrides, running the real trainer on the CPU:
one rank per node, so the two ranks meet only through the launcher's rendezvous.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import STAGE1_TRAINING, STEPS
from slurm_cluster import REPO, ensure_installed, local_slurm, read_text, tail

CLUSTER = REPO / "cluster"
TEMPLATES = sorted(CLUSTER.glob("stage*_*.sh"))
SHELL_SCRIPTS = [*TEMPLATES, CLUSTER / "launch.sh", CLUSTER / "local_slurm.sh", REPO / "install.sh", REPO / ".ci" / "run",
                 REPO / "benchmarks" / "gpu_check.sh"]
STAGE1 = CLUSTER / "stage1_64nodes.sh"
# The shared 2-rank run's stage-1 training settings (conftest), so that its losses are the reference.
TRAINING = " ".join(["data.synthetic_samples=96", "train.log_every=1", "sample.num_images=0", "tracking.enabled=false",
                     "eval.every=0", "data.num_canonical_nodes=1",  # the shuffle of one node, as in the local run
                     *STAGE1_TRAINING])


def sbatch_options(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), re.MULTILINE))


def test_templates_request_whole_gpu_nodes_with_preemption_warning():
    assert [t.name for t in TEMPLATES] == ["stage1_64nodes.sh", "stage2_32nodes.sh", "stage3_4nodes.sh"]
    for template, stage, nodes in zip(TEMPLATES, (1, 2, 3), (64, 32, 4)):
        opts = sbatch_options(template)
        text = template.read_text()
        assert opts["nodes"] == str(nodes), template
        assert opts["gpus-per-node"] == "8" and opts["ntasks-per-node"] == "1", template
        assert re.fullmatch(r"B:USR1@\d+", opts["signal"]), template
        assert "#SBATCH --requeue" in text and "#SBATCH --exclusive" in text, template
        assert opts["open-mode"] == "append", template  # a requeued attempt appends to the same log
        assert opts["output"].startswith("cluster/logs/"), template
        # Thin: every template hands over to the one launcher.
        assert re.search(rf'^exec bash .*/cluster/launch.sh" batch {stage} configs/stage{stage}_\w+\.yaml$', text,
                         re.MULTILINE), template
        assert (REPO / text.rsplit(" ", 1)[1].strip()).is_file(), f"{template}: its default config is missing"
    assert (CLUSTER / "logs").is_dir(), "sbatch cannot write --output=cluster/logs/... without the folder"


def test_scripts_parse_and_pass_shellcheck():
    ensure_installed()  # Debian's shellcheck comes with the local cluster's packages
    for script in SHELL_SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"bash -n {script}: {proc.stderr}"
    proc = subprocess.run(["shellcheck", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- jobs on the local cluster

@pytest.fixture(scope="module")
def slurm():
    with local_slurm() as cluster:
        yield cluster


def job_env(run_dir: Path, overrides: str, **extra: str) -> dict:
    return {"PARA_TRAIN_CPU": "1", "PARA_TRAIN_CONFIG": "", "PARA_TRAIN_RUN_DIR": str(run_dir),
            "PARA_TRAIN_PYTHON": sys.executable, "PARA_TRAIN_OVERRIDES": overrides, **extra}


class Job:
    """One submitted job: its id, its batch log and its run directory's logs."""

    def __init__(self, slurm, tmp: Path, env: dict, home: Path = REPO):
        self.slurm, self.run_dir = slurm, Path(env["PARA_TRAIN_RUN_DIR"])
        self.batch_log = tmp / "batch.out"
        env = {**env, "PARA_TRAIN_HOME": str(home)}
        self.id = slurm.submit(home / "cluster" / STAGE1.name, "--nodes=2", "--gpus-per-node=0",
                               output=self.batch_log, env=env)

    def node_log(self, node: int) -> Path:
        return self.run_dir / "logs" / f"stage1-node{node}.log"

    def describe(self) -> str:
        return "\n".join(tail(p) for p in (self.batch_log, self.node_log(0), self.node_log(1)))

    def wait(self, *states: str, timeout: float = 900):
        return self.slurm.wait(self.id, *states, timeout=timeout, describe=self.describe)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines() if x]
    return {row["step"]: row["loss"] for row in rows}


CRASH_STEP = 7  # after the step-6 checkpoint
SRUN_WAIT, SLOW_FINISH = 3, 12  # seconds


@pytest.fixture(scope="module")
def preempted(slurm, cache_dir, tmp_path_factory) -> Job:
    """A two-node stage-1 job with the shared 2-rank run's training settings, through three attempts:
    1. sent USR1 (what --signal=B:USR1@SECS does before the time limit) once it has trained a step;
    2. the requeued attempt loses node 1 (its rank is SIGKILLed right after step 7);
    3. requeued again, it finishes, with rank 0's export taking longer than srun's --wait."""
    tmp = tmp_path_factory.mktemp("slurm-preempted")
    drills = f"debug.crash_at_step={CRASH_STEP} debug.crash_rank=1 debug.slow_finish_s={SLOW_FINISH}"
    job = Job(slurm, tmp, job_env(tmp / "run", f"{TRAINING} {drills} data.cache_dir={cache_dir}",
                                  PARA_TRAIN_SRUN_WAIT=str(SRUN_WAIT)))
    metrics = job.run_dir / "stage1" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert time.monotonic() < deadline, f"no training step within 600 s\n{job.describe()}"
        assert slurm.info(job.id).state in ("PENDING", "RUNNING", "CONFIGURING"), job.describe()
        time.sleep(0.2)
    slurm.signal_batch(job.id, "USR1")
    job.info = job.wait("COMPLETED")
    return job


def test_two_node_job_trains_one_rank_per_node_and_checkpoints(preempted):
    from para_train.files.complete import latest_checkpoint, read_meta

    job = preempted
    assert job.info.exit_code == 0, job.describe()
    batch = read_text(job.batch_log)
    assert "2 node(s) x 1 rank(s)" in batch and "launch.sh: done" in batch, job.describe()
    for node in (0, 1):
        assert f"node {node} exit code 0" in read_text(job.node_log(node)), job.describe()
    assert sorted(losses(job.run_dir)) == list(range(1, STEPS + 1))
    latest = latest_checkpoint(job.run_dir / "stage1" / "checkpoints")
    assert latest is not None and latest.name.endswith(f"{STEPS:08d}")
    assert read_meta(latest)["world_size"] == 2  # the two nodes' ranks trained as one process group
    assert (job.run_dir / "stage1" / "final").is_dir()


def test_usr1_and_a_lost_node_requeue_and_resume_with_the_same_losses(preempted, three_stages):
    job = preempted
    assert job.info.restarts == 2, job.describe()
    batch = read_text(job.batch_log)
    # attempt 1: preempted
    assert "got USR1" in batch and "checkpoint saved; requeueing job" in batch and "attempt 2" in batch, job.describe()
    node0 = read_text(job.node_log(0))
    saved = re.search(r"checkpoint saved at step (\d+)", node0)
    assert saved and int(saved.group(1)) < CRASH_STEP - 1, f"the signal did not stop attempt 1 early\n{job.describe()}"
    # attempt 2: node 1's rank dies after step 7; the job goes back to the step-6 checkpoint
    assert f"SIGKILL after step {CRASH_STEP}" in read_text(job.node_log(1)), job.describe()
    assert ("node failure; the last complete checkpoint is step_00000006; requeueing job" in batch
            and "attempt 3" in batch), job.describe()
    assert re.search(r"resumed from \S+step_00000006 at step 6", node0), job.describe()
    # the same losses as the uninterrupted 2-rank run of the same settings (two local ranks, no Slurm)
    run_dir, _ = three_stages
    assert losses(job.run_dir) == losses(run_dir), job.describe()


def test_a_stage_end_longer_than_sruns_wait_is_not_killed(preempted):
    job = preempted
    assert job.info.exit_code == 0 and "launch.sh: done" in read_text(job.batch_log), job.describe()
    node0 = read_text(job.node_log(0))
    assert "debug.slow_finish_s: the export starts in" in node0, job.describe()
    assert "stage 1 done: diffusers export in" in node0, job.describe()
    assert (job.run_dir / "stage1" / "export" / "model_index.json").is_file()
    # one log per rank beside the node logs, across attempts
    for rank in (0, 1):
        text = read_text(job.run_dir / "logs" / f"stage1-rank{rank}.log")
        assert f"[rank {rank}]" in text, job.describe()
    assert "stage 1 done" in read_text(job.run_dir / "logs" / "stage1-rank0.log")


def test_a_bad_config_fails_the_batch_step_before_any_node_starts(slurm, tmp_path):
    job = Job(slurm, tmp_path, job_env(tmp_path / "run", "train.steps=0"))
    info = job.wait("FAILED", timeout=120)
    assert (info.exit_code, info.restarts) == (2, 0), job.describe()
    assert "config error: train.steps: must be >= 1" in read_text(job.batch_log), job.describe()
    assert not job.node_log(0).exists()


# ---------------------------------------------------------------- the requeue decision, with a stand-in trainer

FAKE_MAIN = """\
import os, sys
codes = os.environ["FAKE_EXIT_CODES"].split(",")  # one per rank
print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: exit {codes[int(os.environ['RANK'])]}", flush=True)
sys.exit(int(codes[int(os.environ["RANK"])]))
"""


@pytest.fixture
def fake_checkout(tmp_path) -> Path:
    """This checkout with para_train/main.py replaced by a script that exits at once."""
    home = tmp_path / "checkout"
    (home / "para_train").mkdir(parents=True)
    (home / "cluster").symlink_to(CLUSTER)
    for entry in (REPO / "para_train").iterdir():
        if entry.name not in ("main.py", "__pycache__"):
            (home / "para_train" / entry.name).symlink_to(entry)
    (home / "para_train" / "main.py").write_text(FAKE_MAIN)
    return home


def test_requeues_stop_at_the_cap(slurm, fake_checkout, tmp_path):
    env = job_env(tmp_path / "run", "", FAKE_EXIT_CODES="75,75", PARA_TRAIN_MAX_REQUEUES="1")
    job = Job(slurm, tmp_path, env, home=fake_checkout)
    info = job.wait("FAILED", timeout=300)
    assert (info.exit_code, info.restarts) == (75, 1), job.describe()
    assert "not requeueing" in read_text(job.batch_log), job.describe()


def test_a_failure_without_progress_is_retried_once_then_stopped_as_a_crash_loop(slurm, fake_checkout, tmp_path):
    env = job_env(tmp_path / "run", "", FAKE_EXIT_CODES="75,1")  # node 1 failed, node 0 saved: no new checkpoint
    job = Job(slurm, tmp_path, env, home=fake_checkout)
    info = job.wait("FAILED", timeout=300)
    assert (info.exit_code, info.restarts) == (1, 1), job.describe()
    batch = read_text(job.batch_log)
    assert "node failure; the last complete checkpoint is none; requeueing job" in batch, job.describe()
    assert "crash loop: this attempt failed from the same checkpoint (none)" in batch, job.describe()


def test_a_config_or_data_error_on_the_nodes_is_not_retried(slurm, fake_checkout, tmp_path):
    job = Job(slurm, tmp_path, job_env(tmp_path / "run", "", FAKE_EXIT_CODES="2,2"), home=fake_checkout)
    info = job.wait("FAILED", timeout=300)
    assert (info.exit_code, info.restarts) == (2, 0), job.describe()
    assert "does not heal with a retry" in read_text(job.batch_log), job.describe()
