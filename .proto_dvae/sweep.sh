#!/bin/bash
export PYTHONPATH=$PWD OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
run() { name=$1; shift; python .proto_dvae/train.py --name $name "$@" > $OUT/$name.log 2>&1 & }
run r1 --beta 0.1 --beta_start 0.1
run r2 --beta 0.3 --beta_start 0.3
run r3 --beta 1.0 --beta_start 0.0 --beta_steps 0.3
run r4 --beta 0.1 --beta_start 0.1 --lr 3e-3
run r5 --size 64 --gc 3 --nh 16 --beta 0.3 --beta_start 0.3
run r6 --V 256 --beta 0.1 --beta_start 0.1
run r7 --beta 0.1 --beta_start 0.1 --t_steps 0.3
run r8 --beta 0.1 --beta_start 0.1 --emb 1.0
wait
grep -h RESULT $OUT/*.log
