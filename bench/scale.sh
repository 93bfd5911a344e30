#!/usr/bin/env bash
# The scale table of BENCHMARKS.md: `vaultgate serve`'s memory and cold
# start with 1k, 100k and 1M keys in its SQLite store, H = min(10k, N) of
# them hot.
#
# For each N, everything on 127.0.0.1:
#   1. a fresh data dir: a provider key for the mock upstream and one key
#      made with `vaultgate keys create` (bench/bench.policy.yaml, as
#      bench/run.sh's: a budget, a rate limit, provider/endpoint/model
#      allowlists), copied until the store holds N keys
#      (vault-cli/examples/seed_keys.rs); H of them (the created key
#      included) have known plaintexts;
#   2. `vaultgate serve` started: cold start = exec to the first proxied 200;
#      RSS read once it has served that one request;
#   3. wrk cycles through the H keys (each thread its own share, in order)
#      for DURATION seconds, which must cover every hot key at least once;
#      every response must be a 200 and every request must reach the mock
#      with the injected provider key;
#   4. VmRSS right after the load, VmHWM (peak), and VmRSS again 2 s later
#      (after the key cache's 0.9 s TTL); then serve is stopped.
# Processes started here are stopped by PID on exit.
#
# VG_ENV="K=V ..." is extra environment for the vaultgate process.
# BUDGET=0 drops the budget (the policy file's last block): no budget leases
# are taken. Helpers shared with other load scripts are in bench/lib.sh.
#
# Usage: bench/scale.sh      (env: SIZES="1000 100000 1000000" HOT_MAX=10000
#                             DURATION=30 CONNS=32 BUDGET=1 MOCK_PORT=19200
#                             VG_PORT=19201)
# Needs: apt-get (installs wrk if missing), cargo.
set -euo pipefail

SIZES=${SIZES:-"1000 100000 1000000"}
HOT_MAX=${HOT_MAX:-10000}
DURATION=${DURATION:-30}
CONNS=${CONNS:-32}
BUDGET=${BUDGET:-1}
THREADS=2
MOCK_PORT=${MOCK_PORT:-19200}
VG_PORT=${VG_PORT:-19201}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/vaultgate-scale.XXXXXX)
LOG_TAG=scale
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

# --- tools -----------------------------------------------------------------
if ! command -v wrk >/dev/null; then
  log "installing wrk from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y wrk >/dev/null
fi

log "building release binaries"
(cd "$ROOT" && cargo build --release --locked -q -p vault-cli --bin vaultgate --example seed_keys \
  && cargo build --release --locked -q -p vault-tower --example bench_upstream)
VAULTGATE="$ROOT/target/release/vaultgate"
SEED="$ROOT/target/release/examples/seed_keys"

# A field of /proc/PID/status, in MB with one decimal.
status_mb() { # pid field
  awk -v f="$2:" '$1 == f { printf "%.1f", $2 / 1024 }' "/proc/$1/status"
}

start_mock 0

BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64}'
URL="http://127.0.0.1:$VG_PORT/openai/v1/chat/completions"

# bench/bench.policy.yaml, or the same without its budget block.
if [ "$BUDGET" != 0 ]; then
  cp "$ROOT/bench/bench.policy.yaml" "$WORK/bench.policy.yaml"
else
  sed '/^budget:/,$d' "$ROOT/bench/bench.policy.yaml" >"$WORK/bench.policy.yaml"
fi
if [ "$BUDGET" = 0 ] && grep -q '^budget:' "$WORK/bench.policy.yaml"; then
  die "could not drop the budget"
fi

# wrk: thread t takes keys t, t + THREADS, ... of $BENCH_KEYS and cycles
# through them in order. `done` reports the fewest full cycles any thread
# completed (requests issued, less one in flight per connection, over its
# share of keys).
cat >"$WORK/cycle.lua" <<'EOF'
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local nthreads = tonumber(os.getenv("BENCH_THREADS"))
  mine = {}
  local i = 0
  for line in io.lines(os.getenv("BENCH_KEYS")) do
    if i % nthreads == tid then
      table.insert(mine, "Bearer " .. line)
    end
    i = i + 1
  end
  share = #mine
  issued = 0
  wrk.method = "POST"
  wrk.body = os.getenv("BENCH_BODY")
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  issued = issued + 1
  wrk.headers["Authorization"] = mine[(issued - 1) % share + 1]
  return wrk.format()
end

function done(summary, latency, requests)
  local conns = tonumber(os.getenv("BENCH_CONNS")) / #threads
  local cycles = nil
  for _, t in ipairs(threads) do
    local c = (t:get("issued") - conns) / t:get("share")
    if cycles == nil or c < cycles then
      cycles = c
    end
  end
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %.2f\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout, cycles))
end
EOF

RESULTS="$WORK/results.tsv"
: >"$RESULTS"

