#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (Debian/Ubuntu packages, no systemd needed), for the
# Slurm tests and for trying `launcher=slurm` on a laptop or CI runner. Idempotent; must run as root.
#
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
#   scripts/slurm/start-local-slurm.sh [--clean] && source "${SLURM_LAB:-/tmp/slurmlab}/slurm.env"
#   ...; scripts/slurm/stop-local-slurm.sh
#
# Settings (environment):
#   SLURM_LAB=/tmp/slurmlab        state, spool, logs, munge key/socket, slurm.conf, slurm.env
#   SLURM_LAB_CPUS=$(nproc)        CPUs the node advertises (may exceed the real count)
#   SLURM_LAB_CTLD_PORT=6817 SLURM_LAB_SLURMD_PORT=6818
#   SLURM_LAB_CRED_EXPIRE=10       also how long a requeued job waits before it may start again
#   SLURM_LAB_FIRST_JOB_ID=1       first job id (distinct ranges keep two clusters' jobs apart)
#   SLURM_LAB_PROCTRACK=auto       proctrack/cgroup when the cgroup v1 freezer is writable, else pgid
#   SLURM_LAB_FAKE_GPUS=0          N > 0 advertises gpu:N backed by /dev/tty1..N (sets CUDA_VISIBLE_DEVICES only)
#   SLURM_LAB_NODES=1              N > 1 runs N slurmd daemons on this host as nodes <host>1..<host>N (each with
#                                  SLURM_LAB_CPUS CPUs and its own port): multi-node jobs on one machine
set -euo pipefail

lab=${SLURM_LAB:-/tmp/slurmlab}
cpus=${SLURM_LAB_CPUS:-$(nproc)}
gpus=${SLURM_LAB_FAKE_GPUS:-0}
host=$(hostname -s)
nodes=${SLURM_LAB_NODES:-1}
names=("$host")
if [ "$nodes" -gt 1 ]; then names=(); for i in $(seq "$nodes"); do names+=("$host$i"); done; fi
conf=$lab/etc/slurm.conf
key=$lab/munge/munge.key
sock=$lab/munge/munge.socket
export SLURM_CONF=$conf

fail() { echo "start-local-slurm: $*" >&2; exit 1; }
# is PID $2 a live (non-zombie) process named $1?
is_proc() { [ -n "$2" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ] &&
  [ "$(awk '{print $3}' "/proc/$2/stat" 2>/dev/null)" != Z ]; }
# daemon $1 with pid file $lab/run/${2:-$1}.pid
running() { is_proc "$1" "$(cat "$lab/run/${2:-$1}.pid" 2>/dev/null)"; }
halt() {
  running "$1" "${2:-$1}" || return 0
  local pid; pid=$(cat "$lab/run/${2:-$1}.pid"); kill -TERM "$pid"
  for _ in $(seq 100); do is_proc "$1" "$pid" || return 0; sleep 0.1; done
  kill -KILL "$pid"
}
any_slurmd() { for n in "${names[@]}"; do running slurmd "slurmd.$n" && return 0; done; return 1; }

[ "$(id -u)" = 0 ] || fail "must run as root"
for exe in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch; do
  [ -x "$exe" ] || fail "$exe missing: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
done
if [ "${1:-}" = --clean ]; then
  if running slurmctld || any_slurmd; then fail "--clean: stop the cluster first"; fi
  rm -rf "$lab/state" "$lab/spool" "$lab/log"
fi
mkdir -p "$lab"/{etc,state,spool,log,run,munge}
for n in "${names[@]}"; do mkdir -p "$lab/spool/$n"; done
chmod 755 "$lab" "$lab/munge"   # munged insists that every user can traverse its socket directory

# munge with a private key, socket and pid file (the packaged /etc/munge and /run/munge are not used)
if [ ! -s "$key" ]; then
  dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
  chmod 400 "$key"
fi
if ! running munged; then
  rm -f "$sock" "$sock.lock"
  /usr/sbin/munged --key-file="$key" --socket="$sock" --pid-file="$lab/run/munged.pid" \
    --log-file="$lab/log/munged.log" --seed-file="$lab/munge/munged.seed"
