#!/usr/bin/env bash
# Does sharing one demo set among 8 prompts (teacher.prompts_per_demo_set=8, the teacher's shared
# prefix, the default since this check) cost accuracy? GOLD and ZeroGen, each run at 8 (tagged
# "demoset8") beside a control with a demo set per prompt (1, the default before; tagged "main", as
# it was run), so a pair differs in the demo sets alone. Both settings are passed explicitly, so the
# script checks the same thing whatever the default is. SST-2 (seeds 0 to 2) decided the default;
# TASKS, SEEDS and STRATEGIES run the check on other tasks. Each step skips what is finished and resumes what
# was interrupted, as plan.sh does:
#   GOLD_RAY_DATA=../shared/data bash benchmarks/quality/demo_sets.sh
#   GOLD_RAY_DATA=../shared/data TASKS=math_ops SEEDS=0 STRATEGIES=zerogen bash benchmarks/quality/demo_sets.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/quality}
TASKS=${TASKS:-sst2}
SEEDS=${SEEDS:-0 1 2}
STRATEGIES=${STRATEGIES:-zerogen gold}
# shellcheck source=benchmarks/quality/common.sh
source benchmarks/quality/common.sh
run() {  # run TASK SEED STRATEGY [run.py arguments]
    # shellcheck disable=SC2046  # limit's words are meant to split
    $PY benchmarks/quality/run.py --samples 1000 --runs-dir "$RUNS" --task "$1" --seeds "$2" \
        --strategies "$3" $(limit "$1") "${@:4}"
}
for task in $TASKS; do
    for seed in $SEEDS; do
        # pair by pair, so that a session cut short leaves whole pairs
        for strategy in $STRATEGIES; do
            run "$task" "$seed" "$strategy" --tag demoset8 --set teacher.prompts_per_demo_set=8
            run "$task" "$seed" "$strategy" --tag main --set teacher.prompts_per_demo_set=1
        done
    done
done
