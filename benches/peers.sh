#!/usr/bin/env bash
# Side by side, in one run on 127.0.0.1, with wrk (-t1, 64 connections by default):
#
#   1. nginx `return 200`                        the ceiling of this machine
#   2. adnanh/webhook (HMAC-SHA256 + regex rule, runs /bin/true; not durable)
#   3. hookrelay /hooks/github: signed tag push, one tag rule, acknowledged once committed
#      (synchronous=FULL), with the forwarder sending every trigger to a stand-in GitLab
#   4. the same deliveries again: every one a duplicate
#   5. the stand-in GitLab called directly (nginx answering 201 with a pipeline)
#   6. hookrelay's gateway in front of that stand-in
#   7. nginx as a reverse proxy in front of it (a second nginx, one worker, keep-alive to
#      the stand-in): what a mature proxy adds on this machine, for the gateway's figure
#
# and hookrelay's resident memory idle and under load. Prints req/s, p50, p99 and the
# ratios. Installs wrk, webhook and nginx-light from Debian's packages when missing.
#
# Then the same systems again at one offered load below all their capacities (PACE_MS=32:
# each connection waits a random 0..2×PACE_MS between its requests, so 64 connections offer
# about 2,000 a second): what each adds to a request well short of saturation. At full
# load the latencies follow from the rates (64 connections / req/s), so this is where a
# gateway's own added latency shows.
#
# Webhooks are also sent over FEW_CONNECTIONS (16): at full load the mean latency is the
# connections divided by the rate, so this shows how far a latency target holds.
#
# Run: benches/peers.sh        (env: DURATION=10s, CONNECTIONS=64, PACE_MS=32,
#                               FEW_CONNECTIONS=16, HOOKRELAY=path/to/binary)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
PACE_MS=${PACE_MS:-32}
source benches/lib.sh
need wrk wrk
need webhook webhook
need nginx nginx-light
install_needed
if [[ -z "${HOOKRELAY:-}" ]]; then
  cargo build --release --quiet
  HOOKRELAY=target/release/hookrelay
fi

make_work

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

nginx_port=$(free_port); standin_port=$(free_port); webhook_port=$(free_port); relay_port=$(free_port)
proxy_port=$(free_port)
signed_push

# nginx: the ceiling, and the stand-in GitLab answering every trigger call 201.
start_nginx "$work/nginx" "server { listen 127.0.0.1:$nginx_port; location / { return 200 \"ok\"; } }"

