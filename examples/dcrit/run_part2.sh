#!/bin/sh
# D_crit experiment, part 2 (docs/dcrit_experiment.md): both seeds as two low-priority processes
# (one torch thread each), each ascending in D. Resumable: run it again and only the missing
# runs are trained. From the repository root:
#   sh examples/dcrit/run_part2.sh      # in the background; logs in examples/dcrit/sweep_part2*.log
#   .venv/bin/python examples/dcrit/analyze.py --part 2 > examples/dcrit/analysis_part2.txt
set -e
SWEEP=".venv/bin/lightning-fpq sweep"
nohup nice -n 10 $SWEEP examples/dcrit/sweep_part2.yaml >> examples/dcrit/sweep_part2.log 2>&1 &
nohup nice -n 10 $SWEEP examples/dcrit/sweep_part2_seed1.yaml >> examples/dcrit/sweep_part2_seed1.log 2>&1 &
