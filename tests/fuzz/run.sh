#!/bin/sh
# Runs each libFuzzer harness named on the command line, BUILD/fuzz_NAME, for
# SECONDS on its corpus BUILD/corpus/NAME (seeded by make_seeds; what the
# fuzzer finds is added there), one after another. Each run's output goes to
# BUILD/logs/NAME.log and a crash's input to BUILD/artifacts/NAME-*. Prints one
# line per harness (runs, exec/s, coverage) and fails if any harness crashed.
# Usage: run.sh BUILD SECONDS NAME...
set -u
build=$1
seconds=$2
shift 2
dict=$(dirname "$0")/moelab.dict
mkdir -p "$build/artifacts" "$build/logs"
bad=""
for name in "$@"; do
    log=$build/logs/$name.log
    echo "fuzz: $name for ${seconds}s (log: $log)"
    # -rss_limit_mb also limits any one malloc: a harness allocating gigabytes
    # is reported as a crash (see the temporary cap in fuzz_checkpoint.c).
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} \
    UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
    "$build/fuzz_$name" -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=60 \
        -dict="$dict" -artifact_prefix="$build/artifacts/$name-" -print_final_stats=1 \
        "$build/corpus/$name" >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n 1)
    cov=$(printf '%s\n' "$last" | sed -n 's/.* cov: \([0-9]*\).*/\1/p')
    ft=$(printf '%s\n' "$last" | sed -n 's/.* ft: \([0-9]*\).*/\1/p')
    corp=$(printf '%s\n' "$last" | sed -n 's/.* corp: \([0-9]*\).*/\1/p')
    stats="${runs:-?} runs, ${speed:-?} exec/s, cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}"
    if [ "$rc" -eq 0 ]; then
        echo "fuzz: $name: clean: $stats"
    else
        echo "fuzz: $name: FAILED (exit $rc): $stats; the end of $log:"
        tail -n 40 "$log"
        bad="$bad $name"
    fi
done
if [ -n "$bad" ]; then
    echo "fuzz: crashes in:$bad (inputs in $build/artifacts/)"
    exit 1
fi
echo "fuzz: no crashes in: $*"
