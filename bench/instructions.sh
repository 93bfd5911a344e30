#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind: the
# one proxy figure on this shared VM that does not move from run to run
# (CPU time moves by ±30%). Kernel work is not counted; bench/run.sh's
# context switches per request stand in for it.
#
# For each of passthrough (vaultgate's server loop and pool, no layer) and
# vaultgate serve (the bench key, full policy and metering): start it under
# callgrind, warm up, zero the counters, send N requests on one keep-alive
# connection, dump, and divide. Non-streamed, then streamed.
#
# Usage: bench/instructions.sh [N]   (default 2000; needs valgrind, python3)
#   CALLGRIND_OUT=dir   keep each run's callgrind file there (for
#                       callgrind_annotate)
set -euo pipefail

N=${1:-2000}
MOCK_PORT=${MOCK_PORT:-19110}
PASS_PORT=${PASS_PORT:-19113}
VG_PORT=${VG_PORT:-19112}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/vaultgate-instr.XXXXXX)
LOG_TAG=instructions
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

command -v valgrind >/dev/null || apt-get install -y valgrind >/dev/null
(cd "$ROOT" && cargo build --release --locked -q -p vault-cli --bin vaultgate \
  && cargo build --release --locked -q -p vault-tower --example bench_upstream \
  && cargo build --release --locked -q -p vault-tower --example bench_passthrough)
VAULTGATE=$ROOT/target/release/vaultgate
start_mock 0

setup_vaultgate "$WORK/vg" "$ROOT/bench/bench.policy.yaml"

# send PORT PATH KEY STREAM COUNT: COUNT POSTs on one connection, each
# answered 200 and read to its end.
send() {
  python3 - "$@" <<'EOF'
import http.client, sys
port, path, key, stream, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
body = ('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64%s}'
        % (',"stream":true' if stream else ''))
c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=60)
for _ in range(count):
    c.request("POST", path, body, {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"status {r.status}: {data[:200]!r}")
EOF
}

# measure NAME PORT PATH KEY CMD...: instructions per request, plain and streamed.
measure() {
  local name=$1 port=$2 path=$3 key=$4 pid stream out ir
  shift 4
  valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.%p.out" "$@" \
    2>"$WORK/$name.valgrind.log" &
  pid=$!
  PIDS+=("$pid")
  wait_port "$port"
  for stream in 0 1; do
    send "$port" "$path" "$key" "$stream" 200
    callgrind_control -z "$pid" >/dev/null 2>&1
    send "$port" "$path" "$key" "$stream" "$N"
    rm -f "$WORK/$name.$pid.out"*
    callgrind_control -d "$pid" >/dev/null 2>&1
    out=$(ls "$WORK/$name.$pid.out"* | tail -1)
    if [ -n "${CALLGRIND_OUT:-}" ]; then
      mkdir -p "$CALLGRIND_OUT"
      cp "$out" "$CALLGRIND_OUT/$name$([ "$stream" = 1 ] && echo _stream).callgrind"
    fi
    ir=$(sed -n 's/^summary: *//p; s/^totals: *//p' "$out" | head -1)
    printf '%s%s\t%s\n' "$name" "$([ "$stream" = 1 ] && echo _stream)" \
      "$(awk -v i="$ir" -v n="$N" 'BEGIN { printf "%.0f", i / n }')"
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

log "passthrough"
export BENCH_PROVIDER_KEY=$PROVIDER_KEY VAULTGATE_LOG=warn
measure passthrough "$PASS_PORT" /v1/chat/completions "$PROVIDER_KEY" \
  "$ROOT/target/release/examples/bench_passthrough" \
  "127.0.0.1:$PASS_PORT" "127.0.0.1:$MOCK_PORT" >"$WORK/results.tsv"
log "vaultgate"
measure vaultgate "$VG_PORT" /openai/v1/chat/completions "$VKEY" \
  "$VAULTGATE" --data-dir "$VG_DIR" --config "$VG_CONFIG" serve \
  >>"$WORK/results.tsv"

echo
echo "## User-space instructions per request ($(date -u +%Y-%m-%dT%H:%M:%SZ), callgrind, $N requests on one connection)"
echo
echo "| target | instructions per request |"
echo "|---|---:|"
awk -F'\t' '{ printf "| %s | %\047d |\n", $1, $2 }' "$WORK/results.tsv"
