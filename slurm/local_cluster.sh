#!/usr/bin/env bash
# A real Slurm cluster of N nodes on this machine, for tests and trying the sbatch scripts:
# munged + slurmctld + N slurmd, all state under DIR, everything stopped by PID.
#
#   slurm/local_cluster.sh start DIR [NODES] [CPUS_PER_NODE]    # prints: export SLURM_CONF=DIR/etc/slurm.conf
#   slurm/local_cluster.sh stop DIR
#
# Node models (OPT_DS_SLURM_NODES=auto|netns|ports; auto takes netns when the kernel allows it):
#   netns: each node is a network namespace with its own hostname (nK, via unshare --uts) and address on a
#          bridge the kit creates (10.213.X.0/24, X from a hash of DIR); slurmd runs inside it (nsenter).
#   ports: `slurmd -N nK` side by side on this host, each on its own port, all at 127.0.0.1.
# Installs slurm-wlm and munge from Debian if missing (root). The kit uses no address it did not make.
# Ports come from OPT_DS_SLURM_PORT_BASE (default 17000 + a hash of DIR).
set -euo pipefail
cmd=${1:?usage: local_cluster.sh start|stop DIR [NODES] [CPUS_PER_NODE]}
DIR=$(realpath -m "${2:?DIR}")
NODES=${3:-2}
CPUS=${4:-1}

ID=$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)
SUBNET="10.213.$((ID % 200 + 20))"
TAG=$(printf '%04x' $((ID % 65536)))
BRIDGE="odsbr$TAG"

netns_up() {
  ip link add "$BRIDGE" type bridge && ip addr add "$SUBNET.1/24" dev "$BRIDGE" && ip link set "$BRIDGE" up || return 1
  for i in $(seq "$NODES"); do
    ns="ods${TAG}n$i"
    ip netns add "$ns" || return 1
    echo "$ns" >> "$DIR/run/netns.list"
    ip link add "ods${TAG}v$i" type veth peer name eth0 netns "$ns" || return 1
    ip link set "ods${TAG}v$i" master "$BRIDGE" up
    ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$SUBNET.1"
  done
}

netns_down() {
  if [ -f "$DIR/run/netns.list" ]; then
    while read -r ns; do ip netns del "$ns" 2>/dev/null || true; done < "$DIR/run/netns.list"
    rm -f "$DIR/run/netns.list"
  fi
  ip link del "$BRIDGE" 2>/dev/null || true
}

stop() {
  for pidfile in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid "$DIR"/run/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  netns_down
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

BASE=${OPT_DS_SLURM_PORT_BASE:-$((17000 + ID % 2000 * 10))}
CONF="$DIR/etc/slurm.conf"
MODEL=${OPT_DS_SLURM_NODES:-auto}
if [ "$MODEL" != ports ]; then
  if netns_up; then MODEL=netns
  elif [ "$MODEL" = netns ]; then echo "cannot create network namespaces here" >&2; netns_down; exit 1
  else netns_down; MODEL=ports
  fi
fi
CTL_ADDR=127.0.0.1
[ "$MODEL" = netns ] && CTL_ADDR="$SUBNET.1"
echo "$MODEL" > "$DIR/run/node_model"
{
  echo "ClusterName=optds"
  echo "SlurmctldHost=$(hostname)($CTL_ADDR)"
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
    if [ "$MODEL" = netns ]; then
      echo "NodeName=n$i NodeHostname=n$i NodeAddr=$SUBNET.$((10 + i)) Port=$((BASE + i)) CPUs=$CPUS State=UNKNOWN"
    else
      echo "NodeName=n$i NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$((BASE + i)) CPUs=$CPUS State=UNKNOWN"
    fi
  done
  echo "PartitionName=local Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
} > "$CONF"
export SLURM_CONF="$CONF"
for i in $(seq "$NODES"); do mkdir -p "$DIR/spool/n$i" "$DIR/tmp/n$i"; done

slurmctld -i -f "$CONF"
for i in $(seq "$NODES"); do
  if [ "$MODEL" = netns ]; then  # own network namespace and own hostname (not `ip netns exec`: it remounts /sys)
    nsenter --net="/run/netns/ods${TAG}n$i" unshare --uts sh -c "hostname n$i && exec slurmd -N n$i -f '$CONF'"
  else
    slurmd -N "n$i" -f "$CONF"
  fi
done
for _ in $(seq 120); do
  idle=$(sinfo -h -N -o "%t" 2>/dev/null | grep -c '^idle' || true)
  [ "$idle" -eq "$NODES" ] && { echo "export SLURM_CONF=$CONF  # $NODES nodes, model $MODEL"; exit 0; }
  sleep 0.5
done
echo "local Slurm cluster did not come up; logs in $DIR/log" >&2
sinfo -N >&2 || true
exit 1
