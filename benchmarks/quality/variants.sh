#!/usr/bin/env bash
# One-pair experiments beside the benchmark: GOLD variants forked from the first teacher pass of the
# benchmark's seed-2 GOLD runs (run.py --fork), so that a variant and its control ("main": the same
# fork with the defaults) share iteration 0 and differ from then on in the variant alone. Each step
# skips what is finished and resumes what was interrupted, as plan.sh does; run it after plan.sh,
# on the same runs folder:
#   GOLD_RAY_DATA=../shared/data bash benchmarks/quality/variants.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/quality}
# shellcheck source=benchmarks/quality/common.sh
source benchmarks/quality/common.sh
fork() {  # fork TASK TAG [run.py arguments]
    $PY benchmarks/quality/run.py --samples 1000 --runs-dir "$RUNS" --task "$1" --strategies gold --seeds 2 \
        --fork --tag "$2" $(limit "$1") "${@:3}"
}
fork cola main
# The band over the probes no longer than 0.9 of iteration 0's lengths (GOLD's feedback drifts long).
fork cola lenq90 --set strategy.band_length_quantile=0.9
# No band added while the student is near chance: on the seed-2 tasks where it was (CoLA at
# iterations 1 to 3, math_ops at 1, RTE at 3 and 4).
fork cola hold --set strategy.hold_band_near_chance=true
fork math_ops main
fork math_ops hold --set strategy.hold_band_near_chance=true
fork sst2 main
fork sst2 lenq90 --set strategy.band_length_quantile=0.9
fork rte main
fork rte hold --set strategy.hold_band_near_chance=true
