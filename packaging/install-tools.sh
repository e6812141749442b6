#!/bin/sh
# Installs what the packaging test needs, if missing (idempotent):
#   cargo-deb 3.8.0   (cargo install, ~75 s once)
#   systemd-analyze   (apt-get install systemd; needs root)
# dpkg-deb is part of every Debian/Ubuntu system.
set -eu

if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb 3.8.0" >&2
    cargo install cargo-deb --locked --version 3.8.0
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "installing systemd (for systemd-analyze)" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends systemd
fi
