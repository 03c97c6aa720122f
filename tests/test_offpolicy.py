"""Off-policy family: TD targets and mixers against hand-computed values, QMIX's monotonicity, the HA
sequential actor update, env refusal, checkpoints and exact resume, and learning on small tasks."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from conftest import update_crashes_at

from pamarl.algos.base import ActOut
from pamarl.algos.offpolicy import (
    double_q_value,
    hard_update,
    linear_schedule,
    masked_argmax,
    max_q_value,
    soft_update,
    td_target,
)
from pamarl.algos.registry import get_algorithm
from pamarl.buffers.replay import TransitionBatch
from pamarl.checkpoint import load_checkpoint
from pamarl.config import TrainConfig
from pamarl.envs.base import BatchedEnv, BatchObs, EnvSpec
from pamarl.envs.registry import make_env
from pamarl.errors import UsageError
from pamarl.nets.mixers import QMixer, VDNMixer
from pamarl.nets.qnets import AgentQNet, gumbel_softmax
from pamarl.runner import evaluate, train

OFF_POLICY = ("maddpg", "haddpg", "hatd3", "iql", "vdn", "qmix")


# ---------------------------------------------------------------------- helpers
def spec(discrete: bool = True, n: int = 2, obs: int = 3, act: int = 3, state: int = 4) -> EnvSpec:
    kw: dict[str, Any] = {}
    if not discrete:
        kw = {"action_low": ((0.0,) * act,) * n, "action_high": ((2.0,) * act,) * n}
    return EnvSpec(agent_ids=tuple(f"a{i}" for i in range(n)), obs_dims=(obs,) * n, state_dim=state,
                   action_kind="discrete" if discrete else "continuous", action_dims=(act,) * n, episode_limit=5, **kw)


def make(name: str, sp: EnvSpec, **cfg: Any) -> Any:
    cls = get_algorithm(name)
    return cls(sp, cls.Config(**cfg), TrainConfig(algo=name, num_envs=2, seed=3), torch.device("cpu"))


def batch(sp: EnvSpec, B: int = 6, seed: int = 0, gamma: float = 0.9) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    n, A = sp.n_agents, sp.act_dim
    action = (torch.randint(0, A, (B, n), generator=g) if sp.discrete
              else torch.rand(B, n, A, generator=g) * 2 - 1)
    return TransitionBatch(
        obs=torch.randn(B, n, sp.obs_dim, generator=g), state=torch.randn(B, sp.state_dim, generator=g),
        action_mask=torch.ones(B, n, A, dtype=torch.bool), active=torch.ones(B, n, dtype=torch.bool), action=action,
        reward=torch.randn(B, n, generator=g), terminated=(torch.rand(B, generator=g) < 0.3).float(),
        next_obs=torch.randn(B, n, sp.obs_dim, generator=g), next_state=torch.randn(B, sp.state_dim, generator=g),
        next_action_mask=torch.ones(B, n, A, dtype=torch.bool), next_active=torch.ones(B, n, dtype=torch.bool),
        discount=torch.full((B,), gamma))


def rows(run_dir: Path) -> list[dict[str, str]]:
    """Logged metrics without the wall-clock column."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)]


