#!/usr/bin/env bash
# Stops the HAProxy that scripts/haproxy-start.sh started for DIR:
#   scripts/haproxy-stop.sh DIR
# Sends SIGTERM to the pid(s) in DIR/haproxy.pid (only processes that are haproxy), waits
# up to 10 s for them to exit, then SIGKILLs what is left. Removes DIR/haproxy.pid,
# DIR/addr and the stats socket (with its /tmp directory, if it had one); leaves
# DIR/haproxy.cfg and DIR/haproxy.log for inspection. Succeeds when nothing runs.
set -euo pipefail

dir=${1:?usage: haproxy-stop.sh DIR}
[ $# -eq 1 ] || { echo "usage: haproxy-stop.sh DIR" >&2; exit 2; }
pidfile=$dir/haproxy.pid

# Whether pid $1 is a live haproxy (an exited one not yet reaped is a zombie: gone).
is_haproxy() {
    [ "$(cat "/proc/$1/comm" 2>/dev/null)" = haproxy ] &&
        ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

pids=()
if [ -s "$pidfile" ]; then
    mapfile -t recorded <"$pidfile"
    for p in "${recorded[@]}"; do
        case $p in
        *[!0-9]* | "") continue ;;
        esac
        if is_haproxy "$p"; then
            pids+=("$p")
        fi
    done
fi
if [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    i=0
    while :; do
        left=()
        for p in "${pids[@]}"; do
            if is_haproxy "$p"; then left+=("$p"); fi
        done
        [ ${#left[@]} -gt 0 ] || break
        i=$((i + 1))
        if [ $i -ge 100 ]; then
            echo "haproxy-stop.sh: haproxy ${left[*]} still running after 10 s: SIGKILL" >&2
            kill -KILL "${left[@]}" 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.1
    done
fi

if [ -s "$dir/haproxy-tmp" ]; then
    t=$(cat "$dir/haproxy-tmp")
    case $t in
    /tmp/cpis-hap.??????) rm -rf "$t" ;;
    esac
fi
rm -f "$pidfile" "$dir/addr" "$dir/haproxy.sock" "$dir/stats-socket" "$dir/haproxy-tmp"
