#!/usr/bin/env bash
# Runs every benchmark 5 times and prints the medians and the ratios the
# targets are stated in. Usage: bench/run.sh [build-dir]   (default build-bench)
# Builds with -O2 when the build directory does not exist yet.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-bench}
if [ ! -x "$build/bench/aet_bench" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DAET_BUILD_BENCH=ON -DAET_BUILD_TESTS=OFF \
    -DAET_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$build" --target aet_bench -j2 >/dev/null
fi
bench="$build/bench/aet_bench"
runs=5
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# Each subcommand's lines are prefixed with its name; "rtt0" and
# "checkouts0" are the same runs with hung_worker_timeout = 0 (no watchdog).
for _ in $(seq $runs); do
  for args in "rtt 20000" "checkouts 20000 4" "spawn 300" "payload 1048576" "json" "memory" "scale 500"; do
    # shellcheck disable=SC2086
    "$bench" $args | sed "s/^/${args%% *} /" >>"$out"
  done
  for args in "rtt 20000" "checkouts 20000 4"; do
    # shellcheck disable=SC2086
    AET_BENCH_HUNG_TIMEOUT=0 "$bench" $args | sed "s/^/${args%% *}0 /" >>"$out"
  done
done

# median of each (subcommand, name) pair
medians=$(awk '{ v[$1" "$2] = v[$1" "$2] " " $3 }
  END { for (k in v) { n = split(substr(v[k], 2), a, " ");
          for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
          print k, (n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2) } }' "$out" | sort)
echo "$medians"
m() { echo "$medians" | awk -v k="$1 $2" '$1" "$2 == k { print $3 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
echo
echo "ratios (target in brackets)"
echo "rtt / floor                    $(ratio "$(m rtt rtt_us)" "$(m rtt floor_rtt_us)")   [<= 1.25]"
echo "  hung_worker_timeout = 0      $(ratio "$(m rtt0 rtt_us)" "$(m rtt0 floor_rtt_us)")"
echo "checkouts W=4 / floor          $(ratio "$(m checkouts checkouts_per_s)" "$(m checkouts floor_checkouts_per_s)")   [>= 0.5]"
echo "  hung_worker_timeout = 0      $(ratio "$(m checkouts0 checkouts_per_s)" "$(m checkouts0 floor_checkouts_per_s)")"
echo "spawn / floor                  $(ratio "$(m spawn spawn_us)" "$(m spawn floor_spawn_us)")   [<= 1.5]"
echo "payload 1 MiB / floor          $(ratio "$(m payload payload_mb_s)" "$(m payload floor_payload_mb_s)")   [>= 0.5]"
echo "json parse / nlohmann          $(ratio "$(m json json_parse_mb_s)" "$(m json nlohmann_parse_mb_s)")   [>= 3]"
echo "json parse / rapidjson         $(ratio "$(m json json_parse_mb_s)" "$(m json rapidjson_parse_mb_s)")   [>= 0.5]"
echo "json dump / nlohmann           $(ratio "$(m json json_dump_mb_s)" "$(m json nlohmann_dump_mb_s)")   [>= 3]"
echo "json dump / rapidjson          $(ratio "$(m json json_dump_mb_s)" "$(m json rapidjson_dump_mb_s)")   [>= 0.5]"
echo "pending checkout bytes         $(m memory pending_checkout_bytes)   [<= 1024]"
echo "scale W=500 / W=4              $(ratio "$(m scale checkouts_per_s)" "$(m checkouts checkouts_per_s)")   [>= 0.5]"
