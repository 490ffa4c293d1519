#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the tests and for trying
# the batch scripts without a cluster. Needs root and Debian's apt-get.
#
#   cluster/local_slurm.sh install   # apt-get slurm-wlm, munge, shellcheck (skipped when present)
#   cluster/local_slurm.sh start     # install if needed, start munged, slurmctld, slurmd n1 + n2
#   cluster/local_slurm.sh status    # exit 0 when both nodes answer
#   cluster/local_slurm.sh stop      # cancel jobs, stop the daemons, remove config and state
#
# Nodes n1 and n2 are two slurmd daemons on 127.0.0.1 with one CPU and a private
# /dev/shm each, so `sbatch --nodes=2` gets one task per "node", as on a real cluster.
# Exit code 77 means "impossible here" (not root, no apt-get): callers may skip.
set -euo pipefail

readonly STATE_DIR=/var/spool/para-train-slurm # controller state, slurmd spools, logs
readonly CONF=/etc/slurm/slurm.conf
readonly MARKER="# Written by para-train cluster/local_slurm.sh"
readonly NODES=(n1 n2)
readonly CTLD_PID=/run/slurmctld.pid
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_PID=/run/munge/munged.pid
readonly MUNGE_OURS=/run/para-train-munged.started # stop only a munged that we started
readonly EXIT_IMPOSSIBLE=77
readonly WAIT_SECS=60

log() { echo "local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

slurmd_pid_file() { echo "/run/slurmd-$1.pid"; }

have_packages() {
    command -v sbatch >/dev/null && command -v slurmctld >/dev/null &&
        command -v slurmd >/dev/null && command -v munged >/dev/null &&
        command -v shellcheck >/dev/null
}

cmd_install() {
    if have_packages; then
        log "slurm-wlm, munge and shellcheck are installed"
        return 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        log "installing Slurm needs root (apt-get); run as root"
        exit "$EXIT_IMPOSSIBLE"
    fi
    if ! command -v apt-get >/dev/null; then
        log "installing Slurm needs Debian's apt-get, which this machine does not have"
        exit "$EXIT_IMPOSSIBLE"
    fi
    log "apt-get install slurm-wlm munge shellcheck"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge shellcheck >/dev/null
    have_packages || die "apt-get finished but sbatch/slurmctld/slurmd/munged/shellcheck are missing"
}

# pid_alive FILE: the process named in FILE is running.
pid_alive() {
    local pid
    [[ -r $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# stop_pids FILE...: SIGTERM the processes named in the pid FILEs, SIGKILL those left after 10 s.
stop_pids() {
    local file i
    local -a pids=()
    for file in "$@"; do
        if pid_alive "$file"; then
            pids+=("$(<"$file")")
        fi
    done
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "${pids[@]}" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "${pids[@]}" 2>/dev/null; then
            log "killing what is left of ${pids[*]}"
            kill -KILL "${pids[@]}" 2>/dev/null || true
        fi
    fi
    rm -f "$@"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    local i
    if [[ ! -s $MUNGE_KEY ]]; then
        mkdir -p "$(dirname "$MUNGE_KEY")"
        mungekey --create --keyfile="$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 400 "$MUNGE_KEY"
    if munge_works; then
        log "munged is already running"
        return 0
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    runuser -u munge -- munged
    touch "$MUNGE_OURS"
    for ((i = 0; i < WAIT_SECS * 10; i++)); do
        munge_works && return 0
        sleep 0.1
    done
    die "munged did not answer within ${WAIT_SECS}s (see /var/log/munge/munged.log)"
}

write_conf() {
    local host
    host=$(hostname -s)
    mkdir -p "$(dirname "$CONF")"
    cat >"$CONF" <<EOF
$MARKER: a two-node test cluster on this machine.
ClusterName=paratrain
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Requeued jobs wait cred_expire+1 s before they may start again (default 120).
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
# No cgroups here: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending (e.g. requeued) jobs every few seconds, not every 30-60 s.
SchedulerParameters=bf_interval=2,sched_interval=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Finished jobs stay readable here after scontrol forgets them (MinJobAge).
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/jobcomp.log
JobRequeue=1
MinJobAge=30
KillWait=5
InactiveLimit=0
ReturnToService=2
SlurmdTimeout=60
MailProg=/bin/true
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=1 State=UNKNOWN
PartitionName=local Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

# start_slurmd NODE: one slurmd per node, each with a /dev/shm of its own, as real nodes have:
# MosaicML streaming and DeepSpeed keep per-node state there, and two "nodes" sharing one
# /dev/shm collide. The tmpfs goes away with the node's last process.
start_slurmd() {
    # shellcheck disable=SC2016 # $1 is the inner sh's argument
    unshare --mount --propagation private -- \
        sh -c 'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec slurmd -N "$1"' sh "$1"
}

# Refuse to touch a Slurm that this script did not set up (a real controller's pid files
# live in the same places).
require_ours() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF was not written by this script: this machine runs another Slurm; leaving it alone"
    fi
}

nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    [[ $states == "n1 idle"$'\n'"n2 idle" ]]
}

cmd_status() {
    require_ours
    if pid_alive "$CTLD_PID" && scontrol ping >/dev/null 2>&1; then
        sinfo -N -o '%N %t %c %P'
        # Up when both nodes answer: idle, or busy with jobs.
        [[ $(sinfo -h -N -o '%t' | grep -cE '^(idle|alloc|mix|comp)') -eq ${#NODES[@]} ]]
    else
        log "not running"
        return 1
    fi
}

cmd_start() {
    local node i
    cmd_install
    [[ $(id -u) -eq 0 ]] || { log "starting the daemons needs root"; exit "$EXIT_IMPOSSIBLE"; }
    require_ours
    if pid_alive "$CTLD_PID" && nodes_idle; then
        log "already running"
        return 0
    fi
    stop_daemons # leftovers of a crashed run
    rm -rf "$STATE_DIR"
    mkdir -p "$STATE_DIR/ctld"
    for node in "${NODES[@]}"; do mkdir -p "$STATE_DIR/$node"; done
    start_munge
    write_conf
    slurmctld
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    for ((i = 0; i < WAIT_SECS * 2; i++)); do
        if nodes_idle; then
            log "up: nodes n1 n2 idle (logs in $STATE_DIR)"
            return 0
        fi
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "nodes not idle within ${WAIT_SECS}s; see $STATE_DIR/slurmctld.log and slurmd-n*.log"
}

stop_daemons() {
    local node
    local -a files=("$CTLD_PID")
    for node in "${NODES[@]}"; do files+=("$(slurmd_pid_file "$node")"); done
    stop_pids "${files[@]}"
}

cmd_stop() {
    local i
    require_ours
    if pid_alive "$CTLD_PID" && scontrol ping >/dev/null 2>&1; then
        # Cancel our test jobs so that no slurmstepd outlives its slurmd.
        scancel --quiet --full --user=root 2>/dev/null || true
        for ((i = 0; i < WAIT_SECS * 2; i++)); do
            [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_daemons
    if [[ -e $MUNGE_OURS ]]; then
        stop_pids "$MUNGE_PID"
        rm -f "$MUNGE_OURS"
    fi
    rm -rf "$STATE_DIR"
    if [[ -e $CONF ]] && grep -qF "$MARKER" "$CONF"; then
        rm -f "$CONF"
    fi
    log "stopped"
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 {install|start|stop|status}" >&2
    exit 2
    ;;
esac
