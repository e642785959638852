#!/usr/bin/env bash
# The whole quality benchmark behind results/summary.json, in the order it runs. Every step skips
# what is finished and resumes what was interrupted, so stop and rerun it at will (hours on 2 cores).
#   GOLD_RAY_DATA=../shared/data bash benchmarks/quality/plan.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUN="$PY benchmarks/quality/run.py --samples 1000"
TASKS="sst2 ag_news rte cola math_ops"   # math_ops: written from scratch in tasks/, as a newcomer would
# Sets larger than 1,000 examples are evaluated on the same seeded 1,000, the teacher row too.
# shellcheck source=benchmarks/quality/common.sh
source benchmarks/quality/common.sh
for t in $TASKS; do
    $PY benchmarks/quality/run.py --task "$t" --strategies '' --teacher-fewshot $(limit "$t")
done
# Seed-major, so that every finished seed adds a paired difference on every task.
gold_zerogen() {
    for t in $TASKS; do
        $RUN --task "$t" --strategies gold,zerogen --seeds "$1" $(limit "$t")
    done
}
# The energy band against a random band of the same size, on two tasks: random_band SEED TASKS
# [run.py arguments].
BAND_TASKS="sst2 ag_news"
random_band() {
    for t in $2; do
        $RUN --task "$t" --strategies gold --seeds "$1" --tag randband --set strategy.score=random $(limit "$t") "${@:3}"
    done
}
gold_zerogen 0; gold_zerogen 1
random_band 0 "$BAND_TASKS"
# Seed 2 runs GOLD on each of the random band's tasks, then at once that task's random band started
# from GOLD's first teacher pass (--fork): the pair then differs in the band alone, wherever each
# ran. Seeds 0 and 1 predate forks (their GOLD runs' folders are gone): their random bands share no
# teacher pass with GOLD and ran on other machines than GOLD did, so seed 1's comes last.
for t in $BAND_TASKS; do
    $RUN --task "$t" --strategies gold --seeds 2 $(limit "$t")
    random_band 2 "$t" --fork
done
gold_zerogen 2
random_band 1 "$BAND_TASKS"
