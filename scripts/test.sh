#!/usr/bin/env bash
# Install everything the test suite needs, then run it: lint, types, tests.
#   bash scripts/test.sh [pytest args...]
# Debian packages: swaks (a real SMTP client), postfix (for its smtp-source load generator; the
# Postfix daemon itself is never started), strace (the fsync-order test), libnet-ssleay-perl
# (swaks over TLS), dovecot-core (reads our Maildirs in a test; its daemon is started by that test
# only, in a private directory), openssl (s_client). Python packages: the project with its [test] extra, pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in swaks postfix strace libnet-ssleay-perl dovecot-core openssl msmtp fail2ban \
           mpop fetchmail getmail6; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    # Install postfix without configuring or starting it: nothing may listen on port 25; the
    # policy-rc.d below keeps every package's daemon (postfix, dovecot, fail2ban) stopped.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d; made_policy=1
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
    [ "$made_policy" -eq 0 ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e '.[test]'

.venv/bin/ruff check src tests
.venv/bin/mypy
.venv/bin/pytest -q "$@"
