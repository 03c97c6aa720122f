"""The batched torch MPE (``mpe-torch/``): step-for-step agreement with mpe2, spec parity with ``mpe/``, and
the bookkeeping every algorithm relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pamarl.envs.mpe import make_mpe
from pamarl.envs.registry import make_env

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
