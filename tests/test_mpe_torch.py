"""The batched torch MPE (``mpe-torch/``): step-for-step agreement with mpe2, spec parity with ``mpe/``, and
the bookkeeping every algorithm relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pamarl.envs.mpe import make_mpe
from pamarl.envs.registry import make_env
from pamarl.errors import UsageError

TASKS = ["simple_v3", "simple_spread_v3", "simple_reference_v3", "simple_speaker_listener_v4", "simple_tag_v3"]


def _world_state(refs: list) -> dict[str, np.ndarray]:
    """The mpe2 world of each reference copy, as the arrays ``MPETorch.set_world`` takes."""
    out: dict[str, list] = {"apos": [], "lpos": [], "vel": [], "c": [], "goal": []}
    for r in refs:
        w = r.raw.world
        out["apos"].append([a.state.p_pos for a in w.agents])
        out["vel"].append([a.state.p_vel for a in w.agents])
        out["lpos"].append([lm.state.p_pos for lm in w.landmarks])
        out["c"].append([a.state.c for a in w.agents])
        goals = []
        for a in w.agents:  # goal_b of agents that have one (reference: each agent; speaker: the listener's)
            g = getattr(a, "_goal_b", None)
            goals.append(next(i for i, lm in enumerate(w.landmarks) if lm is g) if g is not None else 0)
        out["goal"].append(goals)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
@pytest.mark.parametrize("task", TASKS)
def test_matches_mpe2_step_for_step(task, continuous):
    """1,000 steps (40 episodes) from mpe2's initial states, same actions: obs, state, rewards, time limits and
    episode returns agree within 1e-5 (the torch world runs in float64 like mpe2 by default)."""
    e, steps, tol = 3, 1000, 1e-5
    refs = [make_mpe(task, continuous=continuous, seed=i) for i in range(e)]
    env = make_env(f"mpe-torch/{task}?continuous={str(continuous).lower()}", num_envs=e, seed=0)
    spec = env.spec
    ref_spec = refs[0].spec
    assert (spec.agent_ids, spec.obs_dims, spec.state_dim, spec.action_dims, spec.team_reward) == (
        ref_spec.agent_ids, ref_spec.obs_dims, ref_spec.state_dim, ref_spec.action_dims, ref_spec.team_reward)
    assert (spec.action_low, spec.action_high, spec.episode_limit) == (
        ref_spec.action_low, ref_spec.action_high, ref_spec.episode_limit)
    rng = np.random.default_rng(0)

    def sync(episode: int) -> None:
        first = [r.reset(seed=1000 * episode + i) for i, r in enumerate(refs)]
        o = env.set_world(**_world_state(refs))
        np.testing.assert_allclose(o.obs.numpy(), np.stack([f.obs for f in first]), atol=tol, rtol=0)
        np.testing.assert_allclose(o.state.numpy(), np.stack([f.state for f in first]), atol=tol, rtol=0)
        assert o.action_mask.tolist() == np.stack([f.action_mask for f in first]).tolist()

    env.reset(seed=0)
    sync(0)
    returns = np.zeros((e, spec.n_agents))
    collisions = 0
    for t in range(steps):
        if spec.discrete:
            act = np.stack([[rng.integers(d) for d in spec.action_dims] for _ in range(e)])
        else:  # out-of-range values too: both sides clip to the Box [0, 1]
            act = rng.uniform(-0.2, 1.2, (e, spec.n_agents, spec.act_dim)).astype(np.float32)
        want = [r.step(a) for r, a in zip(refs, act)]
        got = env.step(torch.as_tensor(act))
        np.testing.assert_allclose(got.final.obs.numpy(), np.stack([w.obs for w in want]), atol=tol, rtol=0)
        np.testing.assert_allclose(got.final.state.numpy(), np.stack([w.state for w in want]), atol=tol, rtol=0)
        r = np.stack([w.reward for w in want])
        np.testing.assert_allclose(got.reward.numpy(), r, atol=tol, rtol=0)
        returns += r
        collisions += int((r <= -0.99).sum()) if task == "simple_spread_v3" else int((r >= 10).sum())
        assert got.truncated.tolist() == [w.truncated for w in want]
        assert got.terminated.tolist() == [w.terminated for w in want]
        if want[0].truncated:
            assert [ep.length for ep in got.episodes] == [25] * e
            np.testing.assert_allclose([ep.agent_returns for ep in got.episodes], returns, atol=1e-4, rtol=0)
            np.testing.assert_allclose([ep.team_return for ep in got.episodes], returns.sum(1), atol=1e-4, rtol=0)
            returns[:] = 0
            sync(t + 1)
        else:
            assert not got.episodes
    if task in ("simple_spread_v3", "simple_tag_v3") and not continuous:
        assert collisions > 0  # the contact forces and collision rewards were exercised


def test_spec_follows_the_mpe_family_for_its_parameters():
    for task, q in [("simple_spread_v3", "N=4&local_ratio=0.2&max_cycles=10"), ("simple_reference_v3", "local_ratio=0"),
                    ("simple_tag_v3", "num_adversaries=2&num_obstacles=3&num_good=2")]:
        mine, ref = make_env(f"mpe-torch/{task}?{q}").spec, make_env(f"mpe/{task}?{q}").spec
        assert (mine.agent_ids, mine.obs_dims, mine.state_dim, mine.action_dims, mine.episode_limit) == (
            ref.agent_ids, ref.obs_dims, ref.state_dim, ref.action_dims, ref.episode_limit), task


def test_truncation_gives_the_true_last_obs_and_one_episode_per_copy():
    env = make_env("mpe-torch/simple_spread_v3?max_cycles=3", num_envs=5, seed=0)
    obs = env.reset(seed=4)
    assert obs.obs.shape == (5, 3, 18) and obs.state.shape == (5, 54) and obs.action_mask.all() and obs.active.all()
    total = torch.zeros(5, 3)
    for t in range(3):
        st = env.step(torch.randint(0, 5, (5, 3)))
        total += st.reward
        assert st.next.first.tolist() == [t == 2] * 5
        assert st.truncated.tolist() == [t == 2] * 5 and not st.terminated.any()
        assert st.reward.dtype == torch.float32 and st.final.obs.dtype == torch.float32
    assert len(st.episodes) == 5 and all(ep.length == 3 and ep.truncated for ep in st.episodes)
    np.testing.assert_allclose([ep.agent_returns for ep in st.episodes], total.numpy(), atol=1e-5)
    np.testing.assert_allclose([ep.team_return for ep in st.episodes], total.sum(1).numpy(), atol=1e-5)
    assert not torch.allclose(st.final.obs, st.next.obs)  # next is already the new episode
    assert st.next.first.all() and not st.final.first.any() and obs.first.all()
    assert torch.all(st.next.obs[:, :, :2] == 0)  # velocities start at zero
    assert torch.all(st.final.state[:, :18] == st.final.obs[:, 0])  # state = the agents' observations


def test_seeding_and_sizes_from_1_to_65536():
    a, b = (make_env("mpe-torch/simple_tag_v3", num_envs=7) for _ in range(2))
    assert torch.equal(a.reset(seed=3).obs, b.reset(seed=3).obs)
    assert not torch.equal(a.reset(seed=3).obs, b.reset(seed=4).obs)
    for e in (1, 65_536):
        env = make_env("mpe-torch/simple_speaker_listener_v4?continuous=true", num_envs=e)
        env.reset(seed=0)
        st = env.step(torch.rand(e, 2, 5))
        assert st.next.obs.shape == (e, 2, 11) and st.reward.shape == (e, 2) and st.next.state.shape == (e, 14)
        assert torch.all(st.next.obs[:, 0, 3:] == 0)  # the speaker's observation is padded with zeros


@pytest.mark.parametrize("env_id,match", [
    ("mpe-torch/simple_reference_v3?N=4", "unknown parameter"),
    ("mpe-torch/simple_spread_v3?dtype=float16", "dtype"),
    ("mpe-torch/simple_spread_v3?N=1", "N must be"),
    ("mpe-torch/simple_tag_v3?prey=smart", "prey"),
    ("mpe-torch/simple_world_comm_v3", "unknown task"),
])
def test_bad_parameters_are_usage_errors(env_id, match):
    with pytest.raises(UsageError, match=match):
        make_env(env_id)


def test_wrong_action_shape_is_a_usage_error():
    env = make_env("mpe-torch/simple_spread_v3", num_envs=2)
    env.reset()
    with pytest.raises(UsageError, match="actions must have shape"):
        env.step(torch.zeros(3, 3, dtype=torch.long))


def test_happo_learns_on_the_batched_simple_spread(tmp_path):
    """HAPPO, unchanged, trains on the batched env and beats uniformly random actions by a wide margin
    (random: about -84; this seed reaches about -64 greedy after 24k steps)."""
    from conftest import quick_run
    from test_training import random_team_return

    from pamarl.runner import train

    rand = random_team_return("mpe-torch/simple_spread_v3")
    res = train(quick_run(tmp_path, algo="happo", env="mpe-torch/simple_spread_v3", steps=24_000, num_envs=16,
                          rollout_len=25, seed=1, eval_episodes=64))
    assert res.final_eval["eval/return_mean"] > rand + 10, (res.final_eval, rand)
    assert res.last_return > rand + 8


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__len__")


@pytest.mark.parametrize("algo_name", ["happo", "mappo", "ippo"])
def test_collecting_on_the_batched_mpe_reads_nothing_back_per_step(monkeypatch: pytest.MonkeyPatch,
                                                                    algo_name: str) -> None:
    """The acting loop on ``mpe-torch`` never asks a tensor for a host value (what is a device-to-host copy
    and a synchronisation on a GPU): acting, env stepping, rewards and storing stay on the device, and the
    episodes that ended are read once, after the rollout (one ``tolist`` per batch of ended episodes)."""
    from pamarl.algos.registry import get_algorithm
    from pamarl.collect import EnvCollector
    from pamarl.config import TrainConfig
    from pamarl.runner import apply_reward_convention, make_algorithm, reward_convention

    run = TrainConfig(algo=algo_name, env="mpe-torch/simple_spread_v3", num_envs=16, rollout_len=30, steps=10**5)
    env = make_env(run.env, num_envs=16, seed=0)
    algo = make_algorithm(run, get_algorithm(algo_name).Config(), env.spec)
    conv = reward_convention(run, env.spec)
    collector = EnvCollector(env, run.rollout_len)
    collector.reset(seed=0)
    calls: dict[str, int] = {}
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: object, _real: object = real, _name: str = name, **k: object) -> object:
            calls[_name] = calls.get(_name, 0) + 1
            return _real(self, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, counted)
    got = collector.collect(algo, 0, lambda st: apply_reward_convention(st, conv))
    seen = dict(calls)
    bool(torch.ones(()))  # the counting itself works
    monkeypatch.undo()
    assert calls.get("__bool__", 0) == seen.get("__bool__", 0) + 1
    assert seen == {"tolist": 1}, f"host reads during a 30-step rollout: {seen}"
    assert len(got.episodes) == 16 and all(e.length == 25 for e in got.episodes)
