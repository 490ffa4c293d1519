"""para_train.tracking against real `mlflow server`s on loopback (started once for the module)."""
import os

# mlflow sends usage telemetry unless told not to (read when mlflow is imported); tests stay on loopback.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import json  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from conftest import free_port  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402
from para_train import tracking  # noqa: E402
from para_train.config import ConfigError  # noqa: E402
from para_train.tracking import FALLBACK_FILE, PARENT_RUN_TAG, TrackingConfig, create_tracker  # noqa: E402


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """'shared' serves most tests; 'doomed' is killed and restarted. They start side by side."""
    started = {name: MlflowServer(tmp_path_factory.mktemp(f"mlflow_{name}")).start() for name in ("shared", "doomed")}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def server(servers):
    return servers["shared"]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "para_train.tracking" and r.levelno >= logging.WARNING]


def _fallback_records(run_dir) -> list[dict]:
    path = run_dir / FALLBACK_FILE
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n")]  # skip a line being written


def _fallback_steps(run_dir) -> list[int]:
    return sorted(record["step"] for record in _fallback_records(run_dir) if "step" in record)


def _steps(client, run_id, key="loss") -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


def _wait_for(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not true after {timeout_s} s"
        time.sleep(0.1)


def _image(width=24, height=16) -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_params_metrics_and_images_read_back(server, tmp_path):
    cfg = TrackingConfig(uri=server.uri, experiment="read-back", run_name="stage1-tiny")
    tracker = create_tracker(cfg, str(tmp_path), rank=0, tags={"stage": 1})
    assert tracker.run_id is not None
    tracker.log_params({"model": {"unet": {"channels": [32, 64]}, "llm": "tiny"}, "lr": 1e-4, "note": "x" * 7000})
    for step in range(1, 21):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-4 * step}, step)
    grid = _image()
    tracker.log_image(grid, "samples/step_00000020.png")
    grid_file = tmp_path / "grid.png"
    _image(8, 8).save(grid_file)
    tracker.log_image(str(grid_file), "samples/from_file.png")
    tracker.close()

    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "stage1-tiny"
    assert run.data.tags["stage"] == "1"
    assert run.data.params == {
        "model.unet.channels": "[32, 64]", "model.llm": "tiny", "lr": "0.0001", "note": "x" * 6000,
    }
    history = sorted(client.get_metric_history(tracker.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(step, 1.0 / step) for step in range(1, 21)]
    logged = client.download_artifacts(tracker.run_id, "samples/step_00000020.png", str(tmp_path / "dl"))
    assert np.array_equal(np.asarray(PIL.Image.open(logged)), np.asarray(grid))
    logged = client.download_artifacts(tracker.run_id, "samples/from_file.png", str(tmp_path / "dl"))
    assert open(logged, "rb").read() == grid_file.read_bytes()
    assert not (tmp_path / FALLBACK_FILE).exists()


def test_resume_continues_the_run_without_duplicate_steps(server, tmp_path, caplog):
    cfg = TrackingConfig(uri=server.uri, experiment="resume")
    first = create_tracker(cfg, str(tmp_path), rank=0)
    first.log_params({"optim": {"lr": 0.1}})
    for step in range(1, 21):
        first.log_metrics({"loss": float(step)}, step)
    first.close(status="KILLED")  # preempted
    # Resumed from a checkpoint at step 14: steps 15-20 come again, then 21-40; the lr was changed.
    second = create_tracker(cfg, str(tmp_path), rank=0, resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    second.log_params({"optim": {"lr": 0.2}, "resumed_at": 14})
    for step in range(15, 41):
        second.log_metrics({"loss": step + 0.5}, step)
    second.close()

    client = MlflowClient(server.uri)
    history = sorted(client.get_metric_history(first.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 41))
    assert [m.value for m in history[:20]] == [float(step) for step in range(1, 21)]  # the first values stay
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.1", "resumed_at": "14"}  # MLflow cannot change a param
    [warning] = _warnings(caplog)
    assert "optim.lr" in warning
    assert {"optim.lr": "0.2"} in [record.get("params") for record in _fallback_records(tmp_path)]


def test_resume_of_an_unknown_run_starts_a_new_one(server, tmp_path, caplog):
    tracker = create_tracker(TrackingConfig(uri=server.uri), str(tmp_path), rank=0, resume_run_id="0" * 32)
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.close()
    assert tracker.run_id not in (None, "0" * 32)
    assert _steps(MlflowClient(server.uri), tracker.run_id) == [1]
    [warning] = _warnings(caplog)
    assert "0" * 32 in warning and "tracking.uri" in warning


def test_stage_runs_nest_under_the_parent_run(server, tmp_path):
    cfg = TrackingConfig(uri=server.uri, experiment="stages")
    stage1 = create_tracker(cfg, str(tmp_path / "stage1"), rank=0)
    stage1.close()
    stage2 = create_tracker(cfg, str(tmp_path / "stage2"), rank=0, parent_run_id=stage1.run_id)
    stage2.close()
    client = MlflowClient(server.uri)
    tags = client.get_run(stage2.run_id).data.tags
    assert tags["mlflow.parentRunId"] == tags[PARENT_RUN_TAG] == stage1.run_id
    experiment = client.get_experiment_by_name("stages")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{stage1.run_id}'")
    assert [run.info.run_id for run in children] == [stage2.run_id]


def test_uri_precedence_config_then_environment_then_run_dir(server, tmp_path):
    from_env = create_tracker(TrackingConfig(), str(tmp_path / "a"), rank=0, env_tracking_uri=server.uri)
    from_env.close()
    assert MlflowClient(server.uri).get_run(from_env.run_id).info.status == "FINISHED"
    assert not (tmp_path / "a" / "mlflow.db").exists()

    other_store = f"sqlite:///{tmp_path}/other.db"
    from_cfg = create_tracker(TrackingConfig(uri=other_store), str(tmp_path / "b"), rank=0, env_tracking_uri=server.uri)
    from_cfg.log_image(_image(), "samples/x.png")
    from_cfg.close()
    assert MlflowClient(other_store).get_run(from_cfg.run_id).info.status == "FINISHED"
    assert len(list((tmp_path / "mlartifacts").rglob("x.png"))) == 1  # next to other.db, not in the cwd


def test_local_default_store_in_the_run_dir(tmp_path):
    tracker = create_tracker(TrackingConfig(), str(tmp_path), rank=0)
    tracker.log_params({"data": {"resolution": 32}})
    for step in range(10, 60, 10):
        tracker.log_metrics({"loss": step / 100}, step)
    tracker.log_image(_image(), "samples/final.png")
    model = tmp_path / "export"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text('{"sample_size": 8}')
    tracker.log_model(str(model), "tiny-model", tags={"stage": 2})
    tracker.close()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert _steps(client, tracker.run_id) == [10, 20, 30, 40, 50]
    assert client.get_run(tracker.run_id).data.params == {"data.resolution": "32"}
    [image_file] = (tmp_path / "mlartifacts").rglob("final.png")
    assert np.array_equal(np.asarray(PIL.Image.open(image_file)), np.asarray(_image()))
    # the model registry lives in the same local store
    [version] = client.search_model_versions("name='tiny-model'")
    assert (version.run_id, version.tags, version.version) == (tracker.run_id, {"stage": "2"}, 1)
    [config] = (tmp_path / "mlartifacts").rglob("model/unet/config.json")
    assert config.read_text() == '{"sample_size": 8}'


def test_system_metrics_when_enabled(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # mlflow's own knob; default 10 s
    tracker = create_tracker(TrackingConfig(uri=server.uri, system_metrics=True), str(tmp_path), rank=0)
    client = MlflowClient(server.uri)
    _wait_for(lambda: "system/cpu_utilization_percentage" in client.get_run(tracker.run_id).data.metrics)
    tracker.close()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_unreachable_server_from_the_start_goes_to_the_fallback_file(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    tracker = create_tracker(TrackingConfig(uri=uri), str(tmp_path), rank=0)
    tracker.log_params({"model": {"width": 32}})
    for step in range(1, 21):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step)
    tracker.close()
    assert time.monotonic() - start < 15

    assert tracker.run_id is None
    assert _fallback_steps(tmp_path) == list(range(1, 21))
    records = _fallback_records(tmp_path)
    assert {"model.width": "32"} in [record.get("params") for record in records]
    assert [r["metrics"] for r in records if r.get("step") == 4] == [{"loss": 0.25, "lr": 1e-3}]
    [warning] = _warnings(caplog)
    assert uri in warning and str(tmp_path / FALLBACK_FILE) in warning


def test_server_killed_mid_run_falls_back_then_recovers(servers, tmp_path, caplog, monkeypatch):
    server = servers["doomed"]
    monkeypatch.setattr(tracking.worker, "_RETRY_OFFLINE_S", 5.0)  # < the restart time
    cfg = TrackingConfig(uri=server.uri, experiment="killed", shutdown_timeout_s=10.0)
    closed_while_down = create_tracker(cfg, str(tmp_path / "a"), rank=0)
    survivor = create_tracker(cfg, str(tmp_path / "b"), rank=0)
    trackers = (closed_while_down, survivor)
    client = MlflowClient(server.uri)
    for step in range(1, 11):
        for tracker in trackers:
            tracker.log_metrics({"loss": 1.0 / step}, step)
    _wait_for(lambda: all(_steps(client, t.run_id) == list(range(1, 11)) for t in trackers))

    server.kill()
    slowest_call = 0.0
    for step in range(11, 21):
        for tracker in trackers:
            start = time.perf_counter()
            tracker.log_metrics({"loss": 1.0 / step}, step)
            slowest_call = max(slowest_call, time.perf_counter() - start)
    assert slowest_call < 0.05
    start = time.monotonic()
    closed_while_down.close()
    assert time.monotonic() - start < cfg.shutdown_timeout_s + 2
    assert _fallback_steps(tmp_path / "a") == list(range(11, 21))
    _wait_for(lambda: _fallback_steps(tmp_path / "b") == list(range(11, 21)))

    server.start().wait_ready()  # same port and store
    for step in range(21, 31):
        survivor.log_metrics({"loss": 1.0 / step}, step)
    survivor.close()
    assert _steps(client, survivor.run_id) == list(range(1, 11)) + list(range(21, 31))
    assert client.get_run(survivor.run_id).info.status == "FINISHED"
    assert _steps(client, closed_while_down.run_id) == list(range(1, 11))
    assert _fallback_steps(tmp_path / "b") == list(range(11, 21))
    warnings = _warnings(caplog)
    assert len(warnings) == 2  # one per tracker
    assert all(server.uri in w for w in warnings)


def test_close_gives_up_on_a_server_that_never_answers(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(tracking.trackers, "_START_WAIT_S", 1.0)  # create_tracker's wait; saves the test 9 s
    with socket.socket() as silent:  # the kernel accepts connections; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        cfg = TrackingConfig(uri=f"http://127.0.0.1:{silent.getsockname()[1]}", queue_size=4, shutdown_timeout_s=2.0)
        start = time.monotonic()
        tracker = create_tracker(cfg, str(tmp_path), rank=0)
        assert time.monotonic() - start < tracking.trackers._START_WAIT_S + 1
        slowest_call = 0.0
        for step in range(1, 11):
            start = time.perf_counter()
            tracker.log_metrics({"loss": 1.0 / step}, step)
            slowest_call = max(slowest_call, time.perf_counter() - start)
        start = time.monotonic()
        tracker.close()
        assert time.monotonic() - start < cfg.shutdown_timeout_s + 0.5
    assert slowest_call < 0.05
    assert _fallback_steps(tmp_path) == list(range(1, 11))  # 6 spilled from a full queue, 4 left at close
    warnings = _warnings(caplog)
    assert any("queue is full" in w for w in warnings)
    assert any("did not take the last 4 tracking items" in w for w in warnings)


@pytest.mark.parametrize("rank, enabled", [(1, True), (0, False)])
def test_other_ranks_and_disabled_tracking_write_nothing(tmp_path, rank, enabled):
    run_dir = tmp_path / "run"
    artifact = tmp_path / "config.yaml"
    artifact.write_text("a: 1\n")
    tracker = create_tracker(TrackingConfig(enabled=enabled), str(run_dir), rank=rank)
    tracker.log_params({"a": {"b": 1}})
    tracker.set_tags({"stage": "1"})
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_image(_image(), "samples/x.png")
    tracker.log_artifact(str(artifact))
    tracker.close()
    assert type(tracker) is tracking.Tracker  # the base, whose methods do nothing
    assert tracker.run_id is None
    assert not run_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("kwargs, key", [
    ({"uri": "/shared/mlruns"}, "tracking.uri"),
    ({"experiment": ""}, "tracking.experiment"),
    ({"log_every": 0}, "tracking.log_every"),
    ({"sample_every": -1}, "tracking.sample_every"),
    ({"queue_size": 0}, "tracking.queue_size"),
    ({"shutdown_timeout_s": 0}, "tracking.shutdown_timeout_s"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        TrackingConfig(**kwargs)
