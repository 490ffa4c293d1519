#!/usr/bin/env bash
# The one launcher behind the batch templates (cluster/stage*_*.sh): it runs
# para_train/main.py on every node of a Slurm job. Shell only sets up the
# environment; all training logic is in para_train.
#
# A template holds #SBATCH options and ends in
#     exec bash "$PARA_TRAIN_HOME/cluster/launch.sh" batch STAGE DEFAULT_CONFIG
# In the batch step (on the job's first node) this script
#   1. derives the rendezvous: the head node is the first of
#      `scontrol show hostnames $SLURM_JOB_NODELIST`, its address is its NodeAddr
#      (`scontrol show node`), the port comes from the job id;
#   2. starts `launch.sh node ...` once per node with srun, which starts the node's
#      ranks with torchrun (cluster/local_ranks.py --nnodes --node_rank=$SLURM_NODEID
#      --nproc_per_node --master_addr --master_port); DeepSpeed reads the RANK,
#      WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT that torchrun sets;
#   3. forwards Slurm's warning signal to the job step: `#SBATCH --signal=B:USR1@SECS`
#      (or `scancel --signal=USR1 --batch JOBID`) reaches this shell only; srun passes it
#      to every process of the step; the trainer saves a checkpoint at the next step
#      and exits 75 ("saved, please requeue");
#   4. requeues the job when every node exited 75, at most PARA_TRAIN_MAX_REQUEUES
#      times; the requeued job resumes from the latest complete checkpoint in the run
#      directory;
#   5. requeues the job, under the same cap, when a node failed (a rank killed, a lost
#      GPU, a hung collective cut short by srun): the requeued job resumes from the last
#      complete checkpoint. When an attempt fails again without a newer complete
#      checkpoint than the previous failed attempt had, it is a crash loop, not bad luck:
#      the job fails with a message instead. A config or data error (exit code 2) is
#      never retried.
#
# Change a run without editing files, with sbatch's own options (--nodes,
# --gpus-per-node, --time, --partition, --output, ...) and these variables:
#   PARA_TRAIN_CONFIG          stage YAML (default: the template's); set it to the empty
#                              string for the trainer's embedded tiny model
#   PARA_TRAIN_RUN_DIR         run directory, passed as run.dir= (default: the config's
#                              run.dir); all stages of a training share it; node and rank
#                              logs go to RUN_DIR/logs/ (see Logs below)
#   PARA_TRAIN_OVERRIDES       extra key=value words, e.g. "train.steps=1000 train.lr=1e-4"
#   PARA_TRAIN_CPU=1           CPU only: no GPUs, DeepSpeed's CPU accelerator (gloo)
#   PARA_TRAIN_PROCS_PER_NODE  ranks per node (default: the node's GPUs; 1 with PARA_TRAIN_CPU=1)
#   PARA_TRAIN_PYTHON          python to run (default: python on PATH; sbatch passes on the
#                              submitting shell's environment, so an active venv works)
#   PARA_TRAIN_MASTER_PORT     rendezvous port (default: 10000-29999, from the job id)
#   PARA_TRAIN_MAX_REQUEUES    requeues (preemptions and node failures together) before the job
#                              fails instead (default 20)
#   PARA_TRAIN_SRUN_ARGS       extra srun options for the job step, e.g. a container:
#                              "--container-image=/shared/para-train.sqsh --container-mounts=/shared"
#   PARA_TRAIN_SRUN_WAIT       seconds srun lets the other nodes run on after one node's task
#                              ended (default 120): it bounds how long survivors of a crashed
#                              node hang; a normal stage end is not cut short by it (every rank
#                              waits for rank 0's export before any exits)
#   PARA_TRAIN_NODE_CACHE      node-local folder for compile caches (default ${TMPDIR:-/tmp}/
#                              para-train-$USER): TRITON_CACHE_DIR, TORCH_EXTENSIONS_DIR and
#                              TORCHINDUCTOR_CACHE_DIR default to folders in it, so ranks never
#                              share a lock in a network $HOME
#   Fabric: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_NET, FI_PROVIDER, FI_EFA_*,
#   UCX_*, ... reach every rank unchanged (srun passes the submitting environment on): set them
#   in the submitting shell or the template. GLOO_SOCKET_IFNAME (the CPU group that waits for
#   rank 0's long tasks) defaults to NCCL_SOCKET_IFNAME.
#   NCCL_*, TORCH_NCCL_*, OMP_NUM_THREADS  set below only when unset
#
# Logs: the batch log (sbatch --output), one log per node (RUN_DIR/logs/stageN-nodeK.log, every
# rank of the node, all attempts) and one per rank (RUN_DIR/logs/stageN-rankR.log).
set -euo pipefail

