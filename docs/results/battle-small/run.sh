#!/bin/bash
# Small cross-play: 4 algorithms, self-play on a 12 v 12 battle (map 20, 100 steps), then a tournament.

PY=python
mkdir -p runs/battle-small
ENV="magent2/battle_v4?map_size=20&max_cycles=100&opponent=self&self_refresh=20"
Q="conv_channels=[16] embed=64 lr=0.001 tau=0.05 batch_size=128 temp_anneal_steps=4000 temp_finish=0.05 learning_starts=500 agent_steps_per_update=32"
A="conv_channels=[16] embed=64 lr=0.001"
for algo in mfq il mfac ac; do
  if [ $algo = mfq ] || [ $algo = il ]; then O=$Q; else O=$A; fi
  /usr/bin/time -f "$algo %e s" $PY -m pamarl.cli train --algo $algo --env "$ENV" steps=8000 num_envs=4 rollout_len=25 eval_every=0 eval_episodes=1 tensorboard=false progress=false seed=1 run_dir=runs/battle-small/$algo $O > runs/battle-small/$algo.log 2>&1
done
$PY -m pamarl.cli battle mfq=runs/battle-small/mfq mfac=runs/battle-small/mfac il=runs/battle-small/il ac=runs/battle-small/ac random --env "magent2/battle_v4?map_size=20&max_cycles=100" --episodes 8 --seeds 1 --out docs/results/battle-small > runs/battle-small/battle.log 2>&1
