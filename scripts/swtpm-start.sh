#!/bin/sh
# Starts a software TPM 2.0 (Debian's swtpm) for tests and benchmarks:
#   scripts/swtpm-start.sh DIR
# DIR (created if missing) holds the TPM's state (a new, empty TPM: its own seeds, so keys
# sealed by another swtpm do not load into it), swtpm.pid and swtpm.log. Listens on
# 127.0.0.1 only, on a free pair of ports (commands on PORT, control on PORT+1). Prints the
# TCTI to use on stdout, e.g. swtpm:host=127.0.0.1,port=40122 (for CPIS_TPM2_TCTI), and
# writes it to DIR/tcti. Stop it with: kill "$(cat DIR/swtpm.pid)".
# Installs swtpm first when it is missing (scripts/install-tpm.sh).
set -eu

dir=${1:?usage: swtpm-start.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
command -v swtpm >/dev/null 2>&1 || sh "$here/install-tpm.sh"
mkdir -p "$dir/state"
dir=$(cd "$dir" && pwd)

attempt=0
while [ $attempt -lt 20 ]; do
    attempt=$((attempt + 1))
    # An even port in 20000..59998 from the kernel's random source.
    r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
    port=$((20000 + (r % 20000) * 2))
    rm -f "$dir/swtpm.pid"
    if swtpm socket --tpm2 \
        --tpmstate "dir=$dir/state" \
        --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
        --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
        --flags not-need-init,startup-clear \
        --pid "file=$dir/swtpm.pid" \
        --log "file=$dir/swtpm.log" \
        --daemon 2>>"$dir/swtpm.log"; then
        # The daemon writes its pid file once it listens.
        i=0
        while [ ! -s "$dir/swtpm.pid" ] && [ $i -lt 100 ]; do
            sleep 0.05
            i=$((i + 1))
        done
        if [ -s "$dir/swtpm.pid" ]; then
            tcti="swtpm:host=127.0.0.1,port=$port"
            echo "$tcti" >"$dir/tcti"
            echo "$tcti"
            exit 0
        fi
    fi
done
echo "swtpm-start.sh: swtpm did not start (see $dir/swtpm.log)" >&2
exit 1
