"""Continuous-action training on Multi-Agent MuJoCo: HAPPO learns; progressive's cost machinery acts on safe tasks."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import quick_run

from pamarl.runner import train

pytest.importorskip("mujoco", reason="needs the mujoco extra: pip install 'pamarl[mujoco]'")
pytest.importorskip("gymnasium_robotics", reason="needs the mujoco extra: pip install 'pamarl[mujoco]'")


def _col(run_dir, key):
    with open(run_dir / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


@pytest.mark.slow
def test_happo_return_rises_on_halfcheetah_2x3(tmp_path):
    res = train(quick_run(tmp_path, algo="happo", env="mamujoco/HalfCheetah-2x3?episode_limit=200", steps=40_000,
                          num_envs=4, rollout_len=200, eval_episodes=4, seed=1))
    rets = _col(res.run_dir, "train/return_mean")
    assert np.mean(rets[-10:]) > np.mean(rets[:5]) + 60, rets
    assert res.final_eval["eval/return_mean"] > np.mean(rets[:5]) + 100


def test_progressive_uses_cost_critics_and_lambda_on_safe_task(tmp_path):
    res = train(quick_run(tmp_path, algo="progressive", env="safe-mamujoco/HalfCheetah-2x3?episode_limit=100",
                          steps=4_000, num_envs=2, rollout_len=200, eval_episodes=2, cost_limit=0.0))
    lam = _col(res.run_dir, "cost/lambda")
    cost = _col(res.run_dir, "cost/episode_mean")
    with open(res.run_dir / "metrics.csv") as f:
        header = f.readline()
    assert len(cost) == len(lam) and "loss/cost_0" in header
    # with a zero limit any speeding raises lambda; it never goes negative
    assert all(v >= 0 for v in lam)
    assert (lam[-1] > 0) == (sum(cost) > 0)
    assert "eval/constraint_sat" in res.final_eval
