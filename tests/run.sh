#!/bin/sh
# Runs each cmocka test program named on the command line (from $BUILD) and
# ends with one summary line: "N passed, N failed". A program that crashes or
# exits non-zero without a cmocka summary counts as one failure. NAME@CORE
# runs NAME with OPENBLAS_CORETYPE=CORE (OpenBLAS's kernels for that processor)
# and libxsmm's kernels for the same family (LIBXSMM_TARGET: Haswell hsw,
# SkylakeX skx); NAME@nojit runs it with libxsmm's JIT off (LIBXSMM_TARGET=
# generic), so that OpenBLAS computes the small products too (src/smm.h).
set -u
BUILD=${BUILD:-build}
passed=0
failed=0
bad=""
for t in "$@"; do
    case $t in
    *@nojit) out=$(LIBXSMM_TARGET=generic "$BUILD/${t%@*}" 2>&1) ;;
    *@*)
        core=${t#*@}
        case $core in
        Haswell) xsmm=hsw ;;
        SkylakeX) xsmm=skx ;;
        *) xsmm=${LIBXSMM_TARGET:-} ;;
        esac
        out=$(OPENBLAS_CORETYPE=$core LIBXSMM_TARGET=$xsmm "$BUILD/${t%@*}" 2>&1) ;;
    *) out=$("$BUILD/$t" 2>&1) ;;
    esac
    rc=$?
    printf '%s\n' "$out"
    p=$(printf '%s\n' "$out" | sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' | awk '{s+=$1} END {print s+0}')
    f=$(printf '%s\n' "$out" | sed -n 's/^\[  FAILED  \] \([0-9]*\) test.*/\1/p' | awk '{s+=$1} END {print s+0}')
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
    passed=$((passed + p))
    failed=$((failed + f))
    [ "$rc" -ne 0 ] && bad="$bad $t"
done
[ -n "$bad" ] && echo "failing programs:$bad"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
