"""The trackers: the do-nothing base `Tracker` and rank 0's `MlflowTracker`, whose `log_*` only queue items
for its worker thread (para_train.tracking.worker), and `create_tracker`, which picks one."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import PIL.Image

from para_train.config import TrackingConfig
from para_train.tracking.items import _Artifact, _Close, _Image, _Item, _Metrics, _Model, _Params, _Tags
from para_train.tracking.worker import _Worker, _short

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

# mlflow is imported where it is used, in the worker thread (worker.py, items.py): it takes ~2 s to
# import, and every process imports this package.

log = logging.getLogger("para_train.tracking")

FALLBACK_FILE = "tracking_fallback.jsonl"
PARENT_RUN_TAG = "para_train.parent_run_id"

# create_tracker waits at most this long for the run to exist, so that run_id is known on return.
# A new local SQLite store takes ~2.5 s (its schema migrations), 5 s on a busy machine.
_START_WAIT_S = 10.0
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
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_RUN_STATUSES = get_args(RunStatus)


class Tracker:
    """What the trainer calls. This base does nothing: it is the tracker of ranks other than 0 and of disabled
    tracking. `create_tracker` gives rank 0 an `MlflowTracker`."""

    run_id: str | None = None  # the MLflow run, once it exists; keep it in checkpoints to resume it

    def log_params(self, params: dict) -> None:
        """Nested dicts become dotted keys; values are str()-ed and cut to MLflow's limit."""

    def set_tags(self, tags: dict) -> None:
        """Tags of the run; values are str()-ed and cut to MLflow's limit."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Values must be numbers (call .item() on tensors where a device sync is acceptable)."""

    def log_image(self, image: PIL.Image.Image | str, artifact_file: str) -> None:
        """`image` is a PIL image or the path of an image file; `artifact_file` e.g. 'samples/step_100.png'."""

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """A file or a directory; read by the worker later, so leave it in place."""

    def log_model(self, local_dir: str, registered_name: str, tags: dict) -> None:
        """An exported model folder: uploaded as the run's `model/` artifact, then registered as a new
        version of `registered_name` carrying `tags`. Read by the worker later: leave it in place."""

    def close(self, status: RunStatus = "FINISHED") -> None:
        """Ends the run with `status`, waiting at most tracking.shutdown_timeout_s for the queue."""


def create_tracker(cfg: TrackingConfig, run_dir: str, rank: int, env_tracking_uri: str | None = None,
                   resume_run_id: str | None = None, parent_run_id: str | None = None,
                   tags: dict | None = None) -> Tracker:
    """The tracker for this process: MLflow on rank 0, the do-nothing `Tracker` elsewhere.

    The URI is `cfg.uri`, else `env_tracking_uri` (the caller's $MLFLOW_TRACKING_URI), else a
    SQLite store in `run_dir`; a SQLite store keeps new experiments' artifacts in `mlartifacts`
    next to its database file. `resume_run_id` continues that run; `parent_run_id` nests this
    run under it (one training's stage runs). Waits at most `_START_WAIT_S` for the run to be
    created. `run_id` is None until it is (MLflow slow or unreachable), so read
    `tracker.run_id` when writing a checkpoint rather than once here.
    """
    if rank != 0 or not cfg.enabled:
        return Tracker()
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


