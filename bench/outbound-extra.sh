# Sourced by ../shared/bench/outbound.sh (OUTBOUND_EXTRA=...): runs postroom beside Postfix with the
# same DNS (dnsmasq on 127.0.0.1:53), the same smtp-sink MX hosts (127.0.0.2:25, 127.0.0.3:25),
# the same injection (WARMUP, then REPS x MSGS over d1/d2/d3.test, 7 smtp-source sessions each)
# and the same completion criterion (the sinks counted every message and postroom's spool,
# queue/incoming and queue/active, is empty). See bench/README.md.
#
# Rows (one postroom server each, uvloop, run as root like peers-extra.sh, mail log on stderr
# -> $OB/<name>.out):
#   postroom        inject and relay at the same time (Postfix's "defaults" row), in ONE process
#                   (server.queue_process = false)
#   postroom-w2     (only when listed in PR_ROWS) the same as postroom with server.workers = 2:
#                   both workers take connections, worker 0 alone runs the queue runner
#   postroom-q      postroom's default since 2026-11-30 (server.queue_process = true): one
#                   worker takes the connections, the queue manager (relay) runs in a process of
#                   its own and gets each queued message's id from the worker (two cores)
#   postroom-w2q    (only when listed in PR_ROWS) workers = 2 and queue_process = true
#   postroom-drain  the intake phase with the queue runner paused (every message ends up in
#                   queue/active), then the runner is started and only the relay of the
#                   backlog is timed: Postfix's "drain" row (hold, then postsuper -H ALL).
#                   outbound.py's drain mode is Postfix-only, so this hook drives it with the
#                   same measuring code (outbound.py's one_run, imported) and two signals to
#                   the server: SIGUSR2 pauses the runner, SIGUSR1 starts it.
# Every row is started through a small Python wrapper written to $OB/pr_wrapper.py; it changes
# nothing in postroom's code paths except, for postroom-drain, *when* QueueRunner.start runs.
# It also records the native thread ids and names ($OB/<name>.threads) so that per-thread CPU
# (event loop / committer / worker threads) can be read from /proc after the run.
#
# Knobs: PR_PY (postroom's Python, default /work/main/.venv/bin/python), PR_ROWS (default
# "postroom postroom-q postroom-drain"), PR_PROFILE=1 (run each server under cProfile, main thread only,
# stats in $OB/<name>.prof: for finding where the time goes, never for the figures),
# PR_TLS (outbound tls_policy, default "none" like Postfix's smtp_tls_security_level),
# PR_PYSPY=/path/to/py-spy (sample every thread of the server while its row runs, on-CPU samples
# only, into $OB/<name>.pyspy.txt in py-spy's "raw" collapsed-stack format).
PR_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PR_PY=${PR_PY:-$PR_ROOT/.venv/bin/python}
PR_ROWS=${PR_ROWS:-"postroom postroom-q postroom-drain"}
PR_TLS=${PR_TLS:-none}

pr_port() {   # the row's SMTP port: postroom on outbound.sh's EXTRA_PORT (2627), the others next
    case $1 in
        postroom) echo "$EXTRA_PORT" ;;
        postroom-drain) echo 2628 ;;
        postroom-w2) echo 2629 ;;
        postroom-q) echo 2630 ;;
        postroom-w2q) echo 2631 ;;
    esac
}

pr_config() {   # NAME PORT WORKERS QUEUE_PROCESS
    local dir=$EXTRA_DATA/$1
    rm -rf "$dir"; mkdir -p "$dir"
    cat >"$dir/postroom.toml" <<CONF
[server]
hostname = "relay.bench.test"
data_dir = "$dir/data"
run_as = ""
workers = $3
queue_process = ${4:-false}

[[listener]]
role = "mx"
address = "127.0.0.1:$2"

[smtp]
max_connections = 2000
max_connections_per_ip = 2000

[relay]
trusted_networks = ["127.0.0.0/8"]

[outbound]
nameservers = ["$DNS_ADDR"]
dns_port = $DNS_PORT
allow_networks = ["127.0.0.0/8"]
smtp_port = $SINK_PORT
tls_policy = "$PR_TLS"

[tls]
starttls = false

[queue]
scan_interval = 60.0
CONF
}

