#!/usr/bin/env bash
# A real Slurm cluster of N nodes on this machine, for tests and trying the sbatch scripts:
# munged + slurmctld + N slurmd (`slurmd -N nK`, each on its own port), all state under DIR, stopped by PID.
#
#   slurm/local_cluster.sh start DIR [NODES] [CPUS_PER_NODE]    # prints: export SLURM_CONF=DIR/etc/slurm.conf
#   slurm/local_cluster.sh stop DIR
#
# Installs slurm-wlm and munge from Debian if missing (root). Node addresses are 127.0.0.1: the kit uses no
# address it did not make. Ports come from OPT_DS_SLURM_PORT_BASE (default 17000 + a hash of DIR).
set -euo pipefail
cmd=${1:?usage: local_cluster.sh start|stop DIR [NODES] [CPUS_PER_NODE]}
DIR=$(realpath -m "${2:?DIR}")
NODES=${3:-2}
CPUS=${4:-1}

stop() {
  for pidfile in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid "$DIR"/run/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "unknown command $cmd" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
stop  # a previous cluster in the same DIR
mkdir -p "$DIR"/{etc,run,log,state,spool,tmp,munge}
chmod 700 "$DIR/munge"
[ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$DIR/munge/munge.key"
MUNGE_SOCKET="$DIR/munge/munge.socket"
munged --force --key-file "$DIR/munge/munge.key" --socket "$MUNGE_SOCKET" --pid-file "$DIR/run/munged.pid" \
  --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge/munge.seed"

BASE=${OPT_DS_SLURM_PORT_BASE:-$((17000 + $(printf '%s' "$DIR" | cksum | cut -d' ' -f1) % 2000 * 10))}
CONF="$DIR/etc/slurm.conf"
{
  echo "ClusterName=optds"
  echo "SlurmctldHost=$(hostname)(127.0.0.1)"
  echo "SlurmctldPort=$BASE"
  echo "AuthType=auth/munge"
  echo "AuthInfo=socket=$MUNGE_SOCKET"
  echo "CredType=cred/munge"
  echo "SlurmUser=root"
  echo "SlurmdUser=root"
  echo "ProctrackType=proctrack/linuxproc"
  echo "TaskPlugin=task/none"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_CPU"
  echo "SchedulerType=sched/backfill"
  echo "MpiDefault=none"
  echo "ReturnToService=2"
  echo "JobRequeue=1"
  echo "KillWait=20"
  echo "MinJobAge=600"
  echo "StateSaveLocation=$DIR/state"
  echo "SlurmdSpoolDir=$DIR/spool/%n"
  echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
  echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
  echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
  echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
  echo "TmpFS=$DIR/tmp/%n"
  echo "JobCompType=jobcomp/none"
  echo "AccountingStorageType=accounting_storage/none"
  for i in $(seq "$NODES"); do
    echo "NodeName=n$i NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((BASE + i)) CPUs=$CPUS State=UNKNOWN"
  done
  echo "PartitionName=local Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
} > "$CONF"
export SLURM_CONF="$CONF"
for i in $(seq "$NODES"); do mkdir -p "$DIR/spool/n$i" "$DIR/tmp/n$i"; done

slurmctld -i -f "$CONF"
for i in $(seq "$NODES"); do slurmd -N "n$i" -f "$CONF"; done
for _ in $(seq 120); do
  idle=$(sinfo -h -N -o "%t" 2>/dev/null | grep -c '^idle' || true)
  [ "$idle" -eq "$NODES" ] && { echo "export SLURM_CONF=$CONF"; exit 0; }
  sleep 0.5
done
echo "local Slurm cluster did not come up; logs in $DIR/log" >&2
sinfo -N >&2 || true
exit 1
