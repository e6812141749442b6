#!/usr/bin/env bash
# Starts a throw-away PostgreSQL 15 cluster for tests and benchmarks of the sync server:
#   scripts/postgres-start.sh DIR             a new cluster, recorded in DIR
#   scripts/postgres-start.sh DIR --restart   the cluster recorded in DIR again, same port
# DIR is created if missing. The cluster listens on 127.0.0.1 only, on a free TCP port
# picked at random in 20000..31999 (below Linux's ephemeral range; another start that takes
# the same port at the same moment makes ours fail to bind, and we retry on another), with
# trust authentication for the superuser `postgres` and an empty database `cpis`. Settings:
# max_connections=300, shared_buffers=128MB, fsync on (durability is tested), unix sockets
# in a directory of its own.
# On success prints exactly one line on stdout, the URL to connect with, e.g.
#   postgres://postgres@127.0.0.1:24816/cpis
# and writes in DIR:
#   url, port    that URL and its port
#   datadir      the absolute path of the data directory
#   pgrun-as     the user the server runs as (initdb refuses root: as root, the `postgres`
#                user Debian's package creates; otherwise the current user)
#   sockdir      the directory of the unix sockets
#   postgres.log a symlink to the server's log
# The files live in DIR/pg, unless the server's user cannot reach DIR (as root, DIR under
# /root or inside a mode-700 directory, e.g. one from mktemp -d): then in a fresh
# /tmp/cpis-pg.XXXXXX owned by that user (recorded in DIR/pghome and DIR/pgtmp). The unix
# sockets go to a fresh /tmp/cpis-pgs.XXXXXX when that path is too long for a socket.
# --restart starts the recorded cluster again on the recorded port (after
# postgres-stop.sh DIR, e.g. with --mode immediate to test crash recovery); it prints the
# URL too, and succeeds at once if the cluster is already running.
# Stop it, and delete it with --remove, with scripts/postgres-stop.sh.
# Installs PostgreSQL 15 first when it is missing (scripts/install-postgres.sh). On failure
# prints the reason and the end of the server's log on stderr and exits non-zero.
set -euo pipefail

usage="usage: postgres-start.sh DIR [--restart]"
dir=${1:?$usage}
shift
restart=0
while [ $# -gt 0 ]; do
    case $1 in
    --restart) restart=1 ;;
    *) echo "$usage" >&2; exit 2 ;;
    esac
    shift
done

here=$(cd "$(dirname "$0")" && pwd)
bash "$here/install-postgres.sh"
bin=/usr/lib/postgresql/15/bin
# The caller's libpq settings must not redirect our own commands elsewhere.
unset PGHOST PGHOSTADDR PGPORT PGDATABASE PGUSER PGPASSWORD PGPASSFILE PGSERVICE \
    PGSERVICEFILE PGOPTIONS PGDATA PGSSLMODE PGTARGETSESSIONATTRS

mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P)
log=""

die() {
    echo "postgres-start.sh: $*" >&2
    if [ -n "$log" ] && [ -s "$log" ]; then
        echo "postgres-start.sh: last lines of $log:" >&2
        tail -n 30 "$log" | sed 's/^/    /' >&2
    fi
    exit 1
}

me=$(id -un)
# Runs a command as the cluster's user, from / (its own cwd may be unreadable to it).
as_user() {
    if [ "$runas" = "$me" ]; then
        (cd / && "$@")
    else
        (cd / && runuser -u "$runas" -- "$@")
    fi
}

