#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing `srun --mpi=pmix lmd-train ...` (CI runs
# tests/distributed.rs's srun test against it). Needs root and Debian/Ubuntu's packages:
#   apt-get install --no-install-recommends slurmd slurmctld slurm-client munge
# Usage: export SLURM_CONF="$(scripts/slurm-local.sh)"   (prints its slurm.conf; idempotent:
# daemons already running are kept)
# Stop it with: scontrol shutdown; pkill munged
# State, spool and logs go under $LMD_SLURM_DIR (default /tmp/lmd-slurm). Not for production:
# one node, every core, root as SlurmUser, no cgroups (proctrack/linuxproc).
set -euo pipefail
dir="${LMD_SLURM_DIR:-/tmp/lmd-slurm}"
host="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(( $(awk '/MemTotal/ { print $2 }' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p "$dir/state" "$dir/spool"
cat >"$dir/slurm.conf" <<EOF
ClusterName=lmdlocal
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
export SLURM_CONF="$dir/slurm.conf"

# munge: Slurm's authentication (the package made /etc/munge/munge.key)
if ! munge -n >/dev/null 2>&1; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
# ready when the node takes a job (it registers within seconds)
for _ in $(seq 1 60); do
  if timeout 10 srun -n 1 --immediate=5 true >/dev/null 2>&1; then
    echo "slurm-local: node $host ($cpus CPUs) up; SLURM_CONF=$SLURM_CONF" >&2
    echo "$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "slurm-local: the node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
tail -5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
exit 1
