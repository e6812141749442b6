#!/usr/bin/env bash
# Writes BENCHMARKS.md at the repository root: every published figure next to a baseline
# measured in the same run, with the machine described. One command:
#
#     bash bench-workspace/benchmarks.sh
#
# What it runs (release builds, --locked, loopback only):
#   1. cargo bench -p cpis-agent --bench lookup     encrypted lookup, plaintext floor, install,
#                                                    audited lookup, store writes
#   2. bench-workspace sqlcipher-bench               SQLCipher lookup and build, own plaintext floor
#   3. cargo bench -p cpis-sync-server --bench server  council upload, snapshot vs gzip, h2 polls
#   4. cargo bench -p cpis-sync-server --bench events  event ingest/s, mailbox listing p50/p99
#      cargo bench -p cpis-sync-server --bench backends  PostgreSQL against SQLite, replicas
#      the field test live:: (release): the live feed's latency, memory, herd and restart
#   5. the real binaries: cpis-fixtures writes a region and its next day; cpis-sync-server
#      serves it; councils upload with curl; a real cpis-agent enrols and syncs through a
#      byte-counting relay (full snapshot, one day's delta, a no-change poll) against the
#      gzip CSV of the same data; checkpoint polls/s from cpis-bench-tool against the server
#      and against nginx (Debian package, installed when missing) serving the same bytes as a
#      static file over TLS with the same certificates; `cpis-agent run` idle RSS and CPU next
#      to idle nginx; 2 million fixture flags against copying the files they make.
#
# Any figure missing stops the script with an error; BENCHMARKS.md is written to a temporary
# file and renamed into place only when complete.
#
# Knobs (environment):
#   CPIS_BENCH_FLAGS        flags in the lookup/install benches and the wire region (200000)
#   CPIS_BENCH_POLL_SECS    measured seconds per polls/s run, after 1 s warm-up (10)
#   CPIS_BENCH_CONNECTIONS  kept-alive connections of the load generator (64)
#   CPIS_BENCH_IDLE_SECS    idle window for memory/CPU (30)
#   CPIS_BENCH_FIXTURE_FLAGS  flags for the fixture generation figure (2000000)
#   CPIS_BENCH_OUT          output file (default: <repo>/BENCHMARKS.md)
#   CPIS_BENCH_KEEP=1       keep the scratch directory
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
FLAGS="${CPIS_BENCH_FLAGS:-200000}"
POLL_SECS="${CPIS_BENCH_POLL_SECS:-10}"
CONNS="${CPIS_BENCH_CONNECTIONS:-64}"
IDLE_SECS="${CPIS_BENCH_IDLE_SECS:-30}"
FIX_FLAGS="${CPIS_BENCH_FIXTURE_FLAGS:-2000000}"
OUT="${CPIS_BENCH_OUT:-$root/BENCHMARKS.md}"
export CPIS_BENCH_FLAGS="$FLAGS"

bench_name=benchmarks.sh
# shellcheck source=bench-workspace/lib.sh
. "$here/lib.sh"

need_pkgs=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx-light)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v jq >/dev/null 2>&1 || need_pkgs+=(jq)
command -v gzip >/dev/null 2>&1 || need_pkgs+=(gzip)
[ -x /usr/bin/time ] || need_pkgs+=(time)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    step "installing ${need_pkgs[*]} from Debian's packages"
    apt_install "${need_pkgs[@]}"
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
# ---- machine ------------------------------------------------------------------------------
load_before="$(loadavg)"
cpu_model="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
[ -n "$cpu_model" ] || cpu_model="$(uname -m) (no model name in /proc/cpuinfo)"
cores="$(nproc)"
mem_gib="$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)"
kernel="$(uname -sr)"
rustc_v="$(rustc -V)"
nginx_v="$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')"
commit="$(git -C "$root" rev-parse --short=12 HEAD)"
dirty=""
if [ -n "$(git -C "$root" status --porcelain --untracked-files=no)" ]; then
    dirty=" (working tree had uncommitted changes at the time)"
fi
others_at_start="$(ps -eo comm= | grep -c -E '^(rustc|cargo|cc1|ld|cc|clang)$' || true)"
started_at="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
step "machine: $cpu_model, $cores cores, $mem_gib GiB, $kernel; load $load_before; $others_at_start compiler processes of others running"
loads=("start: $load_before")

# ---- builds -------------------------------------------------------------------------------
step "release builds (main workspace: binaries and benches; bench-workspace)"
tb=$(date +%s)
(cd "$root" && cargo build --locked --release -q -p cpis-sync-server -p cpis-agent -p cpis-fixtures)
# bench_exe PACKAGE BENCH: builds a bench and prints its executable. The benches are run
# from these executables, so nothing is rebuilt between stages (others may edit the tree).
bench_exe() {
    local exe
    exe=$(cd "$root" && cargo bench --locked --no-run -q -p "$1" --bench "$2" --message-format=json |
        jq -r --arg n "$2" 'select(.reason == "compiler-artifact" and .target.name == $n
            and (.target.kind | index("bench"))) | .executable' | tail -1)
    [ -x "$exe" ] || die "no executable for bench $2 of $1"
    echo "$exe"
}
lookup_exe=$(bench_exe cpis-agent lookup)
server_exe=$(bench_exe cpis-sync-server server)
events_exe=$(bench_exe cpis-sync-server events)
backends_exe=$(bench_exe cpis-sync-server backends)
# The live feed's field test, in release (its binaries are built by the harness, in release too).
live_exe=$(cd "$root" && cargo test --locked --release --no-run -q -p cpis-field-tests --test it \
    --message-format=json | jq -r 'select(.reason == "compiler-artifact" and .target.name == "it"
        and .profile.test) | .executable' | tail -1)