def quick(tmp_path: Path, name: str, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(progress=False, tensorboard=False, eval_every=0, run_dir=str(tmp_path / name),
                                num_envs=4, rollout_len=25)
    base.update(kw)
    return TrainConfig(**base)


class RandomPolicy:
    """Uniform random actions (allowed ones for discrete tasks; uniform in the bounds for continuous)."""

    def __init__(self, sp: EnvSpec, seed: int = 0):
        self.spec = sp
        self.g = torch.Generator().manual_seed(seed)
        low, high = sp.padded_bounds()
        self.low, self.high = torch.as_tensor(low), torch.as_tensor(high)

    def evaluation(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        E, n = obs.obs.shape[:2]
        if self.spec.discrete:
            p = obs.action_mask.float().reshape(E * n, -1)
            a = torch.multinomial(p, 1, generator=self.g).reshape(E, n)
            return ActOut(a, a)
        u = torch.rand(E, n, self.spec.act_dim, generator=self.g)
        return ActOut(self.low + u * (self.high - self.low), u)


def random_return(env_id: str, episodes: int = 48) -> float:
    env: BatchedEnv = make_env(env_id, num_envs=8, seed=123)
    try:
        return evaluate(RandomPolicy(env.spec), env, episodes, seed=777)["eval/return_mean"]  # type: ignore[arg-type]
    finally:
        env.close()


def trained_return(result_dir: Path, env_id: str, algo: str, episodes: int = 48) -> float:
    """Greedy return of the final checkpoint on fresh evaluation episodes (same seeds as the baseline)."""
    from pamarl.runner import load_run_config, make_algorithm

    run, cfg = load_run_config(result_dir)
    env = make_env(env_id, num_envs=8, seed=123)
    try:
        a = make_algorithm(run, cfg, env.spec)
        a.load_state_dict(load_checkpoint(result_dir / "checkpoints" / "final.pt")["algo"])
        return evaluate(a, env, episodes, seed=777)["eval/return_mean"]
    finally:
        env.close()


# ---------------------------------------------------------------------- TD targets
def test_td_target_bootstraps_on_truncation_not_on_termination() -> None:
    r = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    term = torch.tensor([0.0, 1.0])
    nxt = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    y = td_target(r, term, nxt, 0.9)
    # env 0 (running or truncated): r + 0.9 * V(s'); env 1 (terminated): r
    assert torch.allclose(y, torch.tensor([[1.0 + 9.0, 2.0 + 18.0], [0.5, -1.0]]))
    assert torch.allclose(td_target(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.5),
                          torch.tensor([2.0]))
    # per-sample discounts of n-step returns (gamma^m) broadcast over agents
    y = td_target(r, torch.tensor([0.0, 0.0]), nxt, torch.tensor([0.5, 0.25]))
    assert torch.allclose(y, torch.tensor([[6.0, 12.0], [8.0, 9.0]]))


def test_double_q_and_max_targets_respect_masks() -> None:
    q_online = torch.tensor([[1.0, 5.0, 3.0], [2.0, 1.0, 0.0]])
    q_target = torch.tensor([[10.0, 20.0, 30.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[True, False, True], [False, True, True]])
    # online argmax over allowed: row 0 -> action 2 (3 > 1), row 1 -> action 1; target values there
    assert torch.allclose(double_q_value(q_online, q_target, mask), torch.tensor([30.0, 8.0]))
    assert torch.allclose(max_q_value(q_target, mask), torch.tensor([30.0, 9.0]))
    assert masked_argmax(q_online, mask).tolist() == [2, 1]
    # a row with nothing allowed (an inactive agent) stays defined
    assert masked_argmax(q_online[:1], torch.zeros(1, 3, dtype=torch.bool)).tolist() == [1]


def test_team_reward_schedule_and_target_updates() -> None:
    r = torch.tensor([[1.0, 3.0]])
    algo = make("vdn", spec())
    assert algo.reward_mode == "team"  # reward=auto on a cooperative task
    assert algo.team_reward(torch.tensor([[4.0, 4.0]])).item() == 4.0  # every agent already holds the sum
    algo.reward_mode = "individual"  # own rewards: the team reward sums them
    assert algo.team_reward(r).item() == 4.0
    assert linear_schedule(1.0, 0.1, 100, 50) == pytest.approx(0.55)
    assert linear_schedule(1.0, 0.1, 100, 500) == pytest.approx(0.1)
    src, tgt = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    w0 = tgt.weight.detach().clone()
    soft_update(tgt, src, 0.1)
    assert torch.allclose(tgt.weight, 0.9 * w0 + 0.1 * src.weight)
    hard_update(tgt, src)
    assert torch.equal(tgt.weight, src.weight)


def test_iql_loss_matches_hand_computation() -> None:
    sp = spec()
    algo = make("iql", sp, hidden=(8,), gamma=0.9)
    b = batch(sp)
    b.next_active[0, 1] = False  # agent 1 of row 0 leaves: no bootstrap for it
    b.active[2, 0] = False  # agent 0 of row 2 is inactive: no loss
    p = algo.q_pairs(b)
    loss, _ = algo.loss(p)
    with torch.no_grad():
        q = algo.qnet(b.obs)[0].gather(-1, b.action.unsqueeze(-1)).squeeze(-1)
        q_next = algo.qnet(b.next_obs)[0].max(-1).values  # target == online at init, so double-Q == max
        y = b.reward + 0.9 * (1 - b.terminated[:, None]) * q_next * b.next_active
        m = b.active.float()
        expected = ((q - y).pow(2) * m).sum() / m.sum()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_vdn_loss_is_team_td_of_summed_utilities() -> None:
    sp = spec()
    algo = make("vdn", sp, hidden=(8,), gamma=0.95)
    algo.reward_mode = "individual"  # per-agent rewards in the batch: the mixer's target sums them
    b = batch(sp, seed=1, gamma=0.95)
    loss, _ = algo.loss(algo.q_pairs(b))
    with torch.no_grad():
        q = algo.qnet(b.obs)[0].gather(-1, b.action.unsqueeze(-1)).squeeze(-1).sum(-1)
        q_next = algo.qnet(b.next_obs)[0].max(-1).values.sum(-1)
        y = b.reward.sum(-1) + 0.95 * (1 - b.terminated) * q_next
    assert torch.allclose(loss, (q - y).pow(2).mean(), atol=1e-6)


# ---------------------------------------------------------------------- mixers
def test_vdn_mixer_sums() -> None:
    assert torch.allclose(VDNMixer()(torch.tensor([[1.0, 2.0, 3.5]]), None), torch.tensor([6.5]))


def test_qmixer_matches_hand_computed_value() -> None:
    mix = QMixer(n_agents=2, state_dim=1, embed_dim=1, hypernet_layers=1)
    linear = lambda m: cast(torch.nn.Linear, m)  # noqa: E731 - one-layer hypernetworks are Linear
    with torch.no_grad():
        for p in mix.parameters():
            p.zero_()
        linear(mix.hyper_w1).bias.copy_(torch.tensor([-2.0, 3.0]))  # |W1| = [2, 3]
        linear(mix.hyper_b1).bias.fill_(-1.0)
        linear(mix.hyper_w2).bias.fill_(-0.5)  # |W2| = 0.5
        linear(cast(torch.nn.Sequential, mix.hyper_b2)[2]).bias.fill_(4.0)
    qs = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    out = mix(qs, torch.zeros(2, 1))
    h0 = 2 * 1 + 3 * 1 - 1  # = 4 -> elu 4
    h1 = 2 * -1 + 0 - 1  # = -3 -> elu exp(-3) - 1
    expected = torch.tensor([0.5 * h0 + 4.0, 0.5 * (math.exp(h1) - 1) + 4.0])
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("layers", [1, 2])
def test_qmix_monotonic_in_every_agent_utility(layers: int) -> None:
    torch.manual_seed(0)
    mix = QMixer(n_agents=4, state_dim=6, embed_dim=8, hypernet_layers=layers, hypernet_embed=16)
    qs = (torch.randn(512, 4) * 5).requires_grad_(True)
    states = torch.randn(512, 6) * 3
    (grad,) = torch.autograd.grad(mix(qs, states).sum(), qs)
    assert (grad >= 0).all()
    assert (grad > 0).float().mean() > 0.5  # and not trivially flat


def test_qmix_starts_close_to_vdn() -> None:
    """The mixer's initial gains dQ_tot/dQ_i are about 1 (VDN's) whatever the state's scale: large initial
    gains turn the greedy bootstrap into an expansion (gamma * gain > 1) and Q_tot runs away."""
    torch.manual_seed(0)
    mix = QMixer(n_agents=3, state_dim=54, embed_dim=32, hypernet_layers=2)
    qs = torch.zeros(256, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(mix(qs, torch.randn(256, 54) * 2).sum(), qs)
    assert 0.3 < grad.mean() < 1.5 and grad.max() < 3


def test_qmix_training_step_keeps_monotonicity_and_leading_dims() -> None:
    sp = spec(n=3)
    algo = make("qmix", sp, hidden=(8,), mixing_embed=4, hypernet_embed=8, lr=1e-2)
    for s in range(5):
        algo.train_step(batch(sp, B=16, seed=s))
    qs = torch.randn(7, 5, 3, requires_grad=True)
    out = algo.mixer(qs, torch.randn(7, 5, sp.state_dim))
    assert out.shape == (7, 5)
    (g,) = torch.autograd.grad(out.sum(), qs)
    assert (g >= 0).all()


def test_recurrent_qnet_matches_stepwise_unroll() -> None:
    torch.manual_seed(0)
    net = AgentQNet(3, 5, 4, rnn=True, rnn_hidden=8)
    obs = torch.randn(2, 6, 3, 5)
    h, qs = None, []
    for t in range(6):
        q, h = net(obs[:, t], h)
        qs.append(q)
    assert torch.allclose(net.unroll(obs), torch.stack(qs, 1), atol=1e-6)


def test_gumbel_softmax_is_one_hot_with_gradient() -> None:
    logits = torch.randn(64, 5, requires_grad=True)
    y = gumbel_softmax(logits, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(y.sum(-1), torch.ones(64)) and ((y == 0) | (y == 1)).all()
    (y * torch.arange(5.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------------- actor-critic
def test_hatd3_target_smoothing_is_clipped_and_bounded() -> None:
    sp = spec(discrete=False)
    algo = make("hatd3", sp, hidden=(8,), critic_hidden=(8,), policy_noise=5.0, noise_clip=0.1)
    b = batch(sp)
    with torch.no_grad():
        mu = algo.target_actions(b.next_obs, b.next_action_mask, b.next_active)
        a = algo.next_actions(b)
    assert (a.abs() <= 1).all() and ((a - mu).abs() <= 0.1 + 1e-6).all()
    assert (a != mu).any()


def test_hatd3_delays_actor_and_target_updates() -> None:
    sp = spec(discrete=False)
    algo = make("hatd3", sp, hidden=(8,), critic_hidden=(8,), policy_delay=3, tau=0.5)
    actor0 = [p.clone() for p in algo.actor.parameters()]
    target0 = [p.clone() for p in algo.target_critic.parameters()]
    for step in range(3):
        m = algo.train_step(batch(sp, seed=step))
        algo.updates += 1
        moved = any(not torch.equal(p, q) for p, q in zip(algo.actor.parameters(), actor0))
        t_moved = any(not torch.equal(p, q) for p, q in zip(algo.target_critic.parameters(), target0))
        assert moved == (step == 2) and t_moved == (step == 2) and ("loss/actor" in m) == (step == 2)


@pytest.mark.parametrize("manual_grads", [True, False])
def test_sequential_actor_update_uses_earlier_agents_new_actions(manual_grads: bool) -> None:
    """HAML's sequential update: agent i_m sees agents i_1..i_{m-1} with their updated policies and the
    rest with their current ones; the order is the one :func:`schedules.sequential` draws. (Both with the
    hand-written backward passes of :mod:`pamarl.nets.manual` and with autograd.)"""
    from pamarl.algos.schedules import sequential

    sp = spec(discrete=False, n=3)
    algo = make("haddpg", sp, hidden=(8,), critic_hidden=(8,), lr=0.05)
    algo.manual_grads = manual_grads
    b = batch(sp, B=8)
    with torch.no_grad():
        old = algo.actor.squash(algo.actor(b.obs))
    seen: list[torch.Tensor] = []
    critic_inputs = algo.critic_inputs

    def spy(x: torch.Tensor, joint: torch.Tensor, *rest: Any) -> torch.Tensor:
        seen.append(joint.detach().clone())
        return critic_inputs(x, joint, *rest)

    algo.critic_inputs = spy  # type: ignore[method-assign]
    expected_order = sequential(3, torch.Generator().set_state(algo.generator.get_state())).critical
    algo.sequential_actor_update(b)
    assert algo.last_order == expected_order
    with torch.no_grad():
        new = algo.actor.squash(algo.actor(b.obs))
    for m, i in enumerate(expected_order):
        joint = seen[m]
        for j in expected_order[:m]:
            assert torch.allclose(joint[:, j], new[:, j], atol=1e-6)
        for j in expected_order[m + 1:]:
            assert torch.allclose(joint[:, j], old[:, j], atol=1e-6)
        assert not torch.allclose(old[:, i], new[:, i])  # agent i itself moved


def test_hatd3_actor_steps_ascend_the_first_twin_only() -> None:
    """The sequential actor update evaluates Q_1 alone: the same values as the twin pair's first column."""
    sp = spec(discrete=False, n=3)
    algo = make("hatd3", sp, hidden=(8,), critic_hidden=(8,))
    b = batch(sp, B=6)
    x = algo.critic_x(b.state, b.obs)
    joint = algo.encode(b.action, b.active)
    both = algo.q_values(algo.critic, x, joint)
    first = algo.q_values(algo.critic, x, joint, [0])
    assert first.shape == (6, 1) and torch.allclose(first[:, 0], both[:, 0], atol=1e-6)


def test_clip_and_step_together_matches_one_optimiser_per_agent() -> None:
    """MADDPG's actors step in one fused call with per-agent clipping: the same result as clipping and
    stepping each agent's optimiser on its own (Adam is elementwise), over several steps."""
    from pamarl.algos.common import clip_and_step, clip_and_step_together, fused_adam
    from pamarl.nets.mlp import AgentMLP

    nets = [AgentMLP(3, 5, 2, (8,)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [[fused_adam(net.agent_parameters(i), 0.05, 1e-5) for i in range(3)] for net in nets]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(7, 3, 5, generator=g)
        for k, net in enumerate(nets):
            for o in opts[k]:
                o.zero_grad(set_to_none=True)
            (net(x).pow(2).sum(0).sum(-1) * torch.tensor([1.0, 30.0, 0.01])).sum().backward()
        for i, o in enumerate(opts[0]):
            clip_and_step(o, nets[0].agent_parameters(i), 0.5)
        clip_and_step_together(opts[1], [nets[1].agent_parameters(i) for i in range(3)], 0.5)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    for a, b in zip(opts[0], opts[1]):
        for sa, sb in zip(a.state.values(), b.state.values()):
            assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    with torch.no_grad():  # the version bump keeps AgentMLP's cached stacks for acting fresh
        assert torch.equal(nets[1](x), nets[1]._mlp(x.transpose(0, 1), [
            (torch.stack([nets[1]._net(i).linear(j).weight.t() for i in range(3)]),
             torch.stack([nets[1]._net(i).linear(j).bias for i in range(3)]).unsqueeze(1))
            for j in range(nets[1].n_layers)]).transpose(0, 1))


@pytest.mark.parametrize("manual_grads", [True, False])
def test_maddpg_critic_i_sees_own_fresh_action_and_replayed_others(manual_grads: bool) -> None:
    sp = spec(discrete=True, n=3)
    algo = make("maddpg", sp, hidden=(8,), critic_hidden=(8,))
    algo.manual_grads = manual_grads
    b = batch(sp, B=4)
    seen: list[torch.Tensor] = []
    critic_inputs = algo.critic_inputs

    def spy(x: torch.Tensor, joint: torch.Tensor, *rest: Any) -> torch.Tensor:
        seen.append(joint.detach().clone())
        return critic_inputs(x, joint, *rest)

    algo.critic_inputs = spy  # type: ignore[method-assign]
    algo.actor_update(b)
    joint = seen[0]  # [B, critic, agent, A]
    replayed = torch.nn.functional.one_hot(b.action, 3).float()
    for i in range(3):
        for j in range(3):
            if i != j:
                assert torch.equal(joint[:, i, j], replayed[:, j])
            else:  # a one-hot Gumbel sample of agent i's own policy
                assert torch.allclose(joint[:, i, j].sum(-1), torch.ones(4))


@pytest.mark.parametrize("name,discrete", [("haddpg", True), ("hatd3", True), ("iql", False), ("vdn", False),
                                           ("qmix", False)])
def test_refuses_wrong_action_kind(name: str, discrete: bool) -> None:
    with pytest.raises(UsageError, match="supports (continuous|discrete) actions only"):
        make(name, spec(discrete=discrete))


def test_maddpg_supports_both_action_kinds() -> None:
    for d in (True, False):
        algo = make("maddpg", spec(discrete=d), hidden=(8,), critic_hidden=(8,))
        m = algo.train_step(batch(spec(discrete=d)))
        assert {"loss/critic", "loss/actor"} <= set(m)


def test_continuous_actions_reach_env_bounds() -> None:
    sp = spec(discrete=False)
    algo = make("hatd3", sp, hidden=(8,), critic_hidden=(8,), learning_starts=0, expl_noise=10.0)
    obs = BatchObs(torch.randn(2, 2, 3), torch.randn(2, 4), torch.ones(2, 2, 3, dtype=torch.bool),
                   torch.ones(2, 2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    out = algo.act(obs)
    assert (out.env_action >= 0).all() and (out.env_action <= 2).all()
    assert ((out.env_action == 0) | (out.env_action == 2)).any()  # huge noise saturates at the bounds
    assert torch.allclose(out.env_action, (out.action + 1))  # [-1, 1] -> [0, 2]


def test_epsilon_greedy_only_picks_allowed_actions() -> None:
    sp = spec(n=2, act=4)
    algo = make("qmix", sp, hidden=(8,), eps_start=1.0, eps_anneal_steps=10**9)
    mask = torch.zeros(64, 2, 4, dtype=torch.bool)
    mask[..., 1] = mask[..., 3] = True
    obs = BatchObs(torch.randn(64, 2, 3), torch.randn(64, 4), mask, torch.ones(64, 2, dtype=torch.bool),
                   torch.ones(64, dtype=torch.bool))
    a = algo.act(obs).env_action
    assert set(a.unique().tolist()) == {1, 3}
    g = algo.act(obs, explore=False).env_action
    assert set(g.unique().tolist()) <= {1, 3}



def test_recurrent_states_reset_exactly_at_episode_starts() -> None:
    """Hidden states reset where ``BatchObs.first`` marks an episode start, and evaluation keeps states of
    its own, so an evaluation in the middle of a rollout leaves the training episodes' states alone."""
    sp = spec()
    algo = make("qmix", sp, rnn=True, rnn_hidden=8)

    def obs(first: list[bool]) -> BatchObs:
        g = torch.Generator().manual_seed(0)
        return BatchObs(torch.randn(2, 2, 3, generator=g), torch.randn(2, 4, generator=g),
                        torch.ones(2, 2, 3, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool),
                        torch.tensor(first))

    algo.act(obs([True, True]))
    h1 = algo.h_train.clone()
    algo.act(obs([False, False]))
    h2 = algo.h_train.clone()
    assert not torch.allclose(h1, h2)  # the state carries the history
    with algo.evaluation():
        for _ in range(3):
            algo.act(obs([False, False]), explore=False)
        h_eval = algo.h_eval.clone()
    assert torch.equal(algo.h_train, h2)  # the evaluation did not touch the training states
    algo.act(obs([True, False]))  # env 0 starts a new episode: from the zero state, like the very first step
    assert torch.allclose(algo.h_train[0], h1[0]) and not torch.allclose(algo.h_train[1], h1[1])
    with algo.evaluation():  # a new evaluation starts from reset envs: from zero states again
        algo.act(obs([True, True]), explore=False)
    assert torch.allclose(algo.h_eval, h1) and not torch.allclose(h_eval, h1)


def _tiny_tasks(kinds: tuple[str, ...]) -> list[str]:
    tasks = []
    if "discrete" in kinds:  # heterogeneous agents: padded observations and masked padded actions
        tasks += ["matrix/penalty?steps=2", "mpe/simple_speaker_listener_v4"]
    if "continuous" in kinds:  # heterogeneous action widths: padded dimensions held at zero
        tasks += ["mpe/simple_speaker_listener_v4?continuous=true"]
    return tasks


REGISTRY_CASES: list[Any] = [(name, task) for name in OFF_POLICY
                             for task in _tiny_tasks(get_algorithm(name).action_kinds)]
REGISTRY_CASES += [("qmix-rnn", "mpe/simple_speaker_listener_v4"), ("iql-rnn", "matrix/penalty?steps=3")]
REGISTRY_CASES += [pytest.param(name, "mamujoco/HalfCheetah-2x3", marks=pytest.mark.mujoco)
                   for name in OFF_POLICY if "continuous" in get_algorithm(name).action_kinds]


@pytest.mark.parametrize("name,task", REGISTRY_CASES)
def test_every_algorithm_runs_on_every_family_it_supports(tmp_path: Path, name: str, task: str) -> None:
    if task.startswith("mamujoco"):
        pytest.importorskip("mujoco")
    algo = name.split("-")[0]
    extra = {"rnn": True, "episode_batch": 4} if name.endswith("rnn") else {}
    cfg = get_algorithm(algo).Config(hidden=(16,), batch_size=16, learning_starts=100, **extra)
    res = train(quick(tmp_path, name, algo=algo, env=task, steps=300, num_envs=2, eval_episodes=2), cfg)
    last = rows(res.run_dir)[-1]
    losses = [k for k in last if k.startswith("loss/") and last[k] not in ("", None)]
    assert losses and all(math.isfinite(float(last[k])) for k in losses)
    assert float(last["train/buffer_size"]) > 0 and "eval/return_mean" in res.final_eval

# ---------------------------------------------------------------------- checkpoints and resume
RESUME_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qmix": ("mpe/simple_spread_v3", {"n_step": 2}),  # n-step returns stop at the checkpoint's cut
    "qmix-rnn": ("mpe/simple_spread_v3", {"rnn": True, "episode_batch": 4}),  # running episodes cut mid-way
    "iql-shared": ("matrix/penalty?steps=3", {"share_params": True}),
    "vdn": ("matrix/climbing", {"target_update_interval": 7}),
    "maddpg": ("mpe/simple_spread_v3", {}),
    "maddpg-cont": ("mpe/simple_spread_v3?continuous=true", {}),
    "haddpg": ("mpe/simple_spread_v3?continuous=true", {}),
    "hatd3": ("mpe/simple_spread_v3?continuous=true", {"n_step": 3}),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_matches_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """A run killed after a checkpoint and resumed logs exactly what an uninterrupted run logs (the replay,
    the running episodes of recurrent agents, optimisers, counters and RNG are all in the checkpoint)."""
    env, extra = RESUME_CASES[case]
    name = case.split("-")[0]
    cls = get_algorithm(name)
    cfg = cls.Config(hidden=(16,), batch_size=32, learning_starts=150, env_steps_per_update=25, **extra)
    kw: dict[str, Any] = dict(algo=name, env=env, steps=800, rollout_len=10 if "rnn" in case else 25,
                              checkpoint_every=3, eval_every=3, eval_episodes=4)
    train(quick(tmp_path, "full", **kw), cfg)


    # The run dies after the checkpoint at iteration 3, before the next one.
    with update_crashes_at(monkeypatch, cls, 5), pytest.raises(KeyboardInterrupt):
        train(quick(tmp_path, "cut", **kw), cfg)
    train(quick(tmp_path, "cut", **kw), cfg, resume=True)
    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert any(r.get("loss/td") or r.get("loss/critic") for r in full)  # it did learn in between
    assert cut == full


def test_checkpoint_without_replay_is_small_and_refills(tmp_path: Path) -> None:
    cls = get_algorithm("qmix")
    kw = dict(algo="qmix", env="mpe/simple_spread_v3", steps=400)
    cfg = cls.Config(learning_starts=100, batch_size=16, checkpoint_replay=False)
    with_replay = train(quick(tmp_path, "with", **kw), cls.Config(learning_starts=100, batch_size=16))
    without = train(quick(tmp_path, "without", **kw), cfg)
    big = (with_replay.run_dir / "checkpoints" / "final.pt").stat().st_size
    small = (without.run_dir / "checkpoints" / "final.pt").stat().st_size
    assert small < big
    state = load_checkpoint(without.run_dir / "checkpoints" / "final.pt")  # weights_only=True
    assert state["algo"]["replay"] is None
    algo = make("qmix", make_env("mpe/simple_spread_v3").spec, checkpoint_replay=False, learning_starts=100)
    algo.load_state_dict(state["algo"])
    assert len(algo.replay) == 0 and not algo.learning() and algo.env_steps == 400  # epsilon keeps its place
    res = train(quick(tmp_path, "without", **{**kw, "steps": 800}), cfg, resume=True)
    assert float(rows(res.run_dir)[-1]["train/updates"]) > float(rows(res.run_dir)[3]["train/updates"])


# ---------------------------------------------------------------------- learning (fixed seeds)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vdn", "qmix"])
def test_value_decomposition_solves_mild_penalty_game(tmp_path: Path, name: str) -> None:
    """VDN and QMIX reach an optimum (10 at (0, 0) or (2, 2)) of the penalty game with k = -5.

    Why this game: under uniform exploration VDN's least-squares utilities are the payoff's row means
    plus a constant, ``Q_i(a) = (sum_b R(a, b)) / 3 + c``; the optimal actions 0 and 2 have the larger
    mean iff ``(10 + k) / 3 > 2 / 3``, i.e. ``k > -8``. From there each agent's best response to the
    other playing 0 (or 2) is to match it, so greedy play settles on an optimum. With the default
    k = -100 (and in the climbing game) the safe action has the larger mean and VDN/QMIX settle on the
    safe joint action instead: relative overgeneralisation, which monotonic factorisations cannot escape.
    QMIX's mixer contains VDN's sum, so the same fit is open to it.
    """
    cfg = get_algorithm(name).Config(eps_anneal_steps=3000, learning_starts=500)
    res = train(quick(tmp_path, name, algo=name, env="matrix/penalty?k=-5", steps=6000, num_envs=8,
                      eval_episodes=16, seed=2), cfg)
    # team return = 2 agents x payoff 10 / scale 10
    assert res.final_eval["eval/return_mean"] == pytest.approx(2.0)


SPREAD = "mpe/simple_spread_v3"
SPREAD_C = "mpe/simple_spread_v3?continuous=true"
LEARNING_CASES: dict[str, tuple[int, str, dict[str, Any]]] = {
    # budget, env, config. A shorter horizon (gamma = 0.95 over 25-step episodes), a faster learning rate
    # and n-step returns let every learner show progress within a CI budget (smaller critics keep it cheap);
    # the defaults learn too, slower.
    "qmix": (20_000, SPREAD, {"gamma": 0.95, "lr": 1e-3, "eps_anneal_steps": 10_000, "n_step": 3, "tau": 0.005}),
    "vdn": (16_000, SPREAD, {"gamma": 0.95, "lr": 1e-3, "eps_anneal_steps": 10_000, "n_step": 3, "tau": 0.005}),
    "maddpg": (20_000, SPREAD_C, {"n_step": 5, "critic_hidden": (64, 64)}),
    "hatd3": (20_000, SPREAD_C, {"n_step": 5, "critic_hidden": (64, 64)}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LEARNING_CASES))
def test_beats_random_on_simple_spread(tmp_path: Path, name: str) -> None:
    steps, env, extra = LEARNING_CASES[name]
    rand = random_return(env)
    res = train(quick(tmp_path, name, algo=name, env=env, steps=steps, num_envs=8, eval_episodes=48, seed=1),
                get_algorithm(name).Config(**extra))
    assert res.final_eval["eval/return_mean"] > rand + 10, (res.final_eval, rand)
