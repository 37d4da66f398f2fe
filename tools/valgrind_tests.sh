#!/usr/bin/env bash
# Runs the crate's test binaries under valgrind's memcheck (see docs/unsafe.md).
#
#   tools/valgrind_tests.sh                 # every test binary
#   tools/valgrind_tests.sh lib parity      # the unit tests and tests/parity.rs only
#
# A binary passes when memcheck reports no error: no invalid read or write, no use of
# uninitialised memory, no definite, indirect or possible leak beyond the suppressions in
# tools/valgrind.supp (blocks still in use at exit). Logs go to target/valgrind/.
#
# valgrind 3.19 does not execute AVX-512 instructions, and its CPUID reports no AVX-512, so the
# runtime dispatch of gemm, matrixmultiply and the crate's multiversion kernels takes the
# AVX2+FMA paths under it.
set -euo pipefail
cd "$(dirname "$0")/.."

export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"   # the parallel products too
export PROPTEST_CASES="${PROPTEST_CASES:-16}"

# "Executable unittests src/lib.rs (target/debug/deps/ndtransformer-…)" → "lib target/…"
mapfile -t binaries < <(
    cargo test --no-run 2>&1 |
        sed -n 's/^ *Executable \(unittests src\/lib.rs\|tests\/\([a-z_]*\)\.rs\) (\(.*\))$/\2 \3/p' |
        sed 's/^ /lib /'
)
if [ ${#binaries[@]} -eq 0 ]; then
    echo "no test binaries: cargo test --no-run failed?" >&2
    exit 1
fi
wanted=("$@")
mkdir -p target/valgrind
failed=0
for entry in "${binaries[@]}"; do
    name=${entry%% *} path=${entry#* }
    if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $name "* ]]; then
        continue
    fi
    log=target/valgrind/$name.log
    start=$SECONDS
    if valgrind --tool=memcheck --error-exitcode=1 --leak-check=full \
        --suppressions=tools/valgrind.supp "$path" >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed=1
    fi
    errors=$(grep -o 'ERROR SUMMARY: [0-9]* errors' "$log" | tail -1 || true)
    leaks=$(sed -n 's/^==[0-9]*== *\(definitely\|indirectly\|possibly\) lost: \([0-9,]*\) bytes.*/\1 \2/p' "$log" |
        paste -sd/ - | sed 's|/| / |g' || true)
    suppressed=$(grep -o 'suppressed: [0-9,]* bytes' "$log" | tail -1 || true)
    tests=$(grep -o 'test result: .*passed; [0-9]* failed' "$log" | tail -1 || true)
    printf '%-16s %-6s %4ss  %s; lost (bytes): %s (%s); %s\n' "$name" "$status" \
        $((SECONDS - start)) "${errors:-no error summary (see $log)}" "${leaks:-none}" \
        "${suppressed:-none suppressed}" "$tests"
done
exit $failed
