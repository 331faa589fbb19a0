#!/usr/bin/env bash
# Instructions per webhook, counted by callgrind: repeatable where timings on a shared
# machine move by ±15 % from run to run, so the way to see a change of a few percent.
# Runs one release binary under valgrind with signed GitHub pushes from wrk (8 connections,
# DURATION, 15s by default) and its forwarder sending to a stand-in GitLab, counting only
# during the load; prints the total per webhook and, per webhook, the parts of the request
# path and of the store's writer that changes have touched. (Under valgrind SHA-256 takes
# its portable path: the HMAC reads several times what it costs on a CPU with SHA
# instructions, so compare the path outside it.)
#
# Run: benches/instructions.sh BINARY       (env: DURATION=15s, CONNECTIONS=8)
# e.g. benches/instructions.sh target/release/hookrelay
# TARGET=gateway counts trigger API gateway calls instead (benches/peers/form.lua, a form
# POST to /api/v4/projects/9/trigger/pipeline, as benches/ab.sh sends them).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:?usage: benches/instructions.sh BINARY}
DURATION=${DURATION:-15s}; CONNECTIONS=${CONNECTIONS:-8}
source benches/lib.sh
need wrk wrk
need nginx nginx-light
need valgrind valgrind
install_needed
make_work
standin_port=$(free_port); relay_port=$(free_port)
signed_push
start_nginx "$work/nginx" ""
printf '%s' "$secret" >"$work/secret"; mkdir -p "$work/relay"
url=http://127.0.0.1:$relay_port/hooks/github; script=benches/peers/signed.lua; gateway="" what="signed pushes"
if [[ ${TARGET:-hooks} == gateway ]]; then
  url=http://127.0.0.1:$relay_port/api/v4/projects/9/trigger/pipeline; script=benches/peers/form.lua
  gateway='[gateway]\nupstream = "gitlab"\n' what="gateway calls"
fi
{ printf "[server]\nlisten = \"127.0.0.1:%s\"\n$gateway" "$relay_port"; relay_rules "$standin_port" "$work/secret"; } >"$work/relay/relay.toml"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind" \
  "$BIN" serve --config "$work/relay" --state "$work/state" >"$work/relay.log" 2>&1 & pid=$!
pids+=("$pid")
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$relay_port/healthz" && break; sleep 0.2; done
sleep 1
callgrind_control -i on "$pid" >/dev/null 2>&1
out=$(env BODY_FILE="$payload" SIGNATURE="$signature" DELIVERY_PREFIX="cg-$$" \
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$script" "$url")
callgrind_control -i off "$pid" >/dev/null 2>&1
callgrind_control -d "$pid" >/dev/null 2>&1
webhooks=$(awk '/requests in/ {print $1}' <<<"$out")
sleep 1
callgrind_annotate --inclusive=yes "$work"/callgrind.* 2>/dev/null | python3 -c '
import sys
webhooks = int(sys.argv[1])
parts = {
    "everything (all threads)": "PROGRAM TOTALS",
    "request path": "hookrelay::server::dispatch::{{closure}} [",
    "  of which the HMAC": "sha2::sha256::compress256 [",
    "  storing the webhook (headers, body)": "hookrelay::hooks::webhook_record [",
    "  the gateway call'"'"'s record": "hookrelay::gateway::record::{{closure}} [",
    "  sending the call to GitLab": "hookrelay::upstream::Upstream::exchange::{{closure}} [",
    "  log lines": "as tracing_core::subscriber::Subscriber>::event [",
    "store writer": "hookrelay::outbox::writer::Writer::group [",
}
seen = {}
for line in sys.stdin:
    for name, needle in parts.items():
        if needle in line and name not in seen:
            seen[name] = int(line.split()[0].replace(",", ""))
print(f"instructions per request, {webhooks} '"$what"' over '"$CONNECTIONS"' connections:")
for name in parts:
    if name in seen:
        print(f"  {name:40s} {seen[name] / webhooks / 1000:8.1f}k")
if "request path" in seen and "  of which the HMAC" in seen:
    outside = (seen["request path"] - seen["  of which the HMAC"]) / webhooks / 1000
    label = "request path outside the HMAC"
    print(f"  {label:40s} {outside:8.1f}k")
' "$webhooks"
