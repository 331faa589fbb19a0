#!/usr/bin/env bash
# Two hookrelay binaries under the same load, alternating (which goes first alternates too:
# use an even ROUNDS), in one run on 127.0.0.1: the way
# to tell a change's cost from this shared machine's noise (each round gives each binary a
# fresh state folder, the signed 7.8 KB GitHub tag push of benches/peers.sh, wrk -t1 -c64
# for DURATION, and its forwarder sending to a stand-in GitLab; then the mean of the rounds).
# Besides acks/s and p99 it prints the relay's CPU time per acknowledgement (user + system,
# read from /proc during the wrk run): steadier than req/s when the machine is busy; and the
# share of CPU time the host took away (steal) during the round.
#
# Run: benches/ab.sh OLD_BINARY NEW_BINARY      (env: ROUNDS=4, DURATION=10s, CONNECTIONS=64)
# TARGET=gateway measures the trigger API gateway instead (benches/peers/form.lua, a form
# POST to /api/v4/projects/9/trigger/pipeline; "acks" are then answered calls);
# GATEWAY_LIMITS=1 adds a per-client limit that every call is checked against.
# STATUS=new gives the new binary's GitHub source `status = { … }` (posting to the stand-in),
# so that one binary against itself measures what reporting statuses costs the webhooks.
# DELIVERY_IDS=uuid sends random UUIDs as delivery ids (as the forges do) instead of counting
# ones; NEW_IDS=uuid sends them to the new binary only, so that one binary against itself
# measures what random ids cost.
# STORE=postgres stores in a throwaway PostgreSQL instead of SQLite (a fresh database each
# round, checkpointed before it, on a server aged as in lib.sh; installs Debian's
# postgresql when missing) and also prints the database's CPU time
# per acknowledgement (every PostgreSQL process, from /proc).
# e.g. git worktree add /tmp/old HEAD~5 && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target
#      cargo build --release) && cargo build --release &&
#      benches/ab.sh /tmp/old-target/release/hookrelay target/release/hookrelay
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: benches/ab.sh OLD_BINARY NEW_BINARY}
NEW=${2:?usage: benches/ab.sh OLD_BINARY NEW_BINARY}
ROUNDS=${ROUNDS:-4}; DURATION=${DURATION:-10s}; CONNECTIONS=${CONNECTIONS:-64}
STORE=${STORE:-sqlite}
source benches/lib.sh
need wrk wrk
need nginx nginx-light
[[ $STORE == postgres ]] && need_postgres
install_needed
make_work
standin_port=$(free_port); relay_port=$(free_port)
signed_push
start_nginx "$work/nginx" ""
printf '%s' "$secret" >"$work/secret"
mkdir -p "$work/relay-old" "$work/relay-new"
url=http://127.0.0.1:$relay_port/hooks/github; script=benches/peers/signed.lua; gateway=""
if [[ ${TARGET:-hooks} == gateway ]]; then
  url=http://127.0.0.1:$relay_port/api/v4/projects/9/trigger/pipeline; script=benches/peers/form.lua
  gateway='[gateway]\nupstream = "gitlab"\n'
  # GATEWAY_LIMITS=1: a per-client limit too high to refuse, so every call is checked
  # (on PostgreSQL, a round trip to the shared limit).
  [[ -n ${GATEWAY_LIMITS:-} ]] && gateway+='limit = { per_client = "100000000/min", burst = 1000000 }\n'
fi
{ printf "[server]\nlisten = \"127.0.0.1:%s\"\n$gateway" "$relay_port"; relay_rules "$standin_port" "$work/secret"; } >"$work/relay-old/relay.toml"
if [[ ${STATUS:-} == new ]]; then
  sed "s|^secret = \"file:$work/secret\"|&\nstatus = { token = \"file:$work/secret\", api_url = \"http://127.0.0.1:$standin_port\" }|" \
    "$work/relay-old/relay.toml" >"$work/relay-new/relay.toml"
else
  cp "$work/relay-old/relay.toml" "$work/relay-new/relay.toml"
