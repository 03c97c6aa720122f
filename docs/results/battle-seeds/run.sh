#!/bin/bash
# Cross-play over training seeds: the battle-40k settings (40,000 env steps of self-play, 12 v 12 battle, map 20,
# 100-step episodes; MF-Q and IL start at temperature 0.1), each algorithm trained with seeds 1, 2 and 3, one run at
# a time. Then one tournament pools each algorithm's three runs (`NAME=DIR1,DIR2,DIR3`: every model of A meets
# every model of B) with random and scripted soldiers, 4 greedy episodes per model pairing and env seed.
# MF-AC and AC use the all-actions actor gradient with replayed critic and actor steps, entropy weight 0.2 (the
# README's "MF-AC and AC" paragraph says why).
# Usage: bash docs/results/battle-seeds/run.sh            (everything; ALGOS, SEEDS and STEP=train|battle narrow it)
set -e
PY=${PY:-python}
R=${R:-runs/battle-seeds}
ALGOS=${ALGOS:-"mfq il mfac ac"}
SEEDS=${SEEDS:-"1 2 3"}
STEP=${STEP:-all}
mkdir -p $R
ENV="magent2/battle_v4?map_size=20&max_cycles=100&opponent=self&self_refresh=20"
Q="conv_channels=[16] embed=64 lr=0.001 tau=0.05 batch_size=128 temp_start=0.1 temp_anneal_steps=20000 temp_finish=0.05 learning_starts=500 agent_steps_per_update=32"
A="conv_channels=[16] embed=64 lr=0.001 ent_coef=0.2 actor_grad=all_actions actor_replay=true critic_replay=50000 critic_updates=48 critic_batch=128"
if [ $STEP != battle ]; then
  for algo in $ALGOS; do
    if [ $algo = mfq ] || [ $algo = il ]; then O=$Q; else O=$A; fi
    for seed in $SEEDS; do
      /usr/bin/time -f "$algo seed $seed %e s wall %U s user" nice -n 10 $PY -m pamarl.cli train --algo $algo --env "$ENV" steps=40000 num_envs=4 rollout_len=25 eval_every=0 eval_episodes=1 tensorboard=false progress=false torch_threads=1 seed=$seed run_dir=$R/$algo-s$seed $O > $R/$algo-s$seed.log 2>&1
      tail -1 $R/$algo-s$seed.log
    done
  done
fi
if [ $STEP != train ]; then
  E=""
  for algo in mfq mfac il ac; do E="$E $algo=$R/$algo-s1,$R/$algo-s2,$R/$algo-s3"; done
  /usr/bin/time -f "battle %e s wall %U s user" nice -n 10 $PY -m pamarl.cli battle $E random script --env "magent2/battle_v4?map_size=20&max_cycles=100" --episodes 4 --seeds 1 --out docs/results/battle-seeds > $R/battle.log 2>&1
  tail -1 $R/battle.log
fi
