#!/usr/bin/env bash
# hookrelay on PostgreSQL beside hookrelay on SQLite, in one run on 127.0.0.1, with wrk
# (-t1, 64 connections by default) sending signed GitHub tag pushes (every delivery new):
#
#   1. one SQLite relay                              (the default store)
#   2. one PostgreSQL relay, called directly
#   3. 1, 2 and 4 PostgreSQL relays behind nginx     (round robin, as the README shows)
#
# Every relay runs its forwarder, sending each trigger to a stand-in GitLab (nginx
# answering 201). PostgreSQL 15 runs with its defaults (fsync on, synchronous_commit on)
# but max_wal_size = 8GB, as the README recommends, in a temporary folder, aged like a
# server that has been running and checkpointed before each run (lib.sh). For each run:
# acks/s, p50, p99, and CPU time per 1,000 acks of the relays and of PostgreSQL, read
# from /proc. Then the drain: triggers sent per second (first send to last) from
# a backlog queued while GitLab was down, on one project+ref and on 1,000 of them.
#
# A run whose p99 reaches STALL_MS (50 by default) had a stall: the relays' warnings and
# PostgreSQL's log are printed after the table.
#
# Run: benches/cluster.sh   (env: DURATION=10s, CONNECTIONS=64, HOOKRELAY=path/to/binary, STALL_MS=50)
# Installs wrk, nginx-light and postgresql from Debian's packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
source benches/lib.sh
need wrk wrk
need nginx nginx-light
need_postgres
install_needed
if [[ -z "${HOOKRELAY:-}" ]]; then
  cargo build --release --quiet
  HOOKRELAY=target/release/hookrelay
fi
HOOKRELAY=$(realpath "$HOOKRELAY")
pgbin=$(postgres_bin)

make_work

standin_port=$(free_port); pg_port=$(free_port); sqlite_port=$(free_port)
relay_ports=($(free_port) $(free_port) $(free_port) $(free_port))
lb_ports=($(free_port) $(free_port) $(free_port))
signed_push

start_postgres "$work/pg" "$pg_port"
runuser -u postgres -- "$pgbin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres hookrelay
database="postgres://postgres@127.0.0.1:$pg_port/hookrelay"

