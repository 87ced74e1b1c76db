#!/bin/sh
# Issue 13, part 1: every run of docs/dcrit_experiment.md, in its priority order, as two
# low-priority processes (one torch thread each). Resumable: run it again and only the
# missing runs are trained. From the repository root:
#   sh examples/dcrit/run.sh            # both processes, in the background; logs in examples/dcrit/*.log
#   .venv/bin/python examples/dcrit/analyze.py > examples/dcrit/analysis.txt
set -e
SWEEP=".venv/bin/lightning-fpq sweep"
# process A: seed 0, weight decay 0.1, all three arms at every D (ascending D)
nohup nice -n 10 $SWEEP examples/dcrit/sweep.yaml >> examples/dcrit/sweep.log 2>&1 &
# process B: seed 1 at 4.2M and 8.4M, then the weight-decay-0 arm, then seed 1 at 16.8M
nohup sh -c "nice -n 10 $SWEEP examples/dcrit/sweep_seed1.yaml 'grid=[{tokens: [4194304]}, {tokens: [8388608]}]';
             nice -n 10 $SWEEP examples/dcrit/sweep_wd0.yaml;
             nice -n 10 $SWEEP examples/dcrit/sweep_seed1.yaml" >> examples/dcrit/sweep_b.log 2>&1 &
