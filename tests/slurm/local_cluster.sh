#!/usr/bin/env bash
# A real single-node SLURM on this machine, for moaflow's integration test.
#
#   tests/slurm/local_cluster.sh up   [STATE_DIR]   install (Debian: munge, slurm-wlm) and start
#   tests/slurm/local_cluster.sh down [STATE_DIR]   stop the daemons
#
# Daemons (munged, slurmctld, slurmd) run in the background without systemd and
# listen on 127.0.0.1 only. No accounting database: status comes from squeue,
# so jobs are kept visible for MinJobAge seconds. Needs root (as on CI).
set -euo pipefail
action=${1:?usage: $0 up|down [STATE_DIR]}
state=${2:-/tmp/moaflow-slurm}
conf=/etc/slurm/slurm.conf

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  echo "installing munge and slurm-wlm from Debian ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends munge slurm-wlm >/dev/null
}

up() {
  install
  mkdir -p "$state"/{ctld,d,log} /run/munge /etc/slurm /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
  fi
  host=$(hostname -s)
  cpus=$(nproc)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
  cat > "$conf" <<CONF
ClusterName=moaflow
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=${state}/ctld
SlurmdSpoolDir=${state}/d
SlurmctldPidFile=${state}/slurmctld.pid
SlurmdPidFile=${state}/slurmd.pid
SlurmctldLogFile=${state}/log/slurmctld.log
SlurmdLogFile=${state}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
SchedulerType=sched/backfill
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=local Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
  pgrep -x slurmctld >/dev/null || slurmctld -c
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 1 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "^idle"; then
      echo "SLURM up: node ${host}, partition local, ${cpus} CPUs, ${memory} MB" >&2
      return
    fi
    scontrol update nodename="${host}" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "SLURM did not come up; logs in ${state}/log" >&2
  tail -n 20 "${state}"/log/*.log >&2 || true
  exit 1
}

down() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  echo "SLURM stopped" >&2
}

case "$action" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down [STATE_DIR]" >&2; exit 2 ;;
esac