[ -x "$live_exe" ] || die "no executable for the field tests"
(cd "$here" && cargo build --locked --release -q)
build_secs=$(($(date +%s) - tb))
say "builds took ${build_secs} s"
B="$root/target/release"
TOOL="$here/target/release/cpis-bench-tool"
R="$work/results"
mkdir -p "$R"

# ---- 1, 2. lookups and install --------------------------------------------------------------
step "agent lookup/install bench ($FLAGS flags)"
loads+=("agent bench: $(loadavg)")
(cd "$root/agent" && "$lookup_exe" --bench) | tee "$R/lookup.txt" | grep -v '^RESULT' >&2
step "SQLCipher bench ($FLAGS flags)"
(cd "$here" && "$here/target/release/sqlcipher-bench") | tee "$R/sqlcipher.txt" | grep -v '^RESULT' >&2

# ---- 3, 4. server benches -----------------------------------------------------------------
step "sync-server bench: upload, snapshot, h2 polls"
loads+=("server bench: $(loadavg)")
(cd "$root/sync-server" && "$server_exe" --bench) | tee "$R/server.txt" | grep -v '^RESULT' >&2
step "sync-server bench: event ingest, mailbox"
loads+=("events bench: $(loadavg)")
(cd "$root/sync-server" && "$events_exe" --bench) | tee "$R/events.txt" | grep -v '^RESULT' >&2
step "sync-server bench: SQLite against PostgreSQL, one replica against three"
loads+=("backends bench: $(loadavg)")
bash "$root/scripts/install-postgres.sh"
bash "$root/scripts/install-haproxy.sh"
(cd "$root/sync-server" && "$backends_exe" --bench) | tee "$R/backends.txt" | grep -v '^RESULT' >&2
step "field test: the live feed (100 agents, 10,000 waiting tablets, a restart)"
loads+=("live feed: $(loadavg)")
# The test harness prints "test NAME ... " before the test's own first line: RESULT lines
# are cut to start where RESULT does.
(cd "$root/field-tests" && "$live_exe" live:: --nocapture --test-threads 1) |
    sed 's/^.*\(RESULT live_\)/\1/' | tee "$R/live.txt" | grep -v '^RESULT' >&2

# ---- 5. the real binaries on loopback -------------------------------------------------------
step "fixtures: one region of $FLAGS flags and its next day"
loads+=("wire: $(loadavg)")
FX="$work/fixtures"
region_fixtures "$FX" "$FLAGS" "$R/fixtures-region.txt"
churn="$(grep -m1 'churn to day 2' "$R/fixtures-region.txt" | sed 's/^ *churn to day 2: //')"
say "next-day churn: $churn"

step "server: init, directory, serve"
serve_region "$FX"

step "councils upload day 1 (${#councils[@]} files over HTTPS with curl)"
up1_s=$(num "day-1 upload time" "$(upload_all "$FX")")
say "uploaded in $up1_s s"

# The tablet talks to the server only through the byte-counting relay.
RELAY_LOG="$work/relay.log"
: > "$RELAY_LOG"
"$TOOL" relay "$SPORT" "$work/relay.port" "$RELAY_LOG" &
pids+=($!)
for _ in $(seq 1 50); do [ -s "$work/relay.port" ] && break; sleep 0.1; done
RPORT=$(cat "$work/relay.port")
relay_mark() { wc -l < "$RELAY_LOG"; }
relay_sum() { # relay_sum FROM_LINE -> "up down connections" of the lines after FROM_LINE
    sleep 0.5
    tail -n +"$(($1 + 1))" "$RELAY_LOG" | awk '{ u += $1; d += $2; n++ } END { printf "%d %d %d", u, d, n }'
}

step "tablet: enrol through the relay, then sync"
T="$work/tablet"
etok="$(admin enrolment-token --trust "$trust" --region "$region_id" --uses 1 --ttl 1h 2> /dev/null)"
m=$(relay_mark)
"$B/cpis-agent" enrol --state-dir "$T" --server "https://localhost:$RPORT" --ca "$CA" --token "$etok" > "$R/enrol.txt" 2>&1 ||
    die "enrol failed: $(cat "$R/enrol.txt")"
read -r enrol_up enrol_down _ <<< "$(relay_sum "$m")"

