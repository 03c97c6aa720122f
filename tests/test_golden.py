"""Golden tests: one update of MAPPO, HAPPO, HATRPO, QMIX and IQL against the papers' equations.

For one update on a fixed small batch (fixed seeds, tiny networks, CPU, float64), the losses and the
parameter gradients pamarl computes must equal values computed here, independently, from the papers'
equations written out with plain torch ops on the networks' raw parameters. Nothing below calls
pamarl's loss functions, GAE, normaliser, mixer or network forward passes for a reference value; it
reads only pamarl's parameters and its normaliser's stored statistics (state, not maths).

pamarl's gradients are captured where they are used: ``clip_and_step`` (the one optimiser step both
families share) is replaced by a recorder that copies every ``p.grad`` before stepping (HAPPO, whose
later agents must see the earlier agents' *updated* policies) or instead of stepping (MAPPO, QMIX, IQL).

References: Yu et al. 2022 (MAPPO: clipped surrogate, value normalisation and value clipping, appendix);
Schulman et al. 2016 (GAE, eq. 16); Kuba et al. 2022 (HAPPO eq. 11; HATRPO step eq. 8);
Rashid et al. 2018 (QMIX eq. 5 and its TD loss); van Hasselt et al. 2016 (double Q-learning).

Every fixed batch is checked to exercise the branches the equations have (clipped and unclipped ratios,
clipped and unclipped values, both Huber branches, masked actions, inactive agents, terminations and
truncations, double-Q argmax differing from the target's), so that a changed sign or constant in
pamarl changes a compared number.

Length: one module for the five learners on purpose, since they share the plain-torch building blocks
(MLP, masked policies, GAE, ValueNorm, double Q) that make the references independent of pamarl.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import pamarl.algos.common as common
import pamarl.algos.onpolicy as onpolicy
from pamarl.algos.base import Progress
from pamarl.algos.registry import get_algorithm
from pamarl.algos.schedules import Plan
from pamarl.buffers.replay import TransitionBatch
from pamarl.buffers.rollout import Rollout
from pamarl.config import TrainConfig
from pamarl.envs.base import EnvSpec

CPU = torch.device("cpu")
PROGRESS = Progress(iteration=0, total_iterations=10, env_steps=0)
T, E = 6, 2  # rollout steps x env copies: B = 12 samples per agent
ATOL, RTOL = 1e-10, 1e-8
_REAL_CLIP_AND_STEP = common.clip_and_step

Tensor = torch.Tensor


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    """Build every network in float64 so that pamarl and the references agree to ~1e-12."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def close(a: Tensor | float, b: Tensor | float, what: str) -> None:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.allclose(a, b, atol=ATOL, rtol=RTOL), f"{what}: max |diff| {float((a - b).abs().max()):.3e}"


