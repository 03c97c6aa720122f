#!/bin/bash
# Cross-play after 40,000 env steps of self-play per algorithm (5x the battle-small budget), 12 v 12 battle
# (map 20, 100-step episodes), seed 1; MF-Q and IL start at temperature 0.1 (see the README: at T=1 the
# Boltzmann policy is uniform on this task's Q scale). Then every ordered pair plays 8 greedy episodes.
set -e
PY=${PY:-python}
R=${R:-runs/battle-40k}
mkdir -p $R
ENV="magent2/battle_v4?map_size=20&max_cycles=100&opponent=self&self_refresh=20"
Q="conv_channels=[16] embed=64 lr=0.001 tau=0.05 batch_size=128 temp_start=0.1 temp_anneal_steps=20000 temp_finish=0.05 learning_starts=500 agent_steps_per_update=32"
A="conv_channels=[16] embed=64 lr=0.001"
for algo in mfq il mfac ac; do
  if [ $algo = mfq ] || [ $algo = il ]; then O=$Q; else O=$A; fi
  /usr/bin/time -f "$algo %e s" $PY -m pamarl.cli train --algo $algo --env "$ENV" steps=40000 num_envs=4 rollout_len=25 eval_every=0 eval_episodes=1 tensorboard=false progress=false torch_threads=1 seed=1 run_dir=$R/$algo $O > $R/$algo.log 2>&1
done
/usr/bin/time -f "battle %e s" $PY -m pamarl.cli battle mfq=$R/mfq mfac=$R/mfac il=$R/il ac=$R/ac random --env "magent2/battle_v4?map_size=20&max_cycles=100" --episodes 8 --seeds 1 --out docs/results/battle-40k > $R/battle.log 2>&1
