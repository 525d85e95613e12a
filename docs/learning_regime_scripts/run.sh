#!/bin/bash
# usage: run.sh NAME args...
name=$1; shift
rm -rf ${OUT:-/tmp/exp}/$name
start=$(date +%s)
OMP_NUM_THREADS=1 .venv/bin/python ${SCRIPT:-docs/learning_regime_scripts/pretrain_probe.py} --no_progress --num_workers 0 --output_dir ${OUT:-/tmp/exp}/$name "$@" > ${OUT:-/tmp/exp}/$name.log 2>&1
echo "wall $(( $(date +%s) - start )) s" >> ${OUT:-/tmp/exp}/$name.log
