"""The worker thread's side of MlflowTracker: it creates (or resumes) the MLflow run and sends the queued
items there, or to the fallback file while MLflow cannot be reached, trying it again every minute."""

from __future__ import annotations

import logging
import time

from para_train.tracking.items import _Close, _Item

# mlflow is imported in the methods, which run in the worker thread: it takes ~2 s to import

log = logging.getLogger("para_train.tracking")

_RETRY_OFFLINE_S = 60.0  # while MLflow is unreachable, try it again this often


class _Worker:
    """Mixed into MlflowTracker, whose __init__ sets the state these methods use ("worker-only state") and
    which has `_write_fallback` and `_warn_once`, called from both sides. Only the worker thread runs these."""

    def _work(self) -> None:
        self._connect()
        self._started.set()
        while True:
            item = self._queue.get()
            self._inflight = item
            if self._abandoned.is_set():
                return
            if isinstance(item, _Close):
                self._finish(item.status)
                return
            try:
                self._handle(item)
            except Exception:  # a bug here must not stop tracking, let alone training
                log.exception("tracking: failed to handle %s", item.kind)
            self._inflight = None

    def _handle(self, item: _Item) -> None:
        from mlflow.exceptions import MlflowException, RestException

        item = item.fresh(self)
        if item is None:
            return
        if not self._offline() and (self.run_id is not None or self._connect()):
            try:
                item.send(self)
            except RestException as e:  # the server answered: it refused this item
                self._warn_once(f"refused:{item.kind}", f"MLflow at {self.uri} refused {item.kind} ({_short(e)}): "
                                                        f"written to {self.fallback_path}")
            except MlflowException as e:  # no answer: the server is down or unreachable
                self._go_offline(e)
            except Exception as e:  # e.g. an image that cannot be saved
                self._warn_once(f"failed:{item.kind}", f"tracking could not send {item.kind}: {_short(e)}")
            else:
                if self._next_try is not None:
                    log.info("MLflow at %s is reachable again: logging there from now on", self.uri)
                    self._next_try = None
                return
        self._write_fallback(item)

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



def _short(error: Exception) -> str:
    """The first line of an error, cut: mlflow's connection errors run to several lines."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:300]
