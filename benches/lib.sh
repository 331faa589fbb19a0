# Shared by the benchmark scripts (sourced, not run).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "not up: $1" >&2; exit 1; }

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