fi
declare -A rates p99s cpus db_cpus
pg_port=""
if [[ $STORE == postgres ]]; then
  pg_port=$(free_port)
  start_postgres "$work/pg" "$pg_port"
fi
for round in $(seq "$ROUNDS"); do
  # Which goes first alternates (old first in odd rounds, new first in even), so that a
  # pair's order cannot pass for the change: one comparison read 0.947x with the old binary
  # first and 1.017x with the new first (docs/benchmarks.md).
  order="old new"; ((round % 2 == 0)) && order="new old"
  for which in $order; do
    bin=$OLD; [[ $which == new ]] && bin=$NEW
    rm -rf "$work/state"
    if [[ -n $pg_port ]]; then
      runuser -u postgres -- "$(postgres_bin)/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres "ab_${which}_$round"
      printf '[store]\nurl = "postgres://postgres@127.0.0.1:%s/ab_%s_%s"\n' "$pg_port" "$which" "$round" \
        >"$work/relay-$which/store.toml"
    fi
    "$bin" serve --config "$work/relay-$which" --state "$work/state" >"$work/$which.log" 2>&1 & pid=$!
    wait_for "http://127.0.0.1:$relay_port/healthz"; sleep 1
    database=""; [[ -n $pg_port ]] && database=$(postgres_pids "$work/pg") && checkpoint_postgres "$pg_port"
    before=$(process_ticks "$pid"); db_before=$(process_ticks $database); machine_before=$(cpu_times)
    ids=${DELIVERY_IDS:-}; [[ $which == new && -n ${NEW_IDS:-} ]] && ids=$NEW_IDS
    out=$(env BODY_FILE="$payload" SIGNATURE="$signature" DELIVERY_PREFIX="ab-$which-$round-$$" DELIVERY_IDS="$ids" \
      wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$script" "$url")
    ticks=$(($(process_ticks "$pid") - before)); db_ticks=$(($(process_ticks $database) - db_before))
    rate=$(awk '/Requests\/sec/ {print $2}' <<<"$out"); p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    done_count=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(python3 -c "print(round($ticks * 1e6 / $(getconf CLK_TCK) / $done_count, 1))")
    db_cpu=$(python3 -c "print(round($db_ticks * 1e6 / $(getconf CLK_TCK) / $done_count, 1))")
    db_text=""; [[ -n $pg_port ]] && db_text=", database CPU ${db_cpu} us/ack"
    echo "round $round $which: $rate acks/s, p99 $p99, relay CPU ${cpu} us/ack$db_text, steal $(steal_since "$machine_before") %"
    rates[$which]="${rates[$which]:-} $rate"; p99s[$which]="${p99s[$which]:-} $p99"; cpus[$which]="${cpus[$which]:-} $cpu"
    db_cpus[$which]="${db_cpus[$which]:-} $db_cpu"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    sleep 2
  done
done
# mean VALUES…: the mean, with wrk's latencies (900.00us, 14.89ms, 1.02s) in milliseconds.
mean() {
  python3 - "$@" <<'PY'
import sys
def ms(text):
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)
values = [ms(v) for v in sys.argv[1:]]
print(round(sum(values) / len(values), 2))
PY
}
old_rate=$(mean ${rates[old]}); new_rate=$(mean ${rates[new]})
echo "mean acks/s: old $old_rate, new $new_rate, new/old $(python3 -c "print(round($new_rate/$old_rate, 3))")"
echo "mean p99 (ms): old $(mean ${p99s[old]}), new $(mean ${p99s[new]})"
old_cpu=$(mean ${cpus[old]}); new_cpu=$(mean ${cpus[new]})
echo "mean relay CPU per ack (us): old $old_cpu, new $new_cpu, new/old $(python3 -c "print(round($new_cpu/$old_cpu, 3))")"
if [[ -n $pg_port ]]; then
  old_db=$(mean ${db_cpus[old]}); new_db=$(mean ${db_cpus[new]})
  echo "mean database CPU per ack (us): old $old_db, new $new_db, new/old $(python3 -c "print(round($new_db/$old_db, 3))")"
fi
