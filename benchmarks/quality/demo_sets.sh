#!/usr/bin/env bash
# Does sharing one demo set among 8 prompts (teacher.prompts_per_demo_set=8, the teacher's shared
# prefix) cost accuracy? SST-2, GOLD and ZeroGen, seeds 0 to 2, each run beside its control at
# today's defaults ("main"), so the pair differs in the demo sets alone. Seed-major, so every finished
# seed adds a pair per strategy. Each step skips what is finished and resumes what was interrupted,
# as plan.sh does:
#   GOLD_RAY_DATA=../shared/data bash benchmarks/quality/demo_sets.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/quality}
for seed in 0 1 2; do
    for strategy in zerogen gold; do
        run() { $PY benchmarks/quality/run.py --samples 1000 --runs-dir "$RUNS" --task sst2 \
            --strategies "$strategy" --seeds "$seed" "$@"; }
        run --tag main
        run --tag demoset8 --set teacher.prompts_per_demo_set=8
    done
done
