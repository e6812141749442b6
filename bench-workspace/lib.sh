#!/usr/bin/env bash
# Shared by benchmarks.sh and profile-polls.sh (sourced, not run): messages, figures, ports,
# Debian packages, and the pieces both start (a served fixture region, nginx with the same
# certificates). The sourcing script sets bench_name, root, here, B (release binaries) and
# TOOL (cpis-bench-tool) before calling the functions that use them.

t0=$(date +%s)
step() { printf '\n[%4ss] == %s ==\n' "$(($(date +%s) - t0))" "$*" >&2; }
say() { printf '        %s\n' "$*" >&2; }
die() {
    printf '%s: FAILED: %s\n' "$bench_name" "$*" >&2
    exit 1
}
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

work="$(mktemp -d /tmp/cpis-bench.XXXXXX)"
chmod 755 "$work" # nginx workers (user nobody) read the static file under it
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "${CPIS_BENCH_KEEP:-}" = 1 ]; then say "scratch kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# res FILE NAME KEY: a field of a `RESULT NAME key=value ...` line; fails if absent or not a number.
res() {
    local v
    v=$(awk -v n="$2" -v k="$3" '$1 == "RESULT" && $2 == n {
        for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) print kv[2] } }' "$1" | tail -1)
    [[ "$v" =~ ^-?[0-9]+(\.[0-9]+)?$ ]] || die "missing figure: RESULT $2 $3 in $1 (got '${v}')"
    printf '%s' "$v"
}
# num NAME VALUE: fails unless VALUE is a number.
num() {
    [[ "$2" =~ ^-?[0-9]+(\.[0-9]+)?$ ]] || die "missing figure: $1 (got '$2')"
    printf '%s' "$2"
}
# calc EXPR: awk arithmetic, printed with the format in $FMT (default %.2f).
# A failed calculation (division by zero...) marks the run failed; checked before writing.
calc() { awk "BEGIN { printf \"${FMT:-%.2f}\", $1 }" || { touch "$work/calc-failed"; echo ERR; }; }
x() { calc "$1 / $2"; printf '×'; }
kib() { FMT=%.1f calc "$1 / 1024"; }
thou() { FMT=%.0f calc "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }

# free_port: a loopback port nothing listens on.
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
}
wait_port() { # wait_port PORT WHAT
    local i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$2 did not listen on 127.0.0.1:$1"
}

# Debian packages the run needs (nginx for the baseline; curl and jq for the walkthrough).
apt_install() {
    local sudo="" made_policy=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    # Never let the package start a service on port 80.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    $sudo apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "$@" >&2
    [ -z "$made_policy" ] || $sudo rm -f /usr/sbin/policy-rc.d
}

# region_fixtures OUT FLAGS LOG: one region of FLAGS flags as of yesterday and its next day.
# Day 1 is yesterday and day 2 today: the server refuses dates in its future.
region_fixtures() {
    "$B/cpis-fixtures" generate --out "$1" --seed 2026 --flags "$2" --regions 1 --councils 12 \
        --days 1 --as-of "$(date -u -d yesterday +%F)" > "$3" 2>&1 || {
        cat "$3" >&2
        die "fixture generation failed"
    }
    # Yesterday's files still hold plans that ended exactly 12 months before yesterday, which
    # the server rightly refuses today: leave those rows out of day 1.
    local cutoff f
    cutoff="$(date -u -d '1 year ago' +%F)"
    for f in "$1"/*.csv; do
        awk -F, -v c="$cutoff" 'NR == 1 || $4 == "" || $4 >= c' "$f" > "$f.kept" && mv "$f.kept" "$f"
    done
}

# serve_region FX: a server data dir for the region of FX/directory.json (trust, region,
# councils and their tokens), served on a free port. Sets D, SPORT, CA, server_pid,
# region_id, trust, councils; admin runs `cpis-sync-server admin` on D.
serve_region() {
    local FX=$1 code name phone office args
    D="$work/server"
    "$B/cpis-sync-server" init --data-dir "$D" --hostname localhost > /dev/null 2>&1
    admin() { "$B/cpis-sync-server" admin --data-dir "$D" "$@"; }
    region_id="$(jq -r '.regions[0].id' "$FX/directory.json")"
    trust="$(jq -r '.regions[0].trust' "$FX/directory.json")"
    admin trust add --ods "$trust" --name "$(jq -r '.trusts[0].name' "$FX/directory.json")" > /dev/null
    admin region add --id "$region_id" --name "$(jq -r '.regions[0].name' "$FX/directory.json")" > /dev/null
    mkdir -p "$work/tokens"
    councils=()
    while IFS=$'\t' read -r code name phone office; do
        args=(council add --ods "$code" --name "$name" --region "$region_id" --emergency-phone "$phone")
        [ "$office" = null ] || args+=(--office-phone "$office")
        admin "${args[@]}" > /dev/null
        admin council token --ods "$code" > "$work/tokens/$code" 2> /dev/null
        councils+=("$code")
    done < <(jq -r '.councils[] | [.code, .name, .emergency_phone, (.office_phone // "null")] | @tsv' "$FX/directory.json")
    SPORT=$(free_port)
    # One device identity stands for a fleet in the polls run: the per-device limit (429) is off.
    if grep -q '^device_requests_per_minute' "$D/server.toml"; then
        sed -i 's/^device_requests_per_minute.*/device_requests_per_minute = 0/' "$D/server.toml"
    else
        printf '\n[load_shedding]\ndevice_requests_per_minute = 0\n' >> "$D/server.toml"
    fi
    "$B/cpis-sync-server" serve --data-dir "$D" --listen "127.0.0.1:$SPORT" > "$work/server.log" 2>&1 &
    server_pid=$!
    pids+=("$server_pid")
    wait_port "$SPORT" cpis-sync-server
    CA="$D/tls-ca.pem"
}
admin() { "$B/cpis-sync-server" admin --data-dir "$D" "$@"; }

