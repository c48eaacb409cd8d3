#!/usr/bin/env bash
# The body both SLURM scripts run (launch/slurm_multinode.sbatch on GPUs, launch/slurm_cpu.sbatch on CPUs):
# one `accelerate launch` per node through srun, resumable, surviving preemption and requeue.
#   LAUNCH_CONFIG  accelerate config (multi-node DDP)      PROCS_PER_NODE  processes per node
#   CONFIG, OUT    experiment config and run directory      extra arguments: dotted.key=value overrides
set -euo pipefail
: "${LAUNCH_CONFIG:?}" "${PROCS_PER_NODE:?}" "${CONFIG:?}"
# a requeued job keeps its ID, so OUT names the same run and `--resume auto` continues it
export OUT=${OUT:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# the node's address as SLURM knows it (its hostname on most clusters; 127.0.0.1 on a one-host test cluster)
export MASTER_ADDR=$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
# a port from the job ID: two jobs sharing a node do not collide; a requeued job gets the same one
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export NNODES=$SLURM_NNODES PROCS_PER_NODE
# torchrun's agent forwards only these signals to its workers; SIGUSR1 (sbatch --signal) must be among them
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
# elastic rendezvous (c10d) across nodes: a fresh address every round, else a node that comes back hangs in
# torch 2.14's shared rendezvous store (docs/clusters.md)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
echo "mclfir sbatch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST," \
     "master $MASTER_ADDR:$MASTER_PORT, run $OUT"
# --kill-on-bad-exit: one failed node ends the step instead of leaving the others in a collective.
# `exec` in the task: the signal SLURM sends reaches accelerate's agent, not a shell that would die of it.
srun --kill-on-bad-exit=1 bash -c '
  exec .venv/bin/accelerate launch --config_file "$LAUNCH_CONFIG" \
    --num_machines "$NNODES" --num_processes $((NNODES * PROCS_PER_NODE)) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
    -m mclfir_dist.train --config "$CONFIG" --out "$OUT" --resume auto "$@"' _ "$@" &
step=$!
# The batch shell itself outlives a preemption signal: the run saves, then rank 0 asks for the requeue.
trap 'echo "mclfir sbatch: preemption signal: the run saves its state and stops"' TERM USR1
while :; do
  rc=0; wait "$step" || rc=$?
  kill -0 "$step" 2>/dev/null || break
done
exit "$rc"