# nginx: the stand-in GitLab, and one round-robin balancer each for 1, 2 and 4 relays.
balancers=""
for i in 0 1 2; do
  count=$((1 << i)); servers=""
  for ((r = 0; r < count; r++)); do servers+="server 127.0.0.1:${relay_ports[$r]}; "; done
  balancers+="upstream relays$count { $servers keepalive 64; }
  server { listen 127.0.0.1:${lb_ports[$i]}; location / { proxy_pass http://relays$count; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }
"
done
start_nginx "$work/nginx" "$balancers"

printf '%s' "$secret" >"$work/secret"
rules() { relay_rules "$1" "$work/secret" "${2:-acme/app}"; }
mkdir -p "$work/sqlite-config" "$work/pg-config"
rules "$standin_port" >"$work/sqlite-config/relay.toml"
rules "$standin_port" >"$work/pg-config/relay.toml"
printf '[store]\nurl = "%s"\n' "$database" >"$work/pg-config/store.toml"

relay_pids=()
start_relay() { # start_relay N: PostgreSQL relay number N on relay_ports[N]
  "$HOOKRELAY" serve --config "$work/pg-config" --state "$work/unused-$1" --listen "127.0.0.1:${relay_ports[$1]}" \
    >"$work/relay-$1.log" 2>&1 &
  relay_pids+=($!); pids+=($!)
  wait_for "http://127.0.0.1:${relay_ports[$1]}/healthz"
}
"$HOOKRELAY" serve --config "$work/sqlite-config" --state "$work/sqlite-state" --listen "127.0.0.1:$sqlite_port" \
  >"$work/sqlite.log" 2>&1 & sqlite_pid=$!; pids+=($sqlite_pid)
wait_for "http://127.0.0.1:$sqlite_port/healthz"
wait_for "http://127.0.0.1:$standin_port/"

depth() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^hookrelay_outbox_depth/ {print $2; exit}'; }
drained() { for _ in $(seq 1800); do [[ "$(depth "$1")" == 0 ]] && return; sleep 0.1; done; }

results=()
pg_log_from=$(($(wc -l <"$work/pg/log") + 1))  # PostgreSQL's log from the runs on
# run NAME PORT CPU-PIDS…: one wrk run against 127.0.0.1:PORT; CPU of the given relay
# processes and of every PostgreSQL process, per 1,000 acknowledged webhooks.
run() {
  local name=$1 port=$2; shift 2
  local relays=("$@") pg
  checkpoint_postgres "$pg_port"
  pg=$(postgres_pids "$work/pg")
  local relay_before pg_before out machine_before
  relay_before=$(process_ticks "${relays[@]}"); pg_before=$(process_ticks $pg); machine_before=$(cpu_times)
  out=$(BODY_FILE="$payload" SIGNATURE="$signature" DELIVERY_PREFIX="cluster-$$-$RANDOM-$name" \
        wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s benches/peers/signed.lua "http://127.0.0.1:$port/hooks/github")
  local relay_cpu pg_cpu completed rate p50 p99 errors hz steal
  steal=$(steal_since "$machine_before")
  hz=$(getconf CLK_TCK)
  relay_cpu=$(( $(process_ticks "${relays[@]}") - relay_before )); pg_cpu=$(( $(process_ticks $pg) - pg_before ))
  completed=$(awk '/requests in/ {print $1}' <<<"$out")
  rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx or 3xx responses/ {print $5}' <<<"$out")
  local per_k_relay per_k_pg
  per_k_relay=$(awk -v t="$relay_cpu" -v n="$completed" -v hz="$hz" 'BEGIN { printf "%.0f", t / hz * 1000 / n * 1000 }')
  per_k_pg=$(awk -v t="$pg_cpu" -v n="$completed" -v hz="$hz" 'BEGIN { printf "%.0f", t / hz * 1000 / n * 1000 }')
  results+=("$name|$rate|$p50|$p99|${errors:-0}|$per_k_relay|$per_k_pg|$steal")
}

run "SQLite relay" "$sqlite_port" "$sqlite_pid"
drained "$sqlite_port"
start_relay 0
run "PostgreSQL relay, direct" "${relay_ports[0]}" "${relay_pids[@]}"
drained "${relay_ports[0]}"
run "1 PostgreSQL relay behind nginx" "${lb_ports[0]}" "${relay_pids[@]}"
drained "${relay_ports[0]}"
start_relay 1
run "2 PostgreSQL relays behind nginx" "${lb_ports[1]}" "${relay_pids[@]}"
drained "${relay_ports[0]}"
start_relay 2; start_relay 3
run "4 PostgreSQL relays behind nginx" "${lb_ports[2]}" "${relay_pids[@]}"
drained "${relay_ports[0]}"

echo "cluster, one run: wrk -t1 -c$CONNECTIONS -d$DURATION on 127.0.0.1, $(nproc) cores, PostgreSQL $("$pgbin/postgres" --version | awk '{print $3}')"
printf '%-36s %10s %9s %9s %8s %14s %14s %8s\n' system acks/s p50 p99 non-2xx "relay ms/1k" "postgres ms/1k" "steal %"
stalled=""
for row in "${results[@]}"; do
  IFS='|' read -r name rate p50 p99 errors relay pg steal <<<"$row"
  printf '%-36s %10s %9s %9s %8s %14s %14s %8s\n' "$name" "$rate" "$p50" "$p99" "$errors" "$relay" "$pg" "$steal"
  # wrk writes 795.00us, 9.11ms, 1.20s.
  awk -v t="$p99" -v stall="${STALL_MS:-50}" \
    'BEGIN { v = t + 0; if (t ~ /us$/) v /= 1000; else if (t ~ /[0-9]s$/ && t !~ /ms$/) v *= 1000; exit !(v >= stall) }' &&
    stalled+="$name, "
done
rate_of() { for row in "${results[@]}"; do IFS='|' read -r n r _ _ _ _ _ _ <<<"$row"; [[ $n == "$1" ]] && echo "$r"; done; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo
echo "one PostgreSQL relay / SQLite relay: $(ratio "$(rate_of "PostgreSQL relay, direct")" "$(rate_of "SQLite relay")")x"
echo "2 relays / 1 relay behind nginx:     $(ratio "$(rate_of "2 PostgreSQL relays behind nginx")" "$(rate_of "1 PostgreSQL relay behind nginx")")x"
echo "4 relays / 1 relay behind nginx:     $(ratio "$(rate_of "4 PostgreSQL relays behind nginx")" "$(rate_of "1 PostgreSQL relay behind nginx")")x"
# A p99 of 50 ms or more is a stall, not the load: what the relays warned of and what
# PostgreSQL logged (checkpoints, autovacuum, statements of 50 ms or more) during the
# runs, for finding its cause; the folder with the logs is gone when the script ends.
if [[ -n $stalled ]]; then
  echo
  echo "p99 of ${STALL_MS:-50} ms or more in: ${stalled%, }. The relays' warnings, then PostgreSQL's log:"
  grep -h -E ' (WARN|ERROR) ' "$work"/sqlite.log "$work"/relay-*.log | tail -n 40 || true
  # Each entry from its time stamp to the next; the server's own vacuuming of other
  # databases' catalogs (after the aging's transactions) left out.
  tail -n +"$pg_log_from" "$work/pg/log" | awk '
    /^[0-9][0-9][0-9][0-9]-/ { keep = !($0 ~ /automatic .*(vacuum|analyze) of table "/ && $0 !~ /of table "hookrelay\./) }
    keep && NF' | tail -n 60 || true
fi

# The drain: stop the relays, queue a backlog with GitLab "down" (a closed port), make all
# of it due, then start one relay with GitLab up and time it. While GitLab is down the
# relay pauses it as a whole (1 s, doubling, up to 30 s) and moves the waiting triggers
# past the pause in the store; left so, the last pause (up to 8 s after the backlog was
# queued) set the drain's pace whenever it was long, not the relay (1,000 project+refs read
# 507/s in one run and 1,983/s in the next, one binary).
drain() { # drain NAME PROJECT-TEMPLATE COUNT
  local name=$1 project=$2 count=$3
  for pid in "${relay_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${relay_pids[@]}" 2>/dev/null || true
  relay_pids=()
  rules "$(free_port)" "$project" >"$work/pg-config/relay.toml"
  start_relay 0
  python3 - "${relay_ports[0]}" "$payload" "$secret" "$count" "$name" <<'PY'
import hashlib, hmac, http.client, sys, json
port, payload, secret, count, name = int(sys.argv[1]), open(sys.argv[2], "rb").read(), sys.argv[3].encode(), int(sys.argv[4]), sys.argv[5]
conn = http.client.HTTPConnection("127.0.0.1", port)
for i in range(count):
    body = json.loads(payload)
    body["ref"] = f"refs/tags/v{i}"
    raw = json.dumps(body).encode()
    sig = "sha256=" + hmac.new(secret, raw, hashlib.sha256).hexdigest()
    conn.request("POST", "/hooks/github", raw, {"Content-Type": "application/json", "X-GitHub-Event": "push",
                 "X-GitHub-Delivery": f"drain-{name}-{i}", "X-Hub-Signature-256": sig})
    response = conn.getresponse(); response.read()
    assert response.status == 202, response.status
PY
  kill "${relay_pids[0]}"; wait "${relay_pids[0]}" 2>/dev/null || true; relay_pids=()
  "$pgbin/psql" -q -h 127.0.0.1 -p "$pg_port" -U postgres hookrelay \
    -c "UPDATE hr_triggers SET due_at = 0 WHERE state = 'queued'" \
    -c "UPDATE hr_keys SET due_at = 0 WHERE due_at IS NOT NULL"
  rules "$standin_port" "$project" >"$work/pg-config/relay.toml"
  start_relay 0
  drained "${relay_ports[0]}"
  # From the first send to the last, by the relay's log: the heads tried while GitLab was
  # down wait out their retry delay first, which says nothing of how fast the relay sends.
  grep "trigger sent" "$work/relay-0.log" | awk -v name="$name" -v n="$count" '
    { split(substr($1, 12, 15), t, ":"); at = t[1] * 3600 + t[2] * 60 + t[3]; if (!first) first = at; last = at }
    END { printf "drain, %s: %d triggers sent in %.1f s, %.0f/s\n", name, n, last - first, (n - 1) / (last - first) }'
}
drain "one project+ref" "acme/app" 5000
drain "1,000 project+refs" "acme/app-{{ event.ref_name | replace('v', '') | int % 1000 }}" 5000
