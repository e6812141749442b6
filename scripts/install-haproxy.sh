#!/usr/bin/env bash
# Installs, from Debian's packages and only if missing (idempotent, silent when present),
# the HAProxy that the multi-replica tests put in front of the sync server's replicas
# (scripts/haproxy-start.sh):
#   scripts/install-haproxy.sh
# Package: haproxy (2.6 on Debian 12). Nothing relies on the package's own service (it
# serves /etc/haproxy/haproxy.cfg, which has no frontend): if the install started it, it
# is stopped again. Needs root or sudo when something is missing. Prints what it did on
# stderr.
set -euo pipefail

have_haproxy() {
    command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]
}

if have_haproxy; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-haproxy.sh: not root and no sudo: cannot apt-get install haproxy" >&2
        exit 1
    fi
fi
PACKAGES=(haproxy)
echo "install-haproxy.sh: apt-get install ${PACKAGES[*]}" >&2
# Wait for the package lock rather than fail (a fresh machine may be upgrading itself); a
# fresh machine may have no package lists yet: update and retry.
if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y \
    --no-install-recommends "${PACKAGES[@]}" >&2; then
    echo "install-haproxy.sh: install failed; running apt-get update and retrying" >&2
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y \
        --no-install-recommends "${PACKAGES[@]}" >&2
fi
have_haproxy || { echo "install-haproxy.sh: haproxy is still missing" >&2; exit 1; }

# The package's own service, if the install started it (systemd, or its init script where
# services may start), is of no use to the tests: stop it.
if [ -d /run/systemd/system ]; then
    if systemctl is-active --quiet haproxy.service 2>/dev/null; then
        echo "install-haproxy.sh: stopping the package's haproxy.service (not used)" >&2
        $SUDO systemctl stop haproxy.service >&2 || true
    fi
elif [ -s /run/haproxy.pid ] && [ -x /etc/init.d/haproxy ]; then
    echo "install-haproxy.sh: stopping the package's haproxy service (not used)" >&2
    $SUDO /etc/init.d/haproxy stop >&2 || true
fi
