# Sourced by ../shared/bench/peers.sh (PEERS_EXTRA=...): runs postroom beside its peers, with the
# same load (smtp-source, 4 KB, s20 and s1) and the same Maildir check. See bench/README.md.
# Two rows: "postroom" (one process) and "postroom-w2" (server.workers = 2).
# The mail log goes to stderr, which start_bg sends to $RUN/<name>.out: one log, as Postfix's.
PR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PR_PY=${PR_PY:-$PR_ROOT/.venv/bin/python}
PR_VARIANTS=${PR_VARIANTS:-"postroom:2540:1 postroom-w2:2541:2"}

pr_config() {   # NAME PORT WORKERS
    local dir=$RUN/$1
    rm -rf "$dir"; mkdir -p "$dir"
    cat >"$dir/postroom.toml" <<CONF
[server]
hostname = "mx.bench.test"
data_dir = "$dir/data"
run_as = ""
workers = $3
queue_process = false   # as the recorded issue-2 figures were measured (local mail: no queue)

[[listener]]
address = "127.0.0.1:$2"

[smtp]
max_connections = 2000
max_connections_per_ip = 2000

[passwords]
time_cost = 1
memory_cost_kib = 8
parallelism = 1
CONF
    "$PR_PY" -m postroom -c "$dir/postroom.toml" domain add "$DOMAIN" >/dev/null
    echo bench-not-secret | "$PR_PY" -m postroom -c "$dir/postroom.toml" \
        user add "bench@$DOMAIN" --password-stdin >/dev/null
}

extra_start() {
    local v name port workers
    for v in $PR_VARIANTS; do
        IFS=: read -r name port workers <<<"$v"
        pr_config "$name" "$port" "$workers"
        start_bg "$name" "$PR_PY" -m postroom -c "$RUN/$name/postroom.toml" serve
    done
}

extra_bench() {
    local v name port workers
    for v in $PR_VARIANTS; do
        IFS=: read -r name port workers <<<"$v"
        bench_server "$name" "$port" --maildir "$RUN/$name/data/mail/$DOMAIN/bench"
    done
}
