#!/usr/bin/env bash
# Soak: the load generator at a steady rate for MINUTES (default 10) against
# the release build, recording the service's RSS and queue depth each second.
#
#   scripts/soak.sh                       10 minutes at 2,000 requests/s of 10 events
#   MINUTES=3 RATE=1000 BATCH=10 scripts/soak.sh
#
# Writes OUT/soak.csv (seconds, rss_mib, queue_depth, store_events) and
# prints RSS at the start, when the store first reached its bound, and at
# the end; memory must stay flat once the store is full (it then evicts
# the oldest processed events). Needs python3, curl, taskset.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MINUTES="${MINUTES:-10}"
RATE="${RATE:-2000}"
BATCH="${BATCH:-10}"
STORE_MAX="${STORE_MAX:-200000}"
OUT="${OUT:-target/soak}"
mkdir -p "$OUT"
cargo build --release --quiet --workspace --bins

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
require soak curl python3 taskset
PORT="$(free_port)"
EVENTFLOW__SERVER__ADDR="127.0.0.1:$PORT" \
EVENTFLOW__STORE__MAX_EVENTS="$STORE_MAX" \
EVENTFLOW__TELEMETRY__LOG_LEVEL=warn \
  taskset -c 1 target/release/eventflow >/dev/null 2>"$OUT/server.log" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
wait_healthy soak "$PORT" "$SERVER"

taskset -c 0 target/release/eventflow-loadgen --url "http://127.0.0.1:$PORT" \
  --mode open --rate "$RATE" -b "$BATCH" -c 16 -d "${MINUTES}m" --no-progress --json \
  >"$OUT/loadgen.json" 2>"$OUT/loadgen.log" &
LOAD=$!

echo "seconds,rss_mib,queue_depth,store_events" >"$OUT/soak.csv"
start=$(date +%s)
while kill -0 "$LOAD" 2>/dev/null; do
  rss=$(awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$SERVER/status")
  metrics="$(curl -s "http://127.0.0.1:$PORT/metrics" || true)"
  depth=$(awk '/^eventflow_queue_depth / {print $2}' <<<"$metrics")
  stored=$(awk '/^eventflow_store_events / {print $2}' <<<"$metrics")
  echo "$(( $(date +%s) - start )),$rss,${depth:-},${stored:-}" >>"$OUT/soak.csv"
  sleep 1
done
wait "$LOAD" || true

python3 - "$OUT/soak.csv" "$OUT/loadgen.json" "$STORE_MAX" <<'PY'
import csv, json, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["rss_mib"]]
store_max = int(sys.argv[3])
rss = [float(r["rss_mib"]) for r in rows]
depth = [float(r["queue_depth"] or 0) for r in rows]
full = next((i for i, r in enumerate(rows) if float(r["store_events"] or 0) >= 0.99 * store_max), None)
summary = json.load(open(sys.argv[2]))
print(f"soak: {len(rows)} s, {summary['events_accepted']} events accepted "
      f"({summary['accepted_events_per_s']:.0f}/s), statuses {summary['status']}, "
      f"{summary['timeouts']} timeouts, {summary['transport_errors']} transport errors; "
      f"accepted p99 {summary['accepted_latency_ms'].get('p99', '?')} ms")
print(f"RSS: start {rss[0]:.1f} MiB, max {max(rss):.1f} MiB, end {rss[-1]:.1f} MiB")
if full is not None:
    after = rss[full:]
    print(f"store full ({store_max} events) at {rows[full]['seconds']} s: RSS then {after[0]:.1f} MiB, "
          f"afterwards min {min(after):.1f} / max {max(after):.1f} MiB (growth {after[-1] - after[0]:+.1f} MiB)")
else:
    print("the store did not reach its bound: run longer or faster for the flat part")
print(f"queue depth: median {sorted(depth)[len(depth) // 2]:.0f}, max {max(depth):.0f}")
PY