sync_phase() { # sync_phase NAME: one `cpis-agent sync`, its wire bytes and time
    local m t1 t2
    m=$(relay_mark)
    t1=$(date +%s.%N)
    /usr/bin/time -f '%M %U %S' -o "$R/time-$1.txt" \
        "$B/cpis-agent" sync --state-dir "$T" --json > "$R/sync-$1.json" 2> "$R/sync-$1.err" ||
        die "sync ($1) failed: $(cat "$R/sync-$1.err")"
    t2=$(date +%s.%N)
    read -r up down conns <<< "$(relay_sum "$m")"
    printf '%s %s %s %s\n' "$up" "$down" "$conns" "$(FMT=%.3f calc "$t2 - $t1")"
}
read -r full_up full_down full_conns full_s <<< "$(sync_phase full)"
say "full snapshot sync: $full_down B down, $full_up B up, $full_conns connections, $full_s s"
step "councils upload day 2 (next-day churn), tablet syncs a delta, then a no-change poll"
up2_s=$(num "day-2 upload time" "$(upload_all "$FX/day2")")
read -r delta_up delta_down delta_conns delta_s <<< "$(sync_phase delta)"
say "delta sync: $delta_down B down, $delta_up B up, $delta_s s"
read -r none_up none_down none_conns none_s <<< "$(sync_phase nochange)"
say "no-change sync: $none_down B down, $none_up B up, $none_s s"
# Each sync did what its row says (the agent's own account of it).
for phase in full:snapshot delta:delta nochange:up_to_date; do
    got=$(jq -r .action "$R/sync-${phase%%:*}.json")
    [ "$got" = "${phase#*:}" ] || die "sync ${phase%%:*} did '$got', expected '${phase#*:}'"
done
# Peak RSS (KiB) and CPU seconds of each whole `cpis-agent sync` process (GNU time).
read -r full_maxrss full_cpu_u full_cpu_s < "$R/time-full.txt"
read -r delta_maxrss delta_cpu_u delta_cpu_s < "$R/time-delta.txt"
for v in full_maxrss full_cpu_u full_cpu_s delta_maxrss delta_cpu_u delta_cpu_s; do num "$v" "${!v}" > /dev/null; done
held_version=$(num "region version held" "$(jq -r .version "$R/sync-nochange.json")")
full_version=$(num "region version after day 1" "$(jq -r .version "$R/sync-full.json")")
for v in full_up full_down delta_up delta_down none_up none_down; do num "$v" "${!v}" > /dev/null; done
[ "$full_down" -gt 0 ] && [ "$delta_down" -gt 0 ] && [ "$none_down" -gt 0 ] || die "relay counted no bytes"
[ -n "$churn" ] || die "missing figure: next-day churn in $R/fixtures-region.txt"

