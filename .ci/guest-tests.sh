#!/bin/sh
# Runs inside a test guest (busybox sh, cwd /opt): each argument is one test
# binary with its arguments. Prints one line per binary, labelled with the
# guest's kernel, and the failures in full; exits 1 if any binary failed.
kernel="$(uname -r)"
status=0
for spec in "$@"; do
    # shellcheck disable=SC2086 # the spec is split into binary and arguments on purpose
    set -- $spec
    bin=$1
    shift
    start=$(cut -d' ' -f1 /proc/uptime)
    "./$bin" --test-threads=2 "$@" >"/tmp/$bin.out" 2>&1
    rc=$?
    end=$(cut -d' ' -f1 /proc/uptime)
    summary=$(grep '^test result' "/tmp/$bin.out" | tail -n 1)
    echo "[kernel $kernel] $bin $*: exit $rc, $summary (guest ${start}s-${end}s)"
    if [ "$rc" -ne 0 ]; then
        status=1
        grep -v '^\[ *[0-9.]*\]' "/tmp/$bin.out" | grep -E -A12 '^---- |^test .* FAILED|panicked' | head -n 120
    fi
done
exit $status
