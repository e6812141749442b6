#!/usr/bin/env bash
# Lookup p50/p99 on a 200k-flag region, three ways, side by side:
#   * the agent's encrypted store   (cargo bench -p cpis-agent --bench lookup, main workspace)
#   * SQLCipher, default settings   (sqlcipher-bench, this workspace: it links SQLCipher and
#                                    OpenSSL, which the product must never do)
#   * plaintext SQLite, the floor   (measured in each run, same schema and probes)
# Each ratio is against the plaintext floor measured in the same run (the two runs use
# different SQLite builds). CPIS_BENCH_FLAGS changes the number of flags for both.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"

echo "== agent benchmark (main workspace) ==" >&2
agent_out="$(cd "$root" && cargo bench --locked -q -p cpis-agent --bench lookup)"
echo "$agent_out" | grep -v '^RESULT' >&2
echo "== SQLCipher benchmark (bench-workspace) ==" >&2
cipher_out="$(cd "$here" && cargo run --locked -q --release --bin sqlcipher-bench)"
echo "$cipher_out" | grep -v '^RESULT' >&2

field() { # field OUTPUT NAME KEY
    echo "$1" | awk -v n="$2" -v k="$3" '$1 == "RESULT" && $2 == n {
        for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) print kv[2] } }'
}

ap50=$(field "$agent_out" plaintext p50_us);  ap99=$(field "$agent_out" plaintext p99_us)
e50=$(field "$agent_out" encrypted p50_us);   e99=$(field "$agent_out" encrypted p99_us)
cp50=$(field "$cipher_out" plaintext p50_us); cp99=$(field "$cipher_out" plaintext p99_us)
c50=$(field "$cipher_out" sqlcipher p50_us);  c99=$(field "$cipher_out" sqlcipher p99_us)
a50=$(field "$agent_out" audited p50_us);     a99=$(field "$agent_out" audited p99_us)
inst=$(field "$agent_out" install ms);        nflags=$(field "$agent_out" install flags)
kib=$(field "$agent_out" install compressed_kib)

echo
echo "lookup, ${nflags} flags                 p50 µs    p99 µs   vs plaintext floor of its run (p50 / p99)"
awk -v ap50="$ap50" -v ap99="$ap99" -v e50="$e50" -v e99="$e99" \
    -v cp50="$cp50" -v cp99="$cp99" -v c50="$c50" -v c99="$c99" 'BEGIN {
    printf "plaintext SQLite (agent run)     %8.1f  %8.1f   1.00x / 1.00x\n", ap50, ap99
    printf "agent encrypted store            %8.1f  %8.1f   %.2fx / %.2fx   (target <= 2x)\n", e50, e99, e50/ap50, e99/ap99
    printf "plaintext SQLite (SQLCipher run) %8.1f  %8.1f   1.00x / 1.00x\n", cp50, cp99
    printf "SQLCipher (default settings)     %8.1f  %8.1f   %.2fx / %.2fx\n", c50, c99, c50/cp50, c99/cp99
    printf "agent encrypted vs SQLCipher: p50 %.2fx, p99 %.2fx of SQLCipher'\''s time (target < 1)\n", e50/c50, e99/c99
}'
echo "full verified install: ${inst} ms (${kib} KiB compressed; target < 2000 ms)"
echo "audited lookup (event fsync'd): p50 ${a50} µs, p99 ${a99} µs (target p99 < 5000 µs)"
