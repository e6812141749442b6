#!/bin/sh
# Installs libfaketime from Debian's packages, if missing (idempotent), for the clock
# scenario (tests/it/clock.rs), which runs the real cpis-agent with its wall clock moved:
#   libfaketime   /usr/lib/<triple>/faketime/libfaketime.so.1 (apt-get; needs root or sudo)
# Prints the library's path on stdout.
set -eu

find_lib() {
    for d in /usr/lib/*/faketime /usr/lib/faketime /usr/lib64/faketime; do
        if [ -f "$d/libfaketime.so.1" ]; then
            echo "$d/libfaketime.so.1"
            return 0
        fi
    done
    return 1
}

if ! find_lib >/dev/null; then
    echo "installing libfaketime (Debian package libfaketime)" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    # Wait for the package lock rather than fail (a fresh machine may be upgrading itself).
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y \
        --no-install-recommends libfaketime >&2
fi

find_lib || { echo "libfaketime.so.1 not found after installing libfaketime" >&2; exit 1; }
