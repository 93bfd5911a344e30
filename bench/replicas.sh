#!/usr/bin/env bash
# What replica mode costs: two `vaultgate serve` replicas on one PostgreSQL
# and one Redis beside one replica on the embedded SQLite store, in the same
# run, same mock upstream, same key policy (bench/bench.policy.yaml: every
# check on the path, none tripped), same closed-loop load (wrk).
#
# Reported per request, from /proc (utime+stime) and the servers' own
# counters, with the load split evenly over the two replicas:
#   - vaultgate CPU in replica mode / in SQLite mode (the goal: <= 1.3x);
#   - PostgreSQL's CPU (postmaster and every backend, exited ones included)
#     and Redis's CPU;
#   - PostgreSQL transactions (pg_stat_database) per request, and Redis's
#     admission-script calls (EVALSHA, one per round trip) and commands in
#     all (the script's own included; INFO commandstats) per request: the
#     hot path (cached key, budget within its lease) makes no PostgreSQL
#     round trip and one Redis round trip.
#
# Usage: bench/replicas.sh   (env: DURATION=10 CONNS=32 REPS=3)
# Needs: cargo, PostgreSQL 15+ and redis-server (Debian's packages), wrk
# (installed from Debian when missing). Runs as root or as any user that may
# run initdb (as root, PostgreSQL runs as the `postgres` user).
set -euo pipefail

DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
REPS=${REPS:-3}
MOCK_PORT=${MOCK_PORT:-19120}
VG_PORT=${VG_PORT:-19121}
R1_PORT=${R1_PORT:-19122}
R2_PORT=${R2_PORT:-19123}
PG_PORT=${PG_PORT:-19124}
REDIS_PORT=${REDIS_PORT:-19125}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/vaultgate-replicas.XXXXXX)
chmod 755 "$WORK"
CLK_TCK=$(getconf CLK_TCK)
LOG_TAG=replicas
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y wrk >/dev/null
# Debian's server programs, beside pg_isready and createdb (a bare `initdb`
# on PATH may be a wrapper without them).
PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")
[ -x "$PG_BIN/initdb" ] || die "PostgreSQL is not installed (apt-get install postgresql)"
command -v redis-server >/dev/null || die "redis-server is not installed (apt-get install redis-server)"

log "building release binaries"
(cd "$ROOT" && cargo build --release --locked -q -p vault-cli --bin vaultgate \
  && cargo build --release --locked -q -p vault-tower --example bench_upstream)
VAULTGATE=$ROOT/target/release/vaultgate

# as_pg CMD...: run a PostgreSQL program as the `postgres` user when root.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cpu_ticks() { # utime+stime(+cutime+cstime with CHILDREN=1) of PIDS
  local total=0 pid stat
  for pid in "$@"; do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    total=$((total + ${12} + ${13}))
    [ "${CHILDREN:-0}" = 1 ] && total=$((total + ${14} + ${15}))
  done
  echo "$total"
}

start_mock 0

# --- the SQLite replica: its own data dir and key (before any URL is set) ----
setup_vaultgate "$WORK/sqlite" "$ROOT/bench/bench.policy.yaml"
SQLITE_DIR=$WORK/sqlite
SQLITE_KEY=$VKEY

# --- PostgreSQL and Redis, throwaway -----------------------------------------
mkdir -p "$WORK/pg"
[ "$(id -u)" = 0 ] && chown postgres "$WORK/pg"
as_pg "$PG_BIN/initdb" -D "$WORK/pg/data" -U vaultgate --auth=trust >/dev/null
as_pg "$PG_BIN/postgres" -D "$WORK/pg/data" -p "$PG_PORT" -k "$WORK/pg" \
  -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200 \
  2>"$WORK/pg.log" &
PIDS+=("$!")
wait_port "$PG_PORT"
PG_PID=$(head -1 "$WORK/pg/data/postmaster.pid")
PIDS+=("$PG_PID")
for _ in $(seq 1 100); do
  as_pg "$PG_BIN/pg_isready" -h 127.0.0.1 -p "$PG_PORT" -q && break
  sleep 0.1
done
as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U vaultgate vaultgate
export VAULTGATE_DATABASE_URL="postgres://vaultgate@127.0.0.1:$PG_PORT/vaultgate"
pg_pids() { echo "$PG_PID" $(pgrep -P "$PG_PID" || true); }
pg_xacts() {
  as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U vaultgate -d vaultgate -Atqc \
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'vaultgate'"
}

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$WORK" >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_port "$REDIS_PORT"
export VAULTGATE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
# "EVALSHA-calls all-commands": the calls of the admission script (one per
# round trip) and every command Redis ran, the script's own included.
redis_commands() {
  redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' |
    awk -F'[:=,]' '/^cmdstat_/ { all += $3 } /^cmdstat_evalsha:/ { e = $3 }
                   END { print e + 0, all + 0 }'
}

