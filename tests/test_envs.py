"""Env adapters: conformance of the wrapped PettingZoo envs, the MPE fast path, shapes, masks, matrix games."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces
from pettingzoo import ParallelEnv
from pettingzoo.test import parallel_api_test

from pamarl.envs.generic import from_parallel_env
from pamarl.envs.matrix import homogeneity_trap_payoff
from pamarl.envs.mpe import make_mpe
from pamarl.envs.registry import make_env
from pamarl.errors import UsageError
from pamarl.runner import build_configs


@pytest.mark.parametrize("task", ["simple_spread_v3", "simple_speaker_listener_v4", "simple_tag_v3",
                                  "simple_reference_v3"])
def test_wrapped_mpe_envs_pass_pettingzoo_parallel_api_test(task):
    adapter = make_mpe(task, seed=0)
    parallel_api_test(adapter.env, num_cycles=30)


@pytest.mark.parametrize("task,continuous", [("simple_spread_v3", False), ("simple_spread_v3", True),
                                             ("simple_speaker_listener_v4", False), ("simple_tag_v3", False)])
def test_mpe_fast_path_matches_parallel_api(task, continuous):
    fast = make_mpe(task, continuous=continuous, fast=True)
    slow = make_mpe(task, continuous=continuous, fast=False)
    rng = np.random.default_rng(0)
    a, b = fast.reset(seed=3), slow.reset(seed=3)
    np.testing.assert_array_equal(a.obs, b.obs)
    np.testing.assert_allclose(a.state, b.state)
    for t in range(60):
        if fast.spec.discrete:
            act = np.array([rng.integers(d) for d in fast.spec.action_dims])
        else:
            act = rng.uniform(0, 1, (fast.spec.n_agents, fast.spec.act_dim)).astype(np.float32)
        x, y = fast.step(act), slow.step(act)
        np.testing.assert_array_equal(x.obs, y.obs)
        np.testing.assert_allclose(x.state, y.state)
        np.testing.assert_array_equal(x.reward, y.reward)
        assert (x.terminated, x.truncated) == (y.terminated, y.truncated)
        if x.truncated:
            assert t % 25 == 24
            fast.reset(seed=t), slow.reset(seed=t)


def test_heterogeneous_speaker_listener_is_padded_and_masked():
    env = make_env("mpe/simple_speaker_listener_v4", num_envs=2, seed=0)
    spec = env.spec
    assert spec.obs_dims == (3, 11) and spec.action_dims == (3, 5)
    o = env.reset(seed=0)
    assert o.obs.shape == (2, 2, 11)
    assert torch.all(o.obs[:, 0, 3:] == 0)  # speaker padded with zeros
    assert o.action_mask[:, 0].tolist() == [[True, True, True, False, False]] * 2
    assert o.action_mask[:, 1].all()
    env.close()


def test_episode_bookkeeping_truncation_and_team_return():
    env = make_env("mpe/simple_spread_v3", num_envs=3, seed=0)
    env.reset(seed=0)
    total = torch.zeros(3)
    for _t in range(25):
        st = env.step(torch.zeros(3, 3, dtype=torch.long))
        total += st.reward.sum(-1)
    assert st.truncated.all() and not st.terminated.any()
    assert len(st.episodes) == 3 and all(e.length == 25 and e.truncated for e in st.episodes)
    assert [e.team_return for e in st.episodes] == pytest.approx(total.tolist(), rel=1e-5)
    assert not torch.equal(st.final.obs, st.next.obs)  # next is already the new episode
    env.close()


def _same_step(sa: Any, sb: Any) -> None:
    for part in ("next", "final"):
        for k in ("obs", "state", "action_mask", "active", "first"):
            assert torch.equal(getattr(getattr(sa, part), k), getattr(getattr(sb, part), k)), (part, k)
    for k in ("reward", "terminated", "truncated"):
        assert torch.equal(getattr(sa, k), getattr(sb, k)), k
    assert [dataclasses.astuple(e) for e in sa.episodes] == [dataclasses.astuple(e) for e in sb.episodes]


@pytest.mark.parametrize(("workers", "inline", "continuous"), [(2, False, False), (1, True, False), (2, True, True)])
def test_subprocess_envs_match_in_process(workers: int, inline: bool, continuous: bool) -> None:
    """Worker processes (and this process stepping a share with env_inline) give the in-process numbers:
    every field of every step, episode statistics in copy order, through automatic resets."""
    env_id = f"mpe/simple_spread_v3?continuous={str(continuous).lower()}&max_cycles=10"
    a = make_env(env_id, num_envs=5, seed=1)
    b = make_env(env_id, num_envs=5, seed=1, workers=workers, inline=inline)
    oa, ob = a.reset(seed=5), b.reset(seed=5)
    assert torch.equal(oa.obs, ob.obs) and torch.equal(oa.first, ob.first)
    g = torch.Generator().manual_seed(0)
    ended = 0
    for _ in range(25):
        act = torch.rand(5, 3, 5, generator=g) if continuous else torch.randint(0, 5, (5, 3), generator=g)
        sa, sb = a.step(act), b.step(act)
        _same_step(sa, sb)
        ended += len(sa.episodes)
    assert ended == 10  # two episode ends per copy went through the comparison
    assert a.render(3) is None or np.array_equal(a.render(3), b.render(3))
    a.close()
    b.close()


def test_step_results_do_not_alias_the_shared_table() -> None:
    """The tensors a step returns stay as they were when the env steps again (they are copies)."""
    env = make_env("mpe/simple_spread_v3", num_envs=2, seed=0, workers=1, inline=True)
    env.reset(seed=0)
    first = env.step(torch.ones(2, 3, dtype=torch.long))
    kept = first.next.obs.clone()
    env.step(torch.full((2, 3), 2, dtype=torch.long))
    assert torch.equal(first.next.obs, kept)
    env.close()


def test_env_inline_needs_local_workers() -> None:
    with pytest.raises(UsageError, match="env_inline=true"):
        build_configs({"env_inline": True})
    with pytest.raises(UsageError, match="env_inline=true"):
        build_configs({"env_inline": True, "env_workers": 1, "env_backend": "ray"})
    with pytest.raises(UsageError, match="set env_inline=false"):
        make_env("matrix/penalty", num_envs=2, workers=1, inline=True)


class _MaskedDeathEnv(ParallelEnv):
    """Two agents; agent_1 leaves after 2 steps; Dict observations with action masks; 4-step limit."""

    metadata = {"name": "masked_death_v0"}

    def __init__(self):
        self.possible_agents = ["agent_0", "agent_1"]
        self._obs = spaces.Dict({"observation": spaces.Box(-1, 1, (2,)), "action_mask": spaces.MultiBinary(3)})
        self._act = spaces.Discrete(3)

    def observation_space(self, agent):
        return self._obs

    def action_space(self, agent):
        return self._act

    def _o(self, a):
        mask = np.array([1, 0, 1], np.int8) if a == "agent_0" else np.array([0, 1, 0], np.int8)
        return {"observation": np.full(2, self.t / 10, np.float32), "action_mask": mask}

    def reset(self, seed=None, options=None):
        self.agents, self.t = list(self.possible_agents), 0
        return {a: self._o(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        rew = {a: 1.0 for a in self.agents}
        term = {a: a == "agent_1" and self.t >= 2 for a in self.agents}
        trunc = {a: self.t >= 4 for a in self.agents}
        obs = {a: self._o(a) for a in self.agents}
        self.agents = [a for a in self.agents if not (term[a] or trunc[a])]
        return obs, rew, term, trunc, {a: {} for a in obs}


def test_generic_adapter_masks_agents_leaving_and_truncation():
    parallel_api_test(_MaskedDeathEnv(), num_cycles=10)
    env = from_parallel_env(_MaskedDeathEnv, num_envs=1)
    o = env.reset(seed=0)
    assert o.action_mask[0].tolist() == [[True, False, True], [False, True, False]]
    actives, rewards = [], []
    for _ in range(4):
        st = env.step(torch.tensor([[0, 1]]))
        actives.append(st.final.active[0].tolist())
        rewards.append(st.reward[0].tolist())
    assert actives[1] == [True, False] and actives[2] == [True, False]
    assert rewards[2] == [1.0, 0.0]  # a departed agent earns nothing
    assert st.truncated.tolist() == [True] and st.episodes[0].team_return == 6.0
    env.close()


def test_matrix_games_payoffs_and_homogeneity_trap():
    p = homogeneity_trap_payoff(4)
    assert p.sum() == 2 and p[0, 0, 1, 1] == 1 and p[1, 1, 0, 0] == 1 and p[0, 1, 0, 1] == 0
    env = make_env("matrix/homogeneity_trap?n=4", num_envs=3)
    env.reset()
    st = env.step(torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]))
    assert st.reward[:, 0].tolist() == [1.0, 1.0, 0.0] and st.terminated.all()
    assert [e.team_return for e in st.episodes] == [4.0, 4.0, 0.0]  # summed over the 4 agents
    climb = make_env("matrix/climbing", num_envs=1)
    climb.reset()
    assert climb.step(torch.tensor([[0, 0]])).reward[0, 0].item() == pytest.approx(11 / 30)
    with pytest.raises(UsageError, match="even"):
        make_env("matrix/homogeneity_trap?n=3")


@pytest.mark.parametrize("bad,match", [("mpe/simple_sprad_v3", "simple_spread_v3"), ("mpee/simple_spread_v3", "mpe"),
                                       ("simple_spread_v3", "family"), ("mpe/simple_spread_v3?bogus=1", "bogus")])
def test_unknown_env_ids_name_the_nearest(bad, match):
    with pytest.raises(UsageError, match=match):
        make_env(bad)


def test_generic_pettingzoo_id():
    env = make_env("pettingzoo/mpe2.simple_spread_v3:parallel_env?N=2", num_envs=2)
    assert env.spec.n_agents == 2 and env.reset(seed=0).obs.shape == (2, 2, 12)
    env.close()
