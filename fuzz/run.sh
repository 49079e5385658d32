#!/usr/bin/env bash
# Builds the fuzz targets with clang++ -fsanitize=fuzzer,address,undefined
# and runs each for SECONDS (default 60) on a copy of its seed corpus.
# Usage: fuzz/run.sh [SECONDS] [target...]      targets: json frame worker
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(json frame worker)
out=build-fuzz
mkdir -p "$out"
for t in "${targets[@]}"; do
  clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I. "fuzz/${t}_fuzz.cpp" -o "$out/${t}_fuzz"
  work="$out/corpus-$t"
  mkdir -p "$work"
  cp -n fuzz/corpus/"$t"/* "$work"/ 2>/dev/null || true
  echo "== fuzzing $t for $seconds s"
  "$out/${t}_fuzz" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$out/$t-" "$work"
done
