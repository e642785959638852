#!/usr/bin/env bash
# Does sharing one demo set among 8 prompts (teacher.prompts_per_demo_set=8, the teacher's shared
# prefix, the default since this check) cost accuracy? SST-2, GOLD and ZeroGen, seeds 0 to 2, each
# beside a control with a demo set per prompt (1, the default before; tagged "main", as it was run),
# so a pair differs in the demo sets alone. The demo-set runs come first (seed-major),
# so that all six can be read against the benchmark's own runs (same seeds, earlier training code)
# before their controls finish; the controls follow. Each step skips what is finished and resumes
# what was interrupted, as plan.sh does:
#   GOLD_RAY_DATA=../shared/data bash benchmarks/quality/demo_sets.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/quality}
run() {  # run SEED STRATEGY [run.py arguments]
    $PY benchmarks/quality/run.py --samples 1000 --runs-dir "$RUNS" --task sst2 --seeds "$1" --strategies "$2" "${@:3}"
}
for seed in 0 1 2; do
    for strategy in zerogen gold; do run "$seed" "$strategy" --tag demoset8 --set teacher.prompts_per_demo_set=8; done
done
for seed in 0 1 2; do
    for strategy in zerogen gold; do run "$seed" "$strategy" --tag main --set teacher.prompts_per_demo_set=1; done
done