pr_wrapper() {
    cat >"$OB/pr_wrapper.py" <<'PY'
"""Bench-only launcher for `postroom serve` (outbound-extra.sh). Env:
PR_THREADS=FILE  append "native_id name" of every thread started (for /proc per-thread CPU)
PR_RUNNER=paused the queue runner does not start with the server: SIGUSR1 starts it, SIGUSR2
                 stops it (after the deliveries in flight); PR_STATE=FILE then says which
PR_PROFILE=FILE  cProfile of the main (event loop) thread, dumped at exit
"""
import os
import sys
import threading

threads = os.environ.get("PR_THREADS")
if threads:
    with open(threads, "w") as f:
        f.write(f"{threading.get_native_id()} MainThread\n")
    _inner = threading.Thread._bootstrap_inner

    def _bootstrap_inner(self):
        with open(threads, "a") as f:
            f.write(f"{threading.get_native_id()} {self.name}\n")
        _inner(self)

    threading.Thread._bootstrap_inner = _bootstrap_inner

if os.environ.get("PR_RUNNER") == "paused":
    import asyncio
    import signal

    from postroom.queue import runner as _runner

    _start = _runner.QueueRunner.start
    _state = os.environ.get("PR_STATE")

    def _say(text):
        if _state:
            with open(_state + ".tmp", "w") as f:
                f.write(text + "\n")
            os.replace(_state + ".tmp", _state)

    def start(self):
        loop = asyncio.get_running_loop()

        def go():
            if self._task is None:
                self._stopping = False
                _start(self)
            _say("running")

        def pause():
            async def stop():
                await self.stop()
                _say("paused")
            loop.create_task(stop())

        loop.add_signal_handler(signal.SIGUSR1, go)
        loop.add_signal_handler(signal.SIGUSR2, pause)
        _say("paused")

    _runner.QueueRunner.start = start

profile = os.environ.get("PR_PROFILE")
from postroom.cli import main  # noqa: E402

if profile:
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        main()
    finally:
        prof.disable()
        prof.dump_stats(profile)
else:
    main()
PY
}

extra_start() {
    local name port env
    pr_wrapper
    for name in $PR_ROWS; do
        port=$(pr_port "$name")
        pr_config "$name" "$port" "$([[ $name == postroom-w2* ]] && echo 2 || echo 1)" \
            "$([[ $name == postroom*q ]] && echo true || echo false)"
        env=(PR_THREADS="$OB/$name.threads")
        [[ $name == postroom-drain ]] && env+=(PR_RUNNER=paused PR_STATE="$OB/$name.state")
        [[ -n ${PR_PROFILE:-} ]] && env+=(PR_PROFILE="$OB/$name.prof")
        start_bg "$name" env "${env[@]}" "$PR_PY" "$OB/pr_wrapper.py" \
            -c "$EXTRA_DATA/$name/postroom.toml" serve
    done
}

# pr_threads NAME: CPU seconds per thread of the server (utime+stime), by the names the wrapper
# saw (with several workers: each worker process's threads, "MainThread" being the supervisor)
pr_threads() {
    local name=$1 pid tid tname child
    pid=$(cat "$OB/$name.pid")
    [[ -f $OB/$name.threads ]] || return 0
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        echo "  worker process $child: MainThread tid $child" \
            "$(awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f s CPU", ($12 + $13) / hz }' \
            "/proc/$child/task/$child/stat" 2>/dev/null)"
    done
    local stat
    while read -r tid tname; do
        # /proc/TID/stat would be the whole process's; the thread's own is under its task/
        for stat in /proc/[0-9]*/task/"$tid"/stat; do
            [[ -r $stat ]] || continue
            awk -v n="$tname" -v t="$tid" -v hz="$(getconf CLK_TCK)" \
                '{ sub(/^.*\) /, ""); printf "  %-28s tid %-8s %.2f s CPU\n", n, t, ($12 + $13) / hz }' \
                "$stat"
        done
    done <"$OB/$name.threads"
}

# The drain driver: outbound.py's own run loop (warm-up, reps, sinks, CPU, DNS and concurrency
# sampling, records) with its Postfix-only drain steps replaced: "hold" = the paused runner,
# "postsuper -H ALL; postqueue -f" = SIGUSR1.
pr_drain_driver() {
    cat >"$OB/pr_drain.py" <<'PY'
import os
import signal
import subprocess
import sys
import time
import types

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ["BENCH_DIR"])
import outbound as ob  # noqa: E402

PID = int(os.environ["PR_PID"])
STATE = os.environ["PR_STATE"]
QUEUE = os.environ["PR_QUEUE"]


