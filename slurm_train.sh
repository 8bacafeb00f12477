#!/bin/bash
# slurm_train.sh: train diffusion.py (or gpt.py) on SLURM as a self-continuing chain of jobs.
#
#   cd /path/to/repo && source venv/bin/activate        # sbatch passes this environment on
#   sbatch slurm_train.sh --dataset=openwebtext --max_iters=600000     # any --key=value of the script
#   SCRIPT=gpt.py sbatch slurm_train.sh --dataset=openwebtext           # the GPT baseline
#   sbatch --array=0-11 slurm_train.sh --max_iters=50000               # 6 schedules x 2 maskings
#
# How the chain works: SLURM sends SIGUSR1 to this batch shell 300 s before the time limit
# (--signal=B:USR1@300; "B:" = this shell only, which decides where it goes).
# The shell forwards it to the training processes, which finish the current step (or evaluation),
# save out_dir/ckpt.pt, write out_dir/status.json {"status": "interrupted"} and exit 75.
# The shell then requeues the job (scontrol requeue; a new sbatch if requeueing is refused), and
# the next run starts with --init_from=auto, so it resumes from ckpt.pt; data, masks and noise
# levels are a function of (seed, step, micro-batch), so the chained run equals an uninterrupted one.
# When status.json says "finished" it stops. A crash (no signal, status not "interrupted") is not
# requeued: its exit code is the job's. scancel is never undone (scancel sends SIGTERM, not USR1;
# the trainer still saves on SIGTERM, so `sbatch` the same command again to continue).
# Safe at any moment: the trainer's signal handler only sets a flag, checked between steps, so a
# signal during an evaluation or a save lets it finish first (then it saves once more and exits);
# checkpoints are written to a temporary file and renamed. torchrun and the workers start with
# USR1 ignored, and the shell forwards it only to processes that have installed their handler
# (SigCgt in /proc/PID/status), retrying each second, so a signal during start-up waits
# instead of killing anything. Raise @300 if a step plus an evaluation plus two saves can take longer.
#
# Resources: one node with 4 A100s by default. Change the GPUs with sbatch options (command
# line options override the #SBATCH lines below), e.g.
#   sbatch --gpus-per-node=h100:8 --cpus-per-task=64 slurm_train.sh ...     # 8 H100s
#   sbatch --gpus-per-node=1 --cpus-per-task=8 slurm_train.sh ...            # any one GPU
# (some sites spell it --gres=gpu:a100:4, and need -p/--partition, -A/--account, --mem).
# One process per GPU on the node (NPROC to override); 1 process runs without torchrun.
# --gradient_accumulation_steps counts the micro-batches of the whole global batch, so it must be
# a multiple of the number of processes (nodes x NPROC): e.g. --gradient_accumulation_steps=8 on 4 GPUs.
# Logs: slurm-<job name>-<job id>.out in the submission directory, appended to by every restart
# (--open-mode=append); each start is also listed in out_dir/slurm_jobs.txt.
#
# Array mode: task i of --array=0-11 trains schedule SCHEDULES[i // 2] (linear, cosine, loglinear,
# ... as listed in the script) with masking list(MASKINGS)[i % 2] (uniform, entropy), in its default
# out_dir out/diffusion-<dataset>-<schedule>-<masking> (with --out_dir=D: D/<schedule>-<masking>).
# Entropy masking needs <data_dir>/<dataset>/entropy.npy first: train a GPT (SCRIPT=gpt.py), then
# python prepare.py --entropy --ref=out/gpt-<dataset> --dataset=<dataset>.
# One GPU per task is usually plenty: sbatch --array=0-11 --gpus-per-node=1 --cpus-per-task=8 ...
#
# Multi-node: sbatch --nodes=4 slurm_train.sh ... runs one `srun` task per node, each a torchrun
# with --nnodes=$SLURM_NNODES, --node_rank=$SLURM_NODEID and a c10d rendezvous at the first node
# of $SLURM_JOB_NODELIST, port MASTER_PORT (29500). USR1 goes from this shell to srun, which
# passes it to every node's task, which passes it to its workers. out_dir must be on a shared
# filesystem. USE_SRUN=1 takes this path on one node too.
#
# Environment: SCRIPT (diffusion.py | gpt.py), NPROC (processes per node; default the GPUs on
# the node, or 1), PYTHON (default python), REPO (default the submission directory, which must
# hold diffusion.py), MASTER_PORT, USE_SRUN. Outside SLURM (bash slurm_train.sh ...) it trains
# the same way and, on USR1, exits 75 instead of requeueing: run the same command again.
# DRY_RUN=1 prints the resolved out_dir and command (e.g. of an array task) and starts nothing.
#
#SBATCH --job-name=diffusion
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=a100:4
#SBATCH --cpus-per-task=32
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
EXIT_RESUMABLE=75   # runtime.EXIT_RESUMABLE

