#!/usr/bin/env bash
# The load harness of BENCHMARKS.md: vaultgate side by side with nginx.
#
# One invocation, everything on 127.0.0.1:
#   (a) wrk → mock upstream directly
#   (b) wrk → nginx pass-through proxy → mock (keepalive to the upstream)
#   (p) wrk → passthrough → mock: vaultgate's server loop and upstream pool
#       with no layer (vault-tower/examples/bench_passthrough.rs), the
#       floor of this HTTP stack
#   (c) wrk → `vaultgate serve` → mock, with a live key whose policy has a
#       rate limit, a budget, endpoint and model allowlists; metering on
# each non-streamed and streamed (SSE), same closed-loop load (32
# connections, 10 s), repeated REPS times; medians reported, with each
# process's CPU time and context switches per request. Also p50 at one
# connection, vaultgate's RSS after the load and its cold start to the first
# served request. The mock counts requests that carried the injected
# provider key; the run fails unless every request reaching it through
# vaultgate did.
#
# Usage: bench/run.sh            (env: REPS=3 DURATION=10 CONNS=32 DELAY_MS=0)
#   VAULTGATE_BIN=path   run that vaultgate build instead of this tree's
#                        (e.g. an older commit's, for a before/after)
#   VG_ENV="K=V ..."     extra environment for the vaultgate process
#   PROFILE_OUT=path     perf-record vaultgate under load instead (see below)
# Needs: apt-get (installs wrk and nginx if missing), cargo.
set -euo pipefail

REPS=${REPS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
DELAY_MS=${DELAY_MS:-0}
MOCK_PORT=${MOCK_PORT:-19100}
NGINX_PORT=${NGINX_PORT:-19101}
VG_PORT=${VG_PORT:-19102}
PASS_PORT=${PASS_PORT:-19103}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/vaultgate-bench.XXXXXX)
CLK_TCK=$(getconf CLK_TCK)
LOG_TAG=bench
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

# --- tools -----------------------------------------------------------------
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  log "installing wrk and nginx from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y wrk nginx >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

log "building release binaries"
(cd "$ROOT" && cargo build --release --locked -q -p vault-cli --bin vaultgate \
  && cargo build --release --locked -q -p vault-tower --example bench_upstream \
  && cargo build --release --locked -q -p vault-tower --example bench_passthrough)
VAULTGATE=${VAULTGATE_BIN:-$ROOT/target/release/vaultgate}

