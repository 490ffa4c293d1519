"""Two real ranks under the `deepspeed` launcher with ZeRO-3 on gloo (conftest's `three_stages` run):
sharding, all three stages (the third in bf16), a NaN on one rank, SIGKILL + resume giving the same
losses as an uninterrupted run, and every run tracked in a real `mlflow server` (or an unreachable one)."""
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import STEPS, REPO, kill_group, read_metrics, run_deepspeed, stage1_args, start_deepspeed, wait_for_step

def test_zero3_shards_every_large_tensor_across_two_ranks(three_stages):
    import json

    run_dir, _ = three_stages
    for stage in (1, 2):
        r0, r1 = (json.loads((run_dir / f"stage{stage}" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
        assert r0["world_size"] == r1["world_size"] == 2
        large = {n: v for n, v in r0["tensors"].items() if v[1] >= 1024}
        assert len(large) > 20
        for name, (local, total) in large.items():
            assert local == math.ceil(total / 2), f"{name}: rank 0 holds {local} of {total}"
            assert r1["tensors"][name][0] == local
        assert r0["local_numel"] < 0.55 * r0["total_numel"]


def test_three_stages_on_two_ranks_with_a_nan_on_one_rank(three_stages):
    run_dir, outputs = three_stages
    rows = read_metrics(run_dir / "stage1")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["skipped_steps"] == 1  # counted on rank 0 although the NaN was on rank 1
    assert "non-finite loss on 1 rank(s); update skipped" in outputs[1].stdout + outputs[1].stderr
    for stage in (1, 2, 3):
        final = run_dir / f"stage{stage}" / "final"
        unet = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
        assert unet and all(torch.isfinite(t).all() for t in unet.values())
        assert (run_dir / f"stage{stage}" / "samples").is_dir()
        ranks = [json.loads((run_dir / f"stage{stage}" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["precision"] for r in ranks] == ["bf16" if stage == 3 else "fp32"] * 2
        assert all(r["model_state_bytes"]["optimizer_state"] > 0 for r in ranks)  # written after the first step
    # peft under ZeRO-3 is known to save empty adapters; ours holds the trained values
    adapter = load_file(str(run_dir / "stage2" / "final" / "lora" / "adapter_model.safetensors"))
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.numel() > 0 and torch.count_nonzero(t) > 0 for t in lora_b)


def test_runs_are_tracked_in_mlflow(three_stages, mlflow_server, tmp_path):
    import subprocess
    from importlib.metadata import version

    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    run_dir, _ = three_stages
    client = MlflowClient(mlflow_server.uri)
    stage1_id = (run_dir / "stage1" / "final" / "mlflow_run_id").read_text().strip()
    run = client.get_run(stage1_id)
    params = run.data.params
    assert params["train.steps"] == str(STEPS) and params["world_size"] == "2" and params["num_nodes"] == "1"
    assert params["versions.torch"] == version("torch") and params["versions.deepspeed"] == version("deepspeed")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert params["git.revision"] == run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["stage"] == "1"
    val = client.get_metric_history(stage1_id, "val/loss")  # validation sharded over both ranks, at 5 and the end
    assert [(m.step, m.value) for m in sorted(val, key=lambda m: m.step)] == \
        [(r["step"], r["val/loss"]) for r in read_metrics(run_dir / "stage1") if "val/loss" in r]
    history = client.get_metric_history(stage1_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(r["step"], r["loss"]) for r in read_metrics(run_dir / "stage1")]
    # sample grids as training goes (tracking.sample_every=5) and at the end
    artifacts = sorted(a.path for a in client.list_artifacts(stage1_id, "samples"))
    assert artifacts == ["samples/step_00000005.png", f"samples/step_{STEPS:08d}.png"], artifacts
    stage2_id = (run_dir / "stage2" / "final" / "mlflow_run_id").read_text().strip()
    assert client.get_run(stage2_id).data.tags["mlflow.parentRunId"] == stage1_id
    # each stage's export is a version of the registered model, tagged with its stage
    versions = {v.tags["stage"]: v for v in client.search_model_versions("name='para-train'")
                if v.run_id in (stage1_id, stage2_id)}
    assert sorted(versions) == ["1", "2"]
    got = Path(download_artifacts(artifact_uri=versions["2"].source, dst_path=str(tmp_path), tracking_uri=mlflow_server.uri))
    unet = Path("unet") / "diffusion_pytorch_model.safetensors"
    assert (got / unet).read_bytes() == (run_dir / "stage2" / "export" / unet).read_bytes()
    assert (got / "model_index.json").is_file() and (got / "text_encoder" / "lora").is_dir()
    # stage 3's server was unreachable: it trained to the end and kept its metrics and model locally
    fallback = [json.loads(x) for x in (run_dir / "tracking_fallback.jsonl").read_text().splitlines() if x]
    assert sorted(r["step"] for r in fallback if "metrics" in r and "loss" in r["metrics"]) == [1, 2]
    assert [r["model"] for r in fallback if "model" in r] == [str((run_dir / "stage3" / "export").resolve())]


def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(three_stages, tmp_path, cache_dir, mlflow_server):
    from mlflow.tracking import MlflowClient

    run_dir, _ = three_stages
    expected = [(r["step"], r["loss"]) for r in read_metrics(run_dir / "stage1")]
    expected_val = [{k: v for k, v in r.items() if k == "step" or k.startswith("val/")} for r in read_metrics(
        run_dir / "stage1") if "val/loss" in r]
    assert [r["step"] for r in expected_val] == [5, 10]
    args = stage1_args(tmp_path, cache_dir, mlflow_server.uri)
    stage_dir = tmp_path / "stage1"

    # 1. every rank dies while writing the step-6 checkpoint: shards on disk, no COMPLETE marker
    crashed = run_deepspeed(1, args + ["debug.kill_in_checkpoint_at_step=6"], check=False)
    assert crashed.returncode != 0
    assert (stage_dir / "checkpoints" / "step_00000006").is_dir()
    assert not (stage_dir / "checkpoints" / "step_00000006" / "COMPLETE").exists()

    # 2. resume picks step 3 (the last complete one); SIGKILL the whole job after step 8 (step 6 is then complete)
    proc = start_deepspeed(1, args, tmp_path / "resume1.log")
    wait_for_step(stage_dir, 8, proc)
    kill_group(proc)
    assert "resumed from" in (tmp_path / "resume1.log").read_text()
    assert "step_00000003" in (tmp_path / "resume1.log").read_text()

    # 3. the newest complete checkpoint (step 6) is damaged after its marker was written, as a node crash or a
    # full disk leaves it: resume names the bad file and continues from step 3, the previous complete one
    newest = stage_dir / "checkpoints" / "step_00000006"
    assert (newest / "COMPLETE").is_file()
    [optim] = newest.glob("zero_pp_rank_1_*optim_states.pt")
    with open(optim, "r+b") as f:
        f.truncate(optim.stat().st_size // 2)
    out = run_deepspeed(1, args)
    log = out.stdout + out.stderr
    assert f"step_00000006 is damaged: {optim.name} has" in log and "falling back" in log, log[-3000:]
    assert "resumed from" in log and "step_00000003" in log
    got = [(r["step"], r["loss"]) for r in read_metrics(stage_dir)]
    assert got == expected  # exact: same data order, noise, dropout and optimizer state
    # the validation curve is continuous: step 5's point (first made before the crash at 6, then by the resumed
    # attempts) and step 10's equal the uninterrupted run's
    assert [{k: v for k, v in r.items() if k == "step" or k.startswith("val/")} for r in read_metrics(stage_dir)
            if "val/loss" in r] == expected_val
    # ...and all three attempts logged into one MLflow run, each step exactly once
    run_id = (stage_dir / "final" / "mlflow_run_id").read_text().strip()
    steps = sorted(m.step for m in MlflowClient(mlflow_server.uri).get_metric_history(run_id, "loss"))
    assert steps == list(range(1, STEPS + 1))