# The baseline: the region's full CSV files, gzip -6, downloaded every time.
gz1=$(cat "$FX"/*.csv | gzip -6 -c | wc -c)
gz2=$(cat "$FX"/day2/*.csv | gzip -6 -c | wc -c)
csv1=$(cat "$FX"/*.csv | wc -c)
csv2=$(cat "$FX"/day2/*.csv | wc -c)

# ---- checkpoint polls/s against nginx ---------------------------------------------------------
step "checkpoint polls: a device identity for the load generator, the checkpoint's bytes"
fetch_checkpoint_bytes
say "signed checkpoint: $cp_bytes bytes; nginx serves a copy of these bytes"

# Wire bytes of one no-change poll on a kept-alive connection (1 connection, 2 s, relay).
m=$(relay_mark)
"$TOOL" load "$RPORT" /v1/device/checkpoint "$CA" "$CERT" "$KEY" 1 2 relay_poll > "$R/relay-poll.txt"
read -r rp_up rp_down _ <<< "$(relay_sum "$m")"
# The relay counted the warm-up second and the handshake too: divide by every request sent.
rp_n=$(res "$R/relay-poll.txt" relay_poll all_requests)
serve_nginx

step "checkpoint polls/s: cpis-sync-server, then nginx ($CONNS connections, 1 s warm-up + $POLL_SECS s each)"
loads+=("polls: $(loadavg)")
"$TOOL" load "$SPORT" /v1/device/checkpoint "$CA" "$CERT" "$KEY" "$CONNS" "$POLL_SECS" server > "$R/polls.txt"
"$TOOL" load "$NPORT" /v1/device/checkpoint "$CA" "$CERT" "$KEY" "$CONNS" "$POLL_SECS" nginx >> "$R/polls.txt"
cat "$R/polls.txt" >&2
[ "$(res "$R/polls.txt" nginx body_bytes_max)" = "$cp_bytes" ] || die "nginx served a body of another size"
s_bmin=$(res "$R/polls.txt" server body_bytes_min); s_bmax=$(res "$R/polls.txt" server body_bytes_max)

# ---- agent idle memory and CPU ----------------------------------------------------------------
step "agent idle: cpis-agent run on the synced tablet, then ${IDLE_SECS} s idle, next to idle nginx"
APORT=$(free_port)
"$B/cpis-agent" run --state-dir "$T" --listen "127.0.0.1:$APORT" > "$work/agent.log" 2>&1 &
agent_pid=$!
pids+=("$agent_pid")
wait_port "$APORT" "cpis-agent run"
# Let its start-up sync finish (no change on the server) before the window opens.
sleep 5
kill -0 "$agent_pid" 2>/dev/null || die "cpis-agent run exited: $(tail -5 "$work/agent.log")"
loads+=("idle window: $(loadavg)")
nginx_pids() { echo "$nginx_pid" $(pgrep -P "$nginx_pid" || true); }
ticks() { # ticks PID...: utime + stime of the processes, in clock ticks
    local p s=0
    for p in "$@"; do
        s=$((s + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")))
    done
    echo "$s"
}
kib_of() { # kib_of FIELD PID...: sum of a /proc/PID/status field in KiB
    local f=$1 p s=0
    shift
    for p in "$@"; do s=$((s + $(awk -v f="$f:" '$1 == f { print $2 }' "/proc/$p/status"))); done
    echo "$s"
}
hz=$(getconf CLK_TCK)
npids=$(nginx_pids)
a0=$(ticks "$agent_pid"); n0=$(ticks $npids); s0=$(ticks "$server_pid")
w0=$(date +%s.%N)
sleep "$IDLE_SECS"
a1=$(ticks "$agent_pid"); n1=$(ticks $npids); s1=$(ticks "$server_pid")
w1=$(date +%s.%N)
window=$(calc "$w1 - $w0")
a_cpu=$(FMT=%.3f calc "($a1 - $a0) / $hz / $window * 100")
n_cpu=$(FMT=%.3f calc "($n1 - $n0) / $hz / $window * 100")
s_cpu=$(FMT=%.3f calc "($s1 - $s0) / $hz / $window * 100")
a_rss=$(kib_of VmRSS "$agent_pid"); a_hwm=$(kib_of VmHWM "$agent_pid")
n_rss=$(kib_of VmRSS $npids); n_hwm=$(kib_of VmHWM $npids)
s_rss=$(kib_of VmRSS "$server_pid"); s_hwm=$(kib_of VmHWM "$server_pid")
a_thr=$(kib_of Threads "$agent_pid")
n_procs=$(echo $npids | wc -w)
for v in a_cpu n_cpu s_cpu a_rss a_hwm n_rss n_hwm s_rss s_hwm; do num "$v" "${!v}" > /dev/null; done
say "agent: RSS $a_rss KiB (peak $a_hwm), CPU $a_cpu %; nginx ($n_procs processes): RSS $n_rss KiB, CPU $n_cpu %"
a_ticks=$((a1 - a0)); n_ticks=$((n1 - n0)); s_ticks=$((s1 - s0))

# ---- fixtures generation rate ---------------------------------------------------------------
step "fixtures: $FIX_FLAGS flags, against copying the files they make"
loads+=("fixtures: $(loadavg)")
F2="$work/fx-big"
t1=$(date +%s.%N)
"$B/cpis-fixtures" generate --out "$F2" --seed 1 --flags "$FIX_FLAGS" > "$R/fixtures-big.txt" 2>&1 ||
    die "fixture generation failed: $(cat "$R/fixtures-big.txt")"
t2=$(date +%s.%N)
fix_s=$(FMT=%.3f calc "$t2 - $t1")
fix_bytes=$(du -sb "$F2" | cut -f1)
t1=$(date +%s.%N)
cp -r "$F2" "$work/fx-copy" && sync -f "$work/fx-copy" 2>/dev/null || true
t2=$(date +%s.%N)
cp_s=$(FMT=%.3f calc "$t2 - $t1")
rm -rf "$work/fx-copy" "$F2"
load_after="$(loadavg)"
loads+=("end: $load_after")
others_at_end="$(ps -eo comm= | grep -c -E '^(rustc|cargo|cc1|ld|cc|clang)$' || true)"
total_secs=$(($(date +%s) - t0))

# ---- collect --------------------------------------------------------------------------------
L="$R/lookup.txt"; C="$R/sqlcipher.txt"; S="$R/server.txt"; E="$R/events.txt"; P="$R/polls.txt"
ap50=$(res "$L" plaintext p50_us); ap99=$(res "$L" plaintext p99_us)
e50=$(res "$L" encrypted p50_us); e99=$(res "$L" encrypted p99_us)
au50=$(res "$L" audited p50_us); au99=$(res "$L" audited p99_us)
inst=$(res "$L" install ms); nflags=$(res "$L" install flags); ckib=$(res "$L" install compressed_kib)
wenc=$(res "$L" write encrypted_ms); wplain=$(res "$L" write plaintext_ms)
cp50=$(res "$C" plaintext p50_us); cp99=$(res "$C" plaintext p99_us)
c50=$(res "$C" sqlcipher p50_us); c99=$(res "$C" sqlcipher p99_us)
cbp=$(res "$C" build plaintext_ms); cbc=$(res "$C" build sqlcipher_ms); cbo=$(res "$C" build sqlcipher_open_ms)
sqlcipher_v="$(grep -m1 -o 'SQLCipher [0-9][0-9.]*' "$C" || echo SQLCipher)"
u_rows=$(res "$S" upload rows); u_csv=$(res "$S" upload csv_bytes); u_parse=$(res "$S" upload parse_ms)
u_first=$(res "$S" upload first_ms); u_same=$(res "$S" upload same_ms); u_next=$(res "$S" upload next_ms)
h2polls=$(res "$S" polls_h2 polls_per_s)
sg_flags=$(res "$S" snapshot_gzip flags); sg_csv=$(res "$S" snapshot_gzip csv_bytes)
sg_gz=$(res "$S" snapshot_gzip gzip_bytes); sg_ms=$(res "$S" snapshot_gzip gzip_ms)
z3=$(res "$S" snapshot_zstd3 bytes); z3ms=$(res "$S" snapshot_zstd3 ms)
z9=$(res "$S" snapshot_zstd9 bytes); z9ms=$(res "$S" snapshot_zstd9 ms)
z19=$(res "$S" snapshot_zstd19 bytes); z19ms=$(res "$S" snapshot_zstd19 ms)
c3=$(res "$S" snapshot_columns_zstd3 bytes); c3ms=$(res "$S" snapshot_columns_zstd3 ms)
c9=$(res "$S" snapshot_columns_zstd9 bytes); c9ms=$(res "$S" snapshot_columns_zstd9 ms)
c19=$(res "$S" snapshot_columns_zstd19 bytes); c19ms=$(res "$S" snapshot_columns_zstd19 ms)
sp=$(res "$P" server polls_per_s); sp50=$(res "$P" server p50_us); sp99=$(res "$P" server p99_us)
np=$(res "$P" nginx polls_per_s); np50=$(res "$P" nginx p50_us); np99=$(res "$P" nginx p99_us)
sreq=$(res "$P" server requests); nreq=$(res "$P" nginx requests)
srec=$(res "$P" server reconnects); nrec=$(res "$P" nginx reconnects)
mb_first=$(res "$E" mailbox_first_100 p99_ms); mb_first50=$(res "$E" mailbox_first_100 p50_ms)
mb_rand=$(res "$E" mailbox_random_100 p99_ms); mb_rand50=$(res "$E" mailbox_random_100 p50_ms)
mb_store=$(res "$E" mailbox_store_100 p99_ms); mb_store50=$(res "$E" mailbox_store_100 p50_ms)
mb_queued=$(res "$E" mailbox_first_100 queued)
K="$R/backends.txt"
backend_rows=""
for m in "upload|200,000-flag region uploaded (12 councils, HTTPS), s" \
         "snapshot_build|Its snapshot built (first GET), ms" \
         "snapshot_cached|The snapshot from the cache, ms" \
         "polls|Checkpoint polls/s (64 in flight)" \
         "events|Access events stored/s (batches of 100, 16 in flight)" \
         "list_p50|Mailbox page of 100 at a random cursor, p50 ms" \
         "list_p99|Mailbox page of 100 at a random cursor, p99 ms"; do
    key=${m%%|*}; label=${m#*|}
    backend_rows+="| $label | $(res "$K" "backend_$key" sqlite) | $(res "$K" "backend_$key" postgres) | $(res "$K" "backend_$key" pg_slower_x)× |"$'\n'
done
r1p=$(res "$K" replicas_1 polls_per_s); r1e=$(res "$K" replicas_1 events_per_s)
r3p=$(res "$K" replicas_3 polls_per_s); r3e=$(res "$K" replicas_3 events_per_s)
fix_rate=$(FMT=%.0f calc "$FIX_FLAGS / $fix_s")
L="$R/live.txt"
lv_agents=$(res "$L" live_latency agents); lv_waiting=$(res "$L" live_latency waiting)
lv_p50=$(res "$L" live_latency p50_ms); lv_p99=$(res "$L" live_latency p99_ms)
lv_max=$(res "$L" live_latency max_ms)
lv_poll_min=$(res "$L" live_latency poll_min_s); lv_poll_max=$(res "$L" live_latency poll_max_s)
lv_kib=$(res "$L" live_memory kib_per_waiting); lv_held=$(res "$L" live_memory held)
lv_rss0=$(res "$L" live_memory rss_before_mib); lv_rss1=$(res "$L" live_memory rss_held_mib)
lv_herd=$(res "$L" live_herd waiters); lv_h50=$(res "$L" live_herd p50_ms)
lv_h99=$(res "$L" live_herd p99_ms); lv_hmax=$(res "$L" live_herd max_ms)
lv_shed=$(res "$L" live_herd shed)
lv_half=$(res "$L" live_restart half_s); lv_all=$(res "$L" live_restart all_s)
lv_busy=$(res "$L" live_restart busiest_second); lv_next=$(res "$L" live_restart next_change_ms)

ingest_rows=""
base1=$(res "$E" ingest_b1_f1 events_per_s)
base16=$(res "$E" ingest_b1_f16 events_per_s)
for size in 1 100 500; do
    one=$(res "$E" "ingest_b${size}_f1" events_per_s)
    sixteen=$(res "$E" "ingest_b${size}_f16" events_per_s)
    ingest_rows+="| $size | $(thou "$one") | $(x "$one" "$base1") | $(thou "$sixteen") | $(x "$sixteen" "$base16") |"$'\n'
done

load_note="Load average (1, 5, 15 min) before: $load_before; after: $load_after."
if [ "$others_at_start" -gt 0 ] || [ "$others_at_end" -gt 0 ] ||
    awk -v l="${load_before%% *}" -v c="$cores" 'BEGIN { exit !(l > c / 2) }'; then
    load_note+=" **Other work was loading this machine during the run** ($others_at_start compiler"
    load_note+=" processes of other sessions at the start, $others_at_end at the end): treat every"
    load_note+=" figure as pessimistic and noisy, tails (p99) most of all."
fi

# ---- write ----------------------------------------------------------------------------------
step "writing $OUT"
tmp="$OUT.tmp.$$"
{
cat << EOF
# Benchmarks

Written by \`bash bench-workspace/benchmarks.sh\` (do not edit by hand; run it again). Every
figure stands next to a baseline measured **in the same run, on the same machine**; ratios are
figure ÷ baseline. Release builds, loopback only. The method of each row is under *Method*.

## Machine

| | |
|---|---|
| CPU | $cpu_model |
| Cores | $cores |
| Memory | $mem_gib GiB |
| Kernel | $kernel |
| Rust | $rustc_v |
| nginx (baseline) | $nginx_v (Debian package) |
| Date | $started_at |
| Commit | \`$commit\`$dirty |
| Run time | ${total_secs} s, of which builds ${build_secs} s |
| Load average | before $load_before; after $load_after |

Machines of this kind are shared virtual machines: other tenants and, during development,
other sessions' builds compete for the same cores, so figures move from run to run (tails
most). $load_note Load average at each stage: $(IFS=';'; echo "${loads[*]}" | sed 's/;/; /g').

## Lookup ($(thou "$nflags") flags, p50 / p99)

| What | p50 | p99 | Baseline (same run) | Ratio p50 / p99 | Target |
|---|---|---|---|---|---|
| Agent encrypted store | $e50 µs | $e99 µs | plaintext SQLite, same rows and probes: $ap50 / $ap99 µs | $(x "$e50" "$ap50") / $(x "$e99" "$ap99") | within 2× |
| $sqlcipher_v, default settings | $c50 µs | $c99 µs | plaintext SQLite, same SQLite build: $cp50 / $cp99 µs | $(x "$c50" "$cp50") / $(x "$c99" "$cp99") | |
| Agent encrypted store vs SQLCipher | $e50 µs | $e99 µs | SQLCipher: $c50 / $c99 µs | $(x "$e50" "$c50") / $(x "$e99" "$c99") | below 1× |
| Audited lookup (access event committed with fsync first) | $au50 µs | $au99 µs | the same lookup without the event: $e50 / $e99 µs | $(x "$au50" "$e50") / $(x "$au99" "$e99") | p99 under 5,000 µs |

## Snapshot install ($(thou "$nflags") flags)

| What | Time | Baseline (same run) | Ratio | Target |
|---|---|---|---|---|
| Full verified install by the agent (signature, digest, decompress $ckib KiB, decode, seal, one transaction) | $inst ms | plaintext SQLite insert of the same rows + index, one transaction: $wplain ms | $(x "$inst" "$wplain") | under 2,000 ms |
| Encrypted store write alone (seal + one transaction) | $wenc ms | same plaintext insert: $wplain ms | $(x "$wenc" "$wplain") | |
| SQLCipher insert of the same rows + index | $cbc ms | plaintext insert with the same SQLite build: $cbp ms | $(x "$cbc" "$cbp") | |
| First sync end to end (\`cpis-agent sync\` over HTTPS: checkpoint, snapshot download, install, report) | $(FMT=%.0f calc "$full_s * 1000") ms | | | |

SQLCipher's open + key + first query (PBKDF2, paid once per open): $cbo ms.

## Bytes on the wire (one region, $(thou "$FLAGS") flags, ${#councils[@]} councils)

Measured by a TCP relay between the real \`cpis-agent sync\` and the real server: every byte
both ways, TLS handshake (mutual, certificates included) and records included. Each sync is
one new process, so each pays a full handshake. Baseline: the region's full council CSV files
(the councils' own format) compressed with \`gzip -6\`, downloaded every time — the payload
alone, without TLS or HTTP, which favours the baseline.

| Transfer | Down (server → tablet) | Up | Total | Baseline: gzip CSV | Total ÷ baseline |
|---|---|---|---|---|---|
| Full snapshot (first sync, version $full_version) | $(thou "$full_down") B | $(thou "$full_up") B | $(thou "$((full_down + full_up))") B | $(thou "$gz1") B (CSV $(thou "$csv1") B) | $(x "$((full_down + full_up))" "$gz1") |
| One day's delta to version $held_version (next day: $churn) | $(thou "$delta_down") B | $(thou "$delta_up") B | $(thou "$((delta_down + delta_up))") B | $(thou "$gz2") B (CSV $(thou "$csv2") B) | $(FMT=%.4f calc "($delta_down + $delta_up) / $gz2")× |
| No-change sync (checkpoint, fleet report) | $(thou "$none_down") B | $(thou "$none_up") B | $(thou "$((none_down + none_up))") B | $(thou "$gz2") B | $(FMT=%.4f calc "($none_down + $none_up) / $gz2")× |
| One no-change checkpoint poll on a kept-alive connection | $(FMT=%.0f calc "$rp_down / $rp_n") B | $(FMT=%.0f calc "$rp_up / $rp_n") B | $(FMT=%.0f calc "($rp_down + $rp_up) / $rp_n") B | $(thou "$gz2") B | $(FMT=%.5f calc "($rp_down + $rp_up) / $rp_n / $gz2")× |
| Enrolment (for reference) | $(thou "$enrol_down") B | $(thou "$enrol_up") B | $(thou "$((enrol_down + enrol_up))") B | | |

The signed checkpoint's body is $cp_bytes bytes. Snapshot body alone (server bench,
$(thou "$sg_flags") flags of another seed), against gzip -6 of the same flags as CSV
($(thou "$sg_gz") B, $(FMT=%.2f calc "$sg_gz / $sg_flags") B/flag, gzip took $sg_ms ms):

| Snapshot body | Bytes | B/flag | Build + compress + sign | ÷ gzip CSV | ÷ rows, same level |
|---|---|---|---|---|---|
| Columns (format 3, what tablets get), zstd 3 | $(thou "$c3") | $(FMT=%.2f calc "$c3 / $sg_flags") | $c3ms ms | $(x "$c3" "$sg_gz") | $(x "$c3" "$z3") |
| Columns, zstd 9 (server default) | $(thou "$c9") | $(FMT=%.2f calc "$c9 / $sg_flags") | $c9ms ms | $(x "$c9" "$sg_gz") | $(x "$c9" "$z9") |
| Columns, zstd 19 | $(thou "$c19") | $(FMT=%.2f calc "$c19 / $sg_flags") | $c19ms ms | $(x "$c19" "$sg_gz") | $(x "$c19" "$z19") |
| Rows (format 2, tablets that ask for no format), zstd 3 | $(thou "$z3") | $(FMT=%.2f calc "$z3 / $sg_flags") | $z3ms ms | $(x "$z3" "$sg_gz") | |
| Rows, zstd 9 | $(thou "$z9") | $(FMT=%.2f calc "$z9 / $sg_flags") | $z9ms ms | $(x "$z9" "$sg_gz") | |
| Rows, zstd 19 | $(thou "$z19") | $(FMT=%.2f calc "$z19 / $sg_flags") | $z19ms ms | $(x "$z19" "$sg_gz") | |

Target (issue 16, part 3): at most 8 B/flag on the wire with the server's default level.

## Checkpoint polls per second

Both measured with the same load generator (\`cpis-bench-tool load\`: rustls with ring,
HTTP/1.1, $CONNS kept-alive connections opened before the window, one request in flight on
each, 1 s warm-up, then $POLL_SECS s measured), the same device certificate and the same
server certificate, on this machine. nginx serves a static copy of the checkpoint's
$cp_bytes bytes with \`ssl_verify_client on\` against the device CA, access log off,
\`worker_processes auto\`. The sync server looks the device up and answers the region's
signed checkpoint on every request (its bodies measured $s_bmin–$s_bmax bytes in this run).

| Server | Polls/s | p50 | p99 | Requests | Reconnects | Polls/s ÷ nginx |
|---|---|---|---|---|---|---|
| cpis-sync-server \`GET /v1/device/checkpoint\` | $(thou "$sp") | $sp50 µs | $sp99 µs | $(thou "$sreq") | $srec | $(x "$sp" "$np") |
| nginx, static file over TLS (baseline) | $(thou "$np") | $np50 µs | $np99 µs | $(thou "$nreq") | $nrec | 1.00× |

The load generator shares the $cores cores with the server it measures, for both rows. The
server bench's own figure (HTTP/2, 4 connections × 16 streams, in-process client):
$(thou "$h2polls") polls/s.

## Event ingest (mutual TLS, HTTP/2, durable commit before each answer, 50% flagged)

| Events per batch | Events/s, 1 request in flight | ÷ batch of 1 | Events/s, 16 in flight | ÷ batch of 1 |
|---|---|---|---|---|
$ingest_rows
## Council mailbox listing ($(thou "$mb_queued") notices queued for one council)

| Listing, limit 100 | p50 | p99 | Baseline: the store query alone (p50 / p99) | Ratio p99 |
|---|---|---|---|---|
| First page over HTTPS (bearer token) | $mb_first50 ms | $mb_first ms | $mb_store50 / $mb_store ms | $(x "$mb_first" "$mb_store") |
| Page at a random cursor over HTTPS | $mb_rand50 ms | $mb_rand ms | $mb_store50 / $mb_store ms | $(x "$mb_rand" "$mb_store") |

## PostgreSQL against SQLite; one replica against three

The same server, through HTTPS on loopback, on each backend (PostgreSQL 15 in a throw-away
cluster with \`fsync\` on, as SQLite's \`synchronous=FULL\`). Ratio: how many times slower
PostgreSQL is (per request; above 1 is slower). Target: within 2×.

| What | SQLite | PostgreSQL | PostgreSQL slower by |
|---|---|---|---|
$backend_rows
Behind HAProxy (TCP, TLS passed through), PostgreSQL, every replica in one process:

| Replicas | Checkpoint polls/s | Events stored/s |
|---|---|---|
| 1 | $r1p | $r1e |
| 3 | $r3p ($(x "$r3p" "$r1p") of one) | $r3e ($(x "$r3e" "$r1e") of one) |

On 2 cores the replicas, HAProxy, PostgreSQL and the load generator share the same two
cores, so three replicas cannot be faster than one here: the row shows what the extra hops
cost, not how the service scales on separate machines. Every transaction that takes versions
or notification ids waits for the one before it (see sync-server/README.md, "Versions across
replicas"), so event ingest does not scale with replicas at all.

## Live feed: a new flag on every connected tablet

Connected tablets hold one waiting request (\`GET /v1/device/checkpoint/wait\`), answered as
soon as their region's head moves. The field test \`live\` against the real server binary:
$(thou "$lv_agents") real agents of one region, $(thou "$lv_waiting") lightweight waiting
tablets of another on the same server.

| What | Figure | Baseline | Goal |
|---|---|---|---|
| Council upload accepted → every connected agent holding the new flag, p50 / p99 / max | $lv_p50 / $lv_p99 / $lv_max ms | polling on the default schedule: the next poll ${lv_poll_min}–${lv_poll_max} s away (the schedule, not measured) | p99 ≤ 5,000 ms |
| Server memory per waiting connection ($(thou "$lv_held") held) | $lv_kib KiB (resident $lv_rss0 → $lv_rss1 MiB) | | 10,000 held on one server |
| One change waking $(thou "$lv_herd") waiting tablets at once: all answered and their deltas taken, p50 / p99 / max | $lv_h50 / $lv_h99 / $lv_hmax ms ($lv_shed requests shed and retried after their \`Retry-After\`) | | |
| Server restarted: agents holding a waiting request again, half / all | $lv_half / $lv_all s (at most $lv_busy of $lv_agents in any one second) | | spread out, not in step |
| The next change after the restart, on every agent | $lv_next ms | | p99 ≤ 5,000 ms |

## Council uploads

| What | Time | Baseline (same run) | Ratio |
|---|---|---|---|
| $(thou "$u_rows")-row council CSV, HTTPS upload, first (all added) | $u_first ms | parse + validate the file in process: $u_parse ms | $(x "$u_first" "$u_parse") |
| Same file again (nothing changes) | $u_same ms | $u_parse ms | $(x "$u_same" "$u_parse") |
| Next day's file | $u_next ms | $u_parse ms | $(x "$u_next" "$u_parse") |
| A whole region, ${#councils[@]} councils, $(thou "$FLAGS") flags, curl, one file after another | $(FMT=%.0f calc "$up1_s * 1000") ms | | |
| Its next day | $(FMT=%.0f calc "$up2_s * 1000") ms | | |

## Agent idle memory and CPU

The real \`cpis-agent run\` on the tablet enrolled above, holding the region
(version $held_version, about $(thou "$FLAGS") flags), after its start-up sync, idle
for $(FMT=%.1f calc "$window") s: resident memory from /proc/PID/status (VmRSS now, VmHWM
peak) and CPU from utime + stime in /proc/PID/stat over the window (in clock ticks of
$(FMT=%.0f calc "1000 / $hz") ms). Baseline: nginx (master and workers, $n_procs processes)
idle over the same window, after serving the polls above. The snapshot was installed by the
\`cpis-agent sync\` process before, not by this one.

| Process | RSS | Peak RSS | CPU over the window | CPU ticks | RSS ÷ nginx |
|---|---|---|---|---|---|
| cpis-agent run ($a_thr threads) | $(kib "$a_rss") MiB | $(kib "$a_hwm") MiB | $a_cpu % | $a_ticks | $(x "$a_rss" "$n_rss") |
| nginx, idle (baseline) | $(kib "$n_rss") MiB | $(kib "$n_hwm") MiB | $n_cpu % | $n_ticks | 1.00× |
| cpis-sync-server, idle (for reference) | $(kib "$s_rss") MiB | $(kib "$s_hwm") MiB | $s_cpu % | $s_ticks | $(x "$s_rss" "$n_rss") |

For reference, the whole \`cpis-agent sync\` processes above (GNU time): the first sync,
which downloads and installs the snapshot, peaked at $(kib "$full_maxrss") MiB resident and used
$(FMT=%.2f calc "$full_cpu_u + $full_cpu_s") s of CPU; the delta sync peaked at
$(kib "$delta_maxrss") MiB and used $(FMT=%.2f calc "$delta_cpu_u + $delta_cpu_s") s.

## Synthetic data generation

| What | Time | Baseline (same run) | Ratio | Target |
|---|---|---|---|---|
| \`cpis-fixtures generate --flags $FIX_FLAGS\` ($(FMT=%.1f calc "$fix_bytes / 1048576") MiB written; $(thou "$fix_rate") flags/s) | $fix_s s | copying the files it wrote (\`cp -r\`): $cp_s s | $(x "$fix_s" "$cp_s") | well under 60 s |

## Method

* The benches are built with \`cargo bench --no-run --locked\` first and their executables run
  from there, so nothing is rebuilt between stages.
* Lookup: \`cargo bench -p cpis-agent --bench lookup\` (agent store and its plaintext floor,
  interleaved, 25,000 seeded probes of which 20,000 hit) and \`sqlcipher-bench\` in
  bench-workspace (the same probes against SQLCipher and a plaintext table built with the
  same SQLCipher-enabled SQLite); each ratio uses the floor of its own run.
* Install and writes: the agent bench times \`apply_snapshot\` and the store write; the
  plaintext insert is the floor's table build (rows + index, one transaction,
  synchronous=FULL).
* Wire: \`cpis-fixtures generate --regions 1 --councils 12 --days 1\`, uploaded with curl;
  \`cpis-agent enrol\` then three \`cpis-agent sync\` runs through \`cpis-bench-tool relay\`.
* Polls, ingest, mailbox, uploads, snapshot sizes: \`cpis-bench-tool load\`,
  \`cargo bench -p cpis-sync-server --bench events\` and \`--bench server\`.
* PostgreSQL against SQLite, one replica against three: \`cargo bench -p cpis-sync-server
  --bench backends\` (a 200,000-flag region from \`cpis-fixtures\`; its own PostgreSQL
  cluster and HAProxy from \`scripts/\`).
* Live feed: the field test \`live::a_new_flag_reaches_every_connected_tablet_within_seconds_with_10000_waiting\`
  built with \`cargo test --release -p cpis-field-tests --no-run\` and run from its
  executable (field-tests/README.md; its \`RESULT live_*\` lines).
* Raw output of every step is printed on the terminal while the script runs.
EOF
} > "$tmp"
if [ -e "$work/calc-failed" ] || grep -q -w -E 'ERR|nan|-?inf' "$tmp"; then
    grep -n -w -E 'ERR|nan|-?inf' "$tmp" >&2 || true
    rm -f "$tmp"
    die "a figure could not be computed (see the lines above); $OUT left as it was"
fi
mv -f "$tmp" "$OUT"
step "done in ${total_secs} s: $OUT"
