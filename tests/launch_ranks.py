"""Start N local ranks of a script the way `deepspeed --num_gpus N` does, without its cost.

    python tests/launch_ranks.py --nproc 2 --master_port PORT para_train/main.py --stage 1 ...

The `deepspeed` runner and the `deepspeed.launcher.launch` process it starts each import torch and
DeepSpeed (about 5 s each on 2 cores) before any rank starts. This launcher imports nothing but the
standard library. Like DeepSpeed's, it gives each rank RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR
and MASTER_PORT, kills the other ranks as soon as one fails (so none hangs in a collective), and exits with
the failed rank's code. The shared reference run (conftest's `three_stages`) still goes through the real
`deepspeed` CLI, so the suite checks both give the same losses.
"""
import argparse
import os
import signal
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--master_port", type=int, required=True)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    procs = []
    for rank in range(args.nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.nproc),
               "LOCAL_SIZE": str(args.nproc), "LOCAL_WORLD_SIZE": str(args.nproc), "CROSS_RANK": "0", "CROSS_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(args.master_port)}
        procs.append(subprocess.Popen([sys.executable, "-u", args.script, *args.args], env=env))

    def stop(signum, _frame):  # pass a termination on to the ranks, as DeepSpeed's launcher does
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            code = failed[0]
            return code if code > 0 else 128 - code
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
