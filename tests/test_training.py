"""End-to-end training: determinism, exact resume, learning on small tasks (fixed seeds)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import quick_run, update_crashes_at

from pamarl.algos.registry import get_algorithm
from pamarl.envs.registry import make_env
from pamarl.runner import train


def random_team_return(env_id: str, episodes: int = 40, seed: int = 123) -> float:
    """Mean team return of uniformly random (legal) actions, measured, never assumed."""
    env = make_env(env_id, num_envs=8, seed=seed)
    obs = env.reset(seed=seed)
    g = torch.Generator().manual_seed(seed)
    rets: list[float] = []
    while len(rets) < episodes:
        if env.spec.discrete:
            probs = obs.action_mask.float()
            a = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g).reshape(probs.shape[:2])
        else:
            a = torch.rand(env.num_envs, env.spec.n_agents, env.spec.act_dim, generator=g)
            low, high = (torch.as_tensor(x) for x in env.spec.padded_bounds())
            a = low + a * (high - low)
        st = env.step(a)
        rets.extend(e.team_return for e in st.episodes)
        obs = st.next
    env.close()
    return float(np.mean(rets[:episodes]))


def _rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)]


def test_same_seed_same_metrics(tmp_path):
    kw = dict(algo="mappo", steps=1600, num_envs=4, rollout_len=100, eval_every=2, eval_episodes=4)
    train(quick_run(tmp_path, "a", **kw))
    train(quick_run(tmp_path, "b", **kw))
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    assert len(_rows(tmp_path / "a")) == 4


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    kw = dict(algo="progressive", steps=2400, num_envs=4, rollout_len=100, checkpoint_every=2, eval_every=3,
              eval_episodes=4, env_workers=0)
    full = train(quick_run(tmp_path, "full", **kw))
    assert (full.run_dir / "checkpoints" / "final.pt").exists()

    cls = get_algorithm("progressive")

    cut = quick_run(tmp_path, "cut", **kw)
    # The run dies after the checkpoint at iteration 2, mid-way to the next one.
    with update_crashes_at(monkeypatch, cls, 4), pytest.raises(KeyboardInterrupt):
        train(cut)
    assert len(_rows(tmp_path / "cut")) == 3  # iteration 3 was logged but is past the checkpoint
    train(cut, resume=True)
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "full")
    # Per-episode evaluation log: the evaluation at iteration 3 of the interrupted attempt is dropped.
    episodes = (tmp_path / "cut" / "eval_episodes.jsonl").read_text()
    assert episodes == (tmp_path / "full" / "eval_episodes.jsonl").read_text()
    assert [json.loads(ln)["iteration"] for ln in episodes.splitlines()] == [3, 6]
    assert all(len(json.loads(ln)["returns"]) == 4 for ln in episodes.splitlines())


def test_mappo_beats_random_on_simple_spread(tmp_path):
    rand = random_team_return("mpe/simple_spread_v3")
    res = train(quick_run(tmp_path, algo="mappo", steps=48_000, seed=1, eval_every=0, eval_episodes=20))
    assert res.final_eval["eval/return_mean"] > rand + 10, (res.final_eval, rand)
    assert res.last_return > rand + 8


def test_mappo_solves_penalty_game(tmp_path):
    from pamarl.algos.mappo import MAPPO

    cfg = MAPPO.Config(entropy_coef=0.05)
    res = train(quick_run(tmp_path, algo="mappo", env="matrix/penalty?k=-10", steps=8192, num_envs=16,
                          rollout_len=16, eval_episodes=16), cfg)
    # team return = 2 agents x payoff 10 / scale 10: both agents agree on one of the optima
    assert res.final_eval["eval/return_mean"] == pytest.approx(2.0)


def test_bad_action_kind_is_refused():
    from pamarl.errors import UsageError

    spec = make_env("mpe/simple_spread_v3").spec
    cls = get_algorithm("mappo")
    cls.check_env(spec)  # both kinds are fine for MAPPO

    class ContinuousOnly(cls):  # type: ignore[misc, valid-type]
        action_kinds = ("continuous",)

    with pytest.raises(UsageError, match="continuous=true"):
        ContinuousOnly.check_env(spec)