readonly REQUEUE_EXIT=75 # the trainer's "checkpoint saved, please requeue" (EX_TEMPFAIL)
HOME_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly HOME_DIR
readonly SELF=$HOME_DIR/cluster/launch.sh

say() { echo "launch.sh: $*"; }
die() {
    echo "launch.sh: error: $*" >&2
    exit 2
}

# run_and_wait PID: wait for background PID through trapped signals; return its exit code.
# (`wait` returns early, with 128+N, whenever a trap runs.)
trapped=0
run_and_wait() {
    local rc
    while :; do
        trapped=0
        wait "$1" && rc=0 || rc=$?
        ((trapped)) || return "$rc"
    done
}

# ------------------------------------------------------------------ batch step
rendezvous_addr() {
    local head=$1 addr
    addr=$(scontrol show node "$head" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1)
    if [[ -z $addr ]]; then
        addr=$(getent hosts "$head" | awk '{print $1; exit}')
    fi
    echo "${addr:-$head}"
}

procs_per_node() {
    local gpus
    if [[ -n ${PARA_TRAIN_PROCS_PER_NODE:-} ]]; then
        echo "$PARA_TRAIN_PROCS_PER_NODE"
    elif [[ ${PARA_TRAIN_CPU:-0} == 1 ]]; then
        echo 1
    else
        gpus=${SLURM_GPUS_ON_NODE:-}
        if [[ -z $gpus && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
            gpus=${SLURM_GPUS_PER_NODE##*:} # "8" or "a100:8"
        fi
        [[ $gpus =~ ^[1-9][0-9]*$ ]] ||
            die "no GPUs in this job: submit with --gpus-per-node=N, set PARA_TRAIN_PROCS_PER_NODE, or set PARA_TRAIN_CPU=1 for a CPU-only run"
        echo "$gpus"
    fi
}

set_environment() {
    local nproc=$1 cpus=${SLURM_CPUS_ON_NODE:-1}
    local node_cache=${PARA_TRAIN_NODE_CACHE:-${TMPDIR:-/tmp}/para-train-${USER:-$(id -u)}}
    export PYTHONUNBUFFERED=1 PARA_TRAIN_NODE_CACHE=$node_cache
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$node_cache/triton}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$node_cache/torch_extensions}
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$node_cache/inductor}
    if [[ -n ${NCCL_SOCKET_IFNAME:-} ]]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}
    fi
    if [[ ${PARA_TRAIN_CPU:-0} == 1 ]]; then
        export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    else
        export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
        # A failed or hung collective aborts the rank (and so the job) instead of hanging it.
        export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / nproc > 0 ? cpus / nproc : 1))}
    fi
}

# resolve_run_dir PYTHON STAGE CONFIG OVERRIDES...: run.dir as the trainer will see it (YAML, then
# overrides), made absolute. Loading the config here also stops a bad one before any node starts.
resolve_run_dir() {
    local python=$1
    shift
    PYTHONPATH="$HOME_DIR${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$@" <<'PY'
import sys
from pathlib import Path

from para_train.config import ConfigError, load_config

stage, config, *overrides = sys.argv[1:]
try:
    cfg = load_config(int(stage), config or None, overrides)
except ConfigError as err:
    sys.exit(f"config error: {err}")
print(Path(cfg.run.dir).expanduser().resolve())
PY
}

