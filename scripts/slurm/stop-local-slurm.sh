#!/usr/bin/env bash
# Stop the cluster started by start-local-slurm.sh (same SLURM_LAB): cancel its jobs, then stop its
# daemons by their PID files only (never by name, so other clusters on the machine are left alone).
set -uo pipefail

lab=${SLURM_LAB:-/tmp/slurmlab}
export SLURM_CONF=$lab/etc/slurm.conf

is_proc() { [ -n "$2" ] && [ "$(cat "/proc/$2/comm" 2>/dev/null)" = "$1" ] &&
  [ "$(awk '{print $3}' "/proc/$2/stat" 2>/dev/null)" != Z ]; }   # a zombie counts as stopped
running() { is_proc "$1" "$(cat "$lab/run/$1.pid" 2>/dev/null)"; }
halt() {
  if ! running "$1"; then rm -f "$lab/run/$1.pid"; return 0; fi
  local pid; pid=$(cat "$lab/run/$1.pid"); kill -TERM "$pid"
  for _ in $(seq 100); do is_proc "$1" "$pid" || break; sleep 0.1; done
  is_proc "$1" "$pid" && kill -KILL "$pid"
  rm -f "$lab/run/$1.pid"
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
halt slurmd
halt slurmctld
halt munged
# proctrack/cgroup leaves an empty cgroup tree behind
tree=/sys/fs/cgroup/freezer/slurm_$(hostname -s)
[ -d "$tree" ] && find "$tree" -depth -type d -exec rmdir {} + 2>/dev/null
exit 0