class MlflowTracker(_Worker, Tracker):
    """Rank 0's tracker: `log_*` queue items; one worker thread sends them to MLflow."""

    def __init__(self, cfg: TrackingConfig, run_dir: str, uri: str, artifact_location: str | None,
                 resume_run_id: str | None, run_tags: dict[str, str]):
        self.run_id = None
        self.uri = uri
        self.fallback_path = os.path.join(run_dir, FALLBACK_FILE)
        self._cfg = cfg
        self._run_dir = run_dir
        self._artifact_location = artifact_location
        self._resume_run_id = resume_run_id
        self._run_tags = run_tags
        self._queue: queue.Queue[_Item | _Close] = queue.Queue(maxsize=cfg.queue_size)
        self._fallback_lock = threading.Lock()
        self._warned: set[str] = set()
        self._num_spilled = 0
        self._closed = False
        # worker-only state (_Worker's)
        self._client: MlflowClient | None = None
        self._monitor: SystemMetricsMonitor | None = None
        self._next_try: float | None = None  # set while offline: monotonic time of the next try
        self._last_step: dict[str, int] = {}  # per metric key, the last step sent or written
        self._run_params: dict[str, str] = {}  # params already in the MLflow run
        self._inflight: _Item | _Close | None = None
        self._abandoned = threading.Event()  # close() gave up on the worker
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._work, name="para_train.tracking", daemon=True)
        self._thread.start()
        self._started.wait(_START_WAIT_S)

    # ---- caller side: never blocks on MLflow ----

    def log_params(self, params: dict) -> None:
        self._put(_Params(_flatten(params)))

    def set_tags(self, tags: dict) -> None:
        self._put(_Tags({str(key): str(value)[:_MAX_TAG_VALUE] for key, value in tags.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        values = {}
        for key, value in metrics.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                self._warn_once(f"not_number:{key}", f"metric {key!r}={value!r} is not a number: not logged")
        self._put(_Metrics(int(step), values))

    def log_image(self, image: PIL.Image.Image | str, artifact_file: str) -> None:
        if isinstance(image, PIL.Image.Image):
            image = image.copy()  # the caller may reuse or change it before the worker saves it
        elif isinstance(image, (str, os.PathLike)):
            image = os.path.abspath(image)
            if not os.path.isfile(image):
                self._warn_once(f"missing:{image}", f"log_image: no file {image}: not logged")
                return
        else:
            raise TypeError(f"log_image takes a PIL image or a file path, not {type(image).__name__}")
        self._put(_Image(image, artifact_file))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        local_path = os.path.abspath(local_path)
        if not os.path.exists(local_path):
            self._warn_once(f"missing:{local_path}", f"log_artifact: no file {local_path}: not logged")
            return
        self._put(_Artifact(local_path, artifact_path))

    def log_model(self, local_dir: str, registered_name: str, tags: dict) -> None:
        local_dir = os.path.abspath(local_dir)
        if not os.path.isdir(local_dir):
            self._warn_once(f"missing:{local_dir}", f"log_model: no folder {local_dir}: not logged")
            return
        self._put(_Model(local_dir, registered_name, {str(k): str(v) for k, v in tags.items()}))

    def close(self, status: RunStatus = "FINISHED") -> None:
        if status not in _RUN_STATUSES:
            raise ValueError(f"close(status={status!r}): use one of {_RUN_STATUSES}")
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._cfg.shutdown_timeout_s
        try:
            self._queue.put(_Close(status), timeout=self._cfg.shutdown_timeout_s)
        except queue.Full:  # the worker is stuck: the join below times out and _abandon writes the rest
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon(status)
        if self._num_spilled:
            log.info("%d tracking items went to %s because the queue was full", self._num_spilled, self.fallback_path)

    def _put(self, item: _Item) -> None:
        if self._closed:
            self._warn_once("closed", f"the tracker is closed: {item.kind} not logged")
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._num_spilled += 1
            self._warn_once("full", f"the tracking queue is full ({self._cfg.queue_size} items; MLflow at {self.uri} "
                                    f"is slower than training): items go to {self.fallback_path} meanwhile. "
                                    "Raise tracking.queue_size or tracking.log_every.")
            self._write_fallback(item)

    def _abandon(self, status: RunStatus) -> None:
        """The worker is stuck on MLflow: write what it has not sent to the fallback file."""
        self._abandoned.set()
        left = [self._inflight] if self._inflight else []
        while True:
            try:
                left.append(self._queue.get_nowait())
            except queue.Empty:
                break
        left = [item for item in left if not isinstance(item, _Close)]
        for item in left:
            self._write_fallback(item)
        try:
            self._queue.put_nowait(_Close(status))  # wakes the worker, which sees _abandoned and exits
        except queue.Full:
            pass
        log.warning("MLflow at %s did not take the last %d tracking items within tracking.shutdown_timeout_s=%g s: "
                    "they are in %s", self.uri, len(left), self._cfg.shutdown_timeout_s, self.fallback_path)

    # ---- both sides (the worker side is _Worker, in para_train.tracking.worker) ----

    def _write_fallback(self, item: _Item) -> None:
        """Appends the item's line to run_dir/tracking_fallback.jsonl (images saved next to it)."""
        try:
            with self._fallback_lock:
                record = item.fallback(self._run_dir)
                with open(self.fallback_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        except Exception as e:  # e.g. a full disk: lose this item, keep training
            self._warn_once("fallback", f"cannot write {self.fallback_path}: {_short(e)}")

    def _warn_once(self, key: str, message: str, level=logging.WARNING, again_level=logging.DEBUG) -> None:
        log.log(again_level if key in self._warned else level, message)
        self._warned.add(key)


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:_MAX_PARAM_VALUE]
    return flat
