#!/usr/bin/env bash
# A window's replan: N signed GitHub tag pushes that matched no rule, the rule fixed, then
# `replay --unmatched --since 1h --dry-run` and `replay --unmatched --since 1h`, timed
# (wall and user seconds), for each binary given, each on a store of its own in the same
# run (the ratio between them is the figure; the machine's speed moves).
#
# Run: benches/replan.sh BINARY...   (env: STORE=sqlite|postgres, N=2000)
set -eu
cd "$(dirname "$0")/.."
(($#)) || { echo "usage: benches/replan.sh BINARY..." >&2; exit 2; }
STORE=${STORE:-sqlite}; N=${N:-2000}
source benches/lib.sh
[[ $STORE == postgres ]] && need_postgres
install_needed
make_work
signed_push
pg_port=$(free_port)
[[ $STORE == postgres ]] && start_postgres "$work/pg" "$pg_port"
run=0
for bin in "$@"; do
  run=$((run + 1)); dir="$work/run$run"; mkdir -p "$dir"
  printf '%s' "$secret" >"$dir/secret"
  relay_port=$(free_port)
  relay_rules 9 "$dir/secret" >"$dir/relay.toml"
  sed -i 's/^events = \["tag"\]$/events = ["tag"]\nrefs = ["release-*"]/' "$dir/relay.toml"
  if [[ $STORE == postgres ]]; then
    "$(postgres_bin)/psql" -q -h 127.0.0.1 -p "$pg_port" -U postgres postgres -c "CREATE DATABASE run$run"
    printf '[store]\nurl = "postgres://postgres@127.0.0.1:%s/run%s"\n' "$pg_port" "$run" >>"$dir/relay.toml"
  fi
  "$bin" serve --config "$dir/relay.toml" --state "$dir/state" --listen "127.0.0.1:$relay_port" \
    >"$dir/relay.log" 2>&1 & relay=$!
  wait_for "http://127.0.0.1:$relay_port/healthz"
  python3 - "$relay_port" "$payload" "$signature" "$N" <<'PY'
import http.client, sys
port, body, signature, n = int(sys.argv[1]), open(sys.argv[2], 'rb').read(), sys.argv[3], int(sys.argv[4])
connection = http.client.HTTPConnection('127.0.0.1', port)
for i in range(n):
    connection.request('POST', '/hooks/github', body=body, headers={
        'X-GitHub-Event': 'push', 'X-GitHub-Delivery': 'replan-%06d' % i,
        'X-Hub-Signature-256': signature, 'Content-Type': 'application/json'})
    answer = connection.getresponse(); answer.read()
    assert answer.status == 200, answer.status
PY
  kill "$relay"; wait "$relay" || true
  sed -i 's/^refs = \["release-\*"\]$/refs = ["*"]/' "$dir/relay.toml"
  for how in --dry-run ""; do
    /usr/bin/time -f "%e %U" -o "$dir/time" "$bin" replay --config "$dir/relay.toml" \
      --state "$dir/state" --unmatched --since 1h $how >"$dir/out" 2>&1
    printf '%-40s %-9s %s: %s s, %s s user\n' "$bin" "${how:-record}" "$(tail -1 "$dir/out" | cut -c1-40)" \
      $(cat "$dir/time")
  done
done