def wait_state(want, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(STATE) as f:
                if f.read().strip() == want:
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    return False


def inject_held(a, doms, per, msgs):
    """Intake with the runner paused; done when queue/active holds every message."""
    os.kill(PID, signal.SIGUSR2)
    if not wait_state("paused"):
        return {"ok": False, "why": "runner did not pause"}
    pf0, ch0, t0 = ob.cpu_seconds(a.pid), os.times(), time.monotonic()
    procs = [subprocess.Popen([a.smtp_source, "-s", str(a.sessions), "-m", str(m), "-l", "4096",
                               "-f", "sender@src.bench.test", "-t", "user@%s" % d,
                               "127.0.0.1:%d" % a.port],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for d, m in zip(doms, per)]
    for p in procs:
        p.wait()
    t_acc = time.monotonic()
    ok = False
    while time.monotonic() < t0 + a.timeout:
        if ob.queue_files(QUEUE, ("active",)) >= msgs and ob.queue_files(QUEUE, ("incoming",)) == 0:
            ok = True
            break
        time.sleep(0.05)
    ch1 = os.times()
    return {"ok": ok, "accepted_s": t_acc - t0, "held_s": time.monotonic() - t0,
            "server_cpu_s": ob.cpu_seconds(a.pid) - pf0,
            "source_cpu_s": (ch1.children_user - ch0.children_user)
            + (ch1.children_system - ch0.children_system),
            "held": ob.queue_files(QUEUE, ("active",))}


def run(args, **kw):
    if args[0] == "postsuper":
        os.kill(PID, signal.SIGUSR1)  # release: the runner starts and scans at once
    return subprocess.CompletedProcess(args, 0)


ob.inject_held = inject_held
ob.subprocess = types.SimpleNamespace(run=run, Popen=subprocess.Popen,
                                      DEVNULL=subprocess.DEVNULL, PIPE=subprocess.PIPE)
sys.argv[0] = "outbound.py"
ob.main()
PY
}

pr_bench() {   # NAME PORT [MODE]
    local name=$1 port=$2 mode=${3:-e2e} pid sargs=() ip doms=${DOMAINS// /,} rc
    pid=$(cat "$OB/$name.pid")
    wait_listen 127.0.0.1 "$port" || return 1
    log "$name: $MSGS msgs x $REPS ($mode)"
    for ip in $SINKS; do sargs+=(--sink "$ip=$(cat "$OB/sink-$ip.pid")=$OB/sink-$ip.out"); done
    local args=(run --name "$name" --port "$port" --pid "$pid" "${sargs[@]}"
        --dns-pid "$(cat "$OB/dnsmasq.pid")" --dns-out "$OB/dnsmasq.out" --domains "$doms"
        --msgs "$MSGS" --reps "$REPS" --warmup "$WARMUP" --sessions "$SESSIONS"
        --smtp-source "$SMTP_SOURCE" --out "$OUT"
        --queue "$EXTRA_DATA/$name/data/queue" --queue-dirs incoming,active
        --log "$OB/$name.out" --label "$name")
    local spy=
    if [[ -n ${PR_PYSPY:-} ]]; then
        "$PR_PYSPY" record --pid "$pid" --subprocesses --threads --nonblocking --format raw \
            --output "$OB/$name.pyspy.txt" >"$OB/$name.pyspy.log" 2>&1 &
        spy=$!
    fi
    if [[ $mode == drain ]]; then
        pr_drain_driver
        BENCH_DIR=$BENCH_DIR PR_PID=$pid PR_STATE="$OB/$name.state" \
            PR_QUEUE="$EXTRA_DATA/$name/data/queue" \
            "$PY" "$OB/pr_drain.py" "${args[@]}" --mode drain --postfix-conf /nonexistent
    else
        "$PY" "$BENCH_DIR/outbound.py" "${args[@]}"
    fi
    rc=$?
    if [[ -n ${spy:-} ]]; then
        kill -INT "$spy" 2>/dev/null
        wait "$spy" 2>/dev/null
    fi
    log "$name: CPU by thread after the run (whole life of the process):"
    pr_threads "$name" >&2
    return $rc
}

extra_bench() {
    local name rc=0
    for name in $PR_ROWS; do
        if [[ $name == postroom-drain ]]; then
            pr_bench "$name" "$(pr_port "$name")" drain || rc=1
        else
            pr_bench "$name" "$(pr_port "$name")" || rc=1
        fi
    done
    return $rc
}
