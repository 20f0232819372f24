#!/usr/bin/env bash
# Reproduces the figures in docs/performance.md.
#
#   scripts/bench.sh [single|batch|memory|overload|tracing|shutdown|all]
#
# The server is pinned to one core and the load generator (or wrk) to the
# other; stdout goes to /dev/null; release build; default config unless a
# figure says otherwise. Each comparison is interleaved RUNS times and the
# medians are printed. Needs: wrk, curl, python3, taskset (util-linux).
# Knobs (environment): RUNS (3), DURATION (10 s), SERVER_CPU (1), LOAD_CPU (0),
# SOAK (600 s, the memory soak), OUT (target/bench, raw outputs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS="${RUNS:-3}"
DURATION="${DURATION:-10}"
SERVER_CPU="${SERVER_CPU:-1}"
LOAD_CPU="${LOAD_CPU:-0}"
SOAK="${SOAK:-600}"
OUT="${OUT:-target/bench}"
BIN=target/release
mkdir -p "$OUT"

for tool in wrk curl python3 taskset; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is required (apt-get install -y wrk curl)" >&2; exit 1; }
done
cargo build --release --quiet --bins --examples

SERVER_PID=""
PORT=""
cleanup() { if [[ -n "$SERVER_PID" ]]; then kill -KILL "$SERVER_PID" 2>/dev/null || true; fi; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_up() {
  for _ in $(seq 200); do
    if curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 || curl -s -o /dev/null "http://127.0.0.1:$PORT/" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "bench: server on port $PORT did not come up" >&2
  exit 1
}

# start_server NAME [ENV=VALUE ...]: NAME is `ceiling` or `eventflow`.
start_server() {
  local name="$1"
  shift
  PORT="$(free_port)"
  if [[ "$name" == ceiling ]]; then
    taskset -c "$SERVER_CPU" "$BIN/examples/ceiling" "127.0.0.1:$PORT" >/dev/null 2>>"$OUT/server.log" &
  else
    env EVENTFLOW__SERVER__ADDR="127.0.0.1:$PORT" EVENTFLOW__TELEMETRY__LOG_LEVEL=warn "$@" \
      taskset -c "$SERVER_CPU" "$BIN/eventflow" >/dev/null 2>>"$OUT/server.log" &
  fi
  SERVER_PID=$!
  wait_up
}

stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# wrk_run LABEL: closed loop, 1 thread, 64 connections; prints "rps p99_ms".
wrk_run() {
  local label="$1" file
  file="$OUT/wrk-$label.txt"
  taskset -c "$LOAD_CPU" wrk -t1 -c64 -d"${DURATION}s" --latency -s scripts/wrk-events.lua \
    "http://127.0.0.1:$PORT" -- "$label-$RANDOM$RANDOM" 100 >"$file"
  python3 - "$file" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
m = re.search(r"99%\s+([\d.]+)(us|ms|s)", text)
p99 = ms(*m.groups()) if m else float("nan")
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
print(f"{rps:.0f} {p99:.3f} {non2xx.group(1) if non2xx else 0}")
PY
}

loadgen() { taskset -c "$LOAD_CPU" "$BIN/eventflow-loadgen" --url "http://127.0.0.1:$PORT" --no-progress "$@"; }

median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

machine() {
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r); $(date -u +%F)"
}

bench_single() {
  echo "== 1. single-event ingest: eventflow (full pipeline) vs the ceiling, wrk -t1 -c64, ${DURATION}s x $RUNS"
  local ceil=() flow=() ceil_p99=() flow_p99=() line
  for run in $(seq "$RUNS"); do
    start_server ceiling
    read -r rps p99 _ <<<"$(wrk_run "ceiling-$run")"
    stop_server
    ceil+=("$rps"); ceil_p99+=("$p99")
    start_server eventflow
    read -r rps p99 non2xx <<<"$(wrk_run "eventflow-$run")"
    stop_server
    flow+=("$rps"); flow_p99+=("$p99")
    echo "run $run: ceiling ${ceil[-1]} req/s (p99 ${ceil_p99[-1]} ms) | eventflow $rps req/s (p99 $p99 ms, non-2xx $non2xx)"
  done
  local mc mf
  mc="$(median "${ceil[@]}")"; mf="$(median "${flow[@]}")"
  line="$(python3 -c "print(f'median: ceiling {float($mc):.0f} req/s, eventflow {float($mf):.0f} req/s = {100*float($mf)/float($mc):.1f} % of the ceiling')")"
  echo "$line; p99 at saturation: ceiling $(median "${ceil_p99[@]}") ms, eventflow $(median "${flow_p99[@]}") ms"
  # Latency at 80 % of the ceiling's rate, open loop (no coordinated omission).
  local rate
  rate="$(python3 -c "print(int(0.8*float($mc)))")"
  start_server eventflow
  echo "open loop at $rate req/s (80 % of the ceiling) for ${DURATION}s:"
  loadgen --mode open --rate "$rate" -c 128 -d "${DURATION}s" | grep -E "requests|latency|status|errors"
  stop_server
}

bench_batch() {
  echo "== 2. batch ingest: 1,000 events (~100-byte payload) a request, accepted and published, ${DURATION}s x $RUNS"
  for run in $(seq "$RUNS"); do
    start_server eventflow EVENTFLOW__STORE__MAX_EVENTS=2000000
    loadgen -b 1000 -c 4 -d "${DURATION}s" --verify --metrics-url auto --json >"$OUT/batch-$run.json"
    stop_server
    python3 - "$OUT/batch-$run.json" "$run" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
v = s.get("verify") or {}
svc = s.get("service") or {}
print(f"run {sys.argv[2]}: {s['accepted_events_per_s']:.0f} events/s accepted, p99 {s['latency_ms']['p99']:.1f} ms/request, "
      f"verify: {v.get('accepted')} accepted, {v.get('lost')} lost, {v.get('duplicated')} duplicated; "
      f"server CPU {svc.get('cpu_seconds', 0):.1f} s, queue max {svc.get('queue_depth_max')}")
PY
  done
}

case "${1:-all}" in
  single) machine; bench_single ;;
  batch) machine; bench_batch ;;
  all) machine; bench_single; bench_batch ;;
  *) echo "usage: scripts/bench.sh [single|batch|memory|overload|tracing|shutdown|all]" >&2; exit 2 ;;
esac
