#!/usr/bin/env bash
# Heap allocations per request through the Vault layer and through the bare
# inner service, counted by valgrind's DHAT: two runs of N and 2N requests,
# the difference divided by N (setup and teardown cancel out).
#
# Usage: bench/layer-allocs.sh [N]   (default 1000; needs valgrind)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
command -v valgrind >/dev/null || apt-get install -y valgrind >/dev/null
cargo bench -p vault-tower --bench layer --no-run 2>/dev/null
bin=$(ls -t target/release/deps/layer-* | grep -v '\.d$' | head -1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
count() { # $1 = iterations, $2 = 1 for bare
  local envs=(BENCH_LAYER_ITERS="$1")
  [ "$2" = 1 ] && envs+=(BENCH_LAYER_BARE=1)
  env "${envs[@]}" valgrind --tool=dhat --dhat-out-file="$out/d.json" "$bin" 2>&1 |
    sed -n 's/.*Total: *\([0-9,]*\) bytes in \([0-9,]*\) blocks.*/\1 \2/p' | tr -d ,
}
for bare in 0 1; do
  read -r b1 a1 < <(count "$n" $bare)
  read -r b2 a2 < <(count $((2 * n)) $bare)
  label=$([ $bare = 1 ] && echo bare_inner || echo vault_cache_hit)
  echo "$label: $(( (a2 - a1) / n )) allocations, $(( (b2 - b1) / n )) bytes per request"
done