# --- the PostgreSQL replicas: one schema, one master key ------------------------
export VAULTGATE_MASTER_KEY
VAULTGATE_MASTER_KEY=$(head -c 32 /dev/urandom | base64)
"$VAULTGATE" migrate >/dev/null
replica_config() { # DIR PORT
  mkdir -p "$1"
  cat >"$1/vaultgate.toml" <<EOF
listen = "127.0.0.1:$2"
data_dir = "$1/data"

[providers.openai]
base_url = "http://127.0.0.1:$MOCK_PORT"
EOF
}
replica_config "$WORK/r1" "$R1_PORT"
replica_config "$WORK/r2" "$R2_PORT"
r1() { VAULTGATE_LOG=warn "$VAULTGATE" --data-dir "$WORK/r1/data" --config "$WORK/r1/vaultgate.toml" "$@"; }
printf '%s' "$PROVIDER_KEY" | r1 provider-keys add --provider openai --name bench >/dev/null 2>&1 ||
  die "could not add the provider key on PostgreSQL"
PG_KEY=$(r1 --output env keys create --policy "$ROOT/bench/bench.policy.yaml" 2>/dev/null |
  sed -n 's/^export VAULTGATE_KEY=//p')
[ -n "$PG_KEY" ] || die "could not create the replicas' key"

# --- serve all three ---------------------------------------------------------
serve() { # DIR [env args...]: sets SERVED
  local dir=$1
  shift
  env "$@" VAULTGATE_LOG=warn "$VAULTGATE" --data-dir "$dir/data" --config "$dir/vaultgate.toml" \
    serve 2>>"$dir/serve.log" &
  SERVED=$!
  PIDS+=("$SERVED")
}
serve "$SQLITE_DIR" -u VAULTGATE_DATABASE_URL -u VAULTGATE_REDIS_URL -u VAULTGATE_MASTER_KEY
SQLITE_PID=$SERVED
serve "$WORK/r1"
R1_PID=$SERVED
serve "$WORK/r2"
R2_PID=$SERVED
wait_port "$VG_PORT"
wait_port "$R1_PORT"
wait_port "$R2_PORT"

cat >"$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":64}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
function done(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d\n", summary.requests,
    summary.errors.status, summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout))
end
EOF

# load KEY CONNS PORT...: wrk on each port at once (CONNS split evenly);
# prints the requests served, failing on any error.
load() {
  local key=$1 conns=$2 port out total=0 reqs bad errs
  shift 2
  local per=$((conns / $#)) wrks=()
  for port in "$@"; do
    BENCH_KEY="$key" wrk -t1 -c"$per" -d"${DURATION}s" --timeout 10s -s "$WORK/post.lua" \
      "http://127.0.0.1:$port/openai/v1/chat/completions" >"$WORK/wrk.$port" &
    wrks+=("$!")
  done
  wait "${wrks[@]}"
  for port in "$@"; do
    out=$(grep '^RESULT' "$WORK/wrk.$port") || die "wrk on $port printed no result"
    read -r _ reqs bad errs <<<"$out"
    [ "$bad" = 0 ] && [ "$errs" = 0 ] || die "port $port: $bad non-2xx, $errs socket errors"
    total=$((total + reqs))
  done
  echo "$total"
}

per_req() { awk -v t="$1" -v h="$CLK_TCK" -v r="$2" 'BEGIN { printf "%.1f", t / h * 1e6 / r }'; }

# Warm up each side (keys cached, leases taken, connections pooled).
DURATION=2 load "$SQLITE_KEY" 8 "$VG_PORT" >/dev/null
DURATION=2 load "$PG_KEY" 8 "$R1_PORT" "$R2_PORT" >/dev/null

printf 'rep\tsqlite_us\treplica_us\tratio\tpostgres_us\tredis_us\tpg_xacts\tevalsha\tredis_cmds\tsqlite_rps\treplica_rps\n'
for rep in $(seq 1 "$REPS"); do
  before=$(cpu_ticks "$SQLITE_PID")
  n=$(load "$SQLITE_KEY" "$CONNS" "$VG_PORT")
  sqlite_us=$(per_req $(($(cpu_ticks "$SQLITE_PID") - before)) "$n")
  sqlite_rps=$((n / DURATION))

  vg0=$(cpu_ticks "$R1_PID" "$R2_PID")
  pg0=$(CHILDREN=1 cpu_ticks $(pg_pids))
  rd0=$(cpu_ticks "$REDIS_PID")
  x0=$(pg_xacts)
  read -r e0 c0 < <(redis_commands)
  n=$(load "$PG_KEY" "$CONNS" "$R1_PORT" "$R2_PORT")
  vg1=$(cpu_ticks "$R1_PID" "$R2_PID")
  pg1=$(CHILDREN=1 cpu_ticks $(pg_pids))
  rd1=$(cpu_ticks "$REDIS_PID")
  x1=$(pg_xacts)
  read -r e1 c1 < <(redis_commands)
  replica_us=$(per_req $((vg1 - vg0)) "$n")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$sqlite_us" "$replica_us" \
    "$(awk -v a="$replica_us" -v b="$sqlite_us" 'BEGIN { printf "%.2f", a / b }')" \
    "$(per_req $((pg1 - pg0)) "$n")" "$(per_req $((rd1 - rd0)) "$n")" \
    "$(awk -v a=$((x1 - x0)) -v r="$n" 'BEGIN { printf "%.4f", a / r }')" \
    "$(awk -v a=$((e1 - e0)) -v r="$n" 'BEGIN { printf "%.3f", a / r }')" \
    "$(awk -v a=$((c1 - c0)) -v r="$n" 'BEGIN { printf "%.3f", a / r }')" \
    "$sqlite_rps" "$((n / DURATION))"
done
