#!/bin/bash
# usage: run.sh NAME args...
name=$1; shift
rm -rf /tmp/exp/$name
start=$(date +%s)
OMP_NUM_THREADS=1 /work/wt-regime/.venv/bin/python ${SCRIPT:-docs/learning_regime_scripts/pretrain_probe.py} --no_progress --num_workers 0 --output_dir /tmp/exp/$name "$@" > /tmp/exp/$name.log 2>&1
echo "wall $(( $(date +%s) - start )) s" >> /tmp/exp/$name.log