fi
for _ in $(seq 50); do
  munge -S "$sock" -n 2>/dev/null | unmunge -S "$sock" >/dev/null 2>&1 && break
  sleep 0.1
done
munge -S "$sock" -n | unmunge -S "$sock" >/dev/null || fail "munge does not answer (see $lab/log/munged.log)"

# process tracking: the cgroup v1 freezer reaps every process of a job, pgid only its process groups
proctrack=${SLURM_LAB_PROCTRACK:-auto}
if [ "$proctrack" = auto ]; then
  proctrack=proctrack/pgid
  if grep -qs ' /sys/fs/cgroup/freezer cgroup ' /proc/mounts &&
     mkdir -p /sys/fs/cgroup/freezer/slurm_probe 2>/dev/null && rmdir /sys/fs/cgroup/freezer/slurm_probe; then
    proctrack=proctrack/cgroup
  fi
fi
cat > "$lab/etc/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF

gres=""
: > "$lab/etc/gres.conf"
if [ "$gpus" -gt 0 ]; then
  gres=" Gres=gpu:$gpus"
  for n in "${names[@]}"; do
    printf 'AutoDetect=off\nNodeName=%s Name=gpu File=/dev/tty[1-%s]\n' "$n" "$gpus" >> "$lab/etc/gres.conf"
  done
fi
mem_mb=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 * 9 / 10 / nodes ))
port=${SLURM_LAB_SLURMD_PORT:-6818}
node_lines=""
for i in "${!names[@]}"; do   # one node: the port is SlurmdPort; several: each its own
  extra=""; [ "$nodes" -gt 1 ] && extra=" Port=$((port + i))"
  node_lines+="NodeName=${names[$i]} NodeAddr=127.0.0.1 NodeHostname=$host$extra CPUs=$cpus RealMemory=$mem_mb$gres State=UNKNOWN"$'\n'
done

# DefMemPerCPU: without it CR_Core_Memory gives each job the whole node's memory (one job at a time).
# cred_expire and the short scheduler intervals make a requeued job start again within ~15 s.
cat > "$conf.new" <<EOF
ClusterName=alignrl-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=${SLURM_LAB_CTLD_PORT:-6817}
SlurmdPort=$port
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket=$sock,cred_expire=${SLURM_LAB_CRED_EXPIRE:-10}
StateSaveLocation=$lab/state
SlurmdSpoolDir=$lab/spool/%n
SlurmctldPidFile=$lab/run/slurmctld.pid
SlurmdPidFile=$lab/run/slurmd.%n.pid
SlurmctldLogFile=$lab/log/slurmctld.log
SlurmdLogFile=$lab/log/slurmd.%n.log
MailProg=/bin/true
FirstJobId=${SLURM_LAB_FIRST_JOB_ID:-1}
ProctrackType=$proctrack
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( mem_mb / cpus ))
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2,kill_invalid_depend
MpiDefault=none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=10
GresTypes=gpu
${node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
cmp -s "$conf.new" "$conf" || changed=1
mv "$conf.new" "$conf"
echo "export SLURM_CONF=$conf" > "$lab/slurm.env"

# node and partition changes need a daemon restart, not `scontrol reconfigure`
if [ "$changed" = 1 ]; then for n in "${names[@]}"; do halt slurmd "slurmd.$n"; done; halt slurmctld; fi
running slurmctld || /usr/sbin/slurmctld -f "$conf"
for n in "${names[@]}"; do running slurmd "slurmd.$n" || /usr/sbin/slurmd -f "$conf" -N "$n"; done

state=""
for _ in $(seq 120); do   # up to 30 s for the nodes to accept jobs
  up=0
  for n in "${names[@]}"; do
    state=$(sinfo -h -n "$n" -o %t 2>/dev/null || true)
    case "$state" in
      idle|mix|alloc|comp) up=$((up + 1)) ;;
      drain|down|drng) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
    esac
  done
  if [ "$up" = "${#names[@]}" ]; then sinfo; echo "slurm is up; now: source $lab/slurm.env"; exit 0; fi
  sleep 0.25
done
tail -n 20 "$lab/log/slurmctld.log" "$lab"/log/slurmd.*.log >&2
fail "nodes ${names[*]} did not all come up (last state '$state')"
