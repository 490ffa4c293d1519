"""Start this node's ranks with torchrun (torch.distributed.run) and hand their exit code back.

cluster/launch.sh runs this once per node, with torchrun's own arguments:

    python cluster/local_ranks.py --nnodes=2 --node_rank=0 --nproc_per_node=8 \
        --master_addr=HOST --master_port=PORT para_train/main.py --stage 1 ...

It differs from plain torchrun in two ways, both for preemption:
- It exits with the ranks' own exit code when the failed ranks agree on one; torchrun exits 1
  for any failure, which would hide the trainer's 75 ("checkpoint saved, please requeue").
- It ignores SIGUSR1. Slurm delivers a step's signals to every process of the step, and
  torchrun, which has no handler for USR1, would die and take the ranks with it. The ranks
  inherit the ignored signal until the trainer installs its own handler, so a USR1 that comes
  before the trainer can save is dropped instead of killing it.
"""
import signal
import sys

signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # before the slow torch import

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import main as torchrun_main  # noqa: E402


def exit_code(err: ChildFailedError) -> int:
    """The failed ranks' common exit code (signals as 128+N, like a shell), else 1."""
    codes = {failure.exitcode for failure in err.failures.values()}
    if len(codes) == 1:
        (code,) = codes
        if 0 < code < 256:
            return code
        if code < 0:
            return 128 - code
    return 1


def main() -> int:
    sys.argv[0] = "torchrun"
    try:
        torchrun_main()
    except ChildFailedError as err:
        return exit_code(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