# upload_all DIR: every council uploads its DIR/CODE.csv with curl; prints the total seconds.
upload_all() { # upload_all DIR -> prints total seconds
    local c total=0 t
    for c in "${councils[@]}"; do
        t=$(curl -sS --fail-with-body -o "$work/upload-$c.json" -w '%{time_total}' --cacert "$CA" \
            --resolve "localhost:$SPORT:127.0.0.1" \
            -H "Authorization: Bearer $(cat "$work/tokens/$c")" -H 'content-type: text/csv' \
            --data-binary "@$1/$c.csv" "https://localhost:$SPORT/v1/councils/$c/uploads") ||
            die "upload of $1/$c.csv failed: $(head -c 600 "$work/upload-$c.json")"
        total=$(calc "$total + $t")
    done
    echo "$total"
}

# fetch_checkpoint_bytes: a device identity for the load generator (CERT, KEY) and the
# signed checkpoint the server answers it, copied under $work/www for nginx; sets cp_bytes.
fetch_checkpoint_bytes() {
    local etok
    etok="$(admin enrolment-token --trust "$trust" --region "$region_id" --uses 1 --ttl 1h 2> /dev/null)"
    "$TOOL" enrol "$SPORT" "$CA" "$etok" "$work/loadgen" > "$R/loadgen-enrol.txt"
    CERT="$work/loadgen/device.pem"
    KEY="$work/loadgen/device-key.pem"
    mkdir -p "$work/www/v1/device"
    "$TOOL" fetch "$SPORT" /v1/device/checkpoint "$CA" "$CERT" "$KEY" "$work/www/v1/device/checkpoint" > "$R/fetch.txt"
    cp_bytes=$(res "$R/fetch.txt" fetch body_bytes)
}

# serve_nginx: nginx serving $work/www over TLS with the server's certificate and the same
# client-certificate check; sets NPORT, NG, nginx_pid.
serve_nginx() {
    NPORT=$(free_port)
    NG="$work/nginx"
    mkdir -p "$NG/logs"
    cat > "$NG/nginx.conf" << EOF
# Baseline for checkpoint polls: a static file of the checkpoint's bytes, same certificate,
# same client-certificate check (the device CA), TLS 1.2/1.3, keep-alive, loopback only.
worker_processes auto;
pid $NG/nginx.pid;
error_log $NG/logs/error.log warn;
daemon off;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    client_body_temp_path $NG/tmp;
    proxy_temp_path $NG/tmp;
    fastcgi_temp_path $NG/tmp;
    uwsgi_temp_path $NG/tmp;
    scgi_temp_path $NG/tmp;
    server {
        listen 127.0.0.1:$NPORT ssl;
        server_name localhost;
        ssl_certificate $D/tls-server.pem;
        ssl_certificate_key $D/tls-server-key.pem;
        ssl_client_certificate $D/device-ca.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        root $work/www;
    }
}
EOF
    mkdir -p "$NG/tmp"
    "$NGINX" -p "$NG" -c "$NG/nginx.conf" -e "$NG/logs/error.log" &
    nginx_pid=$!
    pids+=("$nginx_pid")
    wait_port "$NPORT" nginx
}
