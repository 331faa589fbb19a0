#!/usr/bin/env bash
# A relay under a long mixed load on 127.0.0.1, its memory, store and descriptors sampled
# as it goes: signed webhooks paced at about 500 a second with random UUIDs as delivery
# ids (as the forges send them), beside gateway calls as fast as they come, each with a
# made-up project and token, against per_project and per_token limits (every call is a
# new key for both). What it shows: whether anything grows with time rather than with
# what the relay keeps (the store grows with the webhooks, as it should).
#
# Run: benches/soak.sh [BINARY]      (env: DURATION=90 seconds; default binary: a release
# build of this checkout). Installs wrk and nginx-light when missing; stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
need wrk wrk
need nginx nginx-light
install_needed
BIN=${1:-}
if [[ -z $BIN ]]; then cargo build --release --quiet; BIN=target/release/hookrelay; fi
DURATION=${DURATION:-90}
make_work
standin_port=$(free_port); relay_port=$(free_port)
signed_push
start_nginx "$work/nginx" ""
printf '%s' "$secret" >"$work/secret"
mkdir -p "$work/config"
{ printf '[server]\nlisten = "127.0.0.1:%s"\n[gateway]\nupstream = "gitlab"\n' "$relay_port"
  printf 'limit = { per_project = "100000/min", per_token = "100000/min", burst = 1000 }\n'
  relay_rules "$standin_port" "$work/secret"; } >"$work/config/relay.toml"
"$BIN" serve --config "$work/config" --state "$work/state" >"$work/relay.log" 2>&1 & relay=$!; pids+=("$relay")
wait_for "http://127.0.0.1:$relay_port/healthz"
sample() {
  echo "$1: RSS $(awk '/VmRSS/ {print $2}' "/proc/$relay/status") KiB, store $(du -sm "$work/state" | cut -f1) MB, descriptors $(ls "/proc/$relay/fd" | wc -l)"
}
sample "start"
env BODY_FILE="$payload" SIGNATURE="$signature" DELIVERY_IDS=uuid PACE_MS=64 \
  wrk -t1 -c32 -d"${DURATION}s" -s benches/peers/signed.lua "http://127.0.0.1:$relay_port/hooks/github" >"$work/webhooks.out" 2>&1 &
webhooks=$!
wrk -t1 -c16 -d"${DURATION}s" -s benches/peers/made_up.lua "http://127.0.0.1:$relay_port" >"$work/gateway.out" 2>&1 &
gateway=$!
for ((elapsed = 15; elapsed <= DURATION; elapsed += 15)); do sleep 15; sample "${elapsed}s"; done
wait "$webhooks" "$gateway" || true
echo "webhooks: $(awk '/Requests\/sec/ {print $2}' "$work/webhooks.out") a second, $(awk '/Non-2xx/ {n = $4} END {print n + 0}' "$work/webhooks.out") not 2xx"
echo "gateway calls: $(awk '/Requests\/sec/ {print $2}' "$work/gateway.out") a second, $(awk '/Non-2xx/ {n = $4} END {print n + 0}' "$work/gateway.out") not 2xx"
sleep 20
sample "20 s after the load"
echo "log lines at WARN or ERROR: $(grep -c -E ' (WARN|ERROR) ' "$work/relay.log" || true)"
