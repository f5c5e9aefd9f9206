# Sourced by ../shared/bench/peers.sh (PEERS_EXTRA=...): runs postroom beside its peers, with the
# same load (smtp-source, 4 KB, s20 and s1) and the same Maildir check. See bench/README.md.
PR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PR_PY=${PR_PY:-$PR_ROOT/.venv/bin/python}
PR_PORT=${PR_PORT:-2540}
PR_DIR=$RUN/postroom

extra_start() {
    rm -rf "$PR_DIR"; mkdir -p "$PR_DIR"
    cat >"$PR_DIR/postroom.toml" <<CONF
[server]
hostname = "mx.bench.test"
data_dir = "$PR_DIR/data"
run_as = ""
log_file = "$PR_DIR/mail.log"

[[listener]]
address = "127.0.0.1:$PR_PORT"

[smtp]
max_connections = 2000
max_connections_per_ip = 2000

[passwords]
time_cost = 1
memory_cost_kib = 8
parallelism = 1
CONF
    "$PR_PY" -m postroom -c "$PR_DIR/postroom.toml" domain add "$DOMAIN" >/dev/null
    echo bench-not-secret | "$PR_PY" -m postroom -c "$PR_DIR/postroom.toml" \
        user add "bench@$DOMAIN" --password-stdin >/dev/null
    start_bg postroom "$PR_PY" -m postroom -c "$PR_DIR/postroom.toml" serve
}

extra_bench() {
    bench_server postroom "$PR_PORT" --maildir "$PR_DIR/data/mail/$DOMAIN/bench"
}
