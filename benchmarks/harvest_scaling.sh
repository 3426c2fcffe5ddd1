#!/usr/bin/env bash
# Wall time, peak RSS and output size of `spdkit harvest` as the tokens read grow (issue 30:
# peak memory should not grow with N; output ≤ ~50 MB per 10k live subcomponents).
#   bash benchmarks/harvest_scaling.sh RUN_DIR [N ...]     (default N: 100000 300000 1000000)
# Each N runs in a copy of RUN_DIR's harvest-relevant files (the run is read, not written), so
# the run's own harvest/ is left as it was. Prints one markdown row per N.
set -euo pipefail
RUN=$1
shift
NS=("$@")
[ $# -eq 0 ] && NS=(100000 300000 1000000)
SPDKIT=$(pwd)/.venv/bin/spdkit
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "| tokens | wall | peak RSS MiB | harvested subcomponents | harvest/ MB |"
echo "|---|---|---|---|---|"
for n in "${NS[@]}"; do
  copy=$WORK/run_$n
  mkdir -p "$copy"
  for f in "$RUN"/*; do  # everything but an earlier harvest and report, linked not copied
    case $(basename "$f") in harvest | report) ;; *) ln -s "$(realpath "$f")" "$copy/" ;; esac
  done
  /usr/bin/time -v -o "$WORK/time_$n" "$SPDKIT" harvest "$copy" --tokens "$n" --quiet \
    > "$WORK/log_$n" 2>&1
  wall=$(grep "Elapsed" "$WORK/time_$n" | awk '{print $NF}')
  rss=$(grep "Maximum resident" "$WORK/time_$n" | awk '{print int($NF / 1024)}')
  fired=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['n_fired'])" \
    "$copy/harvest/meta.json")
  size=$(du -sk "$copy/harvest" | awk '{printf "%.1f", $1 / 1024}')
  echo "| $n | $wall | $rss | $fired | $size |"
done