for N in $SIZES; do
  H=$((N < HOT_MAX ? N : HOT_MAX))
  DIR="$WORK/n$N"
  log "N=$N: seeding the store ($H hot keys)"
  setup_vaultgate "$DIR" "$WORK/bench.policy.yaml"
  seed_started=$(date +%s%N)
  "$SEED" "$DIR/data" "$VKEY_ID" "$N" "$((H - 1))" "$DIR/seeded.keys" 2>"$DIR/seed.log" ||
    die "seeding failed: $(cat "$DIR/seed.log")"
  SEED_S=$(awk -v ns=$(($(date +%s%N) - seed_started)) 'BEGIN { printf "%.1f", ns / 1e9 }')
  { echo "$VKEY"; cat "$DIR/seeded.keys"; } >"$DIR/hot.keys"
  [ "$(wc -l <"$DIR/hot.keys")" = "$H" ] || die "expected $H hot keys"
  DB_MB=$(du -cm "$DIR/data"/vaultgate.db* | awk 'END { print $1 }')

  # Cold start: from exec to the first proxied 200.
  start_ns=$(date +%s%N)
  env ${VG_ENV:-} VAULTGATE_LOG=warn "$VAULTGATE" --data-dir "$VG_DIR" --config "$VG_CONFIG" \
    serve 2>>"$DIR/vaultgate.log" &
  VG_PID=$!
  PIDS+=("$VG_PID")
  while :; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $VKEY" \
      -H 'Content-Type: application/json' -d "$BODY" "$URL" || true)
    [ "$code" = 200 ] && break
    [ $(($(date +%s%N) - start_ns)) -lt 30000000000 ] || die "vaultgate did not serve within 30 s (last status $code)"
    sleep 0.002
  done
  COLD_MS=$((($(date +%s%N) - start_ns) / 1000000))
  RSS_IDLE=$(status_mb "$VG_PID" VmRSS)
  log "N=$N: cold start ${COLD_MS} ms, RSS ${RSS_IDLE} MB after one request"

  read -r mt0 mg0 <<<"$(mock_count)"
  line=$(BENCH_KEYS="$DIR/hot.keys" BENCH_BODY="$BODY" BENCH_THREADS=$THREADS BENCH_CONNS=$CONNS \
    wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --timeout 10s -s "$WORK/cycle.lua" "$URL" |
    grep '^RESULT')
  RSS_LOAD=$(status_mb "$VG_PID" VmRSS)
  RSS_PEAK=$(status_mb "$VG_PID" VmHWM)
  read -r mt1 mg1 <<<"$(mock_count)"
  read -r _ reqs dur_us p50 p99 bad errs cycles <<<"$line"
  [ "$bad" = 0 ] && [ "$errs" = 0 ] || die "N=$N: $bad non-2xx responses, $errs socket errors"
  reached=$((mt1 - mt0))
  [ "$reached" = $((mg1 - mg0)) ] || die "N=$N: $((reached - (mg1 - mg0))) upstream requests lacked the provider key"
  [ "$reached" -ge "$reqs" ] || die "N=$N: wrk saw $reqs responses but only $reached reached the upstream"
  awk -v c="$cycles" 'BEGIN { exit !(c >= 1) }' ||
    die "N=$N: a wrk thread cycled through its keys only $cycles times in ${DURATION} s; raise DURATION"
  sleep 2
  RSS_AFTER=$(status_mb "$VG_PID" VmRSS)
  kill "$VG_PID" 2>/dev/null || true
  wait "$VG_PID" 2>/dev/null || true
  rps=$(awk -v r="$reqs" -v d="$dur_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
  log "N=$N: $rps req/s over $H keys (each at least ${cycles%.*} times), p50 $p50 us, p99 $p99 us;" \
    "RSS ${RSS_LOAD} MB after the load, peak ${RSS_PEAK} MB, ${RSS_AFTER} MB 2 s later"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$N" "$H" "$DB_MB" "$SEED_S" "$COLD_MS" \
    "$RSS_IDLE" "$rps" "$p50" "$RSS_LOAD" "$RSS_PEAK" "$RSS_AFTER" "$cycles" >>"$RESULTS"
  rm -rf "$DIR/data"
done

# --- report ------------------------------------------------------------------
echo
echo "## Scale run $(date -u +%Y-%m-%dT%H:%M:%SZ): wrk $THREADS threads, $CONNS connections, ${DURATION} s per size, keys $([ "$BUDGET" != 0 ] && echo with || echo without) a budget"
echo
echo "| keys in store | hot keys | db MB | seed s | cold start ms | RSS after 1 request MB | req/s over the hot keys | p50 µs | full cycles | RSS after the load MB | peak RSS MB | RSS 2 s later MB |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
while IFS=$'\t' read -r n h db seed cold idle rps p50 load peak after cycles; do
  echo "| $n | $h | $db | $seed | $cold | $idle | $rps | $p50 | $cycles | $load | $peak | $after |"
done <"$RESULTS"
echo
echo "Every response was a 200 and every request reached the mock with the injected provider key."