batch_main() {
    local stage=$1 default_config=$2
    trap '' USR1 # until the ranks run, a warning signal has nobody to save: drop it
    [[ -n ${SLURM_JOB_ID:-} ]] || die "run this through sbatch (e.g. sbatch cluster/stage${stage}_*.sh), not directly"
    local job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0}
    local max_requeues=${PARA_TRAIN_MAX_REQUEUES:-20}
    local config=${PARA_TRAIN_CONFIG-$default_config}
    local python=${PARA_TRAIN_PYTHON:-python}
    local nnodes=${SLURM_JOB_NUM_NODES:?} nproc head addr port run_dir log_dir
    local -a overrides args

    [[ -z $config || -f $config ]] ||
        die "PARA_TRAIN_CONFIG: $config does not exist (relative paths start at $PWD); set it to a stage YAML, or to '' for the tiny embedded model"
    command -v "$python" >/dev/null || die "PARA_TRAIN_PYTHON: $python not found; point it at the python of your para-train environment"
    read -r -a overrides <<<"${PARA_TRAIN_OVERRIDES:-}"
    run_dir=$(resolve_run_dir "$python" "$stage" "$config" "${overrides[@]}" \
        ${PARA_TRAIN_RUN_DIR:+"run.dir=$PARA_TRAIN_RUN_DIR"}) || exit 2
    log_dir=$run_dir/logs
    mkdir -p "$log_dir"
    nproc=$(procs_per_node)
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    addr=$(rendezvous_addr "$head")
    # A fresh port per attempt: a requeued job may land on the same head node.
    port=${PARA_TRAIN_MASTER_PORT:-$((10000 + (job % 2000) * 10 + restart % 10))}
    set_environment "$nproc"

    args=("$HOME_DIR/para_train/main.py" --stage "$stage")
    [[ -z $config ]] || args+=(--config "$config")
    args+=("${overrides[@]}" "run.dir=$run_dir")

    say "job $job attempt $((restart + 1)): $nnodes node(s) x $nproc rank(s), rendezvous $head ($addr:$port)"
    say "run dir $run_dir; node logs $log_dir/stage$stage-node*.log"
    say "command: $python ${args[*]}"

    rm -f "$log_dir/stage$stage-node"*.exit
    trap 'trapped=1; say "got USR1: asking the ranks to save and stop"; kill -USR1 "$step" 2>/dev/null || true' USR1
    local -a srun_extra
    read -r -a srun_extra <<<"${PARA_TRAIN_SRUN_ARGS:-}"
    # --kill-on-bad-exit=0: a node that exits 75 first must not kill the others while they
    # finish; --wait bounds how long survivors of a crashed node may hang afterwards.
    srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --whole \
        --kill-on-bad-exit=0 --wait="${PARA_TRAIN_SRUN_WAIT:-120}" "${srun_extra[@]}" \
        bash "$SELF" node "$log_dir/stage$stage" "$nnodes" "$nproc" "$addr" "$port" \
        -- "$python" "${args[@]}" &
    local step=$!
    local rc=0
    run_and_wait "$step" || rc=$?
    trap - USR1

    local failures=$log_dir/stage$stage-job$job.failures # the checkpoint each failed attempt left
    if ((rc == 0)); then
        rm -f "$failures"
        say "done"
        return 0
    fi
    if ((rc == REQUEUE_EXIT)) && all_nodes_exited "$log_dir/stage$stage-node" "$nnodes" "$REQUEUE_EXIT"; then
        requeue "$job" "$restart" "$max_requeues" "checkpoint saved" || return "$REQUEUE_EXIT"
        return 0
    fi
    # A node failed. Retry from the last complete checkpoint, unless nothing was gained since the last failure.
    ((rc != REQUEUE_EXIT)) || rc=1 # some nodes saved, not all: a failure, not a preemption
    say "failed with exit code $rc; see $log_dir/stage$stage-node*.log" >&2
    if any_node_exited "$log_dir/stage$stage-node" "$nnodes" 2; then
        say "a config or data error (exit code 2) does not heal with a retry: not requeueing" >&2
        return 2
    fi
    local ckpt previous
    ckpt=$(newest_checkpoint "$run_dir/stage$stage/checkpoints")
    previous=$(tail -n1 "$failures" 2>/dev/null || true)
    if [[ $previous == "$ckpt" ]]; then
        say "crash loop: this attempt failed from the same checkpoint ($ckpt) as the previous failed attempt, so a retry would fail again; not requeueing. Find the cause in the logs above, fix it and resubmit: the run resumes from $ckpt" >&2
        return "$rc"
    fi
    echo "$ckpt" >>"$failures"
    requeue "$job" "$restart" "$max_requeues" "node failure; the last complete checkpoint is $ckpt" || return "$rc"
    return 0
}

