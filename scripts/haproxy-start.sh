#!/usr/bin/env bash
# Starts an HAProxy (Debian's, 2.6) in front of several cpis-sync-server replicas, for the
# multi-replica tests:
#   scripts/haproxy-start.sh DIR BACKEND_ADDR...
# Each BACKEND_ADDR is HOST:PORT of a replica (HTTPS with mutual TLS; GET /healthz answers
# 200 without a client certificate while the replica is healthy, 503 while its database is
# unreachable). HAProxy balances TCP connections round-robin over the replicas that pass
# their health check and passes TLS through untouched (mutual TLS ends at the replica).
# Only the health check speaks TLS itself: GET /healthz every second, certificate not
# verified; a replica is taken out after 2 failed checks and put back after 2 good ones.
# DIR (created if missing) receives:
#   haproxy.cfg   the configuration
#   haproxy.pid   the daemon's pid (scripts/haproxy-stop.sh DIR stops it)
#   haproxy.log   HAProxy's own start-up messages (it logs no traffic)
#   haproxy.sock  the admin stats socket (e.g. "show servers state", "show stat"); when
#                 DIR's path is too long for a unix socket, a symlink to one in a fresh
#                 /tmp/cpis-hap.XXXXXX. DIR/stats-socket always holds the real path:
#                 connect to that one
#   addr          the frontend's address
# The frontend listens on 127.0.0.1 only, on a free port picked at random in 20000..31999
# (retried on another if the bind fails). Once HAProxy listens there, prints exactly one
# line on stdout, e.g. 127.0.0.1:27311, and exits 0; otherwise prints why (with HAProxy's
# messages) on stderr and exits non-zero.
# Installs HAProxy first when it is missing (scripts/install-haproxy.sh).
set -euo pipefail

usage="usage: haproxy-start.sh DIR BACKEND_ADDR..."
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
dir=$1
shift
for b in "$@"; do
    bport=${b##*:}
    bhost=${b%:*}
    case $bport in
    "" | *[!0-9]*) bhost="" ;;
    esac
    if [ "$bport" = "$b" ] || [ -z "$bhost" ]; then
        echo "haproxy-start.sh: not HOST:PORT: $b" >&2
        exit 2
    fi
done

here=$(cd "$(dirname "$0")" && pwd)
bash "$here/install-haproxy.sh"
haproxy=$(command -v haproxy || echo /usr/sbin/haproxy)

mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P)
log=$dir/haproxy.log
pidfile=$dir/haproxy.pid

die() {
    echo "haproxy-start.sh: $*" >&2
    if [ -s "$log" ]; then
        echo "haproxy-start.sh: last lines of $log:" >&2
        tail -n 20 "$log" | sed 's/^/    /' >&2
    fi
    exit 1
}

if [ -s "$pidfile" ]; then
    mapfile -t recorded <"$pidfile"
    for p in "${recorded[@]}"; do
        if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = haproxy ]; then
            die "an haproxy (pid $p) already runs for $dir: stop it first (haproxy-stop.sh $dir)"
        fi
    done
fi

# Whether any socket (listening or not, IPv4 or IPv6) uses local TCP port $1.
port_in_use() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
# Whether something listens on 127.0.0.1:$1.
listening() {
    local want
    want=$(printf '0100007F:%04X' "$1")
    awk -v a="$want" 'FNR > 1 && $2 == a && $4 == "0A" { f = 1 } END { exit !f }' /proc/net/tcp
}
random_port() {
    local r
    while :; do
        r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
        port=$((20000 + r % 12000))
        port_in_use "$port" || return 0
    done
}

# HAProxy needs about 2 file descriptors per connection (client and server side) plus a
# few of its own, and will not start with a maxconn the descriptor limit cannot hold:
# raise the soft limit to the hard one, then derive maxconn from it.
hard=$(ulimit -Hn)
[ "$hard" = unlimited ] && hard=1048576
ulimit -n "$hard" 2>/dev/null || true
nofile=$(ulimit -n)
[ "$nofile" = unlimited ] && nofile=1048576
maxconn=$(((nofile - 256) / 2))
[ "$maxconn" -le 10000 ] || maxconn=10000
[ "$maxconn" -ge 100 ] || die "the file descriptor limit ($nofile) is too low for haproxy"
[ "$maxconn" -ge 1000 ] ||
    echo "haproxy-start.sh: warning: maxconn is only $maxconn (ulimit -n is $nofile)" >&2

# The stats socket: HAProxy binds PATH.PID.tmp and renames it, all within a unix socket's
# 107 bytes.
tmpdir=""
sock=$dir/haproxy.sock
rm -f "$sock"
if [ ${#sock} -gt 90 ]; then
    tmpdir=$(mktemp -d /tmp/cpis-hap.XXXXXX)
    ln -s "$tmpdir/haproxy.sock" "$sock"
    sock=$tmpdir/haproxy.sock
fi
echo "$sock" >"$dir/stats-socket"
if [ -n "$tmpdir" ]; then echo "$tmpdir" >"$dir/haproxy-tmp"; else rm -f "$dir/haproxy-tmp"; fi

write_config() {
    local i=0 b
    {
        cat <<EOF
# Written by scripts/haproxy-start.sh: TCP load balancing over the sync server's replicas,
# TLS passed through (mutual TLS ends at the replica); health checks over TLS.
global
    maxconn $maxconn
    stats socket "$sock" mode 600 level admin
    stats timeout 30s

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    # A check's reply may take this long (a busy test machine), on top of connecting.
    timeout check 2s
    # A replica refusing connections before its checks notice: try another.
    retries 2
    option redispatch

frontend cpis_sync
    bind 127.0.0.1:$port
    default_backend cpis_sync_replicas

backend cpis_sync_replicas
    balance roundrobin
    option httpchk
    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
EOF
        for b in "${backends[@]}"; do
            i=$((i + 1))
            echo "    server replica$i $b check check-ssl verify none inter 1s fall 2 rise 2"
        done
    } >"$dir/haproxy.cfg"
}
backends=("$@")

attempt=0
while :; do
    attempt=$((attempt + 1))
    random_port
    write_config
    rm -f "$pidfile"
    : >"$log"
    if ! "$haproxy" -c -q -f "$dir/haproxy.cfg" >>"$log" 2>&1; then
        die "haproxy rejects $dir/haproxy.cfg"
    fi
    if "$haproxy" -f "$dir/haproxy.cfg" -D -p "$pidfile" >>"$log" 2>&1; then
        break
    fi
    if grep -qE 'cannot bind socket|Address already in use' "$log" && [ $attempt -lt 20 ]; then
        continue
    fi
    die "haproxy did not start"
done

# The daemon binds before it forks, but check rather than trust: up to 10 s.
i=0
while :; do
    pid=$(head -n 1 "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = haproxy ] && listening "$port"; then
        break
    fi
    i=$((i + 1))
    if [ $i -ge 100 ]; then
        [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
        die "haproxy (pid ${pid:-?}) is not listening on 127.0.0.1:$port after 10 s"
    fi
    sleep 0.1
done
echo "127.0.0.1:$port" >"$dir/addr"
echo "127.0.0.1:$port"
