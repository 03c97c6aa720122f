"""The on-policy family's shared machinery: actors, critics, GAE, a schedule of phases, a step rule.

An on-policy algorithm here is (a schedule, a per-agent step rule, the critics it trains)
(``../shared/DESIGN.md``). :class:`OnPolicyAlgorithm` collects rollouts, computes per-agent GAE,
asks :meth:`plan` for the phases (:mod:`pamarl.algos.schedules`), runs them with
:meth:`actor_step` (PPO's clipped surrogate by default, weighted by the factor handed in by the
schedule) and then fits every agent's critic. Subclasses override only what makes them themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pamarl.algos.base import ActOut, Algorithm, LearnerConfig, Metrics, Progress
from pamarl.algos.common import check_finite, clip_and_step, fused_adam, masked_mean, mean_weights
from pamarl.algos.critics import Critics, value_loss
from pamarl.algos.schedules import Plan, factor_stats, run_schedule, simultaneous
from pamarl.buffers.rollout import OnPolicyBatch, RolloutBuffer, gae, rows
from pamarl.config import TrainConfig
from pamarl.envs.base import BatchObs, BatchStep, EnvSpec
from pamarl.errors import UsageError
from pamarl.nets.policy import Actor

__all__ = ["Critics", "OnPolicyAlgorithm", "OnPolicyBatch", "OnPolicyConfig", "masked_mean", "value_loss"]


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
    critic: str = "auto"
    """'shared': one centralised V(s) for the team, trained on the team reward (HARL's MAPPO/HAPPO/HATRPO/HAA2C);
    'per_agent': one value function V_i per agent (the progressive update needs it; so do individual rewards);
    'auto' (default): 'shared' when the team reward is trained on (``reward=team``, or ``auto`` on a cooperative
    task), the critic sees the global state and the algorithm does not read per-agent critics; else 'per_agent'."""
    input_norm: bool = True
    """LayerNorm on the actor's and critics' inputs (HARL's use_feature_normalization, on by default there)."""
    layer_norm: bool = True
    """LayerNorm after every hidden layer of the actor and critics (HARL's MLP layers always have it)."""
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
        if self.critic not in ("auto", "per_agent", "shared"):
            raise UsageError(f"critic must be 'auto', 'per_agent' or 'shared', got {self.critic!r}")
        if self.critic == "shared" and self.critic_input != "state":
            raise UsageError("critic=shared is one V(s) of the global state: it needs critic_input=state")
        if self.minibatches < 1 or self.epochs < 1 or self.critic_epochs < 0:
            raise UsageError("epochs and minibatches must be >= 1 (critic_epochs >= 0)")
        if not 0 < self.clip < 1:
            raise UsageError(f"clip must lie in (0, 1), got {self.clip}")


class OnPolicyAlgorithm(Algorithm):
    """Base of MAPPO, IPPO, HAPPO, HATRPO, HAA2C and the progressive update."""

    Config = OnPolicyConfig
    cfg: OnPolicyConfig
    needs_per_agent_critics: bool = False
    """The algorithm's own logic reads per-agent critics (the progressive update's importance score)."""

    def __init__(self, spec: EnvSpec, cfg: OnPolicyConfig, run: TrainConfig, device: torch.device):
        super().__init__(spec, cfg, run, device)
        if cfg.critic == "shared" and self.needs_per_agent_critics:
            raise UsageError(f"{self.name} needs per-agent critics (its importance score compares agents' value "
                             "losses): use critic=per_agent")
        if cfg.critic == "shared" and not self.team_rewards and spec.n_agents > 1:
            raise UsageError("critic=shared learns one team value V(s): it needs reward=team (or reward=auto on a "
                             "cooperative task)")
        self.critic_kind = self.resolve_critic(spec)
        """The critic actually built: 'shared' or 'per_agent' (``critic=auto`` resolved)."""
        self.n = spec.n_agents
        self.actor = Actor(spec, cfg.hidden, cfg.activation, cfg.share_params, cfg.agent_id,
                           cfg.log_std_init, cfg.state_dependent_std, cfg.squash, input_norm=cfg.input_norm,
                           layer_norm=cfg.layer_norm).to(device)
        self.critic = Critics(spec, cfg, self.critic_kind == "shared").to(device)
        # Costs are per agent under either reward convention (never summed), so cost critics stay per agent.
        self.cost_critic = Critics(spec, cfg, False).to(device) if (self.uses_cost and spec.has_cost) else None
        groups = 1 if cfg.share_params else self.n
        # One optimiser per agent: a sequential phase steps only its agent's optimiser. Value and cost
        # critics have optimisers (and gradient clipping) of their own, so a large cost loss never
        # shrinks the value critic's step through a shared clip.
        self.actor_opts = [fused_adam(self.actor.agent_parameters(i), cfg.lr, cfg.adam_eps)
                           for i in range(groups)]
        self.critic_opts = self._critic_optimisers(self.critic)
        self.cost_critic_opts = self._critic_optimisers(self.cost_critic) if self.cost_critic is not None else []
        self.buffer = RolloutBuffer(spec, run.num_envs, run.rollout_len, self.cost_critic is not None, device)
        self.last_policy_loss = torch.zeros(self.n)

    # ------------------------------------------------------------------ helpers
    def resolved(self) -> dict[str, Any]:
        return {"critic": self.critic_kind}

    def resolve_critic(self, spec: EnvSpec) -> str:
        """``critic=auto`` -> 'shared' or 'per_agent' (see :attr:`OnPolicyConfig.critic`)."""
        if self.cfg.critic != "auto":
            return self.cfg.critic
        shared = (self.team_rewards or spec.n_agents == 1) and self.cfg.critic_input == "state" \
            and not self.needs_per_agent_critics
        return "shared" if shared else "per_agent"

    def _critic_optimisers(self, critic: Critics) -> list[torch.optim.Optimizer]:
        return [fused_adam(critic.net.agent_parameters(i), self.cfg.critic_lr, self.cfg.adam_eps)
                for i in range(critic.groups(self.cfg.share_params))]

    def _reduce(self, per_agent: torch.Tensor, shared: bool | None = None) -> torch.Tensor:
        """Sum of per-agent losses (separate networks: each gets its own gradient) or their mean (shared)."""
        shared = self.cfg.share_params if shared is None else shared
        return per_agent.mean() if shared else per_agent.sum()

    def _groups(self, agents: list[int], n_groups: int) -> list[int]:
        return [0] if n_groups == 1 else agents

    def _clip_and_step(self, opts: Sequence[torch.optim.Optimizer], params_of: Callable[[int], list[nn.Parameter]],
                       agents: list[int]) -> float:
        norms = [clip_and_step(opts[g], params_of(g), self.cfg.max_grad_norm)
                 for g in self._groups(agents, len(opts))]
        return float(torch.stack(norms).mean()) if norms else 0.0

    def _zero(self, opts: Sequence[torch.optim.Optimizer], agents: list[int]) -> None:
        for g in self._groups(agents, len(opts)):
            opts[g].zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(self, obs: BatchObs, explore: bool = True) -> ActOut:
        o = obs.obs.to(self.device)
        a, logp = self.actor.act(o, obs.action_mask.to(self.device), self.generator, deterministic=not explore)
        # No critic here: the critics do not move during collection, so prepare() evaluates them on the whole
        # rollout in one batched pass (about 40% of a step's acting cost saved; same values).
        return ActOut(env_action=self.actor.to_env(a), action=a, logp=logp)

    def observe(self, obs: BatchObs, out: ActOut, step: BatchStep) -> None:
        if out.logp is None:
            raise ValueError("on-policy observe() needs the log-probabilities of act(explore=True)")
        self.buffer.add(obs, out.action, out.logp, step)

    # ------------------------------------------------------------------ batch preparation
    @torch.no_grad()
    def prepare(self) -> OnPolicyBatch:
        """GAE per agent for reward (and cost), flattened to ``[B = T * E, ...]``.

        The critics have not moved since the rollout was collected (they change only when fitted, after
        this), so their values at the rollout's states are evaluated here, in one batched pass per critic:
        ``value_old`` (training units, the centre of the value clip) and, turned into reward units with the
        normaliser's statistics, the ``V(s_t)`` of GAE.
        """
        d = self.buffer.data()
        T, E = d.reward.shape[:2]
        B = T * E
        s, o = d.state.reshape(B, -1), d.obs.reshape(B, self.n, -1)
        ns, no = d.next_state.reshape(B, -1), d.next_obs.reshape(B, self.n, -1)

        def advantages(critic: Critics, reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            old = critic.raw(s, o)
            v = critic.denormalize(old).reshape(T, E, self.n)
            next_v = critic.value(ns, no).reshape(T, E, self.n)
            adv, ret = gae(reward, v, next_v, d.terminated, d.done, self.cfg.gamma, self.cfg.gae_lambda)
            return adv.reshape(B, self.n), ret.reshape(B, self.n), old

        adv, ret, old = advantages(self.critic, d.reward)
        flat = lambda x: x.reshape(B, *x.shape[2:])  # noqa: E731
        batch = OnPolicyBatch(
            obs=flat(d.obs), state=s, action_mask=flat(d.action_mask), active=flat(d.active),
            action=flat(d.action), logp=flat(d.logp), mask=flat(d.active).float(), value_old=old,
            ret=ret, adv=adv,
        )
        if self.cost_critic is not None and d.cost is not None:
            batch.cost_adv, batch.cost_ret, batch.cost_value_old = advantages(self.cost_critic, d.cost)
        return batch

    def policy_advantage(self, batch: OnPolicyBatch, progress: Progress) -> torch.Tensor:
        """The advantage the actors maximise, from the separately standardised advantages.

        Plain reward advantage here; the progressive update mixes in the cost (spec step 8).
        """
        return self.standardise(batch.adv, batch.mask)

    def plan(self, batch: OnPolicyBatch, progress: Progress) -> Plan:
        """The phases of this update; simultaneous by default."""
        return simultaneous(self.n)

    # ------------------------------------------------------------------ step rule
    def _logp(self, batch: OnPolicyBatch, agents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor.evaluate(batch.obs[:, agents], batch.action_mask[:, agents], batch.action[:, agents], agents)

    def log_ratio(self, batch: OnPolicyBatch, agents: list[int]) -> torch.Tensor:
        """``[B]``: sum over ``agents`` of log pi_new - log pi_old (inactive samples contribute 0)."""
        logp, _ = self._logp(batch, agents)
        return ((logp - batch.logp[:, agents]) * batch.mask[:, agents]).sum(-1)

    def surrogate(self, logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, factor: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """HAPPO's clipped surrogate per sample and agent: ``F * min(r A, clip(r, 1 +- eps) A)``.

        Kuba et al. 2022, eq. 11; with ``F = 1`` this is PPO's (MAPPO) objective. Returns (objective, ratio).
        """
        ratio = torch.exp(logp - old)
        eps = self.cfg.clip
        obj = torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        return factor.unsqueeze(-1) * obj, ratio

    def _minibatches(self) -> list[torch.Tensor | slice]:
        """The index sets of one pass: a random partition of the batch into ``minibatches`` parts.

        With one minibatch the whole batch is taken in order, as a view: a full-batch gradient does not
        depend on the order of the samples, and gathering every field through a permutation cost 12% of
        the update (profiled on mpe-torch simple_spread, 25,600 samples).
        """
        if self.cfg.minibatches == 1:
            return [slice(None)]
        B = self.buffer.length * self.run.num_envs
        perm = torch.randperm(B, generator=self.generator, device=self.device)
        return list(perm.chunk(self.cfg.minibatches))

    ACTOR_FIELDS: ClassVar[frozenset[str]] = frozenset({"obs", "action_mask", "action", "logp", "mask", "policy_adv"})
    """The batch fields an actor step reads."""

    def actor_step(self, batch: OnPolicyBatch, agents: list[int], factor: torch.Tensor) -> dict[str, float]:
        """PPO-style update of ``agents`` for ``epochs`` passes (the default step rule)."""
        cfg = self.cfg
        assert batch.policy_adv is not None
        stats: dict[str, list[torch.Tensor]] = {"policy": [], "entropy": [], "kl": [], "clipfrac": []}
        # Only what the actors read, only these agents' columns (views when the agents are consecutive),
        # selected once for the phase; each minibatch then gathers rows of that.
        mine = batch.take(slice(None), self.ACTOR_FIELDS, agents)
        for _ in range(cfg.epochs):
            for idx in self._minibatches():
                mb = mine.take(idx)
                assert mb.policy_adv is not None
                logp, ent = self.actor.evaluate(mb.obs, mb.action_mask, mb.action, agents)
                old = mb.logp
                w = mean_weights(mb.mask, logp.dtype)  # every per-agent mean below is (x * w).sum(0)
                obj, ratio = self.surrogate(logp, old, mb.policy_adv, rows(factor, idx))
                pol = -(obj * w).sum(0)
                entropy = (ent * w).sum(0)
                loss = self._reduce(pol - cfg.entropy_coef * entropy)
                check_finite(loss, f"the policy loss of agents {agents}")
                self._zero(self.actor_opts, agents)
                loss.backward()
                self._clip_and_step(self.actor_opts, self.actor.agent_parameters, agents)
                with torch.no_grad():
                    d = ratio - 1
                    stats["policy"].append(pol.detach())
                    stats["entropy"].append(entropy.detach())
                    stats["kl"].append(((d - (logp - old)) * w).sum(0))  # k3 estimator of KL(old || new)
                    stats["clipfrac"].append(((d.abs() > cfg.clip) * w).sum(0))
        return self._phase_stats(agents, stats)

    def _phase_stats(self, agents: list[int], stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, vals in stats.items():
            if not vals:
                continue
            v = torch.stack(vals).mean(0).cpu()  # [k]
            for j, i in enumerate(agents):
                out[f"{key}_{i}"] = float(v[j])
        # The importance score needs each agent's most recent policy loss (spec step 3).
        if stats.get("policy"):
            last = stats["policy"][-1].cpu()
            for j, i in enumerate(agents):
                self.last_policy_loss[i] = float(last[j])
        return out

    # ------------------------------------------------------------------ critics
    def critic_loss(self, critic: Critics, mb: OnPolicyBatch, target: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """Per-agent (``[N]``) or, for a shared critic, one (``[1]``) value loss on the minibatch ``mb``.

        ``target`` is the minibatch's value targets already normalised with the current statistics, and ``old``
        the critic's prediction before this update (evaluated in :meth:`prepare`, with the weights the rollout
        was collected with), the centre of the clip; both in training units and with the critic's columns
        (one for a shared critic, see :meth:`_fit`).
        """
        new, m = critic.outputs(mb.state, mb.obs), mb.mask
        if critic.shared:  # one value per sample, weighted where any agent is active
            m = m.amax(-1, keepdim=True)
        return value_loss(new, old, target, m, self.cfg.value_clip, self.cfg.huber_delta)

    def _fit(self, critic: Critics, opts: list[torch.optim.Optimizer], batch: OnPolicyBatch, target: torch.Tensor,
             old: torch.Tensor, what: str) -> torch.Tensor:
        """``critic_epochs`` passes of minibatch steps on one critic; returns its mean loss per agent.

        ``target`` (reward units) and ``old`` (training units) are ``[B, N]``; a shared critic reads their
        column 0. The normaliser's statistics are updated once, here, so the targets are normalised once for
        all the minibatch steps."""
        if critic.norm is not None:
            m = batch.mask.amax(-1, keepdim=True) if critic.shared else batch.mask
            critic.norm.update(target[:, :1] if critic.shared else target, m)
        if critic.shared:
            target, old = target[:, :1], old[:, :1]
        target = critic.normalize(target)
        agents = list(range(self.n))
        losses = []
        shared = len(opts) == 1
        # What the critic reads: a shared V(s) the state only; per-agent critics the observations too.
        keep = {"state", "mask"} if critic.shared else {"state", "obs", "mask"}
        for _ in range(self.cfg.critic_epochs):
            for idx in self._minibatches():
                mb = batch.take(idx, keep)
                per = self.critic_loss(critic, mb, rows(target, idx), rows(old, idx))
                loss = self._reduce(per, shared)
                check_finite(loss, what)
                self._zero(opts, agents)
                loss.backward()
                self._clip_and_step(opts, critic.net.agent_parameters, agents)
                losses.append(per.detach().expand(self.n) if critic.shared else per.detach())
        return torch.stack(losses).mean(0).cpu() if losses else torch.zeros(self.n)

    def update_critics(self, batch: OnPolicyBatch) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.cfg.critic_epochs == 0:
            return out
        v = self._fit(self.critic, self.critic_opts, batch, batch.ret, batch.value_old, "the critic loss")
        out.update({f"value_{i}": float(v[i]) for i in range(self.n)})
        if self.cost_critic is not None and batch.cost_ret is not None and batch.cost_value_old is not None:
            c = self._fit(self.cost_critic, self.cost_critic_opts, batch, batch.cost_ret, batch.cost_value_old,
                          "the cost critic loss")
            out.update({f"cost_{i}": float(c[i]) for i in range(self.n)})
        return out

    # ------------------------------------------------------------------ update
    def _anneal(self, progress: Progress) -> None:
        if not self.cfg.lr_anneal:
            return
        frac = 1.0 - progress.fraction
        for opts, lr in ((self.actor_opts, self.cfg.lr), (self.critic_opts, self.cfg.critic_lr),
                         (self.cost_critic_opts, self.cfg.critic_lr)):
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] = lr * frac

    def standardise(self, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-agent advantage standardisation over the batch's active samples (``adv_norm``)."""
        if not self.cfg.adv_norm:
            return adv
        mean = masked_mean(adv, mask)
        var = masked_mean((adv - mean).pow(2), mask)
        return (adv - mean) / (var.sqrt() + 1e-8)

    def update(self, progress: Progress) -> Metrics:
        self._anneal(progress)
        batch = self.prepare()
        batch.policy_adv = self.policy_advantage(batch, progress)
        plan = self.plan(batch, progress)
        result = run_schedule(
            plan,
            batch.size,
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
            "cost_critic_opts": [o.state_dict() for o in self.cost_critic_opts],
            "last_policy_loss": self.last_policy_loss.clone(),
            "rng": self._rng_state(),
            **self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        if self.cost_critic is not None and state.get("cost_critic") is not None:
            self.cost_critic.load_state_dict(state["cost_critic"])
        for opts, key in ((self.actor_opts, "actor_opts"), (self.critic_opts, "critic_opts"),
                          (self.cost_critic_opts, "cost_critic_opts")):
            saved = state.get(key, [])
            if len(saved) != len(opts):
                raise ValueError(f"{key}: the checkpoint has {len(saved)} optimisers, this run {len(opts)}")
            for o, sd in zip(opts, saved):
                o.load_state_dict(sd)
        self.last_policy_loss = state["last_policy_loss"].clone()
        self._load_rng_state(state["rng"])
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """Subclass state to checkpoint (e.g. the Lagrange multiplier)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass
