"""What MLflow tracking costs a training run, including when the server is gone: side by side in one run.

    python benchmarks/bench_tracking.py                  # 30 steps per case, about 4 minutes on 2 cores
    python benchmarks/bench_tracking.py --steps 60

The trainer (para_train.training.loop.Trainer, the embedded tiny model, one rank, ZeRO-3) trains
the same steps, logging metrics at every step (tracking.log_every=1) and a sample grid at the end, with:

  off          tracking.enabled=false: the baseline
  local        the default local store, sqlite in the run directory
  server       a real `mlflow server` on loopback
  unreachable  a loopback port nobody listens on, from the start
  killed       a real server, SIGKILLed when the run reaches half its steps
  silent       a socket that accepts connections and never answers (the worst case: a hung server)

For each it prints the wall time of the stage's set-up (which creates the MLflow run and waits
at most 10 s for it), of the training loop (Trainer.train()), of the stage's end (main.finish: the
samples, the export, log_model and the tracker's close, which waits for MLflow at most
tracking.shutdown_timeout_s), their sum's excess over `off`, and how many metric points reached
MLflow or the fallback file.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
from mlflow_server import MlflowServer  # noqa: E402  (the tests' real-server harness)

CASES = ("off", "local", "server", "unreachable", "killed", "silent")


def kill_at_step(server: MlflowServer, metrics: Path, step: int) -> threading.Thread:
    """SIGKILLs the server once the trainer's own log reaches `step`."""
    def watch():
        while True:
            if metrics.exists():
                rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.endswith("}")]
                if rows and rows[-1]["step"] >= step:
                    server.kill()
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def tracking_uri(case: str, servers: dict) -> str | None:
    """None: the default local store (or tracking off)."""
    if case == "server":
        return servers["live"].uri
    if case == "killed":
        return servers["doomed"].uri
    if case == "silent":
        return f"http://127.0.0.1:{servers['silent'].getsockname()[1]}"
    if case == "unreachable":
        from para_train.training.distributed import free_port

        return f"http://127.0.0.1:{free_port()}"  # nobody listens there
    return None


def run_case(case: str, env, root: Path, cache: Path, steps: int, servers: dict) -> dict:
    from mlflow.tracking import MlflowClient

    from para_train.config import load_config
    from para_train.main import finish, open_stage
    from para_train.tracking import FALLBACK_FILE
    from para_train.training.loop import Trainer

    run_dir = root / case
    uri = tracking_uri(case, servers)
    overrides = [f"run.dir={run_dir}", f"data.cache_dir={cache}", "data.synthetic_samples=64", f"train.steps={steps}",
                 "train.log_every=1000", "tracking.log_every=1", "checkpoint.every=100000", "sample.num_images=2",
                 "sample.steps=3", f"tracking.enabled={'false' if case == 'off' else 'true'}"]
    if uri:
        overrides.append(f"tracking.uri={uri}")
    cfg = load_config(1, None, overrides)
    t0 = time.perf_counter()
    stage, state = open_stage(cfg, env)
    t_built = time.perf_counter()
    if case == "killed":
        kill_at_step(servers["doomed"], stage.layout.metrics, steps // 2)
    try:
        Trainer(stage, state).train()
        t_trained = time.perf_counter()
        finish(stage, state)  # samples, export, log_model, the tracker's close
    finally:
        stage.close()  # the tracker is closed already (a no-op) unless train() raised
    t_closed = time.perf_counter()
    sent = fallback = 0
    run_id = stage.tracker.run_id
    if case in ("local", "server") and run_id:
        client = MlflowClient(uri or f"sqlite:///{run_dir}/mlflow.db")
        sent = len(client.get_metric_history(run_id, "loss"))
    # "killed": the dead server's store is read after its restart, in main()
    path = run_dir / FALLBACK_FILE
    if path.exists():
        fallback = sum(1 for x in path.read_text().splitlines() if x and "loss" in json.loads(x).get("metrics", {}))
    return {"build": t_built - t0, "train": t_trained - t_built, "finish": t_closed - t_trained, "run_id": run_id,
            "mlflow": sent, "fallback": fallback}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cache-dir", default="~/.cache/para-train")
    parser.add_argument("--only", default=",".join(CASES))
    args = parser.parse_args()
    import common  # torch, para_train: after --help

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", common.extensions_dir())
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import logging
    import warnings

    import torch

    from para_train.training.distributed import init_process_group, read_env

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(message)s")
    common.header("para-train tracking overhead")
    env = read_env()
    torch.set_num_threads(env.cpu_threads)
    init_process_group(env)
    cases = [c for c in CASES if c in args.only.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    cache = Path(args.cache_dir).expanduser()
    servers: dict = {}
    if "server" in cases:
        servers["live"] = MlflowServer(root / "mlflow-live").start()
    if "killed" in cases:
        servers["doomed"] = MlflowServer(root / "mlflow-doomed").start()
    if "silent" in cases:
        servers["silent"] = socket.socket()
        servers["silent"].bind(("127.0.0.1", 0))
        servers["silent"].listen(64)
    for name in ("live", "doomed"):
        if name in servers:
            servers[name].wait_ready()
    results = {}
    try:
        run_case("off", env, root / "warmup", cache, 3, servers)  # data, tiny assets, the comm op: built once
        for case in cases:
            results[case] = run_case(case, env, root, cache, args.steps, servers)
            r = results[case]
            print(f"  {case:<12} done: set-up {r['build']:.2f} s, train {r['train']:.2f} s, finish {r['finish']:.2f} s",
                  flush=True)
        if "doomed" in servers and results.get("killed", {}).get("run_id"):
            from mlflow.tracking import MlflowClient

            servers["doomed"].start().wait_ready()  # same store: count what reached it before the kill
            history = MlflowClient(servers["doomed"].uri).get_metric_history(results["killed"]["run_id"], "loss")
            results["killed"]["mlflow"] = len(history)
    finally:
        for name in ("live", "doomed"):
            if name in servers:
                servers[name].stop()
        if "silent" in servers:
            servers["silent"].close()

    base = results.get("off")
    print(f"\n{args.steps} steps, metrics every step, tiny model, 1 rank; tracking.shutdown_timeout_s=20 (default)")
    print(f"  {'case':<12} {'set-up':>9} {'train()':>9} {'finish()':>9} {'extra over off':>15} "
          f"{'points in MLflow':>17} {'in fallback':>12}")
    total = lambda r: r["build"] + r["train"] + r["finish"]  # noqa: E731
    for case, r in results.items():
        extra = total(r) - total(base) if base else float("nan")
        print(f"  {case:<12} {r['build']:8.2f}s {r['train']:8.2f}s {r['finish']:8.2f}s {extra:+14.2f}s "
              f"{r['mlflow']:>17} {r['fallback']:>12}")
    print(f"\nload average at end (1/5/15 min): {common.load_average()}")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
