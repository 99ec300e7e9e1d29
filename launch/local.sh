#!/usr/bin/env bash
# Starts N training processes on this machine, joined through a local JAX
# coordinator, as a multi-host run would be (CPU collectives through gloo).
# Each process gets its own fake CPU devices, so N processes x D devices
# behave like N hosts with D accelerators each: the tests use it to check
# that 2 processes x 2 devices train exactly like 1 process x 4 devices.
#
# Usage:
#   launch/local.sh N [-- ] <uccl_jax.main flags>
#   DEVICES_PER_PROCESS=2 launch/local.sh 2 -- --config=configs/synthetic.py --workdir=runs/mp
# Environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 1)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   PYTHON               interpreter (default: python)
# Each process sees UCCL_LOCAL_PROCESS_COUNT=N, so data.workers=-1 gives it its share of the CPUs.
# Exit status: 0 if every process succeeded, else the first non-zero status.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N [--] <uccl_jax.main flags>" >&2
  exit 2
fi
num_processes=$1
shift
if [[ "${1:-}" == "--" ]]; then
  shift
fi

python_bin=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-1}
port=${PORT:-$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')}

pids=()
live=()
cleanup() {
  for pid in "${live[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
# Preemption of the launcher (SIGTERM) is passed on: each process saves and exits 0.
forward_term() {
  for pid in "${live[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap forward_term TERM
trap cleanup INT

for ((rank = 0; rank < num_processes; rank++)); do
  JAX_PLATFORMS=cpu UCCL_LOCAL_PROCESS_COUNT="${num_processes}" \
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS_EXTRA:-}" \
    "$python_bin" -m uccl_jax.main "$@" \
      --coordinator_address="127.0.0.1:${port}" \
      --num_processes="${num_processes}" \
      --process_id="${rank}" &
  pids+=($!)
done
live=("${pids[@]}")

status=0
while ((${#live[@]} > 0)); do
  code=0
  finished=''
  # Whichever process ends first; one that failed leaves the others waiting on
  # collectives, so they are stopped.
  wait -n -p finished "${live[@]}" || code=$?
  if [[ -z "${finished:-}" ]]; then
    continue  # interrupted by a trapped signal, no process ended
  fi
  remaining=()
  for pid in "${live[@]}"; do
    [[ "$pid" != "$finished" ]] && remaining+=("$pid")
  done
  live=("${remaining[@]}")
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    cleanup
  fi
done
exit "$status"
