#!/usr/bin/env bash
# Stop the cluster started by start-local-slurm.sh (same SLURM_LAB): cancel its jobs, then stop its
# daemons by their PID files only (never by name, so other clusters on the machine are left alone).
set -uo pipefail

lab=${SLURM_LAB:-/tmp/slurmlab}
export SLURM_CONF=$lab/etc/slurm.conf

is_proc() { [ -n "$2" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ] &&
  [ "$(awk '{print $3}' "/proc/$2/stat" 2>/dev/null)" != Z ]; }   # a zombie counts as stopped
# daemon $1 with pid file $lab/run/${2:-$1}.pid
running() { is_proc "$1" "$(cat "$lab/run/${2:-$1}.pid" 2>/dev/null)"; }
halt() {
  local file="$lab/run/${2:-$1}.pid"
  if ! running "$1" "${2:-$1}"; then rm -f "$file"; return 0; fi
  local pid; pid=$(cat "$file"); kill -TERM "$pid"
  for _ in $(seq 100); do is_proc "$1" "$pid" || break; sleep 0.1; done
  is_proc "$1" "$pid" && kill -KILL "$pid"
  rm -f "$file"
  echo "stopped $1 ($pid)"
}

if running slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 60); do
      [ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi
for f in "$lab"/run/slurmd.*.pid; do   # one slurmd per node (slurmd.<node>.pid)
  [ -e "$f" ] && halt slurmd "$(basename "$f" .pid)"
done
halt slurmd   # a cluster started before per-node pid files
halt slurmctld
halt munged
# proctrack/cgroup leaves an empty cgroup tree behind
tree=/sys/fs/cgroup/freezer/slurm_$(hostname -s)
[ -d "$tree" ] && find "$tree" -depth -type d -exec rmdir {} + 2>/dev/null
exit 0
