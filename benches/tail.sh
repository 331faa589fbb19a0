#!/usr/bin/env bash
# Stalls in the tail: one relay under signed GitHub pushes (wrk -t1, 64 connections), RUNS
# runs of DURATION back to back, each one's acks/s, p99, p99.9 and slowest answer (wrk's
# own, corrected for coordinated omission: one stall of the whole relay lifts a run's p99,
# see docs/benchmarks.md), and what the relay saw meanwhile: its commits over 8 ms (from
# hookrelay_store_commit_seconds) and, on PostgreSQL, the WAL segments the server created.
# Stalls that come every 30 s or once a minute (the kernel's write-back, autovacuum) show
# in one run of several, so run long enough to meet them.
#
# Run: benches/tail.sh BINARY   (env: STORE=sqlite|postgres, RUNS=5, DURATION=8s, WARM=3s,
#      CHECKPOINT=1 checkpoints PostgreSQL before each run, LOG=FILE the relay's log)
# PostgreSQL starts as benches/lib.sh starts it (the README's settings, aged).
set -eu
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:?usage: benches/tail.sh BINARY}")
STORE=${STORE:-sqlite}; RUNS=${RUNS:-5}; DURATION=${DURATION:-8s}; WARM=${WARM:-3s}
source benches/lib.sh
need wrk wrk
need nginx nginx-light
[[ $STORE == postgres ]] && need_postgres
install_needed
make_work
standin_port=$(free_port); relay_port=$(free_port); pg_port=$(free_port)
signed_push
start_nginx "$work/nginx" ""
printf '%s' "$secret" >"$work/secret"; mkdir -p "$work/relay"
relay_rules "$standin_port" "$work/secret" >"$work/relay/relay.toml"
if [[ $STORE == postgres ]]; then
  start_postgres "$work/pg" "$pg_port"
  printf '[store]\nurl = "postgres://postgres@127.0.0.1:%s/postgres"\n' "$pg_port" >"$work/relay/store.toml"
fi
# The log goes to a file on the store's disk, as `serve 2>>relay.log` would.
"$BIN" serve --config "$work/relay" --state "$work/state" --listen "127.0.0.1:$relay_port" \
  >"${LOG:-$work/relay.log}" 2>&1 & pids+=($!)
wait_for "http://127.0.0.1:$relay_port/healthz"
load() { # load DURATION PREFIX
  env BODY_FILE="$payload" SIGNATURE="$signature" DELIVERY_PREFIX="tail-$$-$2" \
    wrk -t1 -c64 -d"$1" -s benches/peers/summary.lua "http://127.0.0.1:$relay_port/hooks/github"
}
load "$WARM" warm >/dev/null
slow_commits() { # commits over 8 ms so far
  curl -s "http://127.0.0.1:$relay_port/metrics" | awk '
    /^hookrelay_store_commit_seconds_count/ { all = $2 }
    /^hookrelay_store_commit_seconds_bucket\{le="0.008"\}/ { fast = $2 }
    END { print all - fast }'
}
segments() { ls "$work/pg/data/pg_wal" 2>/dev/null | grep -c '^[0-9A-F]\{24\}$' || true; }
echo "tail, one relay ($STORE): wrk -t1 -c64, $RUNS runs of $DURATION on 127.0.0.1, $(nproc) cores"
printf '%-4s %10s %10s %10s %10s %13s %13s\n' run acks/s p99 p99.9 slowest "commits >8ms" "WAL segments"
for run in $(seq "$RUNS"); do
  [[ $STORE == postgres && -n ${CHECKPOINT:-} ]] && checkpoint_postgres "$pg_port"
  slow_before=$(slow_commits); segments_before=$(segments)
  out=$(load "$DURATION" "$run")
  rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  read -r p99 p999 slowest < <(awk '/^summary/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "%.2fms %.2fms %.2fms\n", v["p99"] / 1000, v["p999"] / 1000, v["max"] / 1000 }' <<<"$out")
  created="-"; [[ $STORE == postgres ]] && created=$(( $(segments) - segments_before ))
  printf '%-4s %10s %10s %10s %10s %13s %13s\n' "$run" "$rate" "$p99" "$p999" "$slowest" \
    "$(( $(slow_commits) - slow_before ))" "$created"
done
