#!/usr/bin/env bash
# Run a lag_jax job as N JAX processes on this machine (what a multi-host run does,
# for trying it out and for tests). Each process runs the same command with the
# coordinator in its environment; process 0 writes the outputs.
#   launch/local_multiprocess.sh 2 configs/generate.py:tiny_lag --config.mesh.adapter=-1 \
#       --workdir=/tmp/lag_mp
# On CPU, simulate devices per process (here 2 processes x 4 = 8 global devices):
#   DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh 2 configs/generate.py:tiny_lag \
#       --config.mesh.adapter=-1 --workdir=/tmp/lag_mp
# Process i runs exactly:
#   JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \
#       python -m lag_jax.run --config=CONFIG [FLAGS...]
# Process 0 prints to this terminal, the others to LOG_DIR/process_<i>.log (default a
# fresh temp folder). PYTHON picks the interpreter, PORT the coordinator's port. If one
# process fails, the others get GRACE seconds (default 30) to end on their own (they
# usually fail the same way, and their logs should say so) before they are stopped; the
# exit status is the first failure's.
set -euo pipefail
usage="usage: launch/local_multiprocess.sh NUM_PROCESSES CONFIG[:ARG] [FLAGS...]"
num="${1:?${usage}}"
config="${2:?${usage}}"
shift 2
if ! [[ "${num}" =~ ^[1-9][0-9]*$ ]]; then
  echo "${usage}" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
python="${PYTHON:-python}"
port="${PORT:-$("${python}" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}"
log_dir="${LOG_DIR:-$(mktemp -d -t lag_jax_mp.XXXXXX)}"
mkdir -p "${log_dir}"
if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
fi
export JAX_COORDINATOR_ADDRESS="localhost:${port}" JAX_NUM_PROCESSES="${num}"

pids=()
# shellcheck disable=SC2317  # called by the trap
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "${pid}" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

for ((i = 0; i < num; i++)); do
  if ((i == 0)); then
    JAX_PROCESS_ID=0 "${python}" -m lag_jax.run --config="${config}" "$@" &
  else
    JAX_PROCESS_ID="${i}" "${python}" -m lag_jax.run --config="${config}" "$@" \
      >"${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "${num} processes, coordinator localhost:${port}, logs of 1..$((num - 1)) in ${log_dir}" >&2

# Wait for the processes in the order they end; the first failure stops the rest.
status=0
remaining=${#pids[@]}
while ((remaining > 0)); do
  if wait -n; then
    remaining=$((remaining - 1))
  else
    status=$?
    echo "a process failed (exit ${status}); stopping the others" >&2
    # The others may still be starting up (a bad flag fails in every process, process 0
    # first): let them finish writing their logs before they are stopped.
    for ((t = 0; t < ${GRACE:-30}; t++)); do
      alive=0
      for pid in "${pids[@]}"; do
        if kill -0 "${pid}" 2>/dev/null; then alive=1; fi
      done
      ((alive)) || break
      sleep 1
    done
    cleanup
    wait || true
    for ((i = 1; i < num; i++)); do
      echo "--- process ${i} (tail of ${log_dir}/process_${i}.log) ---" >&2
      tail -n 30 "${log_dir}/process_${i}.log" >&2 || true
    done
    break
  fi
done
exit "${status}"
