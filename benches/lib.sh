# Shared by the benchmark scripts (sourced, not run).

# need COMMAND PACKAGE: notes Debian's PACKAGE for install_needed when COMMAND is missing;
# install_needed installs every package noted.
missing=()
need() { command -v "$1" >/dev/null || missing+=("$2"); }
# need_postgres: notes Debian's postgresql when its server binaries are missing (they are
# not on the PATH: see postgres_bin).
need_postgres() { [[ -n $(postgres_bin) ]] || missing+=(postgresql); }
install_needed() {
  ((${#missing[@]})) || return 0
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "not up: $1" >&2; exit 1; }

# process_ticks PID…: user + system clock ticks the processes have used so far (a process
# that is gone counts nothing).
process_ticks() {
  local sum=0
  for pid in "$@"; do
    [[ -r /proc/$pid/stat ]] && sum=$((sum + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$sum"
}

# PostgreSQL's server binaries from Debian's postgresql package (the newest version).
# make_work: a temporary folder $work (readable by the postgres user) and an empty $pids,
# cleaned up at exit by clean_work.
make_work() {
  work=$(mktemp -d); chmod 755 "$work"; pids=()
  trap clean_work EXIT
}
# clean_work: every process in $pids killed, start_postgres's server in $work/pg stopped
# if it runs, $work removed.
clean_work() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  stop_postgres "$work/pg"
  wait 2>/dev/null || true
  rm -rf "$work"
}
postgres_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort | tail -1; }
# start_postgres DIR PORT: a throwaway PostgreSQL in DIR on 127.0.0.1:PORT, run as the
# unprivileged postgres user (it refuses root). Its durability defaults (fsync and
# synchronous_commit on), with the three settings the README recommends for a busy
# cluster ("What to set in PostgreSQL"): max_wal_size (the default 1 GB forces a
# checkpoint every half minute at these rates, and a run that meets one measures the
# checkpoint), min_wal_size (WAL segments kept for reuse) and backend_flush_after (pages
# written out by a backend go to disk as they come, not in one burst 30 s later). Its log
# has checkpoints, autovacuum runs and statements of 50 ms or more (without their
# parameters), for finding what a stall was (cluster.sh prints it after one). Then
# aged like a cluster that has been running (see age_postgres).
start_postgres() {
  local bin; bin=$(postgres_bin)
  mkdir -p "$1" && chown postgres:postgres "$1"
  runuser -u postgres -- "$bin/initdb" -A trust -U postgres -D "$1/data" >/dev/null
  runuser -u postgres -- "$bin/pg_ctl" start -w -D "$1/data" -l "$1/log" \
    -o "-p $2 -k $1 -c listen_addresses=127.0.0.1 -c max_connections=200 -c max_wal_size=8GB -c min_wal_size=2GB -c backend_flush_after=256kB \
          -c log_checkpoints=on -c log_autovacuum_min_duration=0 -c log_min_duration_statement=50 -c log_parameter_max_length=0" >/dev/null
  age_postgres "$2"
}
# age_postgres PORT: about 650 MB of WAL written and checkpointed, so that the server has
# old WAL segments to reuse, as one that has been running has. A new cluster creates each
# 16 MB segment by writing zeros into it and flushing them, and the commit that needs the
# next segment waits 16-64 ms: at the relay's rates one commit in 140, and a run's p99
# measured that (README, "What to set in PostgreSQL"). Reused segments are renamed, not
# written; checkpoints keep about twice the WAL between two of them for reuse.
age_postgres() {
  "$(postgres_bin)/psql" -q -h 127.0.0.1 -p "$1" -U postgres postgres -c "CREATE TABLE aging (x text);
    INSERT INTO aging SELECT repeat('x', 900) FROM generate_series(1, 700000);
    DROP TABLE aging; CHECKPOINT;"
}
# checkpoint_postgres PORT: a checkpoint now, before a measured run: the WAL of the runs
# before it becomes segments to reuse, and their pages are on disk.
checkpoint_postgres() { "$(postgres_bin)/psql" -q -h 127.0.0.1 -p "$1" -U postgres postgres -c CHECKPOINT; }
# stop_postgres DIR: stops start_postgres's server in DIR, if it runs.
stop_postgres() {
  [[ -f "$1/data/postmaster.pid" ]] || return 0
  runuser -u postgres -- "$(postgres_bin)/pg_ctl" stop -m fast -D "$1/data" >/dev/null 2>&1 || true
}
# postgres_pids DIR: the server's postmaster and every process it started.
postgres_pids() {
  local postmaster; postmaster=$(head -1 "$1/data/postmaster.pid")
  echo "$postmaster $(pgrep -P "$postmaster" | tr '\n' ' ')"
}

# cpu_times: this machine's CPU time so far, in ticks, "all steal" (/proc/stat's first line;
# steal is time the host ran someone else while this machine had work).
cpu_times() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9 }' /proc/stat; }
# steal_since "ALL STEAL": the share of CPU time since then that the host took away, in
# percent; a run with a high share read low figures for reasons outside it.
steal_since() {
  local t0 s0 t1 s1
  read -r t0 s0 <<<"$1"; read -r t1 s1 <<<"$(cpu_times)"
  awk -v t="$((t1 - t0))" -v s="$((s1 - s0))" 'BEGIN { printf "%.1f", t ? 100 * s / t : 0 }'
}

# github_signature SECRET FILE: X-Hub-Signature-256 for FILE's bytes.
github_signature() {
  echo "sha256=$(python3 -c 'import hmac,hashlib,sys; print(hmac.new(sys.argv[1].encode(), open(sys.argv[2],"rb").read(), hashlib.sha256).hexdigest())' "$1" "$2")"
}
# signed_push: the webhook every benchmark sends: sets secret (the source's secret),
# payload (a 7.8 KB GitHub tag push) and signature (its X-Hub-Signature-256).
signed_push() {
  secret="It's a Secret to Everybody"
  payload=$PWD/tests/fixtures/github/push_tag.json
  signature=$(github_signature "$secret" "$payload")
}

# relay_rules STANDIN_PORT SECRET_FILE [PROJECT]: the relay configuration every benchmark
# measures: one upstream (the stand-in GitLab, limits raised so they do not pace the
# forwarder), a signed GitHub source, and one tag rule.
relay_rules() {
  cat <<CONF
[upstream.gitlab]
url = "http://127.0.0.1:$1"
limit = { per_project = "1000000/min", burst = 100000 }
[source.github]
provider = "github"
secret = "file:$2"
[[rule]]
name = "tags"
source = "github"
events = ["tag"]
[rule.trigger]
project = "${3:-acme/app}"
ref = "main"
token = "file:$2"
variables = { UPSTREAM_TAG = "{{ event.ref_name }}", UPSTREAM_SHA = "{{ event.after }}" }
CONF
}

# start_nginx DIR SERVERS: nginx (one worker, no access log) in the foreground of a
# background job, with the stand-in GitLab every benchmark sends to (answering every call
# 201 with a pipeline) on $standin_port and the extra server blocks SERVERS; adds its pid to
# pids.
start_nginx() {
  mkdir -p "$1"
  cat >"$1/nginx.conf" <<CONF
worker_processes 1;
error_log $1/error.log;
pid $1/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $1;
  server {
    listen 127.0.0.1:$standin_port;
    location / {
      default_type application/json;
      return 201 '{"id":4242,"iid":7,"status":"created","ref":"main","web_url":"http://gitlab.example/acme/app/-/pipelines/4242"}';
    }
  }
  $2
}
CONF
  nginx -c "$1/nginx.conf" -g 'daemon off;' & pids+=($!)
}
