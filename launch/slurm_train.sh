#!/usr/bin/env bash
# LoRA-drop on a SLURM cluster: one torchrun per node, one rank per GPU, ranks meeting on
# the first node of the allocation (torchrun's static rendezvous: node N runs node rank N).
#
#   cd CHECKOUT       # the same path on every node: .venv/ and launch/ are used from here
#   sbatch --nodes 4 launch/slurm_train.sh recipes/llama3_70b_loradrop.yaml [dotted.key=value ...]
#
# Overrides reach launch/train.py exactly as sbatch received them, one argument each; quote
# them for your own shell only:
#   sbatch launch/slurm_train.sh RECIPE 'data.prompt_template=Q: {q} A:' 'lora.target_modules=[q_proj,v_proj]'
#
# Log: %x-%j.out (job name, job id) in the directory sbatch was run from. slurmd opens the
# --output file before this script starts and creates no directory (a job whose log path is in
# a missing directory does not run), so a log directory must exist before submitting:
#   mkdir -p logs && sbatch --output=logs/%x-%j.out launch/slurm_train.sh ...
#
# Preemption and the time limit: SLURM sends USR1 to this batch shell 120 s before the time
# limit (--signal=B:USR1@120). The script passes it to the run (srun -> each node's torchrun ->
# its ranks); every rank stops at the next step boundary with a checkpoint (train.preempt_signals,
# loradrop_ds/preemption.py), and the script requeues the job (--requeue), whose next start
# resumes from that checkpoint (resume=auto). SIGTERM (preemption with GraceTime, scancel, the
# time limit itself) is passed on the same way, without a requeue: SLURM decides whether the job
# comes back (PreemptMode=REQUEUE). docs/LAUNCHING.md#preemption.
#
# From the environment (sbatch passes on the submitting shell's environment by default):
#   GPUS_PER_NODE    ranks per node; default SLURM_GPUS_ON_NODE, else the count in
#                    --gpus-per-node, else the GPUs nvidia-smi lists on the first node
#   MASTER_PORT      rendezvous port on the first node; default 15000 + job id % 10000, so
#                    that two jobs sharing a node are unlikely to collide
#   OMP_NUM_THREADS  threads per rank; default CPUs per task / ranks per node
#   TORCHRUN         the launcher; default .venv/bin/torchrun
#   SHUTDOWN_TIMEOUT seconds torchrun gives its ranks to stop after passing them a signal, before
#                    SIGKILL (its --shutdown-timeout); default 120, the lead of --signal below
# Adjust the #SBATCH lines (partition, GPUs per node, CPUs, time) to your cluster; more, and
# the other launchers, in launch/README.md.
#SBATCH --job-name=loradrop
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail

# loradrop_ds.preemption.EXIT_CODE (EX_TEMPFAIL): the run stopped for preemption with its
# checkpoint written; tests/test_launch.py checks the two agree.
PREEMPTED_EXIT_CODE=75

die() {
    echo "slurm_train.sh: $*" >&2
    exit 2
}

# ---------------------------------------------------------------- on each node (srun task)
# Everything that differs between nodes is read here, in the task, never in the batch
# script: SLURM_NODEID is the batch node's id (0) there.
if [[ ${1:-} == --node-task ]]; then
    shift
    [[ -n ${SLURM_NODEID:-} ]] || die "--node-task runs as an srun task; SLURM_NODEID is not set"
    node=$SLURM_NODEID
    echo "loradrop: node $node of $LORADROP_NNODES on $(hostname), $GPUS_PER_NODE ranks," \
        "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
    # torchrun (torch 2.13, elastic/multiprocessing/api.py and agent/server/api.py) handles the
    # signals listed here by sending the same signal to its ranks and waiting --shutdown-timeout
    # seconds before SIGKILL; an unlisted USR1 would end torchrun itself at once. It then exits
    # 1, as it does when a rank exits with PREEMPTED_EXIT_CODE, hence the marker file below.
    exec "$TORCHRUN" --nnodes="$LORADROP_NNODES" --node_rank="$node" --nproc_per_node="$GPUS_PER_NODE" \
        --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="${SHUTDOWN_TIMEOUT:-120}" \
        launch/train.py "$@"
fi

