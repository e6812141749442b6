#!/usr/bin/env bash
# Where a checkpoint poll's time goes, and how many polls a second the server answers next to
# nginx serving the same bytes. One command:
#
#     bash bench-workspace/profile-polls.sh
#
# Builds the release server and the load generator, serves one fixture region (20,000 flags),
# then, with 64 kept-alive connections (1 s warm-up + 10 s measured each):
#   1. polls/s against the server, then against nginx (same certificates, same client check);
#   2. the server again under `perf record` (Debian's linux-perf, sampling the CPU clock with
#      DWARF call graphs), folded and drawn by inferno (crates.io, installed into
#      bench-workspace/tools) into docs/profiles/checkpoint-polls.svg, with the heaviest
#      frames written to docs/profiles/checkpoint-polls.md.
# The figures are printed as RESULT lines too. BENCHMARKS.md (benchmarks.sh) stays the
# published record; this is the quick loop for the poll path.
#
# Knobs (environment): CPIS_PROFILE_FLAGS (20000), CPIS_PROFILE_SECS (10),
# CPIS_BENCH_CONNECTIONS (64), CPIS_PROFILE_OUT (docs/profiles), CPIS_BENCH_KEEP=1.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
FLAGS="${CPIS_PROFILE_FLAGS:-20000}"
SECS="${CPIS_PROFILE_SECS:-10}"
CONNS="${CPIS_BENCH_CONNECTIONS:-64}"
OUTDIR="${CPIS_PROFILE_OUT:-$root/docs/profiles}"
bench_name=profile-polls.sh
# shellcheck source=bench-workspace/lib.sh
. "$here/lib.sh"

need_pkgs=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx-light)
command -v perf >/dev/null 2>&1 || need_pkgs+=(linux-perf)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v jq >/dev/null 2>&1 || need_pkgs+=(jq)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    step "installing ${need_pkgs[*]} from Debian's packages"
    apt_install "${need_pkgs[@]}"
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
INFERNO="$here/tools/bin"
if [ ! -x "$INFERNO/inferno-flamegraph" ]; then
    step "installing inferno 0.12.8 (flame graphs) from crates.io into $here/tools"
    cargo install --locked --quiet inferno --version 0.12.8 --root "$here/tools"
fi

step "release builds"
(cd "$root" && cargo build --locked --release -q -p cpis-sync-server -p cpis-fixtures)
(cd "$here" && cargo build --locked --release -q --bin cpis-bench-tool)
B="$root/target/release"
TOOL="$here/target/release/cpis-bench-tool"
R="$work/results"
mkdir -p "$R"

step "a region of $FLAGS flags, served and uploaded"
FX="$work/fixtures"
region_fixtures "$FX" "$FLAGS" "$R/fixtures.txt"
serve_region "$FX"
upload_all "$FX" > /dev/null
fetch_checkpoint_bytes
serve_nginx
say "signed checkpoint: $cp_bytes bytes"

step "polls/s: server, nginx ($CONNS connections, 1 s warm-up + $SECS s each)"
"$TOOL" load "$SPORT" /v1/device/checkpoint "$CA" "$CERT" "$KEY" "$CONNS" "$SECS" server > "$R/polls.txt"
"$TOOL" load "$NPORT" /v1/device/checkpoint "$CA" "$CERT" "$KEY" "$CONNS" "$SECS" nginx >> "$R/polls.txt"
sp=$(res "$R/polls.txt" server polls_per_s)
np=$(res "$R/polls.txt" nginx polls_per_s)
ratio=$(calc "$sp / $np")
say "server $sp polls/s, nginx $np polls/s: ${ratio}x"
echo "RESULT profile_polls server_polls_per_s=$sp nginx_polls_per_s=$np ratio=$ratio"

step "the server under perf record ($SECS s of polls)"
perf record -q -F 499 --call-graph dwarf,16384 -p "$server_pid" -o "$work/perf.data" &
perf_pid=$!
sleep 1
"$TOOL" load "$SPORT" /v1/device/checkpoint "$CA" "$CERT" "$KEY" "$CONNS" "$SECS" profiled > "$R/profiled.txt"
kill -INT "$perf_pid"
wait "$perf_pid" || true
pp=$(res "$R/profiled.txt" profiled polls_per_s)
perf script --no-inline -i "$work/perf.data" 2> /dev/null | "$INFERNO/inferno-collapse-perf" > "$work/folded.txt"
# Each line ends with its weight (CPU-clock nanoseconds); the sum is the server's CPU time.
samples=$(awk '{ s += $NF } END { printf "%.0f", s }' "$work/folded.txt")
[ "$samples" != 0 ] || die "perf recorded no samples of the server"
cpu_s=$(FMT=%.1f calc "$samples / 1e9")
mkdir -p "$OUTDIR"
"$INFERNO/inferno-flamegraph" --title "cpis-sync-server: GET /v1/device/checkpoint under load" \
    < "$work/folded.txt" > "$OUTDIR/checkpoint-polls.svg"

# Share of samples in which a frame appears (inclusive) for the frames that matter most, and
# the leaf frames (exclusive).
top() { # top MODE: inclusive or leaf
    awk -v mode="$1" -v total="$samples" '{
        n = $NF; $NF = ""; k = split($0, f, ";")
        if (mode == "leaf") { c[f[k]] += n; next }
        delete seen
        for (i = 1; i <= k; i++) { g = f[i]; sub(/ +$/, "", g); if (!(g in seen)) { seen[g] = 1; c[g] += n } }
    } END { for (g in c) printf "%.1f\t%s\n", 100 * c[g] / total, g }' "$work/folded.txt" |
        sort -rn | awk -v n="$2" 'NR <= n'
}
{
    echo "# Where a checkpoint poll's time goes"
    echo
    echo "Written by \`bash bench-workspace/profile-polls.sh\` at commit $(git -C "$root" rev-parse --short=12 HEAD)"
    echo "on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores, load $(loadavg) at the end."
    echo "$CONNS kept-alive connections, HTTP/1.1, mutual TLS, $SECS s measured, region of $FLAGS flags."
    echo
    echo "| Server | Polls/s |"
    echo "|---|---|"
    echo "| cpis-sync-server | $(thou "$sp") |"
    echo "| nginx, the same bytes as a static file (baseline) | $(thou "$np") |"
    echo "| ratio | ${ratio}x |"
    echo "| cpis-sync-server under perf (sampling costs a little) | $(thou "$pp") |"
    echo
    echo "Flame graph: [checkpoint-polls.svg](checkpoint-polls.svg) (the server's threads sampled at"
    echo "499 Hz of CPU clock, $cpu_s CPU seconds in all; the load generator runs on the same 2 cores,"
    echo "not sampled). Shares below are of the server's CPU time."
    echo
    echo "## Frames on the stack (inclusive), top 40"
    echo
    echo '| % of CPU | Frame |'
    echo '|---|---|'
    top inclusive 40 | awk -F'\t' '{ gsub(/\|/, "\\|", $2); printf "| %s | `%s` |\n", $1, $2 }'
    echo
    echo "## Leaf frames (exclusive), top 25"
    echo
    echo '| % of CPU | Frame |'
    echo '|---|---|'
    top leaf 25 | awk -F'\t' '{ gsub(/\|/, "\\|", $2); printf "| %s | `%s` |\n", $1, $2 }'
} > "$OUTDIR/checkpoint-polls.md"
say "wrote $OUTDIR/checkpoint-polls.svg and checkpoint-polls.md ($cpu_s CPU seconds sampled)"
