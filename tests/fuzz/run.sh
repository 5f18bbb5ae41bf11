#!/usr/bin/env bash
# Runs each libFuzzer target for SECONDS on a working copy of its seed corpus
# (tests/fuzz/corpus/<target>, never modified) and prints one summary line per
# target: executions, corpus growth, findings.
#   tests/fuzz/run.sh BUILD_DIR SECONDS TARGET...
# Fails if a target crashed (its input is in BUILD_DIR/fuzz-out/<target>/).
set -euo pipefail
build=$1 seconds=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
out=$build/fuzz-out
summary=()
status=0
for target in "$@"; do
  work=$out/$target
  rm -rf "$work" && mkdir -p "$work/corpus" "$work/artifacts" "$work/findings"
  log=$work/log.txt
  start=$(date +%s)
  # -rss_limit_mb: libtorch + ASan need more than the default 2 GB of address
  # space bookkeeping; single allocations above -malloc_limit_mb still fail.
  set +e
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:allocator_may_return_null=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  OPEN_FUZZ_FINDINGS=$work/findings/ TMPDIR=${TMPDIR:-/tmp} \
    "$build/fuzz_$target" -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=4096 \
      -malloc_limit_mb=1024 -timeout=30 -artifact_prefix="$work/artifacts/" \
      "$work/corpus" "$here/corpus/$target" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$log" | tail -1 | grep -o 'cov: [0-9]*' || true)
  findings=$(ls "$work/findings" | wc -l)
  line="fuzz_$target: ${execs} executions in $(( $(date +%s) - start )) s, ${cov:-cov: ?}, corpus $(ls "$work/corpus" | wc -l) new inputs, $findings LMDB findings"
  if [ $rc -ne 0 ]; then
    line="$line, CRASH (exit $rc): $(ls "$work/artifacts" | tr '\n' ' ')"
    status=1
    tail -60 "$log"
  fi
  grep -h '^open_fuzz: LMDB finding' "$log" | sort | uniq -c | sed 's/^/  /' || true
  echo "$line"
  summary+=("$line")
done
echo "---- fuzz summary ($seconds s per target; logs in $out/<target>/log.txt)"
printf '%s\n' "${summary[@]}"
exit $status
