"""Run tracking in MLflow behind a narrow interface: rank 0 only; never blocks or kills training.

    tracker = create_tracker(cfg.tracking, run_dir, rank, env_tracking_uri=..., resume_run_id=...)
    tracker.log_params(config_dict)
    tracker.log_metrics({"loss": 0.12}, step)
    tracker.log_model(export_dir, registered_name="para-train", tags={"stage": "1"})
    tracker.close()            # always, e.g. in a `finally`

On rank 0, `log_*` only put an item (items.py) on a bounded queue (trackers.py); one background
thread (worker.py) creates (or resumes) the MLflow run and sends the items through `MlflowClient`
with explicit run ids. While MLflow cannot be reached (from the start or mid-run), items are
appended to `run_dir/tracking_fallback.jsonl` instead, with one warning, and MLflow is tried again
every minute. Each (metric key, step) is sent at most once, so a run resumed from a checkpoint
older than its last logged step gets no duplicated points. Other ranks, and disabled tracking, get
the base `Tracker`, whose methods do nothing. `code_params` (code.py) says what code a run ran.
"""

from para_train.config import TrackingConfig
from para_train.tracking.code import code_params
from para_train.tracking.items import FALLBACK_ARTIFACT_DIR, MODEL_ARTIFACT_PATH
from para_train.tracking.trackers import (FALLBACK_FILE, PARENT_RUN_TAG, MlflowTracker, RunStatus, Tracker,
                                         create_tracker)

__all__ = ["FALLBACK_ARTIFACT_DIR", "FALLBACK_FILE", "MODEL_ARTIFACT_PATH", "PARENT_RUN_TAG", "MlflowTracker",
           "RunStatus", "Tracker", "TrackingConfig", "code_params", "create_tracker"]
