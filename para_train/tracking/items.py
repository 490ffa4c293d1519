"""The typed items that MlflowTracker's queue carries: each knows how to send itself to the MLflow run and
what to write to the fallback file instead."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import PIL.Image

if TYPE_CHECKING:
    from para_train.tracking.trackers import MlflowTracker  # which imports this module

log = logging.getLogger("para_train.tracking")

FALLBACK_ARTIFACT_DIR = "tracking_fallback"  # images that could not be sent, saved as files
MODEL_ARTIFACT_PATH = "model"  # where log_model puts the exported folder in the run's artifacts
# MLflow's limits (mlflow.utils.validation)
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


@dataclass
class _Item:
    """One thing to log. The worker sends it to the MLflow run while MLflow answers; otherwise (or when the
    queue is full) its `fallback` record becomes one JSON line of run_dir/tracking_fallback.jsonl."""

    kind: ClassVar[str]  # in messages

    def fresh(self, tracker: MlflowTracker) -> _Item | None:
        """What of it is still to be logged (None: nothing); the worker asks first, online or not."""
        return self

    def send(self, tracker: MlflowTracker) -> None:
        raise NotImplementedError

    def fallback(self, run_dir: str) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Params(_Item):
    kind = "params"
    params: dict[str, str]
    time: float = field(default_factory=time.time)

    def send(self, tracker: MlflowTracker) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a param (e.g. a resumed run with a changed config)
        known = tracker._run_params
        changed = {k: v for k, v in self.params.items() if known.get(k, v) != v}
        if changed:
            tracker._warn_once("changed_params", f"params differ from those of MLflow run {tracker.run_id}, which "
                                                 f"keeps the first values: {sorted(changed)}; the new values are in "
                                                 f"{tracker.fallback_path}")
            tracker._write_fallback(_Params(changed, self.time))
        new = {k: v for k, v in self.params.items() if k not in known}
        _log_batches(tracker, "params", [Param(k, v) for k, v in new.items()], _MAX_PARAMS_PER_BATCH)
        known.update(new)


@dataclass
class _Tags(_Item):
    kind = "tags"
    tags: dict[str, str]
    time: float = field(default_factory=time.time)

    def send(self, tracker: MlflowTracker) -> None:
        from mlflow.entities import RunTag

        _log_batches(tracker, "tags", [RunTag(k, v) for k, v in self.tags.items()], _MAX_PARAMS_PER_BATCH)


@dataclass
class _Metrics(_Item):
    kind = "metrics"
    step: int
    metrics: dict[str, float]
    time: float = field(default_factory=time.time)

    def fresh(self, tracker: MlflowTracker) -> _Metrics | None:
        """Drops the keys already logged at this step or a later one: MLflow keeps every point."""
        last = tracker._last_step
        fresh = {k: v for k, v in self.metrics.items() if k not in last or self.step > last[k]}
        stale = sorted(self.metrics.keys() - fresh.keys())
        if stale:
            tracker._warn_once("old_step", f"metric {stale[0]!r} at step {self.step} is not logged: the run has it "
                                           f"up to step {last[stale[0]]} (resumed from an older checkpoint?)",
                               level=logging.INFO)
        last.update(dict.fromkeys(fresh, self.step))
        return dataclasses.replace(self, metrics=fresh) if fresh else None

    def send(self, tracker: MlflowTracker) -> None:
        from mlflow.entities import Metric

        timestamp = int(self.time * 1000)
        metrics = [Metric(k, v, timestamp, self.step) for k, v in self.metrics.items()]
        _log_batches(tracker, "metrics", metrics, _MAX_METRICS_PER_BATCH)


@dataclass
class _Artifact(_Item):
    kind = "artifact"
    artifact: str  # a file or a folder
    artifact_path: str | None
    time: float = field(default_factory=time.time)

    def send(self, tracker: MlflowTracker) -> None:
        if os.path.isdir(self.artifact):
            tracker._client.log_artifacts(tracker.run_id, self.artifact, self.artifact_path)
        else:
            tracker._client.log_artifact(tracker.run_id, self.artifact, self.artifact_path)


@dataclass
class _Image(_Item):
    kind = "image"
    image: PIL.Image.Image | str  # an image, or the path of an image file
    artifact_file: str
    time: float = field(default_factory=time.time)

    def send(self, tracker: MlflowTracker) -> None:
        directory, name = os.path.split(self.artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            self._save(os.path.join(tmp, name))
            tracker._client.log_artifact(tracker.run_id, os.path.join(tmp, name), directory or None)

    def fallback(self, run_dir: str) -> dict:
        """Saved under run_dir/tracking_fallback/; the line names that file as the artifact to log."""
        path = os.path.join(run_dir, FALLBACK_ARTIFACT_DIR, self.artifact_file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._save(path)
        return _Artifact(path, os.path.dirname(self.artifact_file) or None, self.time).fallback(run_dir)

    def _save(self, path: str) -> None:
        if isinstance(self.image, str):
            shutil.copyfile(self.image, path)
        else:
            self.image.save(path)


@dataclass
class _Model(_Item):
    kind = "model"
    model: str  # an exported model folder
    registered_model: str
    tags: dict[str, str]
    time: float = field(default_factory=time.time)

    def send(self, tracker: MlflowTracker) -> None:
        from mlflow.exceptions import MlflowException

        client, run_id = tracker._client, tracker.run_id
        client.log_artifacts(run_id, self.model, MODEL_ARTIFACT_PATH)
        try:
            client.create_registered_model(self.registered_model)
        except MlflowException as e:  # the usual case after the first stage
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT_PATH}"
        version = client.create_model_version(self.registered_model, source, run_id=run_id, tags=self.tags,
                                              await_creation_for=0)
        log.info("registered model %s version %s (%s)", self.registered_model, version.version,
                 ", ".join(f"{k}={v}" for k, v in self.tags.items()))


@dataclass
class _Close:
    """The worker's last item: end the run with `status`. Not logged, so never written to the fallback file."""

    status: str


def _log_batches(tracker: MlflowTracker, key: str, entities: list, size: int) -> None:
    """`entities` (params, tags or metrics: the `key` of log_batch) in calls of at most `size`."""
    for start in range(0, len(entities), size):
        tracker._client.log_batch(tracker.run_id, **{key: entities[start:start + size]}, synchronous=True)
