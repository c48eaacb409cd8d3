#!/usr/bin/env bash
# A SLURM cluster on this one machine, for the cluster tests: munged, slurmctld and two slurmd ("n1", "n2",
# both on localhost; Debian's slurm-wlm is built with multiple-slurmd support). Needs root and slurm-wlm
# (scripts/setup_cluster.sh installs it).
#   bash scripts/slurm_local.sh start DIR   writes DIR/slurm.conf, starts the daemons, waits for both nodes
#   bash scripts/slurm_local.sh stop DIR
# Use it with SLURM_CONF=DIR/slurm.conf in the environment of sbatch/squeue/scontrol.
set -euo pipefail
what=${1:?start or stop}
dir=$(realpath -m "${2:?a folder for the cluster state}")
export SLURM_CONF="$dir/slurm.conf"
cpus=$(nproc)

stop() {
  for f in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 1
}

if [ "$what" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "slurm_local.sh: needs root (slurmd runs jobs as their users)" >&2; exit 2; }
command -v slurmctld >/dev/null || { echo "slurm_local.sh: slurm-wlm is not installed: bash scripts/setup_cluster.sh" >&2; exit 2; }
stop
mkdir -p "$dir/state" "$dir/spool" "$dir/munge" "$dir/logs"
rm -f "$dir/state"/* 2>/dev/null || true   # a fresh controller: no jobs from an earlier cluster
cat > "$SLURM_CONF" <<CONF
ClusterName=mclfir-local
SlurmctldHost=localhost
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/logs/slurmctld.log
SlurmdLogFile=$dir/logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=600
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=${SLURMD_PORT:-6821} CPUs=$cpus RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(( ${SLURMD_PORT:-6821} + 1 )) CPUs=$cpus RealMemory=2000 State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
key=/etc/munge/munge.key
[ -f "$key" ] || { mkdir -p /etc/munge; dd if=/dev/urandom of="$key" bs=1k count=1 2>/dev/null; chmod 400 "$key"; }
# munged on its default socket: every SLURM daemon and client looks there
mkdir -p /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then   # reuse a munged that already answers
  munged --force --pid-file="$dir/munged.pid" --log-file="$dir/logs/munged.log" --seed-file="$dir/munge/seed" \
    --key-file="$key"
fi
for d in slurmctld slurmd; do
  if pgrep -r R,S,D -x "$d" >/dev/null; then   # zombies of a stopped cluster do not count
    echo "slurm_local.sh: a $d is already running (pid $(pgrep -r R,S,D -x "$d" | tr '\n' ' ')): stop that cluster first" >&2
    exit 2
  fi
done
slurmctld -i
for n in n1 n2; do slurmd -N "$n"; done
for _ in $(seq 1 60); do
  idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle' || true)
  [ "$idle" -ge 2 ] && { sinfo -N; exit 0; }
  sleep 1
done
echo "slurm_local.sh: the nodes did not come up; see $dir/logs" >&2
sinfo -N >&2 || true
exit 1