# Whether any socket (listening or not, IPv4 or IPv6) uses local TCP port $1.
port_in_use() {
    local hex
    hex=$(printf '%04X' "$1")
    awk -v p=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

random_port() {
    local r
    while :; do
        r=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
        port=$((20000 + r % 12000))
        port_in_use "$port" || return 0
    done
}

write_settings() {
    local conf="$datadir/cpis-test.conf" q="'"
    cat >"$conf" <<EOF
# Written by scripts/postgres-start.sh (included from postgresql.conf).
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '${sockdir//$q/$q$q}'
max_connections = 300
shared_buffers = 128MB
fsync = on
EOF
    [ "$runas" = "$me" ] || chown "$runas": "$conf"
    chmod 600 "$conf"
}

# Starts the server on $port: 0 when up, 2 when the port was taken, 1 on any other failure
# (with pg_ctl's own message in $start_err).
start_err=""
start_server() {
    local before
    before=$(stat -c %s "$log" 2>/dev/null || echo 0)
    if start_err=$(as_user "$bin/pg_ctl" -D "$datadir" -l "$log" -w -t 60 -s start 2>&1); then
        return 0
    fi
    # A server still coming up after the wait (pg_ctl gave up): do not leave it behind.
    if as_user "$bin/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        as_user "$bin/pg_ctl" -D "$datadir" -m immediate -w -t 30 -s stop >/dev/null 2>&1 || true
    fi
    if tail -c +$((before + 1)) "$log" 2>/dev/null |
        grep -qE 'could not bind IPv4 address|Address already in use'; then
        return 2
    fi
    return 1
}

create_database() {
    local psql=("$bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres)
    local exists
    exists=$("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = 'cpis'") ||
        die "cannot connect to the new server on 127.0.0.1:$port"
    if [ "$exists" != 1 ]; then
        "${psql[@]}" -c 'CREATE DATABASE cpis' || die "CREATE DATABASE cpis failed"
    fi
}

succeed() {
    local url="postgres://postgres@127.0.0.1:$port/cpis"
    echo "$port" >"$dir/port"
    echo "$url" >"$dir/url"
    echo "$url"
    exit 0
}

if [ "$restart" -eq 1 ]; then
    [ -s "$dir/datadir" ] || die "--restart: no cluster recorded in $dir ($dir/datadir is missing)"
    [ -s "$dir/port" ] || die "--restart: no port recorded in $dir (the first start never succeeded)"
    datadir=$(cat "$dir/datadir")
    runas=$(cat "$dir/pgrun-as")
    port=$(cat "$dir/port")
    sockdir=$(cat "$dir/sockdir")
    log=$(readlink "$dir/postgres.log" || true)
    [ -n "$log" ] || log=$(dirname "$datadir")/postgres.log
    [ -f "$datadir/PG_VERSION" ] || die "--restart: $datadir holds no cluster"
    if [ "$runas" != "$me" ] && [ "$(id -u)" -ne 0 ]; then
        die "--restart: the cluster runs as $runas; run this as $runas or root"
    fi
    if as_user "$bin/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        succeed
    fi
    # A /tmp socket directory may have been cleaned away meanwhile.
    if [ ! -d "$sockdir" ]; then
        mkdir -p "$sockdir"
        chmod 700 "$sockdir"
        [ "$runas" = "$me" ] || chown "$runas": "$sockdir"
    fi
    # The same port: whoever holds it now may let it go shortly (retry for about 10 s).
    attempt=0
    while :; do
        attempt=$((attempt + 1))
        rc=0
        start_server || rc=$?
        [ $rc -eq 0 ] && break
        if [ $rc -eq 2 ] && [ $attempt -lt 10 ]; then
            sleep 1
            continue
        fi
        [ $rc -eq 2 ] && die "--restart: port $port is taken by another process"
        die "--restart: the server did not start: $start_err"
    done
    create_database
    succeed
fi

if [ -e "$dir/datadir" ]; then
    die "$dir already records a cluster ($(cat "$dir/datadir")): use --restart, or remove it first with postgres-stop.sh $dir --remove"
fi

# Who runs the server, and where its files go.
tmpdirs=()
home="$dir/pg"
if [ "$(id -u)" -eq 0 ]; then
    runas=postgres
    id -u "$runas" >/dev/null 2>&1 || die "running as root but there is no user $runas to run PostgreSQL as"
    mkdir -p "$home"
    chown "$runas": "$home"
    chmod 700 "$home"
    if ! runuser -u "$runas" -- test -r "$home" -a -w "$home" -a -x "$home" 2>/dev/null; then
        # The user cannot reach DIR (a parent it may not traverse): somewhere it can.
        rmdir "$home" 2>/dev/null || die "$runas cannot reach $home, which is not empty"
        home=$(mktemp -d /tmp/cpis-pg.XXXXXX)
        chown "$runas": "$home"
        tmpdirs+=("$home")
    fi
else
    runas=$me
    mkdir -p "$home"
    chmod 700 "$home"
fi
[ ! -e "$home/data" ] || die "$home/data already exists (left by an earlier run?): remove it first"
datadir=$home/data
log=$home/postgres.log
# A unix socket's path (DIR/.s.PGSQL.NNNNN) must fit in 107 bytes.
if [ ${#home} -le 88 ]; then
    sockdir=$home
else
    sockdir=$(mktemp -d /tmp/cpis-pgs.XXXXXX)
    [ "$runas" = "$me" ] || chown "$runas": "$sockdir"
    tmpdirs+=("$sockdir")
fi

# Recorded at once, so that postgres-stop.sh DIR --remove cleans up even after a failure.
echo "$runas" >"$dir/pgrun-as"
echo "$home" >"$dir/pghome"
echo "$sockdir" >"$dir/sockdir"
: >"$dir/pgtmp"
for t in "${tmpdirs[@]}"; do echo "$t" >>"$dir/pgtmp"; done
echo "$datadir" >"$dir/datadir"
ln -sfn "$log" "$dir/postgres.log"

initdb_log=$dir/initdb.log
if ! as_user "$bin/initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
    >"$initdb_log" 2>&1; then
    echo "postgres-start.sh: initdb --locale=C.UTF-8 failed; retrying with --no-locale" >&2
    rm -rf "$datadir"
    as_user "$bin/initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 --no-locale \
        >>"$initdb_log" 2>&1 || {
        log=$initdb_log
        die "initdb failed"
    }
fi
echo "include_if_exists = 'cpis-test.conf'" >>"$datadir/postgresql.conf"

attempt=0
while :; do
    attempt=$((attempt + 1))
    random_port
    write_settings
    rc=0
    start_server || rc=$?
    [ $rc -eq 0 ] && break
    if [ $rc -eq 2 ] && [ $attempt -lt 20 ]; then
        continue
    fi
    [ $rc -eq 2 ] && die "the server did not start: no free port after $attempt attempts"
    die "the server did not start: $start_err"
done
create_database
succeed
