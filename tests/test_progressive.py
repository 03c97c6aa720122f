"""The progressive update: every special case of specs/progressive.md, plus learning on the homogeneity trap."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import quick_run

from pamarl.algos.base import Progress
from pamarl.algos.onpolicy import OnPolicyBatch
from pamarl.algos.registry import get_algorithm
from pamarl.algos.schedules import alpha_schedule, critical_count, progressive, sequential
from pamarl.envs.base import BatchStep
from pamarl.envs.matrix import MatrixGame
from pamarl.envs.registry import make_env
from pamarl.runner import train


def test_alpha_schedule_and_k():
    assert alpha_schedule(0.0) == pytest.approx(0.8)
    assert alpha_schedule(0.5) == pytest.approx(0.5)
    assert alpha_schedule(1.0) == pytest.approx(0.2)
    assert alpha_schedule(2.0) == pytest.approx(0.2)
    assert [critical_count(5, a) for a in (0.8, 0.5, 0.2, 0.05, 0.6)] == [4, 2, 1, 1, 3]
    assert critical_count(3, 1.0) == 3


def test_progressive_plan_with_everyone_critical_is_happos_order():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    ties = torch.Generator().manual_seed(0)
    plan = progressive([0.3, 2.0, 1.0, 0.1], 1.0, g1, ties)
    assert plan.critical == sequential(4, g2).critical
    assert plan.phases == [[i] for i in plan.critical]


def test_progressive_plan_splits_regular_and_critical_by_importance():
    g, ties = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plan = progressive([0.3, 2.0, 1.0, 0.1], 0.5, g, ties)
    assert plan.k == 2 and sorted(plan.critical) == [1, 2]
    assert plan.phases[0] == [0, 3] and [p[0] for p in plan.phases[1:]] == plan.critical


def _algo(name, env, seed=3, **cfg):
    cls = get_algorithm(name)
    run = quick_run(__import__("pathlib").Path("/tmp"), seed=seed, num_envs=env.num_envs, rollout_len=8, algo=name)
    torch.manual_seed(seed)
    return cls(env.spec, cls.Config(**cfg), run, torch.device("cpu"))


def _fill(algo, env, seed=0):
    obs = env.reset(seed=seed)
    for _ in range(algo.run.rollout_len):
        out = algo.act(obs)
        st = env.step(out.env_action)
        algo.observe(obs, out, st)
        obs = st.next


@pytest.mark.parametrize("env_id", ["mpe/simple_spread_v3", "mpe/simple_spread_v3?continuous=true"])
def test_alpha_one_equals_happo_exactly(env_id):
    env = make_env(env_id, num_envs=4, seed=0)
    happo = _algo("happo", env, critic="per_agent")  # the progressive update's critics are per agent (its spec)
    prog = _algo("progressive", env, alpha_init=1.0, alpha_final=1.0)
    prog.load_state_dict(copy.deepcopy(happo.state_dict()) | {"lagrange": 0.0,
                         "tie_generator": prog.tie_generator.get_state()})
    for algo in (happo, prog):
        _fill(algo, env)
    p = Progress(iteration=0, total_iterations=10, env_steps=0)
    m_h, m_p = happo.update(p), prog.update(p)
    assert m_h["sched/critical"] == m_p["sched/critical"]
    for a, b in zip(happo.actor.parameters(), prog.actor.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(happo.critic.parameters(), prog.critic.parameters()):
        assert torch.equal(a, b)
    env.close()


def test_factor_is_product_of_earlier_ratios_and_regular_phase_is_simultaneous():
    env = make_env("mpe/simple_spread_v3?N=4", num_envs=4, seed=0)
    algo = _algo("progressive", env, alpha_init=0.5, alpha_final=0.5)
    _fill(algo, env)
    seen = []
    real_step = algo.actor_step

    def spy(batch, agents, factor):
        seen.append((list(agents), factor.clone()))
        return real_step(batch, agents, factor)

    algo.actor_step = spy  # type: ignore[method-assign]
    captured = {}
    real_prepare = algo.prepare

    def keep(*a):
        captured["batch"] = real_prepare(*a)
        return captured["batch"]

    algo.prepare = keep  # type: ignore[method-assign]
    algo.update(Progress(0, 10, 0))
    batch = captured["batch"]
    assert len(seen[0][0]) == 2 and [len(a) for a, _ in seen[1:]] == [1, 1]  # regular phase, then 2 critical
    with torch.no_grad():  # every agent is final once its phase is over: its ratio now is the one it passed on
        log_r = {i: algo.log_ratio(batch, [i]) for i in range(4)}
    done: list[int] = []
    for agents, factor in seen:
        expected = torch.exp(sum((log_r[i] for i in done), torch.zeros_like(factor)))
        assert torch.allclose(factor, expected, rtol=1e-4, atol=1e-5)
        done += agents
    env.close()

    # Regular agents are simultaneous: the phase's result does not depend on the order they are listed in.
    env = make_env("mpe/simple_spread_v3?N=4", num_envs=4, seed=0)
    a1 = _algo("progressive", env, alpha_init=0.5, alpha_final=0.5)
    a2 = _algo("progressive", env, alpha_init=0.5, alpha_final=0.5)
    a2.load_state_dict(copy.deepcopy(a1.state_dict()))
    _fill(a1, env), _fill(a2, env)
    b1, b2 = a1.prepare(), a2.prepare()
    for b in (b1, b2):
        b.policy_adv = b.adv
    f = torch.ones(b1.size)
    a1.actor_step(b1, [0, 3], f)
    a2.actor_step(b2, [3, 0], f)
    for i in (0, 3):
        for x, y in zip(a1.actor.agent_parameters(i), a2.actor.agent_parameters(i)):
            assert torch.allclose(x, y, atol=1e-6)
    env.close()


def test_logs_schedule_keys(tmp_path):
    res = train(quick_run(tmp_path, algo="progressive", steps=3200, num_envs=4, rollout_len=100))
    import csv

    with open(res.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = rows[0].keys()
    for k in ("sched/alpha", "sched/k", "sched/critical", "sched/importance_0", "sched/factor_mean",
              "sched/factor_std", "sched/factor_min", "sched/factor_max", "cost/lambda", "loss/policy_0",
              "loss/value_2", "loss/entropy_1", "loss/kl_0", "loss/clipfrac_0"):
        assert k in keys, k
    assert float(rows[0]["sched/alpha"]) == pytest.approx(0.8)
    alphas = [float(r["sched/alpha"]) for r in rows]
    assert alphas == sorted(alphas, reverse=True) and float(rows[-1]["sched/alpha"]) < 0.8
    assert len(rows[0]["sched/critical"].split(";")) == int(rows[0]["sched/k"]) == 2


class _CostlyGame(MatrixGame):
    """Climbing-free 2-player game with a cost: action 0 pays more and costs 1 per step."""

    def __init__(self, num_envs):
        super().__init__(torch.tensor([[1.0, 0.8], [0.8, 0.6]]), num_envs, steps=4, scale=1.0)
        import dataclasses

        self.spec = dataclasses.replace(self.spec, has_cost=True)

    def step(self, actions):
        st = super().step(actions)
        cost = (torch.as_tensor(actions) == 0).float()
        return BatchStep(next=st.next, final=st.final, reward=st.reward, cost=cost, terminated=st.terminated,
                         truncated=st.truncated, episodes=self._with_cost(st.episodes, cost))

    def _with_cost(self, episodes, cost):
        self._acc = getattr(self, "_acc", torch.zeros(self.num_envs)) + cost.mean(-1)
        done = [i for i in range(self.num_envs) if int(self._t[i]) == 0]
        for e, i in zip(episodes, done):
            e.cost = float(self._acc[i])
            self._acc[i] = 0.0
        return episodes


def test_lagrangian_multiplier_rises_when_cost_exceeds_limit():
    env = _CostlyGame(8)
    algo = _algo("progressive", env, lambda_lr=0.1)
    algo.set_cost_limit(0.5)
    assert algo.cost_critic is not None
    lams = []
    for it in range(4):
        _fill(algo, env, seed=it)
        m = algo.update(Progress(it, 10, 0))
        lams.append(m["cost/lambda"])
        assert "loss/cost_0" in m
    # random play costs ~2 per 4-step episode > limit 0.5: lambda climbs by lambda_lr * (cost - limit)
    assert lams[0] > 0.0 and all(b > a for a, b in zip(lams, lams[1:]))
    # Safe-RL advantage: reward and cost advantages are standardised *separately*, then mixed with lambda
    # (OmniSafe's PPO-Lag), whatever their scales: a cost advantage 10^4 times smaller still counts.
    g = torch.Generator().manual_seed(0)
    B, N = 64, algo.n
    adv_r, adv_c = 100.0 * torch.randn(B, N, generator=g) + 7.0, 0.01 * torch.randn(B, N, generator=g) - 3.0
    mask = (torch.rand(B, N, generator=g) > 0.2).float()
    z = torch.zeros(B, N)
    batch = OnPolicyBatch(obs=z, state=z, action_mask=z, active=mask.bool(), action=z, logp=z, mask=mask,
                          value_old=z, ret=z, adv=adv_r, cost_adv=adv_c)
    lam = algo.lagrange = 0.7

    def standardised(x: torch.Tensor) -> torch.Tensor:  # over the active samples, per agent
        mean = (x * mask).sum(0) / mask.sum(0)
        std = (((x - mean) ** 2 * mask).sum(0) / mask.sum(0)).sqrt()
        return (x - mean) / (std + 1e-8)

    expected = (standardised(adv_r) - lam * standardised(adv_c)) / (1 + lam)
    assert torch.allclose(algo.policy_advantage(batch, Progress(0, 1, 0)), expected, atol=1e-5)
    # lambda keeps its meaning: at lambda = 1 a one-std cost advantage cancels a one-std reward advantage.
    algo.lagrange = 1.0
    mixed = algo.policy_advantage(batch, Progress(0, 1, 0))
    assert torch.allclose(mixed, (standardised(adv_r) - standardised(adv_c)) / 2, atol=1e-5)


@pytest.mark.parametrize("algo", ["happo", "progressive"])
def test_per_agent_sequential_updates_escape_the_homogeneity_trap(tmp_path, algo):
    res = train(quick_run(tmp_path, algo=algo, env="matrix/homogeneity_trap?n=4", steps=8192, num_envs=16,
                          rollout_len=16, eval_episodes=16))
    assert res.final_eval["eval/return_mean"] / 4 >= 0.9  # per-agent return (team return / n)


def test_shared_mappo_stays_near_its_ceiling_on_the_homogeneity_trap(tmp_path):
    from pamarl.algos.mappo import MAPPO

    res = train(quick_run(tmp_path, algo="mappo", env="matrix/homogeneity_trap?n=4", steps=8192, num_envs=16,
                          rollout_len=16, eval_episodes=16), MAPPO.Config(share_params=True))
    # Proposition 4: agents sharing one policy get at most 2 / 2^n = 0.125 in expectation
    assert res.last_return / 4 <= 2 / 2**4 + 0.05
    assert res.final_eval["eval/return_mean"] / 4 <= 2 / 2**4 + 0.05


@pytest.mark.parametrize("algo", ["happo", "progressive"])
def test_beats_random_on_simple_spread(tmp_path, algo):
    from test_training import random_team_return

    rand = random_team_return("mpe/simple_spread_v3")
    res = train(quick_run(tmp_path, algo=algo, steps=48_000, seed=1, eval_episodes=20))
    assert res.final_eval["eval/return_mean"] > rand + 10, (res.final_eval, rand)
