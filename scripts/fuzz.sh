#!/usr/bin/env bash
# Fuzzing and long property runs of the ingest decoders (not in .ci/run).
#
#   scripts/fuzz.sh                 every part
#   SECONDS_PER_TARGET=120 CASES=20000 scripts/fuzz.sh
#
# 1. cargo-fuzz (nightly toolchain; `cargo install cargo-fuzz`): each
#    target in fuzz/fuzz_targets for SECONDS_PER_TARGET (default 60).
#    Corpora and crash artifacts stay in fuzz/ (ignored by git): a crash
#    found here becomes a test.
# 2. The property tests with CASES cases each (default 10000): the JSON
#    writer and the decoders (src/event), and random and near-valid bodies
#    through the real server (tests/api/fuzz.rs: single, array, NDJSON,
#    gzip; every answer a 2xx or a 4xx problem, never a 5xx).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECONDS_PER_TARGET="${SECONDS_PER_TARGET:-60}"
CASES="${CASES:-10000}"

if cargo +nightly fuzz --version >/dev/null 2>&1; then
  for target in decode_event decode_array; do
    echo "== cargo fuzz: $target for ${SECONDS_PER_TARGET}s"
    # The whole output goes to a log; a crash fails the script.
    log="fuzz/$target.log"
    cargo +nightly fuzz run "$target" -- -max_total_time="$SECONDS_PER_TARGET" >"$log" 2>&1 \
      || { tail -40 "$log"; echo "fuzz: $target failed (log: $log)" >&2; exit 1; }
    # The run passed; its summary lines (awk prints what matches, if any).
    awk '/^(Done|#[0-9]+ +DONE)|SUMMARY/' "$log"
  done
else
  echo "fuzz: cargo-fuzz on a nightly toolchain is not available; skipping part 1" >&2
fi

echo "== property tests, $CASES cases each"
started=$(date +%s)
# A failing property fails the script, showing its minimal case.
PROPTEST_CASES="$CASES" cargo test -q -p eventflow --lib properties
PROPTEST_CASES="$CASES" cargo test -q -p eventflow --test api fuzz::
echo "property tests: $(( $(date +%s) - started ))s"
