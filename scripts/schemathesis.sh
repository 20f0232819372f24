#!/usr/bin/env bash
# Schemathesis against the served /openapi.json, every check on, with
# bearer-token auth on (so the document names the scheme).
#
#   scripts/schemathesis.sh [MAX_EXAMPLES]     (default 1500; .ci/run uses 100)
#
# Needs: pip install schemathesis; a built binary (BIN, default
# target/debug/eventflow, as `cargo test` leaves it).
# GET /events/stream is excluded: its answer never ends (an SSE stream),
# so a generic run would wait on it forever; tests/api/stream.rs tests it.
# Prints the number of generated test cases and failures; exits non-zero
# on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MAX_EXAMPLES="${1:-1500}"
BIN="${BIN:-target/debug/eventflow}"
TOKEN="schemathesis-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
PORT="$(free_port)"
REPORTS="${REPORTS:-target/schemathesis}"
mkdir -p "$REPORTS"

HINTS[st]="pip install schemathesis"
require schemathesis st curl python3
[[ -x "$BIN" ]] || { echo "schemathesis: no binary at $BIN (cargo build first)" >&2; exit 1; }

EVENTFLOW__SERVER__ADDR="127.0.0.1:$PORT" \
EVENTFLOW__AUTH__TOKENS="$TOKEN" \
EVENTFLOW__PUBLISH__SINKS="" \
EVENTFLOW__TELEMETRY__LOG_LEVEL=warn \
  "$BIN" >/dev/null 2>"$REPORTS/server.log" &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
wait_healthy schemathesis "$PORT" "$SERVER"

started=$(date +%s)
status=0
SCHEMATHESIS_HOOKS=scripts.schemathesis.hooks PYTHONPATH=. \
  st --config-file scripts/schemathesis/schemathesis.toml run \
  "http://127.0.0.1:$PORT/openapi.json" \
  --checks all \
  --max-examples "$MAX_EXAMPLES" \
  --exclude-path /events/stream \
  --header "Authorization: Bearer $TOKEN" \
  --report ndjson --report-ndjson-path "$REPORTS/run.ndjson" \
  --no-color >"$REPORTS/run.log" 2>&1 || status=$?
elapsed=$(( $(date +%s) - started ))

# The summary, without the (long) reproductions.
sed -n '/= SUMMARY =/,$p' "$REPORTS/run.log"
# Requests sent and checks made, from the NDJSON report.
counts="$(python3 - "$REPORTS/run.ndjson" <<'PY'
import json, sys
requests = checks = failed = 0
for line in open(sys.argv[1]):
    event = json.loads(line).get("ScenarioFinished")
    if not event:
        continue
    recorder = event["recorder"]
    requests += len(recorder.get("interactions", {}))
    for results in recorder.get("checks", {}).values():
        for result in results:
            checks += 1
            failed += result.get("status") != "success"
print(f"{requests} requests, {checks} checks, {failed} failed checks")
PY
)"
echo "schemathesis: max-examples $MAX_EXAMPLES: $counts in ${elapsed}s, exit $status (full log: $REPORTS/run.log)"
if [[ "$status" != 0 ]]; then
  grep -E '^_+ |^- ST|^\[[0-9]{3}\]' "$REPORTS/run.log" | cut -c1-200 | head -60 || true
fi
exit "$status"
