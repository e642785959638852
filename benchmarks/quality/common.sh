# Sourced by the quality scripts (plan.sh, variants.sh, demo_sets.sh), so that runs they pair
# are scored on the same examples.
# limit TASK: the run.py arguments that score TASK on a seeded 1,000 of its evaluation examples
# (AG News and CoLA; the other tasks' sets are scored whole).
limit() { case $1 in ag_news|cola) echo "--set task.eval_limit=1000" ;; esac; }
