# Sourced by ../shared/bench/mailbox.sh (MAILBOX_EXTRA=...): runs postroom's POP3 beside Dovecot on
# the same generated Maildir, with the same client steps and checks (POP3: connect + USER/PASS,
# STAT, UIDL, RETR 1..N, QUIT; each rep = one cold + one warm session). See bench/README.md.
#
# postroom has no IMAP yet, so the IMAP port is 0 and mailbox.py skips the IMAP and mbsync rows
# for it (Dovecot still runs them).
#
# How the benchmark's Maildir becomes a postroom user's INBOX: postroom keeps a user's Maildir at
# data_dir/mail/<domain>/<local>/ (the path the accounts store hands out). After
# `postroom user add bench@bench.test`, that directory is replaced by a symlink to the harness's
# $EXTRA_MAILDIR, so postroom reads and renames exactly the files the harness restores
# before every cold session (hard links of the pristine tree), and its index files
# (postroom-index.sqlite, -wal, -shm, postroom-uidvalidity, postroom-pop3.lock, and
# dovecot-keywords once a keyword is set) sit in that Maildir's top level, where the cold reset
# deletes them like Dovecot's dovecot.index*.
# Nothing is copied.
#
# The server: one process, uvloop, run as root (`run_as = ""`, as peers-extra.sh does; on this
# machine the venv's interpreter lives under /root/.pyenv, which an unprivileged user cannot
# read, and after the drop to another user the first lazy import of the standard library fails:
# see RESULTS.md), POP3 on 127.0.0.1:$EXTRA_POP3_PORT with
# `pop3.allow_plaintext = true` (the client logs in with USER/PASS without TLS, as it does with
# Dovecot), no SMTP listener. Login is `bench@bench.test` / $MPASS. The password hash is argon2id
# at the cheapest cost ([passwords] time_cost 1, 8 KiB), as in peers-extra.sh: Dovecot's
# benchmark passdb is {PLAIN}, so neither side pays for a slow hash in the login step.
# The mail log goes to $RUN/mailbox-postroom.out.
#
# Knobs: PR_PY (postroom's Python, default /work/main/.venv/bin/python).
PR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PR_PY=${PR_PY:-$PR_ROOT/.venv/bin/python}
PR_DOMAIN=bench.test
PR_LOGIN=$MUSER@$PR_DOMAIN
PR_DIR=$EXTRA_DATA/postroom

pr_config() {
    rm -rf "$PR_DIR"; mkdir -p "$PR_DIR"
    cat >"$PR_DIR/postroom.toml" <<CONF
[server]
hostname = "mail.bench.test"
data_dir = "$PR_DIR/data"
run_as = ""
queue_process = false   # one process, as every figure in RESULTS.md was measured (no queue here)

[[listener]]
role = "pop3"
address = "127.0.0.1:$EXTRA_POP3_PORT"

[pop3]
allow_plaintext = true

[passwords]
time_cost = 1
memory_cost_kib = 8
parallelism = 1
CONF
    "$PR_PY" -m postroom -c "$PR_DIR/postroom.toml" domain add "$PR_DOMAIN" >/dev/null || return 1
    echo "$MPASS" | "$PR_PY" -m postroom -c "$PR_DIR/postroom.toml" \
        user add "$PR_LOGIN" --password-stdin >/dev/null || return 1
    local home=$PR_DIR/data/mail/$PR_DOMAIN/$MUSER
    [[ -d $home/cur ]] || { log "postroom: no Maildir at $home after user add"; return 1; }
    rm -rf "$home"
    ln -s "$EXTRA_MAILDIR" "$home"
}

extra_start() {
    pr_config || return 1
    start_bg postroom "$PR_PY" -m postroom -c "$PR_DIR/postroom.toml" serve
}

extra_bench() {
    local pid
    pid=$(cat "$RUN/mailbox-postroom.pid")
    bench_mailbox postroom 0 "$EXTRA_POP3_PORT" "$EXTRA_MAILDIR" --pid "$pid" \
        --user "$PR_LOGIN" --password "$MPASS"
}
