# shellcheck shell=bash
# Helpers every script shares; sourced after `set -euo pipefail`:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Install hints by tool name, filled by the sourcing script.
declare -gA HINTS=()

# require WHO TOOL...: exits 1 naming every TOOL missing from PATH (with its
# install hint from HINTS when there is one).
require() {
  local who="$1" tool missing=0
  shift
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "$who: required tool '$tool' not found on PATH${HINTS[$tool]:+ (install: ${HINTS[$tool]})}" >&2
      missing=1
    fi
  done
  ((missing == 0)) || exit 1
}

# free_port: a TCP port free on 127.0.0.1 just now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_healthy WHO PORT [PID]: until GET /healthz on 127.0.0.1:PORT answers
# 2xx (20 s at most); exits 1 when it never does or PID (the server) died.
wait_healthy() {
  local who="$1" port="$2" pid="${3:-}"
  for _ in $(seq 200); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
      echo "$who: the server on port $port exited before it was healthy" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "$who: the server on port $port was not healthy within 20 s" >&2
  exit 1
}
