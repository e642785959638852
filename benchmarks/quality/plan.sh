#!/usr/bin/env bash
# The whole quality benchmark behind results/summary.json, in the order it runs. Every step skips
# what is finished and resumes what was interrupted, so stop and rerun it at will (hours on 2 cores).
#   GOLD_RAY_DATA=../shared/data bash benchmarks/quality/plan.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUN="$PY benchmarks/quality/run.py --samples 1000"
TASKS="sst2 ag_news rte cola math_ops"   # math_ops: written from scratch in tasks/, as a newcomer would
SEEDS="0 1 2"
# Sets larger than 1,000 examples are evaluated on the same seeded 1,000, the teacher row too.
limit() { case $1 in ag_news|cola) echo "--set task.eval_limit=1000" ;; esac; }
for t in $TASKS; do
    $PY benchmarks/quality/run.py --task "$t" --strategies '' --teacher-fewshot $(limit "$t")
done
# Seed-major, so that every finished seed adds a paired difference on every task.
for s in $SEEDS; do
    for t in $TASKS; do
        $RUN --task "$t" --strategies gold,zerogen --seeds "$s" $(limit "$t")
    done
done
# The energy band against a random band of the same size, on two tasks.
for s in $SEEDS; do
    for t in sst2 ag_news; do
        $RUN --task "$t" --strategies gold --seeds "$s" --tag randband --set strategy.score=random $(limit "$t")
    done
done
