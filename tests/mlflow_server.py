"""A real `mlflow server` on a free loopback port, for tests and benchmarks/bench_tracking.py.

    with MlflowServer(tmp_dir) as server:      # starts it and waits for /health (~17 s here)
        client = MlflowClient(server.uri)

`start()` returns at once, so several servers can start side by side before `wait_ready()`;
`kill()` simulates a crash; `start()` again brings it back on the same port and store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from para_train.training.distributed import free_port


class MlflowServer:
    def __init__(self, root: str | os.PathLike, port: int | None = None, startup_timeout_s: float = 90.0):
        self.root = Path(root)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        """Launches the server; returns without waiting for it (see wait_ready)."""
        assert self._proc is None, "already started"
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root.resolve()}/mlflow.db",
            "--artifacts-destination", str(self.root.resolve() / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",  # the default 4 only slow the start on a small machine
        ]
        # Job execution (a job runner and 7 huey consumers) is for GenAI features; without it the
        # server starts faster and uses less CPU. Telemetry would reach beyond loopback.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait_ready(self) -> MlflowServer:
        """Polls /health until it answers; raises with the server's log if it never does."""
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not ready after {self.startup_timeout_s:g} s:\n{self._log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after timeout_s."""
        if self._proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, like a crash: no graceful shutdown."""
        if self._proc is None:
            return
        self._signal(signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)  # its own group (start_new_session): the server and its workers
        except ProcessLookupError:
            pass

    def __enter__(self) -> MlflowServer:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log_tail(self, num_lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