# requeue JOB RESTART MAX WHY: requeue the job unless it was requeued MAX times already (then fail).
requeue() {
    local job=$1 restart=$2 max=$3 why=$4
    if ((restart >= max)); then
        say "$why, but the job was requeued $restart times already (PARA_TRAIN_MAX_REQUEUES=$max): not requeueing; resubmit to go on" >&2
        return 1
    fi
    say "$why; requeueing job $job (requeue $((restart + 1)) of at most $max)"
    # Slurm ends this script while it requeues the job: nothing may follow.
    scontrol requeue "$job" || {
        say "scontrol requeue $job failed; resubmit to resume from the checkpoint" >&2
        return 1
    }
}

# newest_checkpoint DIR: the name of the newest checkpoint in DIR with a COMPLETE marker, or "none".
newest_checkpoint() {
    local markers=("$1"/step_*/COMPLETE)
    if [[ -e ${markers[0]} ]]; then
        basename "$(dirname "${markers[-1]}")"
    else
        echo none
    fi
}

# any_node_exited PREFIX NNODES CODE: some node wrote CODE to PREFIX<node>.exit.
any_node_exited() {
    local node
    for ((node = 0; node < $2; node++)); do
        [[ $(cat "$1$node.exit" 2>/dev/null) != "$3" ]] || return 0
    done
    return 1
}

# all_nodes_exited PREFIX NNODES CODE: every node wrote CODE to PREFIX<node>.exit.
all_nodes_exited() {
    local node code ok=0
    for ((node = 0; node < $2; node++)); do
        code=$(cat "$1$node.exit" 2>/dev/null || echo "none")
        if [[ $code != "$3" ]]; then
            say "node $node exited with ${code}, not $3" >&2
            ok=1
        fi
    done
    return "$ok"
}

# ------------------------------------------------------------------ one per node
node_main() {
    local prefix=$1 nnodes=$2 nproc=$3 addr=$4 port=$5
    shift 5
    [[ ${1:-} == -- ]] || die "usage: launch.sh node PREFIX NNODES NPROC ADDR PORT -- PYTHON ARGS..."
    shift
    local python=$1 node=${SLURM_NODEID:?}
    shift
    exec >>"$prefix-node$node.log" 2>&1
    say "=== $(date '+%F %T') job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) node $node ($(hostname)) ==="
    export PARA_TRAIN_RANK_LOG=$prefix-rank # each rank tees its output to <this><RANK>.log
    # A build killed mid-way (a preempted job) leaves its lock behind and every later build waits on it forever;
    # no build of this job has started yet, so a lock older than an hour is stale.
    if [[ -d $TORCH_EXTENSIONS_DIR ]]; then
        find "$TORCH_EXTENSIONS_DIR" -name lock -mmin +60 -print -delete 2>/dev/null | sed 's/^/launch.sh: removed stale build lock /' || true
    fi
    # Slurm sends a step's signals to all its processes; the ranks get USR1 that way. Also
    # pass it on from here, for clusters whose proctrack plugin signals only this task's
    # process group (torchrun starts each rank in a session of its own).
    trap '' USR1
    (exec "$python" "$HOME_DIR/cluster/local_ranks.py" --nnodes="$nnodes" --node_rank="$node" \
        --nproc_per_node="$nproc" --master_addr="$addr" --master_port="$port" "$@") &
    local agent=$!
    trap 'trapped=1; forward_to_ranks "$agent" USR1' USR1
    local rc=0
    run_and_wait "$agent" || rc=$?
    echo "$rc" >"$prefix-node$node.exit"
    say "=== $(date '+%F %T') node $node exit code $rc ==="
    return "$rc"
}

# forward_to_ranks PID SIGNAL: send SIGNAL to the children of PID (the ranks under torchrun).
forward_to_ranks() {
    local -a ranks
    read -r -a ranks <<<"$(cat /proc/"$1"/task/*/children 2>/dev/null)"
    if ((${#ranks[@]})); then
        kill -s "$2" "${ranks[@]}" 2>/dev/null || true
    fi
}

case "${1:-}" in
batch)
    [[ $# -eq 3 ]] || die "usage: launch.sh batch STAGE DEFAULT_CONFIG (from a cluster/stage*_*.sh template)"
    batch_main "$2" "$3"
    ;;
node)
    shift
    node_main "$@"
    ;;
*) die "usage: launch.sh batch STAGE DEFAULT_CONFIG | launch.sh node ... (see the comment at the top)" ;;
esac
