"""Run tracking in MLflow behind a narrow interface: rank 0 only; never blocks or kills training.

    tracker = create_tracker(cfg.tracking, run_dir, rank, env_tracking_uri=..., resume_run_id=...)
    tracker.log_params(config_dict)
    tracker.log_metrics({"loss": 0.12}, step)
    tracker.log_model(export_dir, registered_name="para-train", tags={"stage": "1"})
    tracker.close()            # always, e.g. in a `finally`

On rank 0, `log_*` only put an item on a bounded queue; one background thread creates (or
resumes) the MLflow run and sends the items through `MlflowClient` with explicit run ids. While
MLflow cannot be reached (from the start or mid-run), items are appended to
`run_dir/tracking_fallback.jsonl` instead, with one warning, and MLflow is tried again every
minute. Each (metric key, step) is sent at most once, so a run resumed from a checkpoint older
than its last logged step gets no duplicated points. Other ranks, and disabled tracking, get a
`NullTracker` that does nothing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

import PIL.Image

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

# mlflow is imported where it is used, in the worker thread: it takes ~2 s to import, and every
# process imports this module (config.py needs TrackingConfig).

log = logging.getLogger("para_train.tracking")

FALLBACK_FILE = "tracking_fallback.jsonl"
FALLBACK_ARTIFACT_DIR = "tracking_fallback"  # images that could not be sent, saved as files
PARENT_RUN_TAG = "para_train.parent_run_id"
MODEL_ARTIFACT_PATH = "model"  # where log_model puts the exported folder in the run's artifacts

# create_tracker waits at most this long for the run to exist, so that run_id is known on return.
# A new local SQLite store takes ~2.5 s (its schema migrations), 5 s on a busy machine.
_START_WAIT_S = 10.0
_RETRY_OFFLINE_S = 60.0  # while MLflow is unreachable, try it again this often
# mlflow's HTTP client retries a dead server for minutes by default (7 retries, 120 s timeout);
# these make the worker notice within seconds. A value the user has set wins.
_MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# MLflow's limits (mlflow.utils.validation)
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


@dataclass
class TrackingConfig:
    """The `tracking` section of the config."""

    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///RUN_DIR/mlflow.db
    experiment: str = "para-train"
    run_name: str | None = None
    log_every: int = 10  # metrics every N steps (the trainer honours this)
    sample_every: int = 0  # sample grids every M steps, 0 = only at the end (the trainer)
    # The exported model of each stage is uploaded as the run's `model/` artifact and registered as a
    # new version of this registered model, tagged with its stage: "auto" = the experiment's name,
    # "none" = neither (the export stays on disk only).
    registered_model: str = "auto"
    queue_size: int = 1000  # items waiting for MLflow; beyond it they go to the fallback file
    shutdown_timeout_s: float = 20.0  # close() waits at most this long for MLflow
    system_metrics: bool = False  # MLflow's CPU/GPU/disk/network monitor (needs psutil)

    def __post_init__(self):
        if self.uri is not None and len(urlparse(self.uri).scheme) < 2:  # 'C:/x' has scheme 'c'
            raise ValueError(f"tracking.uri: {self.uri!r} is not a URI; use http://HOST:PORT for a tracking server, "
                             "sqlite:///PATH/mlflow.db for a local store, or leave it unset")
        if not self.experiment:
            raise ValueError("tracking.experiment: empty; set a name, e.g. tracking.experiment=para-train")
        if not self.registered_model.strip():
            raise ValueError("tracking.registered_model: empty; use auto (the experiment's name), none, or a name")
        for key, minimum in (("log_every", 1), ("sample_every", 0), ("queue_size", 1)):
            if getattr(self, key) < minimum:
                raise ValueError(f"tracking.{key}: must be >= {minimum}, got {getattr(self, key)}")
        if not self.shutdown_timeout_s > 0:
            raise ValueError(f"tracking.shutdown_timeout_s: must be > 0 (e.g. 20), got {self.shutdown_timeout_s}")
        if self.system_metrics and importlib.util.find_spec("psutil") is None:
            raise ValueError("tracking.system_metrics: needs psutil; pip install psutil, or set it to false")

    @property
    def registered_model_name(self) -> str | None:
        return {"auto": self.experiment, "none": None}.get(self.registered_model, self.registered_model)


class Tracker(Protocol):
    """What the trainer calls. `create_tracker` gives an `MlflowTracker` or a `NullTracker`."""

    run_id: str | None  # the MLflow run, once it exists; keep it in checkpoints to resume it

    def log_params(self, params: dict) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image: PIL.Image.Image | str, artifact_file: str) -> None: ...
    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def log_model(self, local_dir: str, registered_name: str, tags: dict) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Ranks other than 0, and disabled tracking: does nothing."""

    run_id = None

    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, image: PIL.Image.Image | str, artifact_file: str) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def log_model(self, local_dir: str, registered_name: str, tags: dict) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


