#!/usr/bin/env bash
# Runs every benchmark 5 times and prints the medians, and the ratios the
# targets are stated in: each ratio is taken within one run (the library and
# its floor measured side by side, in alternating batches), then the median
# of the 5 runs' ratios is shown.
#
# Usage: bench/run.sh [build-dir]   (default build-bench; built as Release
# when bench/aet_bench is missing there). AET_BENCH_BIN=path runs another
# binary (an older build, say) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-bench}
bench=${AET_BENCH_BIN:-$build/bench/aet_bench}
if [ -z "${AET_BENCH_BIN:-}" ] && [ ! -x "$bench" ]; then
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DAET_BUILD_BENCH=ON -DAET_BUILD_TESTS=OFF \
    -DAET_BUILD_EXAMPLES=OFF >/dev/null
  cmake --build "$build" --target aet_bench -j2 >/dev/null
fi
runs=5
out=$(mktemp)
trap 'rm -f "$out"' EXIT

# Lines: "run subcommand name value". "rtt0" and "checkouts0" are rtt and
# checkouts with hung_worker_timeout = 0 (no watchdog), for comparison; each
# runs right after its default twin, so that both meet the machine in the
# same state.
for run in $(seq $runs); do
  for args in "rtt 20000" "checkouts 20000 4" "spawn 300" "payload 1048576" "json" "memory" "scale 500"; do
    # shellcheck disable=SC2086
    "$bench" $args | sed "s/^/$run ${args%% *} /" >>"$out"
    case $args in
      rtt* | checkouts*)
        # shellcheck disable=SC2086
        AET_BENCH_HUNG_TIMEOUT=0 "$bench" $args | sed "s/^/$run ${args%% *}0 /" >>"$out" ;;
    esac
  done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# median over the runs of one figure
m() { awk -v k="$1 $2" '$2" "$3 == k { print $4 }' "$out" | median; }
# median over the runs of the ratio of two figures of the same run
r() {
  awk -v a="$1 $2" -v b="$1 $3" '$2" "$3 == a { x[$1] = $4 } $2" "$3 == b { y[$1] = $4 }
    END { for (k in x) if (y[k] > 0) printf "%.4f\n", x[k] / y[k] }' "$out" | median
}
# median over the runs of figure(s1) / figure(s2), across two subcommands of a run
rr() {
  awk -v a="$1 $2" -v b="$3 $4" '$2" "$3 == a { x[$1] = $4 } $2" "$3 == b { y[$1] = $4 }
    END { for (k in x) if (y[k] > 0) printf "%.4f\n", x[k] / y[k] }' "$out" | median
}

echo "medians of $runs runs"
awk '{ print $2, $3 }' "$out" | sort -u | while read -r sub name; do
  printf '%-12s %-28s %s\n' "$sub" "$name" "$(m "$sub" "$name")"
done
echo
echo "ratios, each within a run; median of $runs (target in brackets)"
printf '%-34s %6.2f   [<= 1.25]\n' "rtt / floor" "$(r rtt rtt_us floor_rtt_us)"
printf '%-34s %6.2f\n' "  with hung_worker_timeout 0" "$(r rtt0 rtt_us floor_rtt_us)"
printf '%-34s %6.2f   [>= 0.5]\n' "checkouts W=4 / floor" "$(r checkouts checkouts_per_s floor_checkouts_per_s)"
printf '%-34s %6.2f\n' "  with hung_worker_timeout 0" "$(r checkouts0 checkouts_per_s floor_checkouts_per_s)"
printf '%-34s %6.2f   [<= 1.5]\n' "spawn / floor" "$(r spawn spawn_us floor_spawn_us)"
printf '%-34s %6.2f   [>= 0.5]\n' "payload 1 MiB / floor" "$(r payload payload_mb_s floor_payload_mb_s)"
printf '%-34s %6.2f   [>= 3]\n' "json parse / nlohmann" "$(r json json_parse_mb_s nlohmann_parse_mb_s)"
printf '%-34s %6.2f   [>= 0.5]\n' "json parse / RapidJSON" "$(r json json_parse_mb_s rapidjson_parse_mb_s)"
printf '%-34s %6.2f   [>= 3]\n' "json dump / nlohmann" "$(r json json_dump_mb_s nlohmann_dump_mb_s)"
printf '%-34s %6.2f   [>= 0.5]\n' "json dump / RapidJSON" "$(r json json_dump_mb_s rapidjson_dump_mb_s)"
printf '%-34s %6.0f   [<= 1024]\n' "pending checkout, bytes" "$(m memory pending_checkout_bytes)"
printf '%-34s %6.2f   [>= 0.5]\n' "scale W=500 / W=4 (same run)" "$(r scale checkouts_per_s w4_checkouts_per_s)"
printf '%-34s %6.2f\n' "  W=500 / checkouts W=4 run" "$(rr scale checkouts_per_s checkouts checkouts_per_s)"
printf '%-34s %6.2f\n' "  the floor's own W=500 / W=4" "$(r scale floor_checkouts_per_s floor_w4_checkouts_per_s)"
printf '%-34s %6.2f\n' "  floor W=500: epoll / poll" "$(r scale floor_epoll_checkouts_per_s floor_checkouts_per_s)"
