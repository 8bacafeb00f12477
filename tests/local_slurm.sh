#!/bin/bash
# A throwaway one-node SLURM cluster on this machine, for trying slurm_train.sh and for
# tests/test_slurm.py. Everything (munge key and socket, slurm.conf, state, spool, logs, pid
# files) lives under DIR, ports are nonstandard, so it never touches a system SLURM/munge.
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge
#
#   tests/local_slurm.sh start DIR   # start munged, slurmctld, slurmd; wait until the node is idle
#   export SLURM_CONF=DIR/slurm.conf  # then sbatch / squeue / scontrol talk to it
#   tests/local_slurm.sh stop DIR    # stop the three daemons (by their pid files)
#
# Environment: CTLD_PORT, SLURMD_PORT (default 16817, 16818), CPUS (default nproc), NODE (default hostname -s).
# Setup verified on Debian 12 / Slurm 22.05 (see ../shared/notes/slurm-on-one-machine.md).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [[ -z $cmd || -z $dir ]] || [[ $cmd != start && $cmd != stop ]]; then
    echo "usage: $0 start|stop DIR" >&2
    exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

stop_pidfile() {  # stop_pidfile FILE: TERM the daemon named in FILE, wait up to 10 s, then KILL
    local f=$1 pid
    [[ -f $f ]] || return 0
    pid=$(cat "$f")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

if [[ $cmd == stop ]]; then
    # cancel this cluster's jobs first: their processes (under slurmstepd) outlive slurmd
    export SLURM_CONF=$dir/slurm.conf PATH=$PATH:/usr/sbin
    if [[ -f $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        mapfile -t jobs < <(squeue -h -o %i 2>/dev/null || true)
        if (( ${#jobs[@]} )); then
            scancel "${jobs[@]}" 2>/dev/null || true
            for _ in $(seq 75); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
        fi
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munged.pid"
    exit 0
fi

for b in munged slurmctld slurmd sinfo; do
    command -v "$b" >/dev/null || [[ -x /usr/sbin/$b ]] || { echo "$b not found: apt-get install -y slurm-wlm munge" >&2; exit 3; }
done
[[ $(id -u) == 0 ]] || { echo "slurmd must run as root here" >&2; exit 3; }
export PATH=$PATH:/usr/sbin
node=${NODE:-$(hostname -s)}
cpus=${CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}   # nproc obeys OMP_NUM_THREADS
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
chmod 700 "$dir"

# munge: a private key and socket (munged refuses to run as root without --force)
[[ -f $dir/munge.key ]] || { head -c 1024 /dev/urandom > "$dir/munge.key"; chmod 600 "$dir/munge.key"; }
munged --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" --pid-file="$dir/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed"

cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
SlurmctldPort=${CTLD_PORT:-16817}
SlurmdPort=${SLURMD_PORT:-16818}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$node CPUs=$cpus RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf
slurmctld -c   # -c: start clean, whatever an earlier cluster left in DIR
slurmd
for _ in $(seq 150); do
    state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
    if [[ $state == idle ]]; then
        echo "local SLURM up: node $node ($cpus CPUs); export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "the node did not become idle within 30 s (state: ${state:-none}); see $dir/log/" >&2
exit 1
