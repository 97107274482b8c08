#!/usr/bin/env bash
# A private single-node SLURM for moaflow's integration test.
#
#   tests/workflow/slurm/local_cluster.sh check              exit 0 if this machine can run it, else say why (exit 1)
#   tests/workflow/slurm/local_cluster.sh install            install Debian's munge and slurm-wlm (CI / opt-in only)
#   tests/workflow/slurm/local_cluster.sh up   STATE_DIR     start munged, slurmctld and slurmd; print SLURM_CONF's value
#                                                   (put STATE_DIR/bin first on PATH for jobs' nested srun)
#   tests/workflow/slurm/local_cluster.sh down STATE_DIR     stop exactly the daemons that `up` started
#
# Everything lives in STATE_DIR: slurm.conf (clients find it through SLURM_CONF), the munge key, socket
# and seed, state, spool, logs and PID files. Nothing under /etc, /run or /var is read or written, the
# daemons listen on 127.0.0.1 on free ports, and `down` stops only the PIDs `up` recorded (checking that
# each still runs with this STATE_DIR). A SLURM or munge already running on the machine is left alone.
set -euo pipefail
action=${1:?usage: $0 check|install|up|down [STATE_DIR]}

need() {
  local missing=()
  for tool in munged slurmctld slurmd sbatch squeue scontrol sinfo; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "not installed: ${missing[*]} (Debian packages munge and slurm-wlm)"
    return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "needs root: slurmd starts jobs as their user"
    return 1
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

up() {
  local state=${1:?usage: $0 up STATE_DIR}
  state=$(cd "$state" && pwd)
  need >&2
  mkdir -p "$state"/{ctld,spool,log,munge,munge-key}
  chmod 0755 "$state"
  # munged runs as the munge user (it refuses root) with its key, socket and seed in our folder;
  # clients need to reach the socket's folder, only munged the key's.
  dd if=/dev/urandom of="$state/munge-key/munge.key" bs=1 count=1024 status=none
  chown -R munge:munge "$state/munge" "$state/munge-key"
  chmod 0755 "$state/munge" && chmod 0700 "$state/munge-key" && chmod 0400 "$state/munge-key/munge.key"
  runuser -u munge -- munged --key-file="$state/munge-key/munge.key" --socket="$state/munge/munge.socket" \
    --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
    --seed-file="$state/munge/munged.seed"
  cp "$state/munge/munged.pid" "$state/munged.pid"

  local host cpus memory ctld_port d_port
  host=$(hostname -s)
  cpus=$(nproc)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
  ctld_port=$(free_port)
  d_port=$(free_port)
  # MinJobAge=7200: completed jobs stay listed for the whole test (it reads their states from squeue; the
  # default 300 s forgot the first plates' jobs on a slow CI machine, and 0, documented as "never purge",
  # hid every finished job from squeue in slurm-wlm 22.05, so Snakemake waited for them forever).
  cat > "$state/slurm.conf" <<CONF
ClusterName=moaflowtest
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmctldPort=${ctld_port}
SlurmdPort=${d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${state}/munge/munge.socket
StateSaveLocation=${state}/ctld
SlurmdSpoolDir=${state}/spool
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
MinJobAge=7200
SchedulerType=sched/backfill
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=local Nodes=${host} Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$state/slurm.conf"
  # snakemake-executor-plugin-slurm-jobstep drops every SLURM_* variable, SLURM_CONF included, before
  # its nested srun inside a job: this srun, first on the test's PATH, puts our configuration back.
  mkdir -p "$state/bin"
  printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$SLURM_CONF" "$(command -v srun)" > "$state/bin/srun"
  chmod 0755 "$state/bin/srun"
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 1 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "^idle"; then
      echo "SLURM up: node ${host}, partition local, ${cpus} CPUs, ${memory} MB, ports ${ctld_port}/${d_port}" >&2
      echo "$SLURM_CONF"
      return
    fi
    scontrol update nodename="${host}" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "SLURM did not come up; logs in ${state}/log" >&2
  tail -n 20 "${state}"/log/*.log >&2 || true
  down "$state"
  exit 1
}

down() {
  local state=${1:?usage: $0 down STATE_DIR}
  state=$(cd "$state" && pwd)
  local pidfile pid
  for pidfile in "$state/slurmd.pid" "$state/slurmctld.pid" "$state/munged.pid"; do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    # Only a process of ours: it must still run with this folder on its command line (PIDs get reused).
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "$state"; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  echo "SLURM stopped (only the daemons started in $state)" >&2
}

case "$action" in
  check) need ;;
  install)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends munge slurm-wlm >/dev/null ;;
  up) up "${2:-}" ;;
  down) down "${2:-}" ;;
  *) echo "usage: $0 check|install|up|down [STATE_DIR]" >&2; exit 2 ;;
esac
