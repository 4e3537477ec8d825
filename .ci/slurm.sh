#!/usr/bin/env bash
# A real one-node SLURM cluster with accounting (munge, mariadb, slurmdbd, slurmctld, slurmd) on this
# machine, for CI and the slurm tests. Debian 12, as root, no systemd:
#   bash .ci/slurm.sh start     install what is missing (apt-get), configure, start, wait for `idle`
#   bash .ci/slurm.sh status    exit 0 when the node is idle/allocated and sacct answers
#   bash .ci/slurm.sh stop      stop the daemons by the PIDs in their pidfiles (newest first)
# Idempotent: start on a running cluster only checks it (~0.1 s); once installed, start takes ~3 s.
set -euo pipefail

CLUSTER=builder                          # ClusterName, also the accounting cluster
DB_PASSWORD=builder-ci                   # the slurm DB user's password (a local, throwaway database)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
ETC=/etc/slurm
LOGS=/var/log/slurm
# daemon -> pidfile, in start order; stop walks it backwards
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
declare -A PIDFILE=([munged]=/run/munge/munged.pid [mariadbd]=/run/mysqld/mysqld.pid
                    [slurmdbd]=/run/slurmdbd.pid [slurmctld]=/run/slurmctld.pid [slurmd]=/run/slurmd.pid)

say() { echo "slurm.sh: $*" >&2; }

running() {  # running DAEMON: its pidfile names a live process
  local file=${PIDFILE[$1]}
  [ -s "$file" ] && kill -0 "$(cat "$file")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll every 0.2 s until COMMAND succeeds
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "$what did not come up within ${seconds} s; logs in $LOGS and /var/log/mysql*"
      tail -n 20 "$LOGS"/*.log 2>/dev/null >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

install() {  # only the packages that are missing
  local missing=()
  for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq -o DPkg::Lock::Timeout=600
  apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends "${missing[@]}" >/dev/null
}

resolve_hostname() {  # slurmctld and slurmd look the node up by name
  local host; host=$(hostname -s)
  getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >>/etc/hosts
}

configure() {  # slurm.conf and slurmdbd.conf for this node (rewritten each start: the node may change)
  local host; host=$(hostname -s)
  mkdir -p "$ETC" "$LOGS" /var/spool/slurmctld /var/spool/slurmd
  chown slurm:slurm "$LOGS" /var/spool/slurmctld
  cat >"$ETC/slurm.conf.new" <<EOF
# Written by .ci/slurm.sh: one node, accounting through slurmdbd, no cgroups (none in CI containers).
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$host
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
KillWait=5
MinJobAge=300
$(slurmd -C | head -n 1)
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
  cat >"$ETC/slurmdbd.conf" <<EOF
# Written by .ci/slurm.sh: accounting in the local mariadb.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=${PIDFILE[slurmdbd]}
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
  chown slurm:slurm "$ETC/slurmdbd.conf"
  chmod 600 "$ETC/slurmdbd.conf"  # slurmdbd refuses a config others can read
}

healthy() {  # the node takes jobs and accounting answers
  sinfo -h -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)' && sacct -n -X -S now >/dev/null 2>&1
}

start() {
  local began=$SECONDS
  if running slurmctld && running slurmd && running slurmdbd && healthy; then
    say "already running"; return
  fi
  install
  resolve_hostname
  configure
  if ! running munged; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged </dev/null >>"$LOGS/munged.out" 2>&1
  fi
  if ! running mariadbd; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
    mariadbd --user=mysql --pid-file="${PIDFILE[mariadbd]}" </dev/null >>"$LOGS/mariadbd.log" 2>&1 &
    wait_for 60 mariadb mysqladmin ping
  fi
  mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  running slurmdbd || slurmdbd </dev/null >>"$LOGS/daemons.out" 2>&1
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  running slurmctld || slurmctld -i </dev/null >>"$LOGS/daemons.out" 2>&1
  running slurmd || slurmd </dev/null >>"$LOGS/daemons.out" 2>&1
  wait_for 60 "the node" healthy
  say "cluster $CLUSTER up in $((SECONDS - began)) s: $(sinfo -h -o '%N %c CPUs %m MB %t')"
}

stop() {
  local index daemon file pid
  for ((index = ${#DAEMONS[@]} - 1; index >= 0; index--)); do
    daemon=${DAEMONS[index]}; file=${PIDFILE[$daemon]}
    running "$daemon" || continue
    pid=$(cat "$file")
    kill "$pid"
    wait_for 30 "stop of $daemon" bash -c "! kill -0 $pid 2>/dev/null" || kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
  done
  say "stopped"
}

status() {
  local daemon
  for daemon in "${DAEMONS[@]}"; do
    if running "$daemon"; then echo "$daemon: running (pid $(cat "${PIDFILE[$daemon]}"))"; else echo "$daemon: stopped"; fi
  done
  if running slurmctld && healthy; then sinfo -h -o "node %N: %t, %c CPUs, %m MB"; echo "accounting: sacct answers"; return 0; fi
  echo "cluster: not ready"; return 1
}

if [ "$(id -u)" != 0 ] && [ "${1:-}" != status ]; then say "run as root (it installs packages and starts daemons)"; exit 2; fi
case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: bash .ci/slurm.sh start|stop|status" >&2; exit 2 ;;
esac
