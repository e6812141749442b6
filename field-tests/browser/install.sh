#!/bin/sh
# Installs what the browser tests (field-tests/tests/browser) need, if missing. Idempotent:
# a second run installs nothing and takes well under a second.
#
#   chromium, chromium-driver   Debian's packages (apt-get; root or sudo), plus
#                               fonts-liberation so pages render with real glyphs;
#                               only when /usr/bin/chromium or /usr/bin/chromedriver is missing
#   npm                         Debian's package, only if `npm` is not on PATH
#   axe-core                    from the npm registry, the version pinned by package.json and
#                               package-lock.json next to this script (`npm ci` into
#                               field-tests/browser/node_modules, which git ignores)
#
# The test runs this script itself when a tool is missing; run it by hand with
#   sh field-tests/browser/install.sh
set -eu

here=$(cd "$(dirname "$0")" && pwd)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install.sh: not root and no sudo: cannot apt-get install $*" >&2
    fi
fi

# apt-get install; on failure (e.g. a fresh machine with no package lists) update and retry.
apt_install() {
    echo "install.sh: apt-get install $*" >&2
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "$@"; then
        echo "install.sh: apt-get install failed; running apt-get update and retrying" >&2
        $SUDO apt-get update
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "$@"
    fi
}

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    apt_install chromium chromium-driver fonts-liberation
    for f in /usr/bin/chromium /usr/bin/chromedriver; do
        if [ ! -x "$f" ]; then
            echo "install.sh: $f is still missing after installing chromium and chromium-driver" >&2
            exit 1
        fi
    done
fi

if ! command -v npm >/dev/null 2>&1; then
    apt_install npm
    if ! command -v npm >/dev/null 2>&1; then
        echo "install.sh: npm is still not on PATH after installing Debian's npm" >&2
        exit 1
    fi
fi

# axe-core: skip npm when the installed copy is the locked version.
want=$(node -e 'process.stdout.write(require(process.argv[1]).packages["node_modules/axe-core"].version)' \
    "$here/package-lock.json")
have=""
if [ -f "$here/node_modules/axe-core/package.json" ] && [ -f "$here/node_modules/axe-core/axe.min.js" ]; then
    have=$(node -e 'process.stdout.write(require(process.argv[1]).version)' \
        "$here/node_modules/axe-core/package.json")
fi
if [ "$have" != "$want" ]; then
    echo "install.sh: npm ci (axe-core $want) in $here" >&2
    (cd "$here" && npm ci --no-audit --no-fund --ignore-scripts)
    if [ ! -f "$here/node_modules/axe-core/axe.min.js" ]; then
        echo "install.sh: npm ci finished but $here/node_modules/axe-core/axe.min.js is missing" >&2
        exit 1
    fi
fi

echo "install.sh: ready: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium (version unknown)'); $(/usr/bin/chromedriver --version | cut -d' ' -f1-2); axe-core $want" >&2
