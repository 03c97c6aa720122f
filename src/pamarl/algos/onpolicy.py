"""The on-policy family's shared machinery: actors, critics, GAE, a schedule of phases, a step rule.

An on-policy algorithm here is (a schedule, a per-agent step rule, the critics it trains)
(``../shared/DESIGN.md``). :class:`OnPolicyAlgorithm` collects rollouts, computes per-agent GAE,
asks :meth:`plan` for the phases (:mod:`pamarl.algos.schedules`), runs them with
:meth:`actor_step` (PPO's clipped surrogate by default, weighted by the factor handed in by the
schedule) and then fits every agent's critic. Subclasses override only what makes them themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pamarl.algos.base import ActOut, Algorithm, LearnerConfig, Metrics, Progress
from pamarl.algos.schedules import Plan, factor_stats, run_schedule, simultaneous
from pamarl.buffers.rollout import RolloutBuffer, ValueNorm, flatten_rollout, gae
from pamarl.config import TrainConfig
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import TrainingError, UsageError
from pamarl.nets.mlp import AgentMLP
from pamarl.nets.policy import Actor


@dataclass
class OnPolicyConfig(LearnerConfig):
    """Hyperparameters shared by the on-policy family (defaults follow HARL's MPE settings)."""

    critic_lr: float = 5e-4
    """Critic learning rate (Adam)."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    epochs: int = 5
    """Passes over the batch per actor phase."""
    critic_epochs: int = 5
    """Passes over the batch for the critics."""
    minibatches: int = 1
    """Minibatches per pass."""
    clip: float = 0.2
    """PPO ratio clip epsilon."""
    entropy_coef: float = 0.01
    """Entropy bonus weight."""
    value_clip: float = 0.2
    """Value clipping range around the old prediction (0 disables)."""
    huber_delta: float = 10.0
    """Huber loss delta for the critics (0: plain squared error)."""
    value_norm: bool = True
    """Normalise value targets with running statistics (MAPPO's ValueNorm)."""
    adv_norm: bool = True
    """Normalise advantages per agent over the batch."""
    critic_input: str = "state"
    """What V_i sees: 'state' (centralised), 'obs' (local, IPPO) or 'state+obs'."""
    lr_anneal: bool = False
    """Decay learning rates linearly to 0 over training."""
    log_std_init: float = -0.5
    """Initial log standard deviation of Gaussian policies."""
    state_dependent_std: bool = False
    """Gaussian log-std as a network output instead of a free parameter per agent."""
    squash: str = "clip"
    """How continuous samples reach the env's bounds: 'clip' or 'tanh'."""

    def validate(self) -> None:
        if self.critic_input not in ("state", "obs", "state+obs"):
            raise UsageError(f"critic_input must be 'state', 'obs' or 'state+obs', got {self.critic_input!r}")
        if self.minibatches < 1 or self.epochs < 1 or self.critic_epochs < 0:
            raise UsageError("epochs and minibatches must be >= 1 (critic_epochs >= 0)")
        if not 0 < self.clip < 1:
            raise UsageError(f"clip must lie in (0, 1), got {self.clip}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-agent mean over the batch: ``[B, k]`` -> ``[k]``, counting only active samples."""
    return (x * mask).sum(0) / mask.sum(0).clamp_min(1.0)


def value_loss(new: torch.Tensor, old: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
               clip: float, huber_delta: float) -> torch.Tensor:
    """Per-agent critic loss ``[k]``: clipped (MAPPO eq. 3 of its appendix) Huber or squared error."""

    def err(e: torch.Tensor) -> torch.Tensor:
        if huber_delta > 0:
            return nn.functional.huber_loss(e, torch.zeros_like(e), reduction="none", delta=huber_delta)
        return 0.5 * e.pow(2)

    loss = err(target - new)
    if clip > 0:
        clipped = old + (new - old).clamp(-clip, clip)
        loss = torch.max(loss, err(target - clipped))
    return masked_mean(loss, mask)


class Critics(nn.Module):
    """Per-agent value functions ``V_i`` over the chosen input, with optional target normalisation."""

    def __init__(self, spec: EnvSpec, cfg: OnPolicyConfig):
        super().__init__()
        self.mode = cfg.critic_input
        in_dim = {"state": spec.state_dim, "obs": spec.obs_dim, "state+obs": spec.state_dim + spec.obs_dim}[self.mode]
        self.net = AgentMLP(spec.n_agents, in_dim, 1, cfg.hidden, cfg.activation, cfg.share_params, cfg.agent_id)
        self.norm = ValueNorm(spec.n_agents) if cfg.value_norm else None
        self.n_agents = spec.n_agents

    def inputs(self, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        if self.mode == "obs":
            return obs
        s = state.unsqueeze(-2).expand(*obs.shape[:-1], state.shape[-1])
        return s if self.mode == "state" else torch.cat([s, obs], -1)

    def raw(self, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Critic outputs ``[B, N]`` in normalised space."""
        return self.net(self.inputs(state, obs)).squeeze(-1)

    def value(self, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """Value estimates ``[B, N]`` in reward units."""
        v = self.raw(state, obs)
        return self.norm.denormalize(v) if self.norm is not None else v


class OnPolicyAlgorithm(Algorithm):
    """Base of MAPPO, IPPO, HAPPO, HATRPO, HAA2C and the progressive update."""

    Config = OnPolicyConfig
    uses_cost: bool = False
    """Train per-agent cost critics on tasks that have a cost (the progressive update does)."""

    def __init__(self, spec: EnvSpec, cfg: OnPolicyConfig, run: TrainConfig, device: torch.device):
        super().__init__(spec, cfg, run, device)
        self.n = spec.n_agents
        self.actor = Actor(spec, cfg.hidden, cfg.activation, cfg.share_params, cfg.agent_id,
                           cfg.log_std_init, cfg.state_dependent_std, cfg.squash).to(device)
        self.critic = Critics(spec, cfg).to(device)
        self.cost_critic = Critics(spec, cfg).to(device) if (self.uses_cost and spec.has_cost) else None
        groups = 1 if cfg.share_params else self.n
        # One optimiser per agent: a sequential phase steps only its agent's optimiser.
        self.actor_opts = [torch.optim.Adam(self.actor.agent_parameters(i), lr=cfg.lr, eps=cfg.adam_eps)
                           for i in range(groups)]
        self.critic_opts = [torch.optim.Adam(self._critic_params(i), lr=cfg.critic_lr, eps=cfg.adam_eps)
                            for i in range(groups)]
        self.buffer = RolloutBuffer(spec, run.num_envs, run.rollout_len, self.cost_critic is not None, device)
        self.last_policy_loss = torch.zeros(self.n)

    # ------------------------------------------------------------------ helpers
    def _critic_params(self, i: int) -> list[nn.Parameter]:
        p = self.critic.net.agent_parameters(i)
        if self.cost_critic is not None:
            p += self.cost_critic.net.agent_parameters(i)
        return p

    def _opt(self, opts: Sequence[torch.optim.Optimizer], i: int) -> torch.optim.Optimizer:
        return opts[0 if self.cfg.share_params else i]

    def _reduce(self, per_agent: torch.Tensor) -> torch.Tensor:
        """Sum of per-agent losses (separate networks: each gets its own gradient) or their mean (shared)."""
        return per_agent.mean() if self.cfg.share_params else per_agent.sum()

    def _clip_and_step(self, opts: Sequence[torch.optim.Optimizer], params_of: Any, agents: list[int]) -> float:
        groups = [0] if self.cfg.share_params else agents
        norms = []
        for g in groups:
            params = params_of(g)
            if self.cfg.max_grad_norm > 0:
                norms.append(float(nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)))
            opts[g].step()
        return sum(norms) / max(1, len(norms))

    def _zero(self, opts: Sequence[torch.optim.Optimizer], agents: list[int]) -> None:
        for g in [0] if self.cfg.share_params else agents:
            opts[g].zero_grad(set_to_none=True)

    @staticmethod
    def _check_finite(loss: torch.Tensor, what: str) -> None:
        if not torch.isfinite(loss).all():
            raise TrainingError(
                f"{what} became NaN/inf. Checkpoints already written are intact; lower the learning "
                "rates (lr=..., critic_lr=...) or max_grad_norm and resume or restart."
            )

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        o = obs.obs.to(self.device)
        a, logp = self.actor.act(o, obs.action_mask.to(self.device), self.generator, deterministic=not explore)
        extras = {"action": a, "logp": logp}
        if explore:
            s = obs.state.to(self.device)
            extras["value"] = self.critic.value(s, o)
            if self.cost_critic is not None:
                extras["cost_value"] = self.cost_critic.value(s, o)
        return ActOut(env_action=self.actor.to_env(a).cpu(), extras=extras)

    def observe(self, obs: BatchObs, out: ActOut, step: BatchStep) -> None:
        x = out.extras
        self.buffer.add(obs, x["action"], x["logp"], x["value"], x.get("cost_value"), step)

    # ------------------------------------------------------------------ batch preparation
    @torch.no_grad()
    def prepare(self) -> dict[str, torch.Tensor]:
        """GAE per agent for reward (and cost), flattened to ``[B = T * E, ...]``."""
        d = self.buffer.data()
        T, E = d.reward.shape[:2]
        ns, no = d.next_state.reshape(T * E, -1), d.next_obs.reshape(T * E, self.n, -1)
        next_v = self.critic.value(ns, no).reshape(T, E, self.n)
        adv, ret = gae(d.reward, d.value, next_v, d.terminated, d.done, self.cfg.gamma, self.cfg.gae_lambda)
        batch = flatten_rollout(d)
        batch["adv"] = adv.reshape(T * E, self.n)
        batch["ret"] = ret.reshape(T * E, self.n)
        if self.cost_critic is not None and d.cost is not None and d.cost_value is not None:
            next_c = self.cost_critic.value(ns, no).reshape(T, E, self.n)
            cadv, cret = gae(d.cost, d.cost_value, next_c, d.terminated, d.done, self.cfg.gamma, self.cfg.gae_lambda)
            batch["cost_adv"] = cadv.reshape(T * E, self.n)
            batch["cost_ret"] = cret.reshape(T * E, self.n)
        batch["mask"] = batch["active"].float()
        return batch

    def policy_advantage(self, batch: dict[str, torch.Tensor], progress: Progress) -> torch.Tensor:
        """The advantage the actors maximise (the progressive update mixes in the cost here)."""
        return batch["adv"]

    def plan(self, batch: dict[str, torch.Tensor], progress: Progress) -> Plan:
        """The phases of this update; simultaneous by default."""
        return simultaneous(self.n)

    # ------------------------------------------------------------------ step rule
    def _logp(self, batch: dict[str, torch.Tensor], agents: list[int], idx: torch.Tensor | slice = slice(None)
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor.evaluate(batch["obs"][idx][:, agents], batch["action_mask"][idx][:, agents],
                                   batch["action"][idx][:, agents], agents)

    def log_ratio(self, batch: dict[str, torch.Tensor], agents: list[int]) -> torch.Tensor:
        """``[B]``: sum over ``agents`` of log pi_new - log pi_old (inactive samples contribute 0)."""
        logp, _ = self._logp(batch, agents)
        return ((logp - batch["logp"][:, agents]) * batch["mask"][:, agents]).sum(-1)

    def surrogate(self, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, factor: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """HAPPO's clipped surrogate per sample and agent: ``F * min(r A, clip(r, 1 +- eps) A)``.

        With ``F = 1`` this is PPO's (MAPPO) objective. Returns (objective, ratio).
        """
        ratio = torch.exp(logp - old)
        eps = self.cfg.clip
        obj = torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        return factor.unsqueeze(-1) * obj, ratio

    def actor_step(self, batch: dict[str, torch.Tensor], agents: list[int], factor: torch.Tensor) -> dict[str, float]:
        """PPO-style update of ``agents`` for ``epochs`` passes (the default step rule)."""
        cfg = self.cfg
        B = batch["obs"].shape[0]
        stats: dict[str, list[torch.Tensor]] = {"policy": [], "entropy": [], "kl": [], "clipfrac": []}
        for _ in range(cfg.epochs):
            perm = torch.randperm(B, generator=self.generator).to(self.device)
            for idx in perm.chunk(cfg.minibatches):
                logp, ent = self._logp(batch, agents, idx)
                old = batch["logp"][idx][:, agents]
                m = batch["mask"][idx][:, agents]
                obj, ratio = self.surrogate(logp, old, batch["policy_adv"][idx][:, agents], factor[idx])
                pol = -masked_mean(obj, m)
                entropy = masked_mean(ent, m)
                loss = self._reduce(pol - cfg.entropy_coef * entropy)
                self._check_finite(loss, f"the policy loss of agents {agents}")
                self._zero(self.actor_opts, agents)
                loss.backward()
                self._clip_and_step(self.actor_opts, self.actor.agent_parameters, agents)
                with torch.no_grad():
                    lr_ = logp - old
                    stats["policy"].append(pol.detach())
                    stats["entropy"].append(entropy.detach())
                    stats["kl"].append(masked_mean(ratio - 1 - lr_, m))  # k3 estimator of KL(old || new)
                    stats["clipfrac"].append(masked_mean(((ratio - 1).abs() > cfg.clip).float(), m))
        return self._phase_stats(agents, stats)

    def _phase_stats(self, agents: list[int], stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, vals in stats.items():
            if not vals:
                continue
            v = torch.stack(vals).mean(0)  # [k]
            for j, i in enumerate(agents):
                out[f"{key}_{i}"] = float(v[j])
        # The importance score needs each agent's most recent policy loss (spec step 3).
        if stats.get("policy"):
            last = stats["policy"][-1]
            for j, i in enumerate(agents):
                self.last_policy_loss[i] = float(last[j])
        return out

    # ------------------------------------------------------------------ critics
    def critic_losses(self, batch: dict[str, torch.Tensor], idx: torch.Tensor | slice = slice(None)
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-agent value (and cost) losses ``[N]`` on ``idx``, with the current parameters."""
        cfg = self.cfg
        s, o, m = batch["state"][idx], batch["obs"][idx], batch["mask"][idx]

        def one(critic: Critics, target: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            if critic.norm is not None:
                target, old = critic.norm.normalize(target), critic.norm.normalize(old)
            return value_loss(critic.raw(s, o), old, target, m, cfg.value_clip, cfg.huber_delta)

        v = one(self.critic, batch["ret"][idx], batch["value"][idx])
        c = None
        if self.cost_critic is not None and "cost_ret" in batch:
            c = one(self.cost_critic, batch["cost_ret"][idx], batch["cost_value"][idx])
        return v, c

    def update_critics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        cfg = self.cfg
        if self.critic.norm is not None:
            self.critic.norm.update(batch["ret"], batch["mask"])
        if self.cost_critic is not None and self.cost_critic.norm is not None and "cost_ret" in batch:
            self.cost_critic.norm.update(batch["cost_ret"], batch["mask"])
        B = batch["obs"].shape[0]
        agents = list(range(self.n))
        vals, costs = [], []
        for _ in range(cfg.critic_epochs):
            perm = torch.randperm(B, generator=self.generator).to(self.device)
            for idx in perm.chunk(cfg.minibatches):
                v, c = self.critic_losses(batch, idx)
                total = v if c is None else v + c
                loss = self._reduce(total)
                self._check_finite(loss, "the critic loss")
                self._zero(self.critic_opts, agents)
                loss.backward()
                self._clip_and_step(self.critic_opts, self._critic_params, agents)
                vals.append(v.detach())
                if c is not None:
                    costs.append(c.detach())
        out: dict[str, float] = {}
        if vals:
            vm = torch.stack(vals).mean(0)
            out.update({f"value_{i}": float(vm[i]) for i in range(self.n)})
        if costs:
            cm = torch.stack(costs).mean(0)
            out.update({f"cost_{i}": float(cm[i]) for i in range(self.n)})
        return out

    # ------------------------------------------------------------------ update
    def _anneal(self, progress: Progress) -> None:
        if not self.cfg.lr_anneal:
            return
        frac = 1.0 - progress.fraction
        for opt in self.actor_opts:
            for g in opt.param_groups:
                g["lr"] = self.cfg.lr * frac
        for opt in self.critic_opts:
            for g in opt.param_groups:
                g["lr"] = self.cfg.critic_lr * frac

    def _normalise(self, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.cfg.adv_norm:
            return adv
        mean = masked_mean(adv, mask)
        var = masked_mean((adv - mean).pow(2), mask)
        return (adv - mean) / (var.sqrt() + 1e-8)

    def update(self, progress: Progress) -> Metrics:
        self._anneal(progress)
        batch = self.prepare()
        batch["policy_adv"] = self._normalise(self.policy_advantage(batch, progress), batch["mask"])
        plan = self.plan(batch, progress)
        result = run_schedule(
            plan,
            batch["obs"].shape[0],
            step=lambda agents, f: self.actor_step(batch, agents, f),
            log_ratio=lambda agents: self.log_ratio(batch, agents),
            device=self.device,
        )
        metrics: Metrics = {}
        per_agent: dict[str, float] = {}
        for m in result.phase_metrics:
            per_agent.update(m)
        with torch.enable_grad():
            per_agent.update(self.update_critics(batch))
        for key, v in per_agent.items():
            metrics[f"loss/{key}"] = v
        for key in ("policy", "value", "cost", "entropy", "kl", "clipfrac"):
            vals = [v for k, v in per_agent.items() if k.rsplit("_", 1)[0] == key]
            if vals:
                metrics[f"loss/{key}"] = sum(vals) / len(vals)
        metrics.update(self.plan_metrics(plan, result))
        self.buffer.reset()
        return metrics

    def plan_metrics(self, plan: Plan, result: Any) -> Metrics:
        """What the schedule decided, for the log (sequential schedules log their order)."""
        out: Metrics = dict(factor_stats(result))
        if plan.critical:
            out["sched/critical"] = ";".join(str(i) for i in plan.critical)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "cost_critic": None if self.cost_critic is None else self.cost_critic.state_dict(),
            "actor_opts": [o.state_dict() for o in self.actor_opts],
            "critic_opts": [o.state_dict() for o in self.critic_opts],
            "last_policy_loss": self.last_policy_loss.clone(),
            "rng": self._rng_state(),
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        if self.cost_critic is not None and state.get("cost_critic") is not None:
            self.cost_critic.load_state_dict(state["cost_critic"])
        for o, s in zip(self.actor_opts, state["actor_opts"]):
            o.load_state_dict(s)
        for o, s in zip(self.critic_opts, state["critic_opts"]):
            o.load_state_dict(s)
        self.last_policy_loss = state["last_policy_loss"].clone()
        self._load_rng_state(state["rng"])
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """Subclass state to checkpoint (e.g. the Lagrange multiplier)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass
