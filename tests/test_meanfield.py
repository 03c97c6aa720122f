"""Mean-field MARL pieces pinned against hand-computed values; MF-Q/IL/MF-AC/AC through the normal runner."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import quick_run

from pamarl.algos.meanfield import (
    MeanActionTracker,
    agent_rows,
    boltzmann,
    box_sum,
    mean_action_radius,
    mean_action_team,
    mf_target,
    mf_value,
)
from pamarl.algos.mfq import MFQ, MFQConfig
from pamarl.algos.offpolicy import soft_update
from pamarl.algos.registry import get_algorithm
from pamarl.buffers.agent_replay import AgentReplay
from pamarl.config import TrainConfig, build
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec, ObsLayout
from pamarl.errors import UsageError
from pamarl.runner import train

SPREAD6 = "mpe/simple_spread_v3?N=6"


def _obs(active: list[list[bool]], obs: torch.Tensor | None = None, A: int = 3) -> BatchObs:
    act = torch.tensor(active)
    E, N = act.shape
    return BatchObs(obs=obs if obs is not None else torch.zeros(E, N, 4), state=torch.zeros(E, 1),
                    action_mask=torch.ones(E, N, A, dtype=torch.bool), active=act,
                    first=torch.zeros(E, dtype=torch.bool))


# ---------------------------------------------------------------------- mean action
def test_mean_action_team_excludes_self_and_the_dead() -> None:
    a = torch.tensor([[0, 1, 1, 2]])
    m = mean_action_team(a, torch.tensor([[True, True, True, False]]), 3)
    assert torch.allclose(m[0, 0], torch.tensor([0.0, 1.0, 0.0]))  # others alive: actions 1, 1
    assert torch.allclose(m[0, 1], torch.tensor([0.5, 0.5, 0.0]))  # others alive: 0, 1
    assert torch.allclose(m[0, 2], torch.tensor([0.5, 0.5, 0.0]))
    # a lone survivor has no neighbour: the uniform distribution
    m = mean_action_team(a, torch.tensor([[True, False, False, False]]), 3)
    assert torch.allclose(m[0, 0], torch.full((3,), 1 / 3))


def test_mean_action_radius_by_hand_and_against_brute_force() -> None:
    # grid 5, radius 1: (0,0) a0, (1,1) a1, (2,2) a2 but dead, (4,4) a2
    a = torch.tensor([[0, 1, 2, 2]])
    pos = torch.tensor([[[0, 0], [1, 1], [2, 2], [4, 4]]])
    alive = torch.tensor([[True, True, False, True]])
    m = mean_action_radius(a, alive, pos, 3, grid=5, radius=1)
    assert torch.allclose(m[0, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(m[0, 1], torch.tensor([1.0, 0.0, 0.0]))  # the dead neighbour at (2,2) does not count
    assert torch.allclose(m[0, 3], torch.full((3,), 1 / 3))  # nobody within 1 cell
    # random scenes against the N x N definition (test only)
    g = torch.Generator().manual_seed(0)
    for radius in (0, 2, 5):
        E, N, A, G = 3, 30, 4, 12
        cells = torch.stack([torch.randperm(G * G, generator=g)[:N] for _ in range(E)])
        pos = torch.stack([cells % G, cells // G], -1)
        a = torch.randint(0, A, (E, N), generator=g)
        alive = torch.rand(E, N, generator=g) > 0.3
        got = mean_action_radius(a, alive, pos, A, G, radius)
        cheb = (pos[:, :, None, :] - pos[:, None, :, :]).abs().max(-1).values
        near = (cheb <= radius) & alive[:, None, :] & ~torch.eye(N, dtype=torch.bool)
        oh = torch.nn.functional.one_hot(a, A).float()
        cnt = near.sum(-1, keepdim=True)
        want = torch.where(cnt > 0, near.float() @ oh / cnt.clamp_min(1), torch.full((E, N, A), 1 / A))
        assert torch.allclose(got, want, atol=1e-6)


def test_box_sum_clips_at_the_edge() -> None:
    b = torch.ones(1, 1, 4, 4)
    s = box_sum(b, 1)[0, 0]
    assert s[0, 0] == 4 and s[1, 1] == 9 and s[0, 1] == 6 and s[3, 3] == 4


# ---------------------------------------------------------------------- Boltzmann, v^MF, target
def test_boltzmann_probabilities() -> None:
    q = torch.tensor([1.0, 2.0, 3.0])
    e = [math.exp(1), math.exp(2), math.exp(3)]
    assert torch.allclose(boltzmann(q, 1.0), torch.tensor([x / sum(e) for x in e]))
    e2 = [math.exp(2), math.exp(4), math.exp(6)]  # T = 0.5 doubles the logits
    assert torch.allclose(boltzmann(q, 0.5), torch.tensor([x / sum(e2) for x in e2]))
    p = boltzmann(q, 1.0, torch.tensor([True, True, False]))
    assert p[2] == 0 and torch.isclose(p[0], torch.tensor(math.exp(1) / (math.exp(1) + math.exp(2))))


def test_mean_field_value_and_target() -> None:
    v = mf_value(torch.tensor([[0.2, 0.8]]), torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(v, torch.tensor([1.8]))
    y = mf_target(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.8, 1.8]), 0.9)
    assert torch.allclose(y, torch.tensor([1.0 + 0.9 * 1.8, 1.0]))  # done: no bootstrap


def test_soft_update() -> None:
    src, dst = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        src.weight.fill_(1.0)
        dst.weight.fill_(0.0)
    soft_update(dst, src, 0.1)
    assert torch.allclose(dst.weight, torch.full_like(dst.weight, 0.1))


# ---------------------------------------------------------------------- transitions
def test_dead_agents_make_terminal_transitions_that_are_kept() -> None:
    spec = EnvSpec(agent_ids=("a", "b", "c"), obs_dims=(4,) * 3, state_dim=1, action_kind="discrete",
                   action_dims=(3,) * 3)
    tr = MeanActionTracker(spec, "team", 0)
    obs = _obs([[True, True, False]], torch.arange(12.0).reshape(1, 3, 4))
    final = _obs([[True, False, False]], 100 + torch.arange(12.0).reshape(1, 3, 4))
    step = BatchStep(next=final, final=final, reward=torch.tensor([[1.0, -0.1, 0.0]]), cost=None,
                     terminated=torch.tensor([False]), truncated=torch.tensor([False]))
    a = torch.tensor([[2, 1, 0]])
    rows = agent_rows(obs, a, torch.zeros(1, 3, 3), step, tr, torch.device("cpu"))
    assert rows["action"].tolist() == [2, 1]  # the agent dead before the step is not stored
    assert rows["done"].tolist() == [0.0, 1.0]  # agent b died during the step: terminal, kept
    assert rows["reward"].tolist() == pytest.approx([1.0, -0.1])
    assert torch.equal(rows["next_obs"][1], final.obs[0, 1])
    # a' for agent a at s': b acted but is dead at s', so no neighbour is left -> uniform
    assert torch.allclose(rows["next_mean"][0], torch.full((3,), 1 / 3))
    step.terminated = torch.tensor([True])  # a side wiped out: every stored row is terminal
    assert agent_rows(obs, a, None, step, None, torch.device("cpu"))["done"].tolist() == [1.0, 1.0]


def test_agent_replay_ring_and_memory() -> None:
    r = AgentReplay(5, obs_dim=2, n_actions=3, mean_dim=3)
    for i in range(3):
        k = 2
        r.add({"obs": torch.full((k, 2), float(i)), "next_obs": torch.full((k, 2), i + 0.5),
               "action": torch.full((k,), i), "reward": torch.full((k,), float(i)), "done": torch.zeros(k),
               "mean": torch.zeros(k, 3), "next_mean": torch.zeros(k, 3),
               "next_mask": torch.ones(k, 3, dtype=torch.bool)})
    assert len(r) == 5 and r.ptr == 1
    rows = r.rows(torch.arange(5))
    # every row keeps its own successor: o' = o + 0.5 whatever the wrap-around
    assert torch.equal(rows["next_obs"], rows["obs"] + 0.5)
    assert r.nbytes() == 5 * (2 * 2 * 2 + 8 + 4 + 4 + 3 * 2 * 2 + 3)


# ---------------------------------------------------------------------- the algorithms
def _batch(seed: int) -> dict[str, torch.Tensor]:
    """Four fixed transitions of two-action agents with 3-d observations (one terminal), as the replay samples them."""
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(4, 3, generator=g), "next_obs": torch.randn(4, 3, generator=g),
            "action": torch.tensor([0, 1, 1, 0]), "reward": torch.tensor([1.0, 0.0, -1.0, 0.5]),
            "done": torch.tensor([0.0, 1.0, 0.0, 0.0]), "mean": torch.tensor([[0.5, 0.5]] * 4),
            "next_mean": torch.tensor([[1.0, 0.0]] * 4), "next_mask": torch.ones(4, 2, dtype=torch.bool)}


def _mfq(spec: EnvSpec, **kw: object) -> MFQ:
    cfg = build(MFQConfig, {"hidden": [8], "embed": 8, "mean_embed": 4, **kw}, "mfq")
    return MFQ(spec, cfg, TrainConfig(algo="mfq", num_envs=1, seed=0), torch.device("cpu"))


def test_mfq_train_step_is_the_mean_field_td_loss_then_a_soft_update() -> None:
    spec = EnvSpec(agent_ids=("a", "b"), obs_dims=(3, 3), state_dim=1, action_kind="discrete", action_dims=(2, 2))
    algo = _mfq(spec, tau=0.5, temp_start=0.7, temp_finish=0.7, gamma=0.9)
    with torch.no_grad():
        for p in algo.target_qnet.parameters():
            p.add_(0.3)  # make target and online networks differ
    b = _batch(seed=1)
    with torch.no_grad():
        q = algo.qnet(b["obs"], b["mean"])[torch.arange(4), b["action"]]
        qt = algo.target_qnet(b["next_obs"], b["next_mean"])
        pi = torch.softmax(qt / 0.7, -1)
        y = b["reward"] + 0.9 * (1 - b["done"]) * (pi * qt).sum(-1)
        want = ((q - y) ** 2).mean()
    online0 = [p.detach().clone() for p in algo.qnet.parameters()]
    target0 = [p.detach().clone() for p in algo.target_qnet.parameters()]
    m = algo.train_step(b)
    assert torch.isclose(m["loss/q"], want)
    algo.sync_targets()
    for t0, o0, t1, o1 in zip(target0, online0, algo.target_qnet.parameters(), algo.qnet.parameters()):
        assert not torch.equal(o0, o1)
        assert torch.allclose(t1, 0.5 * o1 + 0.5 * t0)


def test_frozen_copies_sample_at_the_learners_temperature() -> None:
    """A self-play or checkpoint opponent that samples (opponent_explore=true, ``pamarl battle --sample``) is a
    fresh MFQ whose own env-step count is 0; it must take the learner's temperature with the weights, not
    restart at temp_start (T=1 here is near-uniform: Q ranges over ~0.4 on battles)."""
    from pamarl.envs.magent_opponents import clone_policy

    spec = EnvSpec(agent_ids=("a", "b"), obs_dims=(3, 3), state_dim=1, action_kind="discrete", action_dims=(2, 2))
    learner = _mfq(spec, temp_start=1.0, temp_finish=0.05, temp_anneal_steps=100)
    learner.env_steps = 1000
    twin = clone_policy(learner, 1)
    assert twin.temperature() == pytest.approx(0.05) and twin.env_steps == 1000
    fresh = _mfq(spec, temp_start=1.0, temp_finish=0.05, temp_anneal_steps=100)
    fresh.load_policy_state_dict(learner.state_dict())  # a full checkpoint state, as load_policy passes it
    assert fresh.temperature() == pytest.approx(0.05)


def test_il_target_is_max_q_and_has_no_mean_action() -> None:
    spec = EnvSpec(agent_ids=("a", "b"), obs_dims=(3, 3), state_dim=1, action_kind="discrete", action_dims=(2, 2))
    il = get_algorithm("il")(spec, build(get_algorithm("il").Config, {"hidden": [8], "embed": 8}, "il"),
                             TrainConfig(algo="il", num_envs=1), torch.device("cpu"))
    assert il.qnet.mean_fc is None
    b = {"next_obs": torch.randn(5, 3), "next_mask": torch.ones(5, 2, dtype=torch.bool)}
    with torch.no_grad():
        assert torch.allclose(il.next_value(b), il.target_qnet(b["next_obs"]).max(-1).values)


def test_radius_needs_a_grid_and_heterogeneous_agents_are_refused() -> None:
    spec = EnvSpec(agent_ids=("a", "b"), obs_dims=(3, 3), state_dim=1, action_kind="discrete", action_dims=(2, 2))
    with pytest.raises(UsageError, match="grid positions"):
        _mfq(spec, neighbourhood="radius")
    het = EnvSpec(agent_ids=("a", "b"), obs_dims=(3, 4), state_dim=1, action_kind="discrete", action_dims=(2, 2))
    with pytest.raises(UsageError, match="homogeneous"):
        _mfq(het)
    with pytest.raises(UsageError):
        build(MFQConfig, {"neighbourhood": "ring"}, "mfq")


def test_tracker_uses_positions_from_the_layout() -> None:
    spec = EnvSpec(agent_ids=("a", "b"), obs_dims=(5, 5), state_dim=1, action_kind="discrete", action_dims=(2, 2),
                   obs_layout=ObsLayout(view=(1, 1, 3), grid=10))
    tr = MeanActionTracker(spec, "radius", 1)
    o = torch.zeros(1, 2, 5)
    o[0, 0, -2:] = torch.tensor([0.1, 0.1])  # cell (1, 1)
    o[0, 1, -2:] = torch.tensor([0.2, 0.2])  # cell (2, 2): a neighbour
    m = tr.mean(torch.tensor([[0, 1]]), torch.tensor([[True, True]]), _obs([[True, True]], o, 2))
    assert torch.allclose(m[0], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    o[0, 1, -2:] = torch.tensor([0.5, 0.5])  # far away now
    m = tr.mean(torch.tensor([[0, 1]]), torch.tensor([[True, True]]), _obs([[True, True]], o, 2))
    assert torch.allclose(m, torch.full((1, 2, 2), 0.5))


@pytest.mark.parametrize("name", ["mfq", "il", "mfac", "ac"])
def test_runs_on_many_agent_spread_and_resumes(name: str, tmp_path) -> None:
    small = {"hidden": [16], "embed": 16, "mean_embed": 8}
    if name in ("mfq", "il"):
        small.update(learning_starts=100, batch_size=32, agent_steps_per_update=64, checkpoint_replay=True)
    else:
        small.update(critic_batch=32, critic_updates=4, checkpoint_replay=True)
    kw = dict(algo=name, env=SPREAD6, steps=200, num_envs=2, rollout_len=25, eval_episodes=1, checkpoint_every=2)
    cfg = build(get_algorithm(name).Config, small, name)
    full = train(quick_run(tmp_path, "full", **kw), cfg, quiet=True)
    half = quick_run(tmp_path, "half", **{**kw, "steps": 100})
    train(half, cfg, quiet=True)
    import dataclasses

    resumed = train(dataclasses.replace(half, steps=200), cfg, resume=True, quiet=True)
    a = json.loads((full.run_dir / "summary.json").read_text())
    b = json.loads((resumed.run_dir / "summary.json").read_text())
    assert a["env_steps"] == b["env_steps"] == 200
    assert a["eval/return_mean"] == pytest.approx(b["eval/return_mean"])


def test_mfac_critic_loss_and_replayed_critic_steps() -> None:
    """MF-AC's critic loss is ``(Q(o, a, mean_a) - y)^2`` with ``y = r + gamma (1 - done) sum_a' pi(a' | o')
    Q(o', a', mean_a')`` (eqs. 9-11, the actor as the policy); ``critic_updates`` extra critic-only steps on
    replayed rows move the critic and leave the actor to the joint step."""
    from pamarl.algos.base import Progress
    from pamarl.algos.mfac import MFAC, MFACConfig

    spec = EnvSpec(agent_ids=("a", "b"), obs_dims=(3, 3), state_dim=1, action_kind="discrete", action_dims=(2, 2))
    cfg = build(MFACConfig, {"hidden": [8], "embed": 8, "mean_embed": 4, "gamma": 0.9, "critic_replay": 64,
                             "critic_updates": 3, "critic_batch": 4}, "mfac")
    algo = MFAC(spec, cfg, TrainConfig(algo="mfac", num_envs=1, rollout_len=2, seed=0), torch.device("cpu"))
    b = _batch(seed=2)
    with torch.no_grad():
        q = algo.critic(b["obs"], b["mean"])[torch.arange(4), b["action"]]
        pi = torch.softmax(algo.actor(b["next_obs"]), -1)
        y = b["reward"] + 0.9 * (1 - b["done"]) * (pi * algo.critic(b["next_obs"], b["next_mean"])).sum(-1)
        assert torch.isclose(algo.critic_loss(b), ((q - y) ** 2).mean())
    assert algo.replay is not None
    algo.replay.add(b)
    algo.batch.add(b)
    critic0 = [p.detach().clone() for p in algo.critic.parameters()]
    m = algo.update(Progress(iteration=0, total_iterations=1, env_steps=1))
    assert "loss/critic_replay" in m and len(algo.replay) == 4 and len(algo.batch) == 0
    assert any(not torch.equal(a, b2) for a, b2 in zip(critic0, algo.critic.parameters()))
    with pytest.raises(UsageError, match="critic_replay"):
        build(MFACConfig, {"critic_replay": 0, "critic_updates": 2, "actor_replay": False}, "mfac")


def test_mfac_all_actions_actor_gradient_is_the_expected_sampled_gradient() -> None:
    """``actor_grad=all_actions``: ``-sum_b pi(b | o) (Q(o, b, mean_a) - V(o))`` has the gradient of the paper's
    ``-log pi(a | o) (Q(o, a, mean_a) - V(o))`` in expectation over ``a ~ pi(. | o)``, i.e. of the score-function
    form weighted by the (constant) probabilities; ``actor_replay`` lets the replayed steps move the actor too."""
    from pamarl.algos.mfac import MFAC, MFACConfig

    spec = EnvSpec(agent_ids=("a", "b"), obs_dims=(3, 3), state_dim=1, action_kind="discrete", action_dims=(3, 3))
    cfg = build(MFACConfig, {"hidden": [8], "embed": 8, "mean_embed": 4, "ent_coef": 0.0, "value_coef": 0.0,
                             "actor_grad": "all_actions", "critic_replay": 64, "critic_updates": 2, "critic_batch": 4,
                             "actor_replay": True}, "mfac")
    algo = MFAC(spec, cfg, TrainConfig(algo="mfac", num_envs=1, rollout_len=2, seed=0), torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    b = {"obs": torch.randn(4, 3, generator=g), "next_obs": torch.randn(4, 3, generator=g),
         "action": torch.tensor([0, 1, 2, 0]), "reward": torch.tensor([1.0, 0.0, -1.0, 0.5]),
         "done": torch.tensor([0.0, 1.0, 0.0, 0.0]), "mean": torch.tensor([[0.2, 0.3, 0.5]] * 4),
         "next_mean": torch.tensor([[1.0, 0.0, 0.0]] * 4), "next_mask": torch.ones(4, 3, dtype=torch.bool)}
    actor = list(algo.actor.parameters())
    got = torch.autograd.grad(algo.losses(b)[0], actor)
    logp = torch.log_softmax(algo.actor(b["obs"]), -1)
    with torch.no_grad():
        q = algo.critic(b["obs"], b["mean"])
        adv = q - (logp.exp() * q).sum(-1, keepdim=True)
    expected_sampled = -(logp.exp().detach() * logp * adv).sum(-1).mean()
    want = torch.autograd.grad(expected_sampled, actor)
    for a, w in zip(got, want):
        assert torch.allclose(a, w, atol=1e-6)
    assert algo.replay is not None
    algo.replay.add(b)
    for replay_actor in (False, True):  # the replayed steps move the actor only with actor_replay
        algo.cfg.actor_replay = replay_actor
        actor0 = [p.detach().clone() for p in actor]
        algo.replay_steps()
        assert any(not torch.equal(a, p) for a, p in zip(actor0, actor)) == replay_actor
    with pytest.raises(UsageError, match="actor_grad"):
        build(MFACConfig, {"actor_grad": "mean"}, "mfac")
    with pytest.raises(UsageError, match="actor_replay"):
        build(MFACConfig, {"actor_grad": "sampled", "critic_replay": 8, "critic_updates": 1}, "mfac")
    with pytest.raises(UsageError, match="actor_replay=false"):
        build(MFACConfig, {"critic_replay": 0, "critic_updates": 0}, "mfac")
