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
    """HAPPO's training return rises by 60 within 40k env steps and its greedy policy beats the first
    iterations by 100, on average over three seeds.

    Why three: HalfCheetah amplifies float-level differences (a fused optimiser kernel, a batched instead of
    per-step critic pass), so one seed's outcome moves a lot with them. Measured over seeds 1-7, before and
    after such a change: rise 44-173 (mean 107) and 46-160 (mean 111), each with one to three seeds below 60;
    the mean over seeds 1-3 was 92 and 124.
    """
    gains, evals = [], []
    for seed in (1, 2, 3):
        res = train(quick_run(tmp_path, name=f"s{seed}", algo="happo", env="mamujoco/HalfCheetah-2x3?episode_limit=200",
                              steps=40_000, num_envs=4, rollout_len=200, eval_episodes=4, seed=seed))
        rets = _col(res.run_dir, "train/return_mean")
        gains.append(np.mean(rets[-10:]) - np.mean(rets[:5]))
        evals.append(res.final_eval["eval/return_mean"] - np.mean(rets[:5]))
    assert np.mean(gains) > 60, gains
    assert np.mean(evals) > 100, evals


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
