"""Hand-written forward/backward of stacked relu MLPs (:mod:`pamarl.nets.manual`) against autograd.

The off-policy learners that use it (MADDPG, HADDPG, HATD3) must compute the same losses, gradients and
parameter updates as with autograd (up to float rounding), for all-agent steps and HA's one-agent steps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pamarl.algos.registry import get_algorithm
from pamarl.buffers.replay import TransitionBatch
from pamarl.config import TrainConfig
from pamarl.envs.base import EnvSpec
from pamarl.nets import manual
from pamarl.nets.mixers import QMixer
from pamarl.nets.mlp import AgentMLP

TOL = {"rtol": 1e-4, "atol": 1e-5}


def net(shared: bool = False, agent_id: bool = False, hidden: tuple[int, ...] = (16, 16)) -> AgentMLP:
    torch.manual_seed(0)
    return AgentMLP(3, 7, 4, hidden, shared=shared, agent_id=agent_id, stacked=True)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("agents", [None, [1], [0, 2], [2, 0]])
@pytest.mark.parametrize("hidden", [(16, 16), ()])
def test_forward_and_backward_match_autograd(shared: bool, agents: list[int] | None,
                                             hidden: tuple[int, ...]) -> None:
    m = net(shared, agent_id=shared, hidden=hidden)
    assert manual.supports(m)
    k = 3 if agents is None else len(agents)
    x = torch.randn(32, k, 7)
    g = torch.randn(32, k, 4)
    xa = x.clone().requires_grad_(True)
    ya = m(xa, agents)
    ya.backward(g)
    auto = [None if p.grad is None else p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    yb, tape = manual.forward(m, x, agents)
    torch.testing.assert_close(yb, ya.detach(), **TOL)
    dx = manual.backward(tape, g, input_grad=True)
    assert dx is not None
    torch.testing.assert_close(dx, xa.grad, **TOL)
    for (name, p), a in zip(m.named_parameters(), auto):
        assert (p.grad is None) == (a is None), name  # networks that did not run get no gradient in either
        if a is not None:
            torch.testing.assert_close(p.grad, a, **TOL, msg=name)


def test_backward_accumulates_and_skips_frozen_parameters() -> None:
    m = net()
    x1, x2 = torch.randn(8, 3, 7), torch.randn(8, 1, 7)
    m(x1).sum().backward()
    m(x2, [2]).pow(2).sum().backward()
    auto = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    y1, t1 = manual.forward(m, x1)
    manual.backward(t1, torch.ones_like(y1))
    y2, t2 = manual.forward(m, x2, [2])
    manual.backward(t2, 2 * y2)
    for p, a in zip(m.parameters(), auto):
        torch.testing.assert_close(p.grad, a, **TOL)
    m.zero_grad(set_to_none=True)
    for p in m.parameters():
        p.requires_grad_(False)
    y, t = manual.forward(m, x1)
    manual.backward(t, torch.ones_like(y))
    assert all(p.grad is None for p in m.parameters())


def test_only_relu_stacked_networks_qualify() -> None:
    assert not manual.supports(AgentMLP(2, 3, 1, (8,), stacked=False))
    assert not manual.supports(AgentMLP(2, 3, 1, (8,), activation="tanh", stacked=True))


# ---------------------------------------------------------------------- the learners
def spec(discrete: bool, n: int = 3) -> EnvSpec:
    kw: dict[str, Any] = {}
    if not discrete:
        kw = {"action_low": ((0.0,) * 3,) * n, "action_high": ((2.0,) * 3,) * n}
    return EnvSpec(agent_ids=tuple(f"a{i}" for i in range(n)), obs_dims=(5,) * n, state_dim=6,
                   action_kind="discrete" if discrete else "continuous", action_dims=(3,) * n, episode_limit=5, **kw)


def batch(sp: EnvSpec, B: int, seed: int) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    n, A = sp.n_agents, sp.act_dim
    action = (torch.randint(0, A, (B, n), generator=g) if sp.discrete
              else torch.rand(B, n, A, generator=g) * 2 - 1)
    active = torch.rand(B, n, generator=g) < 0.8  # some inactive agents: the masks must match too
    mask = torch.rand(B, n, A, generator=g) < 0.7  # forbidden actions, and rows with none allowed
    return TransitionBatch(
        obs=torch.randn(B, n, sp.obs_dim, generator=g), state=torch.randn(B, sp.state_dim, generator=g),
        action_mask=mask, active=active, action=action,
        reward=torch.randn(B, n, generator=g), terminated=(torch.rand(B, generator=g) < 0.3).float(),
        next_obs=torch.randn(B, n, sp.obs_dim, generator=g), next_state=torch.randn(B, sp.state_dim, generator=g),
        next_action_mask=torch.ones(B, n, A, dtype=torch.bool), next_active=torch.ones(B, n, dtype=torch.bool),
        discount=torch.full((B,), 0.9))


def make(name: str, sp: EnvSpec, manual_grads: bool, **cfg: Any) -> Any:
    cls = get_algorithm(name)
    torch.manual_seed(0)  # the networks' initialisation
    if name in ("maddpg", "haddpg", "hatd3"):
        cfg["critic_hidden"] = (16, 16)
    algo = cls(sp, cls.Config(hidden=(16, 16), **cfg), TrainConfig(algo=name, num_envs=2, seed=3),
               torch.device("cpu"))
    assert algo.manual_grads  # relu MLPs: the manual path is the default
    algo.manual_grads = manual_grads
    if isinstance(getattr(algo, "mixer", None), QMixer):
        algo.mixer.manual = manual_grads
    return algo


CASES = [("maddpg", True, {"gumbel_tau": 0.7, "actor_reg": 0.05}), ("maddpg", False, {}),
         ("maddpg", True, {"share_params": True}),
         ("maddpg", True, {"share_params": True, "share_critic": True}), ("haddpg", False, {}),
         ("hatd3", False, {"policy_delay": 2}), ("hatd3", False, {"share_params": True, "policy_delay": 1}),
         ("qmix", True, {}), ("qmix", True, {"share_params": True}),
         ("qmix", True, {"double_q": False}), ("vdn", True, {}), ("iql", True, {"huber_delta": 0.5})]


@pytest.mark.parametrize("name,discrete,cfg", CASES)
def test_learner_steps_match_autograd(name: str, discrete: bool, cfg: dict[str, Any]) -> None:
    """Same losses, gradients, parameters and Adam moments after every step, over a few gradient steps
    (HATD3's second step runs the delayed sequential actor step, one agent at a time; the value-based
    learners take their agents' MLPs by hand and the mixer on autograd)."""
    sp = spec(discrete)
    algos = [make(name, sp, flag, **cfg) for flag in (False, True)]
    for a, b in zip(algos[0].state_dict()["nets"].values(), algos[1].state_dict()["nets"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for step in range(4):
        metrics = []
        for algo in algos:
            metrics.append(algo.train_step(batch(sp, 32, step)))
            algo.updates += 1
            if algo.sync_every_step:
                algo.sync_targets()
        assert metrics[0].keys() == metrics[1].keys()
        for k, v in metrics[0].items():
            torch.testing.assert_close(metrics[1][k], v, **TOL, msg=k)
        for key in ("actor", "critic", "qnet", "mixer"):
            if key not in algos[0].nets:
                continue
            for (pn, p), q in zip(algos[0].nets[key].named_parameters(), algos[1].nets[key].parameters()):
                torch.testing.assert_close(q, p, **TOL, msg=f"step {step}: {key}.{pn}")
                assert (p.grad is None) == (q.grad is None), pn
                if p.grad is not None:
                    torch.testing.assert_close(q.grad, p.grad, **TOL, msg=f"step {step}: grad {key}.{pn}")
    assert "loss/actor" in metrics[0] or "loss/td" in metrics[0]
    for oa, ob in zip(algos[0].opts.values(), algos[1].opts.values()):
        for sa, sb in zip(oa.state.values(), ob.state.values()):
            for k in sa:
                torch.testing.assert_close(sb[k], sa[k], **TOL)


@pytest.mark.parametrize("shared", [False, True])
def test_input_columns(shared: bool) -> None:
    """``input_cols`` gives the chosen columns of the full input gradient, per network."""
    m = net(shared, agent_id=shared)
    x, g = torch.randn(16, 3, 7), torch.randn(16, 3, 4)
    y, tape = manual.forward(m, x)
    full = manual.backward(tape, g, input_grad=True, param_grad=False)
    cols = torch.tensor([[0, 1], [2, 3], [5, 6]])
    part = manual.backward(tape, g, input_grad=True, param_grad=False, input_cols=cols)
    assert full is not None and part is not None
    torch.testing.assert_close(part, torch.stack([full[:, i, cols[i]] for i in range(3)], 1))
    assert all(p.grad is None for p in m.parameters())


def test_recurrent_agents_stay_on_autograd() -> None:
    cls = get_algorithm("qmix")
    algo = cls(spec(True), cls.Config(rnn=True), TrainConfig(algo="qmix", num_envs=2, seed=3), torch.device("cpu"))
    assert not algo.manual_grads


@pytest.mark.parametrize("layers", [1, 2])
def test_qmixer_manual_backward_matches_autograd(layers: int) -> None:
    torch.manual_seed(0)
    mixer = QMixer(3, 6, embed_dim=8, hypernet_layers=layers, hypernet_embed=10)
    with torch.no_grad():  # weights of both signs (abs's two branches) and pre-activations of both (elu's)
        for p in mixer.parameters():
            p.normal_()
    qs, state = torch.randn(5, 4, 3), torch.randn(5, 4, 6)
    g = torch.randn(5, 4)
    results = []
    for flag in (False, True):
        mixer.manual = flag
        mixer.zero_grad(set_to_none=True)
        q = qs.clone().requires_grad_(True)
        out = mixer(q, state)
        out.backward(g)
        results.append((out.detach(), q.grad, [p.grad.clone() for p in mixer.parameters()]))
    (oa, qa, pa), (ob, qb, pb) = results
    torch.testing.assert_close(ob, oa, **TOL)
    torch.testing.assert_close(qb, qa, **TOL)
    for (name, _), a, b in zip(mixer.named_parameters(), pa, pb):
        torch.testing.assert_close(b, a, **TOL, msg=name)
