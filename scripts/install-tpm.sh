#!/bin/sh
# Installs, from Debian's packages and only if missing (idempotent), what the TPM 2.0
# keystore needs to build and what its tests run against:
#   libtss2-dev, pkg-config   the TSS 2.0 libraries the `tpm2` feature links (tss-esapi),
#                             with the swtpm TCTI (libtss2-tcti-swtpm0)
#   swtpm, swtpm-tools        the software TPM the tests start (scripts/swtpm-start.sh)
# Needs root or sudo when something is missing. Prints what it did on stderr.
set -eu

have_libs() {
    command -v pkg-config >/dev/null 2>&1 &&
        pkg-config --exists tss2-esys tss2-sys tss2-mu tss2-tctildr 2>/dev/null &&
        ls /usr/lib/*/libtss2-tcti-swtpm.so.0 >/dev/null 2>&1
}
have_swtpm() {
    command -v swtpm >/dev/null 2>&1 && command -v swtpm_setup >/dev/null 2>&1
}

if have_libs && have_swtpm; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-tpm.sh: not root and no sudo: cannot apt-get install libtss2-dev swtpm swtpm-tools" >&2
        exit 1
    fi
fi
PACKAGES="libtss2-dev pkg-config swtpm swtpm-tools"
echo "install-tpm.sh: apt-get install $PACKAGES" >&2
# Wait for the package lock rather than fail (a fresh machine may be upgrading itself); a
# fresh machine may have no package lists yet: update and retry.
if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y \
    --no-install-recommends $PACKAGES >&2; then
    echo "install-tpm.sh: install failed; running apt-get update and retrying" >&2
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y \
        --no-install-recommends $PACKAGES >&2
fi
have_libs || { echo "install-tpm.sh: the TSS 2.0 libraries are still missing" >&2; exit 1; }
have_swtpm || { echo "install-tpm.sh: swtpm is still missing" >&2; exit 1; }