def create_tracker(cfg: TrackingConfig, run_dir: str, rank: int, env_tracking_uri: str | None = None,
                   resume_run_id: str | None = None, parent_run_id: str | None = None,
                   tags: dict | None = None) -> Tracker:
    """The tracker for this process: MLflow on rank 0, a `NullTracker` elsewhere.

    The URI is `cfg.uri`, else `env_tracking_uri` (the caller's $MLFLOW_TRACKING_URI), else a
    SQLite store in `run_dir`; a SQLite store keeps new experiments' artifacts in `mlartifacts`
    next to its database file. `resume_run_id` continues that run; `parent_run_id` nests this
    run under it (one training's stage runs). Waits at most `_START_WAIT_S` for the run to be
    created. `run_id` is None until it is (MLflow slow or unreachable), so read
    `tracker.run_id` when writing a checkpoint rather than once here.
    """
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    for name, value in _MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    uri = cfg.uri or env_tracking_uri or f"sqlite:///{run_dir}/mlflow.db"
    artifact_location = None
    if uri.startswith("sqlite:///"):  # next to the database; MLflow's default is ./mlruns in the cwd
        artifact_location = Path(uri.removeprefix("sqlite:///")).resolve().parent.joinpath("mlartifacts").as_uri()
    run_tags = {key: str(value) for key, value in (tags or {}).items()}
    if parent_run_id:
        run_tags.update({"mlflow.parentRunId": parent_run_id, PARENT_RUN_TAG: parent_run_id})
    return MlflowTracker(cfg, run_dir, uri, artifact_location, resume_run_id, run_tags)