log() { echo "[slurm_train $(date '+%F %T')] $*"; }
die() { echo "slurm_train: error: $1" >&2; exit "${2:-1}"; }  # die MESSAGE [CODE]

got_signal=0   # SIGUSR1 received by this shell
forwarded=0    # ... and passed on to a process that handles it
trap 'got_signal=1' USR1

catches_usr1() {  # catches_usr1 PID: true when PID has a handler for SIGUSR1 (bit 9 of SigCgt)
    local key value mask=
    while read -r key value; do
        [[ $key == SigCgt: ]] && mask=$value
    done 2>/dev/null < "/proc/$1/status"
    [[ -n $mask ]] && (( (16#$mask >> 9) & 1 ))
}

children() {  # children PID: the pids whose parent is PID (read from /proc: no procps needed)
    local f line fields
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null < "$f" || continue
        read -ra fields <<< "${line##*) }"   # what follows "pid (comm) ": state ppid ...
        [[ ${fields[1]:-} == "$1" ]] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
}

forward() {  # forward MODE PID: send USR1 to the training processes that handle it; true if any did
    local mode=$1 pid=$2 p ok=1 targets
    if [[ $mode == torchrun ]]; then
        targets=$(children "$pid")   # torchrun's children are the workers; torchrun does not handle USR1
    else
        targets=$pid                 # python itself, or srun (which passes it to every node)
    fi
    for p in $targets; do
        # srun takes signals with sigwait (no handler in SigCgt) and passes them to its tasks
        if { [[ $mode == srun ]] || catches_usr1 "$p"; } && kill -USR1 "$p" 2>/dev/null; then ok=0; fi
    done
    return $ok
}

run_child() {  # run_child MODE CMD...: run CMD, passing a USR1 to it (see forward); returns its exit code
    local mode=$1 child rc
    shift
    if [[ $mode == srun ]]; then
        "$@" &
    else
        # Started with USR1 ignored (inherited through exec and torchrun's Popen): a USR1 that
        # reaches torchrun (srun signals every process of a step) or a worker before it installs
        # its handler is then dropped instead of killing it; train() replaces SIG_IGN by its handler.
        ( trap '' USR1; exec "$@" ) &
    fi
    child=$!
    while :; do
        if (( got_signal && ! forwarded )) && kill -0 "$child" 2>/dev/null; then
            if forward "$mode" "$child"; then
                forwarded=1
                log "SIGUSR1 passed to the training processes${_SLURM_TRAIN_NODE:+ on node ${SLURM_NODEID:-?}}; waiting for them to save"
            else
                sleep 1   # still starting up (no handler yet): try again
                continue
            fi
        fi
        wait "$child"
        rc=$?
        kill -0 "$child" 2>/dev/null || break   # else wait was interrupted by USR1
    done
    return "$rc"
}

# ---- where: the repository and the training script ----
SCRIPT=${SCRIPT:-diffusion.py}
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [[ -z ${REPO:-} ]]; then  # SLURM runs a copy of this file, so $0 does not tell where the repo is
    REPO=${SLURM_SUBMIT_DIR:-$(dirname "$0")}
    [[ -f $REPO/diffusion.py ]] || REPO=$(dirname "$0")
fi
REPO=$(cd "$REPO" 2>/dev/null && pwd) || die "REPO=$REPO is not a directory"
[[ -f $REPO/diffusion.py ]] || die "no diffusion.py in $REPO: submit from the repository root (cd REPO && sbatch slurm_train.sh) or pass --export=ALL,REPO=/path/to/repo" 2
[[ $SCRIPT == diffusion.py || $SCRIPT == gpt.py ]] || die "SCRIPT=$SCRIPT: use diffusion.py or gpt.py" 2
cd "$REPO" || exit 1
export PYTHONUNBUFFERED=1
NNODES=${SLURM_NNODES:-1}
if [[ -z ${NPROC:-} ]]; then
    if [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} -gt 0 ]]; then
        NPROC=$SLURM_GPUS_ON_NODE
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
        NPROC=${#gpus[@]}
    else
        NPROC=1
    fi
fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC: expected a positive integer" 2

# ---- one node's share of a multi-node run (srun runs this file again with _SLURM_TRAIN_NODE=1) ----
if [[ -n ${_SLURM_TRAIN_NODE:-} ]]; then
    run_child torchrun "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$SLURM_NODEID" \
        --nproc_per_node="$NPROC" --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d \
        --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" "$SCRIPT" "$@"
    exit $?
fi

# ---- what: the settings, the matrix entry of an array task, and the resolved out_dir ----
# The training script's own parser resolves them (the same checks, defaults and out_dir names).
index=${MATRIX_INDEX:-${SLURM_ARRAY_TASK_ID:-}}
resolved=$("$PYTHON" - "$SCRIPT" "$index" "$(( NNODES * NPROC ))" "$@" <<'EOF'
import itertools, os, sys
sys.path.insert(0, os.getcwd())
try:
    import diffusion
except ImportError as e:
    sys.exit(f"error: {sys.executable} cannot import {e.name}: activate the project's environment before "
             "sbatch (sbatch passes it on), or set PYTHON=/path/to/env/bin/python")

def main():
    script, index, world, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    name = script[:-3]
    module = __import__(name)
    extra = []
    if index:
        if not hasattr(module, 'SCHEDULES'):
            raise diffusion.UserError(f"array mode trains a diffusion script's schedule x masking matrix; {script} "
                                      "has none (unset SCRIPT)", 2)
        matrix = list(itertools.product(module.SCHEDULES, module.MASKINGS))   # the script's own registries
        if not index.isdigit() or int(index) >= len(matrix):
            raise diffusion.UserError(f"array index {index} is outside the matrix: submit with "
                                      f"--array=0-{len(matrix) - 1}", 2)
        extra = ['--schedule=%s' % matrix[int(index)][0], '--masking=%s' % matrix[int(index)][1]]
    defaults = dict(getattr(module, 'DEFAULTS', None) or diffusion.settings_of(vars(module)))
    cfg = diffusion.configure(defaults, args + extra, rules=module.RULES, verbose=False)
    if cfg.gradient_accumulation_steps % world:  # train() checks it too, but only after startup
        raise diffusion.UserError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be "
                                  f"a multiple of the {world} processes (it counts the micro-batches of "
                                  "the global batch, over all processes)", 2)
    out_dir = cfg.out_dir or diffusion.default_out_dir(cfg, module.OBJECTIVE.name)
    if extra and cfg.out_dir:  # one --out_dir for the whole array: a folder per task inside it
        out_dir = os.path.join(out_dir, f"{cfg.schedule}-{cfg.masking}")
    print('\n'.join([out_dir] + extra))

diffusion.run_cli(main)
EOF
) || exit $?
mapfile -t lines <<< "$resolved"
out_dir=${lines[0]}
args=("$@" "${lines[@]:1}" "--out_dir=$out_dir" "--init_from=auto")
if [[ -n ${DRY_RUN:-} ]]; then  # show what would run, start nothing
    echo "out_dir=$out_dir"
    echo "command: $SCRIPT ${args[*]}"
    exit 0
fi
mkdir -p "$out_dir" || die "cannot create out_dir $out_dir"
log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $SCRIPT ${args[*]}, $NNODES node(s) x $NPROC process(es)"
joblog=
[[ -n ${SLURM_JOB_ID:-} ]] && joblog=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
echo "$(date '+%F %T') job=${SLURM_JOB_ID:-none} restart=${SLURM_RESTART_COUNT:-0} host=$(hostname) log=${joblog:-stdout}" \
    >> "$out_dir/slurm_jobs.txt"

status() {  # the status written by this run (status.json older than $marker is a previous run's)
    local f=$out_dir/status.json
    [[ -f $f && $f -nt $marker ]] || return 0
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' "$f" 2>/dev/null
}

requeue() {  # continue in a new job from out_dir/ckpt.pt
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        log "not running under SLURM: run the same command again to resume from $out_dir"
        exit "$EXIT_RESUMABLE"
    fi
    # said first: slurmctld may end this shell as soon as the requeue is accepted
    log "requeueing job $SLURM_JOB_ID; its next run resumes from $out_dir/ckpt.pt"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    # requeueing refused (e.g. submitted with --no-requeue): a new job with the main options of this one
    local opts=(--job-name="$SLURM_JOB_NAME" --nodes="$NNODES" --export="ALL,MATRIX_INDEX=$index")
    [[ -n ${SLURM_JOB_PARTITION:-} ]] && opts+=(--partition="$SLURM_JOB_PARTITION")
    [[ -n ${SLURM_JOB_ACCOUNT:-} ]] && opts+=(--account="$SLURM_JOB_ACCOUNT")
    [[ -n ${SLURM_GPUS_PER_NODE:-} ]] && opts+=(--gpus-per-node="$SLURM_GPUS_PER_NODE")
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    [[ -n $joblog ]] && opts+=(--output="$joblog")   # the chain goes on in this job's log (appending)
    local limit
    limit=$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null) && [[ -n $limit ]] && opts+=(--time="$limit")
    if sbatch "${opts[@]}" "$REPO/slurm_train.sh" "$@"; then
        log "scontrol requeue failed: submitted a new job (above) that resumes from $out_dir/ckpt.pt"
        exit 0
    fi
    die "could not requeue or resubmit; resume by hand: sbatch slurm_train.sh $*" "$EXIT_RESUMABLE"
}

