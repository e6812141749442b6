#!/usr/bin/env bash
# Installs, from Debian's packages and only if missing (idempotent, silent when present),
# the PostgreSQL 15 server and client that the sync server's tests run their throw-away
# clusters on (scripts/postgres-start.sh):
#   scripts/install-postgres.sh
# Packages: postgresql-15 postgresql-client-15 (initdb, pg_ctl, postgres and psql under
# /usr/lib/postgresql/15/bin). Nothing relies on the cluster Debian's package creates
# (15/main on port 5432): if the install left it running, it is stopped again so that it
# holds no port or memory. Needs root or sudo when something is missing. Prints what it
# did on stderr.
set -euo pipefail

bin=/usr/lib/postgresql/15/bin
have_postgres() {
    [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && [ -x "$bin/postgres" ] && [ -x "$bin/psql" ]
}

if have_postgres; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-postgres.sh: not root and no sudo: cannot apt-get install postgresql-15" >&2
        exit 1
    fi
fi
PACKAGES=(postgresql-15 postgresql-client-15)
echo "install-postgres.sh: apt-get install ${PACKAGES[*]}" >&2
# Wait for the package lock rather than fail (a fresh machine may be upgrading itself); a
# fresh machine may have no package lists yet: update and retry.
if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y \
    --no-install-recommends "${PACKAGES[@]}" >&2; then
    echo "install-postgres.sh: install failed; running apt-get update and retrying" >&2
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y \
        --no-install-recommends "${PACKAGES[@]}" >&2
fi
have_postgres || { echo "install-postgres.sh: $bin/initdb or psql is still missing" >&2; exit 1; }

# The package's postinst creates the cluster 15/main and, where services may start, starts
# it. The tests never use it: stop it (harmless when it is down or absent).
if command -v pg_lsclusters >/dev/null 2>&1 &&
    pg_lsclusters -h 2>/dev/null | awk '$1 == "15" && $2 == "main" && $4 == "online" { f = 1 } END { exit !f }'; then
    echo "install-postgres.sh: stopping Debian's default cluster 15/main (not used)" >&2
    $SUDO pg_ctlcluster 15 main stop >&2 || true
fi