# nginx as a reverse proxy to the stand-in: a process of its own, as the gateway is.
mkdir -p "$work/proxy"
cat >"$work/proxy/nginx.conf" <<CONF
worker_processes 1;
error_log $work/proxy/error.log;
pid $work/proxy/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/proxy;
  upstream standin { server 127.0.0.1:$standin_port; keepalive 64; }
  server {
    listen 127.0.0.1:$proxy_port;
    location / {
      proxy_pass http://standin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
nginx -c "$work/proxy/nginx.conf" -g 'daemon off;' & pids+=($!)

# adnanh/webhook with the same signature check and a regex on the ref.
cat >"$work/hooks.json" <<CONF
[{
  "id": "github",
  "execute-command": "/bin/true",
  "trigger-rule": { "and": [
    { "match": { "type": "payload-hmac-sha256", "secret": "$secret",
                 "parameter": { "source": "header", "name": "X-Hub-Signature-256" } } },
    { "match": { "type": "regex", "regex": "^refs/tags/",
                 "parameter": { "source": "payload", "name": "ref" } } }
  ] }
}]
CONF
webhook -hooks "$work/hooks.json" -ip 127.0.0.1 -port "$webhook_port" >"$work/webhook.log" 2>&1 & pids+=($!)

# hookrelay: the forwarder sends to the stand-in; limits raised so they do not pace it.
mkdir -p "$work/relay"
printf '%s' "$secret" >"$work/secret"
{
  printf '[server]\nlisten = "127.0.0.1:%s"\n[gateway]\nupstream = "gitlab"\n' "$relay_port"
  relay_rules "$standin_port" "$work/secret"
} >"$work/relay/relay.toml"
"$HOOKRELAY" serve --config "$work/relay" --state "$work/state" >"$work/relay.log" 2>&1 & relay_pid=$!; pids+=($relay_pid)

wait_for "http://127.0.0.1:$nginx_port/"
wait_for "http://127.0.0.1:$webhook_port/"
wait_for "http://127.0.0.1:$proxy_port/"
wait_for "http://127.0.0.1:$relay_port/healthz"
sleep 1
idle_rss=$(rss_kib "$relay_pid")

results=()
machine_before=$(cpu_times)
# run NAME URL SCRIPT [env…]: one wrk run; appends "name rate p50 p99" to results.
# CONNS overrides the connection count for one run.
run() {
  local name=$1 url=$2 script=$3; shift 3
  local out
  out=$(env "$@" BODY_FILE="$payload" SIGNATURE="$signature" \
        wrk -t1 -c"${CONNS:-$CONNECTIONS}" -d"$DURATION" --latency -s "$script" "$url")
  local rate p50 p99 errors
  completed=$(awk '/requests in/ {print $1}' <<<"$out")
  rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx or 3xx responses/ {print $5}' <<<"$out")
  results+=("$name|$rate|$p50|$p99|${errors:-0}")
  sleep 1
}

# Waits (at most 3 minutes) until hookrelay's forwarder has sent everything queued, so the
# next system is measured on an idle machine; prints how long the drain took.
drained() {
  local started=$SECONDS
  for _ in $(seq 1800); do
    depth=$(curl -s "http://127.0.0.1:$relay_port/metrics" | awk '/^hookrelay_outbox_depth / {print $2}')
    [[ "$depth" == 0 ]] && break
    sleep 0.1
  done
  echo $((SECONDS - started))
}

prefix="peers-$$-$(date +%s)"
run "nginx return 200 (ceiling)" "http://127.0.0.1:$nginx_port/" benches/peers/signed.lua
# adnanh/webhook answers before the command it starts has run; wait until every /bin/true
# it still has to start has finished, so the next system is measured on an idle machine.
webhook_idle() {
  local webhook_pid quiet=0
  webhook_pid=$(pgrep -f "webhook -hooks $work/hooks.json" | head -1)
  for _ in $(seq 1200); do
    if pgrep -P "$webhook_pid" >/dev/null; then quiet=0; else quiet=$((quiet + 1)); fi
    ((quiet >= 10)) && break
    sleep 0.1
  done
}
run "adnanh/webhook (HMAC + regex, /bin/true)" "http://127.0.0.1:$webhook_port/hooks/github" benches/peers/signed.lua
webhook_idle
run "hookrelay /hooks/github (new)" "http://127.0.0.1:$relay_port/hooks/github" benches/peers/signed.lua DELIVERY_PREFIX="$prefix"
load_rss=$(rss_kib "$relay_pid")
drain_seconds=$(drained)
stored=$completed
run "hookrelay /hooks/github (duplicates)" "http://127.0.0.1:$relay_port/hooks/github" benches/peers/signed.lua DELIVERY_PREFIX="$prefix" DELIVERY_MAX="$stored"
run "stand-in GitLab, direct" "http://127.0.0.1:$standin_port/api/v4/projects/9/trigger/pipeline" benches/peers/form.lua
run "hookrelay gateway -> stand-in" "http://127.0.0.1:$relay_port/api/v4/projects/9/trigger/pipeline" benches/peers/form.lua
run "nginx proxy_pass -> stand-in" "http://127.0.0.1:$proxy_port/api/v4/projects/9/trigger/pipeline" benches/peers/form.lua
# The same two over one connection: what one call through the gateway adds, unqueued.
CONNS=1 run "stand-in GitLab, direct, 1 conn" "http://127.0.0.1:$standin_port/api/v4/projects/9/trigger/pipeline" benches/peers/form.lua
CONNS=1 run "hookrelay gateway, 1 conn" "http://127.0.0.1:$relay_port/api/v4/projects/9/trigger/pipeline" benches/peers/form.lua
CONNS=1 run "nginx proxy_pass, 1 conn" "http://127.0.0.1:$proxy_port/api/v4/projects/9/trigger/pipeline" benches/peers/form.lua
# Webhooks over fewer connections (FEW_CONNECTIONS, 16 by default): how far a latency
# target at full load holds, since there the mean latency is connections / rate.
few=${FEW_CONNECTIONS:-16}
CONNS=$few run "adnanh/webhook, $few conns" "http://127.0.0.1:$webhook_port/hooks/github" benches/peers/signed.lua
webhook_idle
CONNS=$few run "hookrelay /hooks/github (new), $few conns" "http://127.0.0.1:$relay_port/hooks/github" benches/peers/signed.lua DELIVERY_PREFIX="$prefix-few"
drained >/dev/null

# The same at one offered load that every system keeps up with.
paced="paced ~$((CONNECTIONS * 1000 / PACE_MS))/s"
run "adnanh/webhook, $paced" "http://127.0.0.1:$webhook_port/hooks/github" benches/peers/signed.lua PACE_MS="$PACE_MS"
webhook_idle
run "hookrelay /hooks/github (new), $paced" "http://127.0.0.1:$relay_port/hooks/github" benches/peers/signed.lua DELIVERY_PREFIX="$prefix-paced" PACE_MS="$PACE_MS"
drained >/dev/null
run "stand-in GitLab, direct, $paced" "http://127.0.0.1:$standin_port/api/v4/projects/9/trigger/pipeline" benches/peers/form.lua PACE_MS="$PACE_MS"
run "hookrelay gateway, $paced" "http://127.0.0.1:$relay_port/api/v4/projects/9/trigger/pipeline" benches/peers/form.lua PACE_MS="$PACE_MS"
run "nginx proxy_pass, $paced" "http://127.0.0.1:$proxy_port/api/v4/projects/9/trigger/pipeline" benches/peers/form.lua PACE_MS="$PACE_MS"

# 1,000 open connections, each with half a request sent, held for a few seconds.
python3 - "$relay_port" <<'PY' &
import socket, sys, time
conns = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(1000)]
for c in conns:
    c.send(b"POST /hooks/github HTTP/1.1\r\nHost: 127.0.0.1\r\n")
time.sleep(4)
PY
holder=$!
sleep 2.5
conn_rss=$(rss_kib "$relay_pid")
wait "$holder"

echo "peers, one run: wrk -t1 -c$CONNECTIONS -d$DURATION on 127.0.0.1, $(nproc) cores"
printf '%-50s %12s %10s %10s %8s\n' system req/s p50 p99 non-2xx
for row in "${results[@]}"; do
  IFS='|' read -r name rate p50 p99 errors <<<"$row"
  printf '%-50s %12s %10s %10s %8s\n' "$name" "$rate" "$p50" "$p99" "$errors"
done
rate_of() { for row in "${results[@]}"; do IFS='|' read -r n r _ _ _ <<<"$row"; [[ $n == "$1" ]] && echo "$r"; done; }
p99_of() { for row in "${results[@]}"; do IFS='|' read -r n _ _ p _ <<<"$row"; [[ $n == "$1" ]] && echo "$p"; done; }
ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) print v/1000; else if (v ~ /ms$/) print v+0; else print v*1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo
echo "hookrelay acks / adnanh/webhook:        $(ratio "$(rate_of "hookrelay /hooks/github (new)")" "$(rate_of "adnanh/webhook (HMAC + regex, /bin/true)")")x"
echo "hookrelay duplicates / new deliveries:  $(ratio "$(rate_of "hookrelay /hooks/github (duplicates)")" "$(rate_of "hookrelay /hooks/github (new)")")x"
echo "hookrelay acks / nginx ceiling:         $(ratio "$(rate_of "hookrelay /hooks/github (new)")" "$(rate_of "nginx return 200 (ceiling)")")x"
echo "gateway p99 over direct p99, 64 conns: $(awk -v a="$(ms "$(p99_of "hookrelay gateway -> stand-in")")" -v b="$(ms "$(p99_of "stand-in GitLab, direct")")" 'BEGIN { printf "%+.2f ms", a - b }')"
echo "gateway p99 over direct p99, 1 conn:   $(awk -v a="$(ms "$(p99_of "hookrelay gateway, 1 conn")")" -v b="$(ms "$(p99_of "stand-in GitLab, direct, 1 conn")")" 'BEGIN { printf "%+.2f ms", a - b }')"
echo "nginx proxy p99 over direct p99, 64:   $(awk -v a="$(ms "$(p99_of "nginx proxy_pass -> stand-in")")" -v b="$(ms "$(p99_of "stand-in GitLab, direct")")" 'BEGIN { printf "%+.2f ms", a - b }')"
echo "nginx proxy p99 over direct p99, 1:    $(awk -v a="$(ms "$(p99_of "nginx proxy_pass, 1 conn")")" -v b="$(ms "$(p99_of "stand-in GitLab, direct, 1 conn")")" 'BEGIN { printf "%+.2f ms", a - b }')"
over_direct() { awk -v a="$(ms "$(p99_of "$1")")" -v b="$(ms "$(p99_of "stand-in GitLab, direct, $paced")")" 'BEGIN { printf "%+.2f ms", a - b }'; }
echo "gateway p99 over direct p99, $paced:    $(over_direct "hookrelay gateway, $paced")"
echo "nginx proxy p99 over direct p99, $paced: $(over_direct "nginx proxy_pass, $paced")"
echo "at $few connections: hookrelay acks / adnanh/webhook $(ratio "$(rate_of "hookrelay /hooks/github (new), $few conns")" "$(rate_of "adnanh/webhook, $few conns")")x, hookrelay p99 $(p99_of "hookrelay /hooks/github (new), $few conns")"
echo "hookrelay /hooks p99, $paced:           $(p99_of "hookrelay /hooks/github (new), $paced") (adnanh/webhook: $(p99_of "adnanh/webhook, $paced"))"
echo "gateway / direct throughput:            $(ratio "$(rate_of "hookrelay gateway -> stand-in")" "$(rate_of "stand-in GitLab, direct")")x"
echo "hookrelay RSS: idle $((idle_rss / 1024)) MiB, after the ack run $((load_rss / 1024)) MiB, with 1,000 open connections $((conn_rss / 1024)) MiB"
sent=$(grep -c 'forwarder: trigger sent' "$work/relay.log" || true)
echo "forwarder: $sent triggers sent to the stand-in in all (one project and ref, so one at a time);"
echo "           the backlog of the ack run was sent ${drain_seconds}s after it ended"
echo "CPU steal (the host running others) during the runs: $(steal_since "$machine_before") %"