# ------------------------------------------------------------------ once, in the batch job
[[ $# -ge 1 ]] || die "usage: sbatch launch/slurm_train.sh RECIPE.yaml [dotted.key=value ...]"
RECIPE=$1
shift
# Under sbatch this file is a copy in slurmd's spool directory, so the checkout is found
# from the working directory (sbatch's, or --chdir), not from this file's path.
[[ -f launch/train.py ]] || die "no launch/train.py in $PWD: submit from the checkout (or sbatch --chdir=CHECKOUT)"
[[ -f $RECIPE ]] || die "no recipe $RECIPE in $PWD"
[[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] ||
    die "not in a SLURM job: submit with sbatch (or run inside salloc)"
export TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
[[ -x $TORCHRUN ]] || die "$TORCHRUN is not there: run scripts/setup.sh in the checkout, or set TORCHRUN"

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[[ ${#hosts[@]} -ge 1 && -n ${hosts[0]} ]] || die "scontrol show hostnames $SLURM_JOB_NODELIST listed no host"
export LORADROP_NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#hosts[@]}}}
[[ $LORADROP_NNODES == "${#hosts[@]}" ]] ||
    die "the job has $LORADROP_NNODES nodes but $SLURM_JOB_NODELIST lists ${#hosts[@]}"
# Node rank 0 (the first node of the step) hosts the rendezvous; it is the nodelist's first.
export MASTER_ADDR=${hosts[0]}
export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 10000))}

if [[ -z ${GPUS_PER_NODE:-} ]]; then
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        GPUS_PER_NODE=${SLURM_GPUS_PER_NODE##*:} # "8" or "h100:8"
    else
        GPUS_PER_NODE=$({ nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU ' || true)
    fi
fi
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] ||
    die "cannot tell how many ranks to start per node (got '$GPUS_PER_NODE'): set GPUS_PER_NODE"
export GPUS_PER_NODE

# Slurm >= 22.05: srun no longer inherits --cpus-per-task from sbatch/salloc (release notes
# of 22.05; sbatch(1), --cpus-per-task): without it each node's task would get one CPU.
srun_args=(--nodes="$LORADROP_NNODES" --ntasks="$LORADROP_NNODES" --ntasks-per-node=1
    --kill-on-bad-exit=1 --export=ALL --chdir="$PWD")
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((SLURM_CPUS_PER_TASK / GPUS_PER_NODE > 0 ? SLURM_CPUS_PER_TASK / GPUS_PER_NODE : 1))}
else
    echo "slurm_train.sh: warning: no --cpus-per-task in the job; each node's task gets Slurm's default" >&2
fi

echo "loradrop: job $SLURM_JOB_ID, $LORADROP_NNODES nodes x $GPUS_PER_NODE ranks = world size" \
    "$((LORADROP_NNODES * GPUS_PER_NODE)), rendezvous $MASTER_ADDR:$MASTER_PORT," \
    "${SLURM_CPUS_PER_TASK:-default} CPUs per node, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"

# Rank 0 writes this file once a run stopped by a signal has its checkpoint (the exit code
# does not come through torchrun). In the checkout, which every node sees at the same path;
# requeued, the job keeps its id, so a stale one is removed first.
export LORADROP_PREEMPTED_FILE=$PWD/.loradrop-preempted-$SLURM_JOB_ID.json
rm -f "$LORADROP_PREEMPTED_FILE"
requeue=0
interrupted=0
srun_pid=
# shellcheck disable=SC2329 # invoked by the traps below
pass_on() { # SIGNAL: to srun, which passes it to every task (each node's torchrun)
    interrupted=1
    echo "slurm_train.sh: $1 received: asking the run to stop at its next step boundary with a checkpoint"
    [[ -z $srun_pid ]] || kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'requeue=1; pass_on USR1' USR1
trap 'pass_on TERM' TERM

# Arguments travel as an argv array (never through a command string), so every override
# reaches train.py as the one argument it was. srun runs in the background so that the traps
# run while it does: a trapped signal ends `wait` early, and the loop waits again.
srun "${srun_args[@]}" bash launch/slurm_train.sh --node-task --config "$RECIPE" "$@" &
srun_pid=$!
while :; do # bash keeps srun's status, so a wait after srun has ended returns it too
    interrupted=0
    status=0
    wait "$srun_pid" || status=$?
    ((interrupted)) || break
done

if [[ -f $LORADROP_PREEMPTED_FILE ]]; then
    echo "slurm_train.sh: the run stopped for preemption: $(tr -d '\n' <"$LORADROP_PREEMPTED_FILE")"
    rm -f "$LORADROP_PREEMPTED_FILE"
    if ((requeue)); then
        echo "slurm_train.sh: requeueing job $SLURM_JOB_ID; it resumes from that checkpoint (resume=auto)"
        scontrol requeue "$SLURM_JOB_ID" ||
            echo "slurm_train.sh: scontrol requeue failed: submit the same command again to resume" >&2
    fi
    exit "$PREEMPTED_EXIT_CODE"
fi
exit "$status"
