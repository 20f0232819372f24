# shellcheck shell=bash
# Shared by the check scripts (check-stack.sh, check-deploy.sh): `check CMD
# ARGS...` runs one named check and counts it in $passed; a failure names
# the check that failed. Sourced after `set -Eeuo pipefail`.

current=""
passed=0
trap 'echo "$(basename "$0"): FAILED: $current" >&2' ERR

check() {
  current="$*"
  printf '\n==> %s\n' "$current"
  "$@"
  passed=$((passed + 1))
}