# Context switches (voluntary + involuntary) of every thread of PIDS.
ctx_switches() {
  cat $(for pid in "$@"; do echo /proc/"$pid"/task/*/status; done) 2>/dev/null |
    awk '/ctxt_switches/ { n += $2 } END { print n + 0 }'
}

# CPU ticks (utime+stime) of a list of pids.
cpu_ticks() {
  local total=0 pid stat
  for pid in "$@"; do
    stat=$(cat "/proc/$pid/stat")
    stat=${stat##*) }
    # Fields after the comm: state is field 3, utime 14, stime 15.
    set -- $stat
    total=$((total + ${12} + ${13}))
  done
  echo "$total"
}

# --- the mock upstream -------------------------------------------------------
start_mock "$DELAY_MS"

# --- nginx pass-through ------------------------------------------------------
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes auto;
daemon off;
master_process on;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  upstream mock {
    server 127.0.0.1:$MOCK_PORT;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    tcp_nodelay on;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
"$NGINX" -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" 2>"$WORK/nginx/stderr.log" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_port "$NGINX_PORT"
nginx_pids() { echo "$NGINX_PID" $(pgrep -P "$NGINX_PID" || true); }

# --- passthrough: vaultgate's server loop and pool without the layer --------
BENCH_PROVIDER_KEY="$PROVIDER_KEY" "$ROOT/target/release/examples/bench_passthrough" \
  "127.0.0.1:$PASS_PORT" "127.0.0.1:$MOCK_PORT" 2>"$WORK/passthrough.log" &
PASS_PID=$!
PIDS+=("$PASS_PID")
wait_port "$PASS_PORT"

# --- vaultgate: data dir, provider key, the benchmark key ----------------------
setup_vaultgate "$WORK/vg" "$ROOT/bench/bench.policy.yaml"

start_vaultgate() {
  env ${VG_ENV:-} VAULTGATE_LOG=warn "$VAULTGATE" --data-dir "$VG_DIR" --config "$VG_CONFIG" \
    serve 2>>"$WORK/vaultgate.log" &
  VG_PID=$!
  PIDS+=("$VG_PID")
}

stop_vaultgate() {
  kill "$VG_PID" 2>/dev/null || true
  wait "$VG_PID" 2>/dev/null || true
}

BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64}'
SBODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64,"stream":true}'

# Cold start: from exec to the first proxied 200.
start_ns=$(date +%s%N)
start_vaultgate
while :; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $VKEY" \
    -H 'Content-Type: application/json' -d "$BODY" \
    "http://127.0.0.1:$VG_PORT/openai/v1/chat/completions" || true)
  [ "$code" = 200 ] && break
  [ $(( $(date +%s%N) - start_ns )) -lt 10000000000 ] || die "vaultgate did not serve within 10 s (last status $code)"
  sleep 0.002
done
COLD_MS=$(( ($(date +%s%N) - start_ns) / 1000000 ))
log "cold start to first served request: ${COLD_MS} ms"

# --- wrk ---------------------------------------------------------------------
cat >"$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.status, e.connect + e.read + e.write + e.timeout))
end
EOF

RESULTS="$WORK/results.tsv"
: >"$RESULTS"

# run NAME URL KEY BODY CONNS DURATION PIDS...
run() {
  local name=$1 url=$2 key=$3 body=$4 conns=$5 dur=$6
  shift 6
  local before after csb csa line reqs dur_us p50 p99 p999 bad errs mb ma
  mb=$(mock_count)
  before=$(cpu_ticks "$@")
  csb=$(ctx_switches "$@")
  line=$(BENCH_KEY="$key" BENCH_BODY="$body" wrk -t"$([ "$conns" -gt 1 ] && echo 2 || echo 1)" \
    -c"$conns" -d"${dur}s" --timeout 10s -s "$WORK/post.lua" "$url" | grep '^RESULT')
  after=$(cpu_ticks "$@")
  csa=$(ctx_switches "$@")
  ma=$(mock_count)
  read -r _ reqs dur_us p50 p99 p999 bad errs <<<"$line"
  [ "$bad" = 0 ] && [ "$errs" = 0 ] || die "$name: $bad non-2xx responses, $errs socket errors"
  local mt0 mg0 mt1 mg1
  read -r mt0 mg0 <<<"$mb"
  read -r mt1 mg1 <<<"$ma"
  local reached=$((mt1 - mt0)) good=$((mg1 - mg0))
  [ "$reached" = "$good" ] || die "$name: $((reached - good)) of $reached upstream requests lacked the provider key"
  [ "$reached" -ge "$reqs" ] || die "$name: wrk saw $reqs responses but only $reached reached the upstream"
  local rps cpu_us cs
  rps=$(awk -v r="$reqs" -v d="$dur_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
  cpu_us=$(awk -v t=$((after - before)) -v h="$CLK_TCK" -v r="$reqs" 'BEGIN { printf "%.1f", t / h * 1e6 / r }')
  cs=$(awk -v c=$((csa - csb)) -v r="$reqs" 'BEGIN { printf "%.2f", c / r }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rps" "$p50" "$p99" "$p999" "$cpu_us" "$cs" >>"$RESULTS"
  log "$(printf '%-18s %8s req/s  p50 %6s us  p99 %6s us  p99.9 %6s us  cpu %6s us/req  %s cs/req  (upstream saw %s, all with the provider key)' \
    "$name" "$rps" "$p50" "$p99" "$p999" "$cpu_us" "$cs" "$reached")"
}

D="http://127.0.0.1:$MOCK_PORT/v1/chat/completions"
N="http://127.0.0.1:$NGINX_PORT/v1/chat/completions"
V="http://127.0.0.1:$VG_PORT/openai/v1/chat/completions"
P="http://127.0.0.1:$PASS_PORT/v1/chat/completions"

if [ -n "${PROFILE_OUT:-}" ]; then
  # Profile mode: perf (cpu-clock, DWARF call graphs) on vaultgate during one
  # non-streamed and one streamed load run, then stop.
  command -v perf >/dev/null || apt-get install -y linux-perf >/dev/null
  for kind in plain stream; do
    body=$BODY
    [ "$kind" = stream ] && body=$SBODY
    perf record -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$VG_PID" \
      -o "$PROFILE_OUT.$kind" 2>/dev/null &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
    sleep 0.5
    run "vaultgate_$kind" "$V" "$VKEY" "$body" "$CONNS" "$DURATION" "$VG_PID"
    kill -INT "$PERF_PID"
    wait "$PERF_PID" 2>/dev/null || true
  done
  log "profiles written to $PROFILE_OUT.plain and $PROFILE_OUT.stream"
  exit 0
fi

for rep in $(seq 1 "$REPS"); do
  log "repetition $rep of $REPS ($CONNS connections, ${DURATION} s each)"
  run direct "$D" "$PROVIDER_KEY" "$BODY" "$CONNS" "$DURATION" "$MOCK_PID"
  run direct_stream "$D" "$PROVIDER_KEY" "$SBODY" "$CONNS" "$DURATION" "$MOCK_PID"
  run nginx "$N" "$PROVIDER_KEY" "$BODY" "$CONNS" "$DURATION" $(nginx_pids)
  run nginx_stream "$N" "$PROVIDER_KEY" "$SBODY" "$CONNS" "$DURATION" $(nginx_pids)
  run passthrough "$P" "$PROVIDER_KEY" "$BODY" "$CONNS" "$DURATION" "$PASS_PID"
  run passthrough_stream "$P" "$PROVIDER_KEY" "$SBODY" "$CONNS" "$DURATION" "$PASS_PID"
  run vaultgate "$V" "$VKEY" "$BODY" "$CONNS" "$DURATION" "$VG_PID"
  run vaultgate_stream "$V" "$VKEY" "$SBODY" "$CONNS" "$DURATION" "$VG_PID"
done
RSS_KB=$(awk '/^VmRSS/ { print $2 }' "/proc/$VG_PID/status")

log "one connection, 5 s each"
: >"$WORK/one.tsv"
for name in direct nginx passthrough vaultgate; do
  case $name in
    direct) url=$D key=$PROVIDER_KEY pids=$MOCK_PID ;;
    nginx) url=$N key=$PROVIDER_KEY pids=$(nginx_pids) ;;
    passthrough) url=$P key=$PROVIDER_KEY pids=$PASS_PID ;;
    vaultgate) url=$V key=$VKEY pids=$VG_PID ;;
  esac
  # shellcheck disable=SC2086
  RESULTS="$WORK/one.tsv" run "${name}_c1" "$url" "$key" "$BODY" 1 5 $pids
done

# Let vaultgate write its usage records, then check the count it kept.
stop_vaultgate
USAGE_ROWS=$(vg --output json usage --limit 1 2>/dev/null | grep -c '"key_id"' || true)

# --- report ------------------------------------------------------------------
echo
echo "## Load run $(date -u +%Y-%m-%dT%H:%M:%SZ): $REPS x ${DURATION} s, $CONNS connections, upstream delay ${DELAY_MS} ms"
echo
echo "Medians of $REPS runs. CPU is the server/proxy process's utime+stime per request (nginx: master and workers); cs/req its context switches per request. passthrough is vaultgate's server loop and pool without the layer (vault-tower/examples/bench_passthrough.rs)."
echo
echo "| target | req/s | p50 µs | p99 µs | p99.9 µs | CPU µs/req | cs/req |"
echo "|---|---:|---:|---:|---:|---:|---:|"
median() { sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
declare -A MED
for name in direct direct_stream nginx nginx_stream passthrough passthrough_stream vaultgate vaultgate_stream; do
  row="| $name"
  for col in 2 3 4 5 6 7; do
    v=$(awk -F'\t' -v n="$name" -v c="$col" '$1 == n { print $c }' "$RESULTS" | median)
    MED[$name.$col]=$v
    row="$row | $v"
  done
  echo "$row |"
done
echo
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "| vaultgate / nginx | non-streamed | streamed | target |"
echo "|---|---:|---:|---|"
echo "| CPU per request | $(ratio "${MED[vaultgate.6]}" "${MED[nginx.6]}") | $(ratio "${MED[vaultgate_stream.6]}" "${MED[nginx_stream.6]}") | ≤ 1.5 |"
echo "| throughput | $(ratio "${MED[vaultgate.2]}" "${MED[nginx.2]}") | $(ratio "${MED[vaultgate_stream.2]}" "${MED[nginx_stream.2]}") | ≥ 0.8 |"
echo "| p99 | $(ratio "${MED[vaultgate.4]}" "${MED[nginx.4]}") | $(ratio "${MED[vaultgate_stream.4]}" "${MED[nginx_stream.4]}") | ≤ 1.5 |"
echo "| passthrough CPU per request (the stack's floor) | $(ratio "${MED[passthrough.6]}" "${MED[nginx.6]}") | $(ratio "${MED[passthrough_stream.6]}" "${MED[nginx_stream.6]}") | |"
echo
echo "One connection (5 s, non-streamed): p50 µs"
echo
d1=$(awk -F'\t' '$1 == "direct_c1" { print $3 }' "$WORK/one.tsv")
n1=$(awk -F'\t' '$1 == "nginx_c1" { print $3 }' "$WORK/one.tsv")
p1=$(awk -F'\t' '$1 == "passthrough_c1" { print $3 }' "$WORK/one.tsv")
v1=$(awk -F'\t' '$1 == "vaultgate_c1" { print $3 }' "$WORK/one.tsv")
echo "| direct | nginx | passthrough | vaultgate | vaultgate added over direct (target ≤ 100 µs) | nginx added | passthrough added |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
echo "| $d1 | $n1 | $p1 | $v1 | $((v1 - d1)) | $((n1 - d1)) | $((p1 - d1)) |"
echo
echo "vaultgate RSS after the load: $((RSS_KB / 1024)) MB (${RSS_KB} kB), 3 keys in the store."
echo "Cold start (exec to first proxied 200, curl polling every ~2 ms): ${COLD_MS} ms."
echo "Usage records written: $( [ "$USAGE_ROWS" -gt 0 ] && echo yes || echo NO )."
echo "Every request that reached the mock through vaultgate carried the injected provider key."