# ====================================================================== plain-torch building blocks
def layers_of(net: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(weight, bias) of every nn.Linear of an agent's MLP, in order."""
    return [(m.weight, m.bias) for m in net.modules() if isinstance(m, nn.Linear)]


def relu_mlp(layers: list[tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    """``W_L relu(... relu(W_1 x + b_1) ...) + b_L``."""
    for j, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if j < len(layers) - 1:
            x = torch.clamp_min(x, 0.0)
    return x


def masked_policy(logits: Tensor, allowed: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Categorical over the allowed actions: (log pi(a), entropy, log pi(.)) from raw logits."""
    logp_all = torch.log_softmax(logits.masked_fill(~allowed, -math.inf), -1)
    logp = logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all.masked_fill(~allowed, 0.0)).sum(-1)
    return logp, entropy, logp_all


def wmean(x: Tensor, w: Tensor) -> Tensor:
    """Weighted mean over the samples (dim 0)."""
    return (x * w).sum(0) / w.sum(0)


def huber(e: Tensor, delta: float) -> Tensor:
    """MAPPO's huber_loss: ``e^2 / 2`` where ``|e| <= delta``, else ``delta (|e| - delta / 2)``."""
    small = (e.abs() <= delta).to(e.dtype)
    return small * e.pow(2) / 2 + (1 - small) * delta * (e.abs() - delta / 2)


class RefValueNorm:
    """MAPPO's ValueNorm (Yu et al. 2022, appendix; on-policy repo ``valuenorm.py``), beta = 0.99999.

    Starts from the statistics pamarl's normaliser holds before the update (read, not recomputed).
    """

    def __init__(self, norm: Any, beta: float = 0.99999, eps: float = 1e-5):
        self.m = norm.running_mean.clone()
        self.sq = norm.running_mean_sq.clone()
        self.d = norm.debiasing_term.clone()
        self.beta, self.eps = beta, eps

    def stats(self) -> tuple[Tensor, Tensor]:
        d = torch.clamp_min(self.d, self.eps)
        mean = self.m / d
        return mean, torch.clamp_min(self.sq / d - mean**2, 1e-2)

    def update(self, x: Tensor, w: Tensor) -> None:
        b = self.beta
        self.m = b * self.m + (1 - b) * wmean(x, w)
        self.sq = b * self.sq + (1 - b) * wmean(x**2, w)
        self.d = b * self.d + (1 - b)

    def normalize(self, x: Tensor) -> Tensor:
        mean, var = self.stats()
        return (x - mean) / var.sqrt()

    def denormalize(self, x: Tensor) -> Tensor:
        mean, var = self.stats()
        return x * var.sqrt() + mean


def gae_eq16(r: Tensor, v: Tensor, v_next: Tensor, terminated: Tensor, done: Tensor, gamma: float,
             lam: float) -> Tensor:
    """Schulman et al. 2016, eq. 16 as a finite sum: ``A_t = sum_l (gamma lam)^l delta_{t+l}`` over the rest
    of the episode inside the rollout, ``delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t)``
    (a truncated step still bootstraps from its true successor)."""
    delta = r + gamma * (1 - terminated.to(r.dtype)).unsqueeze(-1) * v_next - v
    adv = torch.zeros_like(r)
    for t in range(r.shape[0]):
        for e in range(r.shape[1]):
            coef = 1.0
            for k in range(t, r.shape[0]):
                adv[t, e] += coef * delta[k, e]
                if done[k, e]:
                    break
                coef *= gamma * lam
    return adv


def standardised(adv: Tensor, w: Tensor) -> Tensor:
    """Per-agent ``(A - mean) / (std + 1e-8)`` over the active samples (population std)."""
    mean = wmean(adv, w)
    std = wmean((adv - mean) ** 2, w).sqrt()
    return (adv - mean) / (std + 1e-8)


class GradRecorder:
    """Stands in for ``clip_and_step``: records a copy of every gradient, then steps (or not)."""

    def __init__(self, step: bool):
        self.step = step
        self.calls: list[dict[int, Tensor]] = []

    def __call__(self, opt: torch.optim.Optimizer, params: Any, max_norm: float) -> Tensor:
        ps = list(params)
        self.calls.append({id(p): p.grad.detach().clone() for p in ps if p.grad is not None})
        if self.step:
            return _REAL_CLIP_AND_STEP(opt, ps, max_norm)
        return torch.zeros(())


def check_grads(recorded: dict[int, Tensor], params: list[nn.Parameter], expected: tuple[Tensor, ...],
                what: str) -> None:
    assert set(recorded) == {id(p) for p in params}, f"{what}: pamarl stepped other parameters"
    for j, (p, g) in enumerate(zip(params, expected)):
        close(recorded[id(p)], g, f"{what}, parameter {j}")


# ====================================================================== on-policy fixtures
def onpolicy_spec(n: int = 3, action_dims: tuple[int, ...] = (3, 2, 3), obs: int = 4, masks: bool = True,
                  continuous: bool = False) -> EnvSpec:
    """Heterogeneous agents: agent 1 has fewer actions (a padded, always forbidden id) or fewer dimensions."""
    bounds: dict[str, Any] = {}
    if continuous:
        bounds = {"action_low": tuple((-1.0,) * d for d in action_dims),
                  "action_high": tuple((1.0,) * d for d in action_dims)}
    return EnvSpec(agent_ids=tuple(f"a{i}" for i in range(n)), obs_dims=(obs,) * n, state_dim=5,
                   action_kind="continuous" if continuous else "discrete", action_dims=action_dims,
                   has_action_mask=masks and not continuous, episode_limit=T, **bounds)


def gaussian_policy(mean: Tensor, log_std: Tensor, action: Tensor, dims: int) -> tuple[Tensor, Tensor]:
    """Diagonal Gaussian over the agent's ``dims`` real dimensions (padding left out): (log pi(u), entropy)."""
    mean, log_std, u = mean[..., :dims], log_std[:dims], action[..., :dims]
    z = (u - mean) / log_std.exp()
    logp = (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    entropy = (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1).expand_as(logp)
    return logp, entropy


def agent_policy(actor: Any, i: int, obs: Tensor, allowed: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
    """Agent ``i``'s (log pi(a | o), entropy) from its raw weights: masked categorical or diagonal Gaussian."""
    out = relu_mlp(layers_of(actor.body.nets[i]), obs)
    if actor.discrete:
        logp, entropy, _ = masked_policy(out, allowed, action)
        return logp, entropy
    return gaussian_policy(out, actor.log_std[i], action, int(actor.dim_mask[i].sum()))


def onpolicy_algo(name: str, spec: EnvSpec, reward: str = "individual", **cfg: Any) -> Any:
    """A tiny on-policy learner; ``reward=individual`` keeps each agent's own reward in the batch (distinct
    columns), ``team`` gives every agent the sum, as the runner does under either convention."""
    torch.manual_seed(0)
    cls = get_algorithm(name)
    # Plain ReLU MLPs as in the papers' equations (HARL's LayerNorms, on by default, are pinned separately
    # in test_core_fixes.py): the references below rebuild the networks from their nn.Linear layers.
    conf = cls.Config(**{"hidden": (5,), "epochs": 1, "minibatches": 1, "critic_epochs": 1, "input_norm": False,
                         "layer_norm": False, **cfg})
    conf.validate()
    return cls(spec, conf, TrainConfig(algo=name, num_envs=E, rollout_len=T, seed=0, reward=reward), CPU)


def fill_rollout(algo: Any, seed: int = 0, masks: bool = True) -> tuple[Rollout, Tensor]:
    """A fixed rollout written straight into the buffer (float64; bypasses the float32 ``add``), and the
    collection-time values ``[T, E, N]`` (training units) of the critic as it is now.

    Actions and log-probabilities come from a *behaviour* policy (the current actor with perturbed
    weights), so that ratios are far from 1. The update evaluates the critic on the rollout in ``prepare``;
    right after that the critic is perturbed here, as if it had already moved, so that value changes are far
    from 0 at the first step and the value clip bites too. One termination and one truncation sit inside
    the rollout.
    """
    g = torch.Generator().manual_seed(seed)
    spec = algo.spec
    n, od, A, S = spec.n_agents, spec.obs_dim, spec.act_dim, spec.state_dim
    obs, state = torch.randn(T + 1, E, n, od, generator=g), torch.randn(T + 1, E, S, generator=g)
    allowed = torch.rand(T, E, n, A, generator=g) < 0.7 if masks else torch.ones(T, E, n, A, dtype=torch.bool)
    for i, d in enumerate(spec.action_dims):
        allowed[..., i, d:] = False
    allowed.scatter_(-1, torch.randint(0, min(spec.action_dims), (T, E, n, 1), generator=g), True)
    active = torch.rand(T, E, n, generator=g) > 0.15
    active[0] = True  # every agent has active samples
    with torch.no_grad():
        behaviour = copy.deepcopy(algo.actor)
        for p in behaviour.parameters():
            p.add_(0.8 * torch.randn(p.shape, generator=g))
        if spec.discrete:
            logits = torch.stack([relu_mlp(layers_of(behaviour.body.nets[i]), obs[:T, :, i]) for i in range(n)], 2)
            probs = torch.log_softmax(logits.masked_fill(~allowed, -math.inf), -1).exp()
            action = torch.multinomial(probs.reshape(-1, A), 1, generator=g).reshape(T, E, n)
        else:  # u = mu_b(o) + sigma_b * noise on every (also padded) dimension
            mean = torch.stack([relu_mlp(layers_of(behaviour.body.nets[i]), obs[:T, :, i]) for i in range(n)], 2)
            std = torch.stack([behaviour.log_std[i] for i in range(n)]).exp()
            action = mean + std * torch.randn(mean.shape, generator=g)
        logp = torch.stack([agent_policy(behaviour, i, obs[:T, :, i], allowed[:, :, i], action[:, :, i])[0]
                            for i in range(n)], 2)
        value = torch.stack([relu_mlp(layers_of(algo.critic.net.nets[head(algo, i)]), state[:T])[..., 0]
                             for i in range(n)], -1)
    terminated, truncated = torch.zeros(T, E, dtype=torch.bool), torch.zeros(T, E, dtype=torch.bool)
    terminated[2, 0] = True
    truncated[4, 1] = True
    done = terminated | truncated
    next_obs, next_state = obs[1:].clone(), state[1:].clone()
    next_obs[done] = torch.randn(int(done.sum()), n, od, generator=g)  # the true final observation
    next_state[done] = torch.randn(int(done.sum()), S, generator=g)
    reward = torch.randn(T, E, n, generator=g)
    if algo.team_rewards:  # what the runner hands the learners under reward=team: every agent gets the sum
        reward = reward.sum(-1, keepdim=True).expand(T, E, n).clone()
    rollout = Rollout(obs=obs[:T], state=state[:T], action_mask=allowed, active=active, action=action, logp=logp,
                      reward=reward, terminated=terminated, done=done, next_obs=next_obs, next_state=next_state)
    algo.buffer._data = rollout
    algo.buffer.t = T
    real_prepare = algo.prepare

    def prepare() -> Any:
        batch = real_prepare()
        with torch.no_grad():
            for p in algo.critic.net.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        return batch

    algo.prepare = prepare
    return rollout, value


def head(algo: Any, i: int) -> int:
    """The critic network that values agent ``i``: its own, or the one shared V(s) (``critic=shared``)."""
    return 0 if algo.critic.shared else i


def seed_value_norm(algo: Any) -> None:
    """Give the normaliser non-trivial statistics (mean ~ 2, std ~ 3) as after earlier iterations."""
    g = torch.Generator().manual_seed(7)
    if algo.critic.norm is not None:
        algo.critic.norm.update(2.0 + 3.0 * torch.randn(50, algo.critic.n_out, generator=g))


def ref_advantages(algo: Any, d: Rollout, value: Tensor, norm: RefValueNorm | None) -> dict[str, Tensor]:
    """GAE (eq. 16) from the collection-time values and the critic's values of the true successors, flattened
    to ``[B, N]``; the values are in training units and mapped back with the pre-update statistics."""
    cfg, n = algo.cfg, algo.n
    denorm = (lambda x: x) if norm is None else norm.denormalize
    with torch.no_grad():
        v = denorm(value)
        v_next = denorm(torch.stack(
            [relu_mlp(layers_of(algo.critic.net.nets[head(algo, i)]), d.next_state)[..., 0] for i in range(n)], -1))
    adv = gae_eq16(d.reward, v, v_next, d.terminated, d.done, cfg.gamma, cfg.gae_lambda)
    B = T * E
    w = d.active.reshape(B, n).to(adv.dtype)
    return {"adv": standardised(adv.reshape(B, n), w), "ret": (adv + v).reshape(B, n), "w": w,
            "obs": d.obs.reshape(B, n, -1), "state": d.state.reshape(B, -1),
            "allowed": d.action_mask.reshape(B, n, -1), "action": d.action.reshape(B, n, *d.action.shape[3:]),
            "logp_old": d.logp.reshape(B, n), "v_old": value.reshape(B, n)}


def ref_actor_loss(actor: Any, r: dict[str, Tensor], i: int, factor: Tensor, clip: float, ent_coef: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """HAPPO eq. 11 (MAPPO's surrogate when ``factor = 1``) for agent ``i``:
    ``-mean(M min(r A, clip(r, 1 - eps, 1 + eps) A)) - c_ent H``. Returns (loss, surrogate term, entropy, r)."""
    logp, ent = agent_policy(actor, i, r["obs"][:, i], r["allowed"][:, i], r["action"][:, i])
    ratio = torch.exp(logp - r["logp_old"][:, i])
    a = r["adv"][:, i]
    obj = factor * torch.min(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
    w = r["w"][:, i]
    pol, h = -wmean(obj, w), wmean(ent, w)
    return pol - ent_coef * h, pol, h, ratio


# ====================================================================== 1. MAPPO
# per_agent: one V_i(s) per agent on its own reward; shared: HARL's one V(s) on the team reward, a sample
# counting where any agent is active. Value normalisation with statistics from earlier iterations, fresh
# (the first update of a run: the variance floor and the debiasing clamp act), or switched off.
@pytest.mark.parametrize(("critic", "value_norm", "continuous"), [
    ("per_agent", "seeded", False), ("shared", "seeded", False), ("per_agent", "fresh", False),
    ("per_agent", "off", False), ("per_agent", "seeded", True)])
def test_mappo_losses_and_gradients_match_the_paper(monkeypatch: pytest.MonkeyPatch, critic: str,
                                                    value_norm: str, continuous: bool) -> None:
    spec = onpolicy_spec(action_dims=(2, 1, 2), continuous=True) if continuous else onpolicy_spec()
    algo = onpolicy_algo("mappo", spec, reward="team" if critic == "shared" else "individual", entropy_coef=0.05,
                         clip=0.2, value_clip=0.2, huber_delta=1.0, gamma=0.9, critic=critic,
                         value_norm=value_norm != "off")
    if value_norm == "seeded":
        seed_value_norm(algo)
    d, value = fill_rollout(algo)
    norm = RefValueNorm(algo.critic.norm) if value_norm != "off" else None
    r = ref_advantages(algo, d, value, norm)
    actor_params = [algo.actor.agent_parameters(i) for i in range(algo.n)]
    heads = sorted({head(algo, i) for i in range(algo.n)})
    critic_params = [list(algo.critic.net.nets[h].parameters()) for h in heads]

    rec = GradRecorder(step=False)
    monkeypatch.setattr(onpolicy, "clip_and_step", rec)
    metrics = algo.update(PROGRESS)
    assert len(rec.calls) == algo.n + len(heads)  # n actor steps, then one step per critic network

    cfg = algo.cfg
    # Critic targets: ValueNorm updated with this batch's returns, then the returns normalised with it.
    # A shared V(s) has one column (every agent's return is the team's) weighted where any agent is active.
    ret, vw = (r["ret"][:, :1], r["w"].amax(-1, keepdim=True)) if algo.critic.shared else (r["ret"], r["w"])
    if norm is not None:
        norm.update(ret, vw)
    target = ret if norm is None else norm.normalize(ret)
    branches = {"ratio_clipped": False, "ratio_free": False, "value_clipped": False, "value_free": False,
                "huber_linear": False, "huber_quadratic": False}
    for i in range(algo.n):
        loss, pol, ent, ratio = ref_actor_loss(algo.actor, r, i, torch.ones(T * E), cfg.clip, cfg.entropy_coef)
        close(metrics[f"loss/policy_{i}"], pol.detach(), f"MAPPO policy loss of agent {i}")
        close(metrics[f"loss/entropy_{i}"], ent.detach(), f"MAPPO entropy of agent {i}")
        check_grads(rec.calls[i], actor_params[i], torch.autograd.grad(loss, actor_params[i]),
                    f"MAPPO actor gradient of agent {i}")
        active = r["w"][:, i] > 0
        outside = ((ratio - 1).abs() > cfg.clip) & active
        branches["ratio_clipped"] |= bool((outside & (r["adv"][:, i] * (ratio - 1) > 0)).any())
        branches["ratio_free"] |= bool((~outside & active).any())
    # Value loss (MAPPO appendix): the max of the Huber errors of the new and of the clipped prediction,
    # clipped around the collection-time prediction in the same (normalised) units.
    for h in heads:
        active = vw[:, h] > 0
        new = relu_mlp(layers_of(algo.critic.net.nets[h]), r["state"])[:, 0]
        old = r["v_old"][:, h]
        clipped = old + torch.clamp(new - old, -cfg.value_clip, cfg.value_clip)
        e_new, e_clip = target[:, h] - new, target[:, h] - clipped
        per_sample = torch.max(huber(e_new, cfg.huber_delta), huber(e_clip, cfg.huber_delta))
        vloss = wmean(per_sample, vw[:, h])
        for i in range(algo.n) if algo.critic.shared else [h]:
            close(metrics[f"loss/value_{i}"], vloss.detach(), f"MAPPO value loss of agent {i}")
        check_grads(rec.calls[algo.n + h], critic_params[h], torch.autograd.grad(vloss, critic_params[h]),
                    f"MAPPO critic gradient of network {h}")
        picks_clipped = (huber(e_clip, cfg.huber_delta) > huber(e_new, cfg.huber_delta)) & active
        branches["value_clipped"] |= bool(picks_clipped.any())
        branches["value_free"] |= bool((~picks_clipped & active).any())
        branches["huber_linear"] |= bool(((e_new.abs() > cfg.huber_delta) & active).any())
        branches["huber_quadratic"] |= bool(((e_new.abs() <= cfg.huber_delta) & active).any())
    if norm is not None:
        close(algo.critic.norm.running_mean, norm.m, "ValueNorm running mean")
        close(algo.critic.norm.running_mean_sq, norm.sq, "ValueNorm running mean of squares")
    missing = [k for k, hit in branches.items() if not hit]
    assert not missing, f"the fixed batch does not exercise {missing}: the comparison would be vacuous there"


# ====================================================================== 2. HAPPO
@pytest.mark.parametrize("continuous", [False, True])
def test_happo_factor_and_sequential_gradients_match_eq_11(monkeypatch: pytest.MonkeyPatch, continuous: bool) -> None:
    spec = onpolicy_spec(action_dims=(2, 1, 2), continuous=True) if continuous else onpolicy_spec()
    algo = onpolicy_algo("happo", spec, entropy_coef=0.05, clip=0.2, lr=0.05, critic_epochs=0, gamma=0.9)
    seed_value_norm(algo)
    d, value = fill_rollout(algo, seed=1)
    r = ref_advantages(algo, d, value, RefValueNorm(algo.critic.norm))
    order = [2, 0, 1]
    monkeypatch.setattr(algo, "plan", lambda batch, progress: Plan(phases=[[i] for i in order], critical=order))
    factors: list[Tensor] = []
    step_rule: Callable[..., dict[str, float]] = algo.actor_step

    def spy(batch: Any, agents: list[int], factor: Tensor) -> dict[str, float]:
        factors.append(factor.detach().clone())
        return step_rule(batch, agents, factor)

    monkeypatch.setattr(algo, "actor_step", spy)
    before = copy.deepcopy(algo.actor)
    rec = GradRecorder(step=True)  # later agents must see the earlier agents' updated policies
    monkeypatch.setattr(onpolicy, "clip_and_step", rec)
    metrics = algo.update(PROGRESS)
    assert len(rec.calls) == len(order) == len(factors)

    cfg = algo.cfg
    M = torch.ones(T * E)
    for m, i in enumerate(order):
        close(factors[m], M, f"HAPPO factor of the agent updated {m + 1}th")
        # The agent's loss at its own pre-update parameters, weighted by M (eq. 11).
        loss, pol, _, ratio = ref_actor_loss(before, r, i, M, cfg.clip, cfg.entropy_coef)
        close(metrics[f"loss/policy_{i}"], pol.detach(), f"HAPPO policy loss of agent {i}")
        grads = torch.autograd.grad(loss, before.agent_parameters(i))
        check_grads(rec.calls[m], algo.actor.agent_parameters(i), grads, f"HAPPO gradient of agent {i} (phase {m})")
        # M of the next agents: times this agent's ratio after its update (inactive samples: ratio 1).
        with torch.no_grad():
            logp_new = agent_policy(algo.actor, i, r["obs"][:, i], r["allowed"][:, i], r["action"][:, i])[0]
            M = M * torch.exp((logp_new - r["logp_old"][:, i]) * r["w"][:, i])
        assert not torch.allclose(ratio.detach(), torch.exp(logp_new - r["logp_old"][:, i])), \
            f"agent {i} did not move: the factor of the next agents would not depend on its update"
    assert float((factors[1] - 1).abs().max()) > 0.05 and float((factors[2] - factors[1]).abs().max()) > 0.05


# ====================================================================== 3. HATRPO
# HARL's defaults take the full step; a larger delta with a stricter acceptance makes one agent backtrack.
@pytest.mark.parametrize(("delta", "accept_ratio"), [(0.01, 0.5), (0.1, 0.9)])
def test_hatrpo_step_matches_eq_8_with_the_exact_kl_hessian(monkeypatch: pytest.MonkeyPatch, delta: float,
                                                           accept_ratio: float) -> None:
    spec = onpolicy_spec(n=2, action_dims=(3, 3), obs=2, masks=False)  # a tiny policy: 27 parameters
    algo = onpolicy_algo("hatrpo", spec, hidden=(4,), critic_epochs=0, kl_threshold=delta, damping=0.1,
                         accept_ratio=accept_ratio, cg_iters=60, cg_residual_tol=1e-28, gamma=0.9)
    d, value = fill_rollout(algo, seed=3, masks=False)
    r = ref_advantages(algo, d, value, RefValueNorm(algo.critic.norm))
    order = [1, 0]
    monkeypatch.setattr(algo, "plan", lambda batch, progress: Plan(phases=[[i] for i in order], critical=order))
    steps: list[dict[str, Any]] = []
    real_step = algo.trust_region_step

    def spy(batch: Any, i: int, factor: Tensor) -> dict[str, float]:
        theta0 = torch.cat([p.detach().reshape(-1) for p in algo.actor.agent_parameters(i)]).clone()
        out = real_step(batch, i, factor)
        theta1 = torch.cat([p.detach().reshape(-1) for p in algo.actor.agent_parameters(i)]).clone()
        steps.append({"i": i, "factor": factor.clone(), "theta0": theta0, "theta1": theta1, "out": out})
        return out

    monkeypatch.setattr(algo, "trust_region_step", spy)
    algo.update(PROGRESS)
    assert [s["i"] for s in steps] == order

    cfg = algo.cfg
    M = torch.ones(T * E)
    accepted, backtracked = 0, False
    for s in steps:
        i = s["i"]
        close(s["factor"], M, f"HATRPO factor of agent {i}")
        shapes = [p.shape for p in algo.actor.agent_parameters(i)]
        obs, allowed, action = r["obs"][:, i], r["allowed"][:, i], r["action"][:, i]
        w, adv, logp_old = r["w"][:, i], r["adv"][:, i], r["logp_old"][:, i]

        def log_policy(theta: Tensor, shapes: list[torch.Size] = shapes, obs: Tensor = obs,
                       allowed: Tensor = allowed, action: Tensor = action) -> tuple[Tensor, Tensor]:
            parts, k = [], 0
            for shp in shapes:
                parts.append(theta[k:k + shp.numel()].view(shp))
                k += shp.numel()
            logits = relu_mlp(list(zip(parts[0::2], parts[1::2])), obs)
            logp, _, logp_all = masked_policy(logits, allowed, action)
            return logp, logp_all

        theta0 = s["theta0"]
        p_old = log_policy(theta0)[1].detach().exp()

        def surrogate(theta: Tensor, w: Tensor = w, adv: Tensor = adv, logp_old: Tensor = logp_old,
                      m_: Tensor = M) -> Tensor:  # eq. 7/10 without its constant -1: E[M r A]
            return wmean(m_ * torch.exp(log_policy(theta)[0] - logp_old) * adv, w)

        def mean_kl(theta: Tensor, w: Tensor = w, p_old: Tensor = p_old) -> Tensor:  # E_s[KL(pi_old || pi)]
            return wmean((p_old * (p_old.log() - log_policy(theta)[1])).sum(-1), w)

        g = torch.autograd.functional.jacobian(surrogate, theta0)
        H = torch.autograd.functional.hessian(mean_kl, theta0)
        Hd = H + cfg.damping * torch.eye(len(theta0))  # damped as in HARL (and TRPO's code), for x and x^T H x
        x = torch.linalg.solve(Hd, g)
        full = math.sqrt(2 * cfg.kl_threshold / float(x @ Hd @ x)) * x
        # Backtracking line search: the first coefficient inside the trust region with a real improvement
        # of at least accept_ratio of the linear prediction.
        frac = 0.0
        base = float(surrogate(theta0))
        for j in range(cfg.ls_steps):
            c = cfg.backtrack_coeff**j
            gain = float(surrogate(theta0 + c * full)) - base
            if float(mean_kl(theta0 + c * full)) <= cfg.kl_threshold and gain > 0 and gain > cfg.accept_ratio * float(
                    g @ full) * c:
                frac = c
                break
        out = s["out"]
        assert out["ls_frac"] == pytest.approx(frac, abs=1e-12), f"agent {i}: accepted fraction"
        assert out["step_size"] == pytest.approx(math.sqrt(2 * cfg.kl_threshold / float(x @ Hd @ x)), rel=1e-7)
        step = s["theta1"] - theta0
        assert torch.allclose(step, frac * full, atol=1e-9, rtol=1e-6), \
            f"agent {i}: step differs from eq. 8 by {float((step - frac * full).abs().max()):.3e}"
        accepted += frac > 0
        backtracked |= 0 < frac < 1
        # What pamarl reports at the accepted step: the KL(old || new) of eq. 7's constraint and the surrogate.
        assert out["kl"] == pytest.approx(float(mean_kl(s["theta1"])), rel=1e-7, abs=1e-12), f"agent {i}: KL"
        assert out["policy"] == pytest.approx(-float(surrogate(s["theta1"])), rel=1e-7, abs=1e-12)
        with torch.no_grad():
            M = M * torch.exp((log_policy(s["theta1"])[0] - logp_old) * w)
    assert accepted == len(order), "every agent's step should be accepted on this batch (else nothing is compared)"
    assert backtracked == (accept_ratio > 0.5), "the second case must backtrack (the line search is compared)"


# ====================================================================== off-policy fixtures
def offpolicy_algo(name: str, share_params: bool = False, **cfg: Any) -> Any:
    spec = EnvSpec(agent_ids=("a0", "a1", "a2"), obs_dims=(4, 4, 4), state_dim=5, action_kind="discrete",
                   action_dims=(3, 3, 3), has_action_mask=True, episode_limit=10)
    torch.manual_seed(0)
    cls = get_algorithm(name)
    conf = cls.Config(hidden=(5,), gamma=0.9, share_params=share_params, agent_id=share_params, **cfg)
    conf.validate()
    # reward=individual: the batch holds each agent's own reward, as the runner leaves them under that convention.
    algo = cls(spec, conf, TrainConfig(algo=name, num_envs=2, seed=3, reward="individual"), CPU)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # targets that lag the online networks (as after some soft updates)
        for net in [algo.target_qnet] + ([algo.target_mixer] if algo.target_mixer is not None else []):
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return algo


def transitions(B: int = 10, n: int = 3, A: int = 3, seed: int = 0) -> TransitionBatch:
    g = torch.Generator().manual_seed(seed)
    next_allowed = torch.rand(B, n, A, generator=g) < 0.6
    next_allowed.scatter_(-1, torch.randint(0, A, (B, n, 1), generator=g), True)
    active, next_active = torch.rand(B, n, generator=g) > 0.2, torch.rand(B, n, generator=g) > 0.2
    terminated = torch.zeros(B)
    terminated[[1, 4]] = 1.0
    return TransitionBatch(
        obs=torch.randn(B, n, 4, generator=g), state=torch.randn(B, 5, generator=g),
        action_mask=torch.ones(B, n, A, dtype=torch.bool), active=active,
        action=torch.randint(0, A, (B, n), generator=g), reward=torch.randn(B, n, generator=g), terminated=terminated,
        next_obs=torch.randn(B, n, 4, generator=g), next_state=torch.randn(B, 5, generator=g),
        next_action_mask=next_allowed, next_active=next_active, discount=torch.full((B,), 0.9))


def agent_q(qnet: Any, obs: Tensor) -> Tensor:
    """``Q_i(o_i, .)`` of every agent ``[B, N, A]`` from the raw weights (one-hot id appended when shared)."""
    n = obs.shape[1]
    nets = qnet.mlp.nets
    if len(nets) == 1:
        x = torch.cat([obs, torch.eye(n).expand(obs.shape[0], n, n)], -1)
        return relu_mlp(layers_of(nets[0]), x)
    return torch.stack([relu_mlp(layers_of(nets[i]), obs[:, i]) for i in range(n)], 1)


def double_q(online_next: Tensor, target_next: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """van Hasselt et al. 2016: ``Q^-(o', argmax_{a allowed} Q(o', a))``; also returns whether the target's
    own argmax differs (the batch must contain such cases)."""
    a_star = online_next.masked_fill(~allowed, -math.inf).argmax(-1, keepdim=True)
    a_target = target_next.masked_fill(~allowed, -math.inf).argmax(-1, keepdim=True)
    return target_next.gather(-1, a_star).squeeze(-1), a_star != a_target


def capture_offpolicy_step(monkeypatch: pytest.MonkeyPatch, algo: Any, batch: TransitionBatch
                           ) -> tuple[dict[str, Tensor], dict[int, Tensor]]:
    rec = GradRecorder(step=False)
    monkeypatch.setattr(common, "clip_and_step", rec)
    metrics = algo.train_step(batch)
    assert len(rec.calls) == 1
    return metrics, rec.calls[0]


# ====================================================================== 4. QMIX
def hyper(net: nn.Module, s: Tensor) -> Tensor:
    """A hypernetwork's output: a linear map of the state, or linear-relu-linear."""
    return relu_mlp(layers_of(net), s)


def elu(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.expm1(torch.clamp_max(x, 0.0)))


def qmix_eq5(mixer: Any, q: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Rashid et al. 2018, eq. 5: ``Q_tot = |W2(s)|^T elu(|W1(s)|^T Q + b1(s)) + V(s)``; also the mixing
    layer's pre-activation (the batch must reach elu's negative branch)."""
    B, n = q.shape
    w1 = hyper(mixer.hyper_w1, s).abs().view(B, n, -1)
    pre = torch.einsum("bn,bne->be", q, w1) + hyper(mixer.hyper_b1, s)
    w2 = hyper(mixer.hyper_w2, s).abs()
    return (elu(pre) * w2).sum(-1) + hyper(mixer.hyper_b2, s)[:, 0], pre


@pytest.mark.parametrize("hypernet_layers", [1, 2])
def test_qmix_td_loss_and_gradients_match_eq_5(monkeypatch: pytest.MonkeyPatch, hypernet_layers: int) -> None:
    algo = offpolicy_algo("qmix", mixing_embed=4, hypernet_layers=hypernet_layers, hypernet_embed=6)
    b = transitions(seed=hypernet_layers)
    metrics, grads = capture_offpolicy_step(monkeypatch, algo, b)

    q = agent_q(algo.qnet, b.obs).gather(-1, b.action.unsqueeze(-1)).squeeze(-1)
    q_tot, pre = qmix_eq5(algo.mixer, q * b.active, b.state)  # an inactive agent enters with utility 0
    with torch.no_grad():
        q_next, differs = double_q(agent_q(algo.qnet, b.next_obs), agent_q(algo.target_qnet, b.next_obs),
                                   b.next_action_mask)
        q_tot_next, _ = qmix_eq5(algo.target_mixer, q_next * b.next_active, b.next_state)
        y = b.reward.sum(-1) + 0.9 * (1 - b.terminated) * q_tot_next  # team reward: the sum of the agents'
    loss = ((q_tot - y) ** 2).mean()
    close(metrics["loss/td"], loss.detach(), "QMIX TD loss")
    params = list(algo.qnet.parameters()) + list(algo.mixer.parameters())
    check_grads(grads, params, torch.autograd.grad(loss, params), "QMIX gradient (agents and mixer)")
    assert bool(differs.any()), "double Q must pick an action the target's own argmax does not"
    assert bool((pre < 0).any()) and bool((pre > 0).any()), "the batch must reach both branches of elu"
    assert bool((~b.active).any()) and bool((~b.next_active).any())


# ====================================================================== 5. IQL
@pytest.mark.parametrize("share_params", [False, True])
def test_iql_per_agent_dqn_loss_and_gradients(monkeypatch: pytest.MonkeyPatch, share_params: bool) -> None:
    algo = offpolicy_algo("iql", share_params=share_params)
    b = transitions(seed=5)
    metrics, grads = capture_offpolicy_step(monkeypatch, algo, b)

    q = agent_q(algo.qnet, b.obs).gather(-1, b.action.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        q_next, differs = double_q(agent_q(algo.qnet, b.next_obs), agent_q(algo.target_qnet, b.next_obs),
                                   b.next_action_mask)
        # Each agent's own DQN target; an agent gone at the successor has nothing to bootstrap from.
        y = b.reward + 0.9 * (1 - b.terminated).unsqueeze(-1) * q_next * b.next_active
    w = b.active.to(q.dtype)  # inactive agents contribute no TD error
    loss = (w * (q - y) ** 2).sum() / w.sum()
    close(metrics["loss/td"], loss.detach(), "IQL TD loss")
    params = list(algo.qnet.parameters())
    check_grads(grads, params, torch.autograd.grad(loss, params), "IQL gradient")
    assert bool(differs.any()) and bool((~b.active).any()) and bool((~b.next_active).any())
