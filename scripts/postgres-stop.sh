#!/usr/bin/env bash
# Stops the throw-away PostgreSQL cluster that scripts/postgres-start.sh recorded in DIR:
#   scripts/postgres-stop.sh DIR [--remove] [--mode fast|immediate|smart]
# --mode     how pg_ctl stops it (default fast: rolls back open transactions, checkpoints;
#            immediate: no checkpoint, the next start runs crash recovery)
# --remove   then deletes the cluster too: its data directory, its /tmp directories and
#            the files postgres-start.sh wrote in DIR (DIR itself stays)
# Succeeds when the cluster is already stopped, or when DIR records none. Waits up to 60 s
# for the server to exit; fails (with the end of its log) if it does not.
set -euo pipefail

usage="usage: postgres-stop.sh DIR [--remove] [--mode fast|immediate|smart]"
dir=${1:?$usage}
shift
remove=0
mode=fast
while [ $# -gt 0 ]; do
    case $1 in
    --remove) remove=1 ;;
    --mode)
        [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
        mode=$2
        shift
        ;;
    --mode=*) mode=${1#--mode=} ;;
    *) echo "$usage" >&2; exit 2 ;;
    esac
    shift
done
case $mode in
fast | immediate | smart) ;;
*) echo "$usage" >&2; exit 2 ;;
esac

bin=/usr/lib/postgresql/15/bin
unset PGDATA
if [ ! -s "$dir/datadir" ]; then
    # Nothing recorded (never started, or already removed): nothing to stop.
    exit 0
fi
dir=$(cd "$dir" && pwd -P)
datadir=$(cat "$dir/datadir")
runas=$(cat "$dir/pgrun-as" 2>/dev/null || id -un)
me=$(id -un)
if [ "$runas" != "$me" ] && [ "$(id -u)" -ne 0 ]; then
    echo "postgres-stop.sh: the cluster in $dir runs as $runas; run this as $runas or root" >&2
    exit 1
fi
as_user() {
    if [ "$runas" = "$me" ]; then
        (cd / && "$@")
    else
        (cd / && runuser -u "$runas" -- "$@")
    fi
}
running() {
    [ -f "$datadir/postmaster.pid" ] && [ -x "$bin/pg_ctl" ] &&
        as_user "$bin/pg_ctl" -D "$datadir" status >/dev/null 2>&1
}

if running; then
    if ! err=$(as_user "$bin/pg_ctl" -D "$datadir" -m "$mode" -w -t 60 -s stop 2>&1) && running; then
        echo "postgres-stop.sh: the server in $datadir did not stop: $err" >&2
        if [ -s "$dir/postgres.log" ]; then
            echo "postgres-stop.sh: last lines of $dir/postgres.log:" >&2
            tail -n 30 "$dir/postgres.log" | sed 's/^/    /' >&2
        fi
        exit 1
    fi
fi

if [ "$remove" -eq 1 ]; then
    case $datadir in
    /*/data) rm -rf "$datadir" ;;
    *) echo "postgres-stop.sh: not removing $datadir (not a data directory postgres-start.sh made)" >&2 ;;
    esac
    home=$(cat "$dir/pghome" 2>/dev/null || true)
    # Only directories postgres-start.sh made: DIR/pg and its own /tmp directories.
    if [ -f "$dir/pgtmp" ]; then
        while IFS= read -r t; do
            case $t in
            /tmp/cpis-pg.?????? | /tmp/cpis-pgs.??????) rm -rf "$t" ;;
            esac
        done <"$dir/pgtmp"
    fi
    if [ "$home" = "$dir/pg" ] || [ -d "$dir/pg" ]; then
        rm -rf "$dir/pg"
    fi
    rm -f "$dir/url" "$dir/port" "$dir/pgrun-as" "$dir/pghome" "$dir/pgtmp" "$dir/sockdir" \
        "$dir/postgres.log" "$dir/initdb.log" "$dir/datadir"
fi
