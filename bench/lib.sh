# shellcheck shell=bash
# Shared by the load scripts in bench/ (sourced, never run): the cleanup
# trap that stops every process in PIDS by its id and removes WORK, log and
# die, waiting for a port, the mock upstream, and a vaultgate data dir with
# the benchmark key.
#
# The sourcing script sets ROOT, WORK, LOG_TAG and MOCK_PORT first, and
# appends the PID of every process it starts to PIDS.

PIDS=()
PROVIDER_KEY="sk-proj-bench$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"
MOCK="$ROOT/target/release/examples/bench_upstream"

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[$LOG_TAG] $*" >&2; }
die() { echo "[$LOG_TAG] FAIL: $*" >&2; exit 1; }

wait_port() { # port
  local i
  for i in $(seq 1 400); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.025
  done
  die "nothing listens on port $1"
}

# The mock upstream (vault-tower/examples/bench_upstream.rs) on MOCK_PORT,
# expecting PROVIDER_KEY; sets MOCK_PID.
start_mock() { # delay_ms
  BENCH_PROVIDER_KEY="$PROVIDER_KEY" "$MOCK" "127.0.0.1:$MOCK_PORT" "$1" 2>"$WORK/mock.log" &
  MOCK_PID=$!
  PIDS+=("$MOCK_PID")
  wait_port "$MOCK_PORT"
}

# "total good": requests the mock answered, and those with the provider key.
mock_count() { curl -s "http://127.0.0.1:$MOCK_PORT/_bench/count"; }

# The vaultgate CLI on the data dir setup_vaultgate made last.
vg() { VAULTGATE_LOG=warn "$VAULTGATE" --data-dir "$VG_DIR" --config "$VG_CONFIG" "$@"; }

# setup_vaultgate DIR POLICY: a vaultgate data dir (VG_DIR = DIR/data,
# VG_CONFIG = DIR/vaultgate.toml) serving on VG_PORT with the mock as its
# OpenAI upstream, PROVIDER_KEY added, and one key made with the POLICY
# file: VKEY, its id VKEY_ID. Needs VAULTGATE and VG_PORT.
setup_vaultgate() {
  VG_DIR="$1/data"
  VG_CONFIG="$1/vaultgate.toml"
  mkdir -p "$1"
  cat >"$VG_CONFIG" <<EOF
listen = "127.0.0.1:$VG_PORT"
data_dir = "$VG_DIR"

[providers.openai]
base_url = "http://127.0.0.1:$MOCK_PORT"
EOF
  printf '%s' "$PROVIDER_KEY" | vg provider-keys add --provider openai --name bench >/dev/null 2>&1
  local created
  created=$(vg --output env keys create --policy "$2" 2>/dev/null)
  VKEY=$(sed -n 's/^export VAULTGATE_KEY=//p' <<<"$created")
  VKEY_ID=$(sed -n 's/^export VAULTGATE_KEY_ID=//p' <<<"$created")
  [ -n "$VKEY" ] && [ -n "$VKEY_ID" ] || die "could not create the benchmark key"
}