marker=$(mktemp "${TMPDIR:-/tmp}/slurm_train.XXXXXX") || die "cannot create a temporary file"
trap 'rm -f "$marker"' EXIT
sleep 0.01   # status.json written from now on is strictly newer than the marker
(( got_signal )) && requeue "$@"   # the signal came before training started

# ---- run ----
if (( NNODES > 1 )) || [[ -n ${USE_SRUN:-} ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # env, not export: a resubmitted job (see requeue) must not inherit _SLURM_TRAIN_NODE
    run_child srun env MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="${MASTER_PORT:-29500}" NPROC="$NPROC" REPO="$REPO" \
        SCRIPT="$SCRIPT" PYTHON="$PYTHON" _SLURM_TRAIN_NODE=1 \
        srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$REPO/slurm_train.sh" "${args[@]}"
elif (( NPROC > 1 )); then
    run_child torchrun "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$SCRIPT" "${args[@]}"
else
    run_child python "$PYTHON" "$SCRIPT" "${args[@]}"
fi
rc=$?

st=$(status)
log "training exited with code $rc, status '${st:-none}'${st:+ (from status.json)}"
[[ $st == interrupted && $rc == 1 ]] && log "(torchrun reports its workers' exit code $EXIT_RESUMABLE, saved and resumable, as 1)"
if [[ $st == finished ]] || (( rc == 0 )); then   # rc 0: train() returned (max_iters reached)
    log "finished: $out_dir"
    exit 0
fi
if (( got_signal )) || [[ $st == interrupted ]]; then
    requeue "$@"
fi
log "training failed (no signal, no checkpoint-and-exit): not requeued"
exit "$rc"