class MlflowTracker:
    """Rank 0's tracker: `log_*` queue items; one worker thread sends them to MLflow."""

    def __init__(self, cfg: TrackingConfig, run_dir: str, uri: str, artifact_location: str | None,
                 resume_run_id: str | None, run_tags: dict[str, str]):
        self.run_id: str | None = None
        self.uri = uri
        self.fallback_path = os.path.join(run_dir, FALLBACK_FILE)
        self._cfg = cfg
        self._run_dir = run_dir
        self._artifact_location = artifact_location
        self._resume_run_id = resume_run_id
        self._run_tags = run_tags
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self._fallback_lock = threading.Lock()
        self._warned: set[str] = set()
        self._num_spilled = 0
        self._closed = False
        # worker-only state
        self._client: MlflowClient | None = None
        self._monitor: SystemMetricsMonitor | None = None
        self._next_try: float | None = None  # set while offline: monotonic time of the next try
        self._last_step: dict[str, int] = {}  # per metric key, the last step sent or written
        self._run_params: dict[str, str] = {}  # params already in the MLflow run
        self._inflight: tuple[str, dict] | None = None
        self._abandoned = threading.Event()  # close() gave up on the worker
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._work, name="para_train.tracking", daemon=True)
        self._thread.start()
        self._started.wait(_START_WAIT_S)

    # ---- caller side: never blocks on MLflow ----

    def log_params(self, params: dict) -> None:
        """Nested dicts become dotted keys; values are str()-ed and cut to MLflow's limit."""
        self._put("params", {"params": _flatten(params), "time": time.time()})

    def set_tags(self, tags: dict) -> None:
        tags = {str(key): str(value)[:_MAX_TAG_VALUE] for key, value in tags.items()}
        self._put("tags", {"tags": tags, "time": time.time()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Values must be numbers (call .item() on tensors where a device sync is acceptable)."""
        values = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                self._warn_once(f"not_number:{key}", f"metric {key!r}={value!r} is not a number: not logged")
        self._put("metrics", {"step": int(step), "metrics": values, "time": time.time()})

    def log_image(self, image: PIL.Image.Image | str, artifact_file: str) -> None:
        """`image` is a PIL image or the path of an image file; `artifact_file` e.g. 'samples/step_100.png'."""
        if isinstance(image, PIL.Image.Image):
            image = image.copy()  # the caller may reuse or change it before the worker saves it
        elif isinstance(image, (str, os.PathLike)):
            image = os.path.abspath(image)
            if not os.path.isfile(image):
                self._warn_once(f"missing:{image}", f"log_image: no file {image}: not logged")
                return
        else:
            raise TypeError(f"log_image takes a PIL image or a file path, not {type(image).__name__}")
        self._put("image", {"image": image, "artifact_file": artifact_file, "time": time.time()})

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A file or a directory; read by the worker later, so leave it in place."""
        local_path = os.path.abspath(local_path)
        if not os.path.exists(local_path):
            self._warn_once(f"missing:{local_path}", f"log_artifact: no file {local_path}: not logged")
            return
        self._put("artifact", {"artifact": local_path, "artifact_path": artifact_path, "time": time.time()})

    def log_model(self, local_dir: str, registered_name: str, tags: dict) -> None:
        """An exported model folder: uploaded as the run's `model/` artifact, then registered as a new
        version of `registered_name` carrying `tags`. Read by the worker later: leave it in place."""
        local_dir = os.path.abspath(local_dir)
        if not os.path.isdir(local_dir):
            self._warn_once(f"missing:{local_dir}", f"log_model: no folder {local_dir}: not logged")
            return
        self._put("model", {"model": local_dir, "registered_model": registered_name,
                            "tags": {str(k): str(v) for k, v in tags.items()}, "time": time.time()})

    def close(self, status: str = "FINISHED") -> None:
        """Ends the run with `status`, waiting at most cfg.shutdown_timeout_s for the queue."""
        if status not in _RUN_STATUSES:
            raise ValueError(f"close(status={status!r}): use one of {_RUN_STATUSES}")
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._cfg.shutdown_timeout_s
        try:
            self._queue.put(("close", {"status": status}), timeout=self._cfg.shutdown_timeout_s)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon()
        if self._num_spilled:
            log.info("%d tracking items went to %s because the queue was full", self._num_spilled, self.fallback_path)

    def _put(self, kind: str, record: dict) -> None:
        if self._closed:
            self._warn_once("closed", f"the tracker is closed: {kind} not logged")
            return
        try:
            self._queue.put_nowait((kind, record))
        except queue.Full:
            self._num_spilled += 1
            self._warn_once("full", f"the tracking queue is full ({self._cfg.queue_size} items; MLflow at {self.uri} "
                                    f"is slower than training): items go to {self.fallback_path} meanwhile. "
                                    "Raise tracking.queue_size or tracking.log_every.")
            self._write_fallback(kind, record)

    def _abandon(self) -> None:
        """The worker is stuck on MLflow: write what it has not sent to the fallback file."""
        self._abandoned.set()
        left = [self._inflight] if self._inflight else []
        while True:
            try:
                left.append(self._queue.get_nowait())
            except queue.Empty:
                break
        left = [(kind, record) for kind, record in left if kind != "close"]
        for kind, record in left:
            self._write_fallback(kind, record)
        try:
            self._queue.put_nowait(("close", {}))  # wakes the worker so that it exits
        except queue.Full:
            pass
        log.warning("MLflow at %s did not take the last %d tracking items within tracking.shutdown_timeout_s=%g s: "
                    "they are in %s", self.uri, len(left), self._cfg.shutdown_timeout_s, self.fallback_path)

    # ---- worker side ----

    def _work(self) -> None:
        self._connect()
        self._started.set()
        while True:
            item = self._queue.get()
            self._inflight = item
            if self._abandoned.is_set():
                return
            kind, record = item
            if kind == "close":
                self._finish(record["status"])
                return
            try:
                self._handle(kind, record)
            except Exception:  # a bug here must not stop tracking, let alone training
                log.exception("tracking: failed to handle %s", kind)
            self._inflight = None

    def _handle(self, kind: str, record: dict) -> None:
        from mlflow.exceptions import MlflowException, RestException

        if kind == "metrics":
            record = self._unlogged_steps(record)
            if not record["metrics"]:
                return
        if not self._offline() and (self.run_id is not None or self._connect()):
            try:
                self._send(kind, record)
            except RestException as e:  # the server answered: it refused this item
                self._warn_once(f"refused:{kind}",
                                f"MLflow at {self.uri} refused {kind} ({_short(e)}): written to {self.fallback_path}")
            except MlflowException as e:  # no answer: the server is down or unreachable
                self._go_offline(e)
            except Exception as e:  # e.g. an image that cannot be saved
                self._warn_once(f"failed:{kind}", f"tracking could not send {kind}: {_short(e)}")
            else:
                if self._next_try is not None:
                    log.info("MLflow at %s is reachable again: logging there from now on", self.uri)
                    self._next_try = None
                return
        self._write_fallback(kind, record)

    def _send(self, kind: str, record: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, run_id = self._client, self.run_id
        if kind == "metrics":
            timestamp = int(record["time"] * 1000)
            metrics = [Metric(k, v, timestamp, record["step"]) for k, v in record["metrics"].items()]
            for batch in _batches(metrics, _MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=batch, synchronous=True)
        elif kind == "params":
            # MLflow refuses to change a param (e.g. a resumed run with a changed config)
            params = record["params"]
            changed = {k: v for k, v in params.items() if self._run_params.get(k, v) != v}
            if changed:
                self._warn_once("changed_params", f"params differ from those of MLflow run {run_id}, which keeps "
                                                  f"the first values: {sorted(changed)}; the new values are in "
                                                  f"{self.fallback_path}")
                self._write_fallback("params", {"params": changed, "time": record["time"]})
            new = {k: v for k, v in params.items() if k not in self._run_params}
            for batch in _batches([Param(k, v) for k, v in new.items()], _MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=batch, synchronous=True)
            self._run_params.update(new)
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in record["tags"].items()]
            for batch in _batches(tags, _MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, tags=batch, synchronous=True)
        elif kind == "artifact":
            if os.path.isdir(record["artifact"]):
                client.log_artifacts(run_id, record["artifact"], record["artifact_path"])
            else:
                client.log_artifact(run_id, record["artifact"], record["artifact_path"])
        elif kind == "model":
            client.log_artifacts(run_id, record["model"], MODEL_ARTIFACT_PATH)
            self._register(record["registered_model"], record["tags"])
        elif kind == "image":
            directory, name = os.path.split(record["artifact_file"])
            with tempfile.TemporaryDirectory() as tmp:
                _save_image(record["image"], os.path.join(tmp, name))
                client.log_artifact(run_id, os.path.join(tmp, name), directory or None)
        else:
            raise AssertionError(f"unknown tracking item {kind!r}")

    def _register(self, name: str, tags: dict[str, str]) -> None:
        from mlflow.exceptions import MlflowException

        client = self._client
        try:
            client.create_registered_model(name)
        except MlflowException as e:  # the usual case after the first stage
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(self.run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
        version = client.create_model_version(name, source, run_id=self.run_id, tags=tags, await_creation_for=0)
        log.info("registered model %s version %s (%s)", name, version.version,
                 ", ".join(f"{k}={v}" for k, v in tags.items()))

    def _unlogged_steps(self, record: dict) -> dict:
        """Drops the keys already logged at this step or a later one: MLflow keeps every point."""
        step, last = record["step"], self._last_step
        fresh = {k: v for k, v in record["metrics"].items() if k not in last or step > last[k]}
        stale = sorted(record["metrics"].keys() - fresh.keys())
        if stale:
            self._warn_once("old_step", f"metric {stale[0]!r} at step {step} is not logged: the run has it up to step "
                                        f"{last[stale[0]]} (resumed from an older checkpoint?)", level=logging.INFO)
        last.update(dict.fromkeys(fresh, step))
        return {**record, "metrics": fresh}

    def _connect(self) -> bool:
        """Creates or resumes the run; False (and offline) if MLflow cannot be reached."""
        from mlflow.tracking import MlflowClient

        try:
            if self._client is None:
                self._client = MlflowClient(tracking_uri=self.uri)
            run = self._resume() if self._resume_run_id else None
            resumed = run is not None
            if run is None:
                run = self._client.create_run(self._experiment_id(), run_name=self._cfg.run_name, tags=self._run_tags)
        except Exception as e:
            self._go_offline(e)
            return False
        for metric in run.data.to_proto().metrics:  # the last step of each key, when resumed
            self._last_step[metric.key] = max(metric.step, self._last_step.get(metric.key, metric.step))
        self._run_params = dict(run.data.params)
        self.run_id = run.info.run_id
        log.info("MLflow run %s at %s%s", self.run_id, self.uri, " (resumed)" if resumed else "")
        if self._cfg.system_metrics and self._monitor is None:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            try:
                self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
                self._monitor.start()
            except Exception as e:
                self._warn_once("system_metrics", f"system metrics are not logged: {_short(e)}")
        return True

    def _resume(self):
        """The run to continue, or None (with a warning) if it is not in this store."""
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(self._resume_run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s (from the checkpoint) is not in %s, or is deleted: starting a new run. To "
                        "continue it, set tracking.uri to the store it was logged to.", self._resume_run_id, self.uri)
            self._resume_run_id = None
            return None
        if run.info.status != "RUNNING":
            self._client.update_run(run.info.run_id, status="RUNNING")
        if self._run_tags:
            tags = [RunTag(k, v) for k, v in self._run_tags.items()]
            self._client.log_batch(run.info.run_id, tags=tags, synchronous=True)
        return run

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self._cfg.experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise ValueError(f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore "
                                 f"--experiment-id {experiment.experiment_id}) or set tracking.experiment")
            return experiment.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=self._artifact_location)
        except MlflowException as e:  # another job created it meanwhile
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._client.get_experiment_by_name(name).experiment_id

    def _offline(self) -> bool:
        """True while MLflow was unreachable less than _RETRY_OFFLINE_S ago."""
        return self._next_try is not None and time.monotonic() < self._next_try

    def _go_offline(self, error: Exception) -> None:
        if self._abandoned.is_set():  # close() already reported; stay quiet
            return
        self._next_try = time.monotonic() + _RETRY_OFFLINE_S
        self._warn_once("offline", f"MLflow at {self.uri} cannot be reached ({_short(error)}): tracking goes to "
                                   f"{self.fallback_path} until it can (trying again every {_RETRY_OFFLINE_S:g} s)",
                        again_level=logging.INFO)

    def _finish(self, status: str) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:
                log.warning("stopping MLflow's system metrics monitor failed: %s", _short(e))
        if self.run_id is None or self._offline():
            return
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as e:
            self._warn_once("offline", f"MLflow at {self.uri}: could not mark run {self.run_id} {status} ({_short(e)})",
                            again_level=logging.INFO)

    # ---- both sides ----

    def _write_fallback(self, kind: str, record: dict) -> None:
        """Appends one JSON line to run_dir/tracking_fallback.jsonl (images saved next to it)."""
        try:
            with self._fallback_lock:
                if kind == "image":
                    path = os.path.join(self._run_dir, FALLBACK_ARTIFACT_DIR, record["artifact_file"])
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    _save_image(record["image"], path)
                    directory = os.path.dirname(record["artifact_file"]) or None
                    record = {"artifact": path, "artifact_path": directory, "time": record["time"]}
                with open(self.fallback_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        except Exception as e:  # e.g. a full disk: lose this item, keep training
            self._warn_once("fallback", f"cannot write {self.fallback_path}: {_short(e)}")

    def _warn_once(self, key: str, message: str, level=logging.WARNING, again_level=logging.DEBUG) -> None:
        log.log(again_level if key in self._warned else level, message)
        self._warned.add(key)


PACKAGES = ("para-train", "torch", "deepspeed", "transformers", "peft", "diffusers", "mosaicml-streaming", "triton",
            "mlflow", "flash-attn")


def code_params(repo_root: str | os.PathLike) -> dict:
    """What code a run ran: package versions and, in a git checkout, its revision and whether it had
    uncommitted changes."""
    import importlib.metadata
    import subprocess

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    params: dict = {"versions": versions}
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        params["git"] = {"revision": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):  # not a checkout (an installed package), or no git
        pass
    return params


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:_MAX_PARAM_VALUE]
    return flat


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _save_image(image: PIL.Image.Image | str, path: str) -> None:
    if isinstance(image, str):
        shutil.copyfile(image, path)
    else:
        image.save(path)


def _short(error: Exception) -> str:
    """The first line of an error, cut: mlflow's connection errors run to several lines."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:300]
