#!/usr/bin/env bash
# N JAX processes on this machine, talking over 127.0.0.1 (gloo collectives on CPU devices):
# a multi-host pod simulated on one machine. Every process runs the same training command.
#
#   launch/cpu_multiprocess.sh N [train flags...]
#   launch/cpu_multiprocess.sh 2 --config=configs/tiny.py --workdir=/tmp/emo_mp
#
# Without train flags: configs/tiny.py into $WORKDIR (default /tmp/emo_cpu_mp).
# Environment:
#   DEVICES_PER_PROCESS  CPU devices each process simulates (default 4; N x this = the mesh)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   PYTHON               interpreter (default python)
#   LOG_DIR              if set, process i writes its output to $LOG_DIR/process_i.log;
#                        otherwise all processes write to this terminal (only process 0 logs
#                        metrics and progress)
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
# emo_jax.parallel.initialize_distributed reads. SIGTERM/SIGINT are forwarded to every process
# (they save a checkpoint and exit); the exit status is the first non-zero one, else 0.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: launch/cpu_multiprocess.sh N [train flags...]}
shift
PYTHON=${PYTHON:-python}
if [ $# -eq 0 ]; then
  set -- --config=configs/tiny.py --workdir="${WORKDIR:-/tmp/emo_cpu_mp}"
fi
if [ -z "${PORT:-}" ]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
launch() {  # launch PROCESS_ID [train flags...]
  local i=$1
  shift
  env JAX_PLATFORMS=cpu \
      XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}" \
      JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
      "$PYTHON" -m emo_jax.train "$@"
}
[ -n "${LOG_DIR:-}" ] && mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < N; i++)); do
  if [ -n "${LOG_DIR:-}" ]; then
    launch "$i" "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  else
    launch "$i" "$@" &
  fi
  pids+=($!)
done
forward() { kill -"$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break  # else: wait was interrupted by a forwarded signal
  done
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
done
exit "$status"
